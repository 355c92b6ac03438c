"""Serialized TensorRT engines (optimisation profiles over the token axis) from the ONNX graphs.

Needs the ``tensorrt`` Python package: on a desktop ``pip install tensorrt`` (with a CUDA driver);
on a Jetson it comes with JetPack (``python3 -c "import tensorrt"`` works in the system Python;
make the venv with ``--system-site-packages``).

The precision is the one the installed TensorRT can really build, decided by
:func:`choose_precision` from the module's capabilities alone:

* ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists (TensorRT 9.x on, JetPack 6's 10.3
  included; TensorRT 11 has nothing else): a strongly typed network from the float16 ONNX copy
  (``prefill.float16.onnx``: the head exported in float16 with RMSNorm's mean of squares,
  softmax, the rotary angles and the in-graph DFT block in float32, as the torch head computes
  them), so every layer runs in the type the ONNX says;
* otherwise ``BuilderFlag.FP16`` (TensorRT 8.x): a weakly typed network from the float32 ONNX
  with that flag, layer norms and reductions pinned to float32 (``OBEY_PRECISION_CONSTRAINTS``
  and each layer's precision), since TensorRT may otherwise run a mean of squares or the DFT's
  DC term in half precision, where they overflow;
* neither (or ``allow_fp16=False``): float32, with TF32 turned off where the flag exists, so
  "fp32" means float32 arithmetic; the manifest says so.

The plan files are named for the precision built (``prefill.fp16.plan``, ``prefill.fp32.plan``)
and the manifest's ``tensorrt`` entry records it; none of this has run on a GPU yet.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fc_edge.errors import ConfigError

INSTALL_HINT = (
    "--tensorrt needs the tensorrt Python package: pip install tensorrt (desktop with an NVIDIA "
    "GPU) or use JetPack's (a venv with --system-site-packages on a Jetson)"
)
# Optimisation profiles: (min, opt, max) tokens of a prefill and past positions of a decode step.
PREFILL_PROFILE = (1, 128, 2048)
DECODE_PROFILE = (1, 512, 4095)


@dataclass(frozen=True)
class BuildPrecision:
    """How the plans are built and what they compute in.

    ``precision``: ``"fp16"`` or ``"fp32"`` (the plan files' infix); ``typing``: ``"weak"``
    (builder flags allow lower precision) or ``"strong"`` (the ONNX's types are binding);
    ``builder_flags`` / ``network_flags``: names in ``trt.BuilderFlag`` /
    ``trt.NetworkDefinitionCreationFlag`` to set; ``cleared_flags``: builder flags to clear
    (TF32, on by default, for a float32 build); ``onnx_dtype``: which graphs the plans are
    parsed from (``"float32"``: ``prefill.onnx``; ``"float16"``: ``prefill.float16.onnx``).
    """

    precision: str
    typing: str
    builder_flags: tuple[str, ...]
    network_flags: tuple[str, ...]
    cleared_flags: tuple[str, ...]
    onnx_dtype: str
    note: str

    def plan_file(self, graph: str) -> str:
        return f"{graph}.{self.precision}.plan"


def choose_precision(trt: Any, allow_fp16: bool = True) -> BuildPrecision:
    """The build a ``tensorrt`` module (or anything with its two flag enums) allows; see the
    module doc. A pure function of ``hasattr`` on the enums, so a fake module tests it.
    ``allow_fp16=False`` asks for float32 (to compare tokens with the torch head exactly)."""
    creation = trt.NetworkDefinitionCreationFlag
    # explicit batch is the only mode from TensorRT 10 on; older ones need the flag
    base = ("EXPLICIT_BATCH",) if hasattr(creation, "EXPLICIT_BATCH") else ()
    if allow_fp16 and hasattr(creation, "STRONGLY_TYPED"):
        return BuildPrecision(
            "fp16", "strong", (), (*base, "STRONGLY_TYPED"), (), "float16",
            "strongly typed network from the float16 ONNX: weights, caches and matmuls fp16, "
            "norm statistics, softmax, rotary angles, the DFT block and the activation output "
            "float32, as the ONNX says",
        )
    if allow_fp16 and hasattr(trt.BuilderFlag, "FP16"):
        pinned = ("OBEY_PRECISION_CONSTRAINTS",) \
            if hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS") else ()
        return BuildPrecision(
            "fp16", "weak", ("FP16", *pinned), base, (), "float32",
            "weakly typed network from the float32 ONNX with BuilderFlag.FP16 (no strongly "
            "typed networks in this TensorRT): reductions, norms and the DFT block pinned to "
            "float32, the rest fp16 or fp32 as TensorRT finds faster",
        )
    tf32 = ("TF32",) if hasattr(trt.BuilderFlag, "TF32") else ()
    why = ("float32 asked for" if not allow_fp16 else
           "this TensorRT has neither a STRONGLY_TYPED network flag nor BuilderFlag.FP16")
    return BuildPrecision("fp32", "weak", (), base, tf32, "float32", f"{why}: float32, no TF32")


def network_creation_flags(trt: Any, precision: BuildPrecision) -> int:
    """The ``create_network`` bit mask of ``precision.network_flags``."""
    flags = 0
    for name in precision.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return flags


def require_tensorrt() -> None:
    """Raise :class:`ConfigError` (one line naming what to install) without ``tensorrt``."""
    if importlib.util.find_spec("tensorrt") is None:
        raise ConfigError(INSTALL_HINT)


def optimization_profiles(manifest: dict[str, Any]) -> dict[str, dict[str, tuple[Any, ...]]]:
    """graph -> input name -> (min, opt, max) shapes: the token axis of a prefill, the past
    length of a decode step. A prefill starts at one token even with the in-graph fourier block:
    a prompt shorter than its ``2 k_s - 1`` rows gets a correct activation from the plan and
    its block from the runner (:func:`fc_edge.engine.bundle.fourier_block_fallback`), as on
    onnxruntime."""
    fourier = manifest.get("fourier")
    s_opt = max(fourier["prefill_min_seq_len"] if fourier else 1, PREFILL_PROFILE[1])
    prefill = (PREFILL_PROFILE[0], s_opt, PREFILL_PROFILE[2])
    past_names = [n for n in manifest["graphs"]["decode"]["inputs"] if n.startswith("past_")]
    n_kv, hd = manifest["num_kv_heads"], manifest["head_dim"]
    return {
        "prefill": {name: tuple((1, s) for s in prefill) for name in ("input_ids", "position_ids")},
        "decode": {
            "input_ids": ((1, 1),) * 3,
            "position_ids": ((1, 1),) * 3,
            **{name: tuple((1, n_kv, t, hd) for t in DECODE_PROFILE) for name in past_names},
        },
    }


def build_engines(
    folder: Path, manifest: dict[str, Any], trt: Any = None, allow_fp16: bool = True
) -> dict[str, Any]:
    """Build ``prefill.<precision>.plan`` and ``decode.<precision>.plan`` next to the ONNX files
    (the float16 ONNX copy must be there when :func:`choose_precision` asks for it); returns the
    manifest's ``tensorrt`` entry (version, precision and how it was obtained, profiles, files).
    ``trt``: the tensorrt module (imported when ``None``; tests pass a fake); ``allow_fp16``:
    as :func:`choose_precision`."""
    if trt is None:
        require_tensorrt()
        import tensorrt as trt
    precision = choose_precision(trt, allow_fp16)
    graphs_key = "graphs" if precision.onnx_dtype == "float32" else "graphs_float16"
    graphs = manifest.get(graphs_key)
    if not graphs:
        raise ConfigError(
            f"TensorRT {trt.__version__} builds fp16 only from the float16 ONNX graphs, and "
            f"{folder} has none: export again with --tensorrt (or --float16)"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    out: dict[str, Any] = {
        "version": trt.__version__,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(precision).items()},
        "onnx": {},
        "profiles": {},
    }
    for graph, shapes in optimization_profiles(manifest).items():
        builder = trt.Builder(logger)
        network = builder.create_network(network_creation_flags(trt, precision))
        parser = trt.OnnxParser(network, logger)
        onnx_path = folder / graphs[graph]["file"]
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"TensorRT cannot parse {onnx_path}: {errors}")
        if "OBEY_PRECISION_CONSTRAINTS" in precision.builder_flags:
            out.setdefault("pinned_float32_layers", {})[graph] = pin_float32(trt, network)
        config = builder.create_builder_config()
        for flag in precision.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in precision.cleared_flags:
            config.clear_flag(getattr(trt.BuilderFlag, flag))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ConfigError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
        path = folder / precision.plan_file(graph)
        path.write_bytes(bytes(plan))
        out["onnx"][graph] = onnx_path.name
        out["profiles"][graph] = {k: [list(s) for s in v] for k, v in shapes.items()}
        out[graph] = path.name
    out["gpu"] = _gpu_name()
    return out


#: Layers a weakly typed fp16 build keeps in float32: RMSNorm's square, mean and reciprocal
#: square root, and softmax (a mean of squares of activations in the hundreds overflows fp16's
#: 65504).
_PINNED_LAYER_TYPES = ("REDUCE", "SOFTMAX", "NORMALIZATION")
_PINNED_ELEMENTWISE = ("POW",)
_PINNED_UNARY = ("SQRT", "RECIP", "RSQRT")


def pin_float32(trt: Any, network: Any) -> int:
    """Set float32 precision and output type on the layers of ``network`` that compute norm
    statistics and softmax (see :data:`_PINNED_LAYER_TYPES`); the build's
    ``OBEY_PRECISION_CONSTRAINTS`` makes TensorRT keep them. Returns how many were pinned.
    The in-graph DFT block's matmuls are not recognisable by type: a weakly typed build may run
    them in fp16 (a strongly typed one, TensorRT >= 9, does not)."""
    kinds = {getattr(trt.LayerType, n) for n in _PINNED_LAYER_TYPES if hasattr(trt.LayerType, n)}
    elementwise = {getattr(trt.ElementWiseOperation, n) for n in _PINNED_ELEMENTWISE
                   if hasattr(trt.ElementWiseOperation, n)}
    unary = {getattr(trt.UnaryOperation, n) for n in _PINNED_UNARY
             if hasattr(trt.UnaryOperation, n)}
    pinned = 0
    # get_layer returns the base ILayer: its ``op`` needs the subclass (as polygraphy does)
    subclass = {getattr(trt.LayerType, "ELEMENTWISE", None): "IElementWiseLayer",
                getattr(trt.LayerType, "UNARY", None): "IUnaryLayer"}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        cls = getattr(trt, subclass.get(layer.type, ""), None)
        if cls is not None and not isinstance(layer, cls):
            layer.__class__ = cls
        op = getattr(layer, "op", None)
        if layer.type in kinds \
                or (layer.type == trt.LayerType.ELEMENTWISE and op in elementwise) \
                or (layer.type == trt.LayerType.UNARY and op in unary):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _gpu_name() -> str | None:
    """The GPU the plans were built on (they run only on the same model of GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
