"""The batch of a list of dataset items (every program's DataLoader uses it)."""
from __future__ import annotations

from typing import Dict, List

import torch


def collate(items: List[Dict]) -> Dict:
    """Stack tensor fields; keep names, indices, sizes (and missing labels) as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
