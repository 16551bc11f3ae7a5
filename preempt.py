"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends before it preempts or times out a job) ask a run
to stop at its next safe point, leave its atomic checkpoint, and exit with REQUEUE_EXIT.

    with preempt.catching():          # handlers installed for the block, the old ones restored
        for step in ...:
            preempt.check("epoch 3")  # raises Preempted once a signal came
    except preempt.Preempted: sys.exit(preempt.REQUEUE_EXIT)

The handler only sets a flag, so a signal never lands in the middle of a checkpoint write; the loop
checks it where its state is whole (train.py: after an optimizer step; extract_features.py: after a
batch). A second signal while stopping changes nothing.
"""

import contextlib
import signal

# EX_TEMPFAIL (sysexits.h): "try again later"; run_cv.sh and submit.py read it as "requeue me"
REQUEUE_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_state = {"signal": None, "active": False}  # active: inside catching()


class Preempted(Exception):
    """A stop signal arrived; the message says where the run stopped and what is kept."""


def _handler(signum, frame):
    _state["signal"] = signal.Signals(signum).name


def requested():
    """The name of the stop signal received (e.g. "SIGTERM"), or None."""
    return _state["signal"]


def pending():
    """True when check() would raise: a stop signal came inside catching() (close progress bars)."""
    return _state["active"] and _state["signal"] is not None


def check(where):
    """Raise Preempted (naming `where`) if a stop signal has arrived inside catching(); outside it
    (a notebook, a benchmark calling the loop) nothing."""
    if pending():
        raise Preempted(f"{_state['signal']} received; stopped {where}")


@contextlib.contextmanager
def catching():
    """Install the flag-setting handler for SIGTERM and SIGUSR1 (main thread only: elsewhere signal
    handlers cannot be set, and the block runs without them). requested() keeps its answer after
    the block, for the caller's message."""
    _state.update(signal=None, active=True)
    old = {}
    try:
        for s in SIGNALS:
            old[s] = signal.signal(s, _handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        _state["active"] = False
        for s, h in old.items():
            signal.signal(s, h)
