"""A model's files, read tensor by tensor: what a device needs of a model and nothing more.

A device runs the embedding and layers[:L]; a model folder, a GGUF file or an exported bundle
holds far more. :func:`open_checkpoint` resolves a model spec (those of
:func:`~fc_edge.models.pretrained.load_model`, plus bundles) to a :class:`Checkpoint` after
reading only the config and the files' headers, so a wrong path, an unsupported family or a split
layer out of range fails before any weight is read. Then:

* :meth:`Checkpoint.device_head` builds the :class:`~fc_edge.models.head.Head` from the
  embedding and layers[:L] alone. Safetensors files are opened with ``safetensors.safe_open``
  and read by tensor name: the tensors are views of the memory-mapped file, so only the pages a
  forward touches are ever resident (of the embedding, the rows of the tokens seen). A GGUF
  file's needed tensors are read (``os.pread`` at the offsets its header gives) and dequantized
  one by one with the ``gguf`` package, as transformers' own GGUF loader does.
* :meth:`Checkpoint.fingerprint` is :func:`~fc_edge.models.pretrained.model_fingerprint` of the
  full model computed from the files: the config and, of each tensor, its shape from the header
  and its 1024 sampled elements read with ``os.pread`` (4 KiB at most per tensor; the tensors
  themselves are never loaded). A GGUF file has no element offsets before dequantization, so its
  tensors are dequantized one at a time, sampled and dropped.
* :meth:`Checkpoint.channel_weights` reads the input-norm gains of the layers after the split
  (``L`` vectors of D values), which the ``rotated`` codec shapes its noise with on both ends.

A bundle (``fc-edge export``) holds the head's weights alone; its manifest carries the
fingerprint and the channel weights, so nothing of the rest of the model is needed anywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fc_edge.errors import ConfigError, ModelError
from fc_edge.models.decoder import DecoderConfig, channel_gains, check_family, rope_inv_freq
from fc_edge.models.pretrained import (
    DEFAULT_MODEL,
    cache_root,
    fingerprint_digest,
    is_complete_folder,
    resolve_local,
    smollm2_gguf_path,
)

#: ``manifest.json``'s format tag for a device bundle (written by fc_edge.engine.export).
BUNDLE_FORMAT = "fc-edge-bundle/1"
MANIFEST = "manifest.json"
#: The bundle's weights: the head's tensors under their Hugging Face names.
BUNDLE_WEIGHTS = "head.safetensors"
EMBED = "model.embed_tokens.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
                       "F64": np.dtype("<f8")}
# a gap between sampled elements below this is read in one pread (one page)
_READ_RUN = 4096


@dataclass
class DeviceHead:
    """What a device runs and must agree on with the server, without the rest of the model.

    ``head``: anything with ``start(max_seq_len) -> session`` whose ``session.step(ids)`` gives
    the (S, D) activation (our :class:`~fc_edge.models.head.Head`, or an engine runner);
    ``fingerprint``: the full model's :func:`~fc_edge.models.pretrained.model_fingerprint`;
    ``channel_weights``: (D,) float32 for the ``rotated`` codec's noise shaping (None: unshaped);
    ``eos_token_ids``: the model's stop tokens; ``source``: where it came from, for messages.
    """

    head: Any
    split_layer: int
    fingerprint: str
    hidden_size: int
    channel_weights: Tensor | None = None
    tokenizer: Any = None
    eos_token_ids: list[int] = field(default_factory=list)
    source: str = ""


def open_checkpoint(spec: str | Path) -> Checkpoint:
    """The checkpoint a model spec names, its config read and its family checked (no weight is
    read): ``"smollm2-135m"`` (the cached float32 folder, or the package's GGUF file when the
    cache is not there yet: a device does not convert), a Hugging Face folder of safetensors, a
    ``.gguf`` file, a bundle folder (``fc-edge export``), a hub id found in the local Hugging
    Face cache, or ``"synthetic:<name>"`` (built in memory). Raises :class:`ModelError`."""
    spec = str(spec)
    if spec.startswith("synthetic:"):
        from fc_edge.models.synthetic import build_synthetic

        return ModelCheckpoint(build_synthetic(spec.removeprefix("synthetic:")), None, spec)
    if spec == DEFAULT_MODEL:
        folder = cache_root() / DEFAULT_MODEL
        path = folder if is_complete_folder(folder) else smollm2_gguf_path()
    else:
        path = resolve_local(spec)
    if path.is_file():
        return GGUFCheckpoint(path, spec)
    if (path / MANIFEST).is_file():
        return BundleCheckpoint(path, spec)
    return SafetensorsCheckpoint(path, spec)


class Checkpoint:
    """A model's config and tensors behind one interface (see the module doc). Subclasses
    implement :meth:`shapes`, :meth:`read` and :meth:`sample`; names are the Hugging Face
    state-dict names of the full model (``model.layers.3.mlp.up_proj.weight``)."""

    root: Path
    config: Any
    label: str

    # --- what a subclass provides ----------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, as the model's state dict would have them."""
        raise NotImplementedError

    def read(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The named tensors (float32 or the file's float dtype), nothing else read."""
        raise NotImplementedError

    def sample(self, name: str, indices: Tensor) -> np.ndarray:
        """float32 values at the flat ``indices`` of tensor ``name``."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def check_split_layer(self, layer: int) -> None:
        from fc_edge.models.split import check_split_layer

        check_split_layer(self.config, layer)

    def head_names(self, layer: int) -> list[str]:
        """The stored names of the embedding and layers[:layer]."""
        prefixes = tuple(f"model.layers.{i}." for i in range(layer))
        names = [n for n in self.shapes() if n == EMBED or n.startswith(prefixes)]
        if EMBED not in names:
            raise ModelError(f"{self.label}: no tensor {EMBED} (is it a {self.config.model_type} "
                             "checkpoint?)")
        return names

    def head_bytes(self, layer: int) -> int:
        """Bytes of the head's weights (embedding and layers[:layer]) in float32."""
        shapes = self.shapes()
        return sum(4 * math.prod(shapes[n]) for n in self.head_names(layer))

    def fingerprint(self) -> str:
        """:func:`~fc_edge.models.pretrained.model_fingerprint` of the full model loaded in
        float32, from the files (sampled elements only)."""
        shapes = self.shapes()

        def entry(name: str) -> tuple[str, tuple[int, ...], str, Any]:
            return name, shapes[name], "float32", lambda idx: self.sample(name, idx)

        return fingerprint_digest(self.config.to_dict(), (entry(n) for n in sorted(shapes)))

    def channel_weights(self, layer: int) -> Tensor:
        """(D,) float32: the ``rotated`` codec's channel weights for a split after ``layer``
        (:func:`~fc_edge.models.decoder.channel_gains` of the later layers' input-norm gains)."""
        self.check_split_layer(layer)
        names = [f"model.layers.{i}.input_layernorm.weight" for i in range(layer,
                                                                            self.num_layers)]
        gains = self.read(names)
        cfg = DecoderConfig.from_hf(self.config, self.num_layers)
        return channel_gains([gains[n] for n in names], cfg)

    def tokenizer(self) -> Any:
        """The model's tokenizer, or None when the checkpoint has none."""
        if not any((self.root / f).is_file() for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.root)

    def eos_token_ids(self) -> list[int]:
        """Stop tokens: ``generation_config.json``'s, else the config's."""
        eos = None
        gen = self.root / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        return _ids(eos)

    def check_placement(self, device: Any = None, dtype: Any = None) -> None:
        """Raise (one line) for a ``device`` or ``dtype`` the head cannot take, before any
        weight is read."""
        from fc_edge.devices import resolve_device, resolve_dtype

        if dtype is not None:
            resolve_dtype(dtype, resolve_device(device))
        elif device is not None:
            resolve_device(device)

    def decoder_config(self, layer: int) -> DecoderConfig:
        """What the head's layers[:layer] compute."""
        return DecoderConfig.from_hf(self.config, layer)

    def hf_config(self) -> Any:
        """The Hugging Face config the head keeps as ``Head.config`` (None for a bundle)."""
        return self.config

    def load_head(self, layer: int, device: Any = None, dtype: Any = None) -> Any:
        """Our :class:`~fc_edge.models.head.Head` over the embedding and layers[:layer] (float32
        unless ``dtype`` says otherwise; on ``device``, default CPU)."""
        from fc_edge.devices import resolve_device, resolve_dtype
        from fc_edge.models.head import Head

        self.check_split_layer(layer)
        self.check_placement(device, dtype)
        cfg = self.decoder_config(layer)
        place = resolve_device(device)
        precision = resolve_dtype(dtype, place) if dtype is not None else torch.float32
        tensors = self.read(self.head_names(layer))
        state = {name.removeprefix("model."): t for name, t in tensors.items()}
        with torch.device("meta"):
            head = Head(cfg, self.hf_config())
        try:
            head.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ModelError(f"{self.label}: the head's tensors do not fit the decoder: "
                             f"{e}") from None
        head.inv_freq = rope_inv_freq(cfg)
        # a float32 file on the CPU stays memory-mapped (.to is then a no-op); the rotary
        # frequencies stay float32 whatever the weights' dtype, as in transformers
        head.to_device(place, precision)
        return head.eval()

    def device_head(self, layer: int | None = None, device: Any = None,
                    dtype: Any = None) -> DeviceHead:
        """The :class:`DeviceHead` split after ``layer`` (default
        :data:`~fc_edge.models.split.DEFAULT_SPLIT_LAYER`): weights, tokenizer, fingerprint."""
        from fc_edge.models.defaults import DEFAULT_SPLIT_LAYER

        layer = DEFAULT_SPLIT_LAYER if layer is None else layer
        self.check_split_layer(layer)
        return DeviceHead(
            head=self.load_head(layer, device, dtype), split_layer=layer,
            fingerprint=self.fingerprint(), hidden_size=self.hidden_size,
            channel_weights=self.channel_weights(layer), tokenizer=self.tokenizer(),
            eos_token_ids=self.eos_token_ids(), source=self.label)


def _ids(eos: Any) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


def _load_config(folder: Path, label: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the config of {label!r}: {e}") from None
    check_family(config)
    return config


def pread_exact(fd: int, n: int, offset: int) -> np.ndarray:
    """``n`` bytes at ``offset`` of ``fd`` as a writable uint8 array (``os.preadv`` into it,
    several reads where the OS returns fewer)."""
    out = np.empty(n, dtype=np.uint8)
    view = memoryview(out)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done: done + (1 << 30)]], offset + done)
        if got <= 0:
            raise ModelError(f"unexpected end of file at byte {offset + done}")
        done += got
    return out


class SafetensorsFile:
    """One ``.safetensors`` file's header (parsed by hand: 8-byte little-endian length, then a
    JSON object of name -> dtype, shape, data_offsets) and sampled reads of its elements."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise ModelError(f"{path} is not a readable safetensors file: {e}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, dict[str, Any]] = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.entries[name]["shape"])

    def sample(self, name: str, indices: Tensor) -> np.ndarray:
        """float32 values at the flat ``indices`` (sorted ascending) of ``name``, read with
        ``os.pread`` in runs of at most a page between neighbouring samples."""
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {name} is {entry['dtype']}, not a float type "
                             "fc-edge reads")
        offsets = self.data_start + entry["data_offsets"][0] + indices.numpy() * dtype.itemsize
        out = np.empty(len(offsets), dtype=dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            start = 0
            while start < len(offsets):
                end = start + 1
                while end < len(offsets) and offsets[end] - offsets[start] < _READ_RUN:
                    end += 1
                base = int(offsets[start])
                raw = pread_exact(fd, int(offsets[end - 1]) - base + dtype.itemsize, base)
                for j in range(start, end):
                    at = int(offsets[j]) - base
                    out[j] = raw[at: at + dtype.itemsize].view(dtype)[0]
                start = end
        finally:
            os.close(fd)
        if entry["dtype"] == "BF16":
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32)


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face folder: ``config.json`` and ``*.safetensors`` (one file, or shards named by
    ``model.safetensors.index.json``)."""

    def __init__(self, root: Path, label: str, weights: Sequence[str] | None = None,
                 read_config: bool = True) -> None:
        self.root, self.label = root, label
        if not (root / "config.json").is_file():
            raise ModelError(f"model folder {str(root)!r} has no config.json: give a Hugging "
                             f"Face model folder, a .gguf file, a bundle or {DEFAULT_MODEL!r}")
        if read_config:
            self.config = _load_config(root, label)
        if weights is None:
            index = root / "model.safetensors.index.json"
            if index.is_file():
                weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            else:
                weights = sorted(p.name for p in root.glob("*.safetensors"))
        if not weights:
            bins = sorted(p.name for p in root.glob("*.bin"))
            raise ModelError(
                f"{str(root)!r} has no safetensors weights"
                + (f" (only {', '.join(bins)}: save it again with safe_serialization=True)"
                   if bins else ""))
        self.files = [SafetensorsFile(root / w) for w in weights]
        self._file_of = {name: f for f in self.files for name in f.entries}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: f.shape(name) for name, f in self._file_of.items()
                  if not name.endswith("rotary_emb.inv_freq")}  # old checkpoints kept buffers
        # a tied lm_head is the embedding: not in the file, in the model's state dict
        if getattr(self.config, "tie_word_embeddings", False) and "lm_head.weight" not in shapes \
                and EMBED in shapes:
            shapes["lm_head.weight"] = shapes[EMBED]
        return shapes

    def _stored(self, name: str) -> tuple[SafetensorsFile, str]:
        if name == "lm_head.weight" and name not in self._file_of:
            name = EMBED
        if name not in self._file_of:
            raise ModelError(f"{self.label}: no tensor {name!r} in its files")
        return self._file_of[name], name

    def read(self, names: Sequence[str]) -> dict[str, Tensor]:
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            f, stored = self._stored(name)
            by_file.setdefault(f.path, []).append((name, stored))
        for path, pairs in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name, stored in pairs:
                    out[name] = handle.get_tensor(stored)
        return out

    def sample(self, name: str, indices: Tensor) -> np.ndarray:
        f, stored = self._stored(name)
        return f.sample(stored, indices)


class BundleCheckpoint(SafetensorsCheckpoint):
    """A device bundle (``fc-edge export``): the head's weights (:data:`BUNDLE_WEIGHTS`), the
    model's config and tokenizer, and ``manifest.json`` with the fingerprint and channel weights
    of the full model, which the device cannot compute without it. The manifest also carries the
    head's :class:`~fc_edge.models.decoder.DecoderConfig`, so running a bundle never imports
    transformers' config classes (about 55 MB of a device's memory); ``config`` is read only when
    asked for."""

    def __init__(self, root: Path, label: str) -> None:
        self.manifest = load_manifest(root)
        weights = self.manifest.get("weights", {}).get("file", BUNDLE_WEIGHTS)
        if not (root / weights).is_file():
            raise ModelError(f"{root / weights} is missing: export the bundle again")
        self._config: Any = None
        super().__init__(root, label, [weights], read_config="decoder_config" not in self.manifest)

    @property  # type: ignore[override]
    def config(self) -> Any:
        if self._config is None:
            self._config = _load_config(self.root, self.label)
        return self._config

    @config.setter
    def config(self, value: Any) -> None:
        self._config = value

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: f.shape(name) for name, f in self._file_of.items()}

    def decoder_config(self, layer: int) -> DecoderConfig:
        self.check_split_layer(layer)
        fields = self.manifest.get("decoder_config")
        if fields is None:  # a bundle of an older export
            return super().decoder_config(layer)
        return DecoderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in fields.items()})

    def hf_config(self) -> Any:
        return self._config

    @property
    def split_layer(self) -> int:
        return int(self.manifest["split_layer"])

    def check_split_layer(self, layer: int) -> None:
        if layer != self.split_layer:
            raise ConfigError(f"{self.label} was exported at split layer {self.split_layer}, "
                              f"not {layer}")

    def device_head(self, layer: int | None = None, device: Any = None,
                    dtype: Any = None) -> DeviceHead:
        return super().device_head(self.split_layer if layer is None else layer, device, dtype)

    def fingerprint(self) -> str:
        return str(self.manifest["model_fingerprint"])

    def channel_weights(self, layer: int) -> Tensor:
        self.check_split_layer(layer)
        return torch.tensor(self.manifest["channel_weights"], dtype=torch.float32)

    def eos_token_ids(self) -> list[int]:
        return _ids(self.manifest.get("eos_token_ids"))

    def tokenizer(self) -> Any:
        """The bundle's ``tokenizer.json`` run by the ``tokenizers`` library itself, which is
        what transformers' fast tokenizer wraps (the file was written by it at export, post-
        processor included), without transformers' model-specific machinery (about 70 MB of a
        device's memory); :class:`BundleTokenizer`. Transformers' own tokenizer where the
        bundle's configuration asks for more than the file (decode clean-up, another class)."""
        config_path = self.root / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (self.root / "tokenizer.json").is_file() \
                and config.get("tokenizer_class") in BundleTokenizer.CLASSES \
                and not config.get("clean_up_tokenization_spaces"):
            return BundleTokenizer(self.root, config)
        return super().tokenizer()


class BundleTokenizer:
    """A tokenizer.json through ``tokenizers.Tokenizer`` with the few methods the device
    client calls, answering as transformers' ``TokenizersBackend`` does for the same file:
    ``tokenizer(text)["input_ids"]`` (the file's post-processor adds the special tokens),
    ``decode(ids, skip_special_tokens)``, ``eos_token_id``; ``apply_chat_template`` loads
    transformers' tokenizer on first use (only a chat prompt needs it)."""

    CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self.backend.token_to_id(eos) if eos else None
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() \
            else config.get("chat_template")
        self._full: Any = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        if self._full is None:
            from transformers import AutoTokenizer

            self._full = AutoTokenizer.from_pretrained(self.folder)
        return self._full.apply_chat_template(*args, **kwargs)


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """A bundle's ``manifest.json``; :class:`ConfigError` (one line) when absent or broken."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{str(folder)!r} is not an exported bundle (no manifest.json): make one with "
            "`fc-edge export`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): export the bundle again") from None


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file: config and tokenizer from its metadata (transformers), tensors read
    one by one at their offsets and dequantized with the ``gguf`` package, then processed as
    transformers' GGUF loader does (its name map and tensor processors: Llama's q/k row order,
    Gemma's norm offsets), so the values equal ``load_model``'s."""

    def __init__(self, path: Path, label: str) -> None:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"reading {str(path)!r} needs the gguf package: pip install gguf")
        from gguf import GGUFReader
        from transformers import AutoConfig

        self.root, self.path, self.label = path.parent, path, label
        try:
            self.reader = GGUFReader(path)  # memory-maps; only the header's pages are read
            self.config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the GGUF file {str(path)!r}: {e}") from None
        check_family(self.config)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._map: dict[str, str] | None = None  # hf name -> gguf name
        self._hf_shapes: dict[str, tuple[int, ...]] | None = None

    def _name_map(self) -> dict[str, str]:
        if self._map is None:
            from transformers import AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config)
            self._hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            gguf_to_hf = get_gguf_hf_weights_map(model, self._processor())
            self._map = {hf: g for g, hf in gguf_to_hf.items() if g in self._tensors}
        return self._map

    def _processor(self) -> Any:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        field_ = self.reader.fields["general.architecture"]
        arch = bytes(field_.parts[field_.data[0]]).decode()
        return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config.to_dict())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        self._name_map()
        assert self._hf_shapes is not None
        return dict(self._hf_shapes)

    def _gguf_name(self, name: str) -> str:
        names = self._name_map()
        if name == "lm_head.weight" and name not in names:
            name = EMBED  # tied
        if name not in names:
            raise ModelError(f"{self.label}: no GGUF tensor for {name!r}")
        return names[name]

    def _dequantized(self, name: str) -> np.ndarray:
        from gguf import dequantize

        gguf_name = self._gguf_name(name)
        t = self._tensors[gguf_name]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = pread_exact(fd, int(t.n_bytes), int(t.data_offset))
        finally:
            os.close(fd)
        raw = buf.view(t.data.dtype).reshape(t.data.shape)
        weights = dequantize(raw, t.tensor_type)
        result = self._processor().process(weights=weights, name=gguf_name,
                                           tensor_key_mapping={}, parsed_parameters={})
        return np.ascontiguousarray(result.weights, dtype=np.float32)

    def read(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {name: torch.from_numpy(self._dequantized(name)) for name in names}

    def sample(self, name: str, indices: Tensor) -> np.ndarray:
        return self._dequantized(name).reshape(-1)[indices.numpy()]

    def fingerprint(self) -> str:
        """As :meth:`Checkpoint.fingerprint`, but a GGUF file's elements have no offsets before
        dequantization: every tensor is dequantized once, sampled and dropped (the peak is one
        tensor). The result is cached under ``$FC_EDGE_CACHE/fingerprints/``, keyed by the
        file's path, size and modification time, so later runs read the head alone."""
        import hashlib

        st = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        cached = cache_root() / "fingerprints" / f"{key.hexdigest()[:32]}.txt"
        if cached.is_file():
            text = cached.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{16}", text):
                return text
        value = super().fingerprint()
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(value + "\n")
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache: computed again next time
        return value

    def tokenizer(self) -> Any:
        """The tokenizer in the file's metadata, or None when it has none."""
        if "tokenizer.ggml.tokens" not in self.reader.fields:  # as gguf_has_tokenizer
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)


class ModelCheckpoint(Checkpoint):
    """A model already in memory (a synthetic one, or one the caller loaded): the same
    interface over its state dict."""

    def __init__(self, model: Any, tokenizer: Any, label: str) -> None:
        check_family(model.config)
        self.model, self._tokenizer, self.label = model, tokenizer, label
        self.config = model.config
        self.root = Path(".")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model.state_dict().items()}

    def read(self, names: Sequence[str]) -> dict[str, Tensor]:
        state = self.model.state_dict()
        return {n: state[n].detach() for n in names}

    def fingerprint(self) -> str:
        from fc_edge.models.pretrained import model_fingerprint

        return model_fingerprint(self.model)

    def load_head(self, layer: int, device: Any = None, dtype: Any = None) -> Any:
        from fc_edge.models.split import split

        head, _ = split(self.model, layer)
        if device is not None or dtype is not None:
            from fc_edge.devices import resolve_device, resolve_dtype

            place = resolve_device(device)
            head = head.to_device(place, resolve_dtype(dtype, place))
        return head

    def tokenizer(self) -> Any:
        return self._tokenizer

    def eos_token_ids(self) -> list[int]:
        gen = getattr(self.model, "generation_config", None)
        eos = gen.eos_token_id if gen is not None else None
        if eos is None and self._tokenizer is not None:
            eos = self._tokenizer.eos_token_id
        return _ids(eos)
