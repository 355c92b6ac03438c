"""Export a model's device head to ONNX (and optionally TensorRT), verified against the torch head.

:func:`export_engine` is the one way to do it; ``fc-edge export`` and ``tools/export_engine.py``
are fronts over it. It writes to ``<out>/<name>/``:

* ``prefill.onnx``, ``decode.onnx``: the two graphs of :mod:`fc_edge.engine.graphs` (opset 18,
  float32, batch 1; weights inside each file);
* ``prefill.float16.onnx``, ``decode.float16.onnx`` with ``float16=True`` (or when the installed
  TensorRT builds fp16 only from a float16 graph): the head exported in float16, the same
  inputs and outputs by name (caches float16, the activation float32);
* ``prefill.<precision>.plan``, ``decode.<precision>.plan`` with ``--tensorrt``: serialized
  TensorRT engines in the precision the installed TensorRT really builds
  (:func:`fc_edge.engine.tensorrt.choose_precision`);
* ``manifest.json``: model fingerprint, split layer, graph inputs / outputs with shapes and
  dtypes, opset, the fourier block geometry, verification errors, SHA-256 of every file.

Verification runs each graph with onnxruntime on the CPU and compares every output with the
torch head (:class:`~fc_edge.models.head.HeadSession` for the activation): the error is
``max |ort - torch| / max |torch|`` per output, and the export fails above ``tolerance``
(:data:`FLOAT16_TOLERANCE` for the float16 graphs, against the same float32 torch head).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fc_edge.engine.graphs import DecodeGraph, FourierBlock, PrefillGraph, kv_names
from fc_edge.errors import ConfigError, FcEdgeError

OPSET = 18
TOLERANCE = 1e-4
# float16 graphs against the float32 torch head: fp16 rounds to 2^-11 relative per value, and a
# few layers of it (weights, caches, matmul outputs) stay well inside 1e-2 of the largest value
FLOAT16_TOLERANCE = 1e-2
MANIFEST = "manifest.json"
MAX_SEQ_LEN = 8192  # upper bound of the dynamic token / past axes declared to the exporter


class ExportError(FcEdgeError):
    """The exported graph failed the ONNX checker or disagrees with the torch head."""


@dataclass
class ExportResult:
    """What :func:`export_engine` wrote: the folder, its manifest and timings (seconds)."""

    folder: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def engine_name(model_spec: str, layer: int, fourier: tuple[int, int] | None) -> str:
    """Folder name ``<model>-L<layer>[-fourier-ks<k_s>-kd<k_d>]`` (model spec made path-safe)."""
    stem = Path(model_spec).name if ("/" in model_spec or "\\" in model_spec) else model_spec
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem.removesuffix(".gguf")).strip("-") or "model"
    name = f"{stem}-L{layer}"
    return name + (f"-fourier-ks{fourier[0]}-kd{fourier[1]}" if fourier else "")


def fourier_geometry(
    hidden_size: int,
    k_s: int | None,
    k_d: int | None,
    ratio: float | None,
    prefill_len: int = 128,
) -> tuple[int, int] | None:
    """The in-graph block's ``(k_s, k_d)``: given, or chosen by :class:`FourierCodec` for
    ``ratio`` on a ``(prefill_len, hidden_size)`` activation (the geometry is then fixed in the
    graph: record it, since the codec would choose per shape). ``None`` when no option is set."""
    if k_s is None and k_d is None and ratio is None:
        return None
    from fc_edge.codecs.spectral import FourierCodec

    if ratio is not None and (k_s is not None or k_d is not None):
        raise ConfigError("give either --ratio or --k-s and --k-d for the in-graph fourier block")
    if ratio is None and (k_s is None or k_d is None):
        raise ConfigError("the in-graph fourier block needs both --k-s and --k-d (or --ratio)")
    if ratio is not None:
        codec = FourierCodec(ratio=ratio, value_dtype="float16")
        return codec.geometry_for(torch.zeros(prefill_len, hidden_size))
    assert k_s is not None and k_d is not None
    if k_s < 1 or not 1 <= k_d <= hidden_size // 2 + 1:
        raise ConfigError(
            f"k_s must be >= 1 and k_d in 1..{hidden_size // 2 + 1} (D = {hidden_size}), "
            f"got {k_s}, {k_d}"
        )
    return k_s, k_d


def export_engine(
    model: Any,
    split_layer: int,
    out: str | Path = "engines",
    *,
    model_spec: str | None = None,
    name: str | None = None,
    fourier: tuple[int, int] | None = None,
    tensorrt: bool = False,
    float16: bool = False,
    exporter: str = "dynamo",
    tolerance: float = TOLERANCE,
    verify_len: int = 12,
    verify_steps: int = 3,
    log: Any = None,
) -> ExportResult:
    """Export embed + layers[:split_layer] of ``model`` (a spec for ``load_model`` or a loaded
    Llama / Qwen2 causal LM) to ``out/name/``; see the module doc. ``fourier=(k_s, k_d)`` adds
    the in-graph block output. ``tensorrt=True`` also builds TensorRT engines in the precision
    the installed TensorRT allows (raises :class:`ConfigError` naming the package when
    ``tensorrt`` is not importable, before any work); ``float16=True`` also writes (and
    verifies) the float16 graphs, which a TensorRT without ``BuilderFlag.FP16`` needs and so
    gets without asking. ``exporter``: ``"dynamo"`` or ``"torchscript"`` (see :func:`_onnx_export`).
    Verification runs a ``verify_len``-token prefill and ``verify_steps`` decode steps.
    """
    from fc_edge.models.pretrained import load_model, model_fingerprint
    from fc_edge.models.split import channel_weights, split

    if exporter not in ("dynamo", "torchscript"):
        raise ConfigError(f"exporter must be dynamo or torchscript, got {exporter!r}")
    precision = None
    if tensorrt:
        from fc_edge.engine.tensorrt import choose_precision, require_tensorrt

        require_tensorrt()
        import tensorrt as trt

        precision = choose_precision(trt)
        float16 = float16 or precision.onnx_dtype == "float16"
    say = log or (lambda msg: None)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        model_spec = model_spec or str(model)
        model, _ = load_model(str(model))
    model_spec = model_spec or getattr(model.config, "name_or_path", "") or "model"
    head, _ = split(model, layer=split_layer)
    head = head.float().eval()

    fingerprint = model_fingerprint(model)
    seconds["load"] = time.perf_counter() - t0

    D = head.hidden_size
    if fourier is not None:
        fourier = (int(fourier[0]), int(fourier[1]))
        fourier_geometry(D, fourier[0], fourier[1], None)
    folder = Path(out) / (name or engine_name(model_spec, split_layer, fourier))
    folder.mkdir(parents=True, exist_ok=True)
    block = FourierBlock(D, *fourier).eval() if fourier else None
    block_decode = FourierBlock(D, 1, fourier[1]).eval() if fourier else None

    t0 = time.perf_counter()
    graphs = {
        "prefill": _export_prefill(head, block, folder / "prefill.onnx", verify_len, exporter),
        "decode": _export_decode(head, block_decode, folder / "decode.onnx", exporter),
    }
    seconds["export"] = time.perf_counter() - t0
    say(f"exported {folder}/prefill.onnx, decode.onnx in {seconds['export']:.1f} s")

    t0 = time.perf_counter()
    for file in ("prefill.onnx", "decode.onnx"):
        import onnx

        try:
            onnx.checker.check_model(str(folder / file), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{folder / file} fails the ONNX checker: {e}") from None
    seconds["check"] = time.perf_counter() - t0

    manifest: dict[str, Any] = {
        "format": "fc-edge-engine/1",
        "model": model_spec,
        "model_type": model.config.model_type,
        "model_fingerprint": fingerprint,
        "split_layer": split_layer,
        # per-channel weights the `rotated` codec shapes its noise with (from the layers after
        # the split, which the device does not hold)
        "channel_weights": [round(float(v), 6) for v in channel_weights(model, split_layer)],
        "num_hidden_layers": model.config.num_hidden_layers,
        "hidden_size": D,
        "num_kv_heads": head.decoder_config.num_kv_heads,
        "head_dim": head.decoder_config.head_dim,
        "vocab_size": head.decoder_config.vocab_size,
        "opset": OPSET,
        "dtype": "float32",
        "batch_size": 1,
        "max_seq_len": MAX_SEQ_LEN,
        "exporter": f"torch.onnx {exporter} (torch {torch.__version__})",
        "fourier": None
        if fourier is None
        else {
            "k_s": fourier[0],
            "k_d": fourier[1],
            "prefill_rows": 2 * fourier[0] - 1,
            "prefill_min_seq_len": 2 * fourier[0] - 1,
            "decode_k_s": 1,
            "normalisation": "none (torch.fft backward), as fc_edge.ops.spectral_compress",
        },
        "graphs": graphs,
        "graphs_float16": None,
        "tensorrt": None,
        "files": {},
    }

    t0 = time.perf_counter()
    from fc_edge.engine.runner import EngineHead

    engine = EngineHead(folder, manifest=manifest, providers=["CPUExecutionProvider"])
    errors = verify_engine(engine, head, fourier, verify_len, verify_steps, tolerance)
    manifest["verification"] = {
        "provider": "CPUExecutionProvider",
        "metric": "max |onnxruntime - torch| / max |torch| per output",
        "tolerance": tolerance,
        "prefill_len": verify_len,
        "decode_steps": verify_steps,
        "max_relative_error": errors,
    }
    seconds["verify"] = time.perf_counter() - t0
    say("verified against the torch head: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))

    manifest["verification_float16"] = None
    if float16:
        t0 = time.perf_counter()
        manifest["graphs_float16"] = export_float16(head, fourier, folder, verify_len, exporter)
        seconds["export_float16"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine16 = EngineHead(folder, manifest=manifest, providers=["CPUExecutionProvider"],
                              onnx_dtype="float16")
        errors16 = verify_engine(engine16, head, fourier, verify_len, verify_steps,
                                 FLOAT16_TOLERANCE)
        manifest["verification_float16"] = {
            **manifest["verification"],
            "metric": "max |onnxruntime float16 graph - float32 torch head| / max |torch| "
            "per output",
            "tolerance": FLOAT16_TOLERANCE,
            "max_relative_error": errors16,
        }
        seconds["verify_float16"] = time.perf_counter() - t0
        say("float16 graphs verified against the float32 torch head: "
            + ", ".join(f"{k} {v:.2e}" for k, v in errors16.items()))

    if tensorrt:
        from fc_edge.engine.tensorrt import build_engines

        t0 = time.perf_counter()
        manifest["tensorrt"] = build_engines(folder, manifest)
        seconds["tensorrt"] = time.perf_counter() - t0
        say(f"built {manifest['tensorrt']['prefill']}, {manifest['tensorrt']['decode']} "
            f"(TensorRT {manifest['tensorrt']['version']}, {precision.note if precision else ''})")

    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest["export_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(folder, manifest, seconds)


def export_float16(
    head: Any, fourier: tuple[int, int] | None, folder: Path, example_len: int, exporter: str
) -> dict[str, Any]:
    """Export ``prefill.float16.onnx`` and ``decode.float16.onnx`` from a float16 copy of the
    (float32) torch ``head``: weights and key/value caches float16, while the head itself keeps
    RMSNorm means, softmax and rotary angles in float32 and returns the activation in float32
    (the in-graph fourier block too). Same input and output names as the float32 graphs; checked
    with the ONNX checker. Returns the io spec (as ``manifest["graphs"]``)."""
    import copy

    import onnx

    head16 = copy.deepcopy(head).to_device("cpu", torch.float16).eval()
    D = head.hidden_size
    block = FourierBlock(D, *fourier).eval() if fourier else None
    block_decode = FourierBlock(D, 1, fourier[1]).eval() if fourier else None
    graphs = {
        "prefill": _export_prefill(
            head16, block, folder / "prefill.float16.onnx", example_len, exporter
        ),
        "decode": _export_decode(head16, block_decode, folder / "decode.float16.onnx", exporter),
    }
    for spec in graphs.values():
        try:
            onnx.checker.check_model(str(folder / spec["file"]), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{folder / spec['file']} fails the ONNX checker: {e}") from None
    return graphs


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _onnx_export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic: dict[str, dict[int, Any]],
    exporter: str,
) -> None:
    """Export with torch.onnx, weights embedded, its progress chatter kept off the console.

    ``dynamic``: input or output name -> {axis: torch.export.Dim}. ``exporter="dynamo"`` (the
    maintained default of torch.onnx) traces with torch.export; ``"torchscript"`` (deprecated
    since torch 2.9, about 8x faster to export on a small CPU) traces with torch.jit. Both give
    the same graph interface; see engines/README.md.
    """
    sink = io.StringIO()
    if exporter == "dynamo":
        shapes: list[Any] = []
        for name in input_names:
            if name.startswith("past_key_values."):
                if name == "past_key_values.0.key":  # *past: one tuple argument
                    past = [n for n in input_names if n.startswith("past_key_values.")]
                    shapes.append(tuple(dynamic.get(n) for n in past))
            else:
                shapes.append(dynamic.get(name))
        kwargs: dict[str, Any] = {"dynamo": True, "dynamic_shapes": tuple(shapes),
                                  "external_data": False}
    elif exporter == "torchscript":
        axes = {n: {a: d.__name__ for a, d in v.items()} for n, v in dynamic.items()}
        kwargs = {"dynamo": False, "dynamic_axes": axes}
    else:
        raise ConfigError(f"exporter must be dynamo or torchscript, got {exporter!r}")
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        _quiet_torch_logs(),
    ):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                opset_version=OPSET,
                **kwargs,
            )
        except Exception as e:  # the exporter raises many types; name the graph and the cause
            raise ExportError(f"torch.onnx.export of {path.name} failed: {e}") from e


@contextlib.contextmanager
def _quiet_torch_logs() -> Any:
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _io_spec(path: Path) -> dict[str, Any]:
    """Inputs and outputs of an ONNX file: name -> {shape (ints and axis names), dtype}."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(values: Any) -> dict[str, Any]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out[v.name] = {
                "shape": dims,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            }
        return out

    return {
        "file": path.name,
        "inputs": spec(model.graph.input),
        "outputs": spec(model.graph.output),
    }


def _export_prefill(
    head: Any, block: FourierBlock | None, path: Path, example_len: int, exporter: str
) -> dict[str, Any]:
    _, present = kv_names(head.layer)
    outputs = ["activation"] + (["fourier_block"] if block is not None else []) + present
    s_min = 2 * block.k_s - 1 if block is not None and block.k_s > 1 else 1
    n = max(example_len, s_min + 1, 3)
    S = torch.export.Dim("sequence_length", min=max(s_min, 1), max=MAX_SEQ_LEN)
    ids = torch.zeros(1, n, dtype=torch.long)
    pos = torch.arange(n)[None]
    dynamic = {"input_ids": {1: S}, "position_ids": {1: S}, "activation": {1: S}}
    dynamic.update({name: {2: S} for name in present})
    _onnx_export(
        PrefillGraph(head, block).eval(),
        (ids, pos),
        path,
        ["input_ids", "position_ids"],
        outputs,
        dynamic,
        exporter,
    )
    return _io_spec(path)


def _export_decode(
    head: Any, block: FourierBlock | None, path: Path, exporter: str
) -> dict[str, Any]:
    past, present = kv_names(head.layer)
    outputs = ["activation"] + (["fourier_block"] if block is not None else []) + present
    T = torch.export.Dim("past_sequence_length", min=1, max=MAX_SEQ_LEN - 1)
    T1 = torch.export.Dim("total_sequence_length", min=2, max=MAX_SEQ_LEN)
    t = 5
    pk, pv = head.empty_kv(1, t)
    kv = [x for i in range(head.layer) for x in (pk[i], pv[i])]
    ids = torch.zeros(1, 1, dtype=torch.long)
    pos = torch.full((1, 1), t, dtype=torch.long)
    _onnx_export(
        DecodeGraph(head, block).eval(),
        (ids, pos, *kv),
        path,
        ["input_ids", "position_ids", *past],
        outputs,
        {**{name: {2: T} for name in past}, **{name: {2: T1} for name in present}},
        exporter,
    )
    return _io_spec(path)


def relative_error(got: Any, ref: Any) -> float:
    """``max |got - ref| / max |ref|`` (float64)."""
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    scale = float(np.abs(r).max()) if r.size else 0.0
    return float(np.abs(g - r).max()) / scale if scale > 0 else float(np.abs(g - r).max())


def verify_engine(
    engine: Any,
    head: Any,
    fourier: tuple[int, int] | None,
    prefill_len: int,
    decode_steps: int,
    tolerance: float = TOLERANCE,
) -> dict[str, float]:
    """Run a prefill and ``decode_steps`` decode steps through the engine (onnxruntime) and the
    torch head on the same seeded tokens; returns the largest relative error per output
    (activation, present key/value caches, fourier blocks) and raises :class:`ExportError` when
    one exceeds ``tolerance``."""
    from fc_edge.ops import spectral_compress

    gen = torch.Generator().manual_seed(0)
    n = max(prefill_len, 2 * fourier[0] - 1 if fourier else 1)
    vocab = head.decoder_config.vocab_size
    ids = torch.randint(0, vocab, (n + decode_steps,), generator=gen)
    ref_session = head.start(n + decode_steps)
    eng_session = engine.start(n + decode_steps)
    worst: dict[str, float] = {}

    def note(key: str, err: float) -> None:
        worst[key] = max(worst.get(key, 0.0), err)

    for i, chunk in enumerate([ids[:n]] + [ids[n + j : n + j + 1] for j in range(decode_steps)]):
        phase = "prefill" if i == 0 else "decode"
        ref = ref_session.step(chunk)
        got = eng_session.step(chunk)
        note(f"{phase}.activation", relative_error(got, ref))
        end = ref_session.position
        ref_k = ref_session.k_cache[:, 0, :, :end]
        ref_v = ref_session.v_cache[:, 0, :, :end]
        got_k = np.stack([k[0] for k in eng_session.past[0::2]])
        got_v = np.stack([v[0] for v in eng_session.past[1::2]])
        note(f"{phase}.present", max(relative_error(got_k, ref_k), relative_error(got_v, ref_v)))
        if fourier is not None:
            k_s = fourier[0] if phase == "prefill" else 1
            want = spectral_compress(ref[None], k_s, fourier[1])
            note(f"{phase}.fourier_block", relative_error(eng_session.last_block, want))
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        raise ExportError(
            "the engine disagrees with the torch head beyond the tolerance "
            f"{tolerance:g}: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        )
    return worst
