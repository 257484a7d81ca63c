"""Checkpoint conversion CLI (levanter/maxtext style: conversion lives next to the model).

  python -m raredx_jax.checkpoints.convert --to=orbax --src=HF_DIR --dst=CKPT_DIR
  python -m raredx_jax.checkpoints.convert --to=hf --src=CKPT_OR_RUN_DIR --dst=HF_DIR [--tokenizer_dir=DIR]

Parameters are loaded directly into shards over all local devices (mesh fsdp=-1), so models larger than one
device convert as long as they fit the host(s) in aggregate.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("to", None, ["orbax", "hf"], "Target format.")
flags.DEFINE_string("src", None, "Source: a local HF directory (--to=orbax) or a model/trainer checkpoint (--to=hf).")
flags.DEFINE_string("dst", None, "Destination directory.")
flags.DEFINE_string("tokenizer_dir", "", "Directory whose tokenizer files are copied into the HF export.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Tensor dtype written to the HF export.")
flags.DEFINE_integer("max_shard_mb", 2048, "Max size of one safetensors shard in the HF export.")


def convert(to: str, src: str, dst: str, tokenizer_dir: str = "", dtype: str = "float32",
            max_shard_mb: int = 2048) -> str:
    from ml_collections import ConfigDict

    from raredx_jax.checkpoints import hf_io, orbax
    from raredx_jax.parallel.mesh import make_mesh

    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
    t0 = time.time()
    if to == "orbax":
        print(f"[convert] reading HF checkpoint {src}", flush=True)
        model = hf_io.load_hf_model(src, mesh, progress=True)
        orbax.save_model(dst, model)
        tok = [f for f in hf_io.TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
        if tok:
            os.makedirs(os.path.join(dst, "tokenizer"), exist_ok=True)
            hf_io.copy_tokenizer_files(src, os.path.join(dst, "tokenizer"))
    else:
        ckpt = orbax.resolve_model_checkpoint(src)
        print(f"[convert] reading model checkpoint {ckpt}", flush=True)
        model = orbax.load_model(ckpt, mesh)
        if not tokenizer_dir and os.path.isdir(os.path.join(ckpt, "tokenizer")):
            tokenizer_dir = os.path.join(ckpt, "tokenizer")
        hf_io.save_hf_model(model, dst, dtype=dtype, max_shard_bytes=max_shard_mb << 20,
                            tokenizer_dir=tokenizer_dir or None, progress=True)
    print(f"[convert] wrote {dst} ({model.config.num_params() / 1e6:.1f}M params, {time.time() - t0:.1f}s)",
          flush=True)
    return dst


def main(argv: list[str]) -> None:
    del argv
    for name in ("to", "src", "dst"):
        if not getattr(FLAGS, name):
            sys.exit(f"convert: --{name} is required")
    try:
        convert(FLAGS.to, FLAGS.src, FLAGS.dst, FLAGS.tokenizer_dir, FLAGS.dtype, FLAGS.max_shard_mb)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"convert: error: {e}")


if __name__ == "__main__":
    app.run(main)
