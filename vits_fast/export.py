"""Export to ONNX in Piper's runtime contract, with the ``.onnx.json`` voice config Piper reads.

``python -m vits_fast.export onnx CHECKPOINT OUTPUT.onnx [--config config.json] [--streaming-dir DIR]``
(no output may name one of the inputs: that is refused before anything is read or written)

The graph (what Piper's runtimes, C++ and Python, feed and read):

* opset 15, exported with the TorchScript exporter (``dynamo=False``; the dynamo exporter fails on VITS
  ``infer``), through the reference path (:mod:`vits_fast.backend` never picks Triton while exporting);
* inputs ``input`` int64 [B, phonemes], ``input_lengths`` int64 [B], ``scales`` float32 [3] =
  (noise_scale, length_scale, noise_scale_w), and ``sid`` int64 [B] only for a multi-speaker model;
* output ``output`` float32 [B, 1, 1, samples];
* exactly one ``Ceil`` node (the duration rounding; Piper's alignment patch looks for it);
* weight norm folded into plain weights (on a copy: the caller's model is never changed).

``--streaming-dir`` also writes ``encoder.onnx`` (text side up to the flow: ``z``, ``y_mask`` and, for several
speakers, ``g``) and ``decoder.onnx`` (``z``, ``y_mask``[, ``g``] -> ``output`` [B, 1, samples]) with the I/O
names of Piper's streaming export. Unlike Piper's split, the flow runs in the encoder, so chunks of ``z`` decode
exactly (see :func:`vits_fast.inference.receptive_field` for the overlap a chunk needs).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .guards import OverwriteError, refuse_overwrite
from .inference import encode, load_voice, prepare_for_inference
from .models import SynthesizerTrn
from .voice_config import (DEFAULT_LENGTH_SCALE, DEFAULT_NOISE_SCALE, DEFAULT_NOISE_SCALE_W, VoiceError, make_voice_config,
                           onnx_config_path, write_voice_config)

_LOGGER = logging.getLogger("vits_fast.export")

_DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")
OPSET_VERSION = 15
_DUMMY_PHONEMES = 50

# ONNX TensorProto element types.
_INT64, _FLOAT = 7, 1


class ExportError(RuntimeError):
    """The export failed or its result breaks Piper's contract; the message says how."""


class PiperOnnxModel(nn.Module):
    """``infer`` behind Piper's ONNX signature: (input [B, P], input_lengths [B], scales [3], sid [B]) ->
    audio [B, 1, 1, samples]."""

    def __init__(self, model: SynthesizerTrn):
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor, input_lengths: torch.Tensor, scales: torch.Tensor,
                sid: Optional[torch.Tensor] = None) -> torch.Tensor:
        audio = self.model.infer(input, input_lengths, sid=sid, noise_scale=scales[0], length_scale=scales[1],
                                 noise_scale_w=scales[2])[0]
        return audio.unsqueeze(1)


class OnnxEncoder(nn.Module):
    """Text side for streaming: (input, input_lengths, scales[, sid]) -> (z [B, C, T], y_mask [B, 1, T][, g])."""

    def __init__(self, model: SynthesizerTrn):
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor, input_lengths: torch.Tensor, scales: torch.Tensor,
                sid: Optional[torch.Tensor] = None):
        latent = encode(self.model, input, input_lengths, sid=sid, noise_scale=scales[0], length_scale=scales[1],
                        noise_scale_w=scales[2])
        if latent.g is None:
            return latent.z, latent.y_mask
        return latent.z, latent.y_mask, latent.g


class OnnxDecoder(nn.Module):
    """Masked decoder for streaming: (z [B, C, T], y_mask [B, 1, T][, g [B, gin, 1]]) -> audio [B, 1, T * hop]."""

    def __init__(self, model: SynthesizerTrn):
        super().__init__()
        self.dec = model.dec

    def forward(self, z: torch.Tensor, y_mask: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.dec(z, g=g, x_mask=y_mask)


def _export_model(model: SynthesizerTrn) -> SynthesizerTrn:
    """Float32 CPU eval copy with weight norm folded."""
    return prepare_for_inference(model, device="cpu").float()


def _torch_onnx_export(module: nn.Module, args: Tuple, path: Path, input_names: List[str],
                       output_names: List[str], dynamic_axes: Dict[str, Dict[int, str]], opset: int) -> None:
    kwargs: Dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    module.eval()  # export restores the module's mode afterwards: eval keeps the model in eval
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(1234)
        # Tracing sees the input checks' Python conversions; they do not affect the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The flows' channel flips are strided slices the exporter cannot fold; harmless.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        # The TorchScript exporter is chosen on purpose (module docstring); its deprecation notices are noise.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                              **kwargs)


def _dummy_text(model: SynthesizerTrn) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.n_vocab, (1, _DUMMY_PHONEMES), generator=gen, dtype=torch.long)
    lengths = torch.tensor([_DUMMY_PHONEMES], dtype=torch.long)
    scales = torch.tensor([DEFAULT_NOISE_SCALE, DEFAULT_LENGTH_SCALE, DEFAULT_NOISE_SCALE_W], dtype=torch.float32)
    sid = torch.zeros(1, dtype=torch.long) if model.n_speakers > 1 else None
    return ids, lengths, scales, sid


def export_onnx(model: SynthesizerTrn, output: Union[str, Path], voice_config: Optional[Mapping[str, Any]] = None,
                *, opset: int = OPSET_VERSION, check: bool = True) -> Path:
    """Export ``model`` to ``output`` in Piper's contract (module docstring); returns the path.

    With ``voice_config`` (see :func:`make_voice_config`) it is written to ``<output>.json``. ``check``
    verifies the written graph (:func:`check_piper_contract`). The model itself is not modified.
    """
    output = Path(output)
    prepared = _export_model(model)
    ids, lengths, scales, sid = _dummy_text(prepared)
    names = ["input", "input_lengths", "scales"]
    axes: Dict[str, Dict[int, str]] = {"input": {0: "batch_size", 1: "phonemes"}, "input_lengths": {0: "batch_size"},
                                       "output": {0: "batch_size", 3: "time"}}
    args: Tuple = (ids, lengths, scales)
    if sid is not None:
        names.append("sid")
        axes["sid"] = {0: "batch_size"}
        args = args + (sid,)
    _torch_onnx_export(PiperOnnxModel(prepared), args, output, names, ["output"], axes, opset)
    if check:
        check_piper_contract(output, multi_speaker=prepared.n_speakers > 1, opset=opset)
    if voice_config is not None:
        write_voice_config(voice_config, onnx_config_path(output))
    _LOGGER.info("exported %s", output)
    return output


def export_streaming_onnx(model: SynthesizerTrn, output_dir: Union[str, Path], *,
                          opset: int = OPSET_VERSION) -> Tuple[Path, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` (module docstring) to ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    prepared = _export_model(model)
    ids, lengths, scales, sid = _dummy_text(prepared)
    multi = sid is not None
    enc_path, dec_path = output_dir / "encoder.onnx", output_dir / "decoder.onnx"
    enc_inputs = ["input", "input_lengths", "scales"] + (["sid"] if multi else [])
    enc_outputs = ["z", "y_mask"] + (["g"] if multi else [])
    enc_axes = {"input": {0: "batch_size", 1: "phonemes"}, "input_lengths": {0: "batch_size"},
                "z": {0: "batch_size", 2: "frames"}, "y_mask": {0: "batch_size", 2: "frames"}}
    if multi:
        enc_axes.update(sid={0: "batch_size"}, g={0: "batch_size"})
    args = (ids, lengths, scales) + ((sid,) if multi else ())
    encoder = OnnxEncoder(prepared).eval()
    _torch_onnx_export(encoder, args, enc_path, enc_inputs, enc_outputs, enc_axes, opset)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        latent = encoder(*args)  # example decoder inputs
    dec_axes = {"z": {0: "batch_size", 2: "frames"}, "y_mask": {0: "batch_size", 2: "frames"},
                "output": {0: "batch_size", 2: "time"}}
    if multi:
        dec_axes["g"] = {0: "batch_size"}
    _torch_onnx_export(OnnxDecoder(prepared), tuple(latent), dec_path, enc_outputs, ["output"], dec_axes, opset)
    return enc_path, dec_path


# --------------------------------------------------------------------------------------------------------
# Contract check
# --------------------------------------------------------------------------------------------------------

def _value_info(value: Any) -> Tuple[int, List[Union[int, str]]]:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    return tensor.elem_type, dims


def check_piper_contract(path: Union[str, Path], multi_speaker: bool, opset: int = OPSET_VERSION) -> None:
    """Raise :class:`ExportError` unless the ONNX file at ``path`` has Piper's inputs, output, opset and exactly
    one ``Ceil`` node (and passes ``onnx.checker``)."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: invalid ONNX model: {exc}") from None
    problems: List[str] = []
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version != opset:
        problems.append(f"opset {version}, expected {opset}")
    expected = [("input", _INT64, 2), ("input_lengths", _INT64, 1), ("scales", _FLOAT, 1)]
    if multi_speaker:
        expected.append(("sid", _INT64, 1))
    inputs = [(i.name, *_value_info(i)) for i in model.graph.input]
    if [i[0] for i in inputs] != [e[0] for e in expected]:
        problems.append(f"inputs {[i[0] for i in inputs]}, expected {[e[0] for e in expected]}")
    for (name, elem, dims), (_, want_elem, want_rank) in zip(inputs, expected):
        if elem != want_elem or len(dims) != want_rank:
            problems.append(f"input {name}: element type {elem}, rank {len(dims)}; expected type {want_elem}, "
                            f"rank {want_rank}")
        if name == "scales" and dims != [3]:
            problems.append(f"input scales has shape {dims}, expected [3]")
    outputs = [(o.name, *_value_info(o)) for o in model.graph.output]
    if len(outputs) != 1 or outputs[0][0] != "output":
        problems.append(f"outputs {[o[0] for o in outputs]}, expected ['output']")
    elif outputs[0][1] != _FLOAT or len(outputs[0][2]) != 4:
        problems.append(f"output: element type {outputs[0][1]}, rank {len(outputs[0][2])}; expected float32 "
                        "[B, 1, 1, T]")
    ceils = sum(1 for node in model.graph.node if node.op_type == "Ceil")
    if ceils != 1:
        problems.append(f"{ceils} Ceil nodes, expected exactly 1")
    if problems:
        raise ExportError(f"{path} breaks Piper's ONNX contract: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vits_fast.export", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="format", required=True)
    p = sub.add_parser("onnx", help="Piper-compatible ONNX voice (voice.onnx + voice.onnx.json)")
    p.add_argument("checkpoint", help="our or Piper's checkpoint (.ckpt)")
    p.add_argument("output", help="output .onnx file; its config goes to <output>.json")
    p.add_argument("--config", help="the voice's config.json (default: found beside the checkpoint)")
    p.add_argument("--sample-rate", type=int, help="override audio.sample_rate in the voice config")
    p.add_argument("--espeak-voice", help="override espeak.voice in the voice config")
    p.add_argument("--quality", help="set audio.quality in the voice config")
    p.add_argument("--streaming-dir", help="also write encoder.onnx and decoder.onnx for streaming here")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 1 error, 2 usage)."""
    from .checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        print("error: ONNX export needs the onnx package, an optional extra of vits_fast: "
              "pip install 'vits_fast[onnx]'", file=sys.stderr)
        return 1
    try:
        outputs = [Path(args.output), onnx_config_path(args.output)]
        if args.streaming_dir:
            outputs += [Path(args.streaming_dir) / name for name in ("encoder.onnx", "decoder.onnx", "config.json")]
        refuse_overwrite(outputs, [args.checkpoint, args.config])  # before reading, so a refusal is immediate
        voice = load_voice(args.checkpoint, args.config)
        refuse_overwrite(outputs, [voice.config_path])  # the config found beside the checkpoint
        config = make_voice_config(voice.model, voice.config, sample_rate=args.sample_rate or voice.sample_rate,
                                   quality=args.quality, espeak_voice=args.espeak_voice)
        path = export_onnx(voice.model, args.output, config)
        print(f"wrote {path} and {onnx_config_path(path)}", file=sys.stderr)
        if args.streaming_dir:
            enc, dec = export_streaming_onnx(voice.model, args.streaming_dir)
            write_voice_config(config, Path(args.streaming_dir) / "config.json")
            print(f"wrote {enc}, {dec} and {Path(args.streaming_dir) / 'config.json'}", file=sys.stderr)
    except (VoiceError, CheckpointError, ExportError, OverwriteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
