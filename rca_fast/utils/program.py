"""The one ``__main__`` wrapper of the programs: a known failure ends in one line, not a traceback."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Sequence, Tuple, Type, Union

Kinds = Union[Type[BaseException], Tuple[Type[BaseException], ...]]
# bad flags, a malformed list or shape, a missing file: the user's to fix, said in one line
USAGE_ERRORS: Tuple[Kinds, int, str] = ((FileNotFoundError, ValueError), 2, "error")


def run_program(main: Callable[[], object], exits: Sequence[Tuple[Kinds, int, str]] = ()) -> None:
    """Run ``main()``; on an exception of a known kind print ``'<word>: <message>'`` to stderr and
    exit with its code.  ``exits`` lists further (exception kinds, exit code, word), checked in
    order before :data:`USAGE_ERRORS` (FileNotFoundError / ValueError -> ``error:``, exit 2).
    Anything else propagates with its traceback (a bug, not a usage error)."""
    try:
        main()
    except BaseException as exc:
        for kinds, code, word in list(exits) + [USAGE_ERRORS]:
            if isinstance(exc, kinds):
                print(f"{word}: {exc}", file=sys.stderr)
                sys.exit(code)
        raise


def check_at_least(limits: Sequence[Tuple[str, Union[int, float], Union[int, float]]]) -> None:
    """ValueError naming the first flag below its lower bound: ``limits`` holds (flag, value, low)."""
    for flag, value, low in limits:
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")


@contextlib.contextmanager
def stop_signals(handler: Callable[[int, object], None]):
    """Inside: SIGINT and SIGTERM call ``handler`` (a trainer's "checkpoint after this step"); the
    previous handlers come back on exit.  SIGTERM too: schedulers (SLURM) and torchrun's shutdown
    send it before killing a job.  Only the main thread may set handlers: elsewhere, nothing."""
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
