"""``python -m vits_fast.profile``: stage and kernel tables, Chrome trace, workload builders (CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vits_fast import profile as vp

CPU = torch.device("cpu")
ISSUE_STAGES = ("text_encoder", "duration_predictor", "alignment_search", "posterior_encoder", "flow", "decoder",
                "discriminator", "losses")


def _stage_table(text: str) -> dict:
    """{stage: (calls, cpu_ms)} parsed from the printed per-stage table."""
    block = text.split("Per stage", 1)[1].split("Per kernel", 1)[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)%", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    return rows


def test_cli_train_step_x_low_prints_every_stage(tmp_path):
    """The issue's command on x-low (smallest batch, lengths and window so it fits CI time on a CPU)."""
    trace = tmp_path / "traces" / "train-step_x-low.json"  # the default name, in the folder named
    cmd = [sys.executable, "-m", "vits_fast.profile", "--workload", "train-step", "--config", "x-low",
           "--device", "cpu", "--batch", "1", "--text-len", "8", "--frames", "16", "--segment-frames", "8",
           "--steps", "1", "--warmup", "0", "--threads", "1", "--output-dir", "traces"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"Chrome trace: {trace.resolve()}" in out  # the absolute path
    assert "Profiler clears events" not in proc.stderr  # no stray profiler lines
    assert "train-step, config x-low, cpu" in out
    stages = _stage_table(out)
    for name in vp.TRAIN_STAGES:
        assert name in stages, f"stage {name} missing from the table:\n{out}"
        calls, ms = stages[name]
        assert calls >= 1 and ms > 0, f"stage {name} did not run: {stages[name]}"
    assert set(ISSUE_STAGES) <= set(stages)
    assert stages["discriminator"][0] == 2 and stages["backward"][0] == 2  # G pass and D pass
    kernels = out.split("Per kernel", 1)[1]
    assert re.search(r"aten::\w+\s+\d+\s+[\d.]+", kernels), "the per-kernel table is empty"
    assert "CUDA only" in out  # bandwidth needs a GPU; the CPU run says so
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {f"vits.{s}" for s in vp.TRAIN_STAGES} <= names


@pytest.mark.parametrize("workload,stages", [("kernel:spline", ("forward", "backward")),
                                             ("kernel:coupling", ("forward", "backward")),
                                             ("kernel:wn", ("forward", "backward")),
                                             ("kernel:mas", ("forward",)),
                                             ("infer", vp.INFER_STAGES)])
def test_profile_workloads_tiny(workload, stages, tmp_path):
    sizes = {"kernel:spline": vp.Sizes(2, 8, 0), "kernel:mas": vp.Sizes(2, 8, 24),
             "infer": vp.Sizes(2, 8, 0)}.get(workload, vp.Sizes(2, 0, 12))
    r = vp.profile_workload(workload, "tiny", device=CPU, sizes=sizes, steps=2, warmup=1,
                            trace=tmp_path / "t.json", row_limit=5)
    got = {s.name: s for s in r.stages}
    assert [s.name for s in r.stages][: len(stages)] == list(stages)
    for name in stages:
        assert got[name].calls == 1, f"{name}: {got[name]} (per step, 2 steps profiled)"
        assert got[name].cpu_ms > 0
    assert "backward" not in got or workload != "kernel:mas"
    assert 0 < len(r.kernels) <= 5 and all(k.total_ms > 0 for k in r.kernels)
    assert r.kernels == sorted(r.kernels, key=lambda k: -k.total_ms)
    assert r.bandwidth == [] and r.copy_gbps is None
    text = vp.format_result(r)
    assert "CUDA only" in text and str(tmp_path / "t.json") in text
    assert (tmp_path / "t.json").stat().st_size > 0


def test_min_bytes_counts_inputs_once_and_outputs():
    f32, b16 = "float", "c10::BFloat16"  # the names torch.profiler records
    # wn_gate: read x_in [2, 8, 5] fp32 (320 B), write acts [2, 4, 5] (160 B); g absent
    assert vp.min_bytes("wn_gate", [[2, 8, 5], []], [f32, ""]) == 480
    # with bf16 and conditioning g [2, 8, 1]: 160 + 32 read, 80 written
    assert vp.min_bytes("wn_gate", [[2, 8, 5], [2, 8, 1]], [b16, b16]) == 272
    # spline backward: reads grad_out [1,2,3], grad_logdet [1], x [1,2,3], h [1,29,3], mask [1,1,3];
    # writes grad_x (= x) and grad_h (= h)
    shapes = [[1, 2, 3], [1], [1, 2, 3], [1, 29, 3], [1, 1, 3], [], []]
    read = (6 + 1 + 6 + 87 + 3) * 4
    assert vp.min_bytes("rq_spline_coupling_bwd", shapes, [f32] * 5) == read + (6 + 87) * 4
    assert vp.min_bytes("not_a_fused_op", [[4]], [f32]) is None


def test_synthetic_batch_is_valid_for_training():
    kwargs, _ = vp.model_setup("tiny")
    sizes = vp.Sizes(5, 9, 30)
    b = vp.synthetic_batch(kwargs, sizes, CPU, seed=3)
    xl, yl = b.phoneme_lengths, b.spectrogram_lengths
    assert int(xl[0]) == 9 and int(yl[0]) == 30
    assert bool((xl <= yl).all()) and bool((yl >= kwargs["segment_size"]).all())
    for i in range(5):
        assert bool((b.phoneme_ids[i, : xl[i]] > 0).all()) and bool((b.phoneme_ids[i, xl[i]:] == 0).all())
        assert bool((b.spectrograms[i, :, : yl[i]] > 0).all()) and bool((b.spectrograms[i, :, yl[i]:] == 0).all())
    hop = vp.hop_of(kwargs)
    assert b.audios.shape == (5, 1, 30 * hop) and torch.equal(b.audio_lengths, yl * hop)
    with pytest.raises(ValueError, match="training window"):
        vp.synthetic_batch(kwargs, vp.Sizes(1, 4, kwargs["segment_size"] - 1), CPU)


def test_train_step_updates_both_models():
    step = vp.TrainStep("tiny", vp.Sizes(2, 6, 20), CPU, backend="reference")
    g0 = [p.detach().clone() for p in step.model_g.parameters()]
    d0 = [p.detach().clone() for p in step.model_d.parameters()]
    out = step()
    assert out.values.shape == (len(out.names),) and bool(out.finite)
    assert any(not torch.equal(a, p) for a, p in zip(g0, step.model_g.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(d0, step.model_d.parameters()))
    assert all(p.grad is None for p in step.model_g.parameters())  # zeroed for the next step


def test_infer_step_is_deterministic_and_streams():
    step = vp.InferStep("tiny", vp.Sizes(3, 7, 0), CPU)
    a1, n1 = step()
    a2, n2 = step()
    assert torch.equal(a1, a2) and torch.equal(n1, n2)
    assert a1.shape[0] == 3 and int(n1.min()) > 0
    chunk = step.first_chunk(first_chunk_frames=2)
    assert chunk.dim() == 1 and 0 < chunk.numel() <= int(n1[0])
    with pytest.raises(ValueError, match="decoder"):
        vp.InferStep("tiny", vp.Sizes(1, 4, 0), CPU, decoder="bogus")


def test_kernel_case_gradients_reach_inputs_and_weights():
    case = vp.make_kernel_case("coupling", "tiny", vp.Sizes(2, 0, 10), CPU, backend="reference")
    outs, grads = vp.backward_inputs(case.forward())
    torch.autograd.backward(outs, grads)
    assert case.params[0].grad is not None and float(case.params[0].grad.abs().sum()) > 0
    assert all(p.grad is not None for p in case.module.parameters())
    case.grads_to_none()
    assert all(p.grad is None for p in case.params)
    mas = vp.make_kernel_case("mas", "tiny", vp.Sizes(3, 5, 12), CPU, backend="reference")
    (path,) = mas.forward()
    assert not mas.backward_supported
    assert torch.equal(path.sum(2), mas.info["mask"][:, :, 0])  # one text position per valid frame


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="config"):
        vp.model_setup("huge")
    with pytest.raises(ValueError, match="workload"):
        vp.build_workload("nope", "tiny", vp.Sizes(1, 4, 8), CPU)
    with pytest.raises(ValueError, match="subject"):
        vp.make_kernel_case("nope", "tiny", vp.Sizes(1, 4, 8), CPU)
    with pytest.raises(ValueError, match="CUDA"):
        vp.copy_bandwidth(CPU)
    with pytest.raises(SystemExit):
        vp.build_parser().parse_args(["--workload", "kernel:nope"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused-kernel bandwidth is measured on CUDA only")
@pytest.mark.parametrize("workload,ops", [("kernel:wn", {"wn_gate", "wn_gate_bwd", "wn_res_skip", "wn_out"}),
                                          ("kernel:spline", {"rq_spline_coupling", "rq_spline_coupling_bwd"}),
                                          ("kernel:coupling", {"affine_coupling", "affine_coupling_bwd"}),
                                          ("kernel:mas", {"maximum_path"})])
def test_cuda_bandwidth_table(workload, ops):
    dev = torch.device("cuda")
    r = vp.profile_workload(workload, "x-low", device=dev, sizes=vp.default_sizes(workload, dev), backend="triton",
                            steps=1, warmup=1)
    assert r.copy_gbps is not None and r.copy_gbps > 100  # any data-centre GPU copies > 100 GB/s
    got = {b.op: b for b in r.bandwidth}
    assert ops <= set(got), f"fused ops missing from the bandwidth table: {ops - set(got)}"
    for b in got.values():
        assert b.bytes_per_call > 0 and b.device_us > 0
        # Small working sets can sit in L2 and beat the HBM copy; far above it the byte count would be wrong.
        assert 0 < b.fraction_of_copy < 4
    assert all(s.device_ms > 0 for s in r.stages)
    assert r.kernels and all(k.total_ms > 0 for k in r.kernels)
    assert "% copy" in vp.format_result(r)


@pytest.mark.parametrize("workload,ops", [
    ("kernel:wn", {"wn_gate", "wn_gate_bwd", "wn_res_skip", "wn_res_skip_bwd", "wn_out", "wn_out_bwd"}),
    ("kernel:spline", {"rq_spline_coupling", "rq_spline_coupling_bwd"}),
    ("kernel:coupling", {"affine_coupling", "affine_coupling_bwd"}),
    ("kernel:mas", {"maximum_path"}),
])
def test_fused_ops_are_named_and_sized_in_the_profiler(workload, ops):
    """The bandwidth table finds the fused ops by their ``vits_fast::`` profiler names and sizes them from the
    recorded input shapes (on a CPU the kernels run in the Triton interpreter)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda") if torch.cuda.is_available() else CPU
    sizes = {"kernel:spline": vp.Sizes(2, 8, 0), "kernel:mas": vp.Sizes(2, 6, 20)}.get(workload, vp.Sizes(2, 0, 9))
    run, _ = vp.build_workload(workload, "tiny", sizes, dev, backend="triton")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    seen = {}
    for e in prof.events():
        if e.name.startswith("vits_fast::"):
            op = e.name.split("::", 1)[1]
            seen[op] = vp.min_bytes(op, e.input_shapes, e.input_dtypes)
    assert ops <= set(seen), f"fused ops not seen by the profiler: {ops - set(seen)}"
    assert set(seen) <= set(vp.FUSED_OUTPUTS), f"fused ops without a byte count: {set(seen) - set(vp.FUSED_OUTPUTS)}"
    b = sizes.batch
    if workload == "kernel:wn":  # x_in [b, 2h, t] read, acts [b, h, t] written; h = 16, t = 9, fp32
        assert seen["wn_gate"] == b * 2 * 16 * 9 * 4 + b * 16 * 9 * 4
    if workload == "kernel:mas":  # neg_cent [b, 20, 6] read and path written; two int32 [b] lengths read
        assert seen["maximum_path"] == 2 * b * 20 * 6 * 4 + 2 * b * 4
    assert all(v and v > 0 for v in seen.values())
