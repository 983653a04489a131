"""Live metrics of a run: model FLOPs of a step, device peak FLOP/s, MFU, and the writers
(`DIR/metrics.jsonl`, TensorBoard under `DIR/tb`, a progress bar or plain log lines).

FLOPs of one train step (`step_flops`), counted on the static shapes the step computes (B rows of T
tokens, B x P ViT patches, padding included): per matmul weight of a tower, forward 2 FLOPs per token;
backward 2 for the activation gradients when the tower or anything before it trains, and 2 for the
weight gradients when the tower trains (stage 1: ViT forward only, LLM forward + activation gradients). Attention scores and values add 4*T*T*heads*head_dim per row and layer forward
(the XLA path computes the full square, so no causal halving), with the same backward factors.
Remat recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).

Peak FLOP/s per device (`peak_flops`): `train.peak_flops` when set (> 0); a table of GPU kinds (dense
bf16 tensor-core peaks; float32 runs use the same number, so their MFU reads low); on CPU a measured
float32 matmul rate (a 1024^3 matmul, best of a few), so CPU MFU means "fraction of what this machine
reaches on one big matmul" and says nothing comparable across machines.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GPU_PEAK_BF16 = {  # dense, per device
    "h200": 989e12, "h100": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12, "b100": 1750e12,
    "a100": 312e12, "a800": 312e12, "l40s": 362e12, "l4": 121e12, "a10": 125e12, "v100": 125e12,
}


# ------------------------------------------------------------------------------------ peak FLOP/s

_CPU_PEAK: float | None = None


def measured_cpu_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """float32 FLOP/s of one n x n x n matmul on the default CPU device (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    global _CPU_PEAK
    if _CPU_PEAK is None:
        cpu = jax.devices("cpu")[0]
        a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK = 2.0 * n ** 3 / best
    return _CPU_PEAK


def peak_flops(device=None, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    import jax

    if override:
        return float(override), "config train.peak_flops"
    device = device or jax.devices()[0]
    if device.platform == "gpu":
        kind = device.device_kind.lower()
        for name, peak in sorted(GPU_PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
            if name in kind.replace("nvidia", "").replace(" ", ""):
                return peak, f"bf16 dense peak of {device.device_kind}"
        return math.nan, f"unknown GPU kind {device.device_kind!r}: set train.peak_flops"
    if device.platform == "cpu":
        return measured_cpu_matmul_flops(), "measured float32 1024^3 matmul on this CPU"
    return math.nan, f"no peak known for platform {device.platform}: set train.peak_flops"


# ------------------------------------------------------------------------------------ counting

class Tally:
    """Run counters and the current logging interval, fed each step's fetched (host) metrics once.

    add(step, m) counts a step (returns whether its update was finite); start_clock() starts timing
    (after the first step, so compile time is not a rate); record(step, epoch) -> the metrics.jsonl object
    of a log step (rates over the steps added since the previous record), and starts the next interval."""

    def __init__(self, counters: dict, *, step_flops: float, n_devices: int, peak: float):
        self.counters = dict(counters)
        self.last: dict = {}
        self._flops, self._n_devices, self._peak = step_flops, n_devices, peak
        self._t0: float | None = None
        self._tokens, self._steps = 0.0, 0

    def add(self, step: int, m: dict) -> bool:
        c = self.counters
        for key, name in (("samples_seen", "samples"), ("tokens_seen", "tokens"),
                          ("supervised_tokens_seen", "supervised_tokens"), ("images_seen", "images")):
            c[key] += int(m[name])
        finite = bool(m["finite"])
        c["skipped_updates"] += 0 if finite else 1
        if self._t0 is not None:
            self._tokens += float(m["tokens"])
            self._steps += 1
        self.last = {"step": step, **m}
        return finite

    def start_clock(self) -> None:
        self._t0, self._tokens, self._steps = time.perf_counter(), 0.0, 0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of host time (a held-out evaluation) out of the current interval's rates."""
        if self._t0 is not None:
            self._t0 += seconds

    def record(self, step: int, epoch: float) -> dict:
        from ovjax.train import flops as flops_lib

        dt = time.perf_counter() - self._t0 if self._t0 is not None else math.nan
        n, m, c = self._steps, self.last, self.counters
        rec = {
            "step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "tokens_per_s": self._tokens / dt if n else math.nan,
            "step_seconds": dt / n if n else math.nan,
            "mfu": flops_lib.mfu(self._flops, dt / n, self._n_devices, self._peak) if n else math.nan,
            "samples_seen": c["samples_seen"], "tokens_seen": c["tokens_seen"],
            "supervised_tokens": int(m["supervised_tokens"]),
            "supervised_fraction": float(m["supervised_tokens"]) / max(1.0, float(m["tokens"])),
            "supervised_tokens_seen": c["supervised_tokens_seen"], "images_seen": c["images_seen"],
            "epoch": round(epoch, 4), "skipped_updates": c["skipped_updates"],
        }
        rec.update({k: float(v) for k, v in m.items() if k.startswith("lr/")})
        self.start_clock()
        return rec


# ------------------------------------------------------------------------------------ writers

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics file; a last line cut short (a process killed while writing it) is dropped."""
    p = Path(path)
    if not p.exists():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise
    return out


class MetricsWriter:
    """Appends one JSON object per logged step to `DIR/metrics.jsonl`, mirrors scalars to TensorBoard
    (`DIR/tb`) and shows progress. Only process 0 writes.

    resume_step: the step a run restarts from; records after it (written by a run that was killed) are
    dropped from metrics.jsonl and TensorBoard purges them, so every step is logged once."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, resume_step: int = 0,
                 tensorboard: bool = True, progress: bool | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.total_steps = total_steps
        self._tb = None
        self._bar = None
        if not enabled:
            return
        Path(workdir).mkdir(parents=True, exist_ok=True)
        old = read_jsonl(self.path)
        kept = [r for r in old if r.get("step", 0) <= resume_step]
        dropped = len(old) - len(kept)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        if dropped:
            print(f"metrics: dropped {dropped} record(s) after step {resume_step} from {self.path.name} "
                  "(written before the restart)", flush=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(Path(workdir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        interactive = sys.stderr.isatty() if progress is None else progress
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = self._append(record)
        step = int(clean["step"])
        r = {k: (math.nan if v is None else v) for k, v in clean.items()}
        line = (f"step {step}/{self.total_steps}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                f"grad_norm {r['grad_norm']:.3f}  tok/s {r['tokens_per_s']:.0f}  mfu {r['mfu']:.2%}")
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(f"loss {r['loss']:.4f} tok/s {r['tokens_per_s']:.0f}")
        else:
            print(line, flush=True)

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        """One line of metrics.jsonl and its numbers as TensorBoard scalars at record["step"]."""
        clean = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(clean["step"]))
        return clean

    def write_eval(self, record: dict[str, Any]) -> None:
        """A held-out evaluation (ovjax/train/evaluate.py): its own metrics.jsonl line ("eval/..." keys, no
        "loss"), TensorBoard scalars and a printed line."""
        if not self.enabled:
            return
        clean = self._append(record)
        self.note(f"eval at step {clean['step']}: " + "  ".join(
            f"{k[5:]} {v:.4f}" if isinstance(v, float) else f"{k[5:]} {v}"
            for k, v in clean.items() if k.startswith("eval/")))

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _plain(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf (the first logged step has no rate yet)
    return v
