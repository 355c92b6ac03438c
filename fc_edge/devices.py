"""Where a model part runs: ``--device cpu|cuda|cuda:N`` and ``--dtype float32|bfloat16|float16``.

Both are checked before any weight moves: a device that is not there, or a dtype it cannot
compute in, is a :class:`ConfigError` with one line that says what to use instead.
"""

from __future__ import annotations

import torch

from fc_edge.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` (the current GPU) or ``cuda:N`` -> a device that exists here."""
    if spec is None:
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(spec)!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {str(spec)!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(spec)!r} asked for, but this torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu")
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(f"device {str(spec)!r} does not exist: this machine has {count} "
                          f"CUDA GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` -> a dtype that ``device`` computes in (a small
    matrix product is tried there)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        dtype = DTYPES.get(str(name))
        if dtype is None:
            raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{device} cannot compute in bfloat16; use --dtype float16 or float32")
    try:
        a = torch.ones((4, 4), dtype=dtype, device=device)
        torch.nn.functional.silu(a @ a).sum().item()
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{device} cannot compute in {dtype_name(dtype)} ({first}); "
                          "use --dtype float32") from None
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """A human name for a benchmark table: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
