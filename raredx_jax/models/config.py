"""Model shapes: presets with the real published shapes, and the mapping to and from HF `config.json`.

The dataclass is frozen and hashable because it is static data of the NNX module (part of its graphdef):
changing it must mean a different compiled program.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ATTENTION_IMPLS = ("xla", "dot_product", "splash")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one decoder. `rope_scaling` is a sorted tuple of (key, value) pairs."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2/2.5: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    scan_layers: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail early with the name of the offending field."""
        def bad(field: str, why: str) -> None:
            raise ValueError(f"model.{field}: {why} (got {getattr(self, field)!r})")

        if self.family not in FAMILIES:
            bad("family", f"unknown architecture family; expected one of {FAMILIES}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even for rotary embeddings")
        if self.dtype not in DTYPES:
            bad("dtype", f"expected one of {DTYPES}")
        if self.param_dtype not in DTYPES:
            bad("param_dtype", f"expected one of {DTYPES}")
        if self.attention not in ATTENTION_IMPLS:
            bad("attention", f"expected one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"expected one of {REMAT_POLICIES}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type", "default")
            if kind not in ("default", "llama3"):
                bad("rope_scaling", "only rope_type 'default' and 'llama3' are implemented")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        """Parameter count (embeddings included), for MFU and memory estimates."""
        e, m, h, k, d = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = e * h * d * 2 + e * k * d * 2 + (h * d + 2 * k * d if self.attention_bias else 0)
        layer = attn + 3 * e * m + 2 * e + (2 * d if self.qk_norm else 0)
        emb = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + e


def _scaling(d: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    return None if not d else tuple(sorted(d.items()))


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

# Real published shapes (from each model's config.json). vocab/tokens ids are the HF ones.
PRESETS: dict[str, dict[str, Any]] = {
    # ~6M parameters: learns the embedded default on a 2-core CPU in minutes. vocab comes from the tokenizer.
    "tiny": dict(family="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                 num_heads=8, num_kv_heads=4, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, attention_bias=True, max_position_embeddings=2048),
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                         max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645),
    "qwen2.5-7b": dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=True,
                       max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645),
    "llama3.1-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                        rope_scaling=_scaling(_LLAMA3_SCALING), rms_norm_eps=1e-5, tie_word_embeddings=False,
                        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
    "qwen3-8b": dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960,
                     bos_token_id=151643, eos_token_id=151645),
}


def from_hf_config(hf: dict[str, Any], *, source: str = "config.json", **numerics: Any) -> ModelConfig:
    """Map an HF `config.json` dict (transformers 4.x or 5.x layout) to a ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        archs = hf.get("architectures")
        raise ValueError(f"{source}: unknown architecture model_type={model_type!r} architectures={archs!r}; "
                         f"supported: {', '.join(_ARCHITECTURES.values())}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{source}: missing field {key!r}")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **rope}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    return ModelConfig(
        family=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim, rope_theta=float(theta),
        rope_scaling=_scaling(scaling), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")), qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), **numerics)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild this model (5.x layout, readable by 4.x too)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.family]], "model_type": cfg.family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "use_cache": True, "dtype": torch_dtype,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = cfg.rope_scaling_dict
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return out


def read_hf_config(hf_dir: str, **numerics: Any) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.hf_path: no config.json in {hf_dir!r} (a local HF model directory is "
                                "expected; nothing is downloaded)")
    with open(path, encoding="utf-8") as f:
        return from_hf_config(json.load(f), source=path, **numerics)


def model_config_from(config: Any, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from the run config's `model` section; `vocab_size` (from the tokenizer) sizes `tiny`."""
    m = config.model
    numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
                    scan_layers=bool(m.scan_layers))
    if m.hf_path or m.preset == "hf":
        if not m.hf_path:
            raise ValueError("model.hf_path: preset 'hf' needs a local HF directory in model.hf_path")
        return read_hf_config(m.hf_path, **numerics)
    if m.preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {m.preset!r}; expected one of {sorted(PRESETS)} or 'hf'")
    shape = dict(PRESETS[m.preset])
    if m.get("vocab_size", 0):
        shape["vocab_size"] = int(m.vocab_size)
    elif vocab_size is not None and m.preset == "tiny":
        shape["vocab_size"] = int(vocab_size)
    return ModelConfig(**shape, **numerics)
