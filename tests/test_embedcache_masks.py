"""The stored mask form and the exact frame rules (original, 1024 or 256 input, 256 low-res)."""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything.utils.transforms import ResizeLongestSide

from embedcache import masks as mk
from embedcache.presets import PRESETS


def _random_mask(rng, h, w):
    m = rng.random((h, w)) < 0.3
    m[rng.integers(h), :] = True  # some structure as well as noise
    return m


@pytest.mark.parametrize("hw", [(1, 1), (37, 53), (600, 900), (1348, 1070)], ids=str)
@pytest.mark.parametrize("preset", ["vit_b", "lite_medsam", "mobile_sam"])
def test_input_hw_matches_segment_anything(hw, preset):
    p = PRESETS[preset]
    assert p.input_hw(*hw) == ResizeLongestSide.get_preprocess_shape(*hw, p.image_size)


def test_square_resize_fills_the_input():
    assert PRESETS["medsam_vit_b"].input_hw(37, 1348) == (1024, 1024)


def test_pack_roundtrip():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (3, 7), (17, 31)]:
        m = _random_mask(rng, h, w)
        box = mk.mask_box(m)
        crop = mk.unpack(mk.pack(m, box), box)
        assert np.array_equal(mk.crop_to_original(crop, box, (h, w)), m)


@pytest.mark.parametrize("hw", [(37, 53), (160, 97), (700, 1100), (1348, 1070)], ids=str)
@pytest.mark.parametrize("preset", ["vit_b", "lite_medsam", "medsam_vit_b"])
def test_input_frame_is_the_centre_nearest_rule(hw, preset):
    rng = np.random.default_rng(1)
    h, w = hw
    full = np.zeros(hw, bool)
    full[h // 5 : h // 2, w // 3 : w - 2] = _random_mask(rng, h // 2 - h // 5, w - 2 - w // 3)
    box = mk.mask_box(full)
    side = PRESETS[preset].image_size
    in_hw = PRESETS[preset].input_hw(h, w)
    got = mk.crop_to_input(full[box[1] : box[3], box[0] : box[2]], box, hw, in_hw, side=side)
    # the rule written out the slow way: every output pixel samples ((2r+1)H)//(2h)
    rows = [((2 * r + 1) * h) // (2 * in_hw[0]) for r in range(in_hw[0])]
    cols = [((2 * c + 1) * w) // (2 * in_hw[1]) for c in range(in_hw[1])]
    want = np.zeros((side, side), bool)
    want[: in_hw[0], : in_hw[1]] = full[np.ix_(rows, cols)]
    assert np.array_equal(got, want)


def _coverage_by_definition(full: np.ndarray, in_hw: tuple[int, int]) -> np.ndarray:
    """The coverage frame the slow way: split every original pixel into ``h x w`` equal parts and every
    input pixel into ``H x W`` of those, count the covered parts, round half up in 255ths."""
    (big_h, big_w), (h, w) = full.shape, in_hw
    rows = np.repeat(full.astype(np.int64), h, axis=0).reshape(h, big_h, big_w).sum(1)  # (h, W)
    cells = np.repeat(rows, w, axis=1).reshape(h, w, big_w).sum(2)  # (h, w) parts of H W each
    return ((cells * 510 + big_h * big_w) // (2 * big_h * big_w)).astype(np.uint8)


@pytest.mark.parametrize("hw", [(37, 53), (160, 97), (512, 512), (700, 1100)], ids=str)
@pytest.mark.parametrize("preset", ["vit_b", "lite_medsam", "medsam_vit_b"])
def test_coverage_is_each_input_pixels_covered_share(hw, preset):
    """``input_coverage`` of a box crop equals the definition on the whole frame, up- and downsizing, at
    whole and fractional ratios."""
    rng = np.random.default_rng(2)
    h, w = hw
    full = np.zeros(hw, bool)
    full[h // 5 : h // 2, w // 3 : w - 2] = _random_mask(rng, h // 2 - h // 5, w - 2 - w // 3)
    box = mk.mask_box(full)
    in_hw = PRESETS[preset].input_hw(h, w)
    (r0, r1, c0, c1), got = mk.input_coverage(full[box[1] : box[3], box[0] : box[2]], box, hw, in_hw)
    frame = np.zeros(in_hw, np.uint8)
    frame[r0:r1, c0:c1] = got
    assert np.array_equal(frame, _coverage_by_definition(full, in_hw))
    assert got.dtype == np.uint8
    if in_hw[0] < h:  # downsizing: pixels on the edges are partly covered
        assert ((got > 0) & (got < 255)).any()


@pytest.mark.parametrize("hw", [(37, 53), (160, 97)], ids=str)
@pytest.mark.parametrize("preset", ["vit_b", "lite_medsam"])
def test_input_mean_is_each_input_pixels_footprint_mean(hw, preset):
    """``input_mean`` of integer values: the definition's count of equal parts (``_coverage_by_definition``
    without the rounding), weighted by the values; a bool image gives the coverage's exact share."""
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, hw)
    in_hw = PRESETS[preset].input_hw(*hw)
    (big_h, big_w), (h, w) = hw, in_hw
    rows = np.repeat(values, h, axis=0).reshape(h, big_h, big_w).sum(1)
    want = np.repeat(rows, w, axis=1).reshape(h, w, big_w).sum(2) / (big_h * big_w)
    np.testing.assert_allclose(mk.input_mean(values, in_hw), want, rtol=1e-12)
    full = values < 20000
    share = np.floor(mk.input_mean(full, in_hw) * 255 + 0.5)  # half up, as the coverage rounds
    assert np.array_equal(share, _coverage_by_definition(full, in_hw))


def test_coverage_is_centred_where_the_nearest_rule_is_not():
    """Halving a mask: the coverage keeps its centre of mass; the nearest rule moves it half an original
    pixel up and left (input pixel r, the footprint of pixels 2r and 2r + 1, samples pixel 2r + 1)."""
    full = np.zeros((512, 512), bool)
    full[101:140, 300:317] = True  # odd edges: the nearest rule takes one of each pair of rows / columns
    box = mk.mask_box(full)
    crop = full[box[1] : box[3], box[0] : box[2]]
    (r0, r1, c0, c1), cov = mk.input_coverage(crop, box, (512, 512), (256, 256))
    frame = np.zeros((256, 256))
    frame[r0:r1, c0:c1] = cov / 255

    def centre(m: np.ndarray, scale: float) -> np.ndarray:  # pixel centres, in original pixels
        ys, xs = np.indices(m.shape)
        return np.array([((ys + 0.5) * m).sum(), ((xs + 0.5) * m).sum()]) * scale / m.sum()

    truth = centre(full.astype(float), 1)
    # within 0.05 px: 255ths round each share by up to 1/510 (a half-covered pixel holds 128 / 255)
    assert np.abs(centre(frame, 2) - truth).max() < 0.05
    nearest = mk.crop_to_input(crop, box, (512, 512), (256, 256), side=256).astype(float)
    assert np.allclose(centre(nearest, 2) - truth, [-0.5, -0.5], atol=0.05)


def test_lowres_is_the_4x4_majority():
    rng = np.random.default_rng(2)
    m = rng.random((2, 1024, 1024)) < 0.5
    got = mk.input_to_lowres(m)
    i, j = 17, 200
    assert got.shape == (2, 256, 256)
    for n in range(2):
        assert got[n, i, j] == (m[n, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].sum() >= 8)
    want = m.reshape(2, 256, 4, 256, 4).sum(axis=(2, 4)) >= 8
    assert np.array_equal(got, want)


def test_lowres_of_a_256_input_is_the_input():
    m = np.random.default_rng(4).random((2, 256, 256)) < 0.5
    assert np.array_equal(mk.input_to_lowres(m), m)


@pytest.mark.parametrize("side", [1024, 256])
@pytest.mark.parametrize("region", [(0, 5, 0, 7), (3, 11, 5, 6), (221, 256, 2, 255)], ids=str)
def test_lowres_from_a_crop_equals_lowres_of_the_full_frame(region, side):
    r0, r1, c0, c1 = region
    if side == 1024:
        r0, r1, c0, c1 = r0 * 4 + 1, r1 * 4, c0 * 4 + 3, c1 * 4  # unaligned to the 4x4 blocks
    small = np.random.default_rng(3).random((r1 - r0, c1 - c0)) < 0.6
    full = np.zeros((1, side, side), bool)
    full[0, r0:r1, c0:c1] = small
    got = mk.input_crop_to_lowres((r0, r1, c0, c1), small, block=side // 256)
    assert np.array_equal(got, mk.input_to_lowres(full)[0])


@pytest.mark.parametrize("model", [None, "lite_medsam"])
def test_mask_formats_command_runs(tmp_path, capsys, model):
    """``python -m embedcache.mask_formats``, as docs/cache-format.md runs it (default preset) and at 256."""
    from embedcache import mask_formats
    from embedcache.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_images=2, min_side=40, max_side=64, max_objects=2)
    mask_formats.main([str(data), "--mask-kind", "instance", *(["--model", model] if model else [])])
    out = capsys.readouterr().out
    forms = [line.split()[0] for line in out.splitlines()[2:]]
    assert forms[:3] == ["crop-bits", "crop-bits+input", "coco-rle"] and forms[3].startswith("label-map")
    assert f"{model or 'vit_b'} input frame" in out
