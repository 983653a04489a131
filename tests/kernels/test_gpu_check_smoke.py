"""Smoke run of the GPU check's pieces on CPU (interpreted kernels, tiny shapes), and its FLOP counting."""

from __future__ import annotations

import importlib.util
import json
import pathlib

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


def test_launcher_maps_kernels_and_runs_the_train_step_hook(monkeypatch, tmp_path):
    launcher = load_launcher()
    launcher.map_kernels_package()
    result = launcher.train_step_hook(True, deadline=float("inf"))
    assert result["step_s"] > 0 and 0 < result["mfu"] < 1, result
    monkeypatch.setenv("OUT", str(tmp_path))
    launcher.write_json({"a": 1})
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"a": 1}
