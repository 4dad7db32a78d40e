"""Dataset rules of issue 18 (items 1, 2, 4, 5, 6, 9): every path stays inside the data folder and is a
regular file, the channel-to-RGB rule is explicit, objects below a minimum area or vanishing at the input
size are counted, damaged masks are reported, and COCO flags are integers. Each test failed before its fix."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_embedcache_support import build, coco_reader, metadata, metadata_report, write_pair

from embedcache import open_cache
from embedcache.cli import main
from embedcache.images import BadInput, load_image, to_rgb8
from embedcache.prepare import BadDataError
from embedcache.readers import FolderReader
from embedcache.verify import verify

SQUARE = [[2, 2, 12, 2, 12, 12, 2, 12]]


def _grey(hw) -> np.ndarray:
    return np.zeros((*hw, 3), np.uint8)


# ---- item 5: objects that vanish at the model's input size ----


def _strip_mask() -> np.ndarray:
    """3000x3000 with object 1: a 2-row strip (rows 2-3) that the 1024 input never samples (it takes rows
    1, 4, 7, ...), so it vanishes; and object 2: a 40x40 square that survives."""
    m = np.zeros((3000, 3000), np.uint8)
    m[2:4, 100:200] = 1
    m[500:540, 500:540] = 2
    return m


def test_vanishing_objects_are_counted_and_the_cache_verifies(tmp_path):
    write_pair(tmp_path / "d", "big", _grey((3000, 3000)), _strip_mask())
    report = build(tmp_path / "d", tmp_path / "c.zarr", val_fraction=0.0)
    assert report["num_objects"] == 2
    assert report["objects_vanished"]["count"] == 1
    assert report["objects_vanished"]["images"][0]["path"].endswith("big.png")
    assert verify(tmp_path / "c.zarr") == []


def test_a_build_where_every_object_vanishes_fails_naming_it(tmp_path, capsys):
    """Before: exit 0 and a cache that verify called corrupt (its empty input-mask array has no chunk)."""
    m = _strip_mask()
    m[m == 2] = 0
    write_pair(tmp_path / "d", "big", _grey((3000, 3000)), m)
    out = tmp_path / "c.zarr"
    args = [
        "build",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(out),
        "--model",
        "vit_tiny",
        "--device",
        "cpu",
    ]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "all 1 object(s) vanish at vit_tiny's input size (the largest has 200 pixels" in err, err
    assert not out.exists()


# ---- item 6: a minimum object area, and masks whose values are not clean ----


def _jpeg_like_mask() -> np.ndarray:
    """Two 20x20 squares of 255 with grey edges (values 250, 3) and six specks of 1-4 pixels around them, as
    a binary mask saved as JPEG and back as PNG looks."""
    m = np.zeros((60, 80), np.uint8)
    m[5:25, 5:25] = 255
    m[30:50, 40:60] = 255
    m[5:25, 25] = 250
    for y, x, size in [(2, 40, 1), (10, 70, 2), (55, 5, 1), (40, 10, 2), (28, 30, 1), (56, 75, 2)]:
        m[y : y + size, x : x + size] = 3
    return m


def test_small_objects_are_dropped_and_unclean_masks_reported(tmp_path):
    write_pair(tmp_path, "jpeg", _grey((60, 80)), _jpeg_like_mask())
    meta, report = metadata_report(FolderReader(tmp_path, mask_kind="binary"))
    assert sorted(meta["objects/area"].tolist()) == [400, 420]  # the two squares, not eight "instances"
    assert report["min_object_area"] == 10
    assert report["objects_below_min_area"]["count"] == 6
    assert report["objects_below_min_area"]["images"][0]["path"].endswith("masks/jpeg.png")
    (unclean,) = report["unclean_masks"]
    assert unclean["path"].endswith("jpeg.png") and "3 foreground values (3, 250, 255)" in unclean["reason"]
    meta, report = metadata_report(FolderReader(tmp_path, mask_kind="binary"), min_object_area=1)
    assert len(meta["objects/area"]) == 8 and report["objects_below_min_area"]["count"] == 0


def test_clean_binary_masks_are_not_reported(tmp_path):
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 1
    write_pair(tmp_path, "clean", _grey((20, 20)), m)
    _, report = metadata_report(FolderReader(tmp_path, mask_kind="binary"))
    assert report["unclean_masks"] == [] and report["objects_below_min_area"]["count"] == 0


def test_an_image_whose_objects_are_all_below_the_minimum_is_kept_without_objects(tmp_path):
    """As any image without objects (tests/test_images_without_objects.py); alone, nothing is left."""
    m = np.zeros((20, 20), np.uint8)
    m[5:8, 5:8] = 1
    write_pair(tmp_path, "tiny", _grey((20, 20)), m)
    below = r"none of the 1 image.*1 object\(s\) are below --min-object-area 10"
    with pytest.raises(ValueError, match=below):
        metadata(FolderReader(tmp_path))
    big = np.zeros((20, 20), np.uint8)
    big[10:15, 10:15] = 1
    write_pair(tmp_path, "big", _grey((20, 20)), big)
    meta, report = metadata_report(FolderReader(tmp_path))
    assert meta["image_id"].tolist() == ["big", "tiny"] and meta["objects/image_index"].tolist() == [0]
    assert report["images_without_objects"]["count"] == 1 and report["objects_below_min_area"]["count"] == 1


def test_the_build_prints_its_warnings(tmp_path, capsys):
    write_pair(tmp_path / "d", "jpeg", _grey((60, 80)), _jpeg_like_mask())
    args = ["build", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "c.zarr"), "--model", "vit_tiny"]
    assert main([*args, "--mask-kind", "binary", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: 6 object(s) below --min-object-area 10 pixels left out in 1 image(s)" in err
    assert "warning: " in err and "jpeg.png: binary mask holds 3 foreground values" in err


# ---- item 9: COCO iscrowd must be the integer 0 or 1 ----


@pytest.mark.parametrize("flag", ["no", True, 1.0, 2, None], ids=["no", "true", "1.0", "2", "null"])
def test_a_non_integer_iscrowd_is_refused_naming_the_annotation(tmp_path, flag):
    ann = {"id": 7, "image_id": 5, "category_id": 1, "segmentation": SQUARE, "iscrowd": flag}
    with pytest.raises(BadDataError, match=rf"a\.png: .*annotation 7: iscrowd {flag!r} is not the integer 0"):
        metadata(coco_reader(tmp_path, [ann]))


def test_integer_iscrowd_still_works(tmp_path):
    anns = [
        {"id": 1, "image_id": 5, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 1, "segmentation": SQUARE, "iscrowd": 1},
        {"id": 3, "image_id": 5, "category_id": 1, "segmentation": SQUARE},
    ]
    reader = coco_reader(tmp_path, anns)
    meta, _ = metadata(reader)
    assert len(meta["objects/area"]) == 2 and reader.crowd_skipped == 1


# ---- item 1: every path a dataset names stays inside the data folder ----


def _secret(tmp_path: Path) -> Path:
    """A readable image outside the data folder ``tmp_path / "d"``."""
    (tmp_path / "secret").mkdir()
    Image.fromarray(_grey((30, 40))).save(tmp_path / "secret" / "x.png")
    return tmp_path / "secret" / "x.png"


def _coco_build(tmp_path, file_name, *extra) -> int:
    """``embedcache build`` over a COCO JSON whose one image is ``file_name``: its exit status."""
    data = tmp_path / "d"
    data.mkdir(exist_ok=True)
    images = [{"id": 5, "file_name": file_name, "height": 30, "width": 40}]
    ann = {"id": 1, "image_id": 5, "category_id": 1, "segmentation": SQUARE}
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps({"images": images, "annotations": [ann], "categories": [{"id": 1}]}))
    args = ["build", "--data", str(data), "--coco", str(coco), "--out", str(tmp_path / "c.zarr")]
    return main([*args, "--model", "vit_tiny", "--device", "cpu", "--no-progress", *extra])


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_coco_file_name_outside_the_data_folder_is_refused_naming_the_entry(tmp_path, capsys, how):
    """Before: the file was read from outside --data and its full path stored in the cache."""
    secret = _secret(tmp_path)
    file_name = "../secret/x.png" if how == "dotdot" else str(secret)
    status = _coco_build(tmp_path, file_name)
    err = capsys.readouterr().err
    assert status == 2 and "ann.json: images[0]: file_name " in err, err
    assert ("'..' is not allowed" if how == "dotdot" else "is an absolute path") in err
    assert not (tmp_path / "c.zarr").exists()


def _link_out(tmp_path: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(_secret(tmp_path))


def _zarr_text(cache: Path) -> str:
    """Every attribute and string the cache holds, as text."""
    return "".join(p.read_text(errors="replace") for p in cache.rglob("zarr.json")) + "".join(
        open_cache(cache).image_path.tolist()
    )


def test_a_symlink_out_of_the_data_folder_is_refused_unless_allowed(tmp_path, capsys):
    _link_out(tmp_path, tmp_path / "d" / "imgs" / "x.png")
    status = _coco_build(tmp_path, "imgs/x.png")
    err = capsys.readouterr().err
    assert status == 2 and "imgs/x.png: a symlink (or inside a linked folder) that leads outside" in err, err
    assert "secret" not in err  # where the link leads is not repeated
    status = _coco_build(tmp_path, "imgs/x.png", "--allow-outside-symlinks")
    assert status == 0, capsys.readouterr().err
    cache = tmp_path / "c.zarr"
    assert open_cache(cache).image_path.tolist() == ["imgs/x.png"]
    assert "secret" not in _zarr_text(cache)


def test_folder_layout_symlinks_out_are_refused(tmp_path):
    data = tmp_path / "d"
    write_pair(data, "good", _grey((20, 20)), np.eye(20, dtype=np.uint8) * 255)
    write_pair(data, "linked", _grey((30, 40)), np.eye(30, 40, dtype=np.uint8) * 255)
    (data / "images" / "linked.png").unlink()
    _link_out(tmp_path, data / "images" / "linked.png")
    (data / "masks" / "linked.png").rename(data / "linked-mask.png")
    (data / "masks" / "linked.png").symlink_to(data / "linked-mask.png")  # a link inside --data: fine
    with pytest.raises(BadDataError, match=r"images/linked\.png: a symlink .* leads outside the data folder"):
        metadata(FolderReader(data))
    meta, _ = metadata(FolderReader(data, allow_outside_symlinks=True))
    assert meta["image_path"].tolist() == ["images/good.png", "images/linked.png"]


# ---- item 2: a path that is not a regular file is refused, never opened ----


def _fifo(path: Path) -> threading.Timer:
    """A named pipe at ``path``, and a started watchdog: if anything still waits to read the pipe after 60
    s, it opens the write end and closes it (the reader sees an empty file), so a regression fails the test
    instead of hanging it; ``watchdog.fired`` tells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)

    def release() -> None:
        with contextlib.suppress(OSError):  # ENXIO: nobody is waiting, nothing to release
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            watchdog.fired = True

    watchdog = threading.Timer(60, release)
    watchdog.fired = False
    watchdog.start()
    return watchdog


@pytest.mark.parametrize("where", ["images/p.png", "masks/good.png"])
def test_a_named_pipe_in_the_folder_layout_is_refused_naming_it(tmp_path, where):
    """Before: the build opened the pipe and waited for ever."""
    write_pair(tmp_path, "good", _grey((20, 20)), np.eye(20, dtype=np.uint8) * 255)
    if where.startswith("masks"):
        write_pair(tmp_path, "p", _grey((20, 20)), np.eye(20, dtype=np.uint8) * 255)
        (tmp_path / where).unlink()
    watchdog = _fifo(tmp_path / where)
    try:
        with pytest.raises(BadDataError, match=rf"{where}: not a regular file \(a named pipe\)"):
            metadata(FolderReader(tmp_path))
    finally:
        watchdog.cancel()
    assert not watchdog.fired


def test_a_named_pipe_named_by_coco_is_refused_naming_it(tmp_path):
    watchdog = _fifo(tmp_path / "imgs" / "p.png")
    images = [{"id": 5, "file_name": "imgs/p.png", "height": 30, "width": 40}]
    ann = {"id": 1, "image_id": 5, "category_id": 1, "segmentation": SQUARE}
    try:
        with pytest.raises(BadDataError, match=r"imgs/p\.png: not a regular file \(a named pipe\)"):
            metadata(coco_reader(tmp_path, [ann], images))
    finally:
        watchdog.cancel()
    assert not watchdog.fired


# ---- item 4: the channel-to-RGB rule is explicit ----


def _two_channel(path: Path) -> np.ndarray:
    """A 2-channel uint16 frame saved as tifffile saves an (H, W, 2) array (no samples declaration)."""
    x = np.random.default_rng(0).integers(0, 4000, (30, 40, 2), dtype=np.uint16)
    x[..., 1] //= 10  # the second channel matters: it is much dimmer
    tifffile.imwrite(path, x)
    return x


def _four_pages(path: Path) -> np.ndarray:
    """A stack of four grey pages, written page by page."""
    x = np.random.default_rng(1).integers(0, 255, (4, 30, 40), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for page in x:
            tif.write(page, photometric="minisblack")
    return np.moveaxis(x, 0, -1)


def test_a_two_channel_tiff_is_refused_naming_its_shape_unless_mapped(tmp_path):
    """Before: the second channel was dropped as if it were alpha, silently."""
    x = _two_channel(tmp_path / "two.tif")
    with pytest.raises(BadInput, match=r"two\.tif: 2 channels or pages \(shape \(30, 40, 2\) as H, W, C"):
        load_image(tmp_path / "two.tif")
    out = load_image(tmp_path / "two.tif", (0, 1, 1))
    assert np.array_equal(out, to_rgb8(x[..., [0, 1, 1]]))
    assert np.array_equal(out[..., 1], out[..., 2]) and not np.array_equal(out[..., 0], out[..., 1])


def test_a_page_stack_is_refused_unless_mapped_and_every_page_is_reachable(tmp_path):
    """Before: a 4-page stack lost page 4 (read as alpha), or all but page 1."""
    x = _four_pages(tmp_path / "stack.tif")
    with pytest.raises(BadInput, match=r"stack\.tif: 4 channels or pages \(shape \(30, 40, 4\)"):
        load_image(tmp_path / "stack.tif")
    assert np.array_equal(load_image(tmp_path / "stack.tif", (3, 2, 0)), x[..., [3, 2, 0]])
    with pytest.raises(BadInput, match=r"--channels \(0, 1, 5\) asks for channel 5 of shape \(30, 40, 4\)"):
        load_image(tmp_path / "stack.tif", (0, 1, 5))


def test_declared_layouts_are_read_as_before_and_ignore_the_mapping(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 255, (30, 40, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(load_image(tmp_path / "rgba.tif", (0, 0, 0)), rgba[..., :3])
    la = rgba[..., :2]
    tifffile.imwrite(tmp_path / "la.tif", la, photometric="minisblack", extrasamples=["unassalpha"])
    assert np.array_equal(load_image(tmp_path / "la.tif"), np.repeat(la[..., :1], 3, axis=-1))
    tifffile.imwrite(tmp_path / "four.tif", rgba, photometric="minisblack", planarconfig="contig")
    with pytest.raises(BadInput, match=r"four\.tif: 4 channels or pages"):  # a 4th channel not declared alpha
        load_image(tmp_path / "four.tif")


def test_a_multi_frame_gif_is_refused_naming_its_frames(tmp_path):
    frames = [Image.fromarray(np.full((20, 20), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(BadInput, match=r"anim\.gif: 3 frames in one file"):
        load_image(tmp_path / "anim.gif")


def test_the_build_refuses_unmapped_channels_and_records_the_mapping(tmp_path):
    data = tmp_path / "d"
    write_pair(data, "two", _grey((30, 40)), np.eye(30, 40, dtype=np.uint8) * 255)
    (data / "images" / "two.png").unlink()
    _two_channel(data / "images" / "two.tif")
    with pytest.raises(BadDataError, match=r"two\.tif: 2 channels or pages \(shape \(30, 40, 2\)"):
        metadata(FolderReader(data))
    build(data, tmp_path / "c.zarr", channels=(0, 1, 1), val_fraction=0.0)
    assert open_cache(tmp_path / "c.zarr").signature["dataset"]["channels"] == [0, 1, 1]
