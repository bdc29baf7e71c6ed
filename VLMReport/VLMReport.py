"""VLMReport: findings reports and answers about a volume (Med3DVLM-class models via voxtext). Slicer classes only."""

from __future__ import annotations

import importlib.util
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
from TextSegLib.job import JobError
from TextSegLib.options import DEVICES
from VLMReportLib import selftest, sr
from VLMReportLib.core import VLMReportCore, export_text, find_structures, format_conversation
from VLMReportLib.options import NAMED_MODELS, ReportOptions

OTHER_MODEL = "Local folder or hf:// URI"
POLL_MS = 100


class VLMReport(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VLM Report"
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = ["TextSeg"]
        self.parent.contributors = ["SlicerVoxText developers"]
        self.parent.helpText = (
            "Generate a findings report of a volume with a vision-language model, ask open or multiple-choice "
            "questions about it, and send an anatomical term to Text Segmentation. Reports are text nodes tied "
            "to the volume and saved with the scene.<br>Python console: "
            "<code>slicer.util.getModuleLogic('VLMReport').report(volumeNode)</code>."
        )
        self.parent.acknowledgementText = "Med3DVLM (DCFormer + Qwen2.5); voxtext backend; highdicom for DICOM SR."


class VLMReportWidget(ScriptedLoadableModuleWidget):
    """Inputs -> a background job streaming text -> a report node or a conversation turn (work in VLMReportCore)."""

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/VLMReport.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = VLMReportLogic()
        self.job = None
        self.jobVolume = None
        self.reportNode = None  # the shown report: edits in the panel go to this text node
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onPoll)

        self.ui.modelSelector.addItems([*NAMED_MODELS, OTHER_MODEL])
        self.ui.deviceSelector.addItems([d.upper() if d != "auto" else "Auto" for d in DEVICES])
        self.ui.progressBar.hide()

        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.onVolumeChanged)
        self.ui.modelSelector.currentTextChanged.connect(self.updateButtons)
        self.ui.questionEdit.textChanged.connect(self.updateButtons)
        self.ui.reportEdit.textChanged.connect(self.onReportEdited)
        self.ui.generateButton.clicked.connect(self.onGenerate)
        self.ui.askButton.clicked.connect(self.onAsk)
        self.ui.questionEdit.returnPressed.connect(self.onAsk)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.saveButton.clicked.connect(self.onSave)
        self.ui.exportDicomButton.clicked.connect(self.onExportDicom)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.onVolumeChanged()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.job is not None:
            self.job.close()

    def volume(self):
        return self.ui.inputVolumeSelector.currentNode()

    def onVolumeChanged(self, *_) -> None:
        volume = self.volume()
        reports = self.logic.reports(volume) if volume else []
        self.showReport(reports[-1] if reports else None)
        self.ui.historyView.setPlainText(format_conversation(self.logic.conversation(volume)) if volume else "")
        self.updateStructures()
        self.updateButtons()

    def showReport(self, node) -> None:
        self.reportNode = None  # no write-back while the panel is filled
        self.ui.reportEdit.setPlainText(node.GetText() if node else "")
        self.reportNode = node

    def onReportEdited(self) -> None:
        if self.reportNode is not None and self.job is None:
            self.reportNode.SetText(self.ui.reportEdit.toPlainText())
            self.updateStructures()

    def updateStructures(self) -> None:
        volume = self.volume()
        answers = " ".join(reply.text for reply in self.logic.conversation(volume)) if volume else ""
        self.ui.structureSelector.clear()
        self.ui.structureSelector.addItems(find_structures(self.ui.reportEdit.toPlainText() + " " + answers))
        self.updateButtons()

    def updateButtons(self, *_) -> None:
        running, volume = self.job is not None, self.volume()
        self.ui.inputVolumeSelector.setEnabled(not running)  # the panels show the running job's volume
        self.ui.modelPathEdit.setEnabled(self.ui.modelSelector.currentText == OTHER_MODEL)
        self.ui.generateButton.setEnabled(volume is not None and not running)
        self.ui.askButton.setEnabled(volume is not None and not running and bool(self.ui.questionEdit.text.strip()))
        self.ui.cancelButton.setEnabled(running)
        has_report = bool(self.ui.reportEdit.toPlainText().strip()) and not running
        self.ui.saveButton.setEnabled(has_report)
        self.ui.exportDicomButton.setEnabled(has_report and volume is not None and bool(sr.instance_uids(volume)))
        self.ui.segmentButton.setEnabled(volume is not None and self.ui.structureSelector.count > 0)

    def options(self) -> ReportOptions:
        name = self.ui.modelSelector.currentText
        return ReportOptions(model=NAMED_MODELS.get(name) or self.ui.modelPathEdit.currentPath.strip(),
                             device=DEVICES[self.ui.deviceSelector.currentIndex],
                             server=self.ui.serverEdit.text.strip())

    def startJob(self, question: str | None = None) -> None:
        try:
            if not self.logic.setupPythonRequirements():
                return
            choices = self.ui.choicesEdit.text if question is not None else ()
            self.job = self.logic.start(self.volume(), self.options(), question, choices)
            self.jobVolume = self.volume()
        except (ValueError, RuntimeError, OSError) as error:
            slicer.util.errorDisplay(str(error))
            return
        if question is None:
            self.showReport(None)
        else:
            self.ui.historyView.appendPlainText(f"Q: {question}\nA: ")
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.show()
        self.showStatus("Starting…")
        self.timer.start()
        self.updateButtons()

    def onGenerate(self) -> None:
        self.startJob()

    def onAsk(self) -> None:
        if self.ui.askButton.enabled:
            self.startJob(self.ui.questionEdit.text.strip())

    def onCancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.showStatus("Cancelling…")

    def showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(f"VLMReport: {text}", 3000)

    def onPoll(self) -> None:
        for event in self.job.poll():
            if event.kind == "token":
                view = self.ui.reportEdit if self.job.question is None else self.ui.historyView
                view.moveCursor(qt.QTextCursor.End)
                view.insertPlainText(event.message)
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
                reply, node = self.logic.finish(job, self.jobVolume, self.ui.replaceCheckBox.checked)
        except JobError as error:
            self.showStatus(str(error))
            if error.kind != "cancelled":
                slicer.util.errorDisplay(str(error), detailedText="\n".join(job.log))
        except ValueError as error:
            self.showStatus(str(error))
            slicer.util.errorDisplay(str(error))
        else:
            self.showStatus("Done." if node else f"Answer: {reply.text}")
        self.onVolumeChanged()  # the stored report and conversation, or as before when the job failed

    def onSave(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, "Save report", f"{self.volume().GetName()} report.md",
                                              "Markdown (*.md);;Text (*.txt)")
        if path:
            with slicer.util.tryWithErrorDisplay("The report could not be saved."):
                export_text(self.ui.reportEdit.toPlainText(), path, f"Report: {self.volume().GetName()}")
                self.showStatus(f"Saved {path}")

    def onExportDicom(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, "Save DICOM Structured Report",
                                              f"{self.volume().GetName()} report.dcm", "DICOM (*.dcm)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("The DICOM report could not be written.", waitCursor=True):
            self.logic.exportDicom(self.volume(), self.ui.reportEdit.toPlainText(), path, self.options().model)
            self.showStatus(f"Saved {path}")

    def onSegment(self) -> None:
        """Open Text Segmentation on this volume with the chosen structure as its prompt."""
        term, volume = self.ui.structureSelector.currentText, self.volume()
        slicer.util.selectModule("TextSeg")
        textSeg = slicer.modules.textseg.widgetRepresentation().self()
        textSeg.ui.inputVolumeSelector.setCurrentNode(volume)
        textSeg.ui.promptEdit.text = term


class VLMReportLogic(ScriptedLoadableModuleLogic, VLMReportCore):
    """The core bound to Slicer's scene; ``report()`` and ``ask()`` run from the Python console."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        VLMReportCore.__init__(self, slicer.mrmlScene, python=shutil.which("PythonSlicer") or "PythonSlicer")

    @staticmethod
    def setupPythonRequirements(ask: bool = True) -> bool:
        """voxtext and its pinned requirements, installed by TextSeg (after asking); False if declined."""
        import TextSeg

        return TextSeg.TextSegLogic().setupPythonRequirements(ask)

    @staticmethod
    def exportDicom(volume_node, text: str, path: str, model: str = "") -> Path:
        """Write ``text`` as a DICOM SR referencing the DICOM files the volume was loaded from."""
        if importlib.util.find_spec("highdicom") is None:
            slicer.util.pip_install(sr.HIGHDICOM)
        files = [slicer.dicomDatabase.fileForInstance(uid) for uid in sr.instance_uids(volume_node)]
        return sr.write_report_sr(text, files, path, model)


class VLMReportTest(ScriptedLoadableModuleTest):
    """Runs the same self-test functions as the pytest suite, on Slicer's own scene."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        logic = VLMReportLogic()
        self.assertTrue(logic.setupPythonRequirements(ask=False))
        volume_node = selftest.make_volume(slicer.mrmlScene)
        folder = Path(slicer.app.temporaryPath) / "vlmreport-scene"
        shutil.rmtree(folder, ignore_errors=True)
        for check in (selftest.check_report_streamed_and_stored, selftest.check_second_report_kept,
                      selftest.check_cancel_leaves_scene, selftest.check_conversation, selftest.check_refusals):
            self.delayDisplay(check.__doc__.splitlines()[0])
            check(logic, volume_node)
        selftest.check_scene_round_trip(logic, volume_node, slicer.app.applicationLogic(), folder)
        selftest.check_error_in_plain_words(logic, volume_node, Path(slicer.app.temporaryPath) / "vlmreport-no-model")
        self.delayDisplay("VLMReport self-test passed")
