"""Run an exported head (onnxruntime, or TensorRT plans): a drop-in for the torch head in the
device client.

>>> engine = EngineHead("engines/smollm2-135m-L1")
>>> session = engine.start(max_seq_len=64)
>>> a = session.step(torch.tensor([1, 2, 3]))    # (3, D) float32, like HeadSession.step
>>> session.last_block                            # (1, R, k_d, 2) with the in-graph fourier option

The backend (:func:`choose_backend`): ``"tensorrt"`` runs the folder's own plans
(``fc-edge export --tensorrt``) with :mod:`fc_edge.engine.trt_runner`, chosen by ``"auto"`` when
the manifest lists plans, ``tensorrt`` imports and torch sees a CUDA GPU; ``"onnxruntime"``
otherwise. For onnxruntime, providers are tried in the order TensorRT -> CUDA -> CPU, keeping
those this onnxruntime build offers (``onnxruntime-gpu`` / JetPack's build have the first two).
The TensorRT provider builds its own fp16 engine on first use and caches it in
``<engine>/trt-cache/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fc_edge.engine.bundle import EngineConfig, fourier_block_fallback, has_plans, load_manifest
from fc_edge.engine.graphs import kv_names
from fc_edge.errors import ConfigError
from fc_edge.models.checkpoint import BundleCheckpoint
from fc_edge.models.head import check_max_seq_len, step_ids

#: What runs a bundle: ``auto`` chooses (see :func:`choose_backend`).
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def select_providers(requested: list[str] | None = None) -> list[str]:
    """``requested`` (checked against this build) or the available ones in preferred order."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ConfigError(
                f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)}): "
                "install onnxruntime-gpu (desktop) or JetPack's onnxruntime-gpu wheel (Jetson)"
            )
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def choose_backend(
    folder: Path, manifest: dict[str, Any], backend: str, providers: list[str] | None
) -> str:
    """The backend for ``backend`` ``"auto"``: ``"tensorrt"`` where the plans are listed and
    present, ``tensorrt`` imports and torch sees a CUDA GPU (and no onnxruntime providers were
    asked for), else ``"onnxruntime"`` where it is installed, else ``"torch"`` (the bundle's
    weights in our head); any other ``backend`` as given."""
    if backend not in BACKENDS:
        raise ConfigError(f"engine backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("tensorrt", "torch") and providers:
        raise ConfigError(f"onnxruntime providers were given for the {backend} backend: drop one")
    if backend != "auto":
        return backend
    if (
        providers is None
        and has_plans(folder, manifest)
        and importlib.util.find_spec("tensorrt") is not None
        and torch.cuda.is_available()
    ):
        return "tensorrt"
    if importlib.util.find_spec("onnxruntime") is not None:
        return "onnxruntime"
    return "torch"


class EngineHead:
    """The exported head in ``folder`` behind the head interface: :meth:`start`,
    ``hidden_size``, ``layer``, ``config`` and ``fingerprint`` (the model's, from the manifest).

    ``backend``: ``"auto"``, ``"onnxruntime"`` or ``"tensorrt"`` (see :func:`choose_backend`);
    ``providers`` and ``threads`` are onnxruntime's, ``onnx_dtype="float16"`` runs the float16
    graphs with onnxruntime (the export verifies them that way).
    """

    def __init__(
        self,
        folder: str | Path,
        providers: list[str] | None = None,
        manifest: dict[str, Any] | None = None,
        threads: int = 0,
        backend: str = "auto",
        onnx_dtype: str = "float32",
    ) -> None:
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else load_manifest(self.folder)
        self.config = EngineConfig(self.manifest)
        self.fingerprint: str = self.manifest["model_fingerprint"]
        weights = self.manifest.get("channel_weights")
        self.channel_weights = torch.tensor(weights) if weights else None
        self.fourier: dict[str, Any] | None = self.manifest.get("fourier")
        self.past_names, self.present_names = kv_names(self.layer)
        self.backend = choose_backend(self.folder, self.manifest, backend, providers)
        if self.backend == "torch":
            raise ConfigError("EngineHead runs the graphs or plans; the torch backend is the "
                              "bundle's weights in our head: fc_edge.engine.open_bundle")
        if self.backend == "tensorrt":
            from fc_edge.engine.trt_runner import TensorRTEngines

            self.providers: list[str] = []
            self.trt = TensorRTEngines(self.folder, self.manifest)
            return
        self._load_onnxruntime(providers, threads, onnx_dtype)

    def _load_onnxruntime(self, providers: list[str] | None, threads: int, onnx_dtype: str) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError("running the ONNX graphs needs onnxruntime: pip install "
                              "'fc-edge[device]' (or --engine-backend torch)")
        import onnxruntime as ort

        graphs = {"float32": self.manifest["graphs"],
                  "float16": self.manifest.get("graphs_float16")}
        if onnx_dtype not in graphs:
            raise ConfigError(f"onnx_dtype must be float32 or float16, got {onnx_dtype!r}")
        if not graphs[onnx_dtype]:
            raise ConfigError(f"{self.folder} has no float16 graphs: export with --float16")
        self.providers = select_providers(providers)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        provider_args: list[Any] = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                cache = self.folder / "trt-cache"
                provider_args.append(
                    (
                        p,
                        {
                            "trt_fp16_enable": True,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(cache),
                        },
                    )
                )
            else:
                provider_args.append(p)
        self.sessions = {}
        for graph in ("prefill", "decode"):
            path = self.folder / graphs[onnx_dtype][graph]["file"]
            if not path.is_file():
                raise ConfigError(f"{path} is missing: export the engine again")
            self.sessions[graph] = ort.InferenceSession(
                str(path), sess_options=opts, providers=provider_args
            )

    @property
    def layer(self) -> int:
        return int(self.manifest["split_layer"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def start(self, max_seq_len: int) -> Any:
        """A session (:class:`EngineSession`, or
        :class:`~fc_edge.engine.trt_runner.TensorRTSession` on the tensorrt backend)."""
        if self.backend == "tensorrt":
            return self.trt.start(max_seq_len)
        return EngineSession(self, max_seq_len)


class EngineSession:
    """One generation: the per-layer key/value arrays ``past`` (optimum order: key 0,
    value 0, key 1, ...; each ``(1, n_kv, T, hd)`` float32) and the next position.

    The first step runs the prefill graph over all its tokens; every later token runs the
    decode graph (a multi-token step after the first runs it once per token).
    ``last_block`` is the ``fourier_block`` output of the last graph run (None without the
    option). For a prefill shorter than the block's ``2 k_s - 1`` rows, where the graph's block
    is undefined, :func:`fc_edge.ops.spectral_compress` computes it from the activation, with
    ``k_s`` clipped to ``S // 2 + 1`` as the codec does).
    """

    def __init__(self, engine: EngineHead, max_seq_len: int) -> None:
        check_max_seq_len(max_seq_len, engine.manifest.get("max_seq_len"),
                          "the engine was exported for")
        self.engine = engine
        self.max_seq_len = max_seq_len
        self.position = 0
        self.past: list[np.ndarray] = []
        self.last_block: Tensor | None = None

    def step(self, input_ids: Tensor) -> Tensor:
        """Run tokens ``input_ids`` (S,) long at the next S positions; returns (S, D) float32."""
        ids = step_ids(input_ids, self.position, self.max_seq_len).numpy()
        s = ids.shape[0]
        if self.position == 0:
            rows = [self._run("prefill", ids[None])]
            block = fourier_block_fallback(torch.from_numpy(rows[0]), self.engine.fourier)
            if block is not None:
                self.last_block = block
        else:
            rows = [self._run("decode", ids[None, i : i + 1]) for i in range(s)]
        return torch.from_numpy(np.concatenate(rows, axis=1)[0])

    def _run(self, graph: str, ids: np.ndarray) -> np.ndarray:
        s = ids.shape[1]
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids.astype(np.int64),
            "position_ids": np.arange(self.position, self.position + s, dtype=np.int64)[None],
        }
        if graph == "decode":
            feeds.update(zip(self.engine.past_names, self.past, strict=True))
        outs = self.engine.sessions[graph].run(None, feeds)
        activation = outs[0]
        n_extra = 1 if self.engine.fourier else 0
        self.last_block = torch.from_numpy(outs[1]) if n_extra else None
        self.past = list(outs[1 + n_extra :])
        self.position += s
        return activation


class EngineBundle(BundleCheckpoint):
    """A bundle whose head runs on its ONNX graphs (onnxruntime) or TensorRT plans: the
    :class:`~fc_edge.models.checkpoint.BundleCheckpoint` interface (fingerprint, tokenizer,
    ``device_head``) with :class:`EngineHead` as the head."""

    def __init__(self, root: Path, label: str, backend: str, providers: list[str] | None = None,
                 threads: int = 0) -> None:
        super().__init__(root, label)
        self.backend, self.providers, self.threads = backend, providers, threads

    def check_placement(self, device: Any = None, dtype: Any = None) -> None:
        if device is not None or dtype is not None:
            raise ConfigError(f"the {self.backend} engine runs where its backend does: drop "
                              "--device / --dtype (or run the weights: --engine-backend torch)")

    def load_head(self, layer: int, device: Any = None, dtype: Any = None) -> Any:
        self.check_split_layer(layer)
        self.check_placement(device, dtype)
        return EngineHead(self.root, providers=self.providers, manifest=self.manifest,
                          threads=self.threads, backend=self.backend)


def open_bundle(folder: str | Path, backend: str = "auto", providers: list[str] | None = None,
                threads: int = 0) -> BundleCheckpoint:
    """An exported bundle (``fc-edge export``) ready for :class:`~fc_edge.runtime.client.
    DeviceClient`: its head runs on ``backend`` (:func:`choose_backend`; ``"torch"`` runs the
    bundle's weights in our head). Only the manifest and the config are read here; the head
    loads in ``device_head``."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    chosen = choose_backend(folder, manifest, backend, providers)
    # what the backend needs is checked here, before a server is asked or a weight read
    if chosen == "tensorrt":
        from fc_edge.engine.trt_runner import check_tensorrt_backend

        check_tensorrt_backend(folder, manifest)
    elif chosen == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError("running the ONNX graphs needs onnxruntime: pip install "
                              "'fc-edge[device]' (or --engine-backend torch)")
        missing = [g["file"] for g in manifest["graphs"].values()
                   if not (folder / g["file"]).is_file()]
        if missing:
            raise ConfigError(f"{folder} lacks {', '.join(missing)}: export the bundle again")
    if chosen == "torch":
        return BundleCheckpoint(folder, str(folder))
    return EngineBundle(folder, str(folder), chosen, providers, threads)
