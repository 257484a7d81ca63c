"""Sampler benchmark: decode tokens/s of our jit generate vs transformers `generate`, same shape, same script.

    python -m benchmarks.sampler                 # full sweep: tiny + qwen2.5-0.5b, batch 1/16/64, prompt 256, 256 new
    python -m benchmarks.sampler --quick         # CPU-sized sweep (see QUICK below)
    python -m benchmarks.sampler --presets=tiny --batches=1,16 --n=4 --new-tokens=128

Both models are random-initialised with the preset's shape (ours via `init_model`, HF via `from_config`), in
bfloat16 on an accelerator and float32 on CPU. Sampling: temperature 1, no top-k/top-p, no EOS (every row
generates exactly `new_tokens`; HF gets `min_new_tokens=new_tokens`). Each figure is the median of `--repeats`
warm calls (compile / first call excluded; the spread min-max is printed beside it), timed end to end, and
warm calls with 1 new token time the prefill:

    decode tokens/s = rows * (new_tokens - 1) / (t_generate - t_prefill)      (rows = batch * n)
    end-to-end tokens/s = rows * new_tokens / t_generate

On GPU/TPU it also prints the HBM-roofline fraction of our decode: (bytes of weights + bytes of the KV cache
that a step must read, at the mean filled length prompt + new/2) / decode step time / peak bandwidth of the
device (table below). Our decode actually reads the whole preallocated cache (prompt + new slots) each step;
the roofline uses the minimum, so it is the honest bound.

`--skewed` adds the length-skewed workload of many-prompt jobs (RERS, evaluation): `--skewed-prompts` prompts
of mixed lengths (16 to `--prompt-len` tokens), n samples each, with stop ids that end completions anywhere
from the first token to `--new-tokens`, through `generate_text` once with static batches of `--skewed-batch`
prompts and once continuously batched (`sampling.continuous`); same keys, so the same completions (checked).
tokens/s = generated tokens / wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "--cpu-time" in sys.argv:  # before jax is imported: XLA:CPU on one thread, so CPU time = the work done
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

from raredx_jax.checkpoints.hf_io import init_model
from raredx_jax.models.config import PRESETS, ModelConfig, to_hf_config
from raredx_jax.parallel.mesh import single_device_mesh
from raredx_jax.sampling import Sampler, SamplingParams, generate_text

# Peak HBM bandwidth in bytes/s by `device_kind` substring (first match wins; checked lower-case).
PEAK_BANDWIDTH = (
    ("h200", 4.8e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h800", 3.35e12), ("gh200", 4.0e12),
    ("b200", 8.0e12), ("a100-sxm4-80gb", 2.039e12), ("a100 80gb", 1.935e12), ("a100", 1.555e12),
    ("l40s", 0.864e12), ("l4", 0.3e12), ("a10g", 0.6e12), ("v100", 0.9e12),
    ("tpu v6", 1.64e12), ("tpu v5p", 2.765e12), ("tpu v5 lite", 0.819e12), ("tpu v5e", 0.819e12),
    ("tpu v5", 2.765e12), ("tpu v4", 1.2e12),
)
QUICK = dict(runs=(("tiny", (1, 16), 256), ("qwen2.5-0.5b", (1,), 32)))


def peak_bandwidth(device: jax.Device) -> float | None:
    kind = device.device_kind.lower()
    for key, bw in PEAK_BANDWIDTH:
        if key in kind:
            return bw
    return None


@dataclasses.dataclass
class Result:
    preset: str
    batch: int
    n: int
    prompt: int
    new_tokens: int
    dtype: str
    ours_decode_tok_s: float
    ours_e2e_tok_s: float
    ours_prefill_s: float
    ours_generate_s: float
    ours_decode_spread: tuple[float, float] = (0.0, 0.0)
    hf_decode_spread: tuple[float, float] | None = None
    hf_decode_tok_s: float | None = None
    hf_e2e_tok_s: float | None = None
    hf_prefill_s: float | None = None
    hf_generate_s: float | None = None
    roofline_fraction: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if not self.hf_decode_tok_s else self.ours_decode_tok_s / self.hf_decode_tok_s


def _model_config(preset: str, dtype: str):
    return ModelConfig(**PRESETS[preset], dtype=dtype, param_dtype=dtype)


def _prompts(batch: int, prompt: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (batch, prompt)).astype(np.int32)


_clock = time.perf_counter  # --cpu-time: time.process_time


def _timed(run, repeats: int) -> list[float]:
    run(0)  # compile / warm up
    times = []
    for r in range(repeats):
        t = _clock()
        run(r + 1)
        times.append(_clock() - t)
    return times


def bench_ours(model, tokens: np.ndarray, n: int, new_tokens: int, repeats: int = 3) -> tuple[list[float], list[float]]:
    """(t_generate per repeat, t_prefill per repeat) in seconds, warm."""
    sampler = Sampler(model)
    mask = np.ones_like(tokens)
    out = []
    for new in (new_tokens, 1):
        params = SamplingParams(temperature=1.0, max_new_tokens=new)

        def run(seed: int) -> None:
            toks = sampler.generate(tokens, mask, seed, params, n=n, eos_ids=()).tokens.block_until_ready()
            assert toks.shape == (tokens.shape[0] * n, new)
        out.append(_timed(run, repeats))
    sampler.release()
    return out[0], out[1]


def bench_hf(cfg, tokens: np.ndarray, n: int, new_tokens: int, dtype: str,
             repeats: int = 3) -> tuple[list[float], list[float]]:
    import torch  # noqa: PLC0415 - optional: torch, the PyTorch side only
    import transformers  # noqa: PLC0415 - optional: torch, the PyTorch side only

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in to_hf_config(cfg).items()
                                                  if k not in ("architectures", "dtype")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype] if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=tdtype).to(device).eval()
    ids = torch.as_tensor(np.repeat(tokens, n, 0), dtype=torch.long, device=device)
    attn = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def runner(new: int):
        def run(_: int) -> None:
            sync()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            sync()
            assert out.shape[1] == ids.shape[1] + new
        return run

    t_gen, t_pre = _timed(runner(new_tokens), repeats), _timed(runner(1), repeats)
    model = None  # drop the weights before the next benchmark (the closures above share this cell)
    return t_gen, t_pre


def _decode_rates(rows: int, new_tokens: int, t_gen: list[float], t_pre: list[float]) -> list[float]:
    """Decode tokens/s per repeat: each generate time less the median prefill time."""
    pre = float(np.median(t_pre))
    return [rows * (new_tokens - 1) / max(t - pre, 1e-9) for t in t_gen]


def run_one(preset: str, batch: int, n: int, prompt: int, new_tokens: int, hf: bool, repeats: int = 3) -> Result:
    on_accel = jax.default_backend() != "cpu"
    dtype = "bfloat16" if on_accel else "float32"
    cfg = _model_config(preset, dtype)
    model = init_model(cfg, single_device_mesh(), seed=0)
    tokens = _prompts(batch, prompt, cfg.vocab_size)
    rows = batch * n
    t_gen, t_pre = bench_ours(model, tokens, n, new_tokens, repeats)
    rates = _decode_rates(rows, new_tokens, t_gen, t_pre)
    decode_s = rows * (new_tokens - 1) / float(np.median(rates))
    res = Result(preset, batch, n, prompt, new_tokens, dtype,
                 ours_decode_tok_s=float(np.median(rates)), ours_e2e_tok_s=rows * new_tokens / float(np.median(t_gen)),
                 ours_prefill_s=float(np.median(t_pre)), ours_generate_s=float(np.median(t_gen)),
                 ours_decode_spread=(min(rates), max(rates)))
    peak = peak_bandwidth(jax.devices()[0]) if on_accel else None
    if peak and new_tokens > 1:
        itemsize = jnp.dtype(dtype).itemsize
        # bytes a decode step must read: the weights, each prompt's keys/values once (shared by its n samples)
        # and each row's own generated keys/values (at the mean filled length new/2)
        kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
        step_bytes = cfg.num_params() * itemsize + kv_tok * (batch * prompt + rows * new_tokens / 2)
        res.roofline_fraction = step_bytes / (decode_s / (new_tokens - 1)) / peak
    del model
    if hf:
        h_gen, h_pre = bench_hf(cfg, tokens, n, new_tokens, dtype, repeats)
        h_rates = _decode_rates(rows, new_tokens, h_gen, h_pre)
        res.hf_generate_s, res.hf_prefill_s = float(np.median(h_gen)), float(np.median(h_pre))
        res.hf_decode_tok_s = float(np.median(h_rates))
        res.hf_decode_spread = (min(h_rates), max(h_rates))
        res.hf_e2e_tok_s = rows * new_tokens / float(np.median(h_gen))
    return res


class _IdTokenizer:
    """Messages whose content already is token ids: lets the skewed workload go through `generate_text`."""

    pad_id, eos_id = 0, 1

    def __init__(self, stop_ids: tuple[int, ...]):
        self.stop_ids = stop_ids

    def encode_chat(self, messages, add_generation_prompt=True):
        return list(messages[0]["content"])

    def encode(self, text):
        return []

    def decode(self, ids):
        return ""


@dataclasses.dataclass
class SkewedResult:
    preset: str
    prompts: int
    n: int
    batch: int
    new_tokens: int
    generated_tokens: int
    mean_length: float
    static_s: list[float]
    continuous_s: list[float]

    @property
    def speedup(self) -> float:
        return float(np.median(self.static_s) / np.median(self.continuous_s))


def run_skewed(preset: str, prompts: int, n: int, batch: int, max_prompt: int, new_tokens: int,
               repeats: int = 3, stop_every: int = 40) -> SkewedResult:
    """Static vs continuous batching on prompts of mixed lengths whose completions stop early and late: a
    random ~1/stop_every of the vocabulary are stop ids, so lengths are geometric (mean ~stop_every) and capped."""
    dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    cfg = _model_config(preset, dtype)
    model = init_model(cfg, single_device_mesh(), seed=0)
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, max_prompt + 1, prompts)
    msgs = [[{"role": "user", "content": rng.integers(3, cfg.vocab_size, int(k)).tolist()}] for k in lengths]
    stop_ids = tuple(int(x) for x in rng.choice(np.arange(3, cfg.vocab_size), cfg.vocab_size // stop_every,
                                                 replace=False))
    tok = _IdTokenizer(stop_ids)
    sampler = Sampler(model)
    results, times = {}, {}
    for continuous in (False, True):
        params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, max_prompt_len=max_prompt,
                                batch_size=batch, continuous=continuous)

        def run(call: int) -> None:
            # the same seed every call: the warm-up compiles the refill programs the timed calls use
            results[continuous, call] = generate_text(model, tok, msgs, n=n, params=params, seed=0, sampler=sampler)
        times[continuous] = _timed(run, repeats)
        sampler.release()
    same = all(a.token_ids == b.token_ids for r in range(repeats + 1)
               for pa, pb in zip(results[False, r], results[True, r]) for a, b in zip(pa, pb))
    if not same:
        raise AssertionError("static and continuous batching produced different completions")
    gen = sum(len(c.token_ids) for p in results[True, 1] for c in p)
    return SkewedResult(preset, prompts, n, batch, new_tokens, gen, gen / (prompts * n), times[False], times[True])


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


HEADER = (f"{'preset':<14}{'batch':>6}{'n':>3}{'prompt':>7}{'new':>5} {'dtype':<9}"
          f"{'ours dec tok/s (spread)':>26}{'ours e2e':>10}{'HF dec tok/s (spread)':>26}{'HF e2e':>9}{'ratio':>8}"
          f"{'roofline':>9}")


def _spread(x: float | None, lo_hi: tuple[float, float] | None) -> str:
    return "-" if x is None or lo_hi is None else f"{x:.1f} ({lo_hi[0]:.0f}-{lo_hi[1]:.0f})"


def format_row(r: Result) -> str:
    ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
    return (f"{r.preset:<14}{r.batch:>6}{r.n:>3}{r.prompt:>7}{r.new_tokens:>5} {r.dtype:<9}"
            f"{_spread(r.ours_decode_tok_s, r.ours_decode_spread):>26}{_fmt(r.ours_e2e_tok_s):>10}"
            f"{_spread(r.hf_decode_tok_s, r.hf_decode_spread):>26}"
            f"{_fmt(r.hf_e2e_tok_s):>9}{ratio:>8}{_fmt(r.roofline_fraction, '.1%'):>9}")


def format_skewed(r: SkewedResult) -> str:
    st, co = np.median(r.static_s), np.median(r.continuous_s)
    return (f"skewed {r.preset}: {r.prompts} prompts x n={r.n}, {r.batch} prompts decoding at once, up to "
            f"{r.new_tokens} new tokens (mean {r.mean_length:.1f}); static {st:.2f} s "
            f"({min(r.static_s):.2f}-{max(r.static_s):.2f}), {r.generated_tokens / st:.0f} tok/s; continuous "
            f"{co:.2f} s ({min(r.continuous_s):.2f}-{max(r.continuous_s):.2f}), {r.generated_tokens / co:.0f} tok/s; "
            f"continuous / static = {r.speedup:.2f}x (identical completions)")


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,qwen2.5-0.5b")
    ap.add_argument("--batches", default="1,16,64", help="prompts per call")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (rows = batch * n)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true",
                    help="CPU sweep: tiny at batch 1,16 (256 new tokens); qwen2.5-0.5b at batch 1 (32 new tokens)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads for the HF baseline on CPU (0 = torch default). On a loaded shared "
                         "CPU, torch's spinning intra-op pool can be 20x slower with 2 threads than with 1")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time in process CPU seconds with XLA and torch on one thread each: comparable figures on a "
                         "CPU shared with other jobs (wall time is not); tokens/s then means tokens per CPU-second")
    ap.add_argument("--repeats", type=int, default=3, help="timed warm calls per figure (median and spread)")
    ap.add_argument("--skewed", action="store_true", help="also run the length-skewed static vs continuous workload")
    ap.add_argument("--skewed-only", action="store_true", help="only the length-skewed workload")
    ap.add_argument("--skewed-prompts", type=int, default=64)
    ap.add_argument("--skewed-batch", type=int, default=16)
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    if a.quick:
        runs = [(p, b, new) for p, bs, new in QUICK["runs"] for b in bs]
    else:
        runs = [(p, int(b), a.new_tokens) for p in a.presets.split(",") for b in a.batches.split(",")]
    global _clock
    if a.cpu_time:
        _clock = time.process_time
        a.torch_threads = 1
    if a.torch_threads and not a.no_hf:
        import torch  # noqa: PLC0415 - optional: torch, the PyTorch side only
        torch.set_num_threads(a.torch_threads)
    dev = jax.devices()[0]
    print(f"# devices: {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
          f"prompt {a.prompt_len}, n {a.n}; peak bandwidth {_fmt(peak_bandwidth(dev), '.3g')} B/s; "
          f"torch threads {a.torch_threads or 'default'}; clock {'CPU time, 1 thread' if a.cpu_time else 'wall'}; "
          f"load average {_loadavg()}", flush=True)
    results: list = []
    if not a.skewed_only:
        print(HEADER + "\n" + "-" * len(HEADER), flush=True)
        for preset, batch, new in runs:
            results.append(run_one(preset, batch, a.n, a.prompt_len, new, hf=not a.no_hf, repeats=a.repeats))
            print(format_row(results[-1]), flush=True)
    if a.skewed or a.skewed_only:
        for preset in a.presets.split(","):
            results.append(run_skewed(preset, a.skewed_prompts, a.n, a.skewed_batch, a.prompt_len, a.new_tokens,
                                      a.repeats))
            print(format_skewed(results[-1]), flush=True)
    print(f"# load average after: {_loadavg()}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump([dict(dataclasses.asdict(r), ratio=getattr(r, "ratio", None),
                            speedup=getattr(r, "speedup", None)) for r in results], f, indent=2)
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
