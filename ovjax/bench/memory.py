"""Per-device memory of the train step, compiled ahead of time on fake CPU devices (nothing is allocated).

    python -m ovjax.bench.memory                 # 8b stage 1.5 on 128 devices (two layouts), 4b on 8
    python -m ovjax.bench.memory --smoke         # tiny preset, 8 devices (seconds; run by the tests)
    python -m ovjax.bench.memory --cases 8b-fsdp128 --json out.json

Each case runs in its own subprocess with XLA_FLAGS set before jax is imported:
`--xla_force_host_platform_device_count=N` and `--xla_disable_hlo_passes=while-loop-invariant-code-motion`
(on XLA:CPU that pass hoists an f32 copy of the saved activations out of the layer loop, which a GPU
compile does not do; lessons 11c). XLA:CPU also runs bf16 dots in f32 and lowers reductions as
all-reduce, so `temp` is an upper bound of what a GPU needs. Parameter and optimizer bytes are exact
(from the shardings); argument/output/temp come from `compiled.memory_analysis()`. The attention path is
the XLA one (query-chunked); a flash kernel on GPU needs less. Budget: 80 GiB per device.

One-device cases (issue 13; `--cases` names ending in `-1dev`, or `--one-device` for all of them): stage 2 of
4b and 8b at seq 8192, bf16 compute, full remat, as full fine-tuning (fp32 params, grads and Adam moments),
with the light state (optim.mu_dtype=bfloat16), with the moments offloaded (optim.offload=opt_state) and
with LoRA (configs/lora.py: rank 16 on every LLM projection, base frozen in bf16, projector trained). Each is
compiled at 1, 8 and 16 rows (`rows_that_fit`); the largest rows per micro-batch that fit a budget (80 GiB:
A800/A100/H100-80GB; 141 GiB: H200) follow from them.
With offload the moments live in host memory: `device_peak` leaves them out (a lower bound: it assumes the
update streams them leaf by leaf; XLA:CPU compiles the device copies to nothing, so no upper bound is
measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 2 ** 30
BUDGET = 80 * GIB
BUDGETS = {"80GiB": 80 * GIB, "141GiB": 141 * GIB}

# name: (preset, mesh (data, fsdp, tensor, sequence), global batch rows, seq_len, max_patches, max_images)
CASES = {
    "8b-fsdp128": ("8b", (1, 128, 1, 1), 128, 8192, 16368, 16),
    "8b-data16-fsdp8": ("8b", (16, 8, 1, 1), 128, 8192, 16368, 16),
    "4b-fsdp8": ("4b", (1, 8, 1, 1), 8, 8192, 16368, 16),
    "tiny-fsdp8": ("tiny", (1, 8, 1, 1), 8, 64, 60, 4),
    "8b-s2-fsdp8": ("8b", (1, 8, 1, 1), 8, 8192, 16368, 16),
}
# stage-2 variants: name -> (config file, optim overrides)
VARIANTS = {
    "full": ("stage2", {}),
    "mu-bf16": ("stage2", {"mu_dtype": "bfloat16"}),
    "offload": ("stage2", {"offload": "opt_state"}),
    "lora": ("lora", {}),
}
ONE_DEVICE = tuple(f"{p}-s2-{v}-1dev" for p in ("4b", "8b") for v in VARIANTS)
for _name in ONE_DEVICE:
    CASES[_name] = (_name.split("-")[0], (1, 1, 1, 1), 1, 8192, 16368, 16)
CASES["tiny-lora-1dev"] = ("tiny", (1, 1, 1, 1), 1, 64, 60, 4)
# The smoke case checks the plumbing, not numbers: skip XLA's backend optimiser to compile ~3x faster.
COMPILER_OPTIONS = {"tiny-fsdp8": {"xla_backend_optimization_level": 0},
                    "tiny-lora-1dev": {"xla_backend_optimization_level": 0}}
DEFAULT = ("8b-fsdp128", "8b-data16-fsdp8", "4b-fsdp8")
SMOKE = ("tiny-fsdp8",)


def variant_of(name: str) -> str | None:
    """The stage-2 variant of a case name (`8b-s2-lora-1dev` -> lora; `8b-s2-fsdp8` -> full), else None."""
    parts = name.split("-")
    if len(parts) > 2 and parts[1] == "s2":
        middle = "-".join(parts[2:-1]) if name.endswith("-1dev") else ""
        return middle if middle in VARIANTS else "full"
    return "lora" if "lora" in parts else None


def run_config(name: str):
    from ovjax.configs import lora, stage1_5, stage2

    preset = CASES[name][0]
    variant = variant_of(name)
    if variant is None:
        return stage1_5.get_config(preset)
    file, optim = VARIANTS[variant]
    cfg = (lora if file == "lora" else stage2).get_config(preset)
    cfg.optim.update(optim)
    return cfg


def measure(name: str, rows: int | None = None) -> dict:
    """Compile one case (in a process whose XLA_FLAGS already give enough devices) -> numbers."""
    import jax

    from ovjax import sharding
    from ovjax.train import optim as optim_lib, state as state_lib, step as step_lib

    preset, mesh_shape, case_rows, seq, patches, images = CASES[name]
    rows = rows or case_rows
    cfg = run_config(name)
    cfg.model.update(dict(dtype="bfloat16", remat="full", attention_impl="xla"))
    cfg.train.update(dict(batch_size=rows, seq_len=seq, max_patches=patches, max_images=images, micro_batches=1,
                          loss_chunk=min(1024, seq)))
    n = 1
    for s in mesh_shape:
        n *= s
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), jax.devices()[:n])
    setup = state_lib.build(cfg, mesh)
    step = step_lib.TrainStep(setup)
    t0 = time.time()
    lowered = step.lower()
    t1 = time.time()
    compiled = lowered.compile(compiler_options=COMPILER_OPTIONS.get(name))
    t2 = time.time()
    ma = compiled.memory_analysis()
    params = sharding.per_device_bytes(setup.abstract.params, setup.shardings.params)
    opt = sharding.per_device_bytes(setup.abstract.opt_state, setup.shardings.opt_state)
    opt_host = sharding.per_device_bytes(setup.abstract.opt_state, setup.shardings.opt_state,
                                         memory_kind="pinned_host")
    batch = sum(sharding.shard_bytes(s, s.sharding) for s in step.batch_struct.values())
    stats = sharding.sharding_stats(setup.abstract.params, setup.shardings.params, mesh)
    arg, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                             int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    peak = arg + out - alias + temp
    trainable = int(sum(x.size for p, x in optim_lib.flat(setup.abstract.params).items() if p in set(setup.trainable)))
    return {"case": name, "preset": preset, "devices": n, "variant": variant_of(name) or "stage1.5",
            "trainable_count": trainable, "optimizer_host_bytes": opt_host,
            # donated state counted once in `peak`; offloaded moments are not device memory
            "device_peak_bytes": peak - opt_host,
            "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)), "batch_rows": rows, "seq_len": seq,
            "max_patches": patches, "max_images": images, "dtype": "bfloat16", "remat": "full",
            "mu_dtype": str(cfg.optim.get("mu_dtype", "float32")), "offload": str(cfg.optim.get("offload", "none")),
            "frozen_dtype": str(cfg.optim.get("frozen_dtype", "") or "as params"),
            "param_count": int(sum(x.size for x in jax.tree_util.tree_leaves(setup.abstract.params))),
            "params_bytes": params, "optimizer_bytes": opt, "batch_bytes": batch, "argument_bytes": arg,
            "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "generated_code_bytes": int(ma.generated_code_size_in_bytes), "peak_bytes": peak,
            "fits_80GiB": peak - opt_host <= BUDGET, "params_not_fully_sharded_fraction": stats["not_fully_sharded_fraction"],
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def run_case(name: str, rows: int | None = None) -> dict:
    """Measure `name` (at `rows` rows; default the case's) in a fresh interpreter with the device count and
    XLA flags it needs."""
    n = 1
    for s in CASES[name][1]:
        n *= s
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n} "
                        "--xla_disable_hlo_passes=while-loop-invariant-code-motion")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "ovjax.bench.memory", "--child", name] + (["--rows", str(rows)] if rows else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"case {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss of the largest child so far (KiB on Linux): the host RAM the compile needed
    result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


PROBE_ROWS = (1, 8, 16)


def rows_that_fit(name: str, log=print) -> dict:
    """A one-device case compiled at 1, 8 and 16 rows -> the 1-row numbers, the per-row bytes and the largest
    rows per micro-batch under each budget. The step's peak is the larger of two phases: the update (params,
    gradients, moments: no activations, so flat in rows) and the forward/backward (linear in rows), so the
    slope comes from the two large probes and the 1-row peak is the floor: max rows = (budget - intercept) /
    slope, 0 when not even one row fits."""
    probes = {}
    for rows in PROBE_ROWS:
        probes[rows] = run_case(name, rows)
        log(f"[memory] {name} {rows} row(s): device peak {probes[rows]['device_peak_bytes'] / GIB:.2f} GiB "
            f"({probes[rows]['compile_s']} s)")
    one, lo, hi = (probes[r] for r in PROBE_ROWS)
    per_row = (hi["device_peak_bytes"] - lo["device_peak_bytes"]) / (PROBE_ROWS[2] - PROBE_ROWS[1])
    intercept = lo["device_peak_bytes"] - PROBE_ROWS[1] * per_row
    one["per_row_bytes"], one["intercept_bytes"] = int(per_row), int(intercept)
    one["probe_peaks"] = {r: p["device_peak_bytes"] for r, p in probes.items()}
    one["max_rows"] = {b: 0 if one["device_peak_bytes"] > cap else
                       (max(1, int((cap - intercept) // per_row)) if per_row > 0 else None)
                       for b, cap in BUDGETS.items()}
    log(f"[memory] {name}: {per_row / GIB:.2f} GiB per row, max rows {one['max_rows']}")
    return one


def one_device_table(results: list[dict]) -> str:
    def g(x):
        return f"{x / GIB:.1f}"
    lines = ["| case | trainable | params GiB | Adam moments GiB (where) | device peak GiB at 1 / 8 / 16 rows "
             "| per row GiB | max rows in 80 GiB | max rows in 141 GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        where = "host" if r["optimizer_host_bytes"] else "device"
        mu = ", mu bf16" if r["mu_dtype"] == "bfloat16" else ""
        lines.append(f"| {r['case']} | {r['trainable_count'] / 1e9:.3f} B | {g(r['params_bytes'])} | "
                     f"{g(r['optimizer_bytes'])} ({where}{mu}) | "
                     f"{' / '.join(g(v) for v in r['probe_peaks'].values())} | "
                     f"{g(r['per_row_bytes'])} | {r['max_rows']['80GiB']} | {r['max_rows']['141GiB']} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    def g(x):
        return f"{x / GIB:.2f}"
    head = ("| case | mesh | rows x seq | params GiB | optimizer GiB | arguments GiB | temp GiB | peak GiB "
            "| fits 80 GiB | compile s | host RSS GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        lines.append(f"| {r['case']} ({r['param_count'] / 1e9:.2f} B params) | {mesh} | {r['batch_rows']} x "
                     f"{r['seq_len']} | {g(r['params_bytes'])} | {g(r['optimizer_bytes'])} | "
                     f"{g(r['argument_bytes'])} | {g(r['temp_bytes'])} | {g(r['peak_bytes'])} | "
                     f"{'yes' if r['fits_80GiB'] else 'NO'} | {r['compile_s']} | "
                     f"{r['host_peak_rss_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny preset on 8 devices")
    ap.add_argument("--cases", default=None, help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--one-device", action="store_true",
                    help=f"the one-device stage-2 cases ({', '.join(ONE_DEVICE)})")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.rows)))
        return 0
    names = (args.cases.split(",") if args.cases else ONE_DEVICE if args.one_device
             else SMOKE if args.smoke else DEFAULT)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    several = [n for n in names if not n.endswith("-1dev")]
    results = [run_case(n) for n in several]
    single = [rows_that_fit(n) for n in names if n.endswith("-1dev")]
    if results:
        print(table(results))
    if single:
        print(one_device_table(single))
    results += single
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
