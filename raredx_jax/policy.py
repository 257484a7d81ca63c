"""Load a trained policy (model + tokenizer) from any checkpoint a user may point at.

Accepted: an orbax model checkpoint / trainer step dir / run dir (`checkpoints/orbax.py`), or an exported HF
directory. The tokenizer is found beside it: `<ckpt>/tokenizer/`, the run's `tokenizer/`, or in the HF dir.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from ml_collections import ConfigDict

from raredx_jax.checkpoints import hf_io, orbax
from raredx_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from raredx_jax.models.config import read_hf_config
from raredx_jax.models.transformer import Transformer

SPM_NAME = "spm.model"


def tokenizer_from_dir(path: str) -> Tokenizer | None:
    """A SentencePiece model file or an HF tokenizer directory found at `path`, else None."""
    if not path or not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, SPM_NAME)):
        return SentencePieceTokenizer(os.path.join(path, SPM_NAME))
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return HFTokenizer(path)
    return None


def find_tokenizer(ckpt_path: str) -> Tokenizer:
    ckpt_path = os.path.abspath(ckpt_path)
    candidates = [os.path.join(ckpt_path, "tokenizer"), ckpt_path]
    parent = os.path.dirname(ckpt_path)
    for _ in range(3):  # step dir -> checkpoints/ -> run dir
        candidates.append(os.path.join(parent, "tokenizer"))
        parent = os.path.dirname(parent)
    for c in candidates:
        tok = tokenizer_from_dir(c)
        if tok is not None:
            return tok
    tok = _tokenizer_from_run_config(ckpt_path)
    if tok is not None:
        return tok
    raise FileNotFoundError(f"{ckpt_path}: no tokenizer found (looked in {', '.join(candidates[:4])}); pass one "
                            "with --tokenizer=DIR")


def _tokenizer_from_run_config(ckpt_path: str) -> Tokenizer | None:
    """The tokenizer named by the resolved config.json a trainer wrote in its run dir (a parent of the step)."""

    parent = ckpt_path
    for _ in range(3):
        cfg_path = os.path.join(parent, "config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    d = json.load(f)
                if "tokenizer" in d and "data" in d:
                    return load_tokenizer(ConfigDict(d))
            except (json.JSONDecodeError, FileNotFoundError, ValueError):
                return None
        parent = os.path.dirname(parent)
    return None


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path))


def load_policy(path: str, mesh: jax.sharding.Mesh, tokenizer_dir: str = "",
                **numerics: Any) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from an orbax checkpoint / run dir or an exported HF directory."""

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    hf = is_hf_dir(path)
    if hf:
        model = hf_io.load_hf_model(path, mesh, cfg=read_hf_config(path, **numerics))
        tok_path = path
    else:
        ckpt = orbax.resolve_model_checkpoint(path)
        model = orbax.load_model(ckpt, mesh, **numerics)
        tok_path = ckpt
    tok = tokenizer_from_dir(tokenizer_dir) if tokenizer_dir else None
    if tokenizer_dir and tok is None:
        raise FileNotFoundError(f"--tokenizer={tokenizer_dir!r}: no spm.model or HF tokenizer files there")
    tok = tok or find_tokenizer(tok_path)
    if not hf:  # an exported HF directory carries its own tokenizer files
        orbax.check_tokenizer(tok_path, tok)
    return model, tok
