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

__all__ = ["ops", "MemoryBank", "RCAModel", "__version__"]

# name -> (module, attribute or None for the module itself).  Imported on first use, so that
# `import rca_fast.ref.map` (an oracle) or `import rca_fast.data` loads neither the dispatcher
# (rca_fast.ops) nor the model (and torchvision with it).
_LAZY = {"ops": ("rca_fast.ops", None), "MemoryBank": ("rca_fast.model.memory_bank", "MemoryBank"),
         "RCAModel": ("rca_fast.model.rca", "RCAModel")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'rca_fast' has no attribute {name!r}")
    import importlib
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value   # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
