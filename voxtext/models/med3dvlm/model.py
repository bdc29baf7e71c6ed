"""Med3DVLM: DCFormer vision tower + mixer projector + Hugging Face Qwen2 language model.

:class:`Med3DVLMForCausalLM` is transformers' ``Qwen2ForCausalLM`` with the vision tower and the
projector attached to its decoder (``model.vision_tower`` / ``model.mm_projector``), so its state
dict has exactly the keys of the reference's merged checkpoint and HF's ``generate`` (KV cache,
logits processors, streamers) drives decoding. :func:`load_med3dvlm` reads such a folder without
``trust_remote_code``: our classes are built from ``config.json`` and the tensors are loaded strictly.
With ``device_map`` or ``load_in`` ("8bit"/"4bit", bitsandbytes on CUDA) the same folder goes through
transformers' ``from_pretrained`` (accelerate dispatch, ``BitsAndBytesConfig`` on the LLM's Linear layers
only); the keys and shapes are checked strictly first from the safetensors headers, and afterwards
``from_pretrained``'s loading info must report nothing missing, unexpected or mismatched.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from ...errors import CheckpointError, InputError
from ..dcformer import DCFormer, DCFormerConfig, med3dvlm_config
from ..state_dict import SHARD_INDEX, check_state_dict, load_strict, read_sharded, read_state_dict, with_prefix
from .config import Med3DVLMConfig
from .projector import MixerProjector

VISION_PREFIX = "model.vision_tower."
LOAD_IN = ("8bit", "4bit")
# Modules bitsandbytes leaves unquantized (substring match on module names): the vision side and the output head.
NOT_QUANTIZED = ["vision_tower", "mm_projector", "lm_head"]
# accelerate's placement strategies; any other string is one device ("cpu", "cuda:1", ...).
PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")
# The vision side is never split and sits on the device of the input embeddings (the first one).
FIRST_DEVICE_MODULES = ("model.vision_tower", "model.mm_projector")
DeviceMap = Mapping[str, "int | str | torch.device"]


class VisionTower(nn.Module):
    """The DCFormer (key ``vision_tower``); returns stage tokens from ``select_layer`` on: ``[s3, s4]`` for -2."""

    def __init__(self, config: DCFormerConfig, select_layer: int = -2) -> None:
        super().__init__()
        self.vision_tower = DCFormer(config)
        self.select_layer = select_layer

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.vision_tower(images)[self.select_layer:]
        return [self.vision_tower.tokens(f) for f in features]


def prompt_starts(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Index of each row's first attended token: 0 without left padding."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return attention_mask.long().argmax(dim=1)


def insert_image_features(embeds: torch.Tensor, features: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Write ``features (B, N, H)`` into the text embeddings ``(B, L, H)`` as the published weights expect.

    Quirk reproduced on purpose: the reference (inherited from M3D/LaMed, which assumed a BOS token)
    overwrites positions ``1..N`` of a prompt ``"<im_patch>" * N + text``. Position 0 keeps the
    embedding of the first ``<im_patch>`` and the first text token (position N) is dropped; the
    published Med3DVLM was trained and evaluated that way, so "fixing" it changes its outputs. Here
    the positions count from each row's first token (``starts``), so left-padded batches get the
    placement of the reference's unpadded batch of one.
    """
    positions = starts[:, None] + 1 + torch.arange(features.shape[1], device=embeds.device)
    if int(positions.max()) >= embeds.shape[1]:
        raise InputError(f"the prompt is shorter than its {features.shape[1]} image tokens plus one text token")
    index = positions[..., None].expand(-1, -1, embeds.shape[2])
    return embeds.scatter(1, index, features.to(embeds.device, embeds.dtype))


class Med3DVLMForCausalLM(Qwen2ForCausalLM):
    """Qwen2 causal LM whose prompts start with ``num_image_tokens`` image tokens from a 3-D volume."""

    config_class = Med3DVLMConfig

    def __init__(self, config: Med3DVLMConfig, vision_config: DCFormerConfig | None = None) -> None:
        problems = config.unsupported()
        if problems:
            raise CheckpointError("unsupported Med3DVLM config: " + "; ".join(problems))
        super().__init__(config)
        # The reference always builds decomp_small, whatever the config says (its sizes are not in config.json).
        self.model.vision_tower = VisionTower(vision_config or med3dvlm_config("small"), config.vision_select_layer)
        self.model.mm_projector = MixerProjector(config)

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` volumes -> ``(B, num_image_tokens, hidden)`` LLM embeddings."""
        return self.model.mm_projector(self.model.vision_tower(images))

    def embed_multimodal(
        self, input_ids: torch.Tensor, images: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the image features placed as in :func:`insert_image_features`."""
        starts = prompt_starts(attention_mask, input_ids.shape[0], input_ids.device)
        slots = starts[:, None] + torch.arange(self.num_image_tokens, device=input_ids.device)
        image_id = self.config.image_token_id
        if slots.max() >= input_ids.shape[1] or not (input_ids.gather(1, slots) == image_id).all():
            raise InputError(
                f"every prompt must start with {self.num_image_tokens} image tokens (id {image_id}); "
                "build prompts with voxtext.models.med3dvlm.encode_prompts"
            )
        embeds = self.get_input_embeddings()(input_ids)
        return insert_image_features(embeds, self.encode_images(images.to(embeds.dtype)), starts)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        **kwargs,
    ):
        """Qwen2's forward; with ``images`` the image features are inserted into ``input_ids``' embeddings."""
        if images is not None:
            if inputs_embeds is not None:
                raise InputError("give either images with input_ids, or inputs_embeds")
            inputs_embeds = self.embed_multimodal(input_ids, images, attention_mask)
            input_ids = None
            if position_ids is None and attention_mask is not None and past_key_values is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding starts at 0
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, **kwargs,
        )

    def generate(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Decode answers to image prompts; returns only the new token ids (as the reference).

        Unlike the reference, which drops ``attention_mask``, padded batches (left padding) are
        handled: the mask is kept and positions start at each row's first token. The prompt ids are
        not passed on, so a ``repetition_penalty`` acts on generated tokens only, as in the reference.
        ``kwargs`` go to transformers' ``generate`` (``max_new_tokens``, ``do_sample``, ``streamer``
        e.g. a ``TextIteratorStreamer``, ...); defaults come from ``generation_config.json``.
        """
        if images is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            embeds = self.embed_multimodal(input_ids, images, attention_mask)
        return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def read_config(folder: Path) -> Med3DVLMConfig:
    """The folder's ``config.json`` as a :class:`Med3DVLMConfig`; a clear error for other models."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if raw.get("model_type") != Med3DVLMConfig.model_type:
        raise CheckpointError(
            f"{folder} holds a {raw.get('model_type')!r} model, not Med3DVLM (config.json model_type 'vlm_qwen')"
        )
    return Med3DVLMConfig.from_dict(raw)


def check_quantization(load_in: str | None, devices: set[str]) -> None:
    """Raise an :class:`InputError` naming what is missing to load the LLM in ``load_in`` on ``devices`` (device
    kinds): bitsandbytes quantization here runs on CUDA GPUs and needs the bitsandbytes package."""
    if load_in is None:
        return
    if load_in not in LOAD_IN:
        raise InputError(f"load_in must be one of {list(LOAD_IN)} or None, got {load_in!r}")
    needs = []
    if not torch.cuda.is_available():
        needs.append("a CUDA GPU (this machine has none; on a CPU load the model unquantized, in fp32 or bf16)")
    elif devices != {"cuda"}:
        needs.append(f"every weight on a CUDA device (the device map puts some on {sorted(devices)})")
    if importlib.util.find_spec("bitsandbytes") is None:
        needs.append("the bitsandbytes package (pip install bitsandbytes)")
    if needs:
        raise InputError(f"loading the language model in {load_in} needs " + " and ".join(needs))


def quantization_config(load_in: str | None, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``load_in`` ("8bit", or "4bit": NF4 computing in ``dtype``), or None.

    Only the LLM's Linear layers are quantized: the vision tower, the projector and ``lm_head`` stay in ``dtype``.
    """
    if load_in is None:
        return None
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=NOT_QUANTIZED)


def _device_name(device: int | str | torch.device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(torch.device(device))


def device_types(device_map: DeviceMap) -> set[str]:
    """The kinds of device a device map uses, e.g. ``{"cuda", "cpu"}``."""
    return {"disk" if d == "disk" else torch.device(_device_name(d)).type for d in device_map.values()}


def _entry(device_map: DeviceMap, name: str) -> int | str | torch.device:
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    if not keys:
        raise InputError(f"the device map places no device for {name!r}")
    return device_map[max(keys, key=len)]


def device_of(device_map: DeviceMap, name: str) -> torch.device:
    """The device ``device_map`` puts module or tensor ``name`` on (its longest matching prefix)."""
    return torch.device(_device_name(_entry(device_map, name)))


def _split_ancestors(device_map: dict, model: nn.Module, name: str) -> None:
    """Replace each entry of ``device_map`` that is an ancestor of module ``name`` by its children."""
    for key in sorted((k for k in device_map if k == "" or name.startswith(k + ".")), key=len):
        device = device_map.pop(key)
        for child, _ in model.get_submodule(key).named_children():
            device_map[f"{key}.{child}" if key else child] = device


def plan_device_map(
    config: Med3DVLMConfig,
    vision_config: DCFormerConfig | None,
    device_map: str | int | DeviceMap,
    dtype: torch.dtype = torch.float32,
    load_in: str | None = None,
    max_memory: dict | None = None,
) -> dict[str, int | str]:
    """A module -> device dict for ``from_pretrained``.

    A dict is used as given; a device name ("cpu", "cuda:1", 0) holds the whole model; "auto", "balanced",
    "balanced_low_0" or "sequential" let accelerate spread the LLM's decoder layers over the devices (sized
    for the quantized weights with ``load_in``), with the vision tower and projector unsplit on the device
    of the input embeddings, where the image features are inserted.
    """
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if device_map not in PLACEMENTS:
        return {"": device_map if isinstance(device_map, int) else _device_name(device_map)}
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype, get_balanced_memory

    with torch.device("meta"):
        model = Med3DVLMForCausalLM(config, vision_config)
    quantized = {f"{name}.weight" for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and not any(k in name for k in NOT_QUANTIZED)}
    weight_dtype = {"8bit": torch.int8, "4bit": CustomDtype.INT4}.get(load_in, dtype)
    sizing = {
        "no_split_module_classes": [*model._no_split_modules, "VisionTower", "MixerProjector"],
        "dtype": weight_dtype,
        "special_dtypes": {name: dtype for name, _ in model.named_parameters() if name not in quantized},
    }
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, max_memory, low_zero=device_map == "balanced_low_0", **sizing)
    plan = infer_auto_device_map(model, max_memory=max_memory, **sizing)
    first = _entry(plan, "model.embed_tokens")
    for name in FIRST_DEVICE_MODULES:
        _split_ancestors(plan, model, name)
        for key in [k for k in plan if k == name or k.startswith(name + ".")]:
            del plan[key]
        plan[name] = first
    return plan


def checkpoint_shapes(folder: Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the names and shapes of the folder's safetensors, read from the headers only."""
    from safetensors import safe_open

    index = folder / SHARD_INDEX
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        shapes = {}
        for name in files:
            with safe_open(folder / name, "pt") as handle:
                shapes.update({k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()})
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot read the safetensors of {folder}: {exc}") from exc
    return shapes


def check_vision_tower_file(folder: Path, vision: Mapping[str, torch.Tensor]) -> None:
    """``vision_tower.bin``, when present, must hold the vision tensors of the shards (``vision``, unprefixed)."""
    tower_file = folder / "vision_tower.bin"
    if not tower_file.is_file():
        return
    tower = read_state_dict(tower_file)
    check_state_dict({k: v.shape for k, v in vision.items()}, tower, tower_file, "Med3DVLM vision tower")
    if not all(torch.equal(tower[k].to(v.dtype), v.cpu()) for k, v in vision.items()):
        raise CheckpointError(f"{tower_file} and the safetensors shards hold different vision tower weights")


def load_dispatched(
    folder: Path,
    config: Med3DVLMConfig,
    vision_config: DCFormerConfig | None,
    dtype: torch.dtype,
    device_map: DeviceMap,
    quantization=None,
) -> Med3DVLMForCausalLM:
    """``from_pretrained`` with a device map (accelerate) and a :func:`quantization_config`, strictly: the
    checkpoint's keys and shapes are checked from the safetensors headers first, and from_pretrained must report
    nothing missing, unexpected or mismatched. No environment checks (see :func:`check_quantization`)."""
    with torch.device("meta"):
        expected = Med3DVLMForCausalLM(config, vision_config).state_dict()
    check_state_dict({k: v.shape for k, v in expected.items()}, checkpoint_shapes(folder), folder, "Med3DVLM")
    model, info = Med3DVLMForCausalLM.from_pretrained(
        folder, vision_config, config=config, dtype=dtype, device_map=dict(device_map),
        quantization_config=quantization, local_files_only=True, use_safetensors=True, output_loading_info=True,
    )
    leftovers = {k: v for k, v in info.items() if v}
    if leftovers:
        raise CheckpointError(f"{folder} did not load strictly into Med3DVLM: {leftovers}")
    check_vision_tower_file(folder, model.model.vision_tower.state_dict())
    return model.eval()


def load_med3dvlm(
    folder: str | Path,
    vision_config: DCFormerConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    device_map: str | int | DeviceMap | None = None,
    load_in: str | None = None,
) -> Med3DVLMForCausalLM:
    """A merged Med3DVLM folder (config.json, safetensors shards + index, vision_tower.bin, generation_config.json).

    The model is built on the meta device and takes the checkpoint's tensors directly, after a strict
    key and shape check; ``vision_tower.bin`` (read with ``weights_only=True``) must hold the same
    vision tensors. ``vision_config`` defaults to ``decomp_small``, which the reference hard-codes.
    With ``device_map`` (see :func:`plan_device_map`) or ``load_in`` ("8bit"/"4bit": bitsandbytes on the
    LLM's Linear layers, CUDA only) transformers' ``from_pretrained`` loads it instead, as strictly;
    ``device`` is then ignored (``load_in`` alone puts the model on ``device``).
    """
    folder = Path(folder)
    config = read_config(folder)
    if device_map is not None or load_in is not None:
        dtype = dtype or torch.float32
        plan = plan_device_map(config, vision_config, device if device_map is None else device_map, dtype, load_in)
        check_quantization(load_in, device_types(plan))
        dispatched = load_dispatched(folder, config, vision_config, dtype, plan, quantization_config(load_in, dtype))
        if (folder / "generation_config.json").is_file():
            dispatched.generation_config = GenerationConfig.from_pretrained(folder)
        return dispatched
    with torch.device("meta"):
        model = Med3DVLMForCausalLM(config, vision_config)
    weights = read_sharded(folder, dtype=dtype)
    load_strict(model, weights, folder, "Med3DVLM", assign=True)
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=config)  # non-persistent buffer: rebuilt off meta
    model.tie_weights()
    check_vision_tower_file(folder, with_prefix(weights, VISION_PREFIX))
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval().to(device)
