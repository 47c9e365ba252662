"""Device, precision and memory: pick where to run, autocast, recognise out-of-memory errors."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .errors import EsegetaError
from .options import DEVICES, PRECISIONS

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU. Apple MPS only when asked (3D ops are incomplete there)."""
    name = str(name or "auto").lower()
    if name.startswith("cuda:"):
        base = "cuda"
    else:
        base = name
    if base not in DEVICES:
        raise EsegetaError(f"device must be one of {', '.join(DEVICES)}; got {name!r}.")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise EsegetaError(
            f"CUDA was requested but this torch ({torch.__version__}) sees no CUDA device; "
            "use device 'auto' or 'cpu', or install a CUDA build of torch."
        )
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EsegetaError("Apple MPS was requested but is not available here; use device 'cpu'.")
    return torch.device(name)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    if precision not in PRECISIONS:
        raise EsegetaError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    return _AUTOCAST[precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast context for `dtype`, or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError (torch.OutOfMemoryError) or another backend's 'out of memory'."""
    oom_types = tuple({getattr(torch, "OutOfMemoryError", MemoryError),
                       getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError})
    if isinstance(error, oom_types):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory this process may still take on `device`: the card's free memory, or less under a cap
    set with `torch.cuda.set_per_process_memory_fraction` (which `mem_get_info` does not see)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None:
            fraction = float(getter(device))
            if fraction < 1.0:
                free = min(free, int(fraction * total) - torch.cuda.memory_reserved(device))
        return max(0, int(free))
    return None
