"""Device, precision and memory: pick where to run, autocast, recognise out-of-memory errors."""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Set, Tuple

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
    """The autocast dtype of a concrete precision (fp32 -> None); 'auto' must be resolved first
    (`resolve_precision`)."""
    if precision not in PRECISIONS:
        raise EsegetaError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision == "auto":
        raise ValueError("precision 'auto' must be resolved for a device first (resolve_precision)")
    return _AUTOCAST[precision]


# CPU feature flags (Linux /proc/cpuinfo) of native bf16 arithmetic: Intel AMX tiles, AVX-512 BF16
# dot products (Cooper Lake, Sapphire Rapids, AMD Zen 4+), Arm's BF16 extension (Neoverse V1+,
# Graviton 3). Without them torch's CPU bf16 is emulated and slower than fp32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
NATIVE_BF16_ENV = "ESEGETA_NATIVE_BF16"


def cpu_flags(path: str = "/proc/cpuinfo") -> Set[str]:
    """The CPU's feature flags ('flags' on x86, 'Features' on Arm); empty where not readable."""
    try:
        with open(path) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> Tuple[bool, str]:
    """Whether `device` computes bf16 natively, and the evidence (one phrase).

    CUDA: `torch.cuda.is_bf16_supported(including_emulation=False)` (Ampere and newer). CPU: the
    /proc/cpuinfo flags `amx_bf16` / `avx512_bf16` (x86) or `bf16` (Arm), with torch's CPU kernel
    level (`torch.backends.cpu.get_cpu_capability()`) named in the evidence. Other devices: no.
    The environment variable ESEGETA_NATIVE_BF16=0/1 overrides the answer (the test suite pins it,
    so results do not depend on the CI machine's CPU)."""
    device = torch.device(device)
    override = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1", f"{NATIVE_BF16_ENV}={override}"
    if device.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'computes' if ok else 'does not compute'} bf16 natively"
    if device.type == "cpu":
        flags = cpu_flags()
        found = [f for f in CPU_BF16_FLAGS if f in flags]
        capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "?")()
        if found:
            return True, f"CPU flags {', '.join(found)} (torch CPU kernels: {capability})"
        return False, f"no native bf16 flag (amx_bf16, avx512_bf16) on this CPU (torch CPU kernels: {capability})"
    return False, f"{device.type}: bf16 is not chosen automatically"


def resolve_precision(precision: str, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> Tuple[str, str]:
    """(concrete precision, why) for a requested one. 'auto' -> 'bf16' where the device computes
    bf16 natively and the network is float32, else 'fp32'; a concrete request is kept."""
    if precision not in PRECISIONS:
        raise EsegetaError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    if precision != "auto":
        return precision, "requested"
    if dtype == torch.float64:
        return "fp32", "auto: a float64 network keeps full precision"
    native, why = native_bf16(device)
    return ("bf16", f"auto: {why}") if native else ("fp32", f"auto: {why}")


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
