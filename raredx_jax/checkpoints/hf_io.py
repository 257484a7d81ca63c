"""Hugging Face checkpoint directory <-> sharded NNX Transformer, tensor by tensor.

Import builds the model abstractly (no memory), computes each parameter's target sharding from the logical-axis
rules, and fills every device shard straight from memory-mapped safetensors slices, so a parameter is never
materialised whole unless a device holds it whole. Export gathers one tensor at a time and writes sharded
safetensors + index, config.json, generation_config.json and the tokenizer files, in the layout
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads. Only safetensors are read: pickle-based
formats (`*.bin`, `*.pt`) are refused because loading them can execute code.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from raredx_jax import fileio
from raredx_jax.checkpoints.safetensors_io import CheckpointFormatError, SafetensorsFile, write_safetensors
from raredx_jax.models.config import ModelConfig, read_hf_config, to_hf_config
from raredx_jax.models.transformer import Transformer
from raredx_jax.parallel.sharding import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "spm.model")
# Buffers some checkpoints carry that are derived, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
INDEX_FILE = "model.safetensors.index.json"
# Written into every exported safetensors header: marks a directory as an earlier export of this project, which
# a re-export may replace (see `is_own_export`).
EXPORT_MARK = "raredx_jax_export"


def pickle_refused(path: str) -> CheckpointFormatError:
    """The one message for a pickle-based weights file, wherever it is met (import, convert, diagnose, evaluate)."""
    return CheckpointFormatError(f"{path}: pickle-based checkpoint refused (loading it can execute code). Convert "
                                 "it to safetensors first, e.g. in a trusted environment: "
                                 "model.save_pretrained(dir, safe_serialization=True)")


def pickle_weights(directory: str) -> list[str]:
    """Pickle-based weight files (`pytorch_model.bin`, `*.pt`, ...) directly in `directory`, sorted."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if n.endswith(PICKLE_SUFFIXES) and os.path.isfile(os.path.join(directory, n))]


# --- the one mapping between HF names/layouts and ours -------------------------------------------------------

def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray],
                                                     Callable[[np.ndarray], np.ndarray]]]:
    """ours -> (HF name template, hf_to_ours, ours_to_hf) for stacked layer params."""
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ident = (lambda w: w, lambda w: w)

    def proj_in(n: int):  # HF [n*D, E] <-> ours [E, n, D]
        return (lambda w: w.T.reshape(E, n, D), lambda w: w.reshape(E, n * D).T)

    def bias(n: int):  # HF [n*D] <-> ours [n, D]
        return (lambda w: w.reshape(n, D), lambda w: w.reshape(n * D))

    t = (lambda w: w.T, lambda w: w.T)
    m = {
        "input_norm": ("model.layers.{}.input_layernorm.weight", *ident),
        "q_proj": ("model.layers.{}.self_attn.q_proj.weight", *proj_in(H)),
        "k_proj": ("model.layers.{}.self_attn.k_proj.weight", *proj_in(K)),
        "v_proj": ("model.layers.{}.self_attn.v_proj.weight", *proj_in(K)),
        "o_proj": ("model.layers.{}.self_attn.o_proj.weight",  # HF [E, H*D] <-> ours [H, D, E]
                   lambda w: w.T.reshape(H, D, E), lambda w: w.reshape(H * D, E).T),
        "post_norm": ("model.layers.{}.post_attention_layernorm.weight", *ident),
        "gate_proj": ("model.layers.{}.mlp.gate_proj.weight", *t),
        "up_proj": ("model.layers.{}.mlp.up_proj.weight", *t),
        "down_proj": ("model.layers.{}.mlp.down_proj.weight", *t),
    }
    if cfg.attention_bias:
        m["q_bias"] = ("model.layers.{}.self_attn.q_proj.bias", *bias(H))
        m["k_bias"] = ("model.layers.{}.self_attn.k_proj.bias", *bias(K))
        m["v_bias"] = ("model.layers.{}.self_attn.v_proj.bias", *bias(K))
    if cfg.qk_norm:
        m["q_norm"] = ("model.layers.{}.self_attn.q_norm.weight", *ident)
        m["k_norm"] = ("model.layers.{}.self_attn.k_norm.weight", *ident)
    return m


def _top_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    m = {"embed_tokens": ("model.embed_tokens.weight", lambda w: w, lambda w: w),
         "final_norm": ("model.norm.weight", lambda w: w, lambda w: w)}
    if not cfg.tie_word_embeddings:
        m["lm_head"] = ("lm_head.weight", lambda w: w.T, lambda w: w.T)
    return m


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = [hf for hf, _, _ in _top_map(cfg).values()]
    for hf, _, _ in _layer_map(cfg).values():
        names += [hf.format(i) for i in range(cfg.num_layers)]
    return names


# --- reading ---------------------------------------------------------------------------------------------------

class HFCheckpointReader:
    """Resolves tensor names to (file, lazy array) across single-file or index-sharded checkpoints."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"model.hf_path: {hf_dir!r} is not a local directory (nothing is downloaded)")
        index = os.path.join(hf_dir, INDEX_FILE)
        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if os.path.isfile(index):
            self._where = {k: self._indexed_file(index, k, v) for k, v in self._read_index(index).items()}
        elif files:
            self._where = {}
            for path in files:
                for k in SafetensorsFile(path).keys():
                    self._where[k] = path
        else:
            pickles = pickle_weights(hf_dir)
            if pickles:
                raise pickle_refused(pickles[0])
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights found")
        self._files: dict[str, SafetensorsFile] = {}

    @staticmethod
    def _read_index(index: str) -> dict:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointFormatError(f"{index}: not a valid safetensors index ({reason})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index}: missing 'weight_map'")
        return weight_map

    def _indexed_file(self, index: str, tensor: str, fname: Any) -> str:
        """The file the index names for `tensor`: a .safetensors file inside the model directory, else refused
        (an index can name a pickle, or a path outside the directory)."""
        if not isinstance(fname, str) or not fname:
            raise CheckpointFormatError(f"{index}: tensor {tensor!r}: bad file name {fname!r}")
        path = os.path.normpath(os.path.join(self.hf_dir, fname))
        root = os.path.normpath(os.path.abspath(self.hf_dir))
        if os.path.isabs(fname) or not os.path.abspath(path).startswith(root + os.sep):
            raise CheckpointFormatError(f"{index}: tensor {tensor!r} points outside the model directory "
                                        f"({fname!r}); refused")
        if fname.endswith(PICKLE_SUFFIXES):
            raise pickle_refused(path)
        if not fname.endswith(".safetensors"):
            raise CheckpointFormatError(f"{path}: unsupported weights file for tensor {tensor!r} (named in {index}); "
                                        "only .safetensors files are read")
        return path

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.hf_dir}: missing tensor {name!r}")
        path = self._where[name]
        if path not in self._files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in the index for tensor {name!r} but missing")
            self._files[path] = SafetensorsFile(path)
        sf = self._files[path]
        if name not in sf.header:
            raise KeyError(f"{path}: missing tensor {name!r} (the index says it is here)")
        return sf.get(name)


def _check_shape(reader: HFCheckpointReader, name: str, raw: np.ndarray, to_hf: Callable,
                 expected: tuple[int, ...]) -> None:
    """Compare in HF's layout so the message names the shape the user sees in the file."""
    want = to_hf(np.broadcast_to(np.float32(0), tuple(expected))).shape
    if tuple(raw.shape) != tuple(want):
        raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, "
                         f"expected {tuple(want)} for this config.json")


def abstract_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> tuple[Any, Any, Any]:
    """(graphdef, abstract state, shardings) without allocating any parameter."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state, state_shardings(state, mesh, rules)


def init_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0, rules=DEFAULT_RULES) -> Transformer:
    """A randomly initialised model whose parameters are created directly in their shards (jit out_shardings)."""
    graphdef, _, shardings = abstract_model(cfg, mesh, rules)

    @jax.jit
    def make():
        return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def load_hf_model(hf_dir: str, mesh: jax.sharding.Mesh, cfg: ModelConfig | None = None, rules=DEFAULT_RULES,
                  progress: bool = False) -> Transformer:
    """Import a local HF directory into a sharded Transformer."""
    cfg = cfg or read_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    graphdef, state, shardings = abstract_model(cfg, mesh, rules)
    expected = set(expected_hf_names(cfg))
    extra = [n for n in reader.names() if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise ValueError(f"{hf_dir}: unexpected tensors for a {cfg.family} model: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''} (wrong architecture or config.json?)")
    layer_map, top_map = _layer_map(cfg), _top_map(cfg)
    flat = dict(nnx.to_flat_state(state))
    shard_flat = dict(nnx.to_flat_state(shardings))
    items = list(flat.items())
    it = items
    if progress:
        it = tqdm(items, desc=f"import {os.path.basename(hf_dir.rstrip('/'))}", unit="param")
    out = {}
    for path, var in it:
        key = path[-1]
        shape, dtype = var.value.shape, var.value.dtype
        sharding = shard_flat[path].value
        if path[0] == "layers":
            template, to_ours, to_hf = layer_map[key]
            sources = []
            for i in range(cfg.num_layers):
                name = template.format(i)
                raw = reader.get(name)
                _check_shape(reader, name, raw, to_hf, shape[1:])
                sources.append((name, raw))

            def cb(idx, sources=sources, to_ours=to_ours, dtype=dtype):
                rows = range(cfg.num_layers)[idx[0]]
                return np.stack([np.asarray(to_ours(sources[i][1])[idx[1:]]).astype(dtype) for i in rows])
        else:
            template, to_ours, to_hf = top_map[key]
            raw = reader.get(template)
            _check_shape(reader, template, raw, to_hf, shape)

            def cb(idx, raw=raw, to_ours=to_ours, dtype=dtype):
                return np.asarray(to_ours(raw)[idx]).astype(dtype)
        out[path] = var.replace(jax.make_array_from_callback(shape, sharding, cb))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


# --- writing ---------------------------------------------------------------------------------------------------

def to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(model: Transformer, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) one at a time, in HF's usual order (embeddings, layers, norm, head)."""
    cfg = model.config
    np_dtype = _NP_DTYPES[dtype]
    layer_map, top_map = _layer_map(cfg), _top_map(cfg)
    stacked = {k: to_host(v) for k, v in model.layers.stacked().items()}
    yield top_map["embed_tokens"][0], np.ascontiguousarray(to_host(model.embed_tokens[...]).astype(np_dtype))
    for i in range(cfg.num_layers):
        for key, (template, _, to_hf) in layer_map.items():
            yield template.format(i), np.ascontiguousarray(to_hf(stacked[key][i]).astype(np_dtype))
    yield top_map["final_norm"][0], np.ascontiguousarray(to_host(model.final_norm[...]).astype(np_dtype))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(to_host(model.lm_head[...]).T.astype(np_dtype))


def is_own_export(directory: str) -> bool:
    """Whether `directory` holds an earlier export of this project and nothing else: no subdirectory, weights
    present, and every `*.safetensors` file marked with EXPORT_MARK in its header. Such a directory is what a
    re-export may replace without being told to (the export stage reruns after an interruption); any other
    non-empty directory (a downloaded model, a run directory, a home directory) is never replaced unasked."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return False
    weights = [e for e in entries if e.endswith(".safetensors")]
    if not weights or any(os.path.isdir(os.path.join(directory, e)) for e in entries):
        return False
    # only files an export writes: a README, notes or eval output a user put beside the weights are not replaced
    written = {"config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES}
    if any(e not in written and not e.endswith(".safetensors") for e in entries):
        return False
    try:
        return all(SafetensorsFile(os.path.join(directory, w)).metadata.get(EXPORT_MARK) for w in weights)
    except ValueError:
        return False


def save_hf_model(model: Transformer, out_dir: str, *, dtype: str = "float32", max_shard_bytes: int = 2 << 30,
                  tokenizer_dir: str | None = None, generation: dict[str, Any] | None = None,
                  progress: bool = False, overwrite: bool = False, src: str | None = None,
                  what: str = "HF export directory", overwrite_hint: str = "pass overwrite=True to replace it",
                  extra: Callable[[str], Any] | None = None) -> str:
    """Export to an HF directory, written as a unit. Only process 0 writes; every process takes part in gathering.

    The directory is checked first (`fileio.check_destination`: not the source `src`, not inside or around it,
    writable, empty unless `overwrite`), then written into a temporary sibling and renamed into place
    (`fileio.atomic_directory`), so a re-export replaces the whole directory: no shard or index of an earlier
    export survives beside the new one (our loader would read a stale index, transformers the new file).
    `extra(tmp_dir)` may add files (e.g. the tokenizer) before the directory is published.
    """

    cfg = model.config
    if dtype not in _NP_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(_NP_DTYPES)}")
    primary = jax.process_index() == 0
    fileio.check_destination(src, out_dir, overwrite, what=what, overwrite_hint=overwrite_hint)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    tensors = iter_hf_tensors(model, dtype)
    if progress and primary:
        tensors = tqdm(tensors, total=len(expected_hf_names(cfg)), desc="export", unit="tensor")
    for name, arr in tensors:
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, arr))
        size += arr.nbytes
    if not primary:
        return out_dir
    total = sum(a.nbytes for s in shards for _, a in s)
    mark = {"format": "pt", EXPORT_MARK: "1"}
    with fileio.atomic_directory(out_dir, overwrite, what=what, overwrite_hint=overwrite_hint) as tmp:
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0], metadata=mark)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, fname), shard, metadata=mark)
                weight_map.update({name: fname for name, _ in shard})
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(to_hf_config(cfg, torch_dtype=dtype), f, indent=2)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
               **(generation or {})}
        gen = {k: (list(v) if isinstance(v, tuple) else v) for k, v in gen.items() if v is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if extra is not None:
            extra(tmp)
    return out_dir


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = os.path.join(src_dir, name)
        if os.path.isfile(p) and os.path.abspath(p) != os.path.abspath(os.path.join(out_dir, name)):
            shutil.copy2(p, os.path.join(out_dir, name))
            copied.append(name)
    return copied
