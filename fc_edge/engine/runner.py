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
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fc_edge.engine.graphs import kv_names
from fc_edge.errors import ConfigError

BACKENDS = ("auto", "onnxruntime", "tensorrt")
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


class EngineConfig:
    """The few Hugging Face config fields a client reads, from the manifest."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.model_type = manifest["model_type"]
        self.hidden_size = manifest["hidden_size"]
        self.num_hidden_layers = manifest["num_hidden_layers"]
        self.vocab_size = manifest["vocab_size"]


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{str(folder)!r} is not an exported engine (no manifest.json): "
            "make one with `fc-edge export`"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): export the engine again") from None


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


def has_plans(folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether the manifest lists TensorRT plans and both files are in ``folder``."""
    entry = manifest.get("tensorrt")
    return bool(entry) and all((folder / entry[g]).is_file() for g in ("prefill", "decode"))


def choose_backend(
    folder: Path, manifest: dict[str, Any], backend: str, providers: list[str] | None
) -> str:
    """``"tensorrt"`` or ``"onnxruntime"`` for ``backend`` ``"auto"`` (plans listed and present,
    ``tensorrt`` importable, a CUDA GPU, no onnxruntime providers asked for) or as given."""
    if backend not in BACKENDS:
        raise ConfigError(f"engine backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt" and providers:
        raise ConfigError("onnxruntime providers were given for the tensorrt backend: drop one")
    if backend != "auto":
        return backend
    if (
        providers is None
        and has_plans(folder, manifest)
        and importlib.util.find_spec("tensorrt") is not None
        and torch.cuda.is_available()
    ):
        return "tensorrt"
    return "onnxruntime"


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
        if self.backend == "tensorrt":
            from fc_edge.engine.trt_runner import TensorRTEngines

            self.providers: list[str] = []
            self.trt = TensorRTEngines(self.folder, self.manifest)
            return
        self._load_onnxruntime(providers, threads, onnx_dtype)

    def _load_onnxruntime(self, providers: list[str] | None, threads: int, onnx_dtype: str) -> None:
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


def step_ids(input_ids: Tensor, position: int, max_seq_len: int) -> Tensor:
    """A session step's tokens as a flat (S,) long CPU tensor, refused (one line) when empty or
    when the S positions after ``position`` overflow the session's ``max_seq_len``."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
    s = ids.shape[0]
    if s == 0:
        raise ConfigError("step needs at least one token")
    if position + s > max_seq_len:
        raise ConfigError(
            f"the session holds {max_seq_len} positions; {s} more token(s) at position "
            f"{position} do not fit: start a session with a larger max_seq_len"
        )
    return ids


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
        if max_seq_len < 1:
            raise ConfigError(f"max_seq_len must be at least 1, got {max_seq_len}")
        if max_seq_len > engine.manifest.get("max_seq_len", max_seq_len):
            raise ConfigError(
                f"the engine was exported for at most {engine.manifest['max_seq_len']} positions, "
                f"asked for {max_seq_len}"
            )
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
            fourier = self.engine.fourier
            if fourier and s < fourier["prefill_min_seq_len"]:
                # outside the graph's block shapes: the same block from the activation
                from fc_edge.ops import spectral_compress

                k_s = min(fourier["k_s"], s // 2 + 1)
                self.last_block = spectral_compress(torch.from_numpy(rows[0]), k_s, fourier["k_d"])
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
