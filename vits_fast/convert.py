"""Import a published Piper ONNX voice back into a SynthesizerTrn, and write it as a Piper checkpoint.

``python -m vits_fast.convert VOICE.onnx OUT.ckpt [--config VOICE.onnx.json] [--overwrite]``

Most Piper voices exist only as ``VOICE.onnx`` + ``VOICE.onnx.json``. :func:`import_onnx_voice` rebuilds the
generator from the graph; :func:`onnx_checkpoint` wraps it in Piper's (Lightning) checkpoint layout, with weight
norm restored as ``weight_g``/``weight_v`` so that Piper's ``SynthesizerTrn`` loads the generator strictly.
``vits_fast.inference.load_voice``, ``python -m vits_fast.synthesize --checkpoint VOICE.onnx`` and
``python -m vits_fast.train --init-from VOICE.onnx`` read ONNX voices through this module.

Initializer names are not trusted: Piper's exporter folds weight norm into anonymous initializers
(``onnx::Conv_5046``), ``exp(-logs)`` of the duration flow into another, and some exporters leave the folding to
the graph (``Identity``, ``Reshape``, ``Mul``/``Div``/``ReduceL2`` chains). So the weights are mapped through the
graph:

1. Every input of a weight-bearing node (``Conv``, ``ConvTranspose``, ``Gather``, ``MatMul``, the layer norms'
   ``Mul``/``Add``, the duration flow's ``Sub``/``Mul``) that is computed from constants only is evaluated, with
   a small whitelist of elementwise and reshaping ops and bounded sizes (:class:`_Graph`).
2. The architecture is read off those tensors and node attributes (:func:`_architecture`).
3. A fresh :class:`SynthesizerTrn` of that architecture runs ``infer`` once with hooks; the order its
   convolutions, layer norms and attention layers run in is the trace order the exporter wrote the graph in, so
   graph nodes of each kind are matched to modules one to one, checking every shape and convolution attribute.
4. Parts the graph does not hold (posterior encoder ``enc_q``, the duration predictor's posterior) keep their
   (seeded) fresh initialisation and are named in a warning; a checkpoint also gets a fresh discriminator.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt_lib
from .attentions import MultiHeadAttention
from .backend import backend
from .config import AudioConfig
from .guards import OverwriteError, refuse_overwrite
from .inference import Voice
from .voice_config import VoiceError, load_voice_config, onnx_config_path
from .models import MultiPeriodDiscriminator, SynthesizerTrn
from .modules import ElementwiseAffine, LayerNorm

_LOGGER = logging.getLogger("vits_fast.convert")
_DESCRIPTION = __doc__.split("\n\n")[0]

PathLike = Union[str, Path]

#: Bounds on the sizes read from a graph, checked as each is read, before anything is built from it: a
#: checkpoint's bounds (:data:`vits_fast.checkpoint.MODEL_LIMITS`, ``AUDIO_LIMITS``, ``MAX_STAGES``) and the
#: attention's key width. The assembled settings then pass :func:`vits_fast.checkpoint.check_model_config`, as a
#: checkpoint's do. (Piper's largest voices use 192 hidden / 768 filter channels, 904 speakers.)
MAX_FILE_BYTES = 2 << 30  # protobuf's own limit
LIMITS = {**{key: high for key, (_, high) in {**ckpt_lib.MODEL_LIMITS, **ckpt_lib.AUDIO_LIMITS}.items()},
          "num_upsamples": ckpt_lib.MAX_STAGES, "num_kernels": ckpt_lib.MAX_STAGES,
          "k_channels": ckpt_lib.MODEL_LIMITS["hidden_channels"][1]}
_MAX_CONST_ELEMENTS = 1 << 26  # one evaluated constant (256 MiB in float32)
_MAX_CONST_DEPTH = 64  # ops on the longest chain from an initializer to a weight
#: Seed of the fresh parts (posterior encoder, discriminator): a conversion is reproducible.
FRESH_SEED = 0
_WINDOW = 4  # relative-attention window of Piper's text encoder


class OnnxVoiceError(ckpt_lib.CheckpointError):
    """An ONNX file that is not a readable Piper voice, or whose parts do not fit together."""


# --------------------------------------------------------------------------------------------------------
# Graph access
# --------------------------------------------------------------------------------------------------------

def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    def run(a: np.ndarray, b: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
        _check_elements(math.prod(np.broadcast_shapes(a.shape, b.shape)))
        return fn(a, b)
    return run


def _check_elements(n: int) -> None:
    if n > _MAX_CONST_ELEMENTS:
        raise OnnxVoiceError(f"a constant in the graph would have {n} elements (at most {_MAX_CONST_ELEMENTS})")


def _axes(args: Sequence[Optional[np.ndarray]], attrs: Mapping[str, Any]) -> Optional[Tuple[int, ...]]:
    """Axes of Squeeze/Unsqueeze/Reduce*: an input from opset 13 (18 for ReduceL2), an attribute before."""
    axes = args[1] if len(args) > 1 and args[1] is not None else attrs.get("axes")
    return None if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1))


def _reshape(x: np.ndarray, shape: np.ndarray, **_: Any) -> np.ndarray:
    dims = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(np.asarray(shape).reshape(-1))]
    return x.reshape(dims)


def _reduce_l2(x: np.ndarray, *rest: Any, attrs: Mapping[str, Any]) -> np.ndarray:
    return np.sqrt(np.sum(np.square(x), axis=_axes((x,) + rest, attrs), keepdims=bool(attrs.get("keepdims", 1))))


def _reduce_sum(x: np.ndarray, *rest: Any, attrs: Mapping[str, Any]) -> np.ndarray:
    return np.sum(x, axis=_axes((x,) + rest, attrs), keepdims=bool(attrs.get("keepdims", 1)))


def _squeeze(x: np.ndarray, *rest: Any, attrs: Mapping[str, Any]) -> np.ndarray:
    return np.squeeze(x, axis=_axes((x,) + rest, attrs))


def _cast(x: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    import onnx

    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if dtype.kind not in "fiub":
        raise OnnxVoiceError(f"Cast to {dtype} in a weight's computation")
    return x.astype(dtype)


# The ops a weight may be computed with. A whitelist, evaluated here rather than by a general ONNX evaluator,
# so that nothing a file asks for can grow beyond _MAX_CONST_ELEMENTS: only broadcasting grows a tensor.
_CONST_OPS: Dict[str, Callable[..., np.ndarray]] = {
    "Identity": lambda x, attrs: x,
    "Neg": lambda x, attrs: -x,
    "Exp": lambda x, attrs: np.exp(x),
    "Log": lambda x, attrs: np.log(x),
    "Sqrt": lambda x, attrs: np.sqrt(x),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
    "Pow": _binary(np.power),
    "Cast": _cast,
    "Transpose": lambda x, attrs: np.transpose(x, attrs.get("perm")),
    "Reshape": lambda x, shape, attrs: _reshape(x, shape),
    "Unsqueeze": lambda x, *rest, attrs: np.expand_dims(x, _axes((x,) + rest, attrs)),
    "Squeeze": _squeeze,
    "ReduceL2": _reduce_l2,
    "ReduceSum": _reduce_sum,
}
# Constant node attributes with a numeric value, and the dtype of the non-tensor ones.
_CONSTANT_ATTRS = {"value": None, "value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}
# Ops that only move or reshape their first input: followed back from a MatMul/Gather operand to its source.
_VIEW_OPS = frozenset({"Identity", "Cast", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Pad", "Slice"})


@dataclass
class _Conv:
    """One Conv/ConvTranspose node: its position among the graph's convolutions, evaluated weights, attributes."""

    node: Any
    weight: np.ndarray
    bias: Optional[np.ndarray]
    stride: int
    dilation: int
    group: int
    pads: Tuple[int, ...]

    @property
    def transposed(self) -> bool:
        return self.node.op_type == "ConvTranspose"

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])


class _Graph:
    """Producer index of an ONNX graph and a bounded evaluator for its constant subgraphs."""

    def __init__(self, model: Any, name: str):
        import onnx
        from onnx import numpy_helper

        self.name = name
        graph = model.graph
        self.nodes = list(graph.node)
        self._tensors = {t.name: t for t in graph.initializer}
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise OnnxVoiceError(f"{name} keeps its weights in external files ({t.name}); a Piper voice is a "
                                     "single .onnx file")
        self.inputs = [i.name for i in graph.input if i.name not in self._tensors]
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: Dict[str, List[Any]] = {}
        for node in self.nodes:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self._to_array = numpy_helper.to_array
        self._attr = onnx.helper.get_attribute_value
        # Which values are constant: one pass in the (topological) node order; values are computed on demand.
        self._depth: Dict[str, int] = {t.name: 0 for t in graph.initializer
                                       if t.data_type != onnx.TensorProto.STRING}
        self._values: Dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.op_type == "Constant":
                if node.attribute and node.attribute[0].name in _CONSTANT_ATTRS:
                    self._depth[node.output[0]] = 0
            elif node.op_type in _CONST_OPS:
                ins = [i for i in node.input if i]
                if ins and all(i in self._depth for i in ins):
                    depth = 1 + max(self._depth[i] for i in ins)
                    if depth <= _MAX_CONST_DEPTH:
                        self._depth.update((out, depth) for out in node.output)

    def attrs(self, node: Any) -> Dict[str, Any]:
        return {a.name: self._attr(a) for a in node.attribute}

    def is_const(self, name: str) -> bool:
        return name in self._depth

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of ``name`` when it is computed from constants only, else None."""
        if name not in self._depth:
            return None
        if name not in self._values:
            if name in self._tensors:
                tensor = self._tensors[name]
                _check_elements(math.prod(tensor.dims))
                value = self._to_array(tensor)
            else:
                node = self.producer[name]
                attrs = self.attrs(node)
                if node.op_type == "Constant":
                    key, raw = node.attribute[0].name, attrs[node.attribute[0].name]
                    if key == "value":
                        _check_elements(math.prod(raw.dims))
                        value = self._to_array(raw)
                    else:
                        value = np.asarray(raw, dtype=_CONSTANT_ATTRS[key])
                else:
                    args = [self.const(i) if i else None for i in node.input]
                    try:
                        with np.errstate(all="ignore"):
                            value = _CONST_OPS[node.op_type](*args, attrs=attrs)
                    except (ValueError, TypeError, IndexError, KeyError) as exc:
                        raise OnnxVoiceError(f"{self.name}: cannot evaluate {node.op_type} node {node.name!r} "
                                             f"on constants: {exc}") from None
            self._values[name] = np.asarray(value)
        return self._values[name]

    def float_const(self, name: str) -> Optional[np.ndarray]:
        value = self.const(name)
        return value if value is not None and value.dtype.kind == "f" else None

    def source(self, name: str, limit: int = 16) -> str:
        """Follow ``name`` back through view-like ops (first input) to a constant, a graph input or other op."""
        for _ in range(limit):
            node = self.producer.get(name)
            if self.is_const(name) or node is None or node.op_type not in _VIEW_OPS:
                break
            name = node.input[0]
        return name

    def reaches(self, start: str, target: str, depth: int = 6) -> bool:
        """Whether ``target`` feeds ``start`` within ``depth`` nodes without passing an Add or a convolution (a
        residual connection or another layer)."""
        frontier = [start]
        for _ in range(depth + 1):
            if target in frontier:
                return True
            nxt = []
            for name in frontier:
                node = self.producer.get(name)
                if node is not None and node.op_type not in ("Add", "Sum", "Conv", "ConvTranspose"):
                    nxt.extend(i for i in node.input if i and not self.is_const(i))
            frontier = nxt
        return False

    def conv(self, node: Any) -> _Conv:
        attrs = self.attrs(node)
        weight = self.float_const(node.input[1])
        if weight is None or weight.ndim != 3:
            raise OnnxVoiceError(f"{self.name}: {node.op_type} node {node.name!r} has no constant 1-D convolution "
                                 "weight; not a Piper voice")
        bias = self.float_const(node.input[2]) if len(node.input) > 2 and node.input[2] else None

        def one(key: str, default: int) -> int:
            values = attrs.get(key) or [default]
            return int(values[0])

        return _Conv(node, weight, bias, stride=one("strides", 1), dilation=one("dilations", 1),
                     group=int(attrs.get("group", 1)), pads=tuple(int(p) for p in attrs.get("pads") or (0, 0)))


@dataclass
class _Weights:
    """The weight-bearing parts of a Piper graph, each list in graph order."""

    emb: Optional[np.ndarray]  # [n_vocab, hidden], Gather on `input`
    emb_g: Optional[np.ndarray]  # [n_speakers, gin], Gather on `sid`
    convs: List[_Conv]
    rel: List[np.ndarray]  # relative-position embeddings [1 or heads, 2 * window + 1, k_channels], k then v
    norms: List[Tuple[np.ndarray, np.ndarray]]  # layer norm (gamma, beta)
    affine: List[Tuple[np.ndarray, np.ndarray]]  # the duration flow's ElementwiseAffine (m, exp(-logs))


def _const_operand(graph: _Graph, node: Any) -> Optional[np.ndarray]:
    """The constant operand of a binary node whose other operand is not constant."""
    if len(node.input) != 2:
        return None
    a, b = (graph.float_const(i) for i in node.input)
    return None if (a is None) == (b is None) else (a if a is not None else b)


def _follower(graph: _Graph, node: Any, op_type: str, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """The constant operand of shape ``shape`` of the single ``op_type`` node that consumes ``node``."""
    users = graph.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != op_type:
        return None
    value = _const_operand(graph, users[0])
    return value if value is not None and value.shape == shape else None


def _read_weights(graph: _Graph) -> _Weights:
    w = _Weights(None, None, [], [], [], [])
    for node in graph.nodes:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            w.convs.append(graph.conv(node))
        elif op == "Gather" and len(node.input) == 2:
            table = graph.float_const(node.input[0])
            src = graph.source(node.input[1])
            if table is not None and table.ndim == 2 and src in ("input", "sid"):
                attr = "emb" if src == "input" else "emb_g"
                if getattr(w, attr) is not None:
                    raise OnnxVoiceError(f"{graph.name}: two embedding tables are indexed by `{src}`")
                setattr(w, attr, table)
        elif op == "MatMul":
            for name in node.input:
                value = graph.float_const(graph.source(name))
                if (value is not None and value.ndim >= 3 and math.prod(value.shape[:-3]) == 1
                        and value.shape[-2] % 2 == 1):
                    w.rel.append(value.reshape(value.shape[-3:]))
        elif op == "LayerNormalization":  # opset >= 17
            gamma = graph.float_const(node.input[1])
            beta = graph.float_const(node.input[2]) if len(node.input) > 2 else None
            if gamma is None or beta is None:
                raise OnnxVoiceError(f"{graph.name}: LayerNormalization {node.name!r} lacks a constant scale or bias")
            w.norms.append((gamma, beta))
        elif op == "Mul":  # layer norm before opset 17: normalised * gamma + beta
            gamma = _const_operand(graph, node)
            if gamma is not None and gamma.ndim == 1 and gamma.size > 1:
                beta = _follower(graph, node, "Add", gamma.shape)
                if beta is not None:
                    w.norms.append((gamma, beta))
        elif op == "Sub":  # ElementwiseAffine reversed: (x - m) * exp(-logs)
            m = graph.float_const(node.input[1])
            if m is not None and m.ndim == 2 and m.shape[1] == 1 and m.shape[0] > 1:
                scale = _follower(graph, node, "Mul", m.shape)
                if scale is not None:
                    w.affine.append((m, scale))
    return w


# --------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------

def _bound(name: str, path: str, **sizes: int) -> None:
    for key, value in sizes.items():
        if not 0 < int(value) <= LIMITS[key]:
            raise OnnxVoiceError(f"{path}: {key}={value} read from {name} is outside 1..{LIMITS[key]}")


def _resblocks(graph: _Graph, stage: List[_Conv], path: str) -> Tuple[str, Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """(resblock type, kernel sizes, dilations) from the convolutions of the decoder's first stage.

    ResBlock1 feeds each dilated conv straight into a plain one; ResBlock2's convs are separated by the residual
    Add. The two have the same weight shapes, so the graph's wiring decides.
    """
    if len(stage) < 2:
        raise OnnxVoiceError(f"{path}: the decoder's first stage has {len(stage)} convolution(s); not a Piper voice")
    paired = graph.reaches(stage[1].node.input[0], stage[0].node.output[0])
    per = 6 if paired else 2
    if len(stage) % per:
        raise OnnxVoiceError(f"{path}: the decoder's first stage has {len(stage)} convolutions, not a multiple of "
                             f"{per} (HiFi-GAN ResBlock{'1' if paired else '2'})")
    blocks = [stage[i: i + per] for i in range(0, len(stage), per)]
    kernels = tuple(b[0].kernel for b in blocks)
    dilations = tuple(tuple(c.dilation for c in (b[0::2] if paired else b)) for b in blocks)
    return ("1" if paired else "2"), kernels, dilations


def _architecture(graph: _Graph, w: _Weights, path: str) -> Dict[str, Any]:
    """SynthesizerTrn keyword arguments read off the graph (all but spec_channels and segment_size)."""
    if w.emb is None:
        raise OnnxVoiceError(f"{path} is not a Piper voice: no phoneme embedding table is indexed by `input`")
    n_vocab, hidden = (int(d) for d in w.emb.shape)
    n_speakers, gin = (int(d) for d in w.emb_g.shape) if w.emb_g is not None else (1, 0)
    _bound("the phoneme embedding", path, n_vocab=n_vocab, hidden_channels=hidden)
    if w.emb_g is not None:
        _bound("the speaker embedding", path, n_speakers=n_speakers, gin_channels=gin)
    if not w.rel or len(w.rel) % 2 or w.rel[0].shape[1] != 2 * _WINDOW + 1:
        raise OnnxVoiceError(f"{path} is not a Piper voice: expected pairs of relative-position attention "
                             f"embeddings [1, {2 * _WINDOW + 1}, channels/heads], found "
                             f"{[tuple(r.shape) for r in w.rel][:4]}")
    n_layers = len(w.rel) // 2
    k_channels = int(w.rel[0].shape[2])
    _bound("the attention layers", path, n_layers=n_layers, k_channels=k_channels)
    if hidden % k_channels:
        raise OnnxVoiceError(f"{path}: attention channels per head {k_channels} do not divide {hidden}")
    convs = w.convs
    ups = [i for i, c in enumerate(convs) if c.transposed]
    n_text = 6 * n_layers + 1  # q, k, v, o, ffn 1 and 2 per layer, then the projection
    if not ups or ups[0] <= n_text or ups[-1] >= len(convs) - 1:
        raise OnnxVoiceError(f"{path} is not a Piper voice: {len(convs)} convolutions with upsampling at {ups}, "
                             f"a text encoder of {n_layers} layers needs {n_text} before them and a decoder")
    ffn = convs[4].weight  # [filter, hidden, kernel]
    inter2 = int(convs[n_text - 1].weight.shape[0])
    stage = convs[ups[0] + 1: ups[1] if len(ups) > 1 else len(convs) - 1]
    resblock, kernels, dilations = _resblocks(graph, stage, path)
    first_up = convs[ups[0]].weight  # [in, out, kernel]
    kwargs = dict(
        n_vocab=n_vocab, inter_channels=inter2 // 2, hidden_channels=hidden, filter_channels=int(ffn.shape[0]),
        n_heads=hidden // k_channels, n_layers=n_layers, kernel_size=int(ffn.shape[2]), p_dropout=0.1,
        resblock=resblock, resblock_kernel_sizes=kernels, resblock_dilation_sizes=dilations,
        upsample_rates=tuple(convs[i].stride for i in ups),
        upsample_initial_channel=int(first_up.shape[0]),
        upsample_kernel_sizes=tuple(convs[i].kernel for i in ups),
        n_speakers=n_speakers, gin_channels=gin,
        use_sdp=any(c.group > 1 for c in convs),  # only the stochastic predictor's DDSConv is depthwise
    )
    if inter2 % 2 or kwargs["upsample_initial_channel"] >> len(ups) < 1:
        raise OnnxVoiceError(f"{path}: the text encoder projects to {inter2} channels and the decoder starts at "
                             f"{kwargs['upsample_initial_channel']} for {len(ups)} upsamplings; not a Piper voice")
    _bound("the convolutions", path, inter_channels=inter2 // 2, filter_channels=kwargs["filter_channels"],
           kernel_size=kwargs["kernel_size"], upsample_initial_channel=kwargs["upsample_initial_channel"],
           num_upsamples=len(ups), num_kernels=len(kernels))
    return kwargs


# --------------------------------------------------------------------------------------------------------
# Matching graph weights to modules
# --------------------------------------------------------------------------------------------------------

def _call_order(model: SynthesizerTrn) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` in the order ``infer`` first calls them: the order the exporter traced the graph in."""
    names = {id(m): n for n, m in model.named_modules()}
    order: List[Tuple[str, nn.Module]] = []
    seen = set()

    def hook(module: nn.Module, _args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append((names[id(module)], module))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), backend("reference"), torch.random.fork_rng(devices=[]):
            x = torch.zeros(1, 2, dtype=torch.long)
            sid = torch.zeros(1, dtype=torch.long) if model.n_speakers > 1 else None
            # A tiny length scale keeps the fresh model's durations at one frame per phoneme.
            model.infer(x, torch.tensor([2]), sid=sid, noise_scale=0.0, length_scale=1e-3, noise_scale_w=0.0)
    finally:
        for h in handles:
            h.remove()
    return order


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))  # a copy: the array may be read-only


def weight_norm_parts(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weight_g, weight_v)`` of a plain conv weight [out, in, k] (or [in, out, k] transposed: dim 0 either way)
    such that ``weight_g * weight_v / ||weight_v||`` is ``weight``; all-zero rows get a unit direction."""
    g = torch.norm_except_dim(weight, 2, 0)
    v = torch.where(g == 0, torch.ones_like(weight), weight)
    return g, v


class _Assigner:
    """Collects the state dict of ``model`` from graph values, checking each shape against the model's."""

    def __init__(self, model: SynthesizerTrn, path: str):
        self.own = model.state_dict()
        self.state: Dict[str, torch.Tensor] = {}
        self.path = path

    def put(self, key: str, value: np.ndarray, what: str) -> None:
        want = tuple(self.own[key].shape)
        if tuple(value.shape) != want:
            raise OnnxVoiceError(f"{self.path}: {what} has shape {tuple(value.shape)}, but {key} of the "
                                 f"SynthesizerTrn these sizes describe needs {want}")
        self.state[key] = _tensor(value)

    def weight(self, name: str, value: np.ndarray, what: str) -> None:
        if f"{name}.weight_v" in self.own:  # weight norm, as Piper saves it
            self.put(f"{name}.weight_v", value, what)
            self.state[f"{name}.weight_g"], self.state[f"{name}.weight_v"] = weight_norm_parts(self.state.pop(
                f"{name}.weight_v"))
        else:
            self.put(f"{name}.weight", value, what)


def _check_count(path: str, kind: str, graph_n: int, model_n: int) -> None:
    if graph_n != model_n:
        raise OnnxVoiceError(f"{path}: the graph has {graph_n} {kind}, the SynthesizerTrn its sizes describe runs "
                             f"{model_n}; not a Piper VITS voice, or a variant this importer does not know")


def _assign(model: SynthesizerTrn, w: _Weights, path: str) -> Dict[str, torch.Tensor]:
    """Generator state dict holding the graph's weights (weight norm as weight_g/weight_v); keys the graph has
    no value for are absent."""
    order = _call_order(model)
    out = _Assigner(model, path)
    convs = [(n, m) for n, m in order if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    _check_count(path, "convolutions", len(w.convs), len(convs))
    for i, ((name, module), conv) in enumerate(zip(convs, w.convs)):
        what = f"convolution #{i} ({conv.node.op_type} {conv.node.name!r})"
        want = (int(module.stride[0]), int(module.dilation[0]), int(module.groups), 2 * (int(module.padding[0]),))
        got = (conv.stride, conv.dilation, conv.group, conv.pads)
        if conv.transposed != isinstance(module, nn.ConvTranspose1d) or got != want:
            raise OnnxVoiceError(f"{path}: {what} (stride, dilation, group, pads) = {got} does not match {name} "
                                 f"{want}")
        out.weight(name, conv.weight, what)
        if (conv.bias is None) != (module.bias is None):
            raise OnnxVoiceError(f"{path}: {what} {'lacks' if conv.bias is None else 'has'} a bias; {name} "
                                 f"{'has' if module.bias is not None else 'has none'}")
        if conv.bias is not None:
            out.put(f"{name}.bias", conv.bias, f"the bias of {what}")
    norms = [n for n, m in order if isinstance(m, LayerNorm)]
    _check_count(path, "layer norms", len(w.norms), len(norms))
    for i, (name, (gamma, beta)) in enumerate(zip(norms, w.norms)):
        out.put(f"{name}.gamma", gamma, f"layer norm #{i} gamma")
        out.put(f"{name}.beta", beta, f"layer norm #{i} beta")
    attns = [n for n, m in order if isinstance(m, MultiHeadAttention)]
    _check_count(path, "relative-position embeddings", len(w.rel), 2 * len(attns))
    for i, name in enumerate(attns):
        out.put(f"{name}.emb_rel_k", w.rel[2 * i], f"relative key embedding #{i}")
        out.put(f"{name}.emb_rel_v", w.rel[2 * i + 1], f"relative value embedding #{i}")
    affines = [n for n, m in order if isinstance(m, ElementwiseAffine)]
    _check_count(path, "duration-flow affine layers", len(w.affine), len(affines))
    for name, (m, scale) in zip(affines, w.affine):
        out.put(f"{name}.m", m, "the duration flow's mean")
        with np.errstate(all="ignore"):
            logs = -np.log(scale)
        if not np.all(np.isfinite(logs)):
            raise OnnxVoiceError(f"{path}: the duration flow's scale exp(-logs) has non-positive entries")
        out.put(f"{name}.logs", logs, "the duration flow's log scale")
    out.put("enc_p.emb.weight", w.emb, "the phoneme embedding")
    if w.emb_g is not None:
        out.put("emb_g.weight", w.emb_g, "the speaker embedding")
    return out.state


def _fresh_modules(model: nn.Module, fresh: List[str]) -> List[str]:
    """The outermost modules (or single tensors) whose every tensor is in ``fresh``."""
    left = set(fresh)
    names: List[str] = []
    for name, module in model.named_modules():
        keys = [f"{name}.{k}" if name else k for k in module.state_dict()]
        if name and keys and all(k in left for k in keys):
            names.append(name)
            left.difference_update(keys)
    return names + sorted(left)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------

@dataclass
class ImportedVoice:
    """An ONNX voice as a model: ``model`` (eval mode, weight norm as upstream), the kwargs it was built with, its
    audio settings, the voice config and the modules the file held no weights for (``fresh``)."""

    model: SynthesizerTrn
    model_kwargs: Dict[str, Any]
    audio: AudioConfig
    quality: Optional[str]
    config: Dict[str, Any]
    config_path: Optional[Path]
    fresh: List[str]


def _read_config(path: Path, config: Optional[Union[PathLike, Mapping[str, Any]]]
                 ) -> Tuple[Dict[str, Any], Optional[Path]]:
    if isinstance(config, Mapping):
        return dict(config), None
    config_path = Path(config) if config is not None else onnx_config_path(path)
    if not config_path.is_file():
        raise OnnxVoiceError(f"voice config {config_path} is missing: a Piper voice {path.name} comes with "
                             f"{onnx_config_path(path).name} beside it (or give its path with --config)")
    try:
        return load_voice_config(config_path), config_path
    except VoiceError as exc:
        raise OnnxVoiceError(str(exc)) from None


def _audio_settings(section: Any, hop: int, where: str) -> AudioConfig:
    """STFT settings: Piper's defaults with the decoder's hop, overridden by the config's ``audio`` section (a
    Piper voice config has only ``sample_rate`` there)."""
    section = section if isinstance(section, Mapping) else {}
    try:
        values = {k: int(section[k]) for k in ("sample_rate", "filter_length", "win_length", "mel_channels")
                  if section.get(k) is not None}
        values.update({k: float(section[k]) for k in ("mel_fmin", "mel_fmax") if section.get(k) is not None})
    except (TypeError, ValueError) as exc:
        raise OnnxVoiceError(f"{where}: invalid audio settings {dict(section)}: {exc}") from None
    audio = AudioConfig(hop_length=hop, **values)
    _bound("the audio settings", where, sample_rate=audio.sample_rate, filter_length=audio.filter_length,
           win_length=audio.win_length, mel_channels=audio.mel_channels)
    return audio


def _load_model(path: Path) -> Any:
    try:
        import onnx
    except ImportError:
        raise OnnxVoiceError(f"reading {path} needs the onnx package: pip install 'vits_fast[onnx]'") from None
    if not path.is_file():
        raise OnnxVoiceError(f"ONNX voice {path} does not exist")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise OnnxVoiceError(f"{path} is {size} bytes; an ONNX model is at most {MAX_FILE_BYTES}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxVoiceError(f"cannot read {path}: not an ONNX model ({type(exc).__name__}: {exc})") from None


def import_onnx_voice(path: PathLike, config: Optional[Union[PathLike, Mapping[str, Any]]] = None
                      ) -> ImportedVoice:
    """Rebuild the generator of a Piper ONNX voice (see the module docstring for how).

    ``config``: the voice config (path or dict); default ``<path>.json`` (``VOICE.onnx.json``), which must exist.
    Raises :class:`OnnxVoiceError` for a missing config, a file that is no Piper voice, sizes beyond
    :data:`LIMITS` and weights whose shapes do not fit together. Logs a warning naming the modules that start
    fresh (the file holds the inference graph only).
    """
    path = Path(path)
    config_dict, config_path = _read_config(path, config)
    graph = _Graph(_load_model(path), str(path))
    missing = [n for n in ("input", "input_lengths", "scales") if n not in graph.inputs]
    if missing:
        raise OnnxVoiceError(f"{path} is not a Piper voice: its inputs are {graph.inputs}, a Piper voice reads "
                             "input, input_lengths, scales (and sid with several speakers)")
    weights = _read_weights(graph)
    kwargs = _architecture(graph, weights, str(path))
    for key, value in (("num_symbols", kwargs["n_vocab"]), ("num_speakers", kwargs["n_speakers"])):
        if config_dict.get(key) is not None and int(config_dict[key]) != value:
            raise OnnxVoiceError(f"voice config {config_path or '(given)'} says {key}={config_dict[key]}, but "
                                 f"{path} has {value}: they do not belong together")
    if ("sid" in graph.inputs) != (kwargs["n_speakers"] > 1):
        raise OnnxVoiceError(f"{path}: a `sid` input needs a speaker embedding and vice versa (inputs "
                             f"{graph.inputs}, {kwargs['n_speakers']} speaker(s))")

    hop = math.prod(kwargs["upsample_rates"])
    audio = _audio_settings(config_dict.get("audio"), hop, str(config_path or "the given voice config"))
    kwargs.update(spec_channels=audio.spec_channels, segment_size=8192 // hop)  # Piper's segment: 8192 samples
    ckpt_lib.check_model_config(kwargs, audio, str(path), error=OnnxVoiceError)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_SEED)
        model = SynthesizerTrn(**kwargs).eval()
    state = _assign(model, weights, str(path))
    own = model.state_dict()
    fresh = [k for k in own if k not in state]
    model.load_state_dict({**own, **state}, strict=True)
    fresh_modules = _fresh_modules(model, fresh)
    quality = ckpt_lib.infer_architecture(model.state_dict())["quality"]
    if fresh_modules:
        _LOGGER.warning("%s holds the inference graph only; these parts start fresh: %s (training fits them; "
                        "voice conversion needs enc_q)", path.name, ", ".join(fresh_modules))
    return ImportedVoice(model=model, model_kwargs=kwargs, audio=audio, quality=quality, config=config_dict,
                         config_path=config_path, fresh=fresh_modules)


def load_onnx_voice(path: PathLike, config: Optional[Union[PathLike, Mapping[str, Any]]] = None) -> Voice:
    """:func:`import_onnx_voice` as a :class:`vits_fast.inference.Voice` (what ``load_voice`` returns)."""
    imported = import_onnx_voice(path, config)
    return Voice(model=imported.model, audio=imported.audio, config=imported.config, checkpoint=Path(path),
                 config_path=imported.config_path)


def onnx_checkpoint(path: PathLike, config: Optional[Union[PathLike, Mapping[str, Any]]] = None, *,
                    discriminator: bool = True) -> Dict[str, Any]:
    """A Piper-layout checkpoint dict (see :mod:`vits_fast.checkpoint`) of an ONNX voice at epoch 0, step 0.

    The generator holds the file's weights (weight norm as ``weight_g``/``weight_v``); with ``discriminator``
    a fresh ``MultiPeriodDiscriminator`` (seeded) is added under ``model_d.`` so that Piper's strict
    ``load_from_checkpoint`` finds every key. No optimizer states: a run starts them fresh.
    """
    voice = import_onnx_voice(path, config)
    model_d: nn.Module = nn.Module()
    if discriminator:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FRESH_SEED)
            model_d = MultiPeriodDiscriminator()
        _LOGGER.warning("%s: the discriminator (model_d) starts fresh", Path(path).name)
    hp = ckpt_lib.piper_hyper_parameters(voice.model_kwargs, voice.audio,
                                         num_speakers=voice.model_kwargs["n_speakers"], training={})
    extra = {"model_kwargs": dict(voice.model_kwargs), "audio": voice.audio.to_dict(), "quality": voice.quality,
             "imported_from": str(path), "fresh": voice.fresh}
    return ckpt_lib.build_checkpoint(voice.model, model_d, [], [], 0, 0, hp, extra)


def is_onnx(path: PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_checkpoint_or_voice(path: PathLike) -> Dict[str, Any]:
    """A checkpoint file (:func:`vits_fast.checkpoint.load_checkpoint`) or, for ``.onnx``, the generator of
    that voice as a checkpoint dict without a discriminator (:func:`onnx_checkpoint`)."""
    if is_onnx(path):
        return onnx_checkpoint(path, discriminator=False)
    return ckpt_lib.load_checkpoint(path)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vits_fast.convert", description=_DESCRIPTION)
    p.add_argument("voice", help="Piper voice (.onnx, with its .onnx.json beside it)")
    p.add_argument("output", help="checkpoint to write (.ckpt, Piper layout); config.json is written beside it "
                                  "unless one is there")
    p.add_argument("--config", help="the voice config (default: VOICE.onnx.json)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never one of the inputs)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    output = Path(args.output)
    try:
        config_src = Path(args.config) if args.config else onnx_config_path(Path(args.voice))
        refuse_overwrite([output], [args.voice, config_src])
        if output.exists() and not args.overwrite:
            raise OnnxVoiceError(f"{output} exists; pass --overwrite to replace it")
        ckpt = onnx_checkpoint(args.voice, args.config)
        ckpt_lib.atomic_save(ckpt, output)
        g, d = ckpt_lib.generator_state(ckpt)
        print(f"wrote {output}: {len(g)} generator tensors (fresh: {', '.join(ckpt['vits_fast']['fresh'])}), "
              f"{len(d)} discriminator tensors (fresh)", file=sys.stderr)
        config_out = output.parent / "config.json"
        if config_out.exists():
            print(f"kept the existing {config_out}; the voice's config is {config_src}", file=sys.stderr)
        else:
            shutil.copyfile(config_src, config_out)
            print(f"wrote {config_out} (a copy of {config_src})", file=sys.stderr)
    except (ckpt_lib.CheckpointError, OverwriteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
