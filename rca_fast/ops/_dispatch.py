"""One dispatch point for every public op.

Each op has a plain-torch implementation (``rca_fast.ref``) and may have fast providers: Triton
kernels (``rca_fast.kernels``) and the compiled extension (``rca_fast._C`` through
``rca_fast._ext``).  Providers are named here once, as ``"module:function"`` strings, and imported
lazily, so importing ``rca_fast`` never touches Triton or the extension.

Each backend says what it can run in one place, its ``supports(op, device, dtypes)`` (named in
CAPABILITIES: ``rca_fast.ref.supports``, ``rca_fast.kernels.supports``, ``rca_fast._ext.supports``),
which returns None or the reason it cannot.  ``dtypes`` are the dtypes the op computes in, as the
public op passes them (MAP: features; NCE: query and bank; attention: query; EMA: bank and emb;
k-means: points).  A provider runs whatever it is handed and never falls back by itself: this
module alone decides, so ``backend_for`` names the backend that really runs.

Selection order, unless ``RCA_FAST_BACKEND=torch|triton|cuda`` forces one:
  * CUDA tensors: ``cuda`` (extension) if it provides the op, else ``triton``, else ``torch``;
  * CPU tensors: ``cuda`` (the extension's CPU twin) if it provides the op, else ``torch``;
a backend is skipped when it cannot be loaded or does not support the call.  Triton runs on CPU
tensors only when forced (``RCA_FAST_BACKEND=triton`` with ``TRITON_INTERPRET=1``), which is how
CI tests the kernels.  A forced backend that the op lacks, or that does not support the call,
gives the ``torch`` reference; one that cannot be loaded raises RuntimeError.

The float64 rule (one, for every op): float64 is the dtype of checks, not of training.  The
reference and the extension compute it natively; a Triton kernel gets float64 only in the
interpreter (``TRITON_INTERPRET=1``), where MAP and attention run their kernels in float64 as the
CPU tests' exact oracle.  On a GPU a float64 call never reaches a Triton kernel (fp64 tiles spill
registers / shared memory on sm_90): it runs on the extension where that provides the op, else on
the reference.  The NCE kernel has no float64 path at all (Triton's fp64 dot is not used), so
float64 NCE runs on the reference everywhere.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "RCA_FAST_BACKEND"

# op name -> backend -> "module:function".  The "torch" backend is always rca_fast.ref.
PROVIDERS: Dict[str, Dict[str, str]] = {
    "masked_average_pool": {
        "torch": "rca_fast.ref.map:masked_average_pool",
        "triton": "rca_fast.kernels.map.forward:masked_average_pool",
    },
    "bank_nce_loss": {
        "torch": "rca_fast.ref.nce:bank_nce_loss",
        "triton": "rca_fast.kernels.nce.forward:bank_nce_loss",
    },
    "prototype_attention": {
        "torch": "rca_fast.ref.attention:prototype_attention",
        "triton": "rca_fast.kernels.attention.forward:prototype_attention",
    },
    "ema_update_": {
        "torch": "rca_fast.ref.ema:ema_update_",
        "cuda": "rca_fast._ext:ema_update_",
    },
    "kmeans": {
        "torch": "rca_fast.ref.kmeans:kmeans",
        "cuda": "rca_fast._ext:kmeans",
    },
}

# backend -> "module:supports", the one place where the backend says what it can run:
# supports(op, device, dtypes) -> None, or the reason it cannot.
CAPABILITIES: Dict[str, str] = {
    "torch": "rca_fast.ref:supports",
    "triton": "rca_fast.kernels:supports",
    "cuda": "rca_fast._ext:supports",
}

_loaded: Dict[str, Optional[Callable]] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def _statement_importer(module_names: Sequence[str]) -> Callable[[str], bool]:
    """A function ``name -> bool`` importing any of ``module_names`` with an ``import`` statement.

    Dynamo will not trace ``importlib.import_module`` (it is on its skip list) but does trace
    ``import`` statements, so the modules named in PROVIDERS and CAPABILITIES are imported by
    statements: an op whose first call is inside ``torch.compile(fullgraph=True)`` then loads its
    provider during tracing instead of failing.  The statements are generated from those two tables,
    so each module is written once."""
    body = "".join(f"    if name == {m!r}:\n        import {m}\n        return True\n"
                   for m in sorted(set(module_names)))
    namespace: dict = {}
    exec(compile(f"def import_by_statement(name):\n{body}    return False\n",
                 f"<{__name__} provider imports>", "exec"), namespace)
    return namespace["import_by_statement"]


_import_by_statement = _statement_importer(
    [spec.split(":")[0] for specs in PROVIDERS.values() for spec in specs.values()]
    + [spec.split(":")[0] for spec in CAPABILITIES.values()])


def _import_provider(module_name: str):
    """Import a provider module (by statement when it is one of ours; tests' stand-ins go to
    importlib)."""
    if not _import_by_statement(module_name):
        return importlib.import_module(module_name)
    # not `import ... as module`: that reads the attribute, and rca_fast.ref.kmeans (say) is the
    # function rca_fast.ref re-exports, not the submodule
    return sys.modules[module_name]


def _load(spec: str) -> Optional[Callable]:
    """Import ``module:function``; None (with the reason remembered) when it cannot be had."""
    if spec not in _loaded:
        module_name, fn_name = spec.split(":")
        try:
            _loaded[spec] = getattr(_import_provider(module_name), fn_name)
        except Exception as exc:  # ImportError, a missing toolkit, an ABI mismatch...
            _loaded[spec] = None
            _load_errors[spec] = f"{type(exc).__name__}: {exc}"
    return _loaded[spec]


def forced_backend() -> Optional[str]:
    """The backend named by ``RCA_FAST_BACKEND``, or None."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def _check_op(fn: str, op) -> None:
    if op not in PROVIDERS:
        raise ValueError(f"{fn}: op must be one of {tuple(PROVIDERS)}, got {op!r}")


def _interpreting(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend: str, op: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> Optional[str]:
    """None when the loaded ``backend`` can run ``op`` on ``device`` in ``dtypes``, else why not:
    the backend's own ``supports``, then the float64 rule (module docstring)."""
    supports = _load(CAPABILITIES[backend])
    if supports is None:
        return f"its capabilities cannot be loaded ({_load_errors.get(CAPABILITIES[backend])})"
    reason = supports(op, device, tuple(dtypes))
    if reason is None and backend == "triton" and torch.float64 in dtypes and not _interpreting(device):
        reason = "float64 on a GPU never runs a Triton kernel (fp64 tiles spill on sm_90)"
    return reason


def _dtypes(dtypes: Optional[Sequence[torch.dtype]]) -> tuple:
    return (torch.float32,) if dtypes is None else tuple(dtypes)


def available_backends(op: str, device: torch.device, dtypes: Optional[Sequence[torch.dtype]] = None) -> list:
    """Backends that can run ``op`` on ``device`` (a torch.device or a string) in ``dtypes`` (the
    op's compute dtypes, float32 when omitted) here (imports the providers)."""
    _check_op("available_backends", op)
    device, dtypes = torch.device(device), _dtypes(dtypes)
    return [name for name, spec in PROVIDERS[op].items()
            if _load(spec) is not None and why_not(name, op, device, dtypes) is None]


def _warn_once(backend: str, op: str, why: str, key: str) -> None:
    """One warning per reason (``key``) the extension is passed over, not one per op or call."""
    if backend == "cuda" and key not in _warned:
        _warned.add(key)
        warnings.warn(f"rca_fast: the compiled extension is not available for {op} ({why}); "
                      f"{op} and the other extension ops fall back to the plain-torch reference.",
                      RuntimeWarning, stacklevel=5)


def backend_for(op: str, device: torch.device, dtypes: Optional[Sequence[torch.dtype]] = None) -> str:
    """Which backend really runs ``op`` for tensors on ``device`` (a torch.device or a string) whose
    compute dtypes are ``dtypes`` (float32 when omitted; see the module docstring)."""
    _check_op("backend_for", op)
    device, dtypes = torch.device(device), _dtypes(dtypes)
    providers = PROVIDERS[op]
    forced = forced_backend()
    if forced is not None:
        if forced not in providers:
            # The op has no such backend (e.g. kmeans has no Triton kernel): use the reference.
            return "torch"
        if _load(providers[forced]) is None:
            raise RuntimeError(
                f"{ENV_VAR}={forced} but the {forced} backend of {op} cannot be loaded: "
                f"{_load_errors.get(providers[forced])}")
        # A forced backend that cannot run this call (float64 on a GPU for Triton, say) gives the
        # reference, as a backend the op lacks does.
        return forced if why_not(forced, op, device, dtypes) is None else "torch"
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cuda", "torch")
    for name in order:
        if name not in providers:
            continue
        if _load(providers[name]) is None:
            _warn_once(name, op, _load_errors.get(providers[name], ""), providers[name].split(":")[0])
            continue
        why = why_not(name, op, device, dtypes)
        if why is None:
            return name
        _warn_once(name, op, why, why)
    return "torch"


def implementation(op: str, device: torch.device, dtypes: Optional[Sequence[torch.dtype]] = None) -> Callable:
    """The function that runs ``op`` for tensors on ``device`` in ``dtypes``."""
    return _load(PROVIDERS[op][backend_for(op, device, dtypes)])
