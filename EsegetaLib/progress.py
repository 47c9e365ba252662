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
# Without a work plan's estimate (Progress.estimate), the mean rate so far is shown only once it
# means something: this much of the work done and this many seconds elapsed.
MEAN_RATE_MIN_FRACTION = 0.05
MEAN_RATE_MIN_SECONDS = 10.0
_BROKEN = (BrokenPipeError, ConnectionResetError, ValueError, OSError)  # closed pipe or file


def silence(stream) -> None:
    """Point a broken stream's file descriptor at /dev/null: later writes (and the interpreter's
    flush at exit) then succeed silently instead of raising BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def safe_print(text: str, stream: Optional[TextIO] = None) -> bool:
    """print + flush that survives a reader that went away (`esegeta explain ... | head`): the
    run's result does not depend on anyone reading its messages. False when the stream is gone."""
    stream = sys.stdout if stream is None else stream
    try:
        print(text, file=stream, flush=True)
        return True
    except _BROKEN:
        silence(stream)
        return False


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _mean_rate_left(fraction: float, elapsed: float) -> Optional[float]:
    if MEAN_RATE_MIN_FRACTION <= fraction < 1.0 and elapsed >= MEAN_RATE_MIN_SECONDS:
        return elapsed * (1 - fraction) / fraction
    return None


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
        self._planned = False  # a work plan gives the time left (estimate); else the mean rate
        self._left: Optional[float] = None

    def estimate(self, seconds: Optional[float]) -> None:
        """Time left from the run's work plan (work.WorkPlan); None = not known yet (none shown)."""
        self._planned = True
        self._left = seconds

    # -- the callback -----------------------------------------------------------------------
    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self._fraction = fraction
        if self.mode == "quiet":
            return
        try:
            self._show(fraction, message)
        except _BROKEN:  # nobody reads the progress any more: the run goes on without it
            self._broken()

    def _show(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        left = self.left(fraction, now - self._started)
        if self.mode == "bar":
            bar = self._ensure_bar()
            bar.set_description_str(message, refresh=False)
            bar.set_postfix_str("" if left is None else f"about {_format_seconds(left)} left", refresh=False)
            bar.update(round(fraction * 1000) - bar.n)
            return
        # Lines: at most one per interval, plus the first, the last, and whenever the method changes.
        head = message.split(":", 1)[0]
        changed = head != (self._last_message or "").split(":", 1)[0]
        if changed or fraction >= 1.0 or now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(fraction, message, now - self._started, left), file=self.stream, flush=True)
        self._last_message = message

    def left(self, fraction: float, elapsed: float) -> Optional[float]:
        """Seconds left: the work plan's estimate when there is one, else the mean rate so far once
        it means something (MEAN_RATE_MIN_FRACTION of the work, MEAN_RATE_MIN_SECONDS elapsed)."""
        if fraction >= 1.0:
            return None
        if self._planned:
            return self._left
        return _mean_rate_left(fraction, elapsed)

    @staticmethod
    def line(fraction: float, message: str, elapsed: float, left: Optional[float] = -1.0) -> str:
        """`[ 42%] message (elapsed 1m05s, about 1m30s left)`; `left` None: no estimate; not given:
        from the mean rate so far (once it means something)."""
        text = f"[{fraction * 100:3.0f}%] {message}".rstrip() + f" (elapsed {_format_seconds(elapsed)}"
        if left is not None and left < 0:
            left = _mean_rate_left(fraction, elapsed)
        if left is not None and fraction < 1.0:
            text += f", about {_format_seconds(left)} left"
        return text + ")"

    def _broken(self) -> None:
        self._bar = None  # closing it would write again
        self.mode = "quiet"
        silence(self.stream)

    # -- notes and warnings -----------------------------------------------------------------
    def note(self, text: str) -> None:
        """An informational line (silenced by --quiet), printed above the bar when there is one."""
        if self.mode != "quiet":
            self._write(text)

    def warn(self, text: str) -> None:
        """A warning: shown even with --quiet."""
        self._write(f"warning: {text}")

    def _write(self, text: str) -> None:
        try:
            if self._bar is not None:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)
        except _BROKEN:
            self._broken()

    # -- lifetime ---------------------------------------------------------------------------
    def _ensure_bar(self):
        if self._bar is None:
            from tqdm import tqdm

            # Permille steps; the time left is ours (postfix), not tqdm's mean rate.
            self._bar = tqdm(total=1000, file=self.stream, leave=False, dynamic_ncols=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            try:
                self._bar.close()
            except _BROKEN:
                silence(self.stream)
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
