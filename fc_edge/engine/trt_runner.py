"""Run the TensorRT plans of an exported head (``fc-edge export --tensorrt``) from torch.

>>> engine = EngineHead("engines/smollm2-135m-L1", backend="tensorrt")
>>> session = engine.start(max_seq_len=256)
>>> a = session.step(prompt_ids)        # (S, D) float32 CUDA tensor, like the torch head's
>>> a = session.step(torch.tensor([7]))  # decode: (1, D)

Each plan is deserialized once (:class:`TensorRTEngines`) with one execution context and one
CUDA stream of its own (on torch's default stream TensorRT would add synchronisations); a step
prepares its inputs, binds named tensors (``set_input_shape`` / ``set_tensor_address``) to
torch CUDA tensors and runs ``execute_async_v3``, all on that stream, then waits for it. The
key/value cache stays on the GPU: each cache tensor of a session has two buffers of
``max_seq_len`` positions (separate allocations, so each is aligned as TensorRT wants), one
holding the past
``(1, n_kv, T, hd)`` and the other receiving the present ``(1, n_kv, T + S, hd)`` (contiguous
views of their first elements), swapped after each step, so nothing is allocated or copied per
step beyond what the graph itself does. Caches are in the plan's type (float16 for a strongly typed
fp16 plan, float32 otherwise); the activation is float32 (the graph's output).

Nothing of this module has run on a GPU yet; its binding logic is tested on the CPU through a
fake ``tensorrt`` module that runs the ONNX graphs with onnxruntime (tests/engine/test_tensorrt.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fc_edge.engine.bundle import fourier_block_fallback, has_plans
from fc_edge.engine.graphs import kv_names
from fc_edge.errors import ConfigError
from fc_edge.models.head import check_max_seq_len, step_ids

USE_ONNXRUNTIME = "or run the ONNX graphs with --engine-backend onnxruntime"
# TensorRT wants tensor addresses aligned to 256 bytes; torch's CUDA allocator gives 512 to
# every allocation, so only views into the middle of one (a slice of the ids) need a copy
ALIGNMENT = 256


def torch_dtypes(trt: Any) -> dict[Any, torch.dtype]:
    """``trt.DataType`` -> torch dtype, for the types this TensorRT has."""
    pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
             "INT64": torch.int64, "INT32": torch.int32, "INT8": torch.int8, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in pairs.items() if hasattr(trt.DataType, k)}


class TensorRTGraph:
    """One deserialized plan and its execution context: I/O names, torch dtypes and the
    (min, max) shapes of optimisation profile 0 per input."""

    def __init__(self, trt: Any, runtime: Any, path: Path) -> None:
        self.path = path
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ConfigError(
                f"TensorRT {trt.__version__} cannot load {path} (built for another GPU or "
                f"TensorRT; its log above says which): rebuild it here with "
                f"`fc-edge export --tensorrt`, {USE_ONNXRUNTIME}"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ConfigError(f"TensorRT cannot create an execution context for {path} "
                              "(out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = torch_dtypes(trt)
        self.dtypes: dict[str, torch.dtype] = {}
        for n in names:
            dt = engine.get_tensor_dtype(n)
            if dt not in dtypes:
                raise ConfigError(f"{path}: tensor {n} has TensorRT type {dt}, which the "
                                  "runner does not bind")
            self.dtypes[n] = dtypes[dt]
        self.profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for n in self.inputs:
            lo, _, hi = engine.get_tensor_profile_shape(n, 0)
            self.profile[n] = (tuple(lo), tuple(hi))

    def run(self, inputs: dict[str, Tensor], outputs: Any, stream: int, what: str) -> None:
        """Bind ``inputs`` (name -> tensor of the plan's dtype, contiguous), ask ``outputs``
        (a callable: name, shape, dtype -> tensor to write into) for each output, execute on
        ``stream``. ``what`` names the step in errors (``"a prefill of 9 tokens"``)."""
        ctx = self.context
        for name in self.inputs:
            t = inputs[name]
            lo, hi = self.profile[name]
            shape = tuple(t.shape)
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise ConfigError(
                    f"{what} needs {name} of shape {list(shape)}, outside the TensorRT profile "
                    f"of {self.path.name} ({list(lo)} .. {list(hi)}): rebuild the plans with a "
                    f"larger profile (fc_edge/engine/tensorrt.py), {USE_ONNXRUNTIME}"
                )
            if not ctx.set_input_shape(name, shape):
                raise ConfigError(f"TensorRT refused the shape {list(shape)} of {name} "
                                  f"({self.path.name})")
            if t.data_ptr() % ALIGNMENT:
                t = inputs[name] = t.clone()
            ctx.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ConfigError(f"TensorRT cannot infer the shape of {name} of "
                                  f"{self.path.name} ({list(shape)})")
            t = outputs(name, shape, self.dtypes[name])
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(stream):
            raise ConfigError(f"TensorRT failed to run {self.path.name} ({what}; see its log)")


def check_tensorrt_backend(folder: Path, manifest: dict[str, Any], trt: Any = None,
                           gpu: bool = True) -> Any:
    """What running the plans of ``folder`` needs, checked from files and the environment only
    (nothing is deserialized): plans listed and present, ``tensorrt`` importable and of the
    version that built them, a CUDA GPU (``gpu``). Raises :class:`ConfigError` (one line);
    returns the tensorrt module (``trt``, a test's fake, when given)."""
    if not has_plans(folder, manifest):
        raise ConfigError(f"{folder} has no TensorRT plans: export it with --tensorrt on this "
                          f"machine, {USE_ONNXRUNTIME}")
    entry = manifest["tensorrt"]
    if trt is None:
        if importlib.util.find_spec("tensorrt") is None:
            raise ConfigError("running TensorRT plans needs the tensorrt package (pip install "
                              f"tensorrt, or JetPack's), {USE_ONNXRUNTIME}")
        import tensorrt as trt
    if entry.get("version") != trt.__version__:
        raise ConfigError(
            f"the plans in {folder} were built by TensorRT {entry.get('version')}, this is "
            f"TensorRT {trt.__version__}: rebuild them here (fc-edge export --tensorrt), "
            f"{USE_ONNXRUNTIME}"
        )
    if gpu and not torch.cuda.is_available():
        raise ConfigError("the TensorRT backend needs a CUDA GPU and a CUDA build of torch "
                          f"(torch.cuda.is_available() is False here), {USE_ONNXRUNTIME}")
    return trt


class TensorRTEngines:
    """The prefill and decode plans of an exported folder, ready to run.

    Refuses with one line (:class:`ConfigError`) when the manifest lists no plans, ``tensorrt``
    is missing, the plans were built by another TensorRT version, or torch sees no CUDA GPU.
    ``trt`` and ``device`` exist for tests (a fake module running on the CPU); leave them unset.
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        trt: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        trt = check_tensorrt_backend(folder, manifest, trt, gpu=device is None)
        entry = manifest["tensorrt"]
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self.trt = trt
        self.manifest = manifest
        self.precision: str = entry.get("precision", "fp16")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # outlives its engines
        self.graphs = {g: TensorRTGraph(trt, self.runtime, folder / entry[g])
                       for g in ("prefill", "decode")}
        self.past_names, self.present_names = kv_names(int(manifest["split_layer"]))
        decode = self.graphs["decode"]
        missing = [n for n in self.past_names if n not in decode.inputs]
        if missing:
            raise ConfigError(f"{decode.path} lacks the inputs {', '.join(missing)}: "
                              "export the engine again")
        self.kv_dtype = decode.dtypes[self.past_names[0]]
        self.max_past = decode.profile[self.past_names[0]][1][2]
        # the plans' own stream: TensorRT synchronises around work on the legacy default one
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, max_seq_len: int) -> TensorRTSession:
        return TensorRTSession(self, max_seq_len)

    def stream(self) -> int:
        """The plans' CUDA stream as the handle TensorRT takes (0 off the GPU)."""
        return int(self._stream.cuda_stream) if self._stream is not None else 0

    def on_stream(self) -> Any:
        """A context in which torch's work goes to the plans' stream, after what the caller's
        stream has queued (a no-op off the GPU)."""
        if self._stream is None:
            return contextlib.nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._stream)

    def hand_over(self, t: Tensor) -> Tensor:
        """Wait for the plans' stream, and tell torch's allocator that ``t`` is used on the
        caller's stream from now on (so its memory is not reused under a pending read)."""
        if self._stream is not None:
            self._stream.synchronize()
            t.record_stream(torch.cuda.current_stream(self.device))
        return t


class TensorRTSession:
    """One generation on the TensorRT plans; the same interface as the onnxruntime
    :class:`~fc_edge.engine.runner.EngineSession`: :meth:`step`, ``position``, ``past``
    (torch tensors on the GPU, key 0, value 0, key 1, ...) and ``last_block``."""

    def __init__(self, engines: TensorRTEngines, max_seq_len: int) -> None:
        m = engines.manifest
        check_max_seq_len(max_seq_len)
        check_max_seq_len(max_seq_len, min(int(m.get("max_seq_len", max_seq_len)),
                                           engines.max_past + 1),
                          f"the TensorRT plans (decode profile up to {engines.max_past} past "
                          "positions) run")
        self.engines = engines
        self.max_seq_len = max_seq_len
        self.position = 0
        self.last_block: Tensor | None = None
        self._kv_shape = (1, int(m["num_kv_heads"]), int(m["head_dim"]))
        size = self._kv_shape[1] * max_seq_len * self._kv_shape[2]
        # per cache tensor: two buffers, [current] holds the past, [1 - current] gets the present
        self._buffers = [
            [torch.empty(size, dtype=engines.kv_dtype, device=engines.device) for _ in range(2)]
            for _ in engines.past_names
        ]
        self._current = 0

    def _view(self, i: int, half: int, length: int) -> Tensor:
        b, n_kv, hd = self._kv_shape
        return self._buffers[i][half][: n_kv * length * hd].view(b, n_kv, length, hd)

    @property
    def past(self) -> list[Tensor]:
        return [self._view(i, self._current, self.position) for i in range(len(self._buffers))]

    def step(self, input_ids: Tensor) -> Tensor:
        """Run tokens ``input_ids`` (S,) long at the next S positions; returns (S, D) float32 on
        the GPU, after the plans' stream has finished (so the caller's head timing is the
        head's, and the caller's stream may read it at once)."""
        ids = step_ids(input_ids, self.position, self.max_seq_len)
        s = ids.shape[0]
        e = self.engines
        with e.on_stream():
            ids = ids.to(e.device)
            if self.position == 0:
                rows = [self._run("prefill", ids)]
                # a prompt shorter than the block's 2 k_s - 1 rows: the graph's block output is
                # undefined there, so the block comes from the activation
                block = fourier_block_fallback(rows[0][None], e.manifest.get("fourier"))
                if block is not None:
                    self.last_block = block
            else:
                rows = [self._run("decode", ids[i : i + 1]) for i in range(s)]
            out = rows[0] if len(rows) == 1 else torch.cat(rows)
        if self.last_block is not None:
            e.hand_over(self.last_block)
        return e.hand_over(out)

    def _run(self, graph: str, ids: Tensor) -> Tensor:
        e = self.engines
        g = e.graphs[graph]
        s = ids.shape[0]
        start = self.position
        positions = torch.arange(start, start + s, device=e.device)
        feeds = {"input_ids": ids[None], "position_ids": positions[None]}
        if graph == "decode":
            feeds.update(zip(e.past_names, self.past, strict=True))
        feeds = {n: t.to(g.dtypes[n]).contiguous() for n, t in feeds.items() if n in g.inputs}
        made: dict[str, Tensor] = {}
        present = {n: i for i, n in enumerate(e.present_names)}

        def output(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            if name in present:
                want = (*self._kv_shape[:2], start + s, self._kv_shape[2])
                if shape != want or dtype != e.kv_dtype:
                    raise ConfigError(f"{g.path.name}: {name} is {list(shape)} {dtype}, "
                                      f"expected {list(want)} {e.kv_dtype}: export it again")
                t = self._view(present[name], 1 - self._current, start + s)
            else:
                t = torch.empty(shape, dtype=dtype, device=e.device)
            made[name] = t
            return t

        what = (f"a prefill of {s} tokens" if graph == "prefill"
                else f"a decode step after {start} positions")
        g.run(feeds, output, e.stream(), what)
        self._current = 1 - self._current
        self.position += s
        block = made.get("fourier_block")
        self.last_block = block
        activation = made["activation"]
        return activation[0].float() if activation.dtype != torch.float32 else activation[0]

