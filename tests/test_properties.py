"""Property-based tests (Hypothesis, issue 18): random label maps, COCO segmentations and config overrides
each end in the right objects (or config), or in an error that names the file (or the field).

Each property runs under two profiles: ``fast`` (the default test run: a fixed, derandomised set of 25
examples, a few seconds in all) and ``thorough`` (``-m slow``: 500 fresh random examples). Neither keeps an
example database, so nothing is written into the repository.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import tifffile
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from embedcache import masks as mk
from embedcache.images import BadInput
from embedcache.readers import CocoReader, FolderReader, ImageRecord
from embedcache.readers.coco import decode_segmentation, rle_string_counts
from trainer.config import _SECTION_TYPES, load_config, to_dict

FAST = settings(max_examples=25, deadline=timedelta(seconds=2), derandomize=True, database=None)
THOROUGH = settings(max_examples=500, deadline=None, database=None)
PROFILES = [pytest.param(FAST, id="fast"), pytest.param(THOROUGH, id="thorough", marks=pytest.mark.slow)]


# ---- the folder reader: label maps written as PNG or TIFF and read back ----


@st.composite
def label_maps(draw) -> tuple[np.ndarray, str]:
    """A ``(H, W)`` map of 0 and up to four ids (8-bit PNG or 16-bit TIFF), and the file suffix."""
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    index = draw(hnp.arrays(np.uint8, (h, w), elements=st.integers(0, 4)))
    suffix = draw(st.sampled_from([".png", ".tif"]))
    top = 255 if suffix == ".png" else 65535
    ids = draw(st.lists(st.integers(1, top), min_size=4, max_size=4, unique=True))
    return np.array([0, *ids], np.uint8 if suffix == ".png" else np.uint16)[index], suffix


def expected_objects(labels: np.ndarray, kind: str) -> list[tuple[int, np.ndarray]]:
    """``[(class_id, (H, W) bool)]`` in the folder reader's documented order, from scipy alone."""
    values = [int(v) for v in np.unique(labels) if v]
    if kind == "instance":
        return [(1, labels == v) for v in values]
    if kind == "binary":
        comps, n = ndimage.label(labels != 0)
        return [(1, comps == k) for k in range(1, n + 1)]
    out = []
    for v in values:
        comps, n = ndimage.label(labels == v)
        out += [(v, comps == k) for k in range(1, n + 1)]
    return out


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kind", ["instance", "binary", "semantic"])
def test_label_maps_round_trip_through_the_folder_reader(profile, kind, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"folder-{kind}")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    reader = FolderReader(root, mask_kind=kind)

    @profile
    @given(drawn=label_maps())
    def check(drawn):
        labels, suffix = drawn
        path = root / "masks" / f"m{suffix}"
        if suffix == ".tif":
            tifffile.imwrite(path, labels)
        else:
            Image.fromarray(labels).save(path)
        record = ImageRecord(image_id="m", image_path=root / "images" / "m.png", mask_path=path)
        want = expected_objects(labels, kind)
        # a map without objects gives none: it is valid data (tests/test_images_without_objects.py)
        found = reader.read_objects(record, labels.shape).objects
        got = [(o.class_id, mk.crop_to_original(o.crop, o.box, labels.shape)) for o in found]
        assert [c for c, _ in got] == [c for c, _ in want]
        assert all(np.array_equal(g, w) for (_, g), (_, w) in zip(got, want))
        assert all(o.box == mk.mask_box(m) for o, (_, m) in zip(found, got))  # tight boxes

    check()


# ---- COCO segmentations against pycocotools ----


masks_2d = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda hw: hnp.arrays(np.bool_, hw, elements=st.booleans())
)


def runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask: column-major run lengths, starting with a run of zeros."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    lengths = np.diff(np.r_[0, edges, flat.size]).tolist()
    return [0, *lengths] if flat[0] else lengths


def coco_decode(segmentation, h: int, w: int) -> np.ndarray:
    """pycocotools' own reading of a segmentation (the reference)."""
    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):  # compressed RLE
        return mask_utils.decode({**segmentation, "counts": segmentation["counts"].encode()}).astype(bool)
    rle = mask_utils.frPyObjects(segmentation, h, w)
    rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
    return mask_utils.decode(rle).astype(bool)


@pytest.mark.parametrize("profile", PROFILES)
def test_rle_decodes_as_pycocotools_encodes_and_a_truncated_one_is_refused(profile):
    @profile
    @given(mask=masks_2d, cut=st.floats(0, 1, exclude_max=True))
    def check(mask, cut):
        h, w = mask.shape
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        assert rle_string_counts(encoded) == runs(mask)
        compressed = {"size": [h, w], "counts": encoded.decode()}
        assert np.array_equal(decode_segmentation(compressed, h, w), mask)
        uncompressed = {"size": [h, w], "counts": runs(mask)}
        assert np.array_equal(decode_segmentation(uncompressed, h, w), mask)
        assert np.array_equal(coco_decode(uncompressed, h, w), mask)
        truncated = {"size": [h, w], "counts": compressed["counts"][: int(cut * len(encoded))]}
        with pytest.raises(ValueError, match="truncated|sum to"):
            decode_segmentation(truncated, h, w)

    check()


def polygons(h: int, w: int, reach: float):
    """1-3 polygons of 3-8 points with coordinates in ``[-reach w, (1 + reach) w]`` (likewise y)."""
    x = st.floats(-reach * w, (1 + reach) * w, allow_nan=False)
    y = st.floats(-reach * h, (1 + reach) * h, allow_nan=False)
    points = st.lists(st.tuples(x, y), min_size=3, max_size=8)
    return st.lists(points.map(lambda p: [v for xy in p for v in xy]), min_size=1, max_size=3)


@pytest.mark.parametrize("profile", PROFILES)
def test_polygons_decode_as_pycocotools_or_are_refused_when_far_outside(profile):
    @profile
    @given(data=st.data(), hw=st.tuples(st.integers(1, 24), st.integers(1, 24)))
    def check(data, hw):
        h, w = hw
        polys = data.draw(polygons(h, w, reach=1.5))
        flat = np.array([v for p in polys for v in p])
        xs, ys = flat[0::2], flat[1::2]
        if xs.min() < -w or xs.max() > 2 * w or ys.min() < -h or ys.max() > 2 * h:
            with pytest.raises(ValueError, match="far outside"):
                decode_segmentation(polys, h, w)
        else:
            assert np.array_equal(decode_segmentation(polys, h, w), coco_decode(polys, h, w))

    check()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(["size", "counts"]), inner),
    max_leaves=12,
)


@pytest.mark.parametrize("profile", PROFILES)
def test_any_coco_segmentation_is_an_object_or_a_named_error(profile, tmp_path_factory):
    """Whatever an annotation's ``segmentation`` holds, the reader gives pycocotools' mask or ``BadInput``
    naming the image and the annotation, never another exception."""
    root = tmp_path_factory.mktemp("coco")
    (root / "ann.json").write_text('{"images": [], "annotations": [], "categories": []}')
    reader = CocoReader(root, root / "ann.json")
    h, w = 6, 7
    image = root / "a.png"

    @profile
    @given(segmentation=json_values | polygons(h, w, reach=0.5) | masks_2d.map(runs))
    def check(segmentation):
        if isinstance(segmentation, list) and segmentation and isinstance(segmentation[0], int):
            segmentation = {"size": [h, w], "counts": segmentation}  # a run list drawn for some size
        ann = {"id": 9, "category_id": 1, "segmentation": segmentation}
        record = ImageRecord(image_id="1", image_path=image, annotations=(ann,), expected_hw=(h, w))
        try:
            (obj,) = reader.read_objects(record, (h, w)).objects
        except BadInput as e:
            assert e.path == str(image) and "annotation 9" in e.reason
            return
        assert np.array_equal(mk.crop_to_original(obj.crop, obj.box, (h, w)), coco_decode(segmentation, h, w))

    check()


# ---- config overrides ----


FIELDS = {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in _SECTION_TYPES.items()}
yaml_scalars = (
    st.integers(-3, 5000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
    | st.sampled_from(
        ["adamw", "cosine", "box", "auto", "semantic", "1e-4", "[0.9, 0.99]", "[", "{a: 1}", ""]
    )
    | st.text(max_size=8)
)


@st.composite
def overrides(draw) -> str:
    """``section.field=value`` with a known or unknown section and field, or any text at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=20))
    section = draw(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6))
    field = draw(st.sampled_from(sorted(FIELDS.get(section, {"x": 0}))) | st.text(max_size=6))
    value = draw(yaml_scalars)
    raw = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{section}.{field}={raw.removesuffix('...').strip()}"


def names_it(message: str, item: str) -> bool:
    """Whether an error names the override ``item``: the whole item, its ``section.field``, or the unknown
    section or field."""
    key = item.partition("=")[0]
    section, _, name = key.partition(".")
    return (
        repr(item) in message
        or (bool(name) and key in message)
        or (section not in FIELDS and repr(section) in message)
        or (name not in FIELDS.get(section, {}) and repr(name) in message)
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_any_override_parses_or_is_a_one_line_error_naming_it(profile):
    default = to_dict(load_config(None, []))

    @profile
    @given(items=st.lists(overrides(), min_size=1, max_size=2))
    @example(items=["data.images_per_batch=\x1b"])  # found by this property: PyYAML's message was two lines
    def check(items):
        try:
            cfg = to_dict(load_config(None, items))
        except ValueError as e:
            assert "\n" not in str(e) and any(names_it(str(e), item) for item in items), str(e)
            return
        given = {}  # (section, field) -> the value it must now hold; the last override of a key wins
        for item in items:
            key, _, raw = item.partition("=")
            section, _, name = key.partition(".")
            value = yaml.safe_load(raw) if raw else None
            float_field = FIELDS[section][name].type in (float, "float")
            given[section, name] = float(value) if float_field and not isinstance(value, bool) else value
        for section, fields in cfg.items():  # the overridden fields hold their values, nothing else changed
            for name, value in fields.items():
                assert value == given.get((section, name), default[section][name]), (section, name)

    check()


NUMERIC = [
    f"{section}.{name}"
    for section, fields in FIELDS.items()
    for name, f in fields.items()
    if f.type in (int, float, "int", "float")
]


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_field_at_minus_one_is_taken_or_refused_naming_it(key):
    """The exhaustive companion of the property above for the values ranges refuse: each number field set to
    -1 (messages that named a group, "run cadences must be >= 0", were found by the thorough profile)."""
    try:
        cfg = to_dict(load_config(None, [f"{key}=-1"]))
    except ValueError as e:
        assert key in str(e), str(e)
    else:
        section, name = key.split(".")
        assert cfg[section][name] == -1
