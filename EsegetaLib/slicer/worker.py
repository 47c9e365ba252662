"""Run one explanation job in its own process: ``python -m EsegetaLib.slicer.worker JOB.json``.

Why a separate process (the Slicer module's way of running the engine, usable by any front end):
the application stays responsive, Cancel is real (the process is terminated, whatever it is doing),
and all GPU memory returns to the driver when the process exits.  Inputs and outputs are files:
the input volume (and an optional region mask) written with `EsegetaLib.io`, a JSON job, and a
result folder that appears whole or not at all (`outputs.ResultDirectory`), so a cancelled or
failed run leaves nothing at the result location.

Protocol: the worker prints one event per line on stdout, ``@esegeta {json}``; anything else on
stdout (a library's print) is passed on as a log line.  Events:

  {"event": "started", "pid": 1234}
  {"event": "progress", "fraction": 0.42, "message": "Saliency (1/2): window 3/8"}
  {"event": "warning", "message": "..."}   {"event": "log", "message": "..."}
  {"event": "done", "output": "/path/to/result", "seconds": 12.3}
  {"event": "error", "kind": "user" | "memory" | "cancelled" | "internal",
   "message": "one line", "details": "traceback"}

Exit status: 0 done, 2 user error, 3 out of memory, 4 cancelled, 1 internal error.

The result folder is what `esegeta explain` writes (`runner.execute`): `run.json`, `attributions/`,
`segmentation.*`, `metrics.json`; `read_result` loads it back.

`WorkerProcess` is the caller's side (no Qt): start, `poll()` without blocking (a timer calls it),
`cancel()` (terminates the whole process tree), `read_result()`.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

JOB_FORMAT = "esegeta-job/1"
EVENT_PREFIX = "@esegeta "
EXIT_CODES = {"done": 0, "internal": 1, "user": 2, "memory": 3, "cancelled": 4}
RESULT_FILE = "run.json"  # written last by runner.execute

# ----------------------------------------------------------------------------------------------- job

def request_field_names() -> List[str]:
    """The fields of `runner.ExplainRequest` a job may set (the same request the CLI builds; read
    from the dataclass, so a field added there is accepted here; `runner` imports no torch)."""
    from dataclasses import fields

    from ..runner import ExplainRequest

    return [f.name for f in fields(ExplainRequest)]


def make_job(request: Dict[str, Any], output: str) -> Dict[str, Any]:
    """A job description (JSON-ready): `request` holds `runner.ExplainRequest` fields (volume and
    model are file paths; region is predicted | whole | roi:MASKFILE | point:I,J,K); `output` is
    the result folder to create.  `scene` defaults to False: the review scene and previews are the
    CLI's extras, and inside Slicer the module builds the nodes in the application's own scene
    (the worker, run by PythonSlicer, must not touch MRML).  `compress` defaults to False: the
    maps are exchange files read back at once, and gzip would cost far more than it saves."""
    unknown = sorted(set(request) - set(request_field_names()))
    if unknown:
        raise ValueError(f"unknown request field(s) {', '.join(unknown)}")
    request = {"scene": False, "compress": False, **request}
    for key in ("volume", "model"):
        if request.get(key) is not None:
            request[key] = str(request[key])
    return {"format": JOB_FORMAT, "request": request, "output": str(output)}


def write_job(path: str, job: Dict[str, Any]) -> str:
    from ..provenance import jsonable

    with open(path, "w", encoding="utf-8") as handle:
        json.dump(jsonable(job), handle, indent=1)
    return str(path)


def read_job(path: str) -> Dict[str, Any]:
    from ..errors import EsegetaError

    try:
        with open(path, encoding="utf-8") as handle:
            job = json.load(handle)
    except (OSError, ValueError) as exc:
        raise EsegetaError(f"cannot read the job file {path}: {exc}") from exc
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise EsegetaError(f"{path} is not an Esegeta job ({JOB_FORMAT}); write it with EsegetaLib.slicer.worker.make_job.")
    if not job.get("output") or not (job.get("request") or {}).get("volume"):
        raise EsegetaError(f"the job file {path} names no volume or no output folder.")
    return job


# -------------------------------------------------------------------------------------- worker side


class _Terminated(BaseException):
    """Raised in the worker by SIGTERM, so `finally` blocks remove partial results."""


def _emit(event: str, **fields: Any) -> None:
    from ..provenance import jsonable

    line = json.dumps({"event": event, **jsonable(fields)})
    sys.__stdout__.write(EVENT_PREFIX + line + "\n")
    sys.__stdout__.flush()


class _ProgressThrottle:
    """Forward engine progress, at most every `interval` seconds unless the message changes: the
    caller polls a few times a second and a flood of lines would only cost time."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.last_time = 0.0
        self.last_message = None

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if message == self.last_message and now - self.last_time < self.interval and fraction < 1.0:
            return
        self.last_time, self.last_message = now, message
        _emit("progress", fraction=float(fraction), message=str(message))


def run_job(job: Dict[str, Any], progress: Callable[[float, str], None], cancel: threading.Event) -> Path:
    """Do the work of one job with the CLI's own pipeline (`runner.prepare` checks and loads,
    `runner.execute` runs the engine and metrics and commits the result folder)."""
    from .. import runner

    request = runner.ExplainRequest(**job["request"])
    prepared = runner.prepare(request)
    for warning in prepared.warnings:
        _emit("warning", message=warning)
    return runner.execute(prepared, job["output"], overwrite=False, progress=progress, cancel=cancel,
                          note=lambda text: _emit("log", message=text),
                          warn=lambda text: _emit("warning", message=text),
                          command="slicer-worker", argv=[job.get("path", "")])


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the worker process; prints events, returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        sys.stderr.write("usage: python -m EsegetaLib.slicer.worker JOB.json\n")
        return EXIT_CODES["user"]
    cancel = threading.Event()

    def on_term(signum, frame):  # a terminate from the caller: clean up, then leave
        cancel.set()
        raise _Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    watch_parent(os.environ.get(PARENT_ENV), cancel)
    _emit("started", pid=os.getpid())
    started = time.monotonic()
    device = None
    try:
        job = read_job(argv[0])
        job["path"] = argv[0]
        device = (job.get("request") or {}).get("device")
        output = run_job(job, _ProgressThrottle(), cancel)
        _emit("done", output=str(output), seconds=time.monotonic() - started)
        return EXIT_CODES["done"]
    except (_Terminated, KeyboardInterrupt):
        _emit("error", kind="cancelled", message="Cancelled.", details="")
        return EXIT_CODES["cancelled"]
    except BaseException as exc:  # report everything in one event; the caller shows it
        kind, message = classify_error(exc, device)
        _emit("error", kind=kind, message=message, details=traceback.format_exc())
        return EXIT_CODES[kind]
    finally:
        _release_gpu()


# The caller's process id, given to the worker in this environment variable; the worker watches it.
PARENT_ENV = "ESEGETA_PARENT_PID"
PARENT_CHECK_SECONDS = 1.0
ORPHAN_GRACE_SECONDS = 3.0


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (POSIX: /proc or signal 0; Windows:
    OpenProcess + GetExitCodeProcess through ctypes, no psutil needed)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows only
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return bool(ok) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(parent: Optional[str], cancel: threading.Event,
                 interval: float = PARENT_CHECK_SECONDS, grace: float = ORPHAN_GRACE_SECONDS) -> Optional[threading.Thread]:
    """Stop this worker when the process that started it (Slicer) has gone: a crash or kill of
    Slicer must not leave a computation running.  Checks every `interval` s; on orphaning sets
    `cancel` and (POSIX) sends itself SIGTERM so the main thread unwinds and removes its partial
    result, then leaves outright after `grace` s whatever the main thread is doing.  The run
    folder the parent made is swept by the next start (`sweep_stale_runs`)."""
    if not parent or not parent.strip().isdigit():
        return None
    pid = int(parent)

    def watch() -> None:
        while not cancel.is_set():
            time.sleep(interval)
            if process_alive(pid):
                continue
            cancel.set()
            if os.name != "nt":
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                except OSError:
                    pass
            time.sleep(grace)
            os._exit(EXIT_CODES["cancelled"])

    thread = threading.Thread(target=watch, name="esegeta-parent-watch", daemon=True)
    thread.start()
    return thread


def classify_error(exc: BaseException, device: Optional[str] = None):
    """(kind, one-line message) for an exception raised while running a job."""
    from ..errors import EsegetaCancelled, EsegetaError

    if isinstance(exc, EsegetaCancelled):
        return "cancelled", "Cancelled."
    if _is_out_of_memory(exc):
        return "memory", out_of_memory_message(device)
    if isinstance(exc, EsegetaError):
        return "user", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = str(exc).strip().splitlines()
    return "internal", f"{type(exc).__name__}: {text[0] if text else 'internal error'}"


def out_of_memory_message(device: Optional[str] = None) -> str:
    """What to do after running out of memory: on a GPU, the CPU (more memory, slower), smaller
    windows or half precision; on the CPU, smaller windows or cheaper methods."""
    if str(device or "auto").lower() in ("cpu", "mps"):
        return ("Out of memory: choose a smaller patch size, cheaper methods or a smaller region, "
                "then Apply again.")
    return ("Out of memory on the GPU: choose device CPU, a smaller patch size or precision bf16, "
            "then Apply again.")


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out-of-memory (EsegetaLib.device), Python's MemoryError, or torch's CPU allocator
    failing ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):
        return True
    if "torch" in sys.modules:
        from ..device import is_out_of_memory

        return is_out_of_memory(exc)
    return False


def _release_gpu() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- caller side


def read_result(folder: str) -> Dict[str, Any]:
    """A committed result folder, read back: {"run": run.json, "segmentation": uint8 (I,J,K),
    "maps": {method: float32 (I,J,K)}, "signed": {method: bool}, "metrics": [rows], "folder": path}.
    Arrays come through `EsegetaLib.io`, on the input's grid."""
    import numpy as np

    from ..errors import EsegetaError
    from ..io import read_image

    from .result_import import read_run  # run.json and metrics.json, read one way

    folder = Path(folder)
    header = read_run(folder)
    run = header["run"]
    grid = (run.get("input_geometry") or {}).get("ijk_to_ras")

    def on_input_grid(file: str):
        """The file's voxels, refused if they are not on the input's grid (never placed elsewhere)."""
        image = read_image(folder / file)
        if grid is not None and not np.allclose(image.ijk_to_ras, np.asarray(grid, dtype=float), atol=1e-4, rtol=0):
            raise EsegetaError(f"{folder / file} is not on the input volume's grid; the result cannot be imported.")
        return image.array[0]

    maps, signed = {}, {}
    for name, entry in (run.get("results") or {}).items():
        if not entry.get("file"):  # a model-level visualisation: no map on the input's grid (features/)
            continue
        maps[name] = on_input_grid(entry["file"]).astype(np.float32)
        meta = entry.get("metadata") or {}
        signed[name] = bool(meta["signed"]) if "signed" in meta else bool(np.any(maps[name] < 0))
    segmentation = None
    if run.get("segmentation"):
        segmentation = on_input_grid(run["segmentation"]).astype(np.uint8)
    return {"run": run, "segmentation": segmentation, "maps": maps, "signed": signed,
            "metrics": header["metrics"], "folder": str(folder)}


def default_python(in_slicer: Optional[bool] = None) -> str:
    """The interpreter that runs the worker: Slicer's `PythonSlicer` launcher inside Slicer (it sets
    up Slicer's library paths), else this interpreter.  Inside Slicer `sys.executable` is the
    application itself (SlicerApp-real), so a missing launcher is an error, not a fallback."""
    import shutil

    if in_slicer is None:
        in_slicer = "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app")
    if in_slicer:
        found = shutil.which("PythonSlicer")
        if not found:
            from ..errors import EsegetaError

            raise EsegetaError("Slicer's PythonSlicer launcher was not found on the PATH; reinstall Slicer "
                               "(Esegeta runs its computation with it).")
        return found
    return sys.executable


def library_root() -> str:
    """The folder that holds the `EsegetaLib` package (the worker's working directory, so that
    `-m EsegetaLib.slicer.worker` imports this very copy, installed or from source)."""
    return str(Path(__file__).resolve().parents[2])


# Windows process-creation flags (subprocess has them only on Windows; values from WinBase.h).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def hidden_window_options(os_name: Optional[str] = None) -> Dict[str, Any]:
    """`subprocess.Popen` keywords that start a console program without a window.

    PythonSlicer.exe is a console launcher: started from Slicer's GUI process it would open a black
    console for the whole run (and closing it kills the run).  As `slicer.util.launchConsoleProcess`
    does, Windows gets a STARTUPINFO with SW_HIDE, plus CREATE_NO_WINDOW (and a new process group,
    so the launcher's children can be stopped together).  POSIX gets its own session, so a cancel
    reaches every child through the process group."""
    os_name = os.name if os_name is None else os_name
    if os_name != "nt":
        return {"start_new_session": True}
    options: Dict[str, Any] = {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    startupinfo_class = getattr(subprocess, "STARTUPINFO", None)
    if startupinfo_class is not None:  # only on Windows itself
        info = startupinfo_class()
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        options["startupinfo"] = info
    return options


class WorkerProcess:
    """Start the worker, read its events without blocking, cancel it for real.

    Events are read by a thread into a queue; `poll()` (called by a timer on the caller's main
    thread) returns those that arrived.  stderr goes to a log file beside the job (a pipe nobody
    reads could fill up and stall the worker).
    """

    def __init__(self, job_path: str, python: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        self.job_path = str(job_path)
        self.python = python or default_python()
        self.env = env
        self.log_path = str(Path(self.job_path).with_suffix(".log"))
        self.process: Optional[subprocess.Popen] = None
        self.cancelled = False
        self.final_event: Optional[Dict[str, Any]] = None
        self.last_progress: Optional[Dict[str, Any]] = None
        self.log_lines: List[str] = []
        self._events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._log_handle = None
        self._group: Optional[int] = None
        self._kill_after: Optional[float] = None

    # -- lifecycle
    def start(self) -> "WorkerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env[PARENT_ENV] = str(os.getpid())  # the worker stops by itself if this process dies
        # `-m` puts the working directory first on sys.path: the worker imports the EsegetaLib that
        # sits next to this file, whatever else is installed.
        command = [self.python, "-m", "EsegetaLib.slicer.worker", self.job_path]
        kwargs = hidden_window_options()
        self._log_handle = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(command, cwd=library_root(), env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=self._log_handle, text=True,
                                        encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        if os.name != "nt":
            self._group = self.process.pid  # start_new_session: its own group, led by it
        self._reader = threading.Thread(target=self._read, name="esegeta-worker-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        stream = self.process.stdout
        for line in iter(stream.readline, ""):
            line = line.rstrip("\r\n")
            if line.startswith(EVENT_PREFIX):
                try:
                    self._events.put(json.loads(line[len(EVENT_PREFIX):]))
                    continue
                except ValueError:
                    pass
            self._events.put({"event": "log", "message": line})
        stream.close()
        code = self.process.wait()
        self._events.put({"event": "exit", "returncode": code})

    @property
    def running(self) -> bool:
        return self.process is not None and self.final_event is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def poll(self) -> List[Dict[str, Any]]:
        """Events that arrived since the last call (never blocks).  The last event of a run is
        `done`, `error` or, for a process that died without a word, an `error` made from its exit."""
        self._escalate()
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(self._settle(event))
        return [e for e in events if e is not None]

    def _settle(self, event: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        kind = event.get("event")
        if kind == "progress":
            self.last_progress = event
        elif kind == "log":
            self.log_lines.append(event.get("message", ""))
        elif kind in ("done", "error"):
            if self.cancelled:
                event = {"event": "error", "kind": "cancelled", "message": "Cancelled.", "details": ""}
            if self.final_event is None:
                self.final_event = event
            self._close_log()
        elif kind == "exit":
            if self.final_event is not None:
                return None
            if self.cancelled:
                event = {"event": "error", "kind": "cancelled", "message": "Cancelled.", "details": ""}
            else:
                event = {"event": "error", "kind": "internal",
                         "message": f"The worker process stopped unexpectedly (exit status {event['returncode']}).",
                         "details": self.log_tail()}
            self.final_event = event
            self._close_log()
        return event

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> List[Dict[str, Any]]:
        """Poll until the run ends (for scripts and tests; a GUI uses a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: List[Dict[str, Any]] = []
        while self.final_event is None:
            events.extend(self.poll())
            if self.final_event is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not finish within {timeout} s")
            time.sleep(interval)
        # The last event comes just before the process exits: wait for the exit too.
        remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
        self.process.wait(timeout=remaining)
        return events

    def cancel(self, grace: float = 5.0, wait: bool = False) -> None:
        """Terminate the worker and everything it started.  Returns at once (a GUI must not
        freeze): the worker removes its partial result on SIGTERM, and `poll()` kills whatever is
        left after `grace` seconds and records the end.  `wait=True` blocks until all are gone."""
        if self.process is None or self.process.poll() is not None:
            self.cancelled = self.cancelled or self.final_event is None
            return
        if not self.cancelled:
            self.cancelled = True
            self._kill_after = time.monotonic() + grace
            _terminate_tree(self.process)
        if wait:
            while not self.finished:
                self.poll()
                time.sleep(0.02)

    @property
    def finished(self) -> bool:
        """The process (and, on POSIX, every process of its group) has exited."""
        if self.process is None:
            return True
        if self.process.poll() is None:
            return False
        return os.name == "nt" or self._group is None or not _group_alive(self._group)

    def _escalate(self) -> None:
        """After a cancel's grace period, kill what is left (called by `poll`)."""
        if self.cancelled and self._kill_after is not None and time.monotonic() > self._kill_after:
            if not self.finished:
                _kill_tree(self.process, self._group)
            self._kill_after = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the worker's stderr and stray stdout (the details of an error)."""
        text = ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            pass
        tail = text.splitlines()[-lines:] + self.log_lines[-lines:]
        return "\n".join(tail)

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None


def _terminate_tree(process: subprocess.Popen) -> None:
    """Ask `process` and its children to stop, without waiting.  PythonSlicer is a launcher that
    starts the real Python as a child, so stopping the launcher alone would leave the computation
    running: POSIX signals the whole process group (SIGTERM: the worker removes its partial
    result); Windows runs `taskkill /T /F` on the tree, itself without a console window."""
    if os.name == "nt":  # pragma: no cover - Windows only
        subprocess.Popen(["taskkill", "/PID", str(process.pid), "/T", "/F"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **hidden_window_options())
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(process: subprocess.Popen, group: Optional[int]) -> None:
    """SIGKILL for whatever is left of the worker's group (Windows: the launcher itself)."""
    if os.name == "nt" or group is None:  # pragma: no cover - Windows only
        process.kill()
        return
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(group: int) -> bool:
    """Whether a process of `group` still runs.  Zombies do not count: a grandchild whose parent
    (the launcher) died is reaped by init, which in some containers never happens."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(worker_main())
