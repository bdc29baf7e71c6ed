"""Training data of Med3DVLM-class models: cases, their text pairs, a tokenizer and token batches.

Samples follow M3D-Cap / M3D-VQA: captions are ``"<im_patch>"*N + prompt`` -> ``" " + report``,
closed questions ``" " + question + " Choices: A. .. B. .."`` -> ``"B. no"`` (the choices in a fresh order at
every draw, so the letter has to be read from the prompt), open questions the answer text; the loss covers the
answer and the EOS token only.

Data folders (``voxtext train-vlm --data DIR``):

* ``DIR/captions.json``: ``{"train": [{"image": "case1/image.nii.gz", "text": "FINDINGS: ..."}]}``
  (M3D-Cap; ``text`` may also be the path of a ``.txt`` file), paths relative to ``DIR``;
* ``DIR/vqa.csv`` (optional): M3D-VQA columns ``Image Path, Question, Answer`` and, for closed
  questions, ``Choice A`` .. ``Choice D`` and ``Answer Choice``.

or procedural phantoms (:mod:`voxtext.phantom`) with their templated reports and Q/A.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import InputError
from ..models.med3dvlm import IMAGE_TOKEN, encode_answers, prepare_volume
from ..phantom import generate_phantom
from ..report import LETTERS, REPORT_PROMPT, format_choice_answer, format_question
from ..volume import Volume

EOS_TOKEN = "<|endoftext|>"
CAPTION_PROMPTS = (REPORT_PROMPT, "Describe the findings of this CT scan.", "Write the radiology report of this scan.")


@dataclass(frozen=True)
class Question:
    """A Q/A record; closed when it has ``choices`` (``answer`` is then one of them)."""

    text: str
    answer: str
    choices: tuple[str, ...] = ()

    def pair(self, shuffle: bool = False) -> tuple[str, str]:
        """(prompt, target answer); with ``shuffle`` a closed question's choices come in a random order.

        Reshuffling at every draw keeps a model from tying each case's answer to a fixed letter: trained with
        the order fixed per case, the embedded default often named one option under another's letter
        (``voxtext/weights/vlm-default/README.md``)."""
        if not self.choices:
            return self.text, self.answer
        choices = random.sample(self.choices, len(self.choices)) if shuffle else list(self.choices)
        return format_question(self.text, choices), format_choice_answer(choices, choices.index(self.answer))


@dataclass
class Case:
    """One training volume (model input, float16 to halve the cache) and its text pairs."""

    image: torch.Tensor  # (1, D, H, W)
    report: str | None
    questions: list[Question] = field(default_factory=list)


def questions(qa: Iterable[dict]) -> list[Question]:
    """Phantom/M3D Q/A records (closed ones with ``choices`` and ``answer_choice``, a letter) -> questions."""
    out = []
    for item in qa:
        choices = tuple(item.get("choices") or ())
        if choices:
            out.append(Question(item["question"], choices[LETTERS.index(item["answer_choice"])], choices))
        else:
            out.append(Question(item["question"], str(item["answer"])))
    return out


def phantom_lesions(seed: int) -> float:
    """Lesion probability of training phantom ``seed``: every fourth one is normal."""
    return 0.0 if seed % 4 == 0 else 0.5


def phantom_cases(seeds: Iterable[int], size: Sequence[int], window: Sequence[float] | None) -> list[Case]:
    """Phantoms generated directly at the model's input size (a quarter of them without lesions)."""
    cases = []
    for seed in seeds:
        ph = generate_phantom(seed, shape=tuple(size[::-1]), lesions=phantom_lesions(seed))
        image = prepare_volume(Volume(ph.image, ph.affine, "CT"), tuple(size), window)[0].half()
        cases.append(Case(image, ph.report, questions(ph.qa)))
    return cases


def folder_cases(root: Path, size: Sequence[int], window: Sequence[float] | None) -> list[Case]:
    """Cases from ``captions.json`` (+ ``vqa.csv``) in the M3D-Cap / M3D-VQA layout (see the module docstring)."""
    by_path: dict[str, Case] = {}

    def case(path: str) -> Case:
        if path not in by_path:
            image = prepare_volume(Volume.from_file(root / path), tuple(size), window)[0].half()
            by_path[path] = Case(image, None)
        return by_path[path]

    captions = root / "captions.json"
    if captions.is_file():
        for item in json.loads(captions.read_text())["train"]:
            text = item["text"]
            if text.endswith(".txt") and (root / text).is_file():
                text = (root / text).read_text()
            case(item["image"]).report = " ".join(text.split())
    vqa = root / "vqa.csv"
    if vqa.is_file():
        with vqa.open(newline="") as f:
            for row in csv.DictReader(f):
                choices = [row[f"Choice {c}"] for c in "ABCD" if row.get(f"Choice {c}")]
                item = {"question": row["Question"], "answer": row["Answer"]}
                if choices and row.get("Answer Choice"):
                    item |= {"choices": choices, "answer_choice": row["Answer Choice"].strip()}
                case(row["Image Path"]).questions += questions([item])
    if not by_path:
        raise InputError(f"{root} holds neither captions.json nor vqa.csv (see voxtext.training.vlm_data)")
    return list(by_path.values())


def corpus(cases: Iterable[Case]) -> Iterator[str]:
    for case in cases:
        if case.report:
            yield case.report
        for question in case.questions:
            yield from question.pair()
    yield from CAPTION_PROMPTS


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as Qwen's) with ``<|endoftext|>`` (EOS, pad) and the image token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   additional_special_tokens=[IMAGE_TOKEN])


def sample_batches(
    cases: Sequence[Case], tokenizer: PreTrainedTokenizerBase, num_image_tokens: int, batch_size: int,
    caption_ratio: float = 0.5, max_length: int = 512,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless random batches: a report with probability ``caption_ratio`` (when the case has one), else a Q/A
    (closed questions with their choices reshuffled)."""
    while True:
        chosen = random.choices(cases, k=batch_size)
        pairs = []
        for case in chosen:
            if case.report and (not case.questions or random.random() < caption_ratio):
                pairs.append((random.choice(CAPTION_PROMPTS), "", case.report))
            else:
                question, answer = random.choice(case.questions).pair(shuffle=True)
                pairs.append((question, " ", answer))
        batch = encode_answers(tokenizer, pairs, num_image_tokens, max_length)
        batch["images"] = torch.stack([c.image for c in chosen]).float()
        yield batch
