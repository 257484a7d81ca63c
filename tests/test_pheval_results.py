"""`evaluate --format=pheval`: per-case disease result files in PhEval 0.7.14's format (columns, Arrow types,
file naming, PhEval's ranking of ties, gold diseases not returned appended at rank 0), for the baseline and the
LLM, beside the cases as valid phenopackets.

PhEval itself is not installed in CI (it pins pyarrow<20, below what tensorflow-datasets here runs with, and pulls
oaklib); the columns are checked against the pinned version's, whose source files `pheval_results` names. README
("Benchmark it with PhEval") records the one-off check of these files against PhEval's own post-processing."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from google.protobuf import json_format
from phenopackets import Phenopacket
from test_data_importers import good_packet

from raredx_jax.evaluation import pheval_results as pr

# PhEval 0.7.14, pheval/post_processing/post_processing.py, _write_disease_result:
#   ranked_results.select(["rank", "score", "disease_identifier", "mondo_identifier", "true_positive"])
# with rank cast to pl.Int64 (PhenopacketTruthSet.merge_disease_results), score pl.Float64 and disease_identifier
# pl.String (validate_result_format.py, DISEASE_RESULT_SCHEMA), mondo_identifier pl.String, true_positive a boolean
# (polars' String is Arrow large_string in the file: what PhEval's own output carries)
PINNED = [("rank", "int64"), ("score", "double"), ("disease_identifier", "large_string"),
          ("mondo_identifier", "large_string"), ("true_positive", "bool")]


def _read(path) -> tuple[list[tuple[str, str]], dict]:
    table = pq.read_table(path)
    return [(f.name, str(f.type)) for f in table.schema], table.to_pydict()


def test_pinned_columns_and_naming():
    assert pr.PHEVAL_VERSION == "0.7.14"
    assert list(pr.DISEASE_RESULT_COLUMNS) == PINNED
    assert pr.disease_result_file("pp-0123456789abcdef") == "pp-0123456789abcdef-disease_result.parquet"
    assert pr.RESULTS_DIR == "pheval_disease_results"


def test_ranks_ties_as_pheval_does_and_appends_missed_gold(tmp_path):
    # polars rank(method="max", descending=True): tied scores share the worse rank
    assert pr.pheval_ranks([3.0, 2.0, 2.0, 1.0]) == [1, 3, 3, 4]
    assert pr.pheval_ranks([]) == []
    cols = pr.disease_result_rows([("OMIM:2", 2.0), ("OMIM:1", 5.0), ("OMIM:3", 2.0)], gold=("OMIM:3", "OMIM:9"))
    path = pr.write_disease_result(cols, tmp_path / "x" / pr.disease_result_file("c1"))
    schema, data = _read(path)
    assert schema == PINNED
    assert data == {"rank": [1, 3, 3, 0], "score": [5.0, 2.0, 2.0, 0.0],
                    "disease_identifier": ["OMIM:1", "OMIM:2", "OMIM:3", "OMIM:9"],
                    "mondo_identifier": ["OMIM:1", "OMIM:2", "OMIM:3", "OMIM:9"],
                    "true_positive": [False, False, True, True]}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temporary left


def test_llm_ranking_becomes_scores_by_position():
    # an unlinked entry (None) keeps its position; a repeated disease counts once, at its first position
    assert pr.scores_from_ranking(["OMIM:1", None, "OMIM:2", "OMIM:1"]) == [("OMIM:1", 1.0), ("OMIM:2", 1 / 3)]
    cols = pr.disease_result_rows(pr.scores_from_ranking(["OMIM:1", None, "OMIM:2"]), gold=("OMIM:2",))
    assert cols["rank"] == [1, 2] and cols["true_positive"] == [False, True]  # PhEval's rank of a list of 2


def test_evaluate_format_pheval_baseline_and_llm_files(tmp_path, capsys):
    from configs import evaluate as eval_config
    from raredx_jax.data.hpo import load_ontology
    from raredx_jax.evaluate import candidate_diseases, evaluate_checkpoint
    from raredx_jax.evaluation.runner import Baseline

    folder = tmp_path / "packets"
    folder.mkdir()
    for k in range(3):
        p = good_packet(pid=f"PMID_1_P{k}")
        p["phenotypicFeatures"] = p["phenotypicFeatures"][k:]
        (folder / f"PMID_1_P{k}.json").write_text(json.dumps(p))
    c = eval_config.get_config("cpu")
    c.data.diseases.kind, c.data.diseases.ids = "ids", "OMIM:154700,OMIM:260660,OMIM:101200"
    out = tmp_path / "eval_out"
    with pytest.raises(ValueError, match="--format must be one of"):
        evaluate_checkpoint(c, "", [str(folder)], str(out), progress=False, fmt="tsv")
    report = evaluate_checkpoint(c, "", [str(folder)], str(out), progress=False, fmt="pheval")
    assert "[eval] wrote PhEval disease results under" in capsys.readouterr().out
    (name,) = report["sets"]
    (base,) = (out / "pheval").iterdir()  # one folder per case set
    cases = {r["case_id"]: r for r in report["sets"][name]["cases"]}
    assert len(cases) == 3
    assert not (base / "raredx_llm").exists()  # no checkpoint: no LLM results, never empty files
    for cid, r in cases.items():
        packet = json.loads((base / "phenopackets" / f"{cid}.json").read_text())
        json_format.ParseDict(packet, Phenopacket())  # the truth set is valid against the official schema
        schema, data = _read(base / "raredx_baseline" / "pheval_disease_results" / pr.disease_result_file(cid))
        assert schema == PINNED
        assert len(data["rank"]) == 3 and data["rank"] == sorted(data["rank"])  # 3 candidates, best first
        # the gold's rank in the file is eval.json's baseline rank (PhEval's tie rule agrees here: no tied scores)
        gold_rank = data["rank"][data["true_positive"].index(True)]
        assert len(set(data["score"])) == 3 and gold_rank == r["baseline_rank"]

    # the LLM's files from a report that scored a model: built here from eval.json's own fields
    ontology = load_ontology()
    from raredx_jax.data.linking import DiseaseLinker
    from raredx_jax.evaluation.cases import load_case_set

    cands = candidate_diseases(c, ontology)
    cs = load_case_set(str(folder), c.data.dir, ontology, DiseaseLinker(cands), cands, report_dir=str(tmp_path))
    first = cs.cases[0].id
    for r in report["sets"][name]["cases"]:
        r["llm_ids"] = ["OMIM:260660", None, "OMIM:154700"] if r["case_id"] == first else ["OMIM:101200"]
        r["finish_reason"] = "stop"
    pr.write_pheval_results(report, [cs], Baseline(ontology, cands), str(tmp_path / "again"), ontology)
    llm_dir = next((tmp_path / "again" / "pheval").iterdir()) / "raredx_llm" / "pheval_disease_results"
    _, data = _read(llm_dir / pr.disease_result_file(first))
    assert data["disease_identifier"] == ["OMIM:260660", "OMIM:154700"] and data["rank"] == [1, 2]
    assert data["true_positive"] == [False, True]
    other = next(cid for cid in cases if cid != first)
    _, data = _read(llm_dir / pr.disease_result_file(other))
    assert data["disease_identifier"] == ["OMIM:101200", "OMIM:154700"] and data["rank"] == [1, 0]  # missed gold


def test_unsafe_case_ids_get_hashed_stems():
    assert pr.safe_stem("pp-0123456789abcdef") == "pp-0123456789abcdef"
    for bad in ("../../etc/passwd", "a b", "x.json", ""):
        stem = pr.safe_stem(bad)
        assert stem.startswith("case-") and "/" not in stem and stem != pr.safe_stem(bad + "!")
