"""Score a policy and the HPO baseline on the same cases: top-1/3/10 recall and MRR, per set and level."""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Any, Sequence

from raredx_jax.data.case import Case
from raredx_jax.data.hpo import Disease, Ontology
from raredx_jax.data.prompts import diagnosis_messages
from raredx_jax.evaluation.baseline import PhenotypeRanker, phenotype_pool
from raredx_jax.evaluation.hpo_recognition import make_matcher
from raredx_jax.evaluation.metrics import rank_of, summarize
from raredx_jax.rewards.diagnosis import verify


@dataclasses.dataclass
class CaseResult:
    case_id: str
    level: str
    source: str
    llm_rank: int | None
    llm_format_ok: bool
    llm_ids: list[str | None]
    baseline_rank: int | None
    baseline_input: str  # "hpo" (structured terms) or "text" (dictionary-matched)
    completion_tokens: int = 0
    finish_reason: str = ""  # stop | length | too_long (prompt over budget: scored as a miss)


class Baseline:
    """Phrank ranking over the candidate set, from a case's HPO terms or from terms matched in its text."""

    def __init__(self, ontology: Ontology, candidates: Sequence[Disease], recogniser: str = "dictionary"):
        self.ranker = PhenotypeRanker(ontology, candidates)
        self.matcher = make_matcher(recogniser, ontology, phenotype_pool(ontology, candidates))

    def rank(self, case: Case, top: int = 10) -> tuple[int | None, str]:
        if case.present_hpo and case.source != "jsonl":
            present, absent, how = list(case.present_hpo), list(case.absent_hpo), "hpo"
        else:
            (present, absent), how = self.matcher.match(case.text), "text"
        ranked = [d for d, _ in self.ranker.rank(present, absent, top=top)]
        return rank_of(ranked, case.diagnosis), how


def evaluate_llm(model: Any, tokenizer: Any, cases: Sequence[Case], linker: Any, config: Any,
                 mesh: Any = None, progress: bool = True, top_k: int = 10) -> list[tuple]:
    """Greedy decode one differential per case and verify it: [(rank, format_ok, ids, ntokens, finish)]."""
    from raredx_jax.sampling.sampler import SamplingParams  # noqa: PLC0415 - heavy: JAX+Flax ~1.2 s, LLM arm only
    from raredx_jax.sampling.text import generate_text  # noqa: PLC0415 - heavy: JAX+Flax ~1.2 s, LLM arm only

    params = dataclasses.replace(SamplingParams.from_config(config.sampling), temperature=0.0,
                                 max_prompt_len=int(config.eval.get("max_prompt_len", 1024)))
    messages = [diagnosis_messages(c.text) for c in cases]
    # A note longer than the prompt budget is scored as a miss and counted, never silently dropped.
    fits = [len(tokenizer.encode_chat(m, add_generation_prompt=True)) <= params.max_prompt_len for m in messages]
    if not all(fits):
        print(f"[eval] {fits.count(False)} of {len(cases)} notes exceed eval.max_prompt_len="
              f"{params.max_prompt_len} tokens: scored as misses (raise it to include them)", flush=True)
    outs = iter(generate_text(model, tokenizer, [m for m, ok in zip(messages, fits) if ok], n=1, params=params,
                              seed=config.seed, mesh=mesh, progress=progress, desc="eval"))
    results = []
    for case, ok in zip(cases, fits):
        if not ok:
            results.append((None, False, [], 0, "too_long"))
            continue
        comp = next(outs)[0]
        v = verify(comp.text, case.diagnosis, linker, top_k=top_k)
        results.append((v.rank, v.format_ok, list(v.linked), len(comp.token_ids), comp.finish_reason))
    return results


def score_cases(cases: Sequence[Case], llm: Sequence[tuple] | None, baseline: Baseline) -> list[CaseResult]:
    out = []
    for i, case in enumerate(cases):
        b_rank, how = baseline.rank(case)
        l_rank, fmt, ids, ntok, finish = llm[i] if llm is not None else (None, False, [], 0, "")
        out.append(CaseResult(case.id, case.level, case.source, l_rank, fmt, ids, b_rank, how, ntok, finish))
    return out


def aggregate(results: Sequence[CaseResult], ks: Sequence[int] = (1, 3, 10)) -> dict[str, Any]:
    """Overall and per-level metrics for the LLM and the baseline."""
    by_level: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_level[r.level].append(r)

    def block(rs: Sequence[CaseResult]) -> dict[str, Any]:
        return {"llm": summarize([r.llm_rank for r in rs], ks),
                "baseline": summarize([r.baseline_rank for r in rs], ks),
                "format_ok": sum(r.llm_format_ok for r in rs) / max(len(rs), 1),
                "too_long": sum(r.finish_reason == "too_long" for r in rs),
                "n": len(rs)}

    return {"overall": block(results), "per_level": {k: block(v) for k, v in sorted(by_level.items())}}


def run_evaluation(model: Any, tokenizer: Any, case_sets: Sequence[Any], ontology: Ontology,
                   candidates: Sequence[Disease], linker: Any, config: Any, mesh: Any = None,
                   progress: bool = True) -> dict[str, Any]:
    baseline = Baseline(ontology, candidates, config.eval.get("hpo_recogniser", "dictionary"))
    report: dict[str, Any] = {"sets": {}, "n_candidates": len(candidates)}
    for cs in case_sets:
        t0 = time.time()
        llm = evaluate_llm(model, tokenizer, cs.cases, linker, config, mesh, progress) if model is not None \
            and cs.cases else None
        results = score_cases(cs.cases, llm, baseline)
        agg = aggregate(results)
        agg.update(n_outside_candidates=cs.n_outside_candidates, n_import_errors=cs.n_import_errors,
                   import_report=cs.report, seconds=round(time.time() - t0, 1),
                   cases=[dataclasses.asdict(r) for r in results])
        report["sets"][cs.name] = agg
        o = agg["overall"]
        print(f"[eval] {cs.name}: n={o['n']} LLM top1={o['llm']['top1']:.3f} top10={o['llm']['top10']:.3f} | "
              f"baseline top1={o['baseline']['top1']:.3f} top10={o['baseline']['top10']:.3f}", flush=True)
    return report
