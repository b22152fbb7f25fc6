"""Progress with an ETA between chunks: one refreshed line in a terminal, a bar in Jupyter.

Every family's host loop reports through :class:`Progress` after each compiled chunk, so progress shows
inside tasks and meta-training chunks, not only at their ends. ``NESTLEARN_PROGRESS=0`` (or
``progress=False`` wherever a run takes it) turns it off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


def progress_enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else on unless ``NESTLEARN_PROGRESS=0``; always off on processes other than 0."""
    from nestlearn.engine._distributed import is_primary

    if not is_primary():  # one progress line per run, not one per process
        return False
    if flag is not None:
        return bool(flag)
    return os.environ.get("NESTLEARN_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _clock(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Progress:
    """Counts units of work (chunks, steps) towards ``total`` and reports elapsed time and ETA.

    The ETA is measured from the second report on, so the first chunk's compilation does not inflate it.

    Args:
      total: units of work in all.
      desc: a label (the run's name).
      enabled: ``None`` follows ``NESTLEARN_PROGRESS``.
      write: where lines go (default: standard error, one refreshed line in a terminal).
      min_interval: seconds between two terminal reports (the last one always shows).

    Example:
      >>> p = Progress(4, "demo", write=print, min_interval=0)
      >>> p.update(2, loss=0.5)  # doctest: +ELLIPSIS
      [demo] 2/4 (50%) · elapsed ... · ETA ... · loss 0.5
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool | None = None,
        write: Callable[[str], None] | None = None,
        min_interval: float = 0.5,
    ) -> None:
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = progress_enabled(enabled)
        self.done = 0
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None
        self._last_print = -float("inf")
        self._write = write
        self.min_interval = min_interval
        self._bar = None
        if self.enabled and write is None and _in_notebook():
            self._bar = _NotebookBar(self.total, desc)

    def eta(self) -> float | None:
        """Seconds left at the rate since the first report, ``None`` before two reports."""
        if self._first is None or self.done <= self._first[1]:
            return None
        t0, n0 = self._first
        rate = (time.perf_counter() - t0) / (self.done - n0)
        return rate * (self.total - self.done)

    def update(self, done: int, **info) -> None:
        """Sets the units done so far and reports (``info``: numbers to show, e.g. a mean loss)."""
        self.done = min(int(done), self.total)
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, self.done)
        if not self.enabled:
            return
        eta = self.eta()
        parts = [
            f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)",
            f"elapsed {_clock(now - self.start)}",
        ]
        parts.append(f"ETA {_clock(eta)}" if eta is not None else "ETA …")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()]
        line = (f"[{self.desc}] " if self.desc else "") + " · ".join(parts)
        if self._bar is not None:
            self._bar.show(self.done, line)
            return
        last = self.done == self.total
        if not last and now - self._last_print < self.min_interval:
            return
        self._last_print = now
        if self._write is not None:
            self._write(line)
        elif sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + line + ("\n" if last else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _NotebookBar:
    """A progress bar that renders in Jupyter (an HTML ``<progress>`` element, updated in place)."""

    def __init__(self, total: int, desc: str) -> None:
        from IPython.display import HTML, display

        self._html = HTML
        self.total = total
        self.handle = display(HTML(self._render(0, desc)), display_id=True)

    def _render(self, done: int, line: str) -> str:
        import html

        return (
            f'<div><progress value="{done}" max="{self.total}" style="width:40%"></progress> '
            f"<code>{html.escape(line)}</code></div>"
        )

    def show(self, done: int, line: str) -> None:
        self.handle.update(self._html(self._render(done, line)))
