"""Files in and out of the web app: uploaded volumes, DICOM series and zips, and download names."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from ..errors import VoxTextError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_ZIP_FILES = 5000


class WebError(VoxTextError):
    """Something the user asked for cannot be done; the message says why and what to do."""


def volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def safe_extract(archive: Path, folder: Path, max_bytes: int) -> list[Path]:
    """Files of a zip (no absolute paths, no ``..``, at most ``max_bytes`` unpacked) extracted into ``folder``."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            raise WebError(f"the zip holds {len(members)} files; at most {MAX_ZIP_FILES} are accepted")
        if sum(m.file_size for m in members) > max_bytes:
            raise WebError(f"the zip unpacks to more than {max_bytes // 2**20} MB")
        out = []
        for member in members:
            parts = Path(member.filename.replace("\\", "/")).parts
            if member.filename.startswith(("/", "\\")) or ".." in parts or not parts or ":" in parts[0]:
                raise WebError(f"the zip holds a file outside its folder ({member.filename!r}); refused")
            target = folder.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            out.append(target)
        return out


def file_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return stem or "volume"


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True).get("SOPClassUID") is not None
    except Exception:  # noqa: BLE001 - not a DICOM file
        return False
