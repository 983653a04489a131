"""Where the ovjax train step's time goes on CPU: a per-XLA-op profile, sub-function timings, PyTorch beside it.

    python -m ovjax.bench.step_profile [--preset mid] [--rounds 5] [--json PATH] [--trace-dir DIR]
    python -m ovjax.bench.step_profile --smoke       # tiny preset, seconds; what the test runs

1. Per-op profile: the shipped step (ovjax.bench.step.jax_runner) runs `--trace-steps` steps under
   `jax.profiler`; every trace event named like an instruction of the compiled step's HLO is summed and
   attributed by the instruction's metadata (the JAX op path) to a part of the model (vision tower + merger,
   LLM blocks, embedding, loss head, optimizer + metrics), a kind of op (matmul, attention-score matmul,
   layout copy/transpose, broadcast fill, scan slicing, other fusions) and a phase (forward, backward,
   update). Percentages are of the summed op time (ops of one step may overlap on several threads).
2. Sub-functions, jitted alone and timed interleaved with the whole step and with PyTorch eager (and
   torch.compile unless --no-compile): forward (loss), forward+backward (loss and gradients), optimizer
   update alone (clipping + AdamW on fixed gradients), loss head alone (chunked cross-entropy and its
   gradient on fixed hidden states). Median [min, max] wall seconds and median CPU seconds; the load
   average is recorded beside them (the numbers are only comparable within one run on a shared machine).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile

from ovjax.bench import step as bench_step

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ATTENTION_EINSUMS = ("bkgts", "btkgd")          # kernels/reference.py: scores and probs @ V
_NAMED_DOTS = ("_proj", "/qkv/", "/proj/", "/fc1/", "/fc2/", "patch_embed")
_CONTROL = {"while", "call", "conditional", "tuple", "get-tuple-element", "parameter", "constant", "bitcast"}


@dataclasses.dataclass
class Op:
    name: str
    opcode: str
    shape: str
    op_name: str     # the JAX op path from the metadata ("" when none)
    fused: set       # opcodes inside a fusion's computation (its own opcode otherwise)


def compiled_ops(hlo_text: str) -> dict[str, Op]:
    """Instructions of a compiled HLO module (`compiled.as_text()`), by name."""
    comps: dict[str, set] = collections.defaultdict(set)
    ops: dict[str, Op] = {}
    calls: dict[str, str] = {}
    comp = ""
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m is None:
            c = _COMP.match(line)
            if c and "=" not in line.split("{")[0]:
                comp = c.group(1)
            continue
        name, shape, opcode = m.groups()
        comps[comp].add(opcode)
        op_name = _OP_NAME.search(line)
        ops[name] = Op(name, opcode, shape, op_name.group(1) if op_name else "", {opcode})
        called = _CALLS.search(line)
        if called and opcode == "fusion":
            calls[name] = called.group(1)
    for name, comp_name in calls.items():
        ops[name].fused = set(comps.get(comp_name, ())) | {"fusion"}
    return ops


def op_times(trace_dir: str, ops: dict[str, Op]) -> collections.Counter:
    """Summed microseconds per HLO instruction over every trace event named like one (control ops such
    as `while`, whose events contain their bodies' ops, are left out)."""
    files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile")
    with gzip.open(sorted(files)[-1]) as f:
        events = json.load(f)["traceEvents"]
    out: collections.Counter = collections.Counter()
    for e in events:
        op = ops.get(e.get("name", "")) if e.get("ph") == "X" else None
        if op is not None and op.opcode not in _CONTROL:
            out[op.name] += float(e.get("dur", 0.0))
    return out


def part_of(op_name: str) -> str:
    if not op_name:
        return "no metadata (scan buffers, constants)"
    if any(k in op_name for k in ("/visual/", "/merger/", "image_features", "/blocks/")):
        return "vision tower + merger"
    if "language_model/while" in op_name or "/layers/" in op_name:
        return "LLM blocks"
    if "embed" in op_name and "VLM" in op_name:
        return "embedding + image scatter"
    if "jvp(" in op_name:
        return "loss head (lm_head + cross-entropy)"
    return "optimizer + metrics"


def kind_of(op: Op) -> str:
    if op.fused & {"dot", "convolution"}:
        if any(e in op.op_name for e in _ATTENTION_EINSUMS):
            return "matmul: attention scores / probs@V"
        return "matmul: weights" if any(n in op.op_name for n in _NAMED_DOTS) or "dot_general" in op.op_name \
            else "matmul: other"
    if op.opcode in ("copy", "transpose") or op.name.startswith(("copy", "transpose")):
        return "fusion into a transposed layout (copy)"
    if op.name.startswith(("wrapped_broadcast", "broadcast")) or op.opcode == "broadcast":
        return "broadcast fill"
    if op.fused & {"dynamic-slice", "dynamic-update-slice"}:
        return "scan slicing (dynamic slice / update)"
    if op.fused & {"reduce"}:
        return "reductions (softmax, norms, logsumexp)"
    return "elementwise / other"


def phase_of(op_name: str) -> str:
    if not op_name:
        return "no metadata"
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update + metrics"


def breakdown(times: collections.Counter, ops: dict[str, Op], steps: int, top: int = 15) -> dict:
    """Milliseconds per step and shares by part x kind, by phase, and the `top` instructions."""
    total = sum(times.values())
    if not total:
        raise ValueError("the trace holds no event named like an instruction of the compiled step")
    by = {"part_kind": collections.Counter(), "part": collections.Counter(), "kind": collections.Counter(),
          "phase": collections.Counter()}
    for name, us in times.items():
        op = ops[name]
        part, kind = part_of(op.op_name), kind_of(op)
        by["part_kind"][f"{part} | {kind}"] += us
        by["part"][part] += us
        by["kind"][kind] += us
        by["phase"][phase_of(op.op_name)] += us

    def rows(counter):
        return [{"what": k, "ms_per_step": v / 1e3 / steps, "share": v / total} for k, v in counter.most_common()]
    out = {k: rows(v) for k, v in by.items()}
    out["top_ops"] = [{"op": n, "shape": ops[n].shape, "kind": kind_of(ops[n]), "op_name": ops[n].op_name[:140],
                       "ms_per_step": us / 1e3 / steps, "share": us / total} for n, us in times.most_common(top)]
    out["op_ms_per_step"] = total / 1e3 / steps
    return out


def trace_step(one, ctx: dict, steps: int, trace_dir: str) -> dict:
    import jax

    hlo = ctx["step"].lower(ctx["holder"]["state"], ctx["batch"]).compile().as_text()
    ops = compiled_ops(hlo)
    jax.profiler.start_trace(trace_dir)
    try:
        for _ in range(steps):
            one()
    finally:
        jax.profiler.stop_trace()
    return breakdown(op_times(trace_dir, ops), ops, steps)


# ------------------------------------------------------------------------------------------- sub-functions


def sub_functions(ctx: dict, compiler_options: dict | None = None) -> dict:
    """Jitted parts of the step on the step's own state and batch: name -> callable running to completion."""
    import jax
    import jax.numpy as jnp
    import optax

    from ovjax import sharding
    from ovjax.train import optim, step as step_lib

    setup, batch, holder = ctx["setup"], ctx["batch"], ctx["holder"]
    paths = list(setup.trainable)
    loss_fn = step_lib.make_loss(setup)
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def in_rules(fn):
        def wrapped(*a):
            with sharding.activation_rules(setup.mesh):
                return fn(*a)
        return jax.jit(wrapped, compiler_options=compiler_options)

    fwd = in_rules(lambda p, b: loss_fn(*optim.split(p, paths), b, denom)[0])
    grad = in_rules(lambda p, b: jax.grad(loss_fn, has_aux=True)(*optim.split(p, paths), b, denom)[0])
    # copies: the step donates (deletes) the live state, and it runs interleaved with these
    params = jax.tree_util.tree_map(jnp.copy, holder["state"].params)
    opt_state = jax.tree_util.tree_map(jnp.copy, holder["state"].opt_state)
    grads = jax.block_until_ready(grad(params, batch))

    def update(g, opt_state, p):
        trainable = optim.split(p, paths)[0]
        upd, new_opt = setup.tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, upd), new_opt, optax.tree.norm(g)
    upd = jax.jit(update, compiler_options=compiler_options)

    text = setup.model_cfg.text
    rows, seq_len = batch["tokens"].shape
    hidden = jax.random.normal(jax.random.PRNGKey(1), (rows, seq_len, text.hidden_size), jnp.float32)
    head = step_lib.head_kernel(params, text)
    chunk = int(setup.cfg.train.loss_chunk)
    ce = in_rules(jax.grad(lambda h, w: step_lib.chunked_cross_entropy(h, w, batch["targets"], batch["loss_mask"],
                                                                        chunk)[0], argnums=(0, 1)))
    fns = {"forward (loss)": lambda: fwd(params, batch),
           "forward + backward": lambda: grad(params, batch),
           "optimizer update": lambda: upd(grads, opt_state, params),
           "loss head alone (fwd + bwd)": lambda: ce(hidden, head)}
    return {k: (lambda f=f: jax.block_until_ready(f())) for k, f in fns.items()}


# ------------------------------------------------------------------------------------------- main


def run(preset: str = "mid", rounds: int = 5, trace_steps: int = 2, compile_torch: bool = True,
        trace_dir: str | None = None, compiler_options: dict | None = None,
        progress_json: str | None = None) -> dict:
    cfg = bench_step.model_config(preset)
    rows, seq_len, grid = bench_step.SHAPES[preset]
    batch = bench_step.make_batch(cfg, rows, seq_len, grid)
    one, info, ctx = bench_step.jax_runner(cfg, batch, compiler_options)
    res = {"preset": preset, "batch": f"{rows}x{seq_len}, {grid[0]}x{grid[1]} patches", "cpu_count": os.cpu_count(),
           "compiler_options": compiler_options or {}, "first_step_s": info["first_step_s"]}
    with tempfile.TemporaryDirectory() as tmp:
        res["load_average_trace"] = bench_step.load_average()
        res["profile"] = trace_step(one, ctx, trace_steps, trace_dir or tmp)
    if progress_json:  # the profile alone, in case a later part fails
        with open(progress_json, "w") as f:
            json.dump(res, f, indent=1)
    fns = {"ovjax step (jit)": one, **sub_functions(ctx, compiler_options)}
    fns["PyTorch eager step"] = bench_step.torch_runner(cfg, batch, False)[0]
    if compile_torch:
        try:
            fns["PyTorch torch.compile step"] = bench_step.torch_runner(cfg, batch, True)[0]
        except Exception as e:  # reported, not hidden
            res["torch_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    res["load_average_timing_start"] = bench_step.load_average()
    times = bench_step.time_interleaved(fns, rounds, 1)
    res["load_average_timing_end"] = bench_step.load_average()
    step_s = bench_step.summarize(times["ovjax step (jit)"])["step_s"]
    res["timings"] = [{"what": k, **bench_step.summarize(v)} for k, v in times.items()]
    for t in res["timings"]:
        t["over_ovjax_step"] = t["step_s"] / step_s
    return res


def markdown(res: dict) -> str:
    p = res["profile"]
    out = [f"Preset {res['preset']} ({res['batch']}), {res['cpu_count']} CPU cores; load average (1/5/15 min) "
           f"{res['load_average_trace']} during the trace, {res['load_average_timing_start']} -> "
           f"{res['load_average_timing_end']} during the timings.", "",
           "| timed interleaved | s [min, max] | CPU s | / ovjax step |", "|---|---|---|---|"]
    for t in res["timings"]:
        out.append(f"| {t['what']} | {t['step_s']:.3f} [{t['step_s_min']:.3f}, {t['step_s_max']:.3f}] | "
                   f"{t['cpu_s']:.2f} | {t['over_ovjax_step']:.2f} |")
    for key, title in (("phase", "phase"), ("part", "part of the model"), ("kind", "kind of op"),
                       ("part_kind", "part | kind")):
        out += ["", f"| {title} | ms/step (traced) | share of op time |", "|---|---:|---:|"]
        out += [f"| {r['what']} | {r['ms_per_step']:.1f} | {r['share']:.1%} |" for r in p[key]]
    out += ["", "| top ops | shape | kind | ms/step | share | JAX op |", "|---|---|---|---:|---:|---|"]
    out += [f"| {r['op']} | `{r['shape']}` | {r['kind']} | {r['ms_per_step']:.1f} | {r['share']:.1%} | "
            f"`{r['op_name']}` |" for r in p["top_ops"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovjax.bench.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mid", choices=sorted(bench_step.SHAPES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--trace-steps", type=int, default=2)
    ap.add_argument("--trace-dir", help="keep the jax.profiler trace here (default: a temporary folder)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, one round, no torch.compile")
    args = ap.parse_args(argv)
    if args.smoke:
        res = run("tiny", rounds=1, trace_steps=1, compile_torch=False,
                  compiler_options={"xla_backend_optimization_level": 0})
    else:
        res = run(args.preset, args.rounds, args.trace_steps, not args.no_compile, args.trace_dir,
                  progress_json=args.json)
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
