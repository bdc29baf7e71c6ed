"""Static checks of the Slicer extension: CMake lists vs files, Qt-free module cores, pins, terminology."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION_KEYS = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")
RAW_PREFIX = re.compile(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/")


def cmake_text(path: Path) -> str:
    return re.sub(r"#[^\n]*", "", path.read_text())


def modules() -> list[Path]:
    return [REPO / name for name in re.findall(r"add_subdirectory\((\w+)\)", cmake_text(REPO / "CMakeLists.txt"))]


def cmake_list(text: str, variable: str, module_name: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", module_name) for item in match.group(1).split()]


def test_extension_metadata():
    text = cmake_text(REPO / "CMakeLists.txt")
    values = dict(re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', text))
    for key in EXTENSION_KEYS:
        assert values.get(key, "").strip(), f"EXTENSION_{key} is missing or empty"
    icon = RAW_PREFIX.sub("", values["ICONURL"])
    assert (REPO / icon).is_file(), f"the extension icon {icon} is not in the repository"
    assert modules() and all((m / "CMakeLists.txt").is_file() for m in modules())


@pytest.mark.parametrize("module", modules(), ids=lambda m: m.name)
def test_module_cmake_lists_every_file(module: Path):
    text = cmake_text(module / "CMakeLists.txt")
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    assert name == module.name
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", name)
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", name)
    assert "slicerMacroBuildScriptedModule" in text
    for listed in scripts + resources:
        assert (module / listed).is_file(), f"{module.name}/CMakeLists.txt names {listed}, which does not exist"
    on_disk = {p.relative_to(module).as_posix() for p in module.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    unlisted = on_disk - set(scripts) - set(resources)
    assert not unlisted, f"files of {module.name} missing from its CMakeLists.txt: {sorted(unlisted)}"
    assert f"{name}.py" in scripts and f"Resources/UI/{name}.ui" in resources
    assert f"Resources/Icons/{name}.png" in resources


@pytest.mark.parametrize("module", modules(), ids=lambda m: m.name)
def test_module_core_is_qt_free(module: Path):
    """The ``<Module>Lib`` package never imports qt, ctk or Slicer's application globals."""
    forbidden_modules = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule"}
    app_globals = {"app", "modules", "mrmlScene", "util"}
    for path in sorted((module / f"{module.name}Lib").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                names = []
            assert not forbidden_modules.intersection(names), f"{path.name} imports {names}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in app_globals, f"{path.name} uses slicer.{node.attr} (line {node.lineno})"


@pytest.mark.parametrize("module", modules(), ids=lambda m: m.name)
def test_slicer_classes_live_in_the_module_file(module: Path):
    name = module.name
    text = (module / f"{name}.py").read_text()
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == [name, f"{name}Widget", f"{name}Logic", f"{name}Test"]
    assert f"class {name}Logic(ScriptedLoadableModuleLogic, {name}Core)" in text


def test_dependency_pins_match_requirements():
    sys.path.insert(0, str(REPO / "TextSeg"))
    from TextSegLib import dependencies

    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.M))
    for name, version in dependencies.TESTED.items():
        assert pins.get(name) == version, f"{name}: the module pins {version}, requirements.txt {pins.get(name)}"
    assert "SimpleITK" not in dependencies.TESTED and "numpy" not in dependencies.TESTED  # Slicer's own
    installed = {"torch": "2.6.0+cu124", "monai": "1.5.2"}
    missing = dependencies.missing_requirements(lambda n: installed.get(n) or dependencies.TESTED.get(n, "0"))
    assert missing == ["voxtext==0.1.0"]  # an installed torch >= 2.4 is kept; voxtext "0" differs
    from voxtext import __version__

    assert dependencies.VOXTEXT_VERSION == __version__


def test_terminology_file_codes():
    path = REPO / "TextSeg" / "Resources" / "SegmentationCategoryTypeModifier-VoxText.term.json"
    doc = json.loads(path.read_text())
    laterality = {"Right": "24028007", "Left": "7771000", "Right and left": "51440002"}
    labels = []
    for category in doc["SegmentationCodes"]["Category"]:
        for code in category["Type"]:
            assert code["CodingSchemeDesignator"] == "SCT" and code["CodeValue"].isdigit()
            assert len(code.get("recommendedDisplayRGBValue", [])) == 3 or "Modifier" in code
            for modifier in code.get("Modifier", []):
                assert laterality[modifier["CodeMeaning"]] == modifier["CodeValue"]
                labels.append(modifier.get("3dSlicerLabel"))
            labels.append(code.get("3dSlicerLabel"))
    labels = [label for label in labels if label]
    assert len(labels) == len(set(labels))
    from voxtext.phantom import TARGETS

    phantom_organs = [names[0] for names, values in TARGETS if max(values) < 20]
    assert set(phantom_organs) <= set(labels), set(phantom_organs) - set(labels)
