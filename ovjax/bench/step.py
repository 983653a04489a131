"""Train-step benchmark on CPU: ovjax (JAX) against the same model and batch in PyTorch.

    python -m ovjax.bench.step [--presets tiny,mid] [--steps 5] [--no-compile] [--json PATH] [--smoke]
    python -m ovjax.bench.step_profile [--preset mid]      # where the ovjax step's time goes (per HLO op)

The PyTorch model is transformers' MLCDVisionModel (the RICE-ViT network) + the 2x2 patch merger
(LayerNorm, Linear 4D->4D, exact GELU, Linear 4D->H) + transformers' Qwen3ForCausalLM, with the same
sizes as the ovjax model. Both train every parameter (AdamW, global-norm clipping 1.0), float32, one CPU
device (all cores), on the same batch: B rows of T tokens, each row one image of P patches (a 2-D grid)
whose P/4 merged features replace the row's <|image_pad|> tokens, then text; the second half of the text is
supervised. Rows are not packed (one sample per row) so that both sides compute the same attention.

The frameworks' steps are timed interleaved (one step of each in turn, `--steps` rounds after a warm-up
round), so that load from other processes on a shared machine hits all of them alike; the load average is
recorded beside each row. Reported per framework: seconds per step (median, with min and max), this
process's CPU seconds per step (median), tokens/s (B*T / median step time),
MFU (model FLOPs from ovjax.train.flops over the step time and the CPU's measured float32 matmul peak,
ovjax.train.metrics.peak_flops: the same peak for both, so the ratio is what matters), and the ratio
ovjax tokens/s over PyTorch tokens/s. `torch.compile` runs when it works here; its failure is reported.

Presets: tiny (configs/models.py tiny: text hidden 64, ViT 48) and mid (text hidden 256 x 4 layers, vocab
8192, ViT hidden 128 x 4 layers, about 8.6M parameters). `--smoke`: tiny only, one timed step, eager only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

SHAPES = {  # preset: (batch rows, seq_len, image grid (gh, gw))
    "tiny": (8, 64, (8, 8)),
    "mid": (4, 512, (16, 16)),
}


def model_config(preset: str):
    from ovjax.configs.models import preset as model_preset

    cfg = model_preset("tiny")
    if preset == "mid":
        cfg.text.update(dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=64, intermediate_size=768))
        cfg.vision.update(dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=512, out_hidden_size=256))
        cfg.update(dict(image_token_id=8000, video_token_id=8001, vision_start_token_id=8002,
                        vision_end_token_id=8003))
        cfg.name = "mid"
    elif preset != "tiny":
        raise ValueError(f"unknown preset {preset!r}; choose tiny or mid")
    return cfg


def make_batch(cfg, rows: int, seq_len: int, grid: tuple[int, int], seed: int = 0) -> dict:
    """The numpy batch of the module docstring (design.md layout, one image per row)."""
    from ovjax.models.vlm import patch_positions

    rng = np.random.default_rng(seed)
    gh, gw = grid
    n_patch, k = gh * gw, gh * gw // 4
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    text_ids = np.array([i for i in range(cfg.text.vocab_size) if i not in special])
    if seq_len < k + 4:
        raise ValueError(f"seq_len {seq_len} too short for {k} image tokens")
    b = {key: np.zeros((rows, seq_len), np.int32) for key in ("tokens", "targets", "segment_ids", "positions")}
    b["loss_mask"] = np.zeros((rows, seq_len), bool)
    pix = cfg.vision.in_channels * cfg.vision.patch_size ** 2
    b["patches"] = rng.standard_normal((rows, n_patch, pix)).astype(np.float32)
    b["patch_segment"] = np.ones((rows, n_patch), np.int32)
    b["patch_hw"] = np.broadcast_to(patch_positions((1, gh, gw)), (rows, n_patch, 2)).copy()
    for r in range(rows):
        ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * k + [cfg.vision_end_token_id]
        ids += list(rng.choice(text_ids, seq_len - len(ids)))
        b["tokens"][r] = ids
        b["targets"][r, :-1] = ids[1:]
        b["segment_ids"][r] = 1
        b["positions"][r] = np.arange(seq_len)
        first_text = k + 2
        b["loss_mask"][r, first_text + (seq_len - first_text) // 2:seq_len - 1] = True
    return b


def time_interleaved(fns: dict, steps: int, warmup: int) -> dict:
    """Time each callable `steps` times, round-robin (a, b, c, a, b, c, ...), so that a change in the
    machine's load (a shared box) hits every entry alike. -> {name: {"wall": [s], "cpu": [s]}}; cpu is this
    process's CPU time (all threads) over the call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def summarize(times: dict) -> dict:
    """{"wall": [...], "cpu": [...]} -> median, min, max of the wall times and the median CPU time."""
    w = times["wall"]
    return {"step_s": statistics.median(w), "step_s_min": min(w), "step_s_max": max(w),
            "cpu_s": statistics.median(times["cpu"]), "timed_steps": len(w)}


def load_average() -> str:
    """The 1, 5, 15-minute load averages (`uptime`), recorded beside every timing."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------- JAX

def jax_runner(cfg, batch: dict, compiler_options: dict | None = None):
    """The shipped train step on one CPU device. -> (one() running a step to completion, info dict,
    context dict with setup, step, state holder and device batch for profiling)."""
    import jax

    from ovjax import sharding
    from ovjax.train import state as state_lib, step as step_lib
    from ovjax.train.config import base_config

    run = base_config("tiny")
    run.model = cfg
    rows, seq_len = batch["tokens"].shape
    run.train.update(dict(batch_size=rows, seq_len=seq_len, max_patches=batch["patches"].shape[1], max_images=1,
                          loss_chunk=seq_len, steps=1000))
    run.optim.update(dict(trainable=("visual", "merger", "language_model"), frozen=(), lr=1e-5))
    mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
    setup = state_lib.build(run, mesh)
    state = state_lib.init_state(setup, jax.random.PRNGKey(0))
    ts = step_lib.TrainStep(setup, compiler_options=compiler_options)
    dev_batch = step_lib.put_batch(batch, ts)
    holder = {"state": state}
    info = {}

    def one():
        holder["state"], m = ts(holder["state"], dev_batch)
        info["loss"] = float(jax.block_until_ready(m["loss"]))
    t0 = time.perf_counter()
    one()
    info["first_step_s"] = time.perf_counter() - t0
    return one, info, {"setup": setup, "step": ts, "holder": holder, "batch": dev_batch}


# ---------------------------------------------------------------------------------------- PyTorch

def torch_model(cfg):
    import torch
    import transformers
    from torch import nn

    v, t = cfg.vision, cfg.text

    class Merger(nn.Module):
        def __init__(self):
            super().__init__()
            g = v.spatial_merge_size ** 2 * v.hidden_size
            self.ln_q = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
            self.fc1, self.fc2 = nn.Linear(g, g), nn.Linear(g, v.out_hidden_size)

        def forward(self, x):  # [N, P, D] in 2x2-block order -> [N, P/4, H]
            x = self.ln_q(x)
            x = x.reshape(x.shape[0], -1, self.fc1.in_features)
            return self.fc2(nn.functional.gelu(self.fc1(x)))

    class VLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.depth,
                num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.patch_size * 16,
                layer_norm_eps=v.layer_norm_eps, rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta}))
            self.merger = Merger()
            qcfg = transformers.Qwen3Config(
                vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta}, tie_word_embeddings=False)
            qcfg._attn_implementation = "sdpa"
            self.lm = transformers.Qwen3ForCausalLM(qcfg)

        def forward(self, pixel_values, block_index, input_ids, labels, image_token_id: int):
            feats = self.visual(pixel_values).last_hidden_state[:, 1:]      # [N, gh*gw, D], CLS dropped
            feats = feats[:, block_index]                                   # row-major -> 2x2-block order
            merged = self.merger(feats).reshape(-1, t.hidden_size)          # [N * P/4, H]
            emb = self.lm.model.embed_tokens(input_ids)
            mask = (input_ids == image_token_id).unsqueeze(-1)
            emb = emb.masked_scatter(mask, merged.to(emb.dtype))
            return self.lm(inputs_embeds=emb, labels=labels).loss
    return VLM()


def torch_runner(cfg, batch: dict, compile_model: bool):
    """-> (one() running a PyTorch train step, info dict with first_step_s and loss)."""
    import torch

    from ovjax.models.vlm import patch_positions

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_model(cfg).train()
    rows = batch["tokens"].shape[0]
    gh = int(batch["patch_hw"][0, :, 0].max()) + 1
    gw = int(batch["patch_hw"][0, :, 1].max()) + 1
    ps = cfg.vision.patch_size
    # our patch rows (2x2-block order, (c, 14, 14) each) -> images [N, 3, gh*14, gw*14]
    pos = patch_positions((1, gh, gw))
    grid = np.zeros((rows, gh, gw, 3, ps, ps), np.float32)
    grid[:, pos[:, 0], pos[:, 1]] = batch["patches"].reshape(rows, -1, 3, ps, ps)
    images = torch.tensor(grid.transpose(0, 3, 1, 4, 2, 5).reshape(rows, 3, gh * ps, gw * ps))
    block_index = torch.tensor(pos[:, 0] * gw + pos[:, 1])
    ids = torch.tensor(batch["tokens"].astype(np.int64))
    labels = torch.tensor(np.where(np.roll(batch["loss_mask"], 1, axis=1), batch["tokens"], -100).astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-5, betas=(0.9, 0.99), weight_decay=0.0)
    fwd = torch.compile(model) if compile_model else model
    out = {}

    def one():
        opt.zero_grad(set_to_none=True)
        loss = fwd(images, block_index, ids, labels, cfg.image_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out["loss"] = float(loss.detach())
    t0 = time.perf_counter()
    one()
    out["first_step_s"] = time.perf_counter() - t0
    return one, out


# -------------------------------------------------------------------------------------------- run

def run(presets=("tiny", "mid"), steps: int = 5, warmup: int = 1, compile_torch: bool = True,
        jax_compiler_options: dict | None = None) -> dict:
    """Per preset: build every framework's step (its first step timed alone), then time them interleaved
    (one step of each in turn, `steps` rounds) so that load on a shared machine hits all of them alike."""
    import jax

    from ovjax.train import flops as flops_lib, metrics

    peak, peak_src = metrics.peak_flops(jax.devices()[0])
    result = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "peak_flops": peak,
              "peak_source": peak_src, "rows": []}
    for preset in presets:
        cfg = model_config(preset)
        rows, seq_len, grid = SHAPES[preset]
        batch = make_batch(cfg, rows, seq_len, grid)
        f = flops_lib.step_flops(cfg, rows, seq_len, grid[0] * grid[1], 1)["train"]
        tokens = rows * seq_len
        builders = {"ovjax (jax.jit)": lambda: jax_runner(cfg, batch, jax_compiler_options)[:2],
                    "PyTorch eager": lambda: torch_runner(cfg, batch, False)}
        if compile_torch:
            builders["PyTorch torch.compile"] = lambda: torch_runner(cfg, batch, True)
        preset_rows, runners = {}, {}
        for name, build in builders.items():
            preset_rows[name] = row = {"preset": preset, "framework": name, "flops_per_step": f,
                                       "batch": f"{rows}x{seq_len}, {grid[0]}x{grid[1]} patches"}
            try:
                runners[name], row["_info"] = build()
            except Exception as e:  # a framework that does not run here is reported, not hidden
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
        load_before = load_average()
        times = time_interleaved(runners, steps, warmup)
        for name, row in preset_rows.items():
            if name in runners:
                r = {**summarize(times[name]), **row.pop("_info")}
                row.update(r, tokens_per_s=tokens / r["step_s"], mfu=f / r["step_s"] / peak,
                           load_average=f"{load_before} -> {load_average()}")
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        base = next((r for r in result["rows"] if r["preset"] == preset and r["framework"].startswith("ovjax")
                     and "tokens_per_s" in r), None)
        for r in result["rows"]:
            if r["preset"] == preset and base and "tokens_per_s" in r:
                r["ovjax_speedup"] = base["tokens_per_s"] / r["tokens_per_s"]
    return result


def markdown(result: dict) -> str:
    lines = [f"CPU: {result['cpu_count']} cores; peak {result['peak_flops'] / 1e9:.1f} GFLOP/s ({result['peak_source']})",
             "Timed interleaved (one step of each framework in turn); s/step is the median with [min, max].",
             "", "| preset | batch | framework | s/step [min, max] | CPU s/step | tokens/s | MFU | ovjax speed-up |"
             " load (1/5/15 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['framework']} | failed: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['framework']} | {r['step_s']:.3f} "
                         f"[{r['step_s_min']:.3f}, {r['step_s_max']:.3f}] | {r['cpu_s']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['ovjax_speedup']:.2f}x | "
                         f"{r['load_average']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovjax.bench.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,mid")
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework (median reported)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--smoke", action="store_true", help="tiny preset, one timed step, eager PyTorch only")
    args = p.parse_args(argv)
    if args.smoke:  # XLA's quick compile: the smoke checks that everything runs, not its speed
        res = run(("tiny",), steps=1, warmup=0, compile_torch=False,
                  jax_compiler_options={"xla_backend_optimization_level": 0})
    else:
        res = run(tuple(s.strip() for s in args.presets.split(",") if s.strip()), steps=args.steps,
                  compile_torch=not args.no_compile)
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if all("error" not in r for r in res["rows"] if not r["framework"].endswith("compile")) else 1


if __name__ == "__main__":
    sys.exit(main())
