"""Checkpoint files: ``{"model", "optimizer", "epoch", "step", "epoch_done", "batch_in_epoch",
"model_config", "args", ...}`` written with ``torch.save`` and read back with
``torch.load(weights_only=True)`` -- so everything in them is tensors and plain Python values
(dtypes are stored as strings), and loading never runs pickled code.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

FORMAT_VERSION = 1

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def save_checkpoint(path: str, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    epoch: int, step: int, epoch_done: bool = True, batch_in_epoch: int = 0,
                    model_config: Optional[Dict[str, Any]] = None, args: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write a checkpoint (model incl. its buffers -- the memory bank --, optimiser, progress).

    ``epoch`` is the 1-based epoch last trained; ``epoch_done`` says whether it finished and
    ``batch_in_epoch`` how many of its batches ran when it did not.
    """
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    state = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch), "step": int(step), "epoch_done": bool(epoch_done),
        "batch_in_epoch": int(batch_in_epoch),
        "model_config": dict(model_config or {}), "args": _plain(args or {}),
    }
    if extra:
        state.update(_plain(extra))
    torch.save(state, path)
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; FileNotFoundError naming ``path`` if absent."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not an rca_fast checkpoint (no 'model' entry)")
    return state


def _plain(value: Any) -> Any:
    """Keep only what ``weights_only`` loading accepts: plain containers, numbers, strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, torch.Tensor):
        return value
    return str(value)
