"""The GPU check of ovjax, run by `bash launch/gpu_check.sh` from the repository root.

Order (what matters first; every measurement is written to $OUT/gpu_check.json as soon as it exists):
  1. kernel correctness on the device, bf16 and f32 (f32 at 1e-5: catches TF32 dots), and the dispatcher;
  2. LLM attention, T=8192, 32/8 heads, D=128, causal: ovjax's kernel vs cuDNN, fwd and fwd+bwd;
  3. the same shape packed in 8 samples (kernel; cuDNN cannot mask segments through the public API);
  4. the ViT buffer (T=16384, bidirectional, packed images);
  5. a representative train step (ovjax.bench.gpu_step: the 4b preset with all 36 LLM + 24 ViT layers and
     the full vocabulary at a short sequence) in its own process, so its peak memory is its own;
  6. if time remains: probes of cuDNN's private packed API (q_offsets/kv_offsets) and of jax's Mosaic-GPU
     attention_mgpu at the LLM shape, then the block-size sweep (tokamax's H100 winners first).
Steps 1-4 yield to the train step when they run past ATTENTION_S; 6 stops at the budget. The shell wrapper's
`timeout` is the hard stop.

The GPU machine gets the working tree without the editable install, so `ovjax.kernels` (the folder
`kernels/`) is mapped by hand below; nothing here imports grain, array-record or ml_collections.
Environment: GPU_CHECK_SMOKE=1 shrinks every shape and interprets the kernels (runs on a CPU);
GPU_CHECK_BUDGET_S (default 330) is the time after which optional work is skipped; GPU_CHECK_FLAGS_NOTE is
what gpu_check.sh found about the XLA flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATTENTION_S = 150  # steps 1-4 end by here (from the start), so the train step always gets its turn
TRAIN_STEP_S = 150  # the train step's own time limit


def map_kernels_package() -> None:
    """Make `ovjax.kernels` importable from ROOT/kernels when ovjax is not pip-installed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ovjax.source_tree import map_folder

    map_folder("kernels")


def write_json(result: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        path = pathlib.Path(out) / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)  # a reader (or a kill) never sees half a file


def train_step_hook(smoke: bool, deadline: float) -> dict:
    """ovjax.bench.gpu_step in a child process (own peak memory, own time limit) -> its JSON result."""
    limit = min(TRAIN_STEP_S, deadline - time.time()) if not smoke else 900
    if limit < 20:
        return {"skipped": f"time budget spent ({limit:.0f} s left)"}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "step.json"
        cmd = [sys.executable, "-m", "ovjax.bench.gpu_step", "--json", str(path)] + (["--smoke"] if smoke else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"train step killed after its {limit:.0f} s limit"}
        if path.exists():
            result = json.loads(path.read_text())
        else:
            result = {"error": f"train step exited {proc.returncode} without a result"}
        if proc.returncode and "error" in result:
            result["stderr_tail"] = proc.stderr[-3000:]
        return result


class Check:
    """The result dict, flushed to JSON at every `save()`; `timed(name, fn)` records one step's error too."""

    def __init__(self, result: dict):
        self.result = result
        self.save()

    def save(self) -> None:
        write_json(self.result)

    def timed(self, name: str, fn):
        t0 = time.time()
        try:
            self.result[name] = fn()
        except Exception as e:
            self.result[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-4000:]}
            print(f"[{name}] FAILED: {self.result[name]['error']}", flush=True)
        self.result[f"{name}_s"] = round(time.time() - t0, 1)
        self.save()
        return self.result[name]


def attention_steps(check: Check, ab, smoke: bool, interpret: bool, t_start: float) -> None:
    """Steps 1-4: correctness, then the LLM, packed and ViT timings, each flushed as it lands."""
    res = check.result
    res["check"] = []
    for case in ab.check_cases(smoke):
        res["check"].append(ab.check_one(case, interpret))
        check.save()
    check.timed("dispatch", lambda: ab.dispatcher_check(interpret))
    iters = 1 if smoke else 5
    res["bench"] = []
    for i, case in enumerate(ab.bench_cases(smoke)):
        if not smoke and time.time() > t_start + ATTENTION_S:
            res["bench"].append({"case": case.name, "impl": "*", "error": "skipped: the train step's turn"})
            check.save()
            continue
        pallas = {}
        res["bench"].append(pallas)
        ab.bench_one(case, "pallas", interpret, iters, row=pallas, on_update=check.save)
        if ab.on_gpu() and i == 0:  # cuDNN at the LLM shape (the packed case has the same unpacked shape)
            cudnn = {}
            res["bench"].append(cudnn)
            cudnn.update(ab.cudnn_row(case, interpret, iters, on_update=check.save))
            ab.vs_cudnn(pallas, cudnn)
            check.save()


def optional_steps(check: Check, ab, smoke: bool, deadline: float) -> None:
    """Step 6: probes at the LLM shape, then the block sweep, while time is left (GPU only)."""
    res = check.result
    if not ab.on_gpu():
        res["probes"], res["sweep"] = [], []
        check.save()
        return
    llm, packed = ab.bench_cases(smoke)[:2]
    res["probes"] = []
    for probe, case in ((ab.probe_cudnn_offsets, packed), (ab.probe_mgpu, llm)):
        if time.time() > deadline - 30:
            res["probes"].append({"case": case.name, "impl": probe.__name__, "error": "skipped: time budget spent"})
        else:
            res["probes"].append(probe(case, 3, on_update=check.save))
        check.save()
    res["sweep"] = []
    for blocks in ab.sweep_configs():
        row = {"blocks": dataclasses.asdict(blocks)}
        res["sweep"].append(row)
        if time.time() > deadline - 30:
            row["error"] = "skipped: time budget spent"
        else:
            ab.bench_one(llm, "pallas", False, 3, blocks, note="sweep", row=row, on_update=check.save)
        check.save()


def main() -> int:
    t_start = time.time()
    smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
    deadline = t_start + float(os.environ.get("GPU_CHECK_BUDGET_S", "330"))
    map_kernels_package()
    import jax

    check = Check({"smoke": smoke, "jax": jax.__version__, "backend": jax.default_backend(),
                   "devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "xla_flags_note": os.environ.get("GPU_CHECK_FLAGS_NOTE", "")})
    print(f"[env] jax {jax.__version__} backend {jax.default_backend()} devices {check.result['devices']}",
          flush=True)
    from ovjax.bench import attention as ab

    interpret = not ab.on_gpu()
    check.result["interpret"] = interpret
    if not smoke and interpret:
        check.result["error"] = "no GPU: use GPU_CHECK_SMOKE=1 for the interpreted run"
        check.save()
        print(check.result["error"])
        return 1
    check.timed("attention_steps_done", lambda: attention_steps(check, ab, smoke, interpret, t_start) or True)
    check.timed("train_step", lambda: train_step_hook(smoke, deadline))
    check.timed("optional_steps_done", lambda: optional_steps(check, ab, smoke, deadline) or True)
    check.result["elapsed_s"] = round(time.time() - t_start, 1)
    check.save()

    res = check.result
    print("\n## ovjax GPU check\n")
    print(ab.markdown(res))
    try:
        from ovjax.bench import gpu_step

        print("\n" + gpu_step.markdown(res["train_step"]))
    except Exception as e:
        print(f"train step: {res['train_step']} (markdown failed: {e})")
    print(f"\nelapsed {res['elapsed_s']} s")
    checks = res.get("check")
    ok = isinstance(checks, list) and bool(checks) and all(r.get("ok") for r in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
