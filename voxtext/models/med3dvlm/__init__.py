"""Med3DVLM (mirthAI): 3-D medical vision-language model, DCFormer + mixer projector + Qwen2."""

from .config import Med3DVLMConfig
from .model import Med3DVLMForCausalLM, VisionTower, insert_image_features, load_med3dvlm
from .preprocess import IMAGE_SIZE, prepare_volume, prepare_volume_and_labels
from .projector import MixerLayer, MixerProjector
from .prompt import IMAGE_TOKEN, encode_answers, encode_prompts, image_token_id

__all__ = [
    "IMAGE_SIZE", "IMAGE_TOKEN", "Med3DVLMConfig", "Med3DVLMForCausalLM", "MixerLayer", "MixerProjector",
    "VisionTower", "encode_answers", "encode_prompts", "image_token_id", "insert_image_features", "load_med3dvlm",
    "prepare_volume", "prepare_volume_and_labels",
]
