"""Training metrics: a progress bar (loss, tokens/s, lr, ETA), TensorBoard event files (tensorboardX), a JSONL
file, and MFU from model FLOPs and a peak-FLOP/s table by device kind.

Model FLOPs per token (the PaLM / maxtext convention, the one the issue's H100 PyTorch reference uses):
``6 * N + 12 * L * H * D * T`` with N all parameters (embeddings included), L layers, H query heads, D head
dim, T the sequence length (non-causal attention count). MFU = tokens/s x FLOPs/token / (devices x peak).
Only process 0 writes (files, bar); every process may call the methods.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
from tqdm import tqdm

# Dense peak FLOP/s per device (no sparsity), for the compute dtype of the matmuls. float32 entries are the
# TF32 tensor-core rate on NVIDIA (XLA's default matmul precision on GPU) and the bf16 MXU rate on TPU (fp32
# matmuls run as bf16 passes by default). Matched by substring of `jax.Device.device_kind`, first match wins,
# so more specific names come first. Unknown devices (CPU) -> MFU not reported.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GB200", {"bfloat16": 2.5e15, "float16": 2.5e15, "float32": 1.25e15}),
    ("B200", {"bfloat16": 2.25e15, "float16": 2.25e15, "float32": 1.1e15}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),  # SXM / HBM3
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("GH200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H800", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("A800", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    ("A10", {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),  # v5p reports "TPU v5"
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),  # v6e (Trillium)
    ("TPU v6e", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU7x", {"bfloat16": 2307e12, "float32": 2307e12}),  # Ironwood
)


def device_peak_flops(device_kind: str | None = None, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of one device of this kind for matmuls in `dtype`, or None when unknown (CPU)."""
    if device_kind is None:

        device_kind = jax.devices()[0].device_kind
    for key, table in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return table.get(dtype) or table.get("bfloat16")
    return None


def model_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L H D T (see the module docstring)."""
    return 6.0 * cfg.num_params() + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, peak: float | None) -> float | None:
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (num_devices * peak)


_LABELS = {"tokens_per_s": "tok/s", "eval_loss": "eval"}


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes `<run_dir>/metrics.jsonl` (one JSON object per record: {"kind", "step", ...scalars}) and
    TensorBoard events under `<run_dir>/tb/`, and draws a progress bar.

    On resume from `start_step`, records with step > start_step are dropped from the JSONL and TensorBoard
    purges events past it, so the files read as one uninterrupted run.
    """

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, *, primary: bool = True,
                 tensorboard: bool = True, desc: str = "train", progress: bool | None = None):
        self.run_dir = run_dir
        self.total = int(total_steps)
        self.start = int(start_step)
        self.primary = primary
        self.desc = desc
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._t0 = time.time()
        self._last_line = 0.0
        if not primary:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(self.start)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 - inside the guard: metrics never stop training

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=self.start + 1 if self.start else None,
                                         flush_secs=30)
            except Exception as e:  # noqa: BLE001 - metrics must never stop training
                print(f"[{desc}] TensorBoard disabled: {e}", file=sys.stderr)
        tty = sys.stderr.isatty() if progress is None else progress
        if tty:

            self._bar = tqdm(total=self.total, initial=self.start, desc=desc, unit="step", dynamic_ncols=True,
                             mininterval=0.5)

    def _truncate_after(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if int(rec.get("step", 0)) <= step:
                    kept.append(json.dumps(rec) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        """One record: JSONL line + TensorBoard scalars `<kind>/<name>` (None values skipped)."""
        if not self.primary:
            return
        clean = {k: _py(v) for k, v in scalars.items() if v is not None}
        self._file.write(json.dumps({"kind": kind, "step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def progress(self, step: int, scalars: dict[str, Any]) -> None:
        """Advance the bar to `step` with a short postfix; without a TTY print a line (at most every 2 s or at
        the end) so logs of batch jobs stay readable."""
        if not self.primary:
            return
        self._file.flush()
        done = step - self.start
        elapsed = time.time() - self._t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = []
        for k, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("tokens_per_s", "{:,.0f}"), ("lr", "{:.2e}"),
                       ("mfu", "{:.1%}")):
            v = scalars.get(k)
            if v is not None:
                parts.append(f"{_LABELS.get(k, k)}={fmt.format(v)}")
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(" ".join(parts), refresh=False)
            self._bar.refresh()
        elif time.time() - self._last_line > 2.0 or step >= self.total:
            self._last_line = time.time()
            print(f"[{self.desc}] step {step}/{self.total} " + " ".join(parts) + f" eta {_fmt_time(eta)}",
                  flush=True)

    def message(self, text: str) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()


def _py(v: Any) -> Any:
    """numpy / jax scalars -> Python numbers for JSON; non-finite floats as strings JSON can hold."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str, kind: str | None = "train") -> list[dict[str, Any]]:
    """Records of `<run_dir>/metrics.jsonl` (of one kind, or all with kind=None), in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = []
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


def completed_summary(run_dir: str, step: int, total: int, stage: str) -> dict[str, Any] | None:
    """The run's summary.json when the run already finished at `step` == `total` (a rerun of a finished stage
    returns it instead of training again), else None."""
    path = os.path.join(run_dir, "summary.json")
    if step < total or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    if int(summary.get("steps", -1)) != step:
        return None
    print(f"[{stage}] already complete ({step}/{total} steps): {run_dir}", flush=True)
    return summary
