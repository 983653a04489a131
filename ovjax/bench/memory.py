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

# name: (preset, mesh (data, fsdp, tensor, sequence), global batch rows, seq_len, max_patches, max_images)
CASES = {
    "8b-fsdp128": ("8b", (1, 128, 1, 1), 128, 8192, 16368, 16),
    "8b-data16-fsdp8": ("8b", (16, 8, 1, 1), 128, 8192, 16368, 16),
    "4b-fsdp8": ("4b", (1, 8, 1, 1), 8, 8192, 16368, 16),
    "tiny-fsdp8": ("tiny", (1, 8, 1, 1), 8, 64, 60, 4),
}
# The smoke case checks the plumbing, not numbers: skip XLA's backend optimiser to compile ~3x faster.
COMPILER_OPTIONS = {"tiny-fsdp8": {"xla_backend_optimization_level": 0}}
DEFAULT = ("8b-fsdp128", "8b-data16-fsdp8", "4b-fsdp8")
SMOKE = ("tiny-fsdp8",)


def measure(name: str) -> dict:
    """Compile one case (in a process whose XLA_FLAGS already give enough devices) -> numbers."""
    import jax

    from ovjax import sharding
    from ovjax.configs import stage1_5
    from ovjax.train import state as state_lib, step as step_lib

    preset, mesh_shape, rows, seq, patches, images = CASES[name]
    cfg = stage1_5.get_config(preset)
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
    batch = sum(sharding.shard_bytes(s, s.sharding) for s in step.batch_struct.values())
    stats = sharding.sharding_stats(setup.abstract.params, setup.shardings.params, mesh)
    arg, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                             int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    peak = arg + out - alias + temp
    return {"case": name, "preset": preset, "devices": n,
            "mesh": dict(zip(sharding.MESH_AXES, mesh_shape)), "batch_rows": rows, "seq_len": seq,
            "max_patches": patches, "max_images": images, "dtype": "bfloat16", "remat": "full",
            "param_count": int(sum(x.size for x in jax.tree_util.tree_leaves(setup.abstract.params))),
            "params_bytes": params, "optimizer_bytes": opt, "batch_bytes": batch, "argument_bytes": arg,
            "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "generated_code_bytes": int(ma.generated_code_size_in_bytes), "peak_bytes": peak,
            "fits_80GiB": peak <= BUDGET, "params_not_fully_sharded_fraction": stats["not_fully_sharded_fraction"],
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def run_case(name: str) -> dict:
    """Measure `name` in a fresh interpreter with the device count and XLA flags it needs."""
    n = 1
    for s in CASES[name][1]:
        n *= s
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n} "
                        "--xla_disable_hlo_passes=while-loop-invariant-code-motion")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "ovjax.bench.memory", "--child", name], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"case {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss of the largest child so far (KiB on Linux): the host RAM the compile needed
    result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


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
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    names = args.cases.split(",") if args.cases else (SMOKE if args.smoke else DEFAULT)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    results = [run_case(n) for n in names]
    print(table(results))
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
