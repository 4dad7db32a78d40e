"""Image and mask decoding, and the documented conversion rule to 8-bit RGB."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from embedcache.images import BadInput, load_image, load_mask, percentile_scale, to_rgb8


def test_rgb_is_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)


def test_grayscale_is_copied_to_three_channels(tmp_path):
    g = np.arange(63, dtype=np.uint8).reshape(7, 9)
    Image.fromarray(g).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (7, 9, 3) and all(np.array_equal(out[..., c], g) for c in range(3))


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: compositing would change the colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgba[..., :3])


def test_palette_goes_through_the_palette(tmp_path):
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 0].tolist() == [70, 80, 90]


def test_16bit_uses_percentile_scaling(tmp_path):
    # a uint16 microscope frame whose values span only 0..300
    x = np.random.default_rng(2).integers(0, 301, (40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", x)
    out = load_image(tmp_path / "m.tif")
    lo, hi = np.percentile(x.astype(np.float64), [0.5, 99.5])
    want = np.rint(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert out.shape == (40, 50, 3) and np.array_equal(out[..., 0], want)
    assert out.min() == 0 and out.max() == 255  # the range is used, not 0..300/65535*255


def test_16bit_png_is_read_as_16bit(tmp_path):
    x = np.arange(100, dtype=np.uint16).reshape(10, 10) * 3
    Image.fromarray(x).save(tmp_path / "m.png")
    assert np.array_equal(load_image(tmp_path / "m.png")[..., 0], percentile_scale(x))


def test_planar_tiff_is_moved_to_channels_last(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (3, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "p.tif", x, photometric="rgb", planarconfig="separate")
    out = load_image(tmp_path / "p.tif")
    assert np.array_equal(out, np.moveaxis(x, 0, -1))


def test_constant_high_bit_image_becomes_zero():
    assert not to_rgb8(np.full((4, 4), 1000, np.uint16)).any()


def test_truncated_file_is_bad_input_naming_the_file(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="t.png"):
        load_image(tmp_path / "t.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(BadInput, match="junk.jpg"):
        load_image(tmp_path / "junk.jpg")


def test_mask_with_different_channels_is_refused(tmp_path):
    m = np.zeros((4, 4, 3), np.uint8)
    m[0, 0] = (1, 2, 3)
    Image.fromarray(m).save(tmp_path / "m.png")
    with pytest.raises(BadInput, match="m.png"):
        load_mask(tmp_path / "m.png")
    grey = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4)[..., None], 3, axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert np.array_equal(load_mask(tmp_path / "g.png"), grey[..., 0])


def test_palette_mask_gives_indices(tmp_path):
    idx = np.array([[0, 3], [5, 3]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(list(range(256)) * 3)
    im.save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.png"), idx)
