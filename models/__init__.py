"""Flax decoders for Llama, Qwen2, Qwen3 and Mistral checkpoints (``tmjax.models``)."""

from tmjax.models.config import ModelConfig, RopeConfig
from tmjax.models.decoder import KVCache
from tmjax.models.params import Params, init_params, param_shapes

__all__ = ["KVCache", "ModelConfig", "Params", "RopeConfig", "init_params", "param_shapes"]
