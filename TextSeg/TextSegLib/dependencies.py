"""Python packages the module needs inside Slicer, pinned to the versions it was tested with."""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# Tested versions (the repository's requirements.txt). numpy and SimpleITK come with Slicer and are never
# reinstalled: replacing Slicer's own copies breaks it.
TESTED: dict[str, str] = {
    "torch": "2.13.0",
    "monai": "1.5.2",
    "transformers": "4.57.6",
    "safetensors": "0.8.0",
    "huggingface_hub": "0.36.2",
    "nibabel": "5.4.2",
    "scipy": "1.17.1",
    "tqdm": "4.70.1",
    "slicerio": "1.4.0",
    "pynrrd": "1.1.3",
    "scikit-image": "0.26.0",
    "matplotlib": "3.10.9",
    "httpx": "0.28.1",  # the remote-server option
}
VOXTEXT_VERSION = "0.1.0"
MINIMUM_TORCH = (2, 4)  # an installed torch this new is kept (its CUDA build may matter more than the patch level)
VOXTEXT_GIT = f"git+https://github.com/SlicerVoxText/SlicerVoxText@v{VOXTEXT_VERSION}"
REPOSITORY = Path(__file__).resolve().parents[2]


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def missing_requirements(version: Callable[[str], str] = metadata.version) -> list[str]:
    """Pinned requirements (``name==version``) that are absent or at another version; torch >= 2.4 is kept."""
    missing = []
    for name, tested in {**TESTED, "voxtext": VOXTEXT_VERSION}.items():
        try:
            installed = version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}=={tested}")
            continue
        good = _version_tuple(installed) >= MINIMUM_TORCH if name == "torch" else installed == tested
        if not good:
            missing.append(f"{name}=={tested}")
    return missing


def voxtext_source() -> str:
    """What pip installs voxtext from: this checkout when the module runs from source, else the tagged release."""
    return str(REPOSITORY) if (REPOSITORY / "pyproject.toml").is_file() and (REPOSITORY / "voxtext").is_dir() \
        else VOXTEXT_GIT
