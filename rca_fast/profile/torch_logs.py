"""Keep torch's log screens out of the profile's output, and say in one line what they said.

torch.compile of the plain-torch path logs multi-line warnings (a graph break in the reference
MAP at ``int(per_image.max())``, where the number of present classes sizes the pooled tensor),
and importing ``torch.utils.cpp_extension`` (Inductor does, on the CPU) logs ``No CUDA runtime is
found, using CUDA_HOME=...`` on every machine with a CUDA toolkit but no GPU.  Neither says
anything about the numbers in the table: the first becomes one note line, the second is dropped.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Dict, Iterator, List

CUDA_HOME_NOTICE = "No CUDA runtime is found"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _drop_cuda_home_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(CUDA_HOME_NOTICE)


def quiet_cuda_home_notice() -> None:
    """Import ``torch.utils.cpp_extension`` with its CUDA_HOME notice dropped (it logs it once,
    at import, when a toolkit is found and no GPU is): later imports find the module loaded."""
    import sys
    if "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(_drop_cuda_home_notice)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.removeFilter(_drop_cuda_home_notice)


def _torch_loggers() -> List[logging.Logger]:
    """torch's loggers that print on their own (a handler of their own): torch, torch._dynamo, ..."""
    found = [logging.getLogger("torch")]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.") and isinstance(logger, logging.Logger) and logger.handlers:
            found.append(logger)
    return found


@contextlib.contextmanager
def captured(into: List[logging.LogRecord]) -> Iterator[None]:
    """Route the warnings torch logs inside the block into ``into`` instead of the terminal."""
    capture = _Capture()
    saved: Dict[logging.Logger, list] = {}
    for logger in _torch_loggers():
        saved[logger] = logger.handlers[:]
        logger.handlers = [capture]
    try:
        yield
    finally:
        for logger, handlers in saved.items():
            logger.handlers = handlers
        into.extend(r for r in capture.records if _drop_cuda_home_notice(r))


_WHERE = re.compile(r'File "([^"]+)", line (\d+)')


def summary(records: List[logging.LogRecord]) -> List[str]:
    """One line per distinct warning: its first line, and for a graph break where it happened."""
    lines: Dict[str, int] = {}
    for r in records:
        text = r.getMessage()
        first = text.strip().splitlines()[0].rstrip(" ,:") if text.strip() else r.name
        if "graph break" in text.lower():
            spots = [m for m in _WHERE.finditer(text) if "/torch/" not in m.group(1)]
            if spots:
                path = spots[-1].group(1)
                path = path[path.rfind("rca_fast/"):] if "rca_fast/" in path else path
                first = f"graph break at {path}:{spots[-1].group(2)} ({first})"
        lines[first] = lines.get(first, 0) + 1
    return [line + (f" (x{n})" if n > 1 else "") for line, n in lines.items()]
