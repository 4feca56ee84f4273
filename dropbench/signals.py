"""Signals: SIGTERM (a scheduler's kill, `kill PID`) and submitit's timeout signal stop a run like
Ctrl-C, so that its state is written before the process ends; the one handler the CLI and the run
management share. No torch here: the CLI imports it before deciding what to run.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

from dropbench.config import one_line


def raise_interrupt(signum, frame):
    """SIGTERM (a scheduler's kill, `kill PID`), or submitit's timeout signal, ends a run like Ctrl-C:
    its state is written first."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def signals_interrupt():
    """SIGTERM stops the run like Ctrl-C; set here as well as in the CLI, for launchers that run
    jobs in worker processes. In a submitit job, so does submitit's timeout/preemption signal; once
    the run's state is written, submitit's own handler for it takes over: it requeues the job (which
    continues from its checkpoint, see train_job) and exits. A job it does not requeue (its time
    limit reached max_num_timeout times) goes on past this block as interrupted, so that its sweep
    ends normally and counts it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requeue = submitit_signal()
    signums = [signal.SIGTERM] if requeue is None else [signal.SIGTERM, requeue]
    previous = {s: signal.getsignal(s) for s in signums}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    for s in signums:
        signal.signal(s, raise_interrupt)
    try:
        yield
    except KeyboardInterrupt as stop:
        restore()
        if requeue is None or stop.args != (signal.Signals(requeue).name,) or not callable(previous[requeue]):
            raise
        print(f"dropbench: {stop.args[0]}: the run's state is saved; requeueing the job", flush=True)
        try:
            previous[requeue](requeue, None)  # requeues the job and exits (SystemExit)
        except Exception as why:  # noqa: BLE001 - whatever submitit says, the run's state is safe
            print(f"dropbench: the job is not requeued ({one_line(why)}); the run stays interrupted, "
                  f"resume=true continues it", flush=True)
    finally:
        restore()


@contextmanager
def signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requeue = submitit_signal()
    signums = (signal.SIGINT, signal.SIGTERM) + (() if requeue is None else (requeue,))
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def submitit_signal() -> int | None:
    """The signal submitit sends a job before its time limit or on preemption (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise), when this process is a submitit job; else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit import JobEnvironment

    return getattr(signal, f"SIG{JobEnvironment.USR_SIG}")
