"""The cost model (``python -m vits_fast.profile --estimate``): fake-tensor traces, per-op estimates, report.

Traces run on fake CPU tensors (no data), so even the Piper-medium training step at batch 32 takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from vits_fast import costmodel as cm
from vits_fast import profile as vp

TINY_TRAIN = vp.Sizes(2, 12, 48)
TINY_INFER = vp.Sizes(2, 16, 0)


@pytest.fixture(scope="module")
def tiny_train():
    c = cm.device_constants("h100")
    return cm.estimate("train-step", "tiny", TINY_TRAIN, c), c


def _run_cli(capsys, *argv: str) -> str:
    vp.main(list(argv))
    return capsys.readouterr().out


@pytest.mark.parametrize("workload,config", [("train-step", "tiny"), ("infer", "tiny"), ("infer", "x-low")])
def test_cli_small_configs(capsys, workload, config):
    extra = ["--batch", "2", "--text-len", "12", "--frames", "48"] if workload == "train-step" else [
        "--batch", "2", "--text-len", "16"]
    out = _run_cli(capsys, "--estimate", "h100", "--workload", workload, "--config", config, *extra)
    assert "ESTIMATE, not a measurement" in out
    for stage in (vp.TRAIN_STAGES if workload == "train-step" else ("text_encoder", "duration_predictor", "flow")):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "estimated step ratio reference / fused" in out
    assert "Amdahl ceiling (estimate)" in out


def test_cli_medium_train_step_h100(capsys):
    """The issue's 'done when' command (Piper-medium, batch 32): both paths, every stage, labelled estimates."""
    out = _run_cli(capsys, "--estimate", "h100", "--workload", "train-step", "--config", "medium")
    assert "batch 32" in out and "on H100" in out
    # every table is titled as an estimate
    titles = [line for line in out.splitlines() if line.startswith(("Per stage", "By op family", "By module"))]
    assert len(titles) == 3 and all("estimate" in t for t in titles)
    # the fused path runs the fused families, the reference path none
    family = out.split("By op family", 1)[1].split("By module", 1)[0]
    fused_row = next(line for line in family.splitlines() if line.startswith("fused"))
    ref_ms, fused_ms = float(fused_row.split()[1]), float(fused_row.split()[3])
    assert ref_ms == 0.0 and fused_ms > 0.0
    assert "SynthesizerTrn.dec.resblocks.0" in out and "MultiPeriodDiscriminator.discriminators.0" in out
    # issue 12's measure: both fused paths are estimated faster than the reference (benchmarks/ESTIMATES.md)
    step = next(line for line in out.splitlines() if line.startswith("Estimated step:"))
    ms = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) ms", step)}
    assert max(ms["default"], ms["fused"]) < ms["reference"], step


def test_default_path_fuses_what_auto_picks(tiny_train):
    """The default trace runs backend auto: in training every family but the decoder (a small window)."""
    (_, fused, default), _ = tiny_train
    names = {op.name.split(".", 1)[1] for op in default.ops if op.name.startswith("vits_fast.")}
    assert {"maximum_path", "rq_spline_coupling_bwd", "wn_gate_bwd", "affine_coupling_bwd"} <= names
    assert not any(n.startswith("hifigan") for n in names)
    assert any(op.name.startswith("vits_fast.hifigan") for op in fused.ops)  # the fused path has the decoder too


def test_totals_are_sums_of_rows(tiny_train):
    (reference, fused, _), _ = tiny_train
    for trace in (reference, fused):
        stages = cm.stage_estimates(trace)
        assert {s.name for s in stages} >= set(vp.TRAIN_STAGES)
        assert sum(s.ops for s in stages) == len(trace.ops)
        assert math.isclose(sum(s.device_s for s in stages), sum(op.device_s for op in trace.ops), rel_tol=1e-9)
        assert math.isclose(sum(s.host_s for s in stages), sum(op.host_s for op in trace.ops), rel_tol=1e-9)
        assert math.isclose(cm.step_s(trace), sum(s.time_s for s in stages), rel_tol=1e-9)
        for s in stages:  # overlap never beats the slower side, and never loses more than serialising both
            assert max(s.device_s, s.host_s) <= s.time_s * (1 + 1e-9) <= (s.device_s + s.host_s) * (1 + 1e-9)
        assert math.isclose(sum(cm.family_device_s(trace).values()), sum(op.device_s for op in trace.ops),
                            rel_tol=1e-9)


def test_fused_op_bytes_follow_their_formula(tiny_train):
    """wn_gate reads each input once and writes acts [b, h, t], half of x_in [b, 2h, t]."""
    (_, fused, _), _ = tiny_train
    gates = [op for op in fused.ops if op.name == "vits_fast.wn_gate"]
    assert gates
    for op in gates:
        x_in = op.reads[0][1]
        assert op.nbytes == sum(b for _, b in op.reads) + x_in // 2
        assert op.host_kind == "custom" and op.family == "fused"
    # aten ops count their inputs and outputs
    conv = next(op for op in fused.ops if op.name == "aten.convolution")
    moved = sum(b for _, b in conv.reads) + sum(b for _, b in conv.writes)
    assert conv.nbytes in (moved, 2 * moved)  # 2x: cuDNN's NHWC transposes of a k > 1 fp32 convolution


def test_no_views_or_allocations_are_counted(tiny_train):
    (reference, fused, _), _ = tiny_train
    names = {op.name for t in (reference, fused) for op in t.ops}
    assert not names & {"aten.view", "aten.as_strided", "aten.unsqueeze", "aten.transpose", "aten.detach",
                        "aten.empty", "aten.t", "aten.slice", "aten.expand"}


def test_reference_path_has_no_fused_ops_and_syncs_in_the_search(tiny_train):
    (reference, fused, _), _ = tiny_train
    assert not any(op.family == "fused" for op in reference.ops)
    assert any(op.name == "host.maximum_path" and op.sync for op in reference.ops)
    assert any(op.name == "vits_fast.maximum_path" for op in fused.ops)


def _totals(trace, c):
    ops = [cm.estimate_op(dataclasses.replace(op), c) for op in trace.ops]
    return sum(op.device_s for op in ops), sum(op.host_s for op in ops)


def test_estimates_move_the_right_way_with_overrides(tiny_train):
    (reference, fused, _), c = tiny_train
    dev, host = _totals(fused, c)
    slow_mem = dataclasses.replace(c, copy_bytes_per_s=c.copy_bytes_per_s / 4)
    assert _totals(fused, slow_mem)[0] > dev
    assert _totals(fused, dataclasses.replace(c, kernel_floor_s=c.kernel_floor_s * 2))[0] > dev
    assert _totals(fused, dataclasses.replace(c, aten_op_s=c.aten_op_s * 2))[1] > host
    assert _totals(fused, dataclasses.replace(c, custom_op_s=c.custom_op_s * 2))[1] > host
    assert _totals(fused, dataclasses.replace(c, triton_launch_s=c.triton_launch_s * 2))[1] > host
    # (at the tiny size the fused path's convolutions are all memory-bound; the reference's 2-D ones are not)
    fast = dataclasses.replace(c, conv_flops={k: v * 10 for k, v in c.conv_flops.items()})
    assert _totals(reference, fast)[0] < _totals(reference, c)[0]


def test_cli_flags_and_calibration_file(tmp_path, capsys):
    args = vp.build_parser().parse_args(["--estimate", "h200", "--bandwidth-tbs", "1.5", "--custom-op-us", "99"])
    c = cm.constants_from_args(args)
    assert c.copy_bytes_per_s == 1.5e12 and c.custom_op_s == pytest.approx(99e-6)
    cal = dict(cm.H200_CALIBRATION, copy_bytes_per_s=1e12, launch_s={"torch": 2 * 10.89e-6, "triton": 5e-6})
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    base = cm.device_constants("h100")
    loaded = cm.load_calibration(str(path), base)
    assert loaded.copy_bytes_per_s == 1e12 and loaded.triton_launch_s == 5e-6
    assert loaded.aten_op_s == pytest.approx(2 * base.aten_op_s)  # host costs scale with the bare launch time
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"copy_bytes_per_s": 1e12}))
    with pytest.raises(ValueError, match="not a benchmarks/calibrate.py file"):
        cm.load_calibration(str(bad), base)
    with pytest.raises(SystemExit, match="supports the workloads"):
        vp.main(["--estimate", "h100", "--workload", "kernel:mas"])
    with pytest.raises(SystemExit, match="must be positive"):
        cm.constants_from_args(vp.build_parser().parse_args(["--estimate", "a100", "--aten-op-us", "-1"]))


def test_scaled_devices_are_labelled_and_ordered():
    h200, h100, a100 = (cm.device_constants(g) for g in ("h200", "h100", "a100"))
    assert "measured" in h200.source and "not measured" in h100.source and "not measured" in a100.source
    assert h200.copy_bytes_per_s > h100.copy_bytes_per_s > a100.copy_bytes_per_s
    assert h100.conv_flops["tf32"] > a100.conv_flops["tf32"]
    with pytest.raises(ValueError, match="--estimate must be one of"):
        cm.device_constants("v100")


def _op(device_s: float, host_s: float, sync: bool = False) -> cm.Op:
    return cm.Op("aten.add", "elementwise", "s", "", 0.0, 0.0, "", "fp32", 1, "aten", sync=sync,
                 device_s=device_s, host_s=host_s)


def test_host_syncs_cut_the_overlap():
    # without a sync the slower side wins; a sync after the first op serialises the two halves
    assert cm.overlapped_s([_op(5, 1), _op(1, 5)]) == 6
    assert cm.overlapped_s([_op(5, 1, sync=True), _op(1, 5)]) == 10
    assert cm.overlapped_s([]) == 0
