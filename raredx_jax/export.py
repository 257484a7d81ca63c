"""Export stage: the latest checkpoint of a run -> an HF directory transformers loads (levanter style).

  python -m raredx_jax.train --config=configs/export.py --config.model.init_from=runs/grpo

Writes config.json, generation_config.json, sharded safetensors (+ index), the tokenizer files, and, when
PyTorch is installed and `export.verify` is set, checks that transformers reproduces our logits. A LoRA run
exports its base with the adapters merged in, and the adapter alone in PEFT's format beside it
(`lora.adapter_dir`, default `<hf_dir>_peft`: adapter_config.json + adapter_model.safetensors).

The HF directory is written as a unit (`raredx_jax.fileio`: a temporary sibling renamed into place), so a
re-export leaves no shard or index of the earlier one. It replaces `export.hf_dir` when that is empty, new, or an
earlier export of this project (`hf_io.is_own_export`: what a rerun after an interruption finds); any other
non-empty directory is refused unless `export.overwrite=True`, and the checkpoint being exported never is.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from raredx_jax import fileio, lora
from raredx_jax.checkpoints import hf_io
from raredx_jax.checkpoints.orbax import load_model, resolve_model_checkpoint
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.policy import find_tokenizer
from raredx_jax.training.common import MissingInputError


def verify_with_transformers(model: Any, hf_dir: str, atol: float = 1e-3) -> float:
    """Max |logit difference| between our model and transformers on a fixed input (raises above atol)."""
    import torch  # noqa: PLC0415 - optional: torch (the [torch] extra), only for the transformers check
    import transformers  # noqa: PLC0415 - optional: with torch, only for the transformers check

    cfg = model.config
    tokens = (np.arange(24, dtype=np.int32) * 7 + 3) % cfg.vocab_size
    ours, _ = model(jnp.asarray(tokens[None]), jnp.arange(24, dtype=jnp.int32)[None])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens[None], dtype=torch.long)).logits.numpy()
    diff = float(np.abs(np.asarray(ours, np.float32) - ref).max())
    if diff > atol:
        raise ValueError(f"export.verify: transformers logits differ from ours by {diff:.2e} (> {atol})")
    return diff


def run_export(config: Any) -> dict[str, Any]:
    src = config.model.init_from or config.run_dir
    try:
        ckpt = resolve_model_checkpoint(src)
    except FileNotFoundError as e:
        raise MissingInputError(f"export: model.init_from={src!r}: {e}. Train a stage first, e.g. "
                                "`python -m raredx_jax.train --config=configs/knowledge_sft.py`") from None

    out = config.export.hf_dir or os.path.join(config.run_dir, "hf")
    overwrite = bool(config.export.get("overwrite", False)) or hf_io.is_own_export(out)
    dest = dict(src=ckpt, what="export.hf_dir", overwrite_hint="set export.overwrite=True to replace it")
    fileio.check_destination(ckpt, out, overwrite, what=dest["what"], overwrite_hint=dest["overwrite_hint"])
    mesh = make_mesh(config.mesh)
    model = load_model(ckpt, mesh, dtype="float32")
    tok = find_tokenizer(ckpt)
    tok_dir = tok.path.parent if tok.path.is_file() else tok.path
    # the embedded SentencePiece model as HF tokenizer files (so AutoTokenizer loads it), inside the same unit
    extra = tok.save_hf if hasattr(tok, "save_hf") else None
    hf_io.save_hf_model(model, out, dtype=config.export.get("dtype", "float32"), tokenizer_dir=str(tok_dir),
                        generation={"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, progress=True,
                        overwrite=overwrite, extra=extra, **dest)
    summary: dict[str, Any] = {"hf_dir": out, "checkpoint": ckpt, "params": model.config.num_params()}

    if lora.is_lora_checkpoint(ckpt):  # `out` holds the merged model; the adapter goes beside it in PEFT's format
        lora_cfg = config.get("lora", None)
        adapter_dir = (lora_cfg.get("adapter_dir", "") if lora_cfg is not None else "") or out.rstrip("/") + "_peft"
        summary["peft_adapter_dir"] = lora.export_adapter(ckpt, adapter_dir, mesh,
                                                             overwrite=bool(config.export.get("overwrite", False)))
    if config.export.get("verify", True) and jax.process_index() == 0:
        try:
            summary["max_logit_diff_vs_transformers"] = verify_with_transformers(model, out)
        except ImportError:
            summary["verify"] = "skipped: torch/transformers not installed (pip install .[torch])"
    print(f"[export] wrote {out}", flush=True)
    return summary
