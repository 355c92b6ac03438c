"""Export a model's device head as a bundle: everything a device needs, and nothing else.

:func:`export_engine` is the one way to do it; ``fc-edge export`` and ``tools/export_engine.py``
are fronts over it. It writes the folder ``out`` (default ``engines/<model>-L<layer>``; a
finished bundle replaces the previous one whole, a folder of other files is refused):

* ``head.safetensors``: the embedding and layers[:L] in float32, under their Hugging Face names
  (``model.embed_tokens.weight``, ``model.layers.0....``): the one copy of the head's weights;
* ``config.json``, ``generation_config.json`` and the tokenizer's files (``tokenizer.json``, ...):
  what tokenizes the prompt and says when to stop;
* ``prefill.onnx``, ``decode.onnx``: the two graphs of :mod:`fc_edge.engine.graphs` (opset 18,
  float32, batch 1) holding their structure only: every weight is ONNX external data pointing
  into ``head.safetensors`` (offset and length of its tensor there), so both graphs and the
  torch runner share one copy;
* ``head.float16.safetensors``, ``prefill.float16.onnx``, ``decode.float16.onnx`` with
  ``float16=True`` (or when the installed TensorRT builds fp16 only from a float16 graph): the
  head in float16, the same inputs and outputs by name (caches float16, the activation float32);
* ``prefill.<precision>.plan``, ``decode.<precision>.plan`` where TensorRT is installed (or with
  ``tensorrt=True``): serialized TensorRT engines in the precision the installed TensorRT really
  builds (:func:`fc_edge.engine.tensorrt.choose_precision`);
* ``manifest.json``: format, model fingerprint, split layer, hidden size, dtype, the codec
  defaults and channel weights, EOS ids, graph inputs / outputs with shapes and dtypes, opset,
  the fourier block geometry, verification errors, size and SHA-256 of every file.

Verification runs each graph with onnxruntime on the CPU and compares every output with the
torch head (:class:`~fc_edge.models.head.HeadSession` for the activation): the error is
``max |ort - torch| / max |torch|`` per output, and the export fails above ``tolerance``
(:data:`FLOAT16_TOLERANCE` for the float16 graphs, against the same float32 torch head).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fc_edge.engine.graphs import DecodeGraph, FourierBlock, PrefillGraph, kv_names
from fc_edge.errors import ConfigError, FcEdgeError
from fc_edge.models.checkpoint import BUNDLE_FORMAT, BUNDLE_WEIGHTS, MANIFEST, SafetensorsFile

OPSET = 18
TOLERANCE = 1e-4
# float16 graphs against the float32 torch head: fp16 rounds to 2^-11 relative per value, and a
# few layers of it (weights, caches, matmul outputs) stay well inside 1e-2 of the largest value
FLOAT16_TOLERANCE = 1e-2
MAX_SEQ_LEN = 8192  # upper bound of the dynamic token / past axes declared to the exporter
WEIGHTS_FLOAT16 = "head.float16.safetensors"


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
    out: str | Path | None = None,
    *,
    model_spec: str | None = None,
    tokenizer: Any = None,
    fourier: tuple[int, int] | None = None,
    tensorrt: bool | None = None,
    float16: bool = False,
    exporter: str = "dynamo",
    tolerance: float = TOLERANCE,
    verify_len: int = 12,
    verify_steps: int = 3,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the bundle of embed + layers[:split_layer] of ``model`` (a spec for
    ``load_model``, or a loaded causal LM with its ``tokenizer``) to the folder ``out``; see the
    module doc. ``fourier=(k_s, k_d)`` adds the in-graph block output. ``tensorrt``: None builds
    TensorRT plans where ``tensorrt`` imports and torch sees a CUDA GPU, True requires them
    (:class:`ConfigError` naming the package, before any work, without it), False skips them.
    ``float16=True`` also writes (and verifies) the float16 graphs, which a strongly typed
    TensorRT build needs and so gets without asking. ``exporter``: ``"dynamo"`` or
    ``"torchscript"`` (see :func:`_onnx_export`). Verification runs a ``verify_len``-token
    prefill and ``verify_steps`` decode steps. ``log`` gets one line per stage (the CLI prints
    them on stderr)."""
    from fc_edge.models.pretrained import load_model, model_fingerprint
    from fc_edge.models.split import channel_weights, split

    if exporter not in ("dynamo", "torchscript"):
        raise ConfigError(f"exporter must be dynamo or torchscript, got {exporter!r}")
    if tensorrt is None:
        tensorrt = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    precision = None
    if tensorrt:
        from fc_edge.engine.tensorrt import choose_precision, require_tensorrt

        require_tensorrt()
        import tensorrt as trt

        precision = choose_precision(trt)
        float16 = float16 or precision.onnx_dtype == "float16"
    progress = _Progress(log, 7 + (2 if float16 else 0) + (1 if tensorrt else 0))
    seconds: dict[str, float] = {}
    with progress("loading the model", seconds, "load"):
        if isinstance(model, (str, Path)):
            model_spec = model_spec or str(model)
            model, loaded_tok = load_model(str(model))
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        model_spec = model_spec or getattr(model.config, "name_or_path", "") or "model"
        head, _ = split(model, layer=split_layer)
        head = head.float().eval()
        fingerprint = model_fingerprint(model)
    D = head.hidden_size
    if fourier is not None:
        fourier = (int(fourier[0]), int(fourier[1]))
        fourier_geometry(D, fourier[0], fourier[1], None)
    folder = Path(out) if out is not None else \
        Path("engines") / engine_name(model_spec, split_layer, fourier)
    check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        with progress(f"writing {BUNDLE_WEIGHTS}, config and tokenizer", seconds, "weights"):
            _write_head_weights(head, work / BUNDLE_WEIGHTS)
            model.config.save_pretrained(work)
            generation = getattr(model, "generation_config", None)
            if generation is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    generation.save_pretrained(work)
            if tokenizer is not None:
                tokenizer.save_pretrained(work)
        block = FourierBlock(D, *fourier).eval() if fourier else None
        block_decode = FourierBlock(D, 1, fourier[1]).eval() if fourier else None
        graphs = {}
        with progress(f"exporting prefill.onnx (torch.onnx {exporter})", seconds, "export"):
            graphs["prefill"] = _export_prefill(head, block, work / "prefill.onnx", verify_len,
                                                exporter, BUNDLE_WEIGHTS)
        with progress(f"exporting decode.onnx (torch.onnx {exporter})", seconds,
                      "export_decode"):
            graphs["decode"] = _export_decode(head, block_decode, work / "decode.onnx", exporter,
                                              BUNDLE_WEIGHTS)
        seconds["export"] += seconds.pop("export_decode")
        with progress("checking the graphs (onnx.checker)", seconds, "check"):
            for spec in graphs.values():
                _check_onnx(work / spec["file"])

        from fc_edge.codecs import get_codec
        from fc_edge.models.defaults import DEFAULT_CODEC

        eos = getattr(generation, "eos_token_id", None) if generation is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "model": model_spec,
            "model_type": model.config.model_type,
            "model_fingerprint": fingerprint,
            "split_layer": split_layer,
            # per-channel weights the `rotated` codec shapes its noise with (from the layers
            # after the split, which the device does not hold); float32 values written exactly
            # (JSON's shortest round-tripping form), since both ends must register the same
            # vector
            "channel_weights": [float(v) for v in channel_weights(model, split_layer)],
            "codec": {"name": DEFAULT_CODEC, "config": get_codec(DEFAULT_CODEC).config()},
            "eos_token_ids": [] if eos is None else
            ([int(eos)] if isinstance(eos, int) else [int(t) for t in eos]),
            "num_hidden_layers": model.config.num_hidden_layers,
            # what the head computes, so a device builds it without transformers' config classes
            "decoder_config": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(head.decoder_config).items()},
            "hidden_size": D,
            "num_kv_heads": head.decoder_config.num_kv_heads,
            "head_dim": head.decoder_config.head_dim,
            "vocab_size": head.decoder_config.vocab_size,
            "opset": OPSET,
            "dtype": "float32",
            "weights": {"file": BUNDLE_WEIGHTS, "dtype": "float32",
                        "tensors": len(head.state_dict())},
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

        from fc_edge.engine.runner import EngineHead

        with progress("verifying on onnxruntime against the torch head", seconds, "verify"):
            engine = EngineHead(work, manifest=manifest, providers=["CPUExecutionProvider"])
            errors = verify_engine(engine, head, fourier, verify_len, verify_steps, tolerance)
        manifest["verification"] = {
            "provider": "CPUExecutionProvider",
            "metric": "max |onnxruntime - torch| / max |torch| per output",
            "tolerance": tolerance,
            "prefill_len": verify_len,
            "decode_steps": verify_steps,
            "max_relative_error": errors,
        }
        progress.note("largest relative errors: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

        manifest["verification_float16"] = None
        if float16:
            with progress("exporting the float16 graphs", seconds, "export_float16"):
                manifest["graphs_float16"] = export_float16(head, fourier, work, verify_len,
                                                            exporter)
            with progress("verifying the float16 graphs", seconds, "verify_float16"):
                engine16 = EngineHead(work, manifest=manifest,
                                      providers=["CPUExecutionProvider"], onnx_dtype="float16")
                errors16 = verify_engine(engine16, head, fourier, verify_len, verify_steps,
                                         FLOAT16_TOLERANCE)
            manifest["verification_float16"] = {
                **manifest["verification"],
                "metric": "max |onnxruntime float16 graph - float32 torch head| / max |torch| "
                "per output",
                "tolerance": FLOAT16_TOLERANCE,
                "max_relative_error": errors16,
            }

        if tensorrt:
            from fc_edge.engine.tensorrt import build_engines

            with progress("building TensorRT plans", seconds, "tensorrt"):
                manifest["tensorrt"] = build_engines(work, manifest)
            entry = manifest["tensorrt"]
            progress.note(f"built {entry['prefill']}, {entry['decode']} (TensorRT "
                          f"{entry['version']}, {precision.note if precision else ''})")

        with progress("hashing the files, writing manifest.json", seconds, "manifest"):
            manifest["files"] = {
                p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(work.iterdir())
                if p.is_file() and p.name != MANIFEST
            }
            manifest["weights"]["bytes"] = manifest["files"][BUNDLE_WEIGHTS]["bytes"]
            manifest["export_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)  # a previous bundle (checked above): replaced whole
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(folder, manifest, seconds)


class _Progress:
    """Stage lines ``[i/n] what ... 1.2 s`` through ``log`` (nothing without one)."""

    def __init__(self, log: Callable[[str], None] | None, total: int) -> None:
        self.log, self.total, self.done = log, total, 0

    @contextlib.contextmanager
    def __call__(self, what: str, seconds: dict[str, float], key: str) -> Any:
        self.done += 1
        if self.log:
            self.log(f"[{self.done}/{self.total}] {what} ...")
        t0 = time.perf_counter()
        yield
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        if self.log:
            self.log(f"[{self.done}/{self.total}] {what}: {time.perf_counter() - t0:.1f} s")

    def note(self, line: str) -> None:
        if self.log:
            self.log(f"      {line}")


def stderr_log(line: str) -> None:
    """The CLI's ``log``: one line on stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


def check_target(folder: Path) -> None:
    """Refuse to replace a folder that is neither absent, empty nor a bundle."""
    if folder.is_file():
        raise ConfigError(f"--out {str(folder)!r} is a file: give a folder for the bundle")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise ConfigError(f"--out {str(folder)!r} holds other files (no manifest.json): give an "
                          "empty or new folder, or a previous bundle to replace")


def _write_head_weights(head: Any, path: Path) -> None:
    """The head's tensors under their Hugging Face names (``model.`` + the head's own)."""
    from safetensors.torch import save_file

    state = {f"model.{name}": t.detach().contiguous()
             for name, t in head.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path} fails the ONNX checker: {e}") from None


def share_weights(source: Path, target: Path, weights: Path) -> int:
    """Write the ONNX file ``source`` to ``target`` with every initializer that is a head
    weight pointed at that tensor's bytes in ``weights`` (a safetensors file in ``target``'s
    folder: ONNX external data with its offset and length), after checking the bytes are equal;
    every other initializer is kept inside the graph. Returns how many were pointed.
    Initializers are named after the graph module's parameters
    (``head.layers.0.mlp.up_proj.weight``): the weights file has ``model.`` instead of
    ``head.``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source), load_external_data=True)
    stored = SafetensorsFile(weights)
    np_dtypes = {"F32": np.float32, "F16": np.float16}
    shared = 0
    with weights.open("rb") as f:
        for init in model.graph.initializer:
            name = "model." + init.name.removeprefix("head.")
            entry = stored.entries.get(name)
            if entry is None or entry["dtype"] not in np_dtypes:
                continue
            value = numpy_helper.to_array(init)
            begin, end = entry["data_offsets"]
            f.seek(stored.data_start + begin)
            on_disk = np.frombuffer(f.read(end - begin), dtype=np_dtypes[entry["dtype"]])
            if value.dtype != on_disk.dtype or value.size != on_disk.size \
                    or list(value.shape) != [int(d) for d in entry["shape"]] \
                    or value.tobytes() != on_disk.tobytes():
                continue  # not the same tensor (a transposed or converted copy): keep it inline
            init.ClearField("raw_data")
            del init.external_data[:]
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", weights.name),
                             ("offset", str(stored.data_start + begin)),
                             ("length", str(end - begin))):
                kv = init.external_data.add()
                kv.key, kv.value = key, val
            shared += 1
    for node in model.graph.node:  # the exporter's stack traces and scopes: bytes, not structure
        del node.metadata_props[:]
        node.doc_string = ""
    for init in model.graph.initializer:  # what stays: inside the graph, not beside it
        if init.data_location == onnx.TensorProto.EXTERNAL and \
                next((kv.value for kv in init.external_data if kv.key == "location"),
                     None) != weights.name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init, source.parent),
                                                  init.name))
    onnx.save(model, str(target))
    return shared


def export_float16(
    head: Any, fourier: tuple[int, int] | None, folder: Path, example_len: int, exporter: str
) -> dict[str, Any]:
    """Export ``prefill.float16.onnx`` and ``decode.float16.onnx`` from a float16 copy of the
    (float32) torch ``head``, their weights in ``head.float16.safetensors``: weights and
    key/value caches float16, while the head itself keeps RMSNorm means, softmax and rotary
    angles in float32 and returns the activation in float32 (the in-graph fourier block too).
    Same input and output names as the float32 graphs; checked with the ONNX checker. Returns
    the io spec (as ``manifest["graphs"]``)."""
    import copy

    head16 = copy.deepcopy(head).to_device("cpu", torch.float16).eval()
    _write_head_weights(head16, folder / WEIGHTS_FLOAT16)
    D = head.hidden_size
    block = FourierBlock(D, *fourier).eval() if fourier else None
    block_decode = FourierBlock(D, 1, fourier[1]).eval() if fourier else None
    graphs = {
        "prefill": _export_prefill(head16, block, folder / "prefill.float16.onnx", example_len,
                                   exporter, WEIGHTS_FLOAT16),
        "decode": _export_decode(head16, block_decode, folder / "decode.float16.onnx", exporter,
                                 WEIGHTS_FLOAT16),
    }
    for spec in graphs.values():
        _check_onnx(folder / spec["file"])
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
    weights: str,
) -> None:
    """Export with torch.onnx to ``path``, its weights pointed into the safetensors file
    ``weights`` beside it (:func:`share_weights`), its progress chatter kept off the console.

    ``dynamic``: input or output name -> {axis: torch.export.Dim}. ``exporter="dynamo"`` (the
    maintained default of torch.onnx) traces with torch.export; ``"torchscript"`` (deprecated
    since torch 2.9, about 8x faster to export on a small CPU) traces with torch.jit. Both give
    the same graph interface; see engines/README.md. Neither folds the weights' transposes
    into new constants (dynamo ``optimize=False``, torchscript ``do_constant_folding=False``),
    so the graph's initializers are the head's own tensors and can be shared; onnxruntime and
    TensorRT fold them when they load the graph.
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
        # external data: a head of a large model (a 7B one's embedding alone is 2 GB) does not
        # fit a protobuf
        kwargs: dict[str, Any] = {"dynamo": True, "dynamic_shapes": tuple(shapes),
                                  "external_data": True, "optimize": False}
    elif exporter == "torchscript":
        axes = {n: {a: d.__name__ for a, d in v.items()} for n, v in dynamic.items()}
        kwargs = {"dynamo": False, "dynamic_axes": axes, "do_constant_folding": False}
    else:
        raise ConfigError(f"exporter must be dynamo or torchscript, got {exporter!r}")
    with (
        tempfile.TemporaryDirectory(prefix="fc-edge-onnx-") as tmp,
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        _quiet_torch_logs(),
    ):
        warnings.simplefilter("ignore")
        raw = Path(tmp) / path.name
        try:
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=input_names,
                output_names=output_names,
                opset_version=OPSET,
                **kwargs,
            )
        except Exception as e:  # the exporter raises many types; name the graph and the cause
            raise ExportError(f"torch.onnx.export of {path.name} failed: {e}") from e
        share_weights(raw, path, path.parent / weights)


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
    head: Any, block: FourierBlock | None, path: Path, example_len: int, exporter: str,
    weights: str,
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
        weights,
    )
    return _io_spec(path)


def _export_decode(
    head: Any, block: FourierBlock | None, path: Path, exporter: str, weights: str
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
        weights,
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
