"""benchmarks/method_check.py statistics: the paired difference to the baseline (mean, standard
error, seeds better) against a float64 hand computation on random rows; unpaired seeds ignored."""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import method_check  # noqa: E402


def test_paired_difference_against_hand_computation(gen):
    import torch
    seeds = list(range(7))
    base = torch.rand(len(seeds), generator=gen, dtype=torch.float64).tolist()
    var = torch.rand(len(seeds), generator=gen, dtype=torch.float64).tolist()
    rows = [{"regime": "scratch", "variant": "baseline", "seed": s, "final_miou": b} for s,
            b in zip(seeds, base)]
    rows += [{"regime": "scratch", "variant": "public RCA", "seed": s, "final_miou": v} for s,
             v in zip(seeds, var)]
    rows.append({"regime": "scratch", "variant": "public RCA", "seed": 99, "final_miou": 5.0})   # no baseline
    # other regime
    rows.append({"regime": "pretrained", "variant": "baseline", "seed": 0, "final_miou": -3.0})
    got = method_check.paired(rows, "scratch", "public RCA", "final_miou")
    d = [v - b for v, b in zip(var, base)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    assert got["n"] == 7 and got["better"] == sum(x > 0 for x in d)
    assert math.isclose(got["mean"], mean, rel_tol=1e-12)
    assert math.isclose(got["se"], sd / math.sqrt(7), rel_tol=1e-12)
    assert method_check.paired(rows, "pretrained", "public RCA", "final_miou") is None
