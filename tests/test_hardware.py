"""Hardware targets (configs/hardware/*.py) compose with the base and every stage config."""
import importlib.util
import sys
from pathlib import Path

import pytest

from raredx_jax import hardware

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import base  # noqa: E402

TARGETS = ["cpu", "gpu1", "h100x8", "tpu_v5p_128", "tpu_v6e_256"]
# Fields a hardware target owns; a stage must not undo them (the model/mesh shape is the hardware's call).
OWNED = ["mesh.data", "mesh.fsdp", "mesh.tensor", "model.dtype", "model.param_dtype", "model.remat",
         "model.attention", "distributed.initialize"]


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def _stage_files():
    out = []
    for path in sorted((REPO / "configs").glob("*.py")):
        if path.stem in ("base", "__init__") or "def get_config" not in path.read_text():
            continue
        out.append(path)
    return out


def _load_stage(path: Path):
    spec = importlib.util.spec_from_file_location(f"raredx_stage_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_known_targets_are_shipped():
    assert hardware.known_targets() == TARGETS


@pytest.mark.parametrize("name", TARGETS)
def test_target_applies_to_base(name):
    c = base.get_config(name)
    assert c.hardware == name
    accelerator = name != "cpu"
    assert c.model.dtype == ("bfloat16" if accelerator else "float32")
    assert c.model.param_dtype == "float32"
    assert c.model.attention == {"cpu": "xla", "gpu1": "dot_product", "h100x8": "dot_product"}.get(name, "splash")
    assert c.model.remat in ("none", "full", "dots")
    assert c.distributed.initialize in ("auto", "on", "off")
    assert c.train.seq_len <= c.model.max_seq_len
    assert c.sampling.max_prompt_len + c.sampling.max_new_tokens <= c.model.max_seq_len
    # the full target's devices: the mesh resolves exactly and the global batches split over data x fsdp
    n = hardware.load_target(name).NUM_DEVICES or 8
    sizes = hardware.resolve_mesh_shape(c.mesh, n)
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == n
    hardware.check_batch_sizes(c, n)


def test_default_is_cpu_and_aliases_normalise():
    assert base.get_config().hardware == "cpu"
    assert base.get_config("TPU-v5p-128").hardware == "tpu_v5p_128"


def test_realistic_slices():
    v5p, v6e, h100 = (base.get_config(n) for n in ("tpu_v5p_128", "tpu_v6e_256", "h100x8"))
    assert hardware.resolve_mesh_shape(v5p.mesh, 64) == {"data": 1, "fsdp": 64, "tensor": 1}
    assert hardware.resolve_mesh_shape(v6e.mesh, 256) == {"data": 1, "fsdp": 256, "tensor": 1}
    # h100x8: FSDP over the host's 8 GPUs, one data-parallel replica per host
    assert hardware.resolve_mesh_shape(h100.mesh, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert hardware.resolve_mesh_shape(h100.mesh, 32) == {"data": 4, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="does not divide 12"):
        hardware.resolve_mesh_shape(h100.mesh, 12)
    h100.train.batch_size = 36
    with pytest.raises(ValueError, match="train.batch_size=36"):
        hardware.check_batch_sizes(h100, 8)


@pytest.mark.parametrize("mesh, n, expected", [
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 1, "fsdp": 4, "tensor": 2}, 8, {"data": 1, "fsdp": 4, "tensor": 2}),
    ({"data": -1, "fsdp": 1, "tensor": 1}, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
])
def test_mesh_product_semantics(mesh, n, expected):
    assert hardware.resolve_mesh_shape(mesh, n) == expected


@pytest.mark.parametrize("mesh, n, message", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "at most one mesh axis may be -1"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, 8, "mesh.data=0"),
    ({"data": 1, "fsdp": 4, "tensor": 1}, 8, "has 4 devices but 8 are available"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, 8, "does not divide 8"),
])
def test_mesh_errors_name_the_field(mesh, n, message):
    with pytest.raises(ValueError, match=message):
        hardware.resolve_mesh_shape(mesh, n)


def test_unknown_target_lists_known_names():
    with pytest.raises(ValueError) as e:
        base.get_config("h100x9")
    msg = str(e.value)
    assert "unknown hardware target 'h100x9'" in msg and "Did you mean 'h100x8'?" in msg
    for name in TARGETS:
        assert name in msg


def test_custom_target_file(tmp_path):
    path = tmp_path / "my_cluster.py"
    path.write_text("def apply(c):\n    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 4, 2\n")
    c = base.get_config(str(path))
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.hardware) == (-1, 4, 2, str(path))
    (tmp_path / "bad.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="must define apply"):
        base.get_config(str(tmp_path / "bad.py"))
    with pytest.raises(ValueError, match="does not exist"):
        base.get_config(str(tmp_path / "missing.py"))


@pytest.mark.parametrize("stage", _stage_files(), ids=lambda p: p.stem)
@pytest.mark.parametrize("name", TARGETS)
def test_target_composes_with_stage(stage, name):
    """`--config=configs/<stage>.py:<name>`: ml_collections passes `name` to the stage's get_config."""
    c = _load_stage(stage).get_config(name)
    ref = base.get_config(name)
    assert c.hardware == name
    for field in OWNED:
        assert _get(c, field) == _get(ref, field), f"configs/{stage.name} overrides {field} set by {name}"


def test_config_flags_syntax():
    """The real command-line path: absl config_flags with `path:hardware`."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={REPO / 'configs' / 'base.py'}:tpu_v6e_256", "--config.train.batch_size=1024"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.hardware == "tpu_v6e_256"
    assert fv.config.model.attention == "splash" and fv.config.train.batch_size == 1024
