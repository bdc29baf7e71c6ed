"""Configuration of Med3DVLM: a Qwen2 config plus the fields the reference adds (``model_type: vlm_qwen``)."""

from __future__ import annotations

from transformers import Qwen2Config


class Med3DVLMConfig(Qwen2Config):
    """Qwen2 fields plus the vision tower and projector fields of the reference's ``config.json``.

    Defaults are the published model's (Qwen2.5-7B-Instruct hidden 3584, 128x256x256 inputs to
    ``decomp_small``: s3 = 256 tokens x 384 ("low"), s4 = 32 tokens x 768 ("high"), 256 image tokens).
    ``image_token_id`` (not in the reference's file) is the id of ``<im_patch>``, by default the last row.
    ``input_size``, ``patch_size``, ``dim``, ``depth`` and ``mm_hidden_size`` are kept for round trips
    but have no effect, as in the reference.
    """

    model_type = "vlm_qwen"

    def __init__(
        self,
        vision_tower: str = "dcformer",
        vision_select_layer: int = -2,
        vision_select_feature: str = "cls_patch",
        mm_projector_type: str = "mixer",
        mm_mlp_depth: int = 2,
        proj_out_num: int = 256,
        low_input_size: tuple[int, int] = (256, 384),
        high_input_size: tuple[int, int] = (32, 768),
        low_output_size: tuple[int, ...] = (192, 128),
        high_output_size: tuple[int, ...] = (64, 128),
        input_size: tuple[int, int, int] = (256, 256, 128),
        patch_size: tuple[int, int, int] = (16, 16, 16),
        dim: int = 768,
        depth: int = 12,
        mm_hidden_size: int = 768,
        image_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vision_tower = vision_tower
        self.vision_select_layer = vision_select_layer
        self.vision_select_feature = vision_select_feature
        self.mm_projector_type = mm_projector_type
        self.mm_mlp_depth = mm_mlp_depth
        self.proj_out_num = proj_out_num
        self.low_input_size = list(low_input_size)
        self.high_input_size = list(high_input_size)
        self.low_output_size = list(low_output_size)
        self.high_output_size = list(high_output_size)
        self.input_size = list(input_size)
        self.patch_size = list(patch_size)
        self.dim = dim
        self.depth = depth
        self.mm_hidden_size = mm_hidden_size
        super().__init__(**kwargs)
        # The reference appends <im_patch> to the Qwen tokenizer and resizes the embeddings to fit it,
        # so its id is the last row (151665 of 151666 in the published model).
        self.image_token_id = self.vocab_size - 1 if image_token_id is None else image_token_id

    def unsupported(self) -> list[str]:
        """Reasons the reference code paths we implement cannot run this config (empty when fine)."""
        problems = []
        if self.vision_tower != "dcformer":
            problems.append(f"vision_tower {self.vision_tower!r} (only 'dcformer')")
        if self.mm_projector_type != "mixer":
            problems.append(f"mm_projector_type {self.mm_projector_type!r} (only 'mixer')")
        if self.vision_select_layer != -2 or self.vision_select_feature != "cls_patch":
            problems.append("a vision selection other than the last two stages (select_layer -2, 'cls_patch')")
        if len(self.low_output_size) != len(self.high_output_size):
            problems.append("low and high projector streams of different depth")
        return problems

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the projector yields (low stream first, then high)."""
        return self.low_output_size[-1] + self.high_output_size[-1]
