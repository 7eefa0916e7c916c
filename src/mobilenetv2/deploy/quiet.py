"""Silence for foreign converters: litert-torch and coremltools report progress on stdout and log from C++
straight to the process's stderr (absl, TensorFlow Lite's delegate line, coremltools' missing macOS libraries); an
export prints its own lines instead. Exceptions still rise as exceptions."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings


@contextlib.contextmanager
def quiet():
    """Nothing reaches this process's stderr (Python's or file descriptor 2) nor Python's stdout inside the block.
    Descriptor 1 is left alone: pytest-xdist's workers (and any parent reading a pipe) talk through it, and what
    these libraries say from C++ goes to descriptor 2."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        for fd in (saved, null):
            os.close(fd)
        logger.setLevel(level)
