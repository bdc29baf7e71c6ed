"""MRML <-> voxtext reports: volumes out to the worker, reports back as text nodes tied to their volume."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from TextSegLib.core import TextSegError, volume_arrays
from TextSegLib.job import JobEvent, WorkerJob
from TextSegLib.terminology import ALIASES, normalize_label, terminology_labels

from . import worker
from .options import DEFAULT_OPTIONS, ReportOptions, parse_choices

REPORT_ROLE = "vlmReport"  # node reference from a volume to each of its report text nodes
MODEL_ATTRIBUTE = "VLMReport.Model"
TEXT_EXTENSIONS = (".txt", ".md")


@dataclass(frozen=True)
class Reply:
    """Generated text: a report (no question) or the answer to ``question``, with the picked option if closed."""

    text: str
    question: str | None = None
    choices: tuple[str, ...] = ()
    index: int | None = None


class ReportJob(WorkerJob):
    """One worker process writing a report of ``volume`` (axes i, j, k; ``affine`` voxel -> RAS) or answering."""

    crash_hint = "try the embedded default model or device CPU."

    def __init__(self, volume: np.ndarray, affine: np.ndarray, options: ReportOptions, python: str | None = None,
                 question: str | None = None, choices: Sequence[str] = ()) -> None:
        self.options, self.question, self.choices = options, question, tuple(choices)
        folder = Path(tempfile.mkdtemp(prefix="vlmreport-"))
        worker.write_job(folder, volume, affine, options.to_json(), question, list(choices))
        super().__init__(worker.__file__, folder, python, what="generation")

    def result(self) -> Reply:
        """The :class:`Reply` of a finished job; raises :class:`~TextSegLib.job.JobError` otherwise."""
        self._check_done()
        data = json.loads((self.folder / worker.RESULT_FILE).read_text())
        return Reply(data["text"], self.question, tuple(data["choices"]), data["index"])


def find_structures(text: str, labels: Sequence[str] | None = None) -> list[str]:
    """Known structure names (TextSeg's terminology labels) mentioned in ``text``, in order, each once.

    The longest name wins ("left kidney", not "kidney"); British spellings, plurals and the aliases
    TextSeg accepts ("bladder", "IVC") count, e.g. "Stone in the left kidney; liver cysts" ->
    ``["stone", "left kidney", "liver", "cyst"]``.
    """
    names = {name: name for name in labels or terminology_labels()}
    names.update({alias: target for alias, target in ALIASES.items() if target in names})
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")s?\b")
    words = normalize_label(" ".join(re.findall(r"[a-z]+", text.lower())))
    return list(dict.fromkeys(names[match.group(1)] for match in pattern.finditer(words)))


def format_conversation(replies: Sequence[Reply]) -> str:
    """Questions and answers as a readable transcript; closed questions show their options and the pick."""
    lines = []
    for reply in replies:
        options = f" [{' / '.join(reply.choices)}]" if reply.choices else ""
        picked = f"{reply.choices[reply.index]} ({reply.text})" if reply.index is not None else reply.text
        lines += [f"Q: {reply.question}{options}", f"A: {picked}", ""]
    return "\n".join(lines).rstrip("\n")


def export_text(text: str, path: str | Path, title: str = "") -> Path:
    """Write a report as plain text (``.txt``) or Markdown (``.md``, with ``title`` as heading)."""
    path = Path(path)
    if path.suffix.lower() not in TEXT_EXTENSIONS:
        raise TextSegError(f"save the report as {' or '.join(TEXT_EXTENSIONS)}, not {path.suffix or 'no extension'}")
    heading = f"# {title}\n\n" if path.suffix.lower() == ".md" and title else ""
    path.write_text(heading + text.rstrip("\n") + "\n", encoding="utf-8")
    return path


class VLMReportCore:
    """Writes reports of, and answers questions about, the volumes of a scene.

    A report is a ``vtkMRMLTextNode`` (with a ``vtkMRMLTextStorageNode``, so it is saved with the scene)
    referenced by its volume under :data:`REPORT_ROLE`. The scene changes only when a run succeeded.
    """

    def __init__(self, scene, python: str | None = None) -> None:
        self.scene = scene
        self.python = python
        self.conversations: dict[str, list[Reply]] = {}  # volume node ID -> questions and answers, oldest first

    def start(self, volume_node, options: ReportOptions = DEFAULT_OPTIONS, question: str | None = None,
              choices: str | Sequence[str] = ()) -> ReportJob:
        """Check the inputs and start a report (``question`` None) or an answer; the scene is not modified."""
        choices = parse_choices(choices) if isinstance(choices, str) else list(choices)
        if question is not None and not question.strip():
            raise TextSegError("type a question, e.g. 'Is there a kidney stone?'")
        if choices and (question is None or len(choices) < 2):
            raise TextSegError("a multiple-choice question needs a question and at least two options")
        array, ijk_to_ras = volume_arrays(volume_node)
        return ReportJob(array, ijk_to_ras, options, self.python, question, choices)

    def reports(self, volume_node) -> list:
        """The report text nodes of a volume, oldest first."""
        return [volume_node.GetNthNodeReference(REPORT_ROLE, i)
                for i in range(volume_node.GetNumberOfNodeReferences(REPORT_ROLE))]

    def store(self, volume_node, text: str, replace: bool = False, model: str = "") -> object:
        """Keep ``text`` as the volume's newest report, or overwrite its latest one when ``replace``."""
        if volume_node is None or volume_node.GetScene() is not self.scene:
            raise TextSegError("the volume is no longer in the scene: its report was not stored")
        existing = self.reports(volume_node)
        if replace and existing:
            text_node = existing[-1]
        else:
            name = self.scene.GenerateUniqueName(f"{volume_node.GetName()} report")
            text_node = self.scene.AddNewNodeByClass("vtkMRMLTextNode", name)
            text_node.SetForceCreateStorageNode(text_node.CreateStorageNodeAlways)  # a .txt file, not XML
            text_node.AddDefaultStorageNode()
            volume_node.AddNodeReferenceID(REPORT_ROLE, text_node.GetID())
        text_node.SetText(text)
        text_node.SetAttribute(MODEL_ATTRIBUTE, model)
        return text_node

    def conversation(self, volume_node) -> list[Reply]:
        """The questions asked about a volume in this session and their answers, oldest first."""
        return self.conversations.setdefault(volume_node.GetID(), [])

    def finish(self, job: ReportJob, volume_node, replace: bool = False) -> tuple[Reply, object | None]:
        """Keep a finished job's result: a report as a text node, an answer in the conversation."""
        reply = job.result()
        if reply.question is None:
            return reply, self.store(volume_node, reply.text, replace, job.options.model)
        self.conversation(volume_node).append(reply)
        return reply, None

    def _run(self, job: ReportJob, volume_node, replace: bool,
             on_text: Callable[[str], None] | None) -> tuple[Reply, object | None]:
        def forward(event: JobEvent) -> None:
            if event.kind == "token" and on_text is not None:
                on_text(event.message)

        with job:
            job.wait(forward)
            return self.finish(job, volume_node, replace)

    def report(self, volume_node, options: ReportOptions = DEFAULT_OPTIONS, replace: bool = False,
               on_text: Callable[[str], None] | None = None) -> str:
        """Write a report and store it (console use); ``on_text`` gets it piece by piece. Raises JobError."""
        return self._run(self.start(volume_node, options), volume_node, replace, on_text)[0].text

    def ask(self, volume_node, question: str, choices: str | Sequence[str] = (),
            options: ReportOptions = DEFAULT_OPTIONS, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer a question and add it to the volume's conversation (console use). Raises JobError."""
        return self._run(self.start(volume_node, options, question, choices), volume_node, False, on_text)[0]

