"""The step profile (ovjax/bench/step_profile.py): HLO/trace attribution on a hand-made module, and a smoke run."""

import gzip
import json

import pytest

from ovjax.bench import step_profile as sp

HLO = """HloModule jit_step

%fused_computation.1 (param_0: f32[2,3], param_1: f32[3,4]) -> f32[2,4] {
  %param_0 = f32[2,3]{1,0} parameter(0)
  %param_1 = f32[3,4]{1,0} parameter(1)
  ROOT %dot.0 = f32[2,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: f32[2,4]) -> f32[4,2] {
  %param_0.1 = f32[2,4]{1,0} parameter(0)
  %exponential.1 = f32[2,4]{1,0} exponential(%param_0.1)
  ROOT %copy.5 = f32[4,2]{0,1} copy(%exponential.1)
}

ENTRY %main.9 (a: f32[2,3], b: f32[3,4]) -> f32[4,2] {
  %a = f32[2,3]{1,0} parameter(0)
  %b = f32[3,4]{1,0} parameter(1)
  %ynn_fusion.1 = f32[2,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/transpose(jvp(VLM))/language_model/while/body/closed_call/layers/up_proj/dot_general" stack_frame_id=3}
  %copy_bitcast_fusion.2 = f32[4,2]{1,0} fusion(%ynn_fusion.1), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(step)/transpose(jvp(jvp()))/checkpoint/exp"}
  %wrapped_broadcast.3 = f32[4,4]{1,0} fusion(), kind=kLoop, calls=%fused_computation.2
  ROOT %while.4 = f32[4,2]{1,0} while(%copy_bitcast_fusion.2), condition=%c, body=%b, metadata={op_name="jit(step)/jvp(VLM)/language_model/while"}
}
"""


def _trace(tmp_path, events):
    d = tmp_path / "plugins" / "profile" / "2026_01_01"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(tmp_path)


def test_ops_are_attributed_by_metadata_and_fused_opcodes(tmp_path):
    ops = sp.compiled_ops(HLO)
    assert ops["ynn_fusion.1"].fused >= {"dot", "fusion"} and ops["ynn_fusion.1"].shape == "f32[2,4]{1,0}"
    events = [{"ph": "X", "name": "ynn_fusion.1", "dur": 300}, {"ph": "X", "name": "ynn_fusion.1", "dur": 300},
              {"ph": "X", "name": "copy_bitcast_fusion.2", "dur": 100},
              {"ph": "X", "name": "wrapped_broadcast.3", "dur": 300},
              {"ph": "X", "name": "while.4", "dur": 5000},            # holds its body's ops: left out
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000}, {"ph": "M", "name": "ynn_fusion.1"}]
    times = sp.op_times(_trace(tmp_path, events), ops)
    assert dict(times) == {"ynn_fusion.1": 600.0, "copy_bitcast_fusion.2": 100.0, "wrapped_broadcast.3": 300.0}
    b = sp.breakdown(times, ops, steps=2)
    assert b["op_ms_per_step"] == pytest.approx(0.5)
    part = {r["what"]: r["share"] for r in b["part"]}
    assert part == pytest.approx({"LLM blocks": 0.6, "loss head (lm_head + cross-entropy)": 0.1,
                                  "no metadata (scan buffers, constants)": 0.3})
    kind = {r["what"]: r["ms_per_step"] for r in b["kind"]}
    assert kind == pytest.approx({"matmul: weights": 0.3, "fusion into a transposed layout (copy)": 0.05,
                                  "broadcast fill": 0.15})
    phase = {r["what"]: r["share"] for r in b["phase"]}
    assert phase == pytest.approx({"backward": 0.7, "no metadata": 0.3})
    assert b["top_ops"][0]["op"] == "ynn_fusion.1"


def test_a_trace_without_step_ops_is_an_error(tmp_path):
    ops = sp.compiled_ops(HLO)
    with pytest.raises(ValueError, match="no event named like an instruction"):
        sp.breakdown(sp.op_times(_trace(tmp_path, [{"ph": "X", "name": "other", "dur": 1}]), ops), ops, 1)
    with pytest.raises(FileNotFoundError, match="trace.json.gz"):
        sp.op_times(str(tmp_path / "nothing"), ops)


def test_step_profile_smoke(tmp_path):
    out = tmp_path / "profile.json"
    assert sp.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    prof = res["profile"]
    for key in ("part", "kind", "phase"):
        assert sum(r["share"] for r in prof[key]) == pytest.approx(1.0)
    parts = {r["what"] for r in prof["part"]}
    assert {"LLM blocks", "vision tower + merger", "loss head (lm_head + cross-entropy)"} <= parts
    names = {t["what"] for t in res["timings"]}
    assert names == {"ovjax step (jit)", "forward (loss)", "forward + backward", "optimizer update",
                     "loss head alone (fwd + bwd)", "PyTorch eager step"}
    assert all(t["step_s"] > 0 for t in res["timings"])
