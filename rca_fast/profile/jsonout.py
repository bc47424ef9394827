"""Writing the profile documents as strict JSON (shared by every mode; imports no mode)."""
from __future__ import annotations

import json
import math


def json_safe(obj):
    """NaN/inf become null (strict JSON readers reject them); dicts, lists and tuples recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` (indented, NaN/inf as null)."""
    with open(path, "w") as f:
        json.dump(json_safe(doc), f, indent=1)
