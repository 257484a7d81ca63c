"""The PhEval runner's prepare / run / post_process on a small phenopacket folder, offline and without PhEval
installed (CI does not carry PhEval: see test_pheval_results.py); the plugin is registered under PhEval's
``pheval.plugins`` entry point. README ("Benchmark it with PhEval") records the one-off run under `pheval run`."""
from __future__ import annotations

import ast
import json
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_data_importers import good_packet

from raredx_jax.data.hpo import load_ontology
from raredx_jax.evaluation import pheval_results as pr
from raredx_jax.pheval import steps

CANDIDATES = "OMIM:154700,OMIM:260660,OMIM:101200"


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


def _corpus(root: Path) -> Path:
    """PhEval's corpus layout: <corpus>/phenopackets/*.json; three good packets, one the schema refuses and one
    valid packet the importer refuses (nothing observed to describe)."""
    d = root / "corpus" / "phenopackets"
    d.mkdir(parents=True)
    for k in range(3):
        p = good_packet(pid=f"PMID_1_P{k}")
        p["phenotypicFeatures"] = p["phenotypicFeatures"][k:]
        (d / f"PMID_1_P{k}.json").write_text(json.dumps(p))
    bad = good_packet(pid="PMID_1_P9")
    bad["subject"]["sex"] = "F"
    (d / "PMID_1_P9.json").write_text(json.dumps(bad))
    empty = good_packet(pid="PMID_1_P8")
    for f in empty["phenotypicFeatures"]:
        f["excluded"] = True
    (d / "PMID_1_P8.json").write_text(json.dumps(empty))
    return d.parent


def test_three_steps_offline_on_a_phenopacket_folder(ontology, tmp_path):
    corpus = _corpus(tmp_path)
    tool_in, raw, out = tmp_path / "out" / "tool_input_commands", tmp_path / "out" / "raw_results", tmp_path / "out"
    counts = steps.prepare(corpus, tool_in, ontology)
    assert counts == {"n_phenopackets": 5, "n_cases": 3, "n_skipped": 2}
    report = json.loads((tool_in / steps.REPORT_FILE).read_text())
    assert [(s["record"], s["field"]) for s in report["skipped"]] == [("PMID_1_P8.json", "phenotypicFeatures"),
                                                                      ("PMID_1_P9.json", "subject.sex")]
    prepared = steps.read_prepared(tool_in)
    assert [s for s, _ in prepared] == ["PMID_1_P0", "PMID_1_P1", "PMID_1_P2"]
    assert all("FBN1" not in c.text and "Marfan" not in c.text for _, c in prepared)  # leak-safe notes

    opts = steps.Options.from_dict({"candidates": CANDIDATES})
    assert steps.run(tool_in, raw, ontology, opts) == 3
    first = steps.read_raw_result(raw / "PMID_1_P0.tsv")
    assert [d for d, _ in first][0] == "OMIM:154700" and len(first) == 3  # the baseline ranks Marfan first

    assert steps.post_process(raw, out, corpus, tool_in, use_pheval=False) == 3
    files = sorted((out / "pheval_disease_results").iterdir())
    # PhEval's naming; as PhEval does, a valid packet without a result is its gold at rank 0 (a counted miss); the
    # packet the schema refuses has no truth to write (PhEval itself could not read it)
    assert [f.name for f in files] == [pr.disease_result_file(f"PMID_1_P{k}") for k in (0, 1, 2, 8)]
    missed = pq.read_table(files[-1]).to_pydict()
    assert missed["rank"] == [0] and missed["disease_identifier"] == ["OMIM:154700"]
    assert missed["true_positive"] == [True]
    for f in files[:3]:
        table = pq.read_table(f)
        assert [(x.name, str(x.type)) for x in table.schema] == list(pr.DISEASE_RESULT_COLUMNS)
        data = table.to_pydict()
        assert data["true_positive"].count(True) == 1 and data["rank"][data["true_positive"].index(True)] >= 1


def test_options_and_raw_results_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['checkpont'\]"):
        steps.Options.from_dict({"checkpont": "runs/x"})
    assert steps.Options.from_dict(None) == steps.Options()
    bad = tmp_path / "c.tsv"
    bad.write_text("disease_identifier\tscore\nOMIM:1\thigh\n")
    with pytest.raises(ValueError, match=r"c.tsv: row 2: field score: not a number"):
        steps.read_raw_result(bad)
    with pytest.raises(FileNotFoundError, match="no phenopacket"):
        steps.prepare(tmp_path, tmp_path / "in", None)


def test_registered_under_phevals_plugin_entry_point():
    """setup.py's entry point, as installed (CI installs the package with pip -e), names the runner class."""
    eps = {e.name: e.value for e in entry_points(group="pheval.plugins")}
    assert eps.get("raredxphevalrunner") == "raredx_jax.pheval.runner:RaredxPhEvalRunner"
    # the class is there and implements PhEval's three abstract steps (imported by PhEval, which CI lacks)
    tree = ast.parse(Path(steps.__file__).with_name("runner.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RaredxPhEvalRunner"]
    assert [b.id for b in cls.bases] == ["PhEvalRunner"]
    assert {"prepare", "run", "post_process"} <= {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
