"""Module .ui files: well-formed, and every ``self.ui.<name>`` a widget uses exists with the expected class."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UI_FILES = sorted(REPO.glob("*/Resources/UI/*.ui"))

# What each module's widget expects each child to be (Slicer/CTK classes fall back to their Qt base in QUiLoader).
EXPECTED = {
    "TextSeg": {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "promptEdit": "QLineEdit",
        "modelSelector": "QComboBox",
        "modelPathEdit": "ctkPathLineEdit",
        "deviceSelector": "QComboBox",
        "qualitySelector": "QComboBox",
        "serverEdit": "QLineEdit",
        "outputSegmentationSelector": "qMRMLNodeComboBox",
        "existingSegmentsSelector": "QComboBox",
        "probabilityCheckBox": "QCheckBox",
        "refineCheckBox": "QCheckBox",
        "otherModalitiesCheckBox": "QCheckBox",
        "applyButton": "QPushButton",
        "cancelButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "resultsTable": "QTableWidget",
    },
    "VLMReport": {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "modelSelector": "QComboBox",
        "modelPathEdit": "ctkPathLineEdit",
        "deviceSelector": "QComboBox",
        "serverEdit": "QLineEdit",
        "generateButton": "QPushButton",
        "cancelButton": "QPushButton",
        "replaceCheckBox": "QCheckBox",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "reportEdit": "QPlainTextEdit",
        "saveButton": "QPushButton",
        "exportDicomButton": "QPushButton",
        "questionEdit": "QLineEdit",
        "choicesEdit": "QLineEdit",
        "askButton": "QPushButton",
        "historyView": "QPlainTextEdit",
        "structureSelector": "QComboBox",
        "segmentButton": "QPushButton",
    },
}


def ui_classes(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Widget name -> class, and custom class -> the Qt class it extends."""
    root = ET.parse(path).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    extends = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    return widgets, extends


def qt_base(cls: str, extends: dict[str, str]) -> str:
    while cls in extends:
        cls = extends[cls]
    return cls


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_names_and_classes(path: Path):
    module = path.stem
    widgets, extends = ui_classes(path)
    assert widgets.get(module) == "qMRMLWidget", "the top widget must be a qMRMLWidget named after the module"
    used = set(re.findall(r"self\.ui\.(\w+)", (REPO / module / f"{module}.py").read_text()))
    expected = EXPECTED[module]
    assert used == set(expected), f"update EXPECTED: used {sorted(used ^ set(expected))}"
    for name, cls in expected.items():
        assert widgets.get(name) == cls, f"{name}: .ui has {widgets.get(name)}, the widget expects {cls}"
    for cls in set(widgets.values()):
        assert cls.startswith("Q") or cls in extends, f"custom class {cls} is not declared in <customwidgets>"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_loads_with_quiloader(path: Path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore")
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    widget = QUiLoader().load(str(path))
    assert widget is not None, f"QUiLoader could not load {path.name}"
    _, extends = ui_classes(path)
    for name, cls in EXPECTED[path.stem].items():
        child = widget.findChild(QtCore.QObject, name)
        assert child is not None, f"{name} missing after loading"
        assert child.metaObject().className() == qt_base(cls, extends), name
    widget.deleteLater()
    app.processEvents()
