"""Serialized TensorRT engines (fp16, optimisation profiles over the token axis) from the ONNX.

Needs the ``tensorrt`` Python package: on a desktop ``pip install tensorrt`` (with a CUDA driver);
on a Jetson it comes with JetPack (``python3 -c "import tensorrt"`` works in the system Python;
make the venv with ``--system-site-packages``).
"""

from __future__ import annotations

import importlib.util
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


def require_tensorrt() -> None:
    """Raise :class:`ConfigError` (one line naming what to install) without ``tensorrt``."""
    if importlib.util.find_spec("tensorrt") is None:
        raise ConfigError(INSTALL_HINT)


def build_engines(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Build ``prefill.fp16.plan`` and ``decode.fp16.plan`` next to the ONNX files; returns the
    manifest's ``tensorrt`` entry (version, profiles, files)."""
    require_tensorrt()
    import tensorrt as trt

    fourier = manifest.get("fourier")
    s_min = fourier["prefill_min_seq_len"] if fourier else PREFILL_PROFILE[0]
    prefill = (max(s_min, PREFILL_PROFILE[0]), max(s_min, PREFILL_PROFILE[1]), PREFILL_PROFILE[2])
    past_names = [n for n in manifest["graphs"]["decode"]["inputs"] if n.startswith("past_")]
    kv = (1, manifest["num_kv_heads"], None, manifest["head_dim"])

    def kv_shape(t: int) -> tuple[int, ...]:
        return (kv[0], kv[1], t, kv[3])

    profiles = {
        "prefill": {
            name: tuple((1, s) for s in prefill) for name in ("input_ids", "position_ids")
        },
        "decode": {
            "input_ids": ((1, 1),) * 3,
            "position_ids": ((1, 1),) * 3,
            **{name: tuple(kv_shape(t) for t in DECODE_PROFILE) for name in past_names},
        },
    }
    logger = trt.Logger(trt.Logger.WARNING)
    out: dict[str, Any] = {"version": trt.__version__, "precision": "fp16", "profiles": {}}
    for graph, shapes in profiles.items():
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TRT 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = folder / manifest["graphs"][graph]["file"]
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ConfigError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
        path = folder / f"{graph}.fp16.plan"
        path.write_bytes(bytes(plan))
        out["profiles"][graph] = {k: [list(s) for s in v] for k, v in shapes.items()}
        out[graph] = path.name
    return out
