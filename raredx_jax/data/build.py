"""Builds every embedded dataset and the SentencePiece tokenizer: `python -m raredx_jax.data.build --config=...`.

Steps: select diseases -> knowledge corpus (train + held-out phrasings) -> simulated notes (train / validation /
test, each drawn with its own seed for every disease) -> imported real cases (if configured) -> SentencePiece
tokenizer trained on the training text -> TFDS array_record datasets under `data.dir` -> `manifest.json`.

Idempotent: the manifest records a hash of everything the output depends on (the data + tokenizer config
fields, the generator source code, the HPO asset, the imported input files). A rerun with the same hash
skips; any difference rebuilds from scratch (the previous outputs of this builder are removed first; RERS
datasets and other files in data.dir are left alone). The manifest is written last, so an interrupted or
failed build reruns.
Other stages call `build_all(config)` in-process (on one process; others wait for it).

Failures: a disease the note simulator cannot write a note for without naming it (`simulate.UnrenderableError`)
is left out of every dataset and listed in `skipped_diseases.json` / `.md` (a console line gives the count);
the build goes on. As a program, bad input or configuration ends with one line on stderr
(`data.build: error: <file>: record <record>: field <field>: <why>` for a bad imported record) and exit status 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import flags, logging

from raredx_jax.data import prompts
from raredx_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

# The trainers import this module (RL_SPLIT, run_diseases, build_all); TFDS and hpo3, which the accelerator image
# lacks (benchmarks/accelerator_check.py), load inside the functions that build data.

MANIFEST = "manifest.json"
SKIPPED_DISEASES = "skipped_diseases"  # .json + .md: diseases left out because no note could be rendered
BUILD_FORMAT = 1  # bump when the on-disk layout written here changes
SPLITS = ("train", "validation", "test")
# Fresh training notes that only GRPO reads (`data.rl_notes_per_disease`): RERS and SFT never saw them, so the
# policy still gets some wrong and the groups carry a learning signal; never drawn from validation or test.
RL_SPLIT = "rl"
_SOURCE_MODULES = ("hpo", "case", "knowledge", "simulate", "importers", "prompts", "tokenizer", "tfds_builders",
                   "build")

Log = Callable[[str], None]


def _log_stdout(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


# --- what the output depends on --------------------------------------------------------------------------------
def _relevant_config(config: Any) -> dict[str, Any]:
    data = config.data.to_dict()
    data.pop("dir", None)  # where it goes is not what it is
    tok = {k: config.tokenizer[k] for k in ("vocab_size", "model_type") if k in config.tokenizer}
    return {"data": data, "tokenizer": tok}


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _input_fingerprint(path_str: str) -> str:
    """Content hash of an input file, or of every file under an input folder (names + bytes)."""
    if not path_str:
        return ""
    p = Path(path_str)
    if not p.exists():
        raise FileNotFoundError(f"data input {p} does not exist (check data.phenopackets / data.jsonl_notes)")
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        _file_digest(f, h)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """Hash of everything the built data depends on (config fields, generator code, shipped assets, inputs)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    h.update(json.dumps({"format": BUILD_FORMAT, "config": _relevant_config(config)}, sort_keys=True,
                        default=str).encode())
    for name in _SOURCE_MODULES:
        f = here / f"{name}.py"
        if f.is_file():
            h.update(name.encode())
            _file_digest(f, h)
    assets = here.parent / "assets" / "hpo"
    if assets.is_dir():
        for f in sorted(assets.iterdir()):
            if f.is_file():
                _file_digest(f, h)
    for field in ("phenopackets", "jsonl_notes"):
        h.update(_input_fingerprint(config.data.get(field, "")).encode())
    return h.hexdigest()


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(data_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn manifest means an unfinished build: rebuild


def _outputs_exist(data_dir: Path, manifest: dict[str, Any]) -> bool:
    from raredx_jax.data import tfds_builders as tb  # noqa: PLC0415 - TFDS (see top)

    tok = data_dir / manifest.get("tokenizer", {}).get("path", "tokenizer/spm.model")
    return tok.is_file() and all(tb.dataset_dir(name, data_dir).is_dir() for name in manifest.get("datasets", {}))


# --- generation steps -------------------------------------------------------------------------------------------
def _split_seed(base_seed: int, what: str, split: str) -> int:
    """A stable seed per (dataset, split): splits draw different notes/phrasings of the same diseases."""
    digest = hashlib.sha256(f"{base_seed}|{what}|{split}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _levels(config: Any) -> tuple[str, ...]:
    raw = config.data.get("levels", "")
    if isinstance(raw, (list, tuple)):
        names = tuple(str(x).strip() for x in raw if str(x).strip())
    else:
        names = tuple(x.strip() for x in str(raw).split(",") if x.strip())
    return names


def build_knowledge(diseases: Sequence[Any], ontology: Any, config: Any, log: Log,
                    unrenderable: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Training passages plus a validation split of *other* phrasings of the same facts (exact repeats removed).

    With `unrenderable` (a dict), a disease whose worked cases cannot be rendered is added to it (id -> why) and
    left out; the diseases that had it among their neighbours (contrast passages, differentials) are generated
    again against the smaller set, so the result equals a build that never selected it (a disease's records
    depend only on the seed, the disease and its neighbours), without a second pass over every disease."""
    from raredx_jax.data.knowledge import disease_neighbours, knowledge_records  # noqa: PLC0415 - hpo3 (see top)

    on_unrenderable = None
    if unrenderable is not None:
        def on_unrenderable(d: Any, e: Exception) -> None:
            unrenderable.setdefault(d.id, str(e))

    seed = int(config.data.seed)
    style = config.data.get("knowledge_exemplar_style", "note")
    n_val = int(config.data.get("knowledge_eval_passages_per_disease", 0))

    def make(ds: Sequence[Any], ctx: Sequence[Any]) -> tuple[list[dict], list[dict]]:
        train = knowledge_records(ds, ontology, seed=_split_seed(seed, "knowledge", "train"),
                                  passages_per_disease=int(config.data.knowledge_passages_per_disease),
                                  exemplars_per_disease=int(config.data.get("knowledge_exemplars_per_disease", 3)),
                                  exemplar_style=style,
                                  reflection_exemplars_per_disease=int(
                                      config.data.get("knowledge_reflection_exemplars_per_disease", 0)),
                                  on_unrenderable=on_unrenderable, ctx_diseases=ctx)
        val = knowledge_records(ds, ontology, seed=_split_seed(seed, "knowledge", "validation"),
                                passages_per_disease=n_val, exemplar_style=style,
                                on_unrenderable=on_unrenderable, ctx_diseases=ctx) if n_val > 0 else []
        return train, val

    def splice(old: list[dict], kept: Sequence[Any], new: list[dict], redone: set[str]) -> list[dict]:
        by_d: dict[str, list[dict]] = {}
        for r in old:
            if r["disease_id"] not in redone:
                by_d.setdefault(r["disease_id"], []).append(r)
        for r in new:
            by_d.setdefault(r["disease_id"], []).append(r)
        return [r for d in kept for r in by_d.get(d.id, [])]  # records grouped per disease, in disease order

    kept = list(diseases)
    train, val = make(kept, kept)
    while unrenderable and any(d.id in unrenderable for d in kept):
        smaller = [d for d in kept if d.id not in unrenderable]
        before, after = disease_neighbours(kept), disease_neighbours(smaller)
        affected = [d for d in smaller if before[d.id] != after[d.id]]
        t2, v2 = make(affected, smaller)
        redone = {d.id for d in affected}
        train, val = splice(train, smaller, t2, redone), splice(val, smaller, v2, redone)
        kept = smaller
    out = {"train": list(train)}
    if n_val > 0:
        seen = {_record_key(r) for r in train}
        held_out = [r for r in val if _record_key(r) not in seen]
        if len(held_out) < len(val):
            log(f"knowledge: dropped {len(val) - len(held_out)} validation items identical to training items")
        if held_out:
            out["validation"] = held_out
    return out


def run_diseases(config: Any) -> tuple[list[Any], Any]:
    """(the run's disease subset, the ontology): the ids in the data build's manifest (what the corpus and the
    cases were generated from), else `config.data.diseases`; trimmed to the core findings the data used
    (`data.diseases.max_phenotypes`), so probes and rewards see the diseases the model was trained on."""
    from raredx_jax.data.hpo import load_ontology, select_diseases  # noqa: PLC0415 - hpo3 (see top)

    ontology = load_ontology()
    manifest = read_manifest(config.data.dir) if config.data.get("dir") else None
    ids = (manifest or {}).get("diseases") or []
    spec = config.data.diseases.to_dict()
    if ids:  # the built set, in the build's order, trimmed by the same select_diseases rule
        spec.update(kind="ids", ids=",".join(ids))
    return select_diseases(ontology, spec), ontology


def _record_key(r: dict) -> str:
    return json.dumps([r.get("prompt", ""), r.get("completion", "")], sort_keys=True, ensure_ascii=False)


def build_simulated(diseases: Sequence[Any], ontology: Any, config: Any, log: Log,
                    unrenderable: dict[str, str] | None = None,
                    generated: dict[str, dict[str, list[Any]]] | None = None) -> dict[str, list[Any]]:
    """Notes for every disease in every split, each split with its own seed; a note never repeats an earlier
    split's verbatim (train, validation, test, then the GRPO-only `rl` split), and case ids are unique across
    splits.

    With `unrenderable` (a dict), a disease the simulator cannot write a note for in some split is added to it
    (id -> why) and left out of every split; the notes of the others are exactly those of a build without it
    (a note depends only on (seed, disease, index), and de-duplication runs over the kept diseases only).
    `generated` (split -> disease id -> notes) caches the notes across calls with fewer diseases."""
    from raredx_jax.data import simulate  # noqa: PLC0415 - hpo3 (see top)

    seed = int(config.data.seed)
    levels = _levels(config) or tuple(simulate.LEVELS)
    for lv in levels:
        if lv not in simulate.LEVELS:
            raise ValueError(f"data.levels: unknown difficulty level {lv!r}; known: {', '.join(simulate.LEVELS)}")
    counts = {"train": int(config.data.notes_per_disease)}
    n_eval = int(config.data.get("eval_notes_per_disease", 0))
    if n_eval > 0:  # the test split may be larger (powered paired comparisons) and drawn with its own seed
        counts.update(validation=n_eval, test=int(config.data.get("test_notes_per_disease", 0)) or n_eval)
    test_seed = int(config.data.get("test_seed", -1))
    n_rl = int(config.data.get("rl_notes_per_disease", 0))
    if n_rl > 0:  # last, so it is de-duplicated against every other split and changes none of them
        counts[RL_SPLIT] = n_rl
    generated = {} if generated is None else generated
    for split, n in counts.items():
        per = generated.setdefault(split, {})
        for d in diseases:
            if d.id in per:
                continue
            try:
                per[d.id] = simulate.simulate_cases(
                    [d], ontology, n_per_disease=n, levels=levels,
                    seed=_split_seed(test_seed if split == "test" and test_seed >= 0 else seed, "cases", split))
            except simulate.UnrenderableError as e:
                if unrenderable is None:
                    raise
                unrenderable.setdefault(d.id, str(e))
                per[d.id] = []
    out: dict[str, list[Any]] = {}
    seen_text: set[str] = set()
    seen_ids: set[str] = set()
    skip = set(unrenderable or ())
    diseases = [d for d in diseases if d.id not in skip]
    for split, n in counts.items():
        cases = [c for d in diseases for c in generated[split][d.id]]
        kept = []
        for case in cases:
            if case.text in seen_text:
                continue
            if case.id in seen_ids:
                case = dataclasses.replace(case, id=f"{split}/{case.id}")
            seen_text.add(case.text)
            seen_ids.add(case.id)
            kept.append(case)
        if len(kept) < len(cases):
            log(f"cases/{split}: dropped {len(cases) - len(kept)} notes identical to an earlier split's")
        missing = {d.id for d in diseases} - {dx for c in kept for dx in c.diagnosis}
        if missing:
            raise RuntimeError(f"cases/{split}: no note for {len(missing)} diseases (e.g. {sorted(missing)[:3]}); "
                               "raise data.notes_per_disease / data.eval_notes_per_disease")
        out[split] = kept
    return out


def build_imported(ontology: Any, config: Any, log: Log) -> Any | None:
    """Real cases from data.phenopackets / data.jsonl_notes (`importers.load_cases`), or None if none is set.

    With data.on_error=raise the first bad record stops the build (the error names file, record and field);
    with skip, every skipped record is kept in the returned ImportResult for the report.
    """
    paths = [config.data.get(f, "") for f in ("phenopackets", "jsonl_notes")]
    paths = [p for p in paths if p]
    if not paths:
        return None
    on_error = config.data.on_error
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    from raredx_jax.data import importers  # noqa: PLC0415 - hpo3 (see top)

    result = importers.load_cases(paths, ontology, on_error=on_error)
    log(f"imported cases from {', '.join(paths)}: {result.summary()}")
    return result


def tokenizer_texts(knowledge: dict[str, list[dict]], cases: dict[str, list[Any]]) -> list[str]:
    """Training text of the tokenizer: knowledge items, training notes, and the prompt templates they meet."""
    texts: list[str] = []
    for r in knowledge.get("train", []):
        texts.extend(m["content"] for m in (r.get("prompt") or []))
        texts.append(r["completion"])
    train_cases = cases.get("train", [])
    texts.extend(c.text for c in train_cases)
    # The fixed instructions appear in every prompt: let them become few tokens.
    names = sorted({c.diagnosis_name for c in train_cases})
    for i, c in enumerate(train_cases[:: max(1, len(train_cases) // 50)]):
        texts.extend(m["content"] for m in prompts.diagnosis_messages(c.text))
        if len(names) >= 2:
            candidates = [names[(i + k) % len(names)] for k in range(min(5, len(names)))]
            texts.extend(m["content"] for m in prompts.closed_set_messages(c.text, candidates))
        texts.append(prompts.format_completion("reasoning", names[:3]))
    return texts


# --- orchestration ----------------------------------------------------------------------------------------------
def build_all(config: Any, *, force: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Builds (or verifies) everything under `config.data.dir`; returns the manifest (+ "skipped": bool)."""
    from raredx_jax.data import tfds_builders as tb  # noqa: PLC0415 - TFDS (see top)
    from raredx_jax.data.hpo import load_ontology, select_diseases  # noqa: PLC0415 - hpo3 (see top)

    log = log or _log_stdout
    data_dir = Path(config.data.dir)
    digest = config_hash(config)
    old = read_manifest(data_dir)
    if not force and old and old.get("config_hash") == digest and _outputs_exist(data_dir, old):
        log(f"up to date: {data_dir} (config hash {digest[:12]}); nothing to do")
        return {**old, "skipped": True}

    t0 = time.time()
    if old or (data_dir / MANIFEST).exists():
        log(f"config or code changed since the last build in {data_dir}: rebuilding")
    _clear_outputs(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    ontology = load_ontology()
    diseases = select_diseases(ontology, config.data.diseases)
    if not diseases:
        raise ValueError("data.diseases selected no disease; check data.diseases.kind / n / ids / min_phenotypes")
    log(f"selected {len(diseases)} diseases (data.diseases.kind={config.data.diseases.kind}) "
        f"[{time.time() - t0:.1f}s]")

    # real cases first: with data.on_error=raise a bad record ends the build before minutes of generation
    imported_result = build_imported(ontology, config, log)
    imported = imported_result.cases if imported_result is not None else []

    unrenderable: dict[str, str] = {}
    generated: dict[str, dict[str, list[Any]]] = {}
    cases = build_simulated(diseases, ontology, config, log, unrenderable, generated)
    n_sim = len(unrenderable)
    knowledge = build_knowledge([d for d in diseases if d.id not in unrenderable], ontology, config, log,
                                unrenderable)
    diseases = [d for d in diseases if d.id not in unrenderable]
    if len(unrenderable) > n_sim:  # the knowledge step left more out: the notes again without them (cached)
        cases = build_simulated(diseases, ontology, config, log, unrenderable, generated)
    if unrenderable:
        report = _write_skipped_diseases(data_dir, unrenderable, ontology)
        log(f"left out {len(unrenderable)} diseases the note simulator cannot render without naming them "
            f"(report: {report})")
    if not diseases:
        raise ValueError("data.diseases: no selected disease can be rendered as a note; see "
                         f"{data_dir / (SKIPPED_DISEASES + '.md')}")
    log("knowledge: " + ", ".join(f"{k} {len(v)}" for k, v in knowledge.items()) + f" items [{time.time() - t0:.1f}s]")
    log("simulated notes: " + ", ".join(f"{k} {len(v)}" for k, v in cases.items()) + f" [{time.time() - t0:.1f}s]")
    if imported_result is not None:
        from raredx_jax.data import importers  # noqa: PLC0415 - hpo3 (see top)

        importers.write_report(imported_result, data_dir / "import_report.json")
        report = importers.write_report(imported_result, data_dir / "import_report.md")
        log(f"import report ({imported_result.n_skipped} skipped records, each with file/record/field/why): {report}")

    vocab = int(config.tokenizer.vocab_size)
    model_type = config.tokenizer.get("model_type", "bpe")
    spm_path = train_sentencepiece(tokenizer_texts(knowledge, cases), data_dir / "tokenizer" / "spm",
                                   vocab_size=vocab, seed=int(config.data.seed), model_type=model_type)

    spm_vocab = SentencePieceTokenizer(spm_path).vocab_size
    log(f"tokenizer: {model_type} SentencePiece, {spm_vocab} pieces (asked {vocab}) -> {spm_path} "
        f"[{time.time() - t0:.1f}s]")

    datasets: dict[str, dict[str, int]] = {}
    for name, splits in (("raredx_knowledge", knowledge), ("raredx_simulated_cases", cases),
                         ("raredx_imported_cases", {"test": imported} if imported else {})):
        if not splits:
            continue
        tb.prepare(name, data_dir, splits, overwrite=True)
        datasets[name] = {k: len(v) for k, v in splits.items()}
        counts = ", ".join(f"{k} {n}" for k, n in datasets[name].items())
        log(f"wrote {name}: {counts} [{time.time() - t0:.1f}s]")

    manifest = {
        "format": BUILD_FORMAT,
        "config_hash": digest,
        "config": _relevant_config(config),
        "diseases": [d.id for d in diseases],
        "datasets": datasets,
        "tokenizer": {"path": "tokenizer/spm.model", "vocab_size": spm_vocab, "model_type": model_type},
        "imported": ({"seen": imported_result.n_seen, "imported": len(imported_result.cases),
                      "skipped": imported_result.n_skipped} if imported_result is not None else None),
        "skipped_diseases": sorted(unrenderable),
        "seconds": round(time.time() - t0, 2),
    }
    tmp = data_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, data_dir / MANIFEST)
    log(f"done in {manifest['seconds']}s -> {data_dir}")
    return {**manifest, "skipped": False}


def _clear_outputs(data_dir: Path) -> None:
    """Removes only what this builder writes (never other files a user keeps in data.dir)."""
    from raredx_jax.data import tfds_builders as tb  # noqa: PLC0415 - TFDS (see top)

    (data_dir / MANIFEST).unlink(missing_ok=True)
    for name in tb.BUILDERS:
        if name == "raredx_rers_trajectories":
            continue  # written by the RERS stage, not by this build
        shutil.rmtree(tb.dataset_dir(name, data_dir), ignore_errors=True)
    shutil.rmtree(data_dir / "tokenizer", ignore_errors=True)
    for name in ("import_report.json", "import_report.md", SKIPPED_DISEASES + ".json", SKIPPED_DISEASES + ".md"):
        (data_dir / name).unlink(missing_ok=True)


def _write_skipped_diseases(data_dir: Path, unrenderable: dict[str, str], ontology: Any) -> Path:
    """skipped_diseases.json + .md: each disease left out and why (messages name ids and words, never notes)."""
    def name(did: str) -> str:
        try:
            return ontology.disease(did).name
        except KeyError:
            return ""

    items = [{"id": d, "name": name(d), "why": why} for d, why in sorted(unrenderable.items())]
    (data_dir / (SKIPPED_DISEASES + ".json")).write_text(
        json.dumps({"n_skipped": len(items), "skipped": items}, indent=2) + "\n", encoding="utf-8")
    lines = ["# Diseases left out of the build", "",
             f"{len(items)} selected diseases had no note the simulator could write without giving the diagnosis "
             "away; they are in no dataset (knowledge, simulated cases) and not in manifest.json's disease list.",
             "", "| id | name | why |", "|---|---|---|"]
    lines += [f"| {i['id']} | {i['name'].replace('|', '/')} | {i['why'].replace('|', '/')} |" for i in items]
    md = data_dir / (SKIPPED_DISEASES + ".md")
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md


# --- CLI --------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> None:
    del argv
    try:
        config = flags.FLAGS.config
    except OSError as e:  # config_flags reports a config file it could not load only when it is read
        sys.exit(error_line(ValueError(f"bad configuration: {e}")))
    if config is None:
        raise SystemExit("--config is required, e.g. --config=configs/data.py")
    import tensorflow_datasets as tfds  # noqa: PLC0415 - TFDS (see top)

    logging.set_verbosity(logging.WARNING)  # TFDS logs every shard at INFO; our own lines report progress
    if not sys.stdout.isatty():
        tfds.display_progress_bar(False)  # no carriage-return bars in piped logs
    try:
        build_all(config, force=flags.FLAGS.force)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        sys.exit(error_line(e))


def error_line(e: BaseException) -> int:
    """Print `data.build: error: <message>` as one line on stderr; returns 2 (bad input or configuration).

    Bad imported records read `<file>: record <record>: field <field>: <why>` (importers.ImportIssue)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split()) or type(e).__name__
    print(f"data.build: error: {msg}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/data.py", lock_config=True)
    flags.DEFINE_bool("force", False, "Rebuild even if the manifest says the data are up to date.")

    def _parse(argv: list[str]) -> list[str]:
        """absl's parser, but an unknown or mistyped config field is one line and exit 2, not a traceback."""
        try:
            return flags.FLAGS(argv)
        except AttributeError as e:  # ml_collections: an override names a field the config does not have
            sys.exit(error_line(ValueError(f"bad configuration: unknown config field {str(e).strip(chr(34))}")))
        except (flags.Error, KeyError, TypeError, ValueError, OSError) as e:
            sys.exit(error_line(ValueError(f"bad configuration: {e.args[0] if e.args else e}")))

    app.run(main, flags_parser=_parse)
