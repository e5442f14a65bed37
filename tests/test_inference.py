"""Inference library: receptive field, streaming, batching, the fast decoder and voice conversion.

Tiny models with randomised weights (zero-initialised projections would make flows the identity and hide bugs).
"""

import copy
import math

import pytest
import torch

import vits_fast
from vits_fast import inference as inf
from vits_fast.backend import backend
from vits_fast.config import AudioConfig, model_kwargs, tiny_model_kwargs
from vits_fast.mel_processing import spectrogram_torch


from tests._util import one_thread, randomised as _randomised  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS = {}


def _model(num_speakers=1, **overrides):
    key = (num_speakers, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = _randomised(vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_speakers=num_speakers,
                                                                                  **overrides)), seed=num_speakers)
    return _MODELS[key]


def _ids(n, seed, n_vocab=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, n_vocab, (n,), generator=g)


# --- receptive field ----------------------------------------------------------------------------------------------

_DECODERS = {
    "tiny resblock 2": tiny_model_kwargs(),
    "tiny resblock 1": tiny_model_kwargs(resblock="1", resblock_kernel_sizes=(3, 5),
                                         resblock_dilation_sizes=((1, 3, 5), (1, 2, 3)), upsample_rates=(4, 2),
                                         upsample_kernel_sizes=(8, 4)),
    "piper medium": model_kwargs("medium"),
}


def _generator(kw):
    return vits_fast.Generator(kw["inter_channels"], kw["resblock"], kw["resblock_kernel_sizes"],
                               kw["resblock_dilation_sizes"], kw["upsample_rates"], kw["upsample_initial_channel"],
                               kw["upsample_kernel_sizes"])


@pytest.mark.parametrize("name", list(_DECODERS))
def test_receptive_field_is_exact(name):
    """The computed context equals the support of d(audio of one frame) / d(latent), found with autograd."""
    dec = _randomised(_generator(_DECODERS[name]), seed=3).double()
    left, right = inf.receptive_field(dec)
    hop = inf.hop_length(dec)
    assert hop == math.prod(_DECODERS[name]["upsample_rates"])
    frames = left + right + 6
    frame = left + 2
    z = torch.randn(1, dec.conv_pre.in_channels, frames, dtype=torch.float64, requires_grad=True)
    audio = dec(z)
    (grad,) = torch.autograd.grad(audio[0, 0, frame * hop: (frame + 1) * hop].sum(), z)
    support = (grad[0].abs().sum(0) > 0).nonzero().flatten()
    assert (frame - int(support.min()), int(support.max()) - frame) == (left, right)


def test_receptive_field_of_piper_presets():
    for quality in ("x-low", "medium", "high"):
        dec = _generator(model_kwargs(quality))
        left, right = inf.receptive_field(dec)
        assert left == right and 8 <= left <= 16, (quality, left, right)


# --- text side + decoder == infer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_speakers", [1, 3])
def test_encode_decode_equals_infer(num_speakers):
    """Same seed, non-zero noise: the split path draws the same random numbers and returns the same audio."""
    model = _model(num_speakers)
    x = torch.stack([_ids(12, 1), torch.cat([_ids(7, 2), torch.zeros(5, dtype=torch.long)])])
    lengths = torch.tensor([12, 7])
    sid = torch.tensor([2, 0]) if num_speakers > 1 else None
    with torch.no_grad():
        torch.manual_seed(5)
        audio, _, y_mask, _ = model.infer(x, lengths, sid=sid)
        torch.manual_seed(5)
        latent = inf.encode(model, x, lengths, sid=sid)
        split = inf.decode(model, latent)
    assert torch.equal(latent.y_mask, y_mask)
    torch.testing.assert_close(split, audio, rtol=0, atol=1e-6)


# --- batching -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_speakers", [1, 3])
def test_batch_equals_single(num_speakers):
    model = _model(num_speakers)
    synth = inf.Synthesizer(model)
    lengths = [9, 3, 14, 6, 11]
    utts = [_ids(n, 10 + i) for i, n in enumerate(lengths)]
    speakers = [i % 3 for i in range(len(utts))] if num_speakers > 1 else None
    zero = dict(noise_scale=0.0, noise_scale_w=0.0, length_scale=1.2)
    batched = synth.synthesize_batch(utts, speakers, batch_size=3, **zero)
    unsorted = synth.synthesize_batch(utts, speakers, batch_size=4, sort_by_length=False, **zero)
    assert len(batched) == len(utts)
    for i, u in enumerate(utts):
        single = synth.synthesize_ids(u, None if speakers is None else speakers[i], **zero)
        with torch.no_grad():
            ref, _, y_mask, _ = model.infer(u[None], torch.tensor([len(u)]),
                                            sid=None if speakers is None else torch.tensor([speakers[i]]),
                                            noise_scale=0.0, noise_scale_w=0.0, length_scale=1.2)
        n = int(y_mask.sum()) * synth.hop
        assert batched[i].shape == single.shape == (n,), "trimmed to the item's own length"
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(unsorted[i], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single, ref[0, 0], rtol=1e-5, atol=1e-6)
        assert single.abs().max() > 1e-3


def test_synthesizer_leaves_model_untouched_and_checks_inputs():
    model = vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_speakers=3))
    model.train()
    torch.manual_seed(0)
    x = _ids(8, 0)[None]
    # a forward with gradients leaves non-leaf tensors behind (weight-norm weights, cached attention), which
    # plain deepcopy refuses
    model.enc_p(x, torch.tensor([8]))
    model.dec(torch.randn(1, 16, 5))
    model.flow(torch.randn(1, 16, 5), torch.ones(1, 1, 5), g=torch.randn(1, 8, 1))
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synth = inf.Synthesizer(model)
    assert model.training and hasattr(model.dec.ups[0], "weight_g")
    assert not synth.model.training and not hasattr(synth.model.dec.ups[0], "weight_g")
    assert not hasattr(synth.model.flow.flows[0].enc.in_layers[0], "weight_g")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(inf.VoiceError, match="outside the model's vocabulary"):
        synth.synthesize_batch([[1, 2, 99]])
    with pytest.raises(inf.VoiceError, match="empty"):
        synth.synthesize_batch([[1, 2], []])
    with pytest.raises(inf.VoiceError, match="out of range"):
        synth.synthesize_batch([[1, 2]], 3)
    with pytest.raises(inf.VoiceError, match="2 speaker ids for 1 utterances"):
        synth.synthesize_batch([[1, 2]], [0, 1])


# --- streaming ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk,first", [(64, 16), (5, 1), (1, 3), (1000, 1000)])
def test_stream_equals_whole(chunk, first):
    model = _model(3)
    synth = inf.Synthesizer(model)
    ids = _ids(20, 7)
    torch.manual_seed(11)
    whole = synth.synthesize_ids(ids, 2)  # default (non-zero) noise: the stream draws the same numbers
    torch.manual_seed(11)
    chunks = list(synth.stream(ids, 2, chunk_frames=chunk, first_chunk_frames=first))
    frames = whole.numel() // synth.hop
    expected_chunks = 1 + math.ceil(max(0, frames - first) / chunk)
    assert len(chunks) == expected_chunks
    assert chunks[0].numel() == min(first, frames) * synth.hop
    torch.testing.assert_close(torch.cat(chunks), whole, rtol=1e-5, atol=1e-6)


def test_stream_context_is_needed():
    """One frame less context on either side changes the audio: the overlap is not larger than needed.

    In float64, so that the tiny influence of the farthest frame stands far above rounding."""
    model = inf.prepare_for_inference(_model(1)).double()
    hop, (left, right) = inf.hop_length(model.dec), inf.receptive_field(model.dec)
    with torch.no_grad():
        latent = inf.encode(model, _ids(20, 3)[None], torch.tensor([20]), noise_scale=0.0, noise_scale_w=0.0)
        whole = inf.decode(model, latent)
    dec = lambda z, g, mask: model.dec(z, g=g, x_mask=mask)  # noqa: E731
    for ctx in ((left, right), (left - 1, right), (left, right - 1)):
        with torch.no_grad():
            audio = torch.cat(list(inf.stream_decode(dec, latent, hop, ctx, chunk_frames=4, first_chunk_frames=4)),
                              dim=2)
        err = float((audio - whole).abs().max())
        assert (err < 1e-12) == (ctx == (left, right)), (ctx, err)


def test_time_to_first_audio_hook():
    synth = inf.Synthesizer(_model(1))
    stream = synth.stream(_ids(15, 1), chunk_frames=8, first_chunk_frames=2)
    next(stream)
    assert not torch.is_inference_mode_enabled(), "the stream must not leave inference mode on between chunks"
    stream.close()
    timing = synth.time_to_first_audio(_ids(15, 1), chunk_frames=8, first_chunk_frames=2)
    assert 0 < timing.first_audio_s <= timing.total_s
    assert timing.chunks >= 2 and timing.audio_samples % synth.hop == 0 and timing.audio_samples > 0


# --- fast decoder -------------------------------------------------------------------------------------------------

def test_frame_buckets():
    assert inf.frame_buckets(200) == [32, 48, 64, 96, 128, 192, 256]
    assert inf.frame_buckets(10, min_frames=4) == [4, 6, 8, 12]
    for t in range(1, 300):
        b = next(s for s in inf.frame_buckets(300) if s >= t)
        assert b < 1.5 * t + 32


def _decoder_inputs(model, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mask = vits_fast.commons.sequence_mask(torch.tensor(lengths), t).unsqueeze(1).float()
    z = torch.randn(len(lengths), model.inter_channels, t, generator=g) * mask
    sid = torch.arange(len(lengths)) % model.n_speakers
    gvec = model.emb_g(sid).unsqueeze(-1).detach() if model.n_speakers > 1 else None
    return z, gvec, mask


def test_fast_decoder_bucketing_equals_reference():
    """Padding to (batch, frames) buckets, then cutting back, gives the reference decoder's audio."""
    model = _model(3)
    fast = inf.FastDecoder(model.dec, compile=False, cuda_graphs=False, bucketing=True, frame_sizes=[8, 12, 24],
                           batch_sizes=(1, 2, 4))
    assert hasattr(model.dec.ups[0], "weight_g"), "the caller's decoder keeps its weight norm"
    assert fast.bucket(3, 9) == (4, 12) and fast.bucket(1, 8) == (1, 8) and fast.bucket(5, 8) is None
    assert fast.bucket(2, 25) is None
    for lengths, seed in (([9], 0), ([5, 12, 7], 1), ([24, 3], 2), ([30], 3), ([2, 2, 2, 2, 2], 4)):
        z, g, mask = _decoder_inputs(model, lengths, seed)
        with torch.no_grad():
            ref = model.dec(z, g=g, x_mask=mask)
        out = fast(z, g, mask)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fast_decoder_torch_compile_traces_whole_decoder():
    """torch.compile captures the decoder in one graph (fullgraph) and the compiled bucketed path is exact.

    The ``aot_eager`` backend runs dynamo and AOT autograd without code generation: inductor's C++ build of even
    the tiny decoder takes 30-60 s per shape on this 2-core machine, so inductor itself is checked by the CUDA
    test below.
    """
    model = _model(1)
    fast = inf.FastDecoder(model.dec, compile=True, cuda_graphs=False, bucketing=True, dynamic=False,
                           compile_backend="aot_eager", fullgraph=True, frame_sizes=[16], batch_sizes=(2,))
    for lengths, seed in (([16, 9], 0), ([5], 1)):
        z, g, mask = _decoder_inputs(model, lengths, seed)
        with torch.no_grad():
            ref = model.dec(z, g=g, x_mask=mask)
        torch.testing.assert_close(fast(z, g, mask), ref, rtol=1e-5, atol=1e-6)


def test_fast_flag_on_cpu_warns_and_uses_reference():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        synth = inf.Synthesizer(_model(1), fast=True)
    assert synth.fast_decoder is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fast_decoder_cuda_graphs_equal_reference():
    """CUDA graphs of the inductor-compiled decoder == the eager decoder, batched, beyond the buckets, streamed.

    In float64 (reference backend for the text side): the random decoder amplifies float32 rounding
    differences between compiled and eager kernels ~1000-fold, which would blur a real bug's signature.
    """
    with backend("reference"):
        model = inf.prepare_for_inference(_model(3)).double()
        ref = inf.Synthesizer(model, device="cuda")
        fast = inf.Synthesizer(model, device="cuda", fast=True,
                               fast_options=dict(frame_sizes=[16, 32, 64], batch_sizes=(1, 2, 4)))
        assert fast.fast_decoder is not None and fast.fast_decoder.compile and fast.fast_decoder.cuda_graphs
        utts = [_ids(n, i) for i, n in enumerate([12, 4, 30, 7, 9])]
        speakers = [0, 1, 2, 0, 1]
        zero = dict(noise_scale=0.0, noise_scale_w=0.0)
        expected = ref.synthesize_batch(utts, speakers, batch_size=2, **zero)
        for _ in range(2):  # the second round replays the captured graphs
            got = fast.synthesize_batch(utts, speakers, batch_size=2, **zero)
            for a, b in zip(got, expected):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert fast.fast_decoder.num_graphs >= 1
        long_ids = _ids(60, 9)  # > 64 frames: beyond the largest bucket, runs without a graph
        torch.testing.assert_close(fast.synthesize_ids(long_ids, 1, **zero), ref.synthesize_ids(long_ids, 1, **zero),
                                   rtol=1e-6, atol=1e-7)
        streamed = torch.cat(list(fast.stream(utts[2], 2, chunk_frames=8, first_chunk_frames=4, **zero)))
        torch.testing.assert_close(streamed, ref.synthesize_ids(utts[2], 2, **zero), rtol=1e-6, atol=1e-7)


# --- voice conversion ---------------------------------------------------------------------------------------------

_VC_AUDIO = AudioConfig(sample_rate=16000, filter_length=128, hop_length=16, win_length=128)


def test_voice_conversion_round_trip():
    """A -> A equals the model's own reconstruction (posterior sample decoded), since the flow is inverted.

    A random tiny model is no vocoder, so the reference is the reconstruction path, not the input audio. In
    float64: the random decoder amplifies the flow's float32 round-trip error (~5e-7 in z) to ~3e-4 in audio.
    """
    model = inf.prepare_for_inference(_model(3)).double()
    synth = inf.Synthesizer(model)
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(1600, generator=g).mul(0.3).clamp(-1, 1)
    spec = spectrogram_torch(audio[None], 128, 16000, 16, 128, center=False).double()
    frames = spec.size(2)
    with torch.no_grad():
        gA = model.emb_g(torch.tensor([1])).unsqueeze(-1)
        torch.manual_seed(7)
        z, _, _, y_mask = model.enc_q(spec, torch.tensor([frames]), g=gA)
        recon = model.dec(z * y_mask, g=gA, x_mask=y_mask)[0, 0].float()
    torch.manual_seed(7)
    same = synth.convert(audio, _VC_AUDIO, 1, 1)
    torch.manual_seed(7)
    other = synth.convert(audio, _VC_AUDIO, 1, 2)
    assert same.shape == other.shape == (frames * 16,)
    torch.testing.assert_close(same, recon, rtol=0, atol=1e-6)
    assert float((other - recon).abs().max()) > 1e-4, "converting to another speaker must change the audio"

    single = inf.Synthesizer(_model(1))
    with pytest.raises(inf.VoiceError, match="multi-speaker"):
        single.convert(audio, _VC_AUDIO, 0, 0)
    with pytest.raises(inf.VoiceError, match="too short"):
        synth.convert(audio[:100], _VC_AUDIO, 0, 1)
