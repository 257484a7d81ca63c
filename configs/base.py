"""Base config shared by every stage: one ConfigDict for every scale (maxtext style).

Stage configs (`configs/<stage>.py`) call `make_config(hardware, stage_fn)`: defaults, then the stage's
settings, then the hardware target. Every field can be
overridden on the command line, e.g. `--config.model.preset=qwen2.5-0.5b --config.mesh.fsdp=-1`.
A hardware target composes with any stage: `--config=configs/sft.py:h100x8` (see configs/hardware/).
"""
from typing import Callable

from ml_collections import config_dict

from raredx_jax.hardware import apply_hardware
from raredx_jax.rewards.combined import rewards_config
from raredx_jax.training.curriculum import curriculum_config
from raredx_jax.training.grpo.settings import GRPOSettings
from raredx_jax.training.optim import OptimizerSettings
from raredx_jax.training.rers_settings import RersSettings
from raredx_jax.training.settings import config_section
from raredx_jax.training.sft_settings import ProbeSettings, SFTSettings


def make_config(hardware: str | None, stage: Callable[[config_dict.ConfigDict], None] | None = None
                ) -> config_dict.ConfigDict:
    """Defaults, then the stage's settings, then the hardware target (which owns mesh, dtypes and, on
    accelerators, the batch scale), so `configs/<stage>.py:<target>` composes in one fixed order."""
    c = defaults(hardware)
    if stage is not None:
        stage(c)
    apply_hardware(c, c.hardware)  # configs/hardware/<name>.py: mesh, dtypes, remat, attention, batch sizes
    return c


def get_config(hardware: str | None = None) -> config_dict.ConfigDict:
    return make_config(hardware)


def defaults(hardware: str | None = None) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.stage = "knowledge_sft"  # knowledge_sft | sft | rers | grpo | evaluate | export | pipeline
    c.run_dir = "runs/default"  # holds resolved config, metrics, checkpoints, datasets of this run
    c.seed = 0
    c.hardware = hardware or "cpu"

    # --- model -------------------------------------------------------------------------------
    c.model = config_dict.ConfigDict()
    c.model.preset = "tiny"  # tiny | qwen2.5-0.5b | qwen2.5-7b | llama3.1-8b | qwen3-8b | hf
    c.model.hf_path = ""  # local HF directory (config.json + safetensors); implies preset=hf
    c.model.init_from = ""  # orbax checkpoint dir of an earlier stage to start from ("" = fresh / hf_path)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = "none"  # none | full | dots (jax.checkpoint policy per decoder layer)
    c.model.scan_layers = True  # lax.scan over the stacked layers (fast compile) vs unrolled loop
    c.model.attention = "xla"  # xla (reference) | dot_product (jax.nn, cuDNN on GPU) | splash (TPU Pallas)
    c.model.vocab_size = 0  # 0 = from tokenizer (tiny preset) / preset / HF config
    c.model.max_seq_len = 1024

    # --- mesh / distributed --------------------------------------------------------------------
    c.mesh = config_dict.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1 = all remaining devices
    c.mesh.tensor = 1
    c.distributed = config_dict.ConfigDict()
    c.distributed.initialize = "auto"  # auto (env / TPU / SLURM) | on | off
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    # --- tokenizer -----------------------------------------------------------------------------
    c.tokenizer = config_dict.ConfigDict()
    c.tokenizer.kind = "sentencepiece"  # sentencepiece (trained on the embedded corpus) | hf
    c.tokenizer.path = ""  # "" = <data.dir>/tokenizer/spm.model (sentencepiece) or model.hf_path (hf)
    c.tokenizer.vocab_size = 2048  # when training the SentencePiece model
    c.tokenizer.model_type = "bpe"  # bpe | unigram (SentencePiece training)

    # --- data ----------------------------------------------------------------------------------
    c.data = config_dict.ConfigDict()
    c.data.dir = "runs/data"  # TFDS data_dir of the built datasets
    c.data.diseases = config_dict.ConfigDict()
    c.data.diseases.kind = "random"  # all | random | ids
    c.data.diseases.n = 16  # the embedded default: 16 diseases (chance top-1 6.25%), 12 core findings each
    c.data.diseases.seed = 0
    c.data.diseases.ids = ""  # comma separated ontology ids when kind=ids
    c.data.diseases.min_phenotypes = 8  # only diseases with at least this many annotated phenotypes
    c.data.diseases.max_phenotypes = 12  # > 0: train/simulate on each disease's k most frequent findings; 0 = all
    c.data.notes_per_disease = 12
    c.data.rl_notes_per_disease = 0  # > 0: an `rl` split of fresh notes only GRPO trains on (grpo.train_split)
    c.data.knowledge_passages_per_disease = 12
    c.data.knowledge_exemplars_per_disease = 10  # worked "case -> <think>/<answer>" items per disease
    c.data.knowledge_exemplar_style = "note"  # note (simulator-rendered case, own seed) | vignette (one line)
    c.data.knowledge_reflection_exemplars_per_disease = 4  # worked RERS reflections (note + failed try + label)
    c.data.phenopackets = ""  # folder or .tar.gz of GA4GH phenopackets; "" = none
    c.data.jsonl_notes = ""  # JSONL {"id","text","diagnosis"} file; "" = none
    c.data.on_error = "raise"  # raise | skip (skip writes a report of every skipped record)
    c.data.seed = 0  # generation seed (knowledge phrasings, notes); each split derives its own from it
    c.data.eval_notes_per_disease = 5  # per disease in validation and in test (levels cycle: 5 = one of each)
    c.data.test_notes_per_disease = 0  # > 0: the test split's size instead (0 = eval_notes_per_disease)
    c.data.test_seed = -1  # >= 0: the test split's own generation seed (a fresh test set); -1 = data.seed
    c.data.knowledge_eval_passages_per_disease = 3  # held-out phrasings per disease (knowledge validation)
    c.data.levels = ""  # comma-separated simulator difficulty levels; "" = every level simulate.py defines

    # --- training (the SFT stages: data, steps, optimiser, cadences; raredx_jax/training/sft_settings.py) ------
    c.train = config_section(SFTSettings)
    c.optim = config_section(OptimizerSettings)  # AdamW + schedule, read by SFT and GRPO (training/optim.py)
    c.probe = config_section(ProbeSettings)  # the knowledge probe after knowledge SFT (off: n = 0)

    # --- LoRA / QLoRA (raredx_jax/lora.py): adapters on chosen projections, frozen base ------------
    c.lora = config_dict.ConfigDict()
    c.lora.enabled = False  # off: every stage trains all parameters (the default pipeline)
    c.lora.rank = 8
    c.lora.alpha = 16.0  # the adapter's output is scaled by alpha / rank (as PEFT and qwix)
    c.lora.dropout = 0.0  # dropout on the adapter's input during training only
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated projections
    c.lora.quantize = "none"  # QLoRA base weights: none | int8 | nf4 (qwix; nf4 in blocks of lora.block_size)
    c.lora.block_size = 64  # nf4 block along each projection's input axis
    c.lora.adapter_dir = ""  # export of a LoRA run: the PEFT adapter's directory ("" = <export.hf_dir>_peft)

    # --- sampling ------------------------------------------------------------------------------
    c.sampling = config_dict.ConfigDict()
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0
    c.sampling.top_p = 1.0
    c.sampling.max_new_tokens = 160
    c.sampling.max_prompt_len = 768  # longer notes are reported (eval scores them as misses)
    c.sampling.batch_size = 32  # prompts per generate call (continuous: prompts decoding at once)
    c.sampling.continuous = True  # many-prompt jobs refill a prompt's decode slots as soon as it stops

    # --- RERS ----------------------------------------------------------------------------------
    c.rers = config_section(RersSettings)  # every field documented in raredx_jax/training/rers_settings.py

    # --- GRPO + curriculum ---------------------------------------------------------------------
    c.grpo = config_section(GRPOSettings)  # every field documented in raredx_jax/training/grpo/settings.py
    c.curriculum = curriculum_config()  # dual-level: lessons (task:level) + case pass-rate buckets
    c.rewards = rewards_config()  # weights of diagnosis / format / length rewards, leak check for RERS

    # --- evaluation / export -------------------------------------------------------------------
    c.eval = config_dict.ConfigDict()
    c.eval.top_k = (1, 3, 10)
    c.eval.checkpoint = ""  # "" = the latest checkpoint of run_dir
    c.eval.cases = "simulated:test"  # comma-separated: simulated:<split>, imported:<split>, folder/.tar.gz, .jsonl
    c.eval.out_dir = ""  # "" = <run_dir>/eval
    c.eval.candidates = "trained"  # trained (= data.diseases) | all annotated diseases
    c.eval.max_cases = 0  # 0 = all
    c.eval.max_prompt_len = 1024  # tokens; longer notes are scored as misses and counted
    c.eval.hpo_recogniser = "dictionary"  # text -> HPO for the baseline: dictionary | fasthpocr (README's table)
    c.export = config_dict.ConfigDict()
    c.export.hf_dir = ""  # "" = <run_dir>/hf
    c.export.dtype = "float32"  # tensor dtype written: float32 | bfloat16 | float16
    c.export.verify = True  # reload with transformers and compare logits (needs the [torch] extra)
    c.export.overwrite = False  # replace a non-empty export.hf_dir that is not an earlier export of this project

    return c
