"""Where the Qt-free Slicer module cores (``TextSegLib``, ``VLMReportLib``) come from.

They live in the extension's module folders (``TextSeg/``, ``VLMReport/``), not in the pip package, so the
web app puts those folders on ``sys.path`` as Slicer does for scripted modules: from the source tree this
package sits in, or from ``VOXTEXT_SLICER_MODULES`` (a folder holding ``TextSeg/`` and ``VLMReport/``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import VoxTextError

MODULES = ("TextSeg", "VLMReport")
ENV = "VOXTEXT_SLICER_MODULES"


def modules_root() -> Path:
    """The folder holding ``TextSeg/TextSegLib`` and ``VLMReport/VLMReportLib``; VoxTextError if none."""
    candidates = [Path(os.environ[ENV])] if os.environ.get(ENV) else []
    candidates.append(Path(__file__).resolve().parents[2])  # the SlicerVoxText source tree
    for root in candidates:
        if all((root / name / f"{name}Lib" / "core.py").is_file() for name in MODULES):
            return root
    raise VoxTextError(
        "voxtext web needs the TextSeg and VLMReport module cores of the SlicerVoxText extension, which are not "
        f"part of the pip package: run it from a SlicerVoxText source checkout, or set {ENV} to the folder that "
        f"holds TextSeg/ and VLMReport/ (looked in {', '.join(str(c) for c in candidates)})"
    )


def add_cores_to_path() -> Path:
    """Make ``import TextSegLib`` and ``import VLMReportLib`` work; returns the modules folder."""
    root = modules_root()
    for name in MODULES:
        folder = str(root / name)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return root
