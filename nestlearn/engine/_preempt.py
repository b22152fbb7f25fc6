"""Preemption: a notice (SIGTERM) stops a run at the next chunk boundary, after a checkpoint.

Spot and queued cloud capacity is taken back with a short notice: SIGTERM, about 30 s before the machine
goes. The run path (the command line, :func:`nestlearn.experiment.run_experiment`,
:func:`nestlearn.experiment.run_study`) installs a handler for the length of the run (:func:`handling`)
that only records the notice; the host loops ask :func:`requested` at every chunk boundary, and when it
says so they save a checkpoint and raise :class:`~nestlearn.Preempted`, which the command line turns
into a one-line message and exit code 4. ``--resume`` continues from that checkpoint, bit-identically.

With several processes every one must stop at the same chunk: :func:`requested` is a collective (the
notice of any process stops all), and where ``jax.distributed`` runs its preemption service (Cloud TPU
multi-host slices), JAX's own sync point (``multihost_utils.reached_preemption_sync_point``), which
hears the notices the TPU runtime relays, stops them too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from nestlearn.engine import _distributed

_notice: list[str] = []  # the signals received since the handler was installed
_checks = [0]  # how many times requested() was asked (the step id of JAX's sync point)
_depth = [0]


def _handler(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    _notice.append(signal.Signals(signum).name)


@contextlib.contextmanager
def handling(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """Records SIGTERM (and ``signals``) as a preemption notice while the block runs, then restores.

    Outside the main thread (where Python cannot install handlers) it does nothing. Nested uses share
    the outer one's notice.
    """
    if threading.current_thread() is not threading.main_thread() or _depth[0]:
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    previous = {s: signal.getsignal(s) for s in signals}
    _notice.clear()
    _checks[0] = 0
    for s in signals:
        signal.signal(s, _handler)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _notice.clear()  # a notice belongs to the run it stopped


def notice() -> str | None:
    """The signal received on this process (``"SIGTERM"``), ``None`` if none yet."""
    return _notice[0] if _notice else None


def request(reason: str = "SIGTERM") -> None:
    """Records a preemption notice as if the signal had arrived (for drills and schedulers' hooks)."""
    _notice.append(reason)


def requested() -> bool:
    """Whether the run must stop at this chunk boundary; with several processes, every one must ask.

    True once this process (or, with several, any process) has received a notice, or JAX's multi-host
    preemption sync point has been reached.
    """
    _checks[0] += 1
    stop = _distributed.any_process(bool(_notice))
    if _distributed.process_count() > 1:
        from jax.experimental import multihost_utils

        try:
            stop = multihost_utils.reached_preemption_sync_point(_checks[0]) or stop
        except RuntimeError:  # no preemption service in this jax.distributed setup
            pass
    return stop
