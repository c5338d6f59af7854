"""Model configuration: one frozen description of a Llama / Qwen2 / Qwen3 / Mistral decoder.

Family differences (biases, q/k-norm, sliding window, tied embeddings, RoPE variant) are fields here,
so that one decoder definition serves every family. ``ModelConfig.from_hf`` reads a Hugging Face
``config.json`` dict and refuses, with a ``ValueError`` naming it, anything the port would get wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

_ARCH_CLASSES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
# transformers' class defaults for keys a config.json may leave out.
_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 131072}
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}
_ROPE_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings. ``kind`` picks the inverse-frequency rule (see ``tmjax.models.rope``)."""

    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE type {self.kind!r}; supported: {ROPE_TYPES}")
        if not self.theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.theta}")
        if not self.factor > 0:
            raise ValueError(f"RoPE factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a checkpoint; hashable, so it is static under jit.

    ``sliding_window`` is the window of the layers listed in ``sliding_window_layers`` (a key is
    visible iff ``q - window < k <= q``); every other layer is full causal.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.sliding_window_layers and self.sliding_window is None:
            raise ValueError("sliding_window_layers is set but sliding_window is None")
        bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"sliding_window_layers {bad} outside 0..{self.num_layers - 1}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer``, or None where it attends to all past keys."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers v4 or v5 spelling).

        A value of the wrong type (``"64"`` for ``hidden_size``, ``null`` for ``rms_norm_eps``) is a
        ``ValueError`` naming its key.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"a model config must be a JSON object (dict), got {type(config).__name__}")
        arch = _architecture(config)
        hidden = _int(config, "hidden_size")
        heads = _int(config, "num_attention_heads")
        kv_heads = _int(config, "num_key_value_heads", heads)
        head_dim = _int(config, "head_dim", 128 if arch == "qwen3" else None)  # Qwen3's class default
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only 'silu')")
        num_layers = _int(config, "num_hidden_layers")
        max_positions = _int(config, "max_position_embeddings", _MAX_POSITIONS[arch])
        # Like transformers: attention_bias exists for llama/qwen3 only, mlp_bias for llama only.
        attention_bias = arch in ("llama", "qwen3") and _bool(config, "attention_bias")
        mlp_bias = arch == "llama" and _bool(config, "mlp_bias")
        window, window_layers = _sliding_window(config, arch, num_layers)
        eps = _float(config, "rms_norm_eps", 1e-6, null_ok=False)
        if not eps > 0:
            raise ValueError(f"config 'rms_norm_eps' must be > 0, got {eps}")
        return cls(
            architecture=arch,
            vocab_size=_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            max_position_embeddings=max_positions,
            rope=_rope(config, max_positions),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=attention_bias,
            mlp_bias=mlp_bias,
            qk_norm=arch == "qwen3",
            sliding_window=window,
            sliding_window_layers=window_layers,
            tie_word_embeddings=_bool(config, "tie_word_embeddings"),
        )


_REQUIRED = object()


def _int(config: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, section: str = "") -> Any:
    """``config[key]`` as a positive int; a missing or null key gives ``default`` (required if none).
    ``section`` names the enclosing key in messages (``rope_scaling.``)."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config is missing {section + key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config {section + key!r} must be a positive integer, got {value!r}")
    return value


def _float(config: Mapping[str, Any], key: str, default: Any, *, null_ok: bool = True, section: str = "") -> Any:
    """``config[key]`` as a float (an int is fine); absent (or null, if ``null_ok``) gives ``default``."""
    if key not in config or (config[key] is None and null_ok):
        return default
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config {section + key!r} must be a finite number, got {value!r}")
    return float(value)


def _bool(config: Mapping[str, Any], key: str, default: bool = False, *, section: str = "") -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config {section + key!r} must be true or false, got {value!r}")
    return value


def _architecture(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type is not None:
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture model_type={model_type!r}; supported: {ARCHITECTURES}")
        return model_type
    names = config.get("architectures") or []
    if not isinstance(names, list):
        raise ValueError(f"config 'architectures' must be a list of class names, got {names!r}")
    for name in names:
        if name in _ARCH_CLASSES:
            return _ARCH_CLASSES[name]
    raise ValueError(f"unsupported architecture {names!r} (no model_type); supported: {ARCHITECTURES}")


def _sliding_window(config: Mapping[str, Any], arch: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Mistral windows every layer when ``sliding_window`` is set; Qwen2/3 only with ``use_sliding_window``,
    in the layers ``layer_types`` marks (default: from ``max_window_layers`` on)."""
    if arch == "llama":
        return None, ()  # transformers' Llama has no window and ignores the key
    window = _int(config, "sliding_window", None)
    if arch == "mistral":
        if config.get("layer_types") is not None:
            raise ValueError("per-layer layer_types is not supported for mistral (that is Ministral)")
        return (None, ()) if window is None else (window, tuple(range(num_layers)))
    if not _bool(config, "use_sliding_window") or window is None:
        return None, ()
    types = config.get("layer_types")
    if types is None:
        start = config.get("max_window_layers", 28)
        if isinstance(start, bool) or not isinstance(start, int):
            raise ValueError(f"config 'max_window_layers' must be an integer, got {start!r}")
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list):
        raise ValueError(f"config 'layer_types' must be a list, got {types!r}")
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted({repr(t) for t in types} - {"'sliding_attention'", "'full_attention'"})
    if unknown:
        raise ValueError(f"unsupported layer_types {unknown}")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, layers) if layers else (None, ())


def _rope_section(config: Mapping[str, Any]) -> tuple[dict, str]:
    """The RoPE dict and its key: ``rope_scaling`` wins over ``rope_parameters``, like transformers."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is None or value == {}:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"config {key!r} must be an object such as {{\"rope_type\": \"linear\", "
                             f"\"factor\": 2.0}}, got {value!r}")
        return dict(value), key + "."
    return {}, "rope_parameters."


def _rope(config: Mapping[str, Any], max_positions: int) -> RopeConfig:
    """Accept v5 ``rope_parameters`` and legacy ``rope_theta`` + ``rope_scaling`` (``type``/``rope_type``);
    like transformers, ``rope_scaling`` wins when both are present."""
    params, section = _rope_section(config)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {kind!r}; supported: {ROPE_TYPES}")
    unknown = sorted(set(params) - _ROPE_COMMON_KEYS - _ROPE_KEYS[kind])
    if unknown:
        raise ValueError(f"unsupported option(s) {unknown} for RoPE type {kind!r}")
    partial = _float(params, "partial_rotary_factor", _float(config, "partial_rotary_factor", 1.0), section=section)
    if partial != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor={partial} (only 1.0)")
    theta = _float(params, "rope_theta", None, section=section) or _float(config, "rope_theta", None) or 10000.0
    fields: dict[str, Any] = {"kind": kind, "theta": theta}
    if kind == "default":
        return RopeConfig(**fields)
    factor = _float(params, "factor", None, section=section)
    original = (_int(config, "original_max_position_embeddings", None)
                or _int(params, "original_max_position_embeddings", None, section=section) or max_positions)
    if kind == "yarn" and factor is None:
        factor = max_positions / original
    if factor is None:
        raise ValueError(f"RoPE type {kind!r} needs a 'factor'")
    fields["factor"] = factor
    if kind == "llama3":
        low = _float(params, "low_freq_factor", None, section=section)
        high = _float(params, "high_freq_factor", None, section=section)
        for key, value in (("low_freq_factor", low), ("high_freq_factor", high)):
            if value is None:
                raise ValueError(f"RoPE type 'llama3' needs {key!r}")
        if high == low:
            raise ValueError("llama3 RoPE needs high_freq_factor != low_freq_factor")
        fields.update(low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
    if kind == "yarn":
        fields.update(original_max_position_embeddings=original,
                      attention_factor=_yarn_attention_factor(params, factor, section),
                      beta_fast=_float(params, "beta_fast", None, section=section) or 32.0,
                      beta_slow=_float(params, "beta_slow", None, section=section) or 1.0,
                      truncate=_bool(params, "truncate", True, section=section))
    return RopeConfig(**fields)


def _yarn_attention_factor(params: Mapping[str, Any], factor: float, section: str) -> float:
    """YaRN's cos/sin multiplier: explicit, or ``0.1 * m * ln(factor) + 1`` (ratio form with mscale)."""
    explicit = _float(params, "attention_factor", None, section=section)
    if explicit is not None:
        return explicit

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = (_float(params, key, None, section=section) for key in ("mscale", "mscale_all_dim"))
    if m and m_all:
        return mscale(m) / mscale(m_all)
    return mscale(1.0)
