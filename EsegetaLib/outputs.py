"""A result directory that appears whole or not at all.

Everything is written into a hidden temporary sibling of the requested directory (same file
system, so the final move is a rename) and moved into place only when the run succeeded.  A run
that fails, is cancelled or is interrupted (Ctrl-C) removes its temporary folder and leaves the
requested directory exactly as it was.  `--overwrite` replaces a previous Esegeta result; it never
empties a folder that holds anything else (a mistyped `--out .` must not delete the user's files).
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, List, Optional

from .errors import EsegetaError

# A directory holding this file is an Esegeta result and may be replaced with --overwrite.
RESULT_MARKER = "run.json"
_PREFIX = ".esegeta-"


def check_output_directory(final: Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Refuse, with a one-line error, an output directory that the run must not replace.

    Called before any heavy work so a mistake costs nothing.  `inputs` are files the run reads:
    replacing a directory that contains one of them would destroy the run's own input.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise EsegetaError(f"Output '{final}' exists and is not a directory; choose another --out.")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise EsegetaError(
                f"Output directory '{final}' is not empty; choose another --out or add --overwrite to replace it."
            )
        if not (final / RESULT_MARKER).is_file():
            raise EsegetaError(
                f"Output directory '{final}' is not empty and is not an Esegeta result (no {RESULT_MARKER}); "
                "--overwrite only replaces earlier results, so choose another --out."
            )
        resolved = final.resolve()
        for path in inputs:
            path = Path(path).resolve()
            if resolved == path or resolved in path.parents:
                raise EsegetaError(
                    f"Input '{path}' lies inside the output directory '{final}', which --overwrite would delete; "
                    "choose another --out."
                )
    parent = _existing_ancestor(final.absolute())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EsegetaError(f"Cannot write into '{parent}' (permission denied); choose another --out.")


class ResultDirectory:
    """Context manager: write into `.path`, then `commit()` moves it to the final directory.

    Leaving the `with` block without a commit (an exception, Ctrl-C) deletes everything written,
    including parent folders this object created.
    """

    def __init__(self, final: Path, overwrite: bool = False, inputs: Iterable[Path] = ()):
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.path: Optional[Path] = None
        self.committed = False
        self._created_parents: List[Path] = []

    def __enter__(self) -> "ResultDirectory":
        check_output_directory(self.final, self.overwrite, self.inputs)
        self._created_parents = _missing_ancestors(self.final.parent)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{self.final.name}.", suffix=".partial",
                                          dir=self.final.parent))
        return self

    def commit(self) -> Path:
        """Move the finished result into place (replacing an empty or earlier result directory)."""
        if self.path is None or self.committed:
            raise RuntimeError("commit() outside an open ResultDirectory")
        # Check again: the directory may have changed while the run was working.
        check_output_directory(self.final, self.overwrite, self.inputs)
        with _signals_deferred():
            old = None
            if self.final.exists():
                old = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{self.final.name}.", suffix=".old",
                                            dir=self.final.parent))
                os.rmdir(old)
                os.rename(self.final, old)
            try:
                os.rename(self.path, self.final)
            except BaseException:
                if old is not None:
                    os.rename(old, self.final)
                raise
            self.committed = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        os.chmod(self.final, 0o777 & ~_umask())  # mkdtemp makes 0700; give it a normal folder's mode
        return self.final

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.committed:
            self.discard()
        return False

    def discard(self) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        for folder in self._created_parents:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def leftovers(final: Path) -> List[Path]:
    """Temporary siblings of `final` left by a run (none after any run that ended, even by Ctrl-C)."""
    final = Path(final).absolute()
    if not final.parent.is_dir():
        return []
    return sorted(final.parent.glob(f"{_PREFIX}{final.name}.*"))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _missing_ancestors(path: Path) -> List[Path]:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing  # deepest first


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C/SIGTERM while the old result is swapped for the new one (two renames), so an
    interrupt cannot fall between them; a pending signal is delivered right after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
