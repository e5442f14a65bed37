"""The drop-in contract of the reference model: names, shapes, upstream outputs, invariances and input errors.

``data/piper_state_dicts.json`` holds key -> shape tables produced by instantiating upstream Piper's
``SynthesizerTrn`` (rhasspy/piper, ``src/python/piper_train/vits``) with Piper's presets; ``data/upstream_golden.pt``
holds a tiny upstream model's weights, inputs and outputs of ``forward``/``infer``/``voice_conversion`` under fixed
seeds. Neither needs upstream code at test time.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vits_fast
from vits_fast import commons, models, modules
from vits_fast.config import model_kwargs, tiny_model_kwargs

from tests._util import randomised as _randomised

DATA = Path(__file__).parent / "data"
TABLES = json.loads((DATA / "piper_state_dicts.json").read_text())
PRESET_CASES = {"x-low": ("x-low", 1), "medium": ("medium", 1), "medium-multispeaker": ("medium", 10),
                "high": ("high", 1)}


def _normalise(kwargs):
    return json.loads(json.dumps(kwargs))


@pytest.mark.parametrize("case", list(PRESET_CASES))
def test_state_dict_matches_upstream_table(case):
    table = TABLES[case]
    quality, n_speakers = PRESET_CASES[case]
    kwargs = model_kwargs(quality, num_symbols=256, num_speakers=n_speakers)
    assert _normalise(kwargs) == table["kwargs"], "our presets differ from Piper's"
    with torch.device("meta"):
        model = vits_fast.SynthesizerTrn(**kwargs)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(table["state_dict"]) - set(ours))
    extra = sorted(set(ours) - set(table["state_dict"]))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {k: (ours[k], s) for k, s in table["state_dict"].items() if ours[k] != s}
    assert not wrong, f"shape mismatches: {list(wrong.items())[:5]}"
    assert any(k.endswith("weight_g") for k in ours) and any(k.endswith("weight_v") for k in ours)


def test_upstream_shaped_state_dict_loads_strict():
    table = TABLES["medium-multispeaker"]
    model = vits_fast.SynthesizerTrn(**model_kwargs("medium", num_symbols=256, num_speakers=10))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*s, generator=g) for k, s in table["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()["emb_g.weight"], state["emb_g.weight"])
    assert torch.equal(model.state_dict()["enc_q.enc.cond_layer.weight_v"], state["enc_q.enc.cond_layer.weight_v"])


def test_discriminator_matches_upstream_table():
    with torch.device("meta"):
        d = vits_fast.MultiPeriodDiscriminator()
    assert {k: list(v.shape) for k, v in d.state_dict().items()} == TABLES["discriminator"]["state_dict"]


# --- same outputs as upstream ---------------------------------------------------------------------------------

GOLDEN = torch.load(DATA / "upstream_golden.pt", weights_only=True)


def _close(ours, theirs, name):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_outputs_equal_upstream(case):
    rec = GOLDEN[case]
    model = vits_fast.SynthesizerTrn(**rec["kwargs"])
    model.load_state_dict(rec["state_dict"], strict=True)
    args = (rec["x"], rec["x_lengths"], rec["y"], rec["y_lengths"])

    with vits_fast.backend("reference"):
        model.train()
        torch.manual_seed(1)
        o, l_length, attn, ids_slice, _, _, (z, z_p, m_p, logs_p, m_q, logs_q) = model(*args, sid=rec["sid"])
        ours = dict(o=o, l_length=l_length, attn=attn, ids_slice=ids_slice, z=z, z_p=z_p, m_p=m_p, logs_p=logs_p,
                    m_q=m_q, logs_q=logs_q)
        for k, v in rec["forward"].items():
            _close(ours[k], v, f"forward.{k}")

        model.eval()
        torch.manual_seed(2)
        with torch.no_grad():
            o, attn, y_mask, (z, z_p, _, _) = model.infer(rec["x"], rec["x_lengths"], sid=rec["sid"])
        for k, v in dict(attn=attn, y_mask=y_mask, z=z, z_p=z_p).items():
            _close(v, rec["infer"][k], f"infer.{k}")
        # Upstream lets the padding of shorter items leak into their last samples (we mask the decoder):
        # the audio of the longest item is the same, the others are compared one at a time below.
        longest = int(y_mask.sum((1, 2)).argmax())
        _close(o[longest], rec["infer"]["o"][longest], "infer.o[longest]")
        for i, expected in enumerate(rec["infer_single"]):
            torch.manual_seed(10 + i)
            n = int(rec["x_lengths"][i])
            sid = None if rec["sid"] is None else rec["sid"][i: i + 1]
            with torch.no_grad():
                oi = model.infer(rec["x"][i: i + 1, :n], rec["x_lengths"][i: i + 1], sid=sid)[0]
            _close(oi, expected, f"infer_single[{i}]")

        if "voice_conversion" in rec:
            torch.manual_seed(3)
            with torch.no_grad():
                o, y_mask, (z, z_p, z_hat) = model.voice_conversion(rec["y"], rec["y_lengths"],
                                                                    torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0]))
            for k, v in dict(z=z, z_p=z_p, z_hat=z_hat).items():
                _close(v, rec["voice_conversion"][k], f"voice_conversion.{k}")
            longest = int(y_mask.sum((1, 2)).argmax())
            _close(o[longest], rec["voice_conversion"]["o"][longest], "voice_conversion.o[longest]")
            torch.manual_seed(4)
            with torch.no_grad():
                o1 = model.voice_conversion(rec["y"][:1], rec["y_lengths"][:1], torch.tensor([0]),
                                            torch.tensor([2]))[0]
            _close(o1, rec["voice_conversion_single"], "voice_conversion_single")


# --- invariances ------------------------------------------------------------------------------------------------



def _ragged(lengths, extra):
    t = max(lengths) + extra
    lens = torch.tensor(lengths)
    return lens, t, commons.sequence_mask(lens, t).unsqueeze(1).double()


_PAD_KW = tiny_model_kwargs(num_speakers=3)
_PAD_MODELS = {}


def _padding_models(seed):
    """A randomised float64 model and deterministic duration predictor per seed (built once, reused)."""
    if seed not in _PAD_MODELS:
        torch.manual_seed(seed)
        model = _randomised(vits_fast.SynthesizerTrn(**_PAD_KW), seed).double()
        dp = models.DurationPredictor(_PAD_KW["hidden_channels"], 8, 3, 0.5, gin_channels=_PAD_KW["gin_channels"])
        _PAD_MODELS[seed] = (model, _randomised(dp, seed).double())
    return _PAD_MODELS[seed]


@settings(max_examples=10)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), extra=st.integers(1, 6), seed=st.integers(0, 2),
       data_seed=st.integers(0, 2**16))
def test_padding_invariance(lengths, extra, seed, data_seed):
    """Appending padding must not change any output at valid positions."""
    kw = _PAD_KW
    model, dp = _padding_models(seed)
    torch.manual_seed(data_seed)
    lens = torch.tensor(lengths)
    b, t = len(lengths), max(lengths)
    ids = torch.randint(1, kw["n_vocab"], (b, t + extra))
    spec = torch.randn(b, kw["spec_channels"], t + extra, dtype=torch.float64)
    g = model.emb_g(torch.arange(b) % 3).unsqueeze(-1)
    mask = lambda n: commons.sequence_mask(lens, n).unsqueeze(1).double()  # noqa: E731
    noise = torch.randn(b, 2, t + extra, dtype=torch.float64)
    w = torch.randint(1, 4, (b, 1, t + extra)).double()

    def run(n):
        x, m_p, logs_p, x_mask = model.enc_p(ids[:, :n] * mask(n)[:, 0].long(), lens)
        out = {"enc_p.x": x, "enc_p.m": m_p, "enc_p.logs": logs_p}
        h = model.enc_q.enc(model.enc_q.pre(spec[:, :, :n]) * x_mask, x_mask, g=g)
        out["enc_q.hidden"] = h * x_mask
        out["flow"] = model.flow(spec[:, : kw["inter_channels"], :n] * x_mask, x_mask, g=g)
        out["flow.reverse"] = model.flow(spec[:, : kw["inter_channels"], :n] * x_mask, x_mask, g=g, reverse=True)
        out["dp"] = dp(x, x_mask, g=g)
        return out, x, x_mask

    def sdp_nll(x, x_mask, n):
        # the posterior noise is drawn for the whole padded length: give both runs the same noise per position
        orig = models._randn
        models._randn = lambda shape, like, rng: noise[:, :, : shape[2]].to(like)
        try:
            return model.dp(x, x_mask, w[:, :, :n] * x_mask, g=g), model.dp(x, x_mask, g=g, reverse=True)
        finally:
            models._randn = orig

    short, xs, ms = run(t)
    long, xl, ml = run(t + extra)
    valid = mask(t)
    for name in short:
        torch.testing.assert_close(short[name] * valid, long[name][:, :, :t] * valid, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"{name}: {m}")
    nll_s, logw_s = sdp_nll(xs, ms, t)
    nll_l, logw_l = sdp_nll(xl, ml, t + extra)
    torch.testing.assert_close(nll_s, nll_l, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logw_s * valid, logw_l[:, :, :t] * valid, rtol=1e-9, atol=1e-9)


def test_infer_batch_equals_single():
    torch.manual_seed(0)
    kw = tiny_model_kwargs(num_speakers=3)
    model = _randomised(vits_fast.SynthesizerTrn(**kw), 1, scale=0.1)
    lens = torch.tensor([9, 4, 6])
    ids = torch.randint(1, kw["n_vocab"], (3, 9)) * commons.sequence_mask(lens, 9)
    sid = torch.tensor([2, 0, 1])
    hop = math.prod(kw["upsample_rates"])
    with torch.no_grad():
        o, _, y_mask, _ = model.infer(ids, lens, sid=sid, noise_scale=0.0, noise_scale_w=0.0)
        for i in range(3):
            oi, _, yi_mask, _ = model.infer(ids[i: i + 1, : lens[i]], lens[i: i + 1], sid=sid[i: i + 1],
                                            noise_scale=0.0, noise_scale_w=0.0)
            n = int(yi_mask.sum()) * hop
            assert int(y_mask[i].sum()) * hop == n
            assert oi.shape[-1] == n
            torch.testing.assert_close(o[i, :, :n], oi[0], rtol=1e-5, atol=1e-6)
            assert torch.all(o[i, :, n:] == 0), "the padding must decode to silence"


# --- flows --------------------------------------------------------------------------------------------------------

def _flows(gin=0):
    torch.manual_seed(0)
    return {
        "ElementwiseAffine": modules.ElementwiseAffine(4),
        "Flip": modules.Flip(),
        "ResidualCouplingLayer.mean_only": modules.ResidualCouplingLayer(4, 6, 5, 1, 2, gin_channels=gin,
                                                                         mean_only=True),
        "ResidualCouplingLayer.affine": modules.ResidualCouplingLayer(4, 6, 5, 1, 2, gin_channels=gin),
        "ConvFlow": modules.ConvFlow(2, 6, 3, n_layers=2),
        "Log": modules.Log(),
    }


@pytest.mark.parametrize("name", list(_flows()))
def test_flow_inverse_and_logdet(name):
    flow = _randomised(_flows()[name], seed=3, scale=0.3).double()
    c = 2 if name == "ConvFlow" else 4
    torch.manual_seed(1)
    x = torch.randn(2, c, 7, dtype=torch.float64) * 2
    if name == "Log":
        x = x.abs() + 0.1
    lens = torch.tensor([7, 5])
    mask = commons.sequence_mask(lens, 7).unsqueeze(1).double()
    x = x * mask
    g = torch.randn(2, 6, 7, dtype=torch.float64) if name == "ConvFlow" else None
    y, logdet = flow(x, mask, g=g)
    x_back = flow(y, mask, g=g, reverse=True)
    torch.testing.assert_close(x_back * mask, x * mask, rtol=1e-9, atol=1e-9)

    # log-determinant against the autograd Jacobian on the valid positions of item 1
    i, n = 1, int(lens[1])

    def f(v):
        xi = x[i: i + 1].clone()
        xi[:, :, :n] = v
        return flow(xi, mask[i: i + 1], g=None if g is None else g[i: i + 1])[0][:, :, :n]

    jac = torch.autograd.functional.jacobian(f, x[i: i + 1, :, :n]).reshape(c * n, c * n)
    _, logabs = torch.linalg.slogdet(jac)
    torch.testing.assert_close(logdet[i], logabs, rtol=1e-7, atol=1e-7)


def test_residual_coupling_block_roundtrip():
    block = _randomised(models.ResidualCouplingBlock(4, 8, 5, 1, 2, gin_channels=3), seed=2).double()
    x = torch.randn(2, 4, 11, dtype=torch.float64)
    mask = commons.sequence_mask(torch.tensor([11, 6]), 11).unsqueeze(1).double()
    g = torch.randn(2, 3, 1, dtype=torch.float64)
    z = block(x * mask, mask, g=g)
    assert not torch.allclose(z, x * mask)
    torch.testing.assert_close(block(z, mask, g=g, reverse=True), x * mask, rtol=1e-9, atol=1e-9)


# --- commons ---------------------------------------------------------------------------------------------------

def test_generate_path_expands_durations():
    dur = torch.tensor([[[2.0, 0.0, 3.0, 1.0]]])
    mask = torch.ones(1, 1, 6, 4)
    path = commons.generate_path(dur, mask)[0, 0]
    expected = torch.tensor([0, 0, 2, 2, 2, 3])
    assert torch.equal(path.argmax(1), expected)
    assert torch.equal(path.sum(0), dur[0, 0])


def test_slice_segments_matches_loop():
    x = torch.randn(3, 4, 20)
    ids = torch.tensor([0, 7, 12])
    out = commons.slice_segments(x, ids, 8)
    for i in range(3):
        assert torch.equal(out[i], x[i, :, ids[i]: ids[i] + 8])
    with pytest.raises(ValueError, match="segment_size"):
        commons.slice_segments(x, ids, 21)


def test_generator_shape_and_remove_weight_norm():
    kw = tiny_model_kwargs()
    model = vits_fast.SynthesizerTrn(**kw).eval()
    z = torch.randn(2, kw["inter_channels"], 5)
    before = model.dec(z)
    assert before.shape == (2, 1, 5 * math.prod(kw["upsample_rates"]))
    model.dec.remove_weight_norm()
    assert not any(k.endswith("weight_g") for k in model.dec.state_dict())
    torch.testing.assert_close(model.dec(z), before, rtol=1e-5, atol=1e-6)


# --- input errors --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi():
    return vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_speakers=3)).eval()


@pytest.fixture(scope="module")
def single():
    return vits_fast.SynthesizerTrn(**tiny_model_kwargs()).eval()


def test_bad_inputs(multi, single):
    ids = torch.randint(1, 32, (2, 6))
    lens = torch.tensor([6, 4])
    spec = torch.randn(2, 65, 12)
    spec_lens = torch.tensor([12, 9])
    sid = torch.tensor([0, 1])
    cases = [
        (lambda: multi.infer(ids, lens), ValueError, "`sid` is required"),
        (lambda: multi.infer(ids, lens, sid=torch.tensor([0, 3])), ValueError, r"sid.*\[0, 3\)"),
        (lambda: multi.infer(ids, torch.tensor([7, 4]), sid=sid), ValueError, "x_lengths.*larger"),
        (lambda: multi.infer(ids, torch.tensor([6, 0]), sid=sid), ValueError, "x_lengths must be positive"),
        (lambda: multi.infer(ids, torch.tensor([6, -1]), sid=sid), ValueError, "x_lengths must be positive"),
        (lambda: multi.infer(ids, torch.tensor([6.0, 4.0]), sid=sid), TypeError, "x_lengths must be an integer"),
        (lambda: multi.infer(ids, torch.tensor([6]), sid=sid), ValueError, r"x_lengths must have shape \[2\]"),
        (lambda: multi.infer(ids[0], lens, sid=sid), ValueError, r"x must be \[batch, phonemes\]"),
        (lambda: multi.infer(ids.float(), lens, sid=sid), TypeError, "integer phoneme ids"),
        (lambda: multi.infer(ids + 40, lens, sid=sid), ValueError, "outside the vocabulary"),
        (lambda: multi(ids, lens, spec[0], spec_lens, sid=sid), ValueError, "y must be a spectrogram"),
        (lambda: multi(ids, lens, spec[:, :10], spec_lens, sid=sid), ValueError, r"y must have shape \[2, 65"),
        (lambda: multi(ids, lens, spec, torch.tensor([13, 9]), sid=sid), ValueError, "y_lengths.*larger"),
        (lambda: single.voice_conversion(spec, spec_lens, sid, sid), ValueError, "multi-speaker"),
        (lambda: multi.voice_conversion(spec, spec_lens, None, sid), ValueError, "`sid_src` is required"),
        (lambda: multi.voice_conversion(spec.long(), spec_lens, sid, sid), TypeError, "floating point"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


def test_multispeaker_needs_gin_channels():
    with pytest.raises(ValueError, match="gin_channels"):
        vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_speakers=3, gin_channels=0))


def test_decoder_drops_a_mask_without_padding():
    """Batch 1 or equal lengths: the all-ones mask is not multiplied in (upstream's cost on a CPU), and the audio
    is bit-identical; a padded mask is still applied."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMul(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMul.n += func is torch.ops.aten.mul.Tensor
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    kw = tiny_model_kwargs()
    dec = models.Generator(kw["inter_channels"], kw["resblock"], kw["resblock_kernel_sizes"],
                           kw["resblock_dilation_sizes"], kw["upsample_rates"], kw["upsample_initial_channel"],
                           kw["upsample_kernel_sizes"]).eval()
    x = torch.randn(2, kw["inter_channels"], 9)

    def muls(mask):
        CountMul.n = 0
        with torch.no_grad(), CountMul():
            out = dec(x, x_mask=mask)
        return out, CountMul.n

    plain, n_plain = muls(None)
    ones, n_ones = muls(torch.ones(2, 1, 9))
    padded, n_padded = muls((torch.arange(9) < torch.tensor([9, 6])[:, None]).float()[:, None])
    assert torch.equal(ones, plain) and n_ones == n_plain
    assert n_padded > n_plain and not torch.equal(padded[1], plain[1])  # the padding is masked


def test_period_discriminators_folded_equal_the_2d_convolutions(monkeypatch):
    """The ``period`` fast path (backend triton): scores, feature maps (values and layout) and every gradient equal
    the 2-D convolutions', for lengths that need the reflect pad; spectral-norm discriminators keep the 2-D path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend 'triton' accepts CPU tensors (nothing launches here)
    calls = []
    folded = models._period_forward_folded
    monkeypatch.setattr(models, "_period_forward_folded", lambda d, x: calls.append(d.period) or folded(d, x))
    torch.manual_seed(0)
    mpd = vits_fast.MultiPeriodDiscriminator()
    x = torch.randn(2, 1, 1000)  # 1000 is a multiple of 2 and 5, not of 3, 7 or 11

    def run(name):
        xg = x.clone().requires_grad_(True)
        mpd.zero_grad(set_to_none=True)
        with vits_fast.backend(name):
            _, scores, _, fmaps = mpd(xg, xg * 0.5)
        loss = sum((s * torch.linspace(-1, 1, s.shape[-1])).sum() for s in scores)
        loss = loss + sum((f * f.detach().sign()).mean() for fm in fmaps for f in fm)
        loss.backward()
        return scores, fmaps, xg.grad, {n: p.grad.clone() for n, p in mpd.named_parameters()}

    ref = run("reference")
    assert calls == []
    got = run("triton")
    assert sorted(set(calls)) == [2, 3, 5, 7, 11]
    for a, b in zip(got[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for fa, fb in zip(got[1], ref[1]):
        for a, b in zip(fa, fb):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    for name, g in ref[3].items():
        torch.testing.assert_close(got[3][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    calls.clear()
    sn = models.DiscriminatorP(3, use_spectral_norm=True)
    with vits_fast.backend("triton"):
        sn(x)
    assert calls == []


def test_current_weight_follows_the_weight_norm_parameters():
    """``commons.current_weight`` gives the weight the next forward uses (the legacy hook's attribute is stale
    after an update of ``weight_g``/``weight_v`` until that forward runs), for any norm dimension."""
    for dim in (0, 1):
        conv = commons.weight_norm(torch.nn.Conv2d(3, 4, (5, 1)), dim=dim)
        with torch.no_grad():
            conv.weight_g.mul_(2.0)
        expected = torch._weight_norm(conv.weight_v, conv.weight_g, dim)
        assert not torch.allclose(conv.weight, expected)  # the attribute still holds the old weight
        torch.testing.assert_close(commons.current_weight(conv), expected)
    plain = torch.nn.Conv1d(2, 2, 3)
    assert commons.current_weight(plain) is plain.weight
