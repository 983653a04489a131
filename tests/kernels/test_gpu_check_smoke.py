"""Smoke run of the GPU check's pieces on CPU (interpreted kernels, tiny shapes), and its FLOP counting."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ovjax.bench import attention as bench

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_launcher():
    spec = importlib.util.spec_from_file_location("gpu_attention_bench", ROOT / "launch" / "gpu_attention_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_visible_pairs_count_causal_as_half():
    assert bench.Case("c", 6, 1, 1, 16, True, "bfloat16", (3, 2)).visible_pairs() == 6 + 3
    assert bench.Case("b", 6, 1, 1, 16, False, "bfloat16", (3, 2)).visible_pairs() == 9 + 4
    assert bench.Case("u", 8, 1, 1, 16, True, "bfloat16", b=2).visible_pairs() == 2 * 36
    assert bench.Case("u", 8, 2, 1, 16, True, "bfloat16").fwd_flops() == 4 * 16 * 2 * 36
    with pytest.raises(ValueError, match="exceed"):
        bench.Case("x", 4, 1, 1, 16, True, "bfloat16", (3, 2)).segment_ids()


def test_check_bench_and_table_run_interpreted(monkeypatch):
    case = bench.Case("tiny packed", 40, 2, 1, 16, True, "float32", (15, 1, 20))
    monkeypatch.setattr(bench, "check_cases", lambda smoke: [case])
    checks = bench.run_check(True, True, None)
    assert checks[0]["ok"], checks
    rows = [bench.bench_one(case, impl, True, 1) for impl in ("pallas", "xla")]
    for r in rows:
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwd_bwd_tflops"] > 0, r
    res = {"backend": "cpu", "jax": "x", "interpret": True, "check": checks, "bench": rows, "sweep": []}
    table = bench.markdown(res)
    assert "| tiny packed | yes |" in table and "| tiny packed | pallas |" in table
    json.dumps(res)  # the JSON written on the GPU machine


def test_launcher_writes_json_atomically(monkeypatch, tmp_path):
    launcher = load_launcher()
    launcher.map_kernels_package()
    monkeypatch.setenv("OUT", str(tmp_path))
    launcher.write_json({"a": 1})
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check.json"]


def test_xla_flags_merge_keeps_the_callers_flags():
    spec = importlib.util.spec_from_file_location("xla_flags", ROOT / "launch" / "xla_flags.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    merged = flags.merged("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x").split()
    assert merged.count("--xla_gpu_enable_latency_hiding_scheduler=false") == 1
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in merged
    assert merged[-1] == "--xla_dump_to=/tmp/x" and "--xla_gpu_enable_pipelined_all_gather=true" in merged
    env = {"XLA_FLAGS": ""}
    assert flags.apply(env).split() == list(flags.GPU_FLAGS)


def test_gpu_check_script_smoke(tmp_path):
    """`GPU_CHECK_SMOKE=1 bash launch/gpu_check.sh` on the CPU: exit 0, every section in the JSON, the XLA
    flags applied (this XLA knows them all), and the train step run in its own process."""
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are not the check's business
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["xla_flags_note"] == "applied" and "--xla_gpu_enable_latency_hiding_scheduler=true" in res["xla_flags"]
    assert len(res["check"]) == 3 and all(r["ok"] for r in res["check"]), res["check"]
    assert [r["case"] for r in res["bench"]] == [c.name for c in bench.bench_cases(True)]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in res["bench"]), res["bench"]
    result = res["train_step"]
    assert result["step_s"] > 0 and 0 < result["mfu"] < 1, result
    assert res["elapsed_s"] > 0 and "## ovjax GPU check" in proc.stdout
