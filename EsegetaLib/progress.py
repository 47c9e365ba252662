"""Progress for long runs on the command line.

The engine reports `progress(fraction, message)`; this turns it into a tqdm bar (message, percent,
elapsed and time left) on a terminal, a plain line every few seconds when the output is a file or
a pipe (logs stay readable), and nothing with `--quiet`.  Notes (what is happening) follow the same
rule; warnings are always shown.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

MODES = ("auto", "bar", "lines", "quiet")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _terminal_columns(stream) -> int:
    """Width of the terminal `stream` writes to; 0 for files, pipes and size-less pseudo-terminals
    (where a bar would draw nothing)."""
    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """Callable `(fraction in [0, 1], message)`; use as a context manager so the bar is closed."""

    def __init__(self, mode: str = "auto", stream: Optional[TextIO] = None, interval: float = 2.0):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _terminal_columns(self.stream) > 0 else "lines"
        self.mode = mode
        self.interval = interval
        self._bar = None
        self._started = time.monotonic()
        self._last_line = -float("inf")
        self._last_message = None
        self._fraction = 0.0

    # -- the callback -----------------------------------------------------------------------
    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self._fraction = fraction
        if self.mode == "quiet":
            return
        if self.mode == "bar":
            bar = self._ensure_bar()
            bar.set_description_str(message, refresh=False)
            bar.update(round(fraction * 1000) - bar.n)
            return
        now = time.monotonic()
        # Lines: at most one per interval, plus the first, the last, and whenever the method changes.
        head = message.split(":", 1)[0]
        changed = head != (self._last_message or "").split(":", 1)[0]
        if changed or fraction >= 1.0 or now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(fraction, message, now - self._started), file=self.stream, flush=True)
        self._last_message = message

    @staticmethod
    def line(fraction: float, message: str, elapsed: float) -> str:
        """`[ 42%] message (elapsed 1m05s, about 1m30s left)`; time left from the mean rate so far."""
        text = f"[{fraction * 100:3.0f}%] {message}".rstrip() + f" (elapsed {_format_seconds(elapsed)}"
        if 0.0 < fraction < 1.0 and elapsed > 0:
            text += f", about {_format_seconds(elapsed * (1 - fraction) / fraction)} left"
        return text + ")"

    # -- notes and warnings -----------------------------------------------------------------
    def note(self, text: str) -> None:
        """An informational line (silenced by --quiet), printed above the bar when there is one."""
        if self.mode != "quiet":
            self._write(text)

    def warn(self, text: str) -> None:
        """A warning: shown even with --quiet."""
        self._write(f"warning: {text}")

    def _write(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    # -- lifetime ---------------------------------------------------------------------------
    def _ensure_bar(self):
        if self._bar is None:
            from tqdm import tqdm

            # Permille steps: tqdm's rate then gives the time left for the whole run.
            self._bar = tqdm(total=1000, file=self.stream, leave=False, dynamic_ncols=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def scaled(self, start: float, stop: float) -> "ScaledProgress":
        """A callback mapping a sub-task's 0..1 onto [start, stop] of this run."""
        return ScaledProgress(self, start, stop)


class ScaledProgress:
    """Maps a stage's fractions onto part of the overall run (e.g. metrics after attributions)."""

    def __init__(self, parent, start: float, stop: float):
        self.parent, self.start, self.stop = parent, start, stop

    def __call__(self, fraction: float, message: str = "") -> None:
        self.parent(self.start + (self.stop - self.start) * min(max(float(fraction), 0.0), 1.0), message)
