"""rca_fast: Regional Semantic Contrast and Aggregation (CVPR 2022) with fused kernels.

``rca_fast.ops`` holds the operations, ``rca_fast.MemoryBank`` and ``rca_fast.RCAModel`` the model
layer.  Importing the package never needs a GPU, Triton or the compiled extension.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Make ``rca_fast.kernels`` importable from a source checkout.

    ``setup.py`` installs the top-level ``kernels/`` folder as ``rca_fast.kernels``; when the
    package is used straight from the repository (``PYTHONPATH=.``, ``build_ext --inplace``) that
    mapping does not exist, so we point the name at ``../kernels`` ourselves.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "rca_fast.kernels" in _sys.modules:
        return
    src = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if _os.path.isfile(src):
        spec = _ilu.spec_from_file_location("rca_fast.kernels", src,
                                            submodule_search_locations=[_os.path.dirname(src)])
        if spec is not None:
            _sys.meta_path.append(_KernelsFinder(spec))


class _KernelsFinder:
    """A meta-path finder answering only ``rca_fast.kernels`` (imported lazily, on first use)."""

    def __init__(self, spec):
        self.spec = spec

    def find_spec(self, name, path=None, target=None):
        return self.spec if name == "rca_fast.kernels" else None


_map_source_kernels()

from . import ops  # noqa: E402
from .model import MemoryBank  # noqa: E402

__all__ = ["ops", "MemoryBank", "RCAModel", "__version__"]


def __getattr__(name):
    # RCAModel pulls in torchvision; import it on first use so `import rca_fast` stays light.
    if name == "RCAModel":
        from .model.rca import RCAModel
        return RCAModel
    raise AttributeError(f"module 'rca_fast' has no attribute {name!r}")
