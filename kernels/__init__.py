"""Triton kernels of rca_fast, installed as ``rca_fast.kernels``: one folder per op (``map/``,
``nce/``, ``attention/``: forward, backward, tiles), shared launch and maths helpers beside them
(``launch_rule.py``, ``precise_math.py``, ``compile_specs.py``, ``offline_compile.py``).

Nothing here is imported by ``import rca_fast``: ``rca_fast.ops`` loads a kernel module the first
time an op runs on the Triton backend.  Kernels import nothing of the model or the programs.
``supports`` below is the one place saying which ops, devices and dtypes the kernels run; the
providers themselves run whatever they are handed (the dispatcher routes the rest elsewhere).
"""

import os
from typing import Optional, Sequence

import torch

_LOW = (torch.float16, torch.bfloat16, torch.float32)

# op -> the dtypes its kernels compute in.  The NCE kernel has no float64 path (Triton's fp64 dot
# is not used); MAP and attention accumulate in float64 for float64 inputs.
# (Whether float64 may run on a GPU is the dispatcher's float64 rule, not a kernel property.)
KERNEL_DTYPES = {
    "masked_average_pool": _LOW + (torch.float64,),
    "bank_nce_loss": _LOW,
    "prototype_attention": _LOW + (torch.float64,),
}


def supports(op: str, device: torch.device, dtypes: Sequence[torch.dtype]) -> Optional[str]:
    """What the Triton backend of ``rca_fast.ops`` can run: None, or the reason it cannot run ``op``
    for tensors on ``device`` computing in ``dtypes``.  Importing this module imports no Triton."""
    if op not in KERNEL_DTYPES:
        return f"no Triton kernel computes {op}"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"Triton runs {device.type} tensors only in its interpreter (TRITON_INTERPRET=1)"
    bad = sorted({str(d).replace("torch.", "") for d in dtypes if d not in KERNEL_DTYPES[op]})
    if bad:
        return f"the {op} kernels do not compute in {', '.join(bad)}"
    return None
