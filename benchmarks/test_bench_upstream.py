"""Synthesis side by side with upstream: vits_fast's ``SynthesizerTrn.infer`` against upstream Piper's own PyTorch
model (``piper.train.vits.models`` from the ``piper-tts`` package, OHF-Voice/piper1-gpl) holding the same weights,
and against onnxruntime running the same voice exported by ``vits_fast.export``: same phoneme ids, same scales,
same random seed, batch 1.

Entries: ``reference`` (vits_fast, its default path for the device), ``upstream`` (Piper's class, loaded with
``strict=True`` from our state_dict), ``onnxruntime`` (CPU execution provider). The report's speedup column is
over ``reference``, so ``upstream``'s shows how much faster (above 1) or slower (below 1) upstream is than
vits_fast. Before timing, each entry's audio is checked against vits_fast's (zero noise), so the three compute the
same thing. Shapes: x-low and medium, 80 phoneme ids; a CPU runs x-low only (medium takes seconds per call there).
"""

from __future__ import annotations

import pytest
import torch

import vits_fast
from _bench import DEVICE, ON_CUDA, measure, median_s
from vits_fast.config import model_kwargs

CONFIGS = ("x-low", "medium")
CPU_CONFIGS = ("x-low",)
IMPLS = ("reference", "upstream", "onnxruntime")
TEXT_LEN = 80
SCALES = dict(noise_scale=0.667, length_scale=1.0, noise_scale_w=0.8)
CASES = [(c, i) for c in CONFIGS for i in IMPLS]


def _models(config: str):
    torch.manual_seed(0)
    ours = vits_fast.SynthesizerTrn(**model_kwargs(config, num_symbols=256)).eval()
    with torch.no_grad():  # zero-initialised flow projections would make the flows identities
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ours


def _upstream(ours: torch.nn.Module, config: str):
    models = pytest.importorskip("piper.train.vits.models", reason="upstream Piper's model code comes with "
                                 "`pip install piper-tts` (the test extra installs it)")
    theirs = models.SynthesizerTrn(**model_kwargs(config, num_symbols=256))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.eval()


def _onnx_session(ours: torch.nn.Module, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (the onnx extra)")
    from vits_fast import export, voice_config

    path = export.export_onnx(ours, tmp_path / "voice.onnx", voice_config.make_voice_config(ours))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("config,impl", CASES, ids=[f"{c}-{i}" for c, i in CASES])
def test_infer_vs_upstream(benchmark, tmp_path, config, impl):
    if not ON_CUDA and config not in CPU_CONFIGS:
        pytest.skip(f"config {config!r} is timed on CUDA only; the CPU suite runs {', '.join(CPU_CONFIGS)}")
    ours = _models(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (1, TEXT_LEN), generator=g)
    lengths = torch.tensor([TEXT_LEN])

    def torch_call(model, device, **scales):
        xd, ld = x.to(device), lengths.to(device)

        def call():
            torch.manual_seed(2)
            with torch.no_grad():
                return model.infer(xd, ld, **scales)[0]
        return call

    silent = dict(SCALES, noise_scale=0.0, noise_scale_w=0.0)
    expected = torch_call(ours, "cpu", **silent)().squeeze()
    if impl == "onnxruntime":
        sess = _onnx_session(ours, tmp_path)
        feed = {"input": x.numpy(), "input_lengths": lengths.numpy()}

        def run_with(scales):
            s = [scales["noise_scale"], scales["length_scale"], scales["noise_scale_w"]]
            return lambda: sess.run(None, dict(feed, scales=torch.tensor(s).numpy()))[0]

        got = torch.from_numpy(run_with(silent)()).squeeze()
        fn = run_with(SCALES)
    else:
        model = _upstream(ours, config) if impl == "upstream" else ours
        model = model.to(DEVICE)
        got = torch_call(model, DEVICE, **silent)().squeeze().cpu()
        fn = torch_call(model, DEVICE, **SCALES)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-3, "the entries must compute the same audio"
    sample_rate = 16000 if config == "x-low" else 22050  # Piper's x-low voices are 16 kHz, the others 22.05
    audio_s = expected.numel() / sample_rate
    extra = dict(subject="infer-vs-upstream", config=config, batch=1, text_len=TEXT_LEN, audio_s=round(audio_s, 4),
                 sample_rate=sample_rate)
    measure(benchmark, fn, impl=impl, extra=extra, group=f"infer vs upstream [{config}, batch 1, t_x={TEXT_LEN}]")
    t = median_s(benchmark)
    if t is not None:
        benchmark.extra_info["rtf_median"] = t / audio_s
