"""Official SAM checkpoints by name: download into a cache folder, checked by sha256.

Offline, ``fetch`` fails with the URL to download and the path to put the file at.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from embedcache.models import file_sha256


@dataclass(frozen=True, kw_only=True)
class OfficialCheckpoint:
    """One of Meta's released SAM checkpoints."""

    model_type: str
    """The preset it loads into."""
    url: str
    """Where Meta publishes it."""
    sha256: str
    """sha256 of the file."""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


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
}
ALIASES = {"vit_h": "sam_vit_h_4b8939", "vit_l": "sam_vit_l_0b3195", "vit_b": "sam_vit_b_01ec64"}


def weights_dir() -> Path:
    """``$SAMTUNE_WEIGHTS``, else ``~/.cache/samtune/weights``."""
    return Path(os.environ.get("SAMTUNE_WEIGHTS", Path.home() / ".cache" / "samtune" / "weights"))


def fetch(name: str, *, folder: Path | None = None) -> Path:
    """Path of the official checkpoint ``name`` (or ``vit_b``/``vit_l``/``vit_h``), downloading it if absent.

    The file is downloaded to ``<name>.pth.partial``, checked against its sha256, then renamed, so a finished
    file is always a verified one.
    """
    ck = OFFICIAL[ALIASES.get(name, name)]
    folder = Path(folder) if folder is not None else weights_dir()
    dest = folder / ck.filename
    if dest.is_file():
        got = file_sha256(dest)
        if got != ck.sha256:
            raise ValueError(f"{dest}: sha256 {got} is not the official {ck.sha256}; delete it and retry")
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".pth.partial")
    try:
        with urllib.request.urlopen(ck.url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 24)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"cannot download {ck.url} ({e}). Download it on a machine with internet access and put it "
            f"at {dest} "
            f"(sha256 {ck.sha256}); or set SAMTUNE_WEIGHTS to the folder that holds it."
        ) from e
    got = file_sha256(tmp)
    if got != ck.sha256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{ck.url}: downloaded file has sha256 {got}, expected {ck.sha256}")
    tmp.replace(dest)
    return dest


def resolve_checkpoint(checkpoint: str | Path | None) -> Path | None:
    """A checkpoint argument -> a local path: an existing file as is, an official name fetched, None kept."""
    if checkpoint is None:
        return None
    s = str(checkpoint)
    if Path(s).is_file():
        return Path(s)
    if s in OFFICIAL or s in ALIASES:
        return fetch(s)
    raise FileNotFoundError(f"{s}: checkpoint file not found (official names: {', '.join(OFFICIAL)})")
