"""Pictures of a profile: the roofline of op mode and the step split of step mode (matplotlib, Agg).

matplotlib is imported inside the functions, so the rest of the profiler works without it.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Dict, List, Sequence

MARKERS = {"torch": "o", "triton": "^", "cuda": "s", "compile": "D"}
RATE_STYLE = {"bf16_TFLOPs": ("bf16", "-"), "tf32_TFLOPs": ("tf32", "--"), "fp32_TFLOPs": ("fp32", ":")}


def available() -> bool:
    """Whether matplotlib can be imported (the pictures need it; the tables and JSON do not)."""
    return importlib.util.find_spec("matplotlib") is not None


def _percent(fraction: float) -> str:
    """0.734 -> '73%', 0.00123 -> '0.12%': two significant digits under 10%."""
    pct = 100 * fraction
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt
    return plt


def roofline(doc: dict, path: str) -> str:
    """Arithmetic intensity (FLOP per minimum byte) against achieved FLOP/s, log-log, one panel per
    shape, one point per op x direction x backend; the measured ceilings are drawn: the copy
    bandwidth as the slanted line (FLOP/s = intensity x GB/s) and each matmul rate as a flat line.
    A point on the roof runs at the device's limit; its height under the roof is the lost time."""
    plt = _pyplot()
    rows = doc["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows)) or ["(no rows)"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(9.5 * len(shapes), 6), squeeze=False)
    c = doc["ceilings"]
    bw = c["copy_GBps"] * 1e9
    rates = {k: c[k] * 1e12 for k in RATE_STYLE if k in c}
    ops = list(dict.fromkeys(f"{r['short']}.{r['direction']}" for r in rows))
    cmap = plt.get_cmap("tab10")
    colours = {name: cmap(i % 10) for i, name in enumerate(ops)}
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        xs = [r["intensity"] for r in mine] or [1.0]
        lo = min(min(xs) / 4, min(r / bw for r in rates.values()) / 4)
        hi = max(max(xs) * 4, max(r / bw for r in rates.values()) * 4)
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        top = max(rates.values())
        ax.plot(grid, [min(x * bw, top) for x in grid], color="black", lw=1.5,
                label=f"copy {c['copy_GBps']:.4g} GB/s")
        for key, rate in rates.items():
            name, style = RATE_STYLE[key]
            ax.plot(grid, [min(x * bw, rate) for x in grid], color="grey", ls=style, lw=1,
                    label=f"{name} matmul {rate / 1e12:.3g} TFLOP/s")
        for r in mine:
            name = f"{r['short']}.{r['direction']}"
            ax.scatter(r["intensity"], r["TFLOPs"] * 1e12, marker=MARKERS.get(r["backend"], "x"),
                       color=colours[name], s=55, edgecolors="black", linewidths=0.5, zorder=3)
            # a point above the roof is no result: a ceiling or the work count failed for it
            pct = "above roof!" if r.get("above_ceiling") else _percent(r["roofline_frac"])
            ax.annotate(f"{name} {r['backend']} {pct}",
                        (r["intensity"], r["TFLOPs"] * 1e12), fontsize=6, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per minimum byte)")
        ax.set_ylabel("achieved FLOP/s")
        ax.set_title(f"{shape} ({doc['dtype']})", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        handles = ax.get_legend_handles_labels()[0]     # the ceilings
        handles += [plt.Line2D([], [], ls="", marker=m, markerfacecolor="white", markeredgecolor="black",
                               label=b) for b, m in MARKERS.items() if any(r["backend"] == b for r in mine)]
        handles += [plt.Line2D([], [], ls="", marker="s", color=colours[o], label=o) for o in ops]
        # the legend outside the panel: the points and the roof fill the inside
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.suptitle(f"rca_fast op roofline on {doc['device']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legends outside the panels
    plt.close(fig)
    return path


def step_bars(split: Sequence[Dict], path: str, *, title: str) -> str:
    """Horizontal bars: ms per training step of each part, with its share of the step.
    ``split`` is a list of {"part", "ms", "share", "kind"} (share in [0, 1]); "kind" is "part" (a
    part of the step, blue), "total" (the whole step, grey) or "compare" (the public code's RCA
    head and the step it would give, hatched orange)."""
    plt = _pyplot()
    parts = list(split)
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(parts) + 1.8))
    names = [p["part"] for p in parts][::-1]
    values = [p["ms"] for p in parts][::-1]
    kinds = [p.get("kind", "part") for p in parts][::-1]
    colours = [{"compare": "#d98c3f", "total": "#7f7f7f"}.get(k, "#3f7fbf") for k in kinds]
    bars = ax.barh(names, values, color=colours)
    for bar, kind, p in zip(bars, kinds, parts[::-1]):
        bar.set_hatch("//" if kind == "compare" else "")
        share = p.get("share")
        text = f"{p['ms']:.3g} ms" + ("" if share is None or math.isnan(share) else f"  ({100 * share:.1f}%)")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
    ax.set_xlabel("ms per training step")
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlim(0, max(values + [1e-9]) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ensure_rows(rows: List[dict]) -> None:
    """Raise ValueError when a row cannot be drawn on log axes (non-positive time or counts)."""
    for r in rows:
        if not (r["ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0):
            raise ValueError(f"roofline: row {r['op']}.{r['direction']} [{r['backend']}] has "
                             f"non-positive ms/bytes/flops: {r['ms']}, {r['bytes']}, {r['flops']}")
