"""Report generation and visual question answering on 3-D volumes: ``Reporter`` and ``report()``.

A Med3DVLM-class model (DCFormer vision tower + mixer projector + Qwen2 LM, ``model_type: vlm_qwen``)
is loaded with :func:`voxtext.models.med3dvlm.load_med3dvlm` (safetensors, strict, no remote code).
Prompts follow the reference: ``"<im_patch>" * N`` then the caption prompt (no space) or
``" " + question``; closed questions append ``" Choices: A. .. B. .."`` and the answer is read with
:func:`parse_choice`, a strict parser (the reference's substring test counts "DNA." as "A.").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, TextStreamer

from .api import as_volume
from .checkpoints import ModelSpec, resolve_folder
from .errors import CheckpointError, InputError
from .inference import Precision, resolve_device
from .models.dcformer import DCFormerConfig, med3dvlm_config
from .models.med3dvlm import (
    IMAGE_SIZE, Med3DVLMConfig, Med3DVLMForCausalLM, encode_answers, encode_prompts, image_token_id, load_med3dvlm,
    prepare_volume,
)
from .models.med3dvlm.model import DeviceMap, check_quantization, device_of, device_types, plan_device_map, read_config
from .volume import Volume

# One of the reference's caption templates (src/dataset/prompt_templates.py); captions have no separator.
REPORT_PROMPT = "Please caption this medical scan with findings."
LETTERS = "ABCDEFGH"
CPU_PARAMETER_LIMIT = 1_000_000_000  # above this, CPU generation is refused unless allow_slow=True
CPU_BYTES_PER_SECOND = 10e9  # memory bandwidth that bounds CPU decoding: every weight is read per token
VLM_FILES = ("*.json", "*.safetensors", "vision_tower.bin", "*.txt", "tokenizer*")

VLM_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("default", "embedded tiny Med3DVLM-class model trained by voxtext on phantoms (CPU, seconds)",
                  licence="Apache-2.0"),
        ModelSpec("med3dvlm", "published Med3DVLM (DCFormer-small + Qwen2.5-7B, 7.7B parameters, GPU)",
                  repo_id="MagicXin/Med3DVLM-Qwen-2.5-7B", licence="see the model repository"),
    )
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def format_question(question: str, choices: Sequence[str] | None = None) -> str:
    """``question`` plus ``" Choices: A. x B. y ..."`` for closed questions (M3D-VQA layout)."""
    if not choices:
        return question
    return question + " Choices: " + " ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def format_choice_answer(choices: Sequence[str], index: int) -> str:
    """The training target of a closed question, e.g. ``"B. no"``."""
    return f"{LETTERS[index]}. {choices[index]}"


_LETTER = re.compile(r"^\s*(?:(?i:answer)\s*:\s*)?\(?([A-H])(?:[.):](.*))?$", re.DOTALL)


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the option ``text`` answers, or None; strict, never a substring test.

    Accepted: a capital letter alone or followed by ``.``, ``)`` or ``:`` (``"B"``, ``"B."``,
    ``"(B) no"``, ``"Answer: B. no"``), or exactly one option's text (``"no"``). A letter
    whose option text contradicts it (``"B. yes"`` when B is "no" and another option is "yes") is
    rejected; ``"DNA."`` matches nothing.
    """
    options = [_normalize(c) for c in choices]
    match = _LETTER.match(text.strip())
    if match:
        index = LETTERS.index(match.group(1))
        if index >= len(choices):
            return None
        rest = _normalize((match.group(2) or "").lstrip(")"))
        if rest and rest != options[index] and rest in options:
            return None
        return index
    said = _normalize(text)
    hits = [i for i, option in enumerate(options) if option == said]
    return hits[0] if len(hits) == 1 else None


@dataclass(frozen=True)
class Answer:
    """A generated answer; for closed questions the option it picks (None when unparseable).

    ``scores``: with scored choices, the log-likelihood of each option's answer (``"A. yes"``) under the model.
    """

    text: str
    choices: tuple[str, ...] = ()
    index: int | None = None
    scores: tuple[float, ...] = ()

    @property
    def choice(self) -> str | None:
        return None if self.index is None else self.choices[self.index]

    def __str__(self) -> str:
        if not self.choices:
            return self.text
        return format_choice_answer(self.choices, self.index) if self.index is not None else self.text


class _CallbackStreamer(TextStreamer):
    """Passes each finalized piece of decoded text to ``callback`` as soon as it is known."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, callback: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


def resolve_vlm(model: str | Path, download: bool = True) -> Path:
    """Local folder of ``default``, ``med3dvlm``, an ``hf://owner/repo`` URI or a checkpoint folder."""
    return resolve_folder(model, VLM_REGISTRY, VLM_FILES, "config.json", "report model", embedded="vlm-default",
                          download=download)


def vision_config_of(config: Med3DVLMConfig) -> DCFormerConfig:
    """The DCFormer variant of a checkpoint: ``vision_variant`` in config.json (ours), else the reference's small."""
    return med3dvlm_config(getattr(config, "vision_variant", "small"))


def image_size_of(config: Med3DVLMConfig) -> tuple[int, int, int]:
    """Model input ``(D, H, W)``: config ``input_size`` is stored ``(H, W, D)``; the reference's is 128x256x256."""
    if getattr(config, "vision_variant", None) is None:
        return IMAGE_SIZE
    h, w, d = config.input_size
    return d, h, w


def parameter_count(config: Med3DVLMConfig) -> int:
    """Parameters of the model ``config`` describes (built on the meta device, nothing allocated)."""
    with torch.device("meta"):
        model = Med3DVLMForCausalLM(config, vision_config_of(config))
    return sum(p.numel() for p in model.parameters())


def check_cpu_budget(config: Med3DVLMConfig, device: torch.device, max_new_tokens: int, allow_slow: bool) -> None:
    """Refuse (with an estimate) to run a > 1B-parameter model on a CPU, where it would take many minutes."""
    params = parameter_count(config)
    if device.type != "cpu" or params <= CPU_PARAMETER_LIMIT or allow_slow:
        return
    seconds_per_token = 4 * params / CPU_BYTES_PER_SECOND  # fp32 weights read once per generated token
    raise InputError(
        f"this model has {params / 1e9:.1f}B parameters: on this CPU it needs about {4 * params / 2**30:.0f} GiB "
        f"of memory and roughly {seconds_per_token:.0f} s per token, i.e. about "
        f"{seconds_per_token * max_new_tokens / 60:.0f} minutes for {max_new_tokens} tokens. Use a GPU "
        "(device='cuda', precision='bf16'), the embedded model='default', or pass allow_slow=True (--allow-slow)."
    )


class Reporter:
    """A loaded Med3DVLM-class model that writes reports and answers questions about volumes.

    >>> Reporter("default").report("ct.nii.gz", greedy=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | Path = "default",
        device: str | torch.device = "auto",
        precision: Precision = "fp32",
        *,
        download: bool = True,
        allow_slow: bool = False,
        load_in: str | None = None,
        device_map: str | int | DeviceMap | None = None,
    ) -> None:
        """``precision`` is the dtype of the weights (of the unquantized ones with ``load_in``).

        ``load_in="8bit"``/``"4bit"`` quantizes the LLM's Linear layers with bitsandbytes (CUDA only; the
        vision tower, projector and lm_head stay in ``precision``). ``device_map`` spreads the model over
        devices with accelerate: "auto" (also "balanced", "balanced_low_0", "sequential") puts the decoder
        layers where they fit and the vision tower and projector on the first device; a device name or
        a ``{module: device}`` dict places it explicitly; ``device`` is then ignored.
        """
        if precision not in DTYPES:
            raise InputError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.device = resolve_device(device)
        self.model_name = str(model)
        folder = resolve_vlm(model, download)
        config = read_config(folder)
        vision_config = vision_config_of(config)
        plan = None
        if device_map is not None or load_in is not None:
            plan = plan_device_map(config, vision_config, str(self.device) if device_map is None else device_map,
                                   DTYPES[precision], load_in)
            check_quantization(load_in, device_types(plan))  # says what is missing before anything is read
            self.device = device_of(plan, "model.embed_tokens")
        generation = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() \
            else GenerationConfig()
        check_cpu_budget(config, self.device, generation.max_new_tokens or 256, allow_slow)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)  # never trust_remote_code
        if image_token_id(self.tokenizer) != config.image_token_id:
            raise CheckpointError(
                f"the tokenizer's <im_patch> id {image_token_id(self.tokenizer)} differs from config.json's "
                f"image_token_id {config.image_token_id}: tokenizer and weights come from different checkpoints"
            )
        self.model = load_med3dvlm(folder, vision_config, DTYPES[precision], self.device, device_map=plan,
                                   load_in=load_in)
        self.image_size = image_size_of(config)
        self.window = getattr(config, "image_window", None)

    def prepare(self, volume: Volume | str | Path | np.ndarray) -> torch.Tensor:
        """The model input ``(1, 1, D, H, W)`` of a volume, a path or a 3-D array."""
        if volume is None:
            raise InputError("no volume given: pass a file path, a voxtext.Volume or a 3-D numpy array")
        if not isinstance(volume, (Volume, str, Path, np.ndarray)):
            raise InputError(f"cannot describe a {type(volume).__name__}: pass a Volume, a file path or a 3-D array")
        image = prepare_volume(as_volume(volume), self.image_size, self.window)
        return image.to(self.device, self.model.dtype)

    def _generate(
        self,
        image: torch.Tensor,
        prompt: str,
        separator: str,
        stream: Callable[[str], None] | None,
        greedy: bool,
        max_new_tokens: int | None,
    ) -> str:
        inputs = encode_prompts(self.tokenizer, [prompt], self.model.num_image_tokens, separator)
        options: dict = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        if greedy:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stream is not None:
            options["streamer"] = _CallbackStreamer(self.tokenizer, stream)
        ids = self.model.generate(images=image, **{k: v.to(self.device) for k, v in inputs.items()}, **options)
        return self.tokenizer.decode(ids[0], skip_special_tokens=True).strip()

    def report(
        self,
        volume: Volume | str | Path | np.ndarray,
        stream: Callable[[str], None] | None = None,
        greedy: bool = False,
        max_new_tokens: int | None = None,
    ) -> str:
        """A findings report; ``stream`` receives the text piece by piece while it is generated.

        Decoding follows the checkpoint's ``generation_config.json`` unless ``greedy``.
        """
        return self._generate(self.prepare(volume), REPORT_PROMPT, "", stream, greedy, max_new_tokens)

    def ask(
        self,
        volume: Volume | str | Path | np.ndarray,
        question: str,
        choices: Sequence[str] | None = None,
        *,
        stream: Callable[[str], None] | None = None,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        score: bool = False,
    ) -> Answer:
        """Answer ``question``; with ``choices`` (2-8 options) the answer is parsed strictly into one of them.

        ``score`` (closed questions): instead of generating, rank the options by the log-likelihood the
        model gives each answer ``"X. option"`` (as multiple-choice benchmarks of language models do);
        the answer is always one of the choices and ``Answer.scores`` holds the log-likelihoods.
        """
        if not isinstance(question, str) or not question.strip():
            raise InputError("empty question: ask something, e.g. 'Is there a kidney stone?'")
        options = tuple(" ".join(str(c).split()) for c in choices) if choices else ()
        if options and not 2 <= len(options) <= len(LETTERS):
            raise InputError(f"give between 2 and {len(LETTERS)} choices, got {len(options)}")
        if options and (not all(options) or len(set(map(_normalize, options))) != len(options)):
            raise InputError(f"choices must be distinct and non-empty, got {list(choices)}")
        if score and not options:
            raise InputError("scoring ranks the options of a closed question: give choices")
        prompt = format_question(" ".join(question.split()), options)
        if score:
            scores = self.score_answers(self.prepare(volume), prompt, [format_choice_answer(options, i)
                                                                      for i in range(len(options))])
            best = int(np.argmax(scores))
            answer = Answer(format_choice_answer(options, best), options, best, tuple(scores))
            if stream is not None:
                stream(answer.text)
            return answer
        text = self._generate(self.prepare(volume), prompt, " ", stream, greedy, max_new_tokens)
        return Answer(text, options, parse_choice(text, options) if options else None)

    @torch.no_grad()
    def score_answers(self, image: torch.Tensor, prompt: str, answers: Sequence[str]) -> list[float]:
        """Log-likelihood of each answer (its tokens and EOS) after ``prompt`` about the prepared ``image``."""
        batch = encode_answers(self.tokenizer, [(prompt, " ", a) for a in answers], self.model.num_image_tokens)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = self.model(**batch, images=image.expand(len(answers), *image.shape[1:])).logits.float()
        targets = labels[:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (log_probs * (targets != -100)).sum(dim=1).tolist()


@functools.lru_cache(maxsize=2)
def _cached_reporter(model: str, device: str, precision: str) -> Reporter:
    return Reporter(model, device, precision)


def report(
    volume: Volume | str | Path | np.ndarray,
    model: str | Path = "default",
    device: str = "auto",
    precision: Precision = "fp32",
    **options,
) -> str:
    """A report of ``volume`` by a (cached) model; see :meth:`Reporter.report` for options."""
    return _cached_reporter(str(model), str(device), precision).report(volume, **options)


def ask(
    volume: Volume | str | Path | np.ndarray,
    question: str,
    choices: Sequence[str] | None = None,
    model: str | Path = "default",
    device: str = "auto",
    precision: Precision = "fp32",
    **options,
) -> Answer:
    """Answer a question about ``volume`` with a (cached) model; see :meth:`Reporter.ask`."""
    return _cached_reporter(str(model), str(device), precision).ask(volume, question, choices, **options)
