"""Checkpoint conversion CLI (levanter/maxtext style: conversion lives next to the model).

  python -m raredx_jax.checkpoints.convert --to=orbax --src=HF_DIR --dst=CKPT_DIR
  python -m raredx_jax.checkpoints.convert --to=hf --src=CKPT_OR_RUN_DIR --dst=HF_DIR [--tokenizer_dir=DIR]

Parameters are loaded directly into shards over all local devices (mesh fsdp=-1), so models larger than one
device convert as long as they fit the host(s) in aggregate.

The destination is written as a unit (`raredx_jax.fileio`): into a temporary sibling, renamed into place when
complete. Refused before anything is read, as one line `convert: error: ...` with exit status 2: a destination
that is the source, lies inside it or contains it; a non-empty destination without `--overwrite`; a destination
that is a file or cannot be written (read-only, permissions); a truncated or corrupt safetensors file, an index
naming a pickle, a pickle-based checkpoint. Exit status 1 is an unexpected failure (a traceback).
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import ConfigDict

from raredx_jax import fileio
from raredx_jax.checkpoints import hf_io, orbax
from raredx_jax.parallel.mesh import make_mesh

FLAGS = flags.FLAGS
flags.DEFINE_enum("to", None, ["orbax", "hf"], "Target format.")
flags.DEFINE_string("src", None, "Source: a local HF directory (--to=orbax) or a model/trainer checkpoint (--to=hf).")
flags.DEFINE_string("dst", None, "Destination directory.")
flags.DEFINE_string("tokenizer_dir", "", "Directory whose tokenizer files are copied into the HF export.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Tensor dtype written to the HF export.")
flags.DEFINE_integer("max_shard_mb", 2048, "Max size of one safetensors shard in the HF export.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst (never the source, never a file).")

EXIT_BAD_INPUT = 2
_HINT = "pass --overwrite to replace it"


def convert(to: str, src: str, dst: str, tokenizer_dir: str = "", dtype: str = "float32",
            max_shard_mb: int = 2048, overwrite: bool = False) -> str:
    if not os.path.exists(src):
        raise FileNotFoundError(f"--src={src} does not exist")
    # before reading anything: the destination must not be (or hold, or lie in) the source, and must be writable
    fileio.check_destination(src, dst, overwrite, what="--dst", overwrite_hint=_HINT)
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
    t0 = time.time()
    if to == "orbax":
        print(f"[convert] reading HF checkpoint {src}", flush=True)
        model = hf_io.load_hf_model(src, mesh, progress=True)

        def add_tokenizer(tmp: str) -> None:
            if any(os.path.isfile(os.path.join(src, f)) for f in hf_io.TOKENIZER_FILES):
                os.makedirs(os.path.join(tmp, "tokenizer"), exist_ok=True)
                hf_io.copy_tokenizer_files(src, os.path.join(tmp, "tokenizer"))

        orbax.save_model(dst, model, overwrite=overwrite, src=src, what="--dst", overwrite_hint=_HINT,
                         extra=add_tokenizer)
    else:
        ckpt = orbax.resolve_model_checkpoint(src)
        fileio.check_destination(ckpt, dst, overwrite, what="--dst", overwrite_hint=_HINT)
        print(f"[convert] reading model checkpoint {ckpt}", flush=True)
        model = orbax.load_model(ckpt, mesh)
        if not tokenizer_dir and os.path.isdir(os.path.join(ckpt, "tokenizer")):
            tokenizer_dir = os.path.join(ckpt, "tokenizer")
        hf_io.save_hf_model(model, dst, dtype=dtype, max_shard_bytes=max_shard_mb << 20,
                            tokenizer_dir=tokenizer_dir or None, progress=True, overwrite=overwrite, src=src,
                            what="--dst", overwrite_hint=_HINT)
    print(f"[convert] wrote {dst} ({model.config.num_params() / 1e6:.1f}M params, {time.time() - t0:.1f}s)",
          flush=True)
    return dst


def _fail(msg: str) -> None:
    one_line = " | ".join(line.strip() for line in str(msg).splitlines() if line.strip())
    print(f"convert: error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def main(argv: list[str]) -> None:
    del argv
    for name in ("to", "src", "dst"):
        if not getattr(FLAGS, name):
            _fail(f"--{name} is required")
    try:
        convert(FLAGS.to, FLAGS.src, FLAGS.dst, FLAGS.tokenizer_dir, FLAGS.dtype, FLAGS.max_shard_mb,
                FLAGS.overwrite)
    except KeyError as e:  # str(KeyError) is the repr of its argument
        _fail(e.args[0] if e.args else "missing key")
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    except OSError as e:  # writing the destination: full disk, read-only filesystem, permissions
        _fail(f"{e.filename or FLAGS.dst}: {e.strerror or e}")


if __name__ == "__main__":
    app.run(main)
