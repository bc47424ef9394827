"""Checkpoint files: ``{"model", "optimizer", "scheduler", "epoch", "step", "epoch_done",
"batch_in_epoch", "sampler", "rng", "model_config", "args", ...}`` written atomically with
``torch.save`` and read back with ``torch.load(weights_only=True)`` -- so everything in them is
tensors and plain Python values (dtypes and RNG states are stored as strings, ints and tensors),
and loading never runs pickled code.

Atomic: a checkpoint is written to a temporary file in the same folder, flushed to disk, then
``os.replace``-d over its name, so a crash or Ctrl-C mid-write leaves the previous file intact.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT_VERSION = 2
LATEST_NAME = "checkpoint.pt"          # always the newest checkpoint of a run (infer reads it)
_NUMBERED = re.compile(r"^checkpoint_step(\d+)\.pt$")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ---------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """Every RNG the training step draws from, as tensors and plain values (weights_only-safe):
    torch (CPU), CUDA (every device, when CUDA is initialised), numpy's global and Python's."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only when CUDA is present.

    The tensors may sit on any device (a checkpoint loaded with ``map_location="cuda"``)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].cpu().tolist()), p["gauss"]))


# ---------------------------------------------------------------- writing
def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace`` onto it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _link_or_copy_atomic(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link; copy where links fail)."""
    tmp = dst + ".linktmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def numbered_checkpoints(folder: str) -> List[str]:
    """``checkpoint_step<N>.pt`` files of ``folder``, oldest (smallest N) first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "checkpoint_step*.pt")):
        m = _NUMBERED.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str) -> Optional[str]:
    """The newest checkpoint in ``folder``, or None.

    That is ``checkpoint.pt`` (the numbered file it is a link to, when there is one), not the
    highest step: numbered files of higher steps may be left from an earlier run in the same
    folder, or from the branch a run resumed from an earlier checkpoint abandoned.  Without
    ``checkpoint.pt``: the highest-step numbered file.
    """
    numbered = numbered_checkpoints(folder)
    latest = os.path.join(folder, LATEST_NAME)
    if os.path.isfile(latest):
        for path in reversed(numbered):
            if os.path.samefile(path, latest):
                return path
        return latest
    return numbered[-1] if numbered else None


def resolve_resume(resume: Optional[str], folder: str, log=None) -> Optional[str]:
    """A ``--resume`` value: a path (returned as it is), None, or "auto" = :func:`latest_checkpoint`
    of ``folder`` (None, said on ``log``, when it holds none: a fresh run)."""
    if resume != "auto":
        return resume
    path = latest_checkpoint(folder)
    if path is None and log is not None:
        log.info(f"--resume auto: no checkpoint in {folder}, starting a fresh run")
    return path


def save_checkpoint(path: str, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    epoch: int, step: int, epoch_done: bool = True, batch_in_epoch: int = 0,
                    model_config: Optional[Dict[str, Any]] = None, args: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None, keep: int = 0) -> str:
    """Write a checkpoint atomically (model incl. its buffers -- bank, pointers, prototypes --,
    optimiser, progress, and whatever ``extra`` holds: scheduler, sampler, RNG states, ...).

    ``epoch`` is the 1-based epoch last trained; ``epoch_done`` says whether it finished and
    ``batch_in_epoch`` how many of its batches ran when it did not.
    With ``keep > 0`` the file goes to ``<folder>/checkpoint_step<step>.pt``, ``path`` becomes the
    same file (hard link, so the bytes are written once) and only the newest ``keep`` numbered
    files up to this step are kept.  Returns the path written.
    """
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
    if keep <= 0:
        return atomic_torch_save(state, path)
    folder = os.path.dirname(os.path.abspath(path))
    numbered = os.path.join(folder, f"checkpoint_step{int(step):08d}.pt")
    atomic_torch_save(state, numbered)
    _link_or_copy_atomic(numbered, path)
    # rotate among this run's checkpoints: files of later steps (an earlier run in this folder, or
    # the branch a resume from an earlier checkpoint left) must not push out the one just written
    mine = [p for p in numbered_checkpoints(folder)
            if int(_NUMBERED.match(os.path.basename(p)).group(1)) <= int(step)]
    for old in mine[:-keep]:
        os.remove(old)
    return numbered


# ---------------------------------------------------------------- reading
def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises FileNotFoundError naming ``path`` if absent, and ValueError if the file needs
    arbitrary pickled Python objects (refused: loading them could run any code) or is not an
    rca_fast checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"refusing to load {path}: it needs arbitrary pickled Python objects, and rca_fast "
                         f"loads checkpoints only with torch.load(weights_only=True) (tensors and plain "
                         f"values), since unpickling objects can run any code. torch said: {first}") from exc
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not an rca_fast checkpoint (no 'model' entry)")
    return state


def check_model_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """ValueError naming both shapes when ``state_dict`` does not fit ``model``.

    The bank (number of classes, slots, feature size) is checked first with its own message:
    a checkpoint of another dataset (VOC's 20 classes vs COCO's 80) is the common mistake.
    """
    own = model.state_dict()
    bank_key = next((k for k in own if k.endswith("bank.bank")), None)
    if bank_key is not None and bank_key in state_dict:
        theirs, mine = tuple(state_dict[bank_key].shape), tuple(own[bank_key].shape)
        if theirs != mine:
            raise ValueError(f"{path}: the checkpoint's memory bank has shape (classes, slots, dim) = "
                             f"{theirs} "
                             f"({theirs[0]} classes) but this model's has {mine} ({mine[0]} classes)")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint's model does not match this one (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for key, value in own.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(state_dict[key].shape)} in the checkpoint but "
                             f"{tuple(value.shape)} in this model")


def load_model_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """:func:`check_model_state`, then ``model.load_state_dict`` (strict).

    A checkpoint from before the projector's first conv had its (public) bias lacks that key:
    it loads with a zero bias, which is exactly the bias-free conv it was trained with."""
    own = model.state_dict()
    for key in [k for k in own if k.endswith("projector.net.0.bias") and k not in state_dict]:
        state_dict = dict(state_dict, **{key: torch.zeros_like(own[key])})
    check_model_state(model, state_dict, path)
    model.load_state_dict(state_dict)


def _plain(value: Any) -> Any:
    """Keep only what ``weights_only`` loading accepts: plain containers, numbers, strings, tensors."""
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
