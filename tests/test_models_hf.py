"""The Flax model, HF import/export and the conversion CLI against real transformers (PyTorch CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import FAMILIES, hf_logits, left_padded_batch, save_hf_model
from ml_collections import ConfigDict

from raredx_jax.checkpoints import hf_io
from raredx_jax.checkpoints.safetensors_io import SafetensorsFile
from raredx_jax.parallel.mesh import make_mesh, single_device_mesh
from raredx_jax.parallel.sharding import logical_to_spec

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    model = save_hf_model(request.param, path)
    return request.param, path, model


def _ours(model, tokens, mask, positions):
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(logits)


def test_logits_match_transformers_left_padded(family_dir):
    family, path, hf = family_dir
    model = hf_io.load_hf_model(path, single_device_mesh())
    assert model.config.family == family
    tokens, mask, positions = left_padded_batch()
    ours, ref = _ours(model, tokens, mask, positions), hf_logits(hf, tokens, mask, positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= TOL


def test_packed_equals_separate(family_dir):
    _, path, _ = family_dir
    model = hf_io.load_hf_model(path, single_device_mesh())
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 128, 9), rng.integers(3, 128, 5)
    packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 9 + [2] * 5 + [0, 0]], np.int32)
    pos = np.array([list(range(9)) + list(range(5)) + [0, 0]], np.int32)
    out = _ours(model, packed, seg, pos)[0]
    for seq, sl in ((a, slice(0, 9)), (b, slice(9, 14))):
        alone = _ours(model, seq[None].astype(np.int32), np.ones((1, len(seq)), np.int32),
                      np.arange(len(seq))[None].astype(np.int32))[0]
        assert np.abs(out[sl] - alone).max() <= TOL


def test_export_loads_in_transformers_with_same_logits(family_dir, tmp_path):
    _, path, hf = family_dir
    model = hf_io.load_hf_model(path, single_device_mesh())
    out = hf_io.save_hf_model(model, str(tmp_path / "export"), max_shard_bytes=40_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))  # small shards -> index
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    tokens, mask, positions = left_padded_batch(seed=3)
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask, positions)[real],
                               hf_logits(hf, tokens, mask, positions)[real], atol=1e-5)


def test_import_export_byte_identical(family_dir, tmp_path):
    _, path, _ = family_dir
    model = hf_io.load_hf_model(path, single_device_mesh())
    out = hf_io.save_hf_model(model, str(tmp_path / "export"))
    src, dst = SafetensorsFile(os.path.join(path, "model.safetensors")), SafetensorsFile(
        os.path.join(out, "model.safetensors"))
    names = set(src.keys()) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert names == set(dst.keys())
    for name in names:
        assert src.get(name).tobytes() == dst.get(name).tobytes(), name


def test_sharded_forward_and_param_shardings(family_dir):
    _, path, _ = family_dir
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    sharded = hf_io.load_hf_model(path, mesh)
    single = hf_io.load_hf_model(path, single_device_mesh())
    tokens, mask, positions = left_padded_batch(lengths=(12, 7, 3, 10))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, t, p, s: m(t, p, s)[0])(sharded, jnp.asarray(tokens), jnp.asarray(positions),
                                                         jnp.asarray(mask))
    real = mask.astype(bool)
    assert np.abs(np.asarray(out)[real] - _ours(single, tokens, mask, positions)[real]).max() <= TOL
    from flax import nnx
    for path_, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        arr = var.get_value()
        want = logical_to_spec(var.get_metadata()["axes"], arr.shape, mesh)
        assert arr.sharding.spec == want, path_
    q = sharded.layers.q_proj.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_cli_round_trip_hf_orbax_hf(family_dir, tmp_path):
    _, path, _ = family_dir
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    ck, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    for args in (["--to=orbax", f"--src={path}", f"--dst={ck}"], ["--to=hf", f"--src={ck}", f"--dst={back}"]):
        r = subprocess.run([sys.executable, "-m", "raredx_jax.checkpoints.convert", *args], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "[convert] wrote" in r.stdout
    src, dst = SafetensorsFile(os.path.join(path, "model.safetensors")), SafetensorsFile(
        os.path.join(back, "model.safetensors"))
    for name in dst.keys():
        assert src.get(name).tobytes() == dst.get(name).tobytes(), name
    assert json.load(open(os.path.join(back, "config.json")))["model_type"] == family_dir[0]


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_bad"))
    save_hf_model("qwen2", path)
    return path


def _rewrite(src_dir, dst_dir, edit_tensors=None, edit_config=None):
    from raredx_jax.checkpoints.safetensors_io import write_safetensors
    os.makedirs(dst_dir, exist_ok=True)
    f = SafetensorsFile(os.path.join(src_dir, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    write_safetensors(os.path.join(dst_dir, "model.safetensors"), tensors.items())
    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    if edit_config:
        edit_config(cfg)
    json.dump(cfg, open(os.path.join(dst_dir, "config.json"), "w"))
    return dst_dir


def test_missing_tensor_named(qwen2_dir, tmp_path):
    d = _rewrite(qwen2_dir, str(tmp_path / "m"), edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_io.load_hf_model(d, single_device_mesh())


def test_wrong_shape_named(qwen2_dir, tmp_path):
    def bad(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    d = _rewrite(qwen2_dir, str(tmp_path / "s"), edit_tensors=bad)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                         r"has shape \(8, 64\), expected \(32, 64\)"):
        hf_io.load_hf_model(d, single_device_mesh())


def test_unknown_architecture_named(qwen2_dir, tmp_path):
    d = _rewrite(qwen2_dir, str(tmp_path / "a"), edit_config=lambda c: c.update(model_type="gpt_neox",
                                                                                   architectures=["GPTNeoXForCausalLM"]))
    with pytest.raises(ValueError, match=r"config\.json: unknown architecture model_type='gpt_neox'"):
        hf_io.load_hf_model(d, single_device_mesh())


def test_pickle_checkpoint_refused(tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    json.dump({"model_type": "qwen2"}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: pickle-based checkpoint refused"):
        hf_io.HFCheckpointReader(str(d))


def test_unknown_config_field_rejected_by_cli(tmp_path):
    r = subprocess.run([sys.executable, "-c", (
        "import sys; from absl import app, flags; from ml_collections import config_flags;"
        "C = config_flags.DEFINE_config_file('config');"
        "app.run(lambda a: print(C.value.model.preset))"), "--config=configs/base.py", "--config.model.presett=x"],
        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0 and "presett" in r.stderr


def test_config_validation_names_field():
    from configs.base import get_config
    from raredx_jax.models.config import PRESETS, ModelConfig, model_config_from
    with pytest.raises(ValueError, match=r"model\.num_kv_heads"):
        ModelConfig(**{**PRESETS["tiny"], "num_kv_heads": 3})
    c = get_config()
    c.model.preset = "qwen9"
    with pytest.raises(ValueError, match=r"model\.preset: unknown preset 'qwen9'"):
        model_config_from(c)
    c.model.attention = "flash9"
    c.model.preset = "tiny"
    with pytest.raises(ValueError, match=r"model\.attention"):
        model_config_from(c)
