"""What the two command lines (``python -m simulations``, ``python -m validation``) share:
argument types, directory checks and the one-line report of an unusable input.

Bad input is a one-line ``PROG: error: ...`` on stderr and exit status 2 (an argument
argparse refuses: its usage message and status 2); an interrupt is status 130. Only the
errors of an unusable input are caught this way, never an error of the code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

__all__ = ["UsageError", "positive_int", "nonzero_int", "check_directory", "refuse",
           "interrupted"]


class UsageError(Exception):
    """An input the command cannot use: reported in one line, exit status 2."""


def positive_int(text):
    """An argparse type: an integer of at least 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonzero_int(text):
    """An argparse type: a non-zero integer (joblib's ``n_jobs``: -1 means every core)."""
    value = _int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must not be 0 (-1: every core)")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def check_directory(option, path, *, must_exist=False):
    """Refuse a directory option that names a file, lies under a file, cannot be
    created, or (``must_exist``) does not exist.

    Parameters
    ----------
    option : str
        The option's name, for the message (``"--results-dir"``).
    path : path-like or None
        ``None`` (the option's default) passes.
    must_exist : bool, default=False
        Whether the directory must exist already (it is read, not written).

    Raises
    ------
    UsageError
    """
    if path is None:
        return
    if not str(path).strip():  # Path("") is the current directory
        raise UsageError(f"{option} is empty")
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {path} is not a directory")
        return
    if must_exist:
        raise UsageError(f"{option} {path} does not exist")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"{option} {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path} cannot be created: {parent} is not writable")


def refuse(prog, error):
    """Print ``PROG: error: <error>`` on one line of stderr; return exit status 2."""
    message = " ".join(str(error).split())  # one line, whatever the text holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a batch scheduler, ``timeout``, ``docker stop``) raised as
    KeyboardInterrupt while the block runs, so that it ends as Ctrl-C does: the
    finished rows kept, the table's lock released, and joblib's worker processes shut
    down at exit. The default action killed the parent at once and left the workers
    running under init, computing replicates nobody would write (a review). Installed
    from the main thread only (Python's rule); elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def interrupted(prog, note=""):
    """Print that the run was interrupted; return exit status 130 (as after SIGINT)."""
    print(f"{prog}: interrupted{note}", file=sys.stderr)
    return 130
