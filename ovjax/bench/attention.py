"""Attention check and benchmark: ovjax's Pallas flash kernel vs the XLA reference and cuDNN.

Run on a GPU through `bash launch/gpu_check.sh` (which also writes $OUT/gpu_check.json), or alone:
    python -m ovjax.bench.attention [--smoke] [--json PATH]
`--smoke` (or GPU_CHECK_SMOKE=1) shrinks every shape and runs the kernels in the Pallas interpreter, so the
whole script can be exercised on a CPU in about a minute.

Sections: `check` (kernel vs reference on the device: outputs and q/k/v gradients, f32 and bf16, causal and
bidirectional, packed, GQA, the tiny-preset head dims), `bench` (forward and forward+backward at training
shapes, TFLOP/s and the ratio to cuDNN), `probes` (cuDNN's private packed API with q/kv offsets, and
jax's Mosaic-GPU attention_mgpu, at the LLM shape) and `sweep` (block sizes incl. tokamax's H100 winners).
launch/gpu_check.sh calls the pieces one by one (`check_one`, `bench_one`, `probe_*`) and flushes its JSON
after every measurement; `run` here does the same sections in one call.

FLOPs are counted from the visible (query, key) pairs only: 4 * D * Hq * pairs for the forward (QK^T and PV),
2.5 times that for the backward (the FlashAttention convention: dV, dP, dQ, dK; the recomputed QK^T is not
counted). A causal row of n tokens has n(n+1)/2 pairs, so causal counts half of the full square; packed rows
count each sample's own pairs; padding pairs are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from ovjax.kernels.flash_attention import BlockSizes, flash_attention
from ovjax.kernels.reference import mha_reference

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def on_gpu() -> bool:
    return jax.default_backend() in _GPU_PLATFORMS


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention shape. `lengths`: the packed samples of every row (the rest of the row is padding, id 0);
    None: no segment ids at all."""

    name: str
    t: int
    hq: int
    hkv: int
    d: int
    causal: bool
    dtype: str
    lengths: tuple[int, ...] | None = None
    b: int = 1

    def segment_ids(self):
        if self.lengths is None:
            return None
        if sum(self.lengths) > self.t:
            raise ValueError(f"{self.name}: samples {sum(self.lengths)} exceed the row length {self.t}")
        row = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(self.lengths)]
                             + [np.zeros(self.t - sum(self.lengths), np.int32)])
        return jnp.asarray(np.broadcast_to(row, (self.b, self.t)).copy())

    def visible_pairs(self) -> int:
        """(query, key) pairs that attention must compute, over the batch, padding excluded."""
        lengths = (self.t,) if self.lengths is None else self.lengths
        per_row = sum(n * (n + 1) // 2 if self.causal else n * n for n in lengths)
        return self.b * per_row

    def fwd_flops(self) -> float:
        return 4.0 * self.d * self.hq * self.visible_pairs()


def make_inputs(case: Case, seed: int = 0):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(case.dtype)
    q = jax.random.normal(kq, (case.b, case.t, case.hq, case.d), jnp.float32).astype(dt)
    k = jax.random.normal(kk, (case.b, case.t, case.hkv, case.d), jnp.float32).astype(dt)
    v = jax.random.normal(kv, (case.b, case.t, case.hkv, case.d), jnp.float32).astype(dt)
    do = jax.random.normal(kc, q.shape, jnp.float32).astype(dt)
    return q, k, v, do


def attention_fn(impl: str, case: Case, interpret: bool, blocks: BlockSizes | None = None):
    """(q, k, v) -> out for one implementation, with the case's segment ids and causality baked in."""
    seg = case.segment_ids()
    if impl == "pallas":
        return lambda q, k, v: flash_attention(q, k, v, seg, case.causal, interpret=interpret, block_sizes=blocks)
    if impl == "xla":
        return lambda q, k, v: mha_reference(q, k, v, seg, case.causal)
    if impl == "cudnn":
        if seg is not None:
            raise ValueError("cuDNN has no segment ids")
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=case.causal, implementation="cudnn")
    raise ValueError(impl)


def fwd_bwd(fn):
    """(q, k, v, do) -> (dq, dk, dv): the full forward + backward of fn."""
    def run(q, k, v, do):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(do)
    return run


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------

def check_cases(smoke: bool) -> list[Case]:
    if smoke:
        return [
            Case("f32 causal packed gqa4 d32", 70, 4, 1, 32, True, "float32", (20, 1, 30)),
            Case("bf16 bidir packed gqa2 d16", 50, 4, 2, 16, False, "bfloat16", (9, 30)),
            Case("f32 bidir vit-tiny d12", 40, 3, 3, 12, False, "float32", (16, 16)),
        ]
    return [
        Case("f32 causal packed gqa4 d128", 1000, 8, 2, 128, True, "float32", (300, 1, 17, 500, 100)),
        Case("bf16 causal packed gqa4 d128", 1000, 8, 2, 128, True, "bfloat16", (300, 1, 17, 500, 100)),
        Case("f32 bidir packed gqa2 d64", 777, 4, 2, 64, False, "float32", (200, 64, 400)),
        Case("bf16 bidir unpacked gqa8 d64", 640, 8, 1, 64, False, "bfloat16"),
        Case("bf16 causal unpacked gqa1 d128", 513, 4, 4, 128, True, "bfloat16"),
        Case("f32 bidir vit-tiny d12", 300, 3, 3, 12, False, "float32", (64, 64, 100, 16)),
        Case("bf16 causal llm-tiny gqa2 d16", 300, 4, 2, 16, True, "bfloat16", (120, 7, 150)),
    ]


def check_one(case: Case, interpret: bool, blocks: BlockSizes | None = None) -> dict:
    """Kernel vs the XLA reference (full precision) on the device: output and q/k/v gradients."""
    row = {"case": case.name, "tol": TOL[case.dtype]}
    try:
        q, k, v, do = make_inputs(case, seed=1)
        got_o = jax.jit(attention_fn("pallas", case, interpret, blocks))(q, k, v)
        got_g = jax.jit(fwd_bwd(attention_fn("pallas", case, interpret, blocks)))(q, k, v, do)
        with jax.default_matmul_precision("highest"):  # no TF32 in the float32 ground truth
            want_o = jax.jit(attention_fn("xla", case, interpret))(q, k, v)
            want_g = jax.jit(fwd_bwd(attention_fn("xla", case, interpret)))(q, k, v, do)
        errs = {"out": rel_err(got_o, want_o)}
        errs.update({n: rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), got_g, want_g)})
        row.update({f"err_{n}": e for n, e in errs.items()})
        row["ok"] = all(math.isfinite(e) and e < row["tol"] for e in errs.values())
    except Exception as e:  # one broken case must not hide the others
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
    print(f"[check] {row['case']}: {'ok' if row['ok'] else 'FAIL'} "
          + " ".join(f"{k}={v:.1e}" for k, v in row.items() if k.startswith("err_")), flush=True)
    return row


def run_check(smoke: bool, interpret: bool, blocks: BlockSizes | None) -> list[dict]:
    return [check_one(case, interpret, blocks) for case in check_cases(smoke)]


def bench_cases(smoke: bool) -> list[Case]:
    """In the GPU check's order: the LLM shape unpacked (vs cuDNN), packed in 8 samples, the ViT buffer."""
    if smoke:
        return [
            Case("llm causal", 96, 4, 2, 32, True, "bfloat16"),
            Case("llm causal packed", 96, 4, 2, 32, True, "bfloat16", (30, 20, 40, 6)),
            Case("vit bidir packed", 128, 2, 2, 16, False, "bfloat16", (40, 36, 44)),
        ]
    rng = np.random.default_rng(0)
    images = tuple(int(n) for n in 4 * rng.integers(100, 310, size=20))  # 2x2-mergeable patch counts
    scale = 16000 / sum(images)
    images = tuple(4 * max(1, int(n * scale) // 4) for n in images)
    return [
        Case("llm T8192 causal", 8192, 32, 8, 128, True, "bfloat16"),
        Case("llm T8192 causal packed8", 8192, 32, 8, 128, True, "bfloat16",
             (1500, 700, 1300, 900, 1100, 1000, 800, 892)),
        Case(f"vit T16384 bidir packed{len(images)}", 16384, 16, 16, 64, False, "bfloat16", images),
    ]


def cudnn_row(case: Case, interpret: bool, iters: int, on_update=None) -> dict:
    """cuDNN (public API) at the case's shape; it cannot mask segments, so a packed case runs unpacked."""
    plain = dataclasses.replace(case, lengths=None)
    note = "" if case.lengths is None else "same shape, unpacked: not equivalent"
    row = bench_one(plain, "cudnn", interpret, iters, note=note, on_update=on_update)
    if "error" in row and case.hkv != case.hq:
        row.clear()
        row = bench_one(plain, "cudnn", interpret, iters, note="kv repeated", row=row, on_update=on_update)
    row["case"] = case.name
    return row


def vs_cudnn(pallas: dict, cudnn: dict) -> None:
    """> 1: the kernel is faster. On an unpacked case this is the ratio of wall times."""
    if "error" not in cudnn and "error" not in pallas:
        for p in ("fwd", "fwd_bwd"):
            if f"{p}_tflops" in pallas and f"{p}_tflops" in cudnn:
                pallas[f"{p}_vs_cudnn"] = pallas[f"{p}_tflops"] / cudnn[f"{p}_tflops"]


def time_call(fn, args, iters: int) -> float:
    """Median wall seconds of fn(*args) after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_one(case: Case, impl: str, interpret: bool, iters: int, blocks: BlockSizes | None = None,
              note: str = "", row: dict | None = None, on_update=None) -> dict:
    """Time fwd, then fwd+bwd, filling `row` (a new dict if None); `on_update()` runs after each measurement
    (the GPU check flushes its JSON there, so a run cut short keeps what it measured)."""
    row = {} if row is None else row
    row.update(case=case.name, impl=impl, note=note)
    on_update = on_update or (lambda: None)
    try:
        q, k, v, do = make_inputs(case)
        fn = attention_fn(impl, case, interpret, blocks)
        if impl == "cudnn" and note == "kv repeated":
            groups = case.hq // case.hkv
            base = fn
            fn = lambda q, k, v: base(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2))  # noqa: E731
        fwd_s = time_call(jax.jit(fn), (q, k, v), iters)
        row.update(fwd_ms=1e3 * fwd_s, fwd_tflops=case.fwd_flops() / fwd_s / 1e12)
        on_update()
        fb_s = time_call(jax.jit(fwd_bwd(fn)), (q, k, v, do), iters)
        row.update(fwd_bwd_ms=1e3 * fb_s, fwd_bwd_tflops=3.5 * case.fwd_flops() / fb_s / 1e12)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
    on_update()
    print(f"[bench] {case.name} {impl}{' (' + note + ')' if note else ''}: "
          + (row["error"][:300] if "error" in row else
             f"fwd {row['fwd_ms']:.2f} ms {row['fwd_tflops']:.1f} TF/s, "
             f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms {row['fwd_bwd_tflops']:.1f} TF/s"), flush=True)
    return row


def run_bench(smoke: bool, interpret: bool, blocks: BlockSizes | None, deadline: float) -> list[dict]:
    iters = 1 if smoke else 5
    rows = []
    for case in bench_cases(smoke):
        if time.time() > deadline:
            rows.append({"case": case.name, "impl": "*", "error": "skipped: time budget spent"})
            continue
        pallas = bench_one(case, "pallas", interpret, iters, blocks)
        rows.append(pallas)
        rows.append(bench_one(case, "xla", interpret, iters))
        if on_gpu():
            cud = cudnn_row(case, interpret, iters)
            rows.append(cud)
            vs_cudnn(pallas, cud)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Probes (GPU only): what else could run the LLM shape
# ----------------------------------------------------------------------------------------------------------

def packed_offsets(case: Case):
    """cuDNN's packed-row description of the case: q/kv offsets [B, M+1] and lengths [B, M] (-1 = unused)."""
    lengths = np.asarray(case.lengths, np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    offsets = jnp.asarray(np.broadcast_to(starts, (case.b, len(starts))).copy())
    seqlens = jnp.asarray(np.broadcast_to(lengths, (case.b, len(lengths))).copy())
    return offsets, seqlens


def probe_cudnn_offsets(case: Case, iters: int, on_update=None) -> dict:
    """jax._src.cudnn.fused_attention_stablehlo.dot_product_attention with q_offsets/kv_offsets (packed rows;
    Hopper only): timings, and its output on the real tokens against ovjax's kernel."""
    row = {"case": case.name, "impl": "cudnn-offsets", "note": "private API, packed"}
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        offsets, seqlens = packed_offsets(case)
        mask = fa.MaskType.CAUSAL if case.causal else fa.MaskType.NO_MASK

        def fn(q, k, v):
            return fa.dot_product_attention(q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets,
                                            kv_offsets=offsets, scale=case.d ** -0.5, mask_type=mask)
        q, k, v, _ = make_inputs(case)
        real = np.asarray(case.segment_ids()[0]) > 0
        got = np.asarray(jax.jit(fn)(q, k, v), np.float32)[:, real]
        want = np.asarray(jax.jit(attention_fn("pallas", case, False))(q, k, v), np.float32)[:, real]
        row["err_vs_pallas"] = rel_err(got, want)
        _time_fn(fn, case, iters, row, on_update)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
    return row


def _time_fn(fn, case: Case, iters: int, row: dict, on_update=None) -> dict:
    q, k, v, do = make_inputs(case)
    fwd_s = time_call(jax.jit(fn), (q, k, v), iters)
    row.update(fwd_ms=1e3 * fwd_s, fwd_tflops=case.fwd_flops() / fwd_s / 1e12)
    if on_update:
        on_update()
    fb_s = time_call(jax.jit(fwd_bwd(fn)), (q, k, v, do), iters)
    row.update(fwd_bwd_ms=1e3 * fb_s, fwd_bwd_tflops=3.5 * case.fwd_flops() / fb_s / 1e12)
    return row


def probe_mgpu(case: Case, iters: int, on_update=None) -> dict:
    """jax.experimental.pallas.ops.gpu.attention_mgpu (Mosaic GPU, Hopper; no segment ids) at the case's
    shape, unpacked."""
    row = {"case": case.name, "impl": "attention_mgpu", "note": "Mosaic GPU, unpacked"}
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

        config = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=case.causal,
                                   block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        plain = dataclasses.replace(case, lengths=None)
        q, k, v, _ = make_inputs(plain)
        got = np.asarray(jax.jit(lambda q, k, v: mgpu.attention(q, k, v, config))(q, k, v), np.float32)
        want = np.asarray(jax.jit(attention_fn("pallas", plain, False))(q, k, v), np.float32)
        row["err_vs_pallas"] = rel_err(got, want)
        _time_fn(lambda q, k, v: mgpu.attention(q, k, v, config), plain, iters, row, on_update)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
    return row


# tokamax's H100 autotuning winners for its Pallas-Triton flash attention (bf16): fwd 128x128, 8 warps,
# 3 stages; bwd 64x64, 4 warps, 2 stages.
TOKAMAX_H100 = BlockSizes(block_q=128, block_k=128, block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
                          num_warps=8, num_warps_bwd=4, num_stages=3, num_stages_bwd=2)


def sweep_configs() -> list[BlockSizes]:
    return [
        TOKAMAX_H100,
        BlockSizes(128, 64, 128, 32, 32, 128, num_stages=3, num_stages_bwd=2),
        BlockSizes(128, 128, 128, 64, 64, 128, num_warps=8, num_warps_bwd=8, num_stages=2, num_stages_bwd=2),
        BlockSizes(64, 64, 64, 64, 64, 64, num_warps=4, num_warps_bwd=4, num_stages=3, num_stages_bwd=3),
        BlockSizes(128, 64, 64, 64, 64, 64, num_warps=8, num_warps_bwd=4, num_stages=3, num_stages_bwd=2),
    ]


def run_sweep(smoke: bool, interpret: bool, deadline: float) -> list[dict]:
    if smoke:
        return []
    case = bench_cases(smoke)[0]
    rows = []
    for blocks in sweep_configs():
        if time.time() > deadline:
            rows.append({"blocks": dataclasses.asdict(blocks), "error": "skipped: time budget spent"})
            continue
        row = bench_one(case, "pallas", interpret, 3, blocks, note="sweep")
        row["blocks"] = dataclasses.asdict(blocks)
        rows.append(row)
    return rows


def dispatcher_check(interpret: bool) -> dict:
    """attention(impl='auto') must take the kernel on a GPU and give the reference's answer."""
    from ovjax.models.attention import attention

    case = Case("dispatch", 64, 4, 2, 16, True, "float32", (20, 30))
    q, k, v, _ = make_inputs(case)
    seg = case.segment_ids()
    got = jax.jit(lambda q, k, v: attention(q, k, v, seg, True, impl="auto"))(q, k, v)
    want = mha_reference(q, k, v, seg, True)
    return {"backend": jax.default_backend(), "auto_err": rel_err(got, want)}


def run(smoke: bool = False, deadline: float | None = None, blocks: BlockSizes | None = None) -> dict:
    """All attention sections; each records its own errors instead of raising."""
    deadline = time.time() + 400 if deadline is None else deadline
    interpret = not on_gpu()
    out = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "jax": jax.__version__, "interpret": interpret, "smoke": smoke}
    if not smoke and interpret:
        out["error"] = "no GPU: use --smoke (GPU_CHECK_SMOKE=1) for the interpreted run"
        return out
    def probes():
        if not on_gpu():
            return []
        llm, packed = bench_cases(smoke)[:2]
        return [probe_cudnn_offsets(packed, 3), probe_mgpu(llm, 3)]

    for name, section in (("dispatch", lambda: dispatcher_check(interpret)),
                          ("check", lambda: run_check(smoke, interpret, blocks)),
                          ("bench", lambda: run_bench(smoke, interpret, blocks, deadline)),
                          ("probes", probes),
                          ("sweep", lambda: run_sweep(smoke, interpret, deadline))):
        t0 = time.time()
        try:
            out[name] = section()
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
        out[f"{name}_s"] = round(time.time() - t0, 1)
    return out


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    lines = [f"### Attention on {res.get('backend')} (jax {res.get('jax')}, interpret={res.get('interpret')})", ""]
    if "error" in res:
        return "\n".join(lines + [f"error: {res['error']}"])
    checks = res.get("check")
    if isinstance(checks, list):
        lines += ["| check | ok | out | dq | dk | dv | tol |", "|---|---|---|---|---|---|---|"]
        for r in checks:
            lines.append(f"| {r['case']} | {'yes' if r['ok'] else 'NO'} | "
                         + " | ".join(_f(r.get(f"err_{n}"), ".1e") for n in ("out", "dq", "dk", "dv"))
                         + f" | {r['tol']:.0e} |" + (f" {r['error'][:120]}" if "error" in r else ""))
        lines.append("")
    for title, key in (("bench", "bench"), ("probes (LLM shape)", "probes"),
                       ("block-size sweep (first bench case)", "sweep")):
        rows = res.get(key)
        if not isinstance(rows, list) or not rows:
            if isinstance(rows, dict):
                lines += [f"{title}: error {rows.get('error')}", ""]
            continue
        lines += [f"{title}:", "",
                  "| case | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd vs cuDNN | fwd+bwd vs cuDNN |"
                  " note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = r.get("note", "")
            if key == "sweep" and "blocks" in r:
                b = r["blocks"]
                note = (f"fwd {b['block_q']}x{b['block_k']} dq {b['block_q_dq']}x{b['block_k_dq']} "
                        f"dkv {b['block_q_dkv']}x{b['block_k_dkv']} w{b['num_warps']}/{b['num_warps_bwd']} "
                        f"s{b['num_stages']}/{b['num_stages_bwd']}")
            if "err_vs_pallas" in r:
                note = f"{note}; max err vs pallas {r['err_vs_pallas']:.1e}"
            if "error" in r:
                note = (note + " " + r["error"][:150]).strip()
            lines.append(f"| {r['case'] if 'case' in r else ''} | {r.get('impl', 'pallas')} | "
                         f"{_f(r.get('fwd_ms'), '.2f')} | {_f(r.get('fwd_tflops'), '.1f')} | "
                         f"{_f(r.get('fwd_bwd_ms'), '.2f')} | {_f(r.get('fwd_bwd_tflops'), '.1f')} | "
                         f"{_f(r.get('fwd_vs_cudnn'), '.2f')} | {_f(r.get('fwd_bwd_vs_cudnn'), '.2f')} | {note} |")
        lines.append("")
    if isinstance(res.get("dispatch"), dict):
        lines.append(f"dispatcher auto: {res['dispatch']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    res = run(smoke=args.smoke)
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
