"""Keeping the command line's output to what the user asked for: TensorFlow's C++ start-up
lines and Beam's warnings are hidden unless --verbosity is given."""

from __future__ import annotations

import contextlib
import os
import re
import sys


def quiet_beam() -> None:
    """Hides Beam's warnings (optional Google Cloud clients, platform probes), including
    those it logs on the root logger while importing; errors still show."""
    import logging

    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    logging.getLogger().addFilter(lambda record: record.levelno >= logging.ERROR
                                  or f"{os.sep}apache_beam{os.sep}" not in record.pathname)


def verbosity_given(argv) -> bool:
    return any(re.match(r"--?(v|verbosity)(=|$)", a) for a in argv[1:])


@contextlib.contextmanager
def quiet_stderr(quiet: bool):
    """Sends file descriptor 2 to /dev/null: TensorFlow's C++ runtime prints its start-up
    lines (oneDNN, CUDA probing) before its own log level applies."""
    if not quiet:
        yield
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(null)
        os.close(saved)
