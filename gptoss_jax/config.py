"""Model configuration: one type read from this project's JSON files, an HF `config.json`
or an original OpenAI `config.json` (docs/architecture.md 1.1)."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from gptoss_jax.mxfp4 import BLOCK as MXFP4_BLOCK

SLIDING = "sliding_attention"
FULL = "full_attention"

PRESETS = ("tiny", "gpt-oss-20b", "gpt-oss-120b")


class ConfigError(ValueError):
    """A configuration is missing a field or its fields disagree."""


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    initial_context_length: int
    rope_theta: float
    rope_scaling_factor: float
    rope_ntk_alpha: float
    rope_ntk_beta: float
    swiglu_limit: float
    # Hard-coded in the original reference, configurable in HF.
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    # HF's YaRN `truncate` flag; gpt-oss uses the unrounded correction range (docs/architecture.md 2.4).
    rope_truncate: bool = False
    layer_types: tuple[str, ...] = ()
    name: str = "custom"

    def __post_init__(self):
        if not self.layer_types:
            # Even layers slide, odd layers attend fully (docs/architecture.md 1.1).
            kinds = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", kinds)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate()

    # ------------------------------------------------------------------ derived
    @property
    def q_heads_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_position_embeddings(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # --------------------------------------------------------------- validation
    def _validate(self):
        def fail(field, why):
            raise ConfigError(f"config field '{field}' {why} (config '{self.name}')")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                fail(f.name, f"must be a number, got {value!r}")
            if f.type == "int" and not float(value).is_integer():
                fail(f.name, f"must be an integer, got {value!r}")
        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                     "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                     "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
                     "swiglu_limit", "swiglu_alpha", "rms_norm_eps"):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)!r}")
        if self.experts_per_token > self.num_experts:
            fail("experts_per_token", f"({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.head_dim % 2:
            fail("head_dim", f"must be even for half-split RoPE, got {self.head_dim}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                fail(name, f"must be a multiple of the MXFP4 block size {MXFP4_BLOCK}, got {getattr(self, name)}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers is "
                 f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            fail("layer_types", f"has unknown kinds {bad}; use '{SLIDING}' or '{FULL}'")
        if self.rope_ntk_beta <= self.rope_ntk_alpha:
            fail("rope_ntk_beta", f"({self.rope_ntk_beta}) must exceed rope_ntk_alpha ({self.rope_ntk_alpha})")

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, name: str = "custom") -> "GptOssConfig":
        """Reads any of the three sources, detected by their keys."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config '{name}' must be a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") == "gpt_oss" or "num_local_experts" in raw:
            fields = _fields_from_hf(raw, name)
        else:
            fields = dict(raw)  # original OpenAI keys are a subset of ours
        fields.setdefault("name", name)
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for key in required:
            if fields.get(key) is None:
                raise ConfigError(f"config field '{key}' is missing (config '{name}')")
        return cls(**{k: v for k, v in fields.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "GptOssConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(raw, name=str(path))

    @classmethod
    def preset(cls, name: str) -> "GptOssConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
        text = resources.files("gptoss_jax.configs").joinpath(f"{name}.json").read_text()
        return cls.from_dict(json.loads(text), name=name)

    def replace(self, **changes) -> "GptOssConfig":
        """A copy with some fields changed; a new layer count re-derives the layer types."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    def to_original_dict(self) -> dict[str, Any]:
        """The original OpenAI `config.json` (its fixed constants are implied)."""
        keys = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
                "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
                "rope_ntk_alpha", "rope_ntk_beta")
        return {k: getattr(self, k) for k in keys}

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` for `GptOssForCausalLM` with packed MXFP4 experts."""
        special = {"bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999}
        return {
            **{k: v for k, v in special.items() if v < self.vocab_size},
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "truncate": self.rope_truncate,
                "original_max_position_embeddings": self.initial_context_length,
            },
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "use_cache": True,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            },
        }


def _fields_from_hf(raw: dict[str, Any], name: str) -> dict[str, Any]:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if not isinstance(rope, dict):
        raise ConfigError(f"config field 'rope_scaling' (or 'rope_parameters') is missing (config '{name}')")
    if rope.get("rope_type", rope.get("type")) != "yarn":
        raise ConfigError(f"config field 'rope_scaling.rope_type' must be 'yarn', got "
                          f"{rope.get('rope_type', rope.get('type'))!r} (config '{name}')")
    original_len = rope.get("original_max_position_embeddings", raw.get("initial_context_length"))
    return {
        "num_hidden_layers": raw.get("num_hidden_layers"),
        "num_experts": raw.get("num_local_experts", raw.get("num_experts")),
        "experts_per_token": raw.get("num_experts_per_tok", raw.get("experts_per_token")),
        "vocab_size": raw.get("vocab_size"),
        "hidden_size": raw.get("hidden_size"),
        "intermediate_size": raw.get("intermediate_size"),
        "head_dim": raw.get("head_dim"),
        "num_attention_heads": raw.get("num_attention_heads"),
        "num_key_value_heads": raw.get("num_key_value_heads"),
        "sliding_window": raw.get("sliding_window"),
        "initial_context_length": original_len,
        "rope_theta": rope.get("rope_theta", raw.get("rope_theta")),
        "rope_scaling_factor": rope.get("factor"),
        "rope_ntk_alpha": rope.get("beta_slow", 1.0),
        "rope_ntk_beta": rope.get("beta_fast", 32.0),
        # HF's YaRN reads a missing `truncate` as True.
        "rope_truncate": bool(rope.get("truncate", True)),
        "swiglu_limit": raw.get("swiglu_limit", 7.0),
        "swiglu_alpha": raw.get("swiglu_alpha", 1.702),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-5),
        "layer_types": tuple(raw["layer_types"]) if raw.get("layer_types") else (),
    }


def yarn_correction_range(config: GptOssConfig) -> tuple[float, float]:
    """The (low, high) pair indices between which YaRN blends the frequencies (docs/architecture.md 2.4)."""
    d_half = config.head_dim / 2

    def pair_index(rotations):
        return d_half * math.log(config.initial_context_length / (rotations * 2 * math.pi)) / math.log(config.rope_theta)

    low, high = pair_index(config.rope_ntk_beta), pair_index(config.rope_ntk_alpha)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0.0), min(high, config.head_dim - 1.0)
