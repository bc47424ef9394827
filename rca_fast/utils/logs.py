"""Logging for the programs: one line per event to stdout (kept clear of tqdm bars) and a file."""
from __future__ import annotations

import logging
import sys
from typing import Optional

from tqdm import tqdm


class _TqdmStream:
    """A stream that writes through ``tqdm.write`` so log lines do not break progress bars."""

    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            tqdm.write(text, file=sys.stdout)

    def flush(self) -> None:
        sys.stdout.flush()


def get_logger(path: Optional[str] = None, name: str = "rca_fast") -> logging.Logger:
    """The programs' logger, its handlers replaced: stdout and, with ``path``, that file (appended)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(_TqdmStream())
    console.setFormatter(fmt)
    logger.addHandler(console)
    if path:
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger
