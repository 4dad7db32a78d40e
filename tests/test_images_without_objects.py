"""Images without objects, one contract from the readers to the trainer (docs/datasets.md): every reader
returns them, the build keeps them and lists them in ``build_report.images_without_objects``, ``verify``
accepts them, semantic training learns them as background, and instance training and scoring skip them
(``Cache.images_with_objects``). Only a dataset in which no image has an object is refused.

The cache here is built with a stand-in image encoder (a pooled copy of the input): these tests are about the
objects, not the embeddings, and the real vit_tiny encoder costs seconds per image on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import ImageEncoderViT
from test_embedcache_support import build, coco_reader, metadata_report, write_pair

from embedcache import open_cache
from embedcache.build import report_warnings
from embedcache.readers import FolderReader
from embedcache.verify import verify
from trainer.data import ImageStore, read_batch

CPU = torch.device("cpu")


def _pooled(self, x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, S, S)`` -> ``(B, 256, 64, 64)``: finite, non-zero and cheap, in place of the encoder."""
    return F.adaptive_avg_pool2d(x, 64).mean(1, keepdim=True).abs().expand(-1, 256, -1, -1) + 1.0


def _dataset(root, kind: str, *, with_objects: bool = True):
    """``obj`` (two objects: classes 1 and 2, or instances 1 and 2) unless ``with_objects`` is False, and
    ``bg``, whose mask is all background."""
    rng = np.random.default_rng(0)
    labels = np.zeros((48, 64), np.uint8)
    if with_objects:
        labels[5:15, 5:20] = 1
        labels[20:30, 10:30] = 2 if kind != "binary" else 1
    write_pair(root, "obj", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), labels)
    write_pair(root, "bg", rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), np.zeros((40, 56), np.uint8))
    return root


def test_a_semantic_dataset_with_background_only_images_caches_without_skip_bad(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageEncoderViT, "forward", _pooled)
    data = _dataset(tmp_path / "data", "semantic")
    report = build(data, tmp_path / "c.zarr", mask_kind="semantic", min_object_area=1)  # no skip_bad
    assert report["num_skipped"] == 0
    c = open_cache(tmp_path / "c.zarr")
    bg, obj = (list(c.image_id).index(s) for s in ("bg", "obj"))
    assert c.object_range(bg)[0] == c.object_range(bg)[1] and c.num_objects == 2
    listed = c.build_report["images_without_objects"]
    assert listed["count"] == 1 and listed["paths"][0].endswith("bg.png")
    assert any("1 image(s) have no object" in line for line in report_warnings(c.build_report))
    assert verify(tmp_path / "c.zarr") == []  # valid data, not a problem
    # semantic training: a target of all background inside the image; instance training skips it
    images = np.arange(c.num_images)
    batch = read_batch(ImageStore(c, "stream", CPU), images, 8, seed=0, epoch=0, semantic=True)
    h, w = c.input_size[bg]
    assert (batch.labels[bg, :h, :w] == 0).all()
    assert set(batch.labels[obj].unique().tolist()) >= {0, 1, 2}
    assert c.images_with_objects("all").tolist() == [obj]


@pytest.mark.parametrize("kind", ["instance", "binary", "semantic"])
def test_every_folder_mask_kind_keeps_an_object_less_image_and_lists_it(tmp_path, kind):
    meta, report = metadata_report(FolderReader(_dataset(tmp_path, kind), mask_kind=kind))
    assert sorted(meta["image_id"].tolist()) == ["bg", "obj"] and report["skipped"] == []
    bg = meta["image_id"].tolist().index("bg")
    assert bg not in meta["objects/image_index"] and len(meta["objects/image_index"]) == 2
    assert report["images_without_objects"]["count"] == 1


def test_a_coco_image_without_annotations_is_kept(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "b.png")
    images = [
        {"id": 5, "file_name": "imgs/a.png", "height": 30, "width": 40},
        {"id": 6, "file_name": "b.png", "height": 30, "width": 40},
    ]
    anns = [{"id": 1, "image_id": 5, "category_id": 3, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}]
    meta, report = metadata_report(coco_reader(tmp_path, anns, images))
    assert meta["image_id"].tolist() == ["5", "6"] and meta["objects/image_index"].tolist() == [0]
    assert report["images_without_objects"] == {"count": 1, "paths": [str(tmp_path / "b.png")]}


def test_a_dataset_in_which_no_image_has_an_object_is_refused(tmp_path):
    reader = FolderReader(_dataset(tmp_path, "semantic", with_objects=False), mask_kind="semantic")
    with pytest.raises(ValueError, match=r"none of the 2 image\(s\) has an object"):
        metadata_report(reader)
