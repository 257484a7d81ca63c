"""Test setup: 8 host CPU devices for real meshes, no network, deterministic XLA on CPU."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# --- shared fixtures and helpers (tests import the helpers with `from conftest import ...`) -------------------


@pytest.fixture(scope="module")
def onto():
    """The ontology: the real hpo3 data plus the shipped extras."""
    from raredx_jax.data.hpo import load_ontology

    return load_ontology()


@pytest.fixture(scope="module")
def diseases(onto):
    """40 random diseases (seed 0) with at least 8 annotated findings."""
    from raredx_jax.data.hpo import select_diseases

    return select_diseases(onto, dict(kind="random", n=40, seed=0, ids="", min_phenotypes=8))


TINY_DATA = dict(notes_per_disease=2, eval_notes_per_disease=0, knowledge_passages_per_disease=6,
                 knowledge_eval_passages_per_disease=2)


def tiny_data_config(data_dir, c=None, *, diseases: int = 6, **data):
    """`c` (default: configs/base.py on cpu) set to build tiny datasets with `raredx_jax.data.build` into
    data_dir: `diseases` diseases, TINY_DATA notes and passages per disease (any `data.<field>=value` in `data`
    instead), a 600-piece tokenizer."""
    if c is None:
        from configs.base import get_config

        c = get_config("cpu")
    c.data.dir = str(data_dir)
    c.data.diseases.n = diseases
    c.data.update({**TINY_DATA, **data})
    c.tokenizer.vocab_size = 600
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny embedded corpus of tiny_data_config(), one folder per session shared by the modules that use it
    (test_sft, test_train_resume): the build skips when it is already there."""
    from raredx_jax.data.build import build_all

    d = tmp_path_factory.getbasetemp() / "sft_tiny_data"
    build_all(tiny_data_config(d), log=lambda m: None)
    return str(d)

