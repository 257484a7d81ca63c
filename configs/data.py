"""Build the embedded datasets and tokenizer: `python -m raredx_jax.data.build --config=configs/data.py`.

Writes under `data.dir` (default runs/data): TFDS array_record datasets raredx_knowledge (train, validation),
raredx_simulated_cases (train, validation, test; rl with data.rl_notes_per_disease), raredx_imported_cases
(test, when data.phenopackets or data.jsonl_notes is set), the SentencePiece tokenizer (tokenizer/spm.model)
and manifest.json. Rerunning with the same config skips; any change to the data/tokenizer fields or the
generator code rebuilds.
Examples: `--config.data.diseases.n=200`, `--config.data.phenopackets=../shared/data/phenopacket-store-dev.tar.gz`.
"""
from ml_collections import config_dict

from configs import base


def get_config(hardware: str | None = None) -> config_dict.ConfigDict:
    c = base.get_config(hardware)
    c.stage = "data"
    return c
