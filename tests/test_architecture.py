"""Guards of the package's shape (issue 19): no module reaches into a sibling's private names, the stage drivers
stay thin over training/loop.py, and one settings helper reads every stage's section."""
from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

from raredx_jax.training import grpo, sft
from raredx_jax.training.settings import from_section
from raredx_jax.training.sft_settings import SFTSettings

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "raredx_jax"


def _private_uses(path: pathlib.Path) -> list[str]:
    """`from raredx_jax.x import _name` and `alias._name` where alias is an imported raredx_jax module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raredx_jax"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
                modules.add(a.asname or a.name)  # may be a module (from raredx_jax.training import sft)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("raredx_jax"):
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another():
    bad = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(path)]
    assert not bad, "private names used across modules (make them public or move them): " + "; ".join(bad)


def test_the_checker_sees_a_private_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from raredx_jax.training.sft import _x\nfrom raredx_jax.checkpoints import hf_io\nhf_io._y()\n")
    assert len(_private_uses(f)) == 2


@pytest.mark.parametrize("driver", [sft.run_sft, grpo.run_grpo])
def test_stage_drivers_fit_on_a_screen(driver):
    """The drivers only wire a stage's parts into the Trainer (loop.py); the parts live in their own classes."""
    src = inspect.getsource(driver)
    assert "Trainer(" in src
    assert len(src.splitlines()) <= 40, f"{driver.__qualname__} has {len(src.splitlines())} lines"


def test_sft_settings_name_the_datasets_the_pipeline_builds():
    """sft_settings keeps its own list of train.dataset values (configs/base.py reads it without importing the data
    pipeline): it must stay the pipeline's."""
    from raredx_jax.data.pipeline import DATASETS as PIPELINE_DATASETS
    from raredx_jax.training.sft_settings import DATASETS

    assert tuple(PIPELINE_DATASETS) == DATASETS


def test_settings_refuse_unknown_fields_and_wrong_types():
    assert from_section(SFTSettings, {"steps": 7, "pack": False}, "train").steps == 7
    with pytest.raises(ValueError, match=r"config\.train\.stepz: unknown field"):
        from_section(SFTSettings, {"stepz": 7}, "train")
    with pytest.raises(ValueError, match=r"config\.train\.steps='many': expected int"):
        from_section(SFTSettings, {"steps": "many"}, "train")
    with pytest.raises(ValueError, match=r"train\.steps must be positive"):
        from_section(SFTSettings, {"steps": 0}, "train")
