"""TextSeg: segment structures named in plain language (ESICA via voxtext). Slicer classes only; see TextSegLib."""

from __future__ import annotations

import shutil
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from TextSegLib import dependencies, selftest
from TextSegLib.core import TextSegCore, TextSegError
from TextSegLib.job import JobError
from TextSegLib.options import (
    DEVICES,
    EXISTING_SEGMENTS,
    NAMED_MODELS,
    QUALITIES,
    SegmentOptions,
    completion_candidates,
    parse_prompts,
    remember_prompts,
)

OTHER_MODEL = "Local folder or hf:// URI"
RECENT_PROMPTS_KEY = "TextSeg/RecentPrompts"
POLL_MS = 100


class TextSeg(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Text Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["SlicerVoxText developers"]
        self.parent.helpText = (
            "Type the structures to segment ('liver, left kidney') and press Segment: one segment per target, "
            "with standard terminology and colour, computed in the background by the ESICA model (voxtext).<br>"
            "Python console: <code>import TextSeg; TextSeg.TextSegLogic().segment(volumeNode, ['liver'])</code>."
        )
        self.parent.acknowledgementText = "ESICA model; voxtext backend. Terminology codes: SNOMED CT."


class TextSegWidget(ScriptedLoadableModuleWidget):
    """Inputs -> a background job -> segments; the work itself is in :class:`TextSegLib.core.TextSegCore`."""

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/TextSeg.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = TextSegLogic()
        self.job = None
        self.target = None  # (volume, output segmentation or None, existing-segments policy) of the running job
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onPoll)

        self.ui.modelSelector.addItems([*NAMED_MODELS, OTHER_MODEL])
        self.ui.deviceSelector.addItems([d.upper() if d != "auto" else "Auto" for d in DEVICES])
        self.ui.qualitySelector.addItems([q.capitalize() for q in QUALITIES])
        self.ui.existingSegmentsSelector.addItems(["Add new segments", "Replace segments with the same name"])
        self.ui.progressBar.hide()
        self.completionModel = qt.QStringListModel()
        completer = qt.QCompleter(self.completionModel, self.ui.promptEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.promptEdit.setCompleter(completer)

        self.ui.promptEdit.textEdited.connect(self.onPromptEdited)
        self.ui.modelSelector.currentTextChanged.connect(self.updateButtons)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.updateButtons)
        self.ui.promptEdit.textChanged.connect(self.updateButtons)
        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.updateButtons()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.job is not None:
            self.job.close()

    def recentPrompts(self) -> list[str]:
        value = qt.QSettings().value(RECENT_PROMPTS_KEY, [])
        return [value] if isinstance(value, str) else list(value or [])

    def onPromptEdited(self, text: str) -> None:
        names = [*self.recentPrompts(), *TextSegCore.known_structures()]
        self.completionModel.setStringList(completion_candidates(text, dict.fromkeys(names)))

    def updateButtons(self, *_) -> None:
        running = self.job is not None
        self.ui.modelPathEdit.setEnabled(self.ui.modelSelector.currentText == OTHER_MODEL)
        ready = self.ui.inputVolumeSelector.currentNode() is not None and bool(parse_prompts(self.ui.promptEdit.text))
        self.ui.applyButton.setEnabled(ready and not running)
        self.ui.cancelButton.setEnabled(running)

    def options(self) -> SegmentOptions:
        name = self.ui.modelSelector.currentText
        return SegmentOptions(
            model=NAMED_MODELS.get(name) or self.ui.modelPathEdit.currentPath.strip(),
            device=DEVICES[self.ui.deviceSelector.currentIndex],
            quality=QUALITIES[self.ui.qualitySelector.currentIndex],
            refine=self.ui.refineCheckBox.checked,
            other_modalities=self.ui.otherModalitiesCheckBox.checked,
            probabilities=self.ui.probabilityCheckBox.checked,
            server=self.ui.serverEdit.text.strip(),
        )

    def onApply(self) -> None:
        prompts = parse_prompts(self.ui.promptEdit.text)
        output = self.ui.outputSegmentationSelector.currentNode()
        existing = EXISTING_SEGMENTS[self.ui.existingSegmentsSelector.currentIndex]
        replaced = self.logic.conflicts(output, prompts) if existing == "replace" else []
        if replaced and not slicer.util.confirmOkCancelDisplay(
                f"The content of these segments will be replaced: {', '.join(replaced)}.", "Replace segments?"):
            return
        try:
            if not self.logic.setupPythonRequirements():
                return
            volume = self.ui.inputVolumeSelector.currentNode()
            self.job = self.logic.start(volume, prompts, self.options(), output)
            self.target = (volume, output, existing)
        except (TextSegError, ValueError, RuntimeError, OSError) as error:
            slicer.util.errorDisplay(str(error))
            return
        qt.QSettings().setValue(RECENT_PROMPTS_KEY, remember_prompts(self.recentPrompts(), prompts))
        self.ui.resultsTable.setRowCount(0)
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.show()
        self.showStatus("Starting…")
        self.timer.start()
        self.updateButtons()

    def onCancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.showStatus("Cancelling…")

    def showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(f"TextSeg: {text}", 3000)

    def onPoll(self) -> None:
        for event in self.job.poll():
            if event.kind == "progress" and event.total:
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.setValue(event.done)
                self.showStatus(f"Segmenting: window {event.done} of {event.total}")
            elif event.kind == "status":
                self.showStatus(event.message)
        if self.job.finished:
            self.finishJob()

    def finishJob(self) -> None:
        self.timer.stop()
        job, self.job = self.job, None
        self.ui.progressBar.hide()
        try:
            with job:
                result = self.logic.apply(job.result(), *self.target, job.options.probabilities)
        except JobError as error:
            self.showStatus(str(error))
            if error.kind != "cancelled":
                slicer.util.errorDisplay(str(error), detailedText="\n".join(job.log))
        except TextSegError as error:
            self.showStatus(str(error))
            slicer.util.errorDisplay(str(error))
        else:
            self.ui.outputSegmentationSelector.setCurrentNode(result.segmentation_node)
            self.showResult(result)
        self.updateButtons()

    def showResult(self, result) -> None:
        self.ui.resultsTable.setRowCount(len(result.volumes_ml))
        for row, (name, volume) in enumerate(result.volumes_ml.items()):
            item = qt.QTableWidgetItem(f"\u26a0 {name}" if name in result.cautions else name)
            notes = []
            if name in result.lesion_stage:
                notes.append(f"Answered by the model's lesion stage, within {' and '.join(result.lesion_stage[name])}.")
            if name in result.refined:
                notes.append("Boundary refined by attenuation (CT).")
            if name in result.cautions:
                notes.append(f"Caution: {result.cautions[name]}.")
            item.setToolTip(" ".join(notes))
            self.ui.resultsTable.setItem(row, 0, item)
            self.ui.resultsTable.setItem(row, 1, qt.QTableWidgetItem(f"{volume:.1f}"))
        cautioned = ", ".join(result.cautions)
        self.showStatus(f"Done; caution about {cautioned} (see its tooltip)." if cautioned else
                        "Done. Segment Statistics gives further measurements.")


class TextSegLogic(ScriptedLoadableModuleLogic, TextSegCore):
    """The core bound to Slicer's scene and module logics; ``segment()`` runs from the Python console."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TextSegCore.__init__(self, slicer.mrmlScene, slicer.modules.segmentations.logic(),
                             slicer.modules.terminologies.logic(),
                             python=shutil.which("PythonSlicer") or "PythonSlicer")

    def setupPythonRequirements(self, ask: bool = True) -> bool:
        """Install voxtext and its pinned requirements if missing (after asking); False if the user declines."""
        missing = dependencies.missing_requirements()
        if not missing:
            return True
        if ask and not slicer.util.confirmOkCancelDisplay(
                "TextSeg needs these Python packages, which will now be installed (this can take several "
                "minutes and download a few GB):\n" + "\n".join(missing), "Install Python packages?"):
            return False
        with slicer.util.tryWithErrorDisplay("Installation of the Python packages failed.", waitCursor=True):
            if any(spec.startswith("torch==") for spec in missing):
                self._installTorch(dependencies.TESTED["torch"])
            others = [spec for spec in missing if not spec.startswith(("torch==", "voxtext=="))]
            if others:
                slicer.util.pip_install(others)
            slicer.util.pip_install(["--no-deps", dependencies.voxtext_source()])
        return not dependencies.missing_requirements()

    @staticmethod
    def _installTorch(version: str) -> None:
        """PyTorch through the PyTorch extension (it picks the CUDA build), else plain pip."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.pip_install(f"torch=={version}")
            return
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=f"=={version}") is None:
            raise RuntimeError("PyTorch could not be installed; use the PyTorch Util module to install it")


class TextSegTest(ScriptedLoadableModuleTest):
    """Runs the same self-test functions as the pytest suite, on Slicer's own scene and logics."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        logic = TextSegLogic()
        self.assertTrue(logic.setupPythonRequirements(ask=False))
        array, affine = selftest.make_case()
        backend = selftest.backend_result(array, affine)
        volume_node = selftest.add_volume(slicer.mrmlScene, array, affine)
        for check in (selftest.check_segments, selftest.check_seg_nrrd_round_trip, selftest.check_existing_segments,
                      selftest.check_refusals_leave_scene, selftest.check_worker_matches_backend):
            self.delayDisplay(check.__doc__.splitlines()[0])
            check(logic, volume_node, backend)
        selftest.check_lesion_stage_reported(logic, volume_node)
        selftest.check_cancel_leaves_scene(logic, volume_node)
        selftest.check_error_in_plain_words(logic, volume_node, Path(slicer.app.temporaryPath) / "textseg-no-model")
        self.delayDisplay("TextSeg self-test passed")
