"""One dispatch point for every public op.

Each op has a plain-torch implementation (``rca_fast.ref``) and may have fast providers: Triton
kernels (``rca_fast.kernels``) and the compiled extension (``rca_fast._C`` through
``rca_fast._ext``).  Providers are named here as ``"module:function"`` strings and imported
lazily, so importing ``rca_fast`` never touches Triton or the extension.

Selection order, unless ``RCA_FAST_BACKEND=torch|triton|cuda`` forces one:
  * CUDA tensors: ``cuda`` (extension) if it provides the op, else ``triton``, else ``torch``;
  * CPU tensors: ``cuda`` (the extension's CPU twin) if it provides the op, else ``torch``.
Triton runs on CPU tensors only when forced (``RCA_FAST_BACKEND=triton`` with
``TRITON_INTERPRET=1``), which is how CI tests the kernels.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable, Dict, Optional

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

_loaded: Dict[str, Optional[Callable]] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def _import_provider(module_name: str):
    """Import a provider module.  Dynamo will not trace ``importlib.import_module`` (it is on its
    skip list) but does trace ``import`` statements, so the modules named in PROVIDERS are imported
    by statements: an op whose first call is inside ``torch.compile(fullgraph=True)`` then loads its
    provider during tracing instead of failing.  Other names (tests' stand-ins) go to importlib."""
    if module_name == "rca_fast.ref.map":
        import rca_fast.ref.map  # noqa: F401
    elif module_name == "rca_fast.ref.nce":
        import rca_fast.ref.nce  # noqa: F401
    elif module_name == "rca_fast.ref.attention":
        import rca_fast.ref.attention  # noqa: F401
    elif module_name == "rca_fast.ref.ema":
        import rca_fast.ref.ema  # noqa: F401
    elif module_name == "rca_fast.ref.kmeans":
        import rca_fast.ref.kmeans  # noqa: F401
    elif module_name == "rca_fast.kernels.map.forward":
        import rca_fast.kernels.map.forward  # noqa: F401
    elif module_name == "rca_fast.kernels.nce.forward":
        import rca_fast.kernels.nce.forward  # noqa: F401
    elif module_name == "rca_fast.kernels.attention.forward":
        import rca_fast.kernels.attention.forward  # noqa: F401
    elif module_name == "rca_fast._ext":
        import rca_fast._ext  # noqa: F401
    else:
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


def available_backends(op: str, device: torch.device) -> list:
    """Backends that can run ``op`` on ``device`` (a torch.device or a string) here (imports the
    providers)."""
    _check_op("available_backends", op)
    device = torch.device(device)
    out = []
    for name, spec in PROVIDERS[op].items():
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        if _load(spec) is not None:
            out.append(name)
    return out


def backend_for(op: str, device: torch.device) -> str:
    """Which backend ``op`` uses for tensors on ``device`` (a torch.device or a string)."""
    _check_op("backend_for", op)
    device = torch.device(device)
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
        return forced
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cuda", "torch")
    for name in order:
        if name in providers and _load(providers[name]) is not None:
            return name
        module = providers.get(name, ":").split(":")[0]
        if name == "cuda" and name in providers and module not in _warned:
            _warned.add(module)  # one warning for the whole extension, not one per op
            warnings.warn(
                f"rca_fast: the compiled extension is not available ({_load_errors.get(providers[name])}); "
                f"{op} and the other extension ops fall back to the plain-torch reference.",
                RuntimeWarning, stacklevel=4)
    return "torch"


def implementation(op: str, device: torch.device) -> Callable:
    """The function that runs ``op`` for tensors on ``device``."""
    return _load(PROVIDERS[op][backend_for(op, device)])
