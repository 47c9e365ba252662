"""`run.json`: what was run, on what, with what, where and how long - enough to reproduce a result
and to prove which input files it came from (SHA-256 of every file read, data files of detached
headers included)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import sys
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

SCHEMA = "esegeta-run/1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def companion_files(path: Path) -> List[Path]:
    """Data files a detached header points to (`.nhdr` "data file:", `.mhd` "ElementDataFile"),
    so the checksum covers the voxels and not only the header."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".nhdr", ".mhd"):
        return []
    pattern = r"^\s*data ?file\s*:\s*(.+?)\s*$" if suffix == ".nhdr" else r"^\s*ElementDataFile\s*=\s*(.+?)\s*$"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        match = re.match(pattern, line, flags=re.IGNORECASE)
        if match:
            name = match.group(1)
            if name.upper() in ("LOCAL", "LIST") or name.startswith("LIST"):
                return []
            candidate = (path.parent / name) if not os.path.isabs(name) else Path(name)
            return [candidate] if candidate.is_file() else []
    return []


def file_record(path: Path, role: str) -> Dict[str, Any]:
    """One input file: role, absolute path, size and SHA-256 (plus its detached data files)."""
    path = Path(path)
    record = {"role": role, "path": str(path.resolve()), "bytes": path.stat().st_size,
              "sha256": sha256_file(path)}
    extra = companion_files(path)
    if extra:
        record["data_files"] = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                for p in extra]
    return record


def output_records(folder: Path, skip: Iterable[str] = ("run.json",)) -> List[Dict[str, Any]]:
    """Every file written into a result folder, relative path + size + SHA-256."""
    folder = Path(folder)
    skip = set(skip)
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative in skip:
            continue
        records.append({"path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return records


def versions() -> Dict[str, Optional[str]]:
    """Versions of what shapes the numbers: Esegeta, Python, torch (and its CUDA), Captum, ..."""
    from . import __version__

    found: Dict[str, Optional[str]] = {"esegeta": __version__, "python": platform.python_version()}
    for package in ("torch", "captum", "numpy", "monai", "nibabel", "pynrrd", "SimpleITK"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch_cuda"] = torch.version.cuda
    return found


def device_record(device: str) -> Dict[str, Any]:
    """The hardware the run used: GPU name and memory, or the CPU and its thread count."""
    record: Dict[str, Any] = {"device": str(device), "platform": platform.platform(),
                              "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")
    if torch is not None:
        record["torch_threads"] = torch.get_num_threads()
        if str(device).startswith("cuda") and torch.cuda.is_available():
            index = torch.device(device).index or 0
            props = torch.cuda.get_device_properties(index)
            record["gpu"] = props.name
            record["gpu_memory_bytes"] = int(props.total_memory)
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, tuples, dataclasses; NaN/inf become null."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        if getattr(value, "size", 1) > 64 and hasattr(value, "shape"):
            return f"<array shape={tuple(value.shape)}>"  # masks etc. are inputs, not parameters
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def run_record(command: str, argv: Optional[List[str]], inputs: List[Dict[str, Any]],
               parameters: Dict[str, Any], engine: Dict[str, Any], device: str,
               timings: Dict[str, float], started: str, **extra: Any) -> Dict[str, Any]:
    """The run.json document (outputs are added by the writer once every file exists)."""
    record = {
        "schema": SCHEMA,
        "command": command,
        "argv": list(argv) if argv is not None else None,
        "started": started,
        "finished": utc_now(),
        "inputs": inputs,
        "parameters": parameters,
        "engine": engine,
        "versions": versions(),
        "device": device_record(device),
        "timings": timings,
    }
    record.update(extra)
    return record
