"""Op mode: every op, forward and backward, on every backend, against the device's ceilings.

For each shape and op the inputs are built once (random, never zeros), then every backend runs
them: ``torch`` (rca_fast.ref), ``triton`` (rca_fast.kernels), ``cuda`` (the compiled extension,
or its CPU twin on the CPU), ``compile`` (torch.compile of the torch path).  A backend is called
through its provider in ``rca_fast.ops._dispatch.PROVIDERS`` -- the function the public op runs
after validating its inputs -- so a row times the backend's work, not the validation.
"""
from __future__ import annotations

import gc
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import ceilings as ceil, counts, torch_logs
from .timing import Timer, environment

ALL_BACKENDS = ("torch", "triton", "cuda", "compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Case:
    """Inputs of one op, and what a backward pass differentiates."""
    args: tuple
    kwargs: dict
    grad_inputs: Tuple[torch.Tensor, ...] = ()           # empty: the op has no backward
    # picks the differentiable outputs of a forward result and pairs them with their gradients
    grad_outputs: Optional[Callable[[object], Tuple[list, list]]] = None
    # a fresh copy of the arguments for correctness checks of in-place ops
    fresh_args: Optional[Callable[[], tuple]] = None
    extra: dict = field(default_factory=dict)


def _present_pairs(shape: counts.ProfileShape, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels (B, L) bool with ``present`` classes per image, spread over the classes, and the
    (image, class) index of every present pair in row-major order."""
    B, L = shape.B, shape.L
    per = min(shape.present, L)
    labels = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for j in range(per):
            labels[b, (b * per + j) % L] = True
    img, cls = labels.nonzero(as_tuple=True)
    return labels.to(device), img.to(device), cls.to(device)


def build_case(op: str, shape: counts.ProfileShape, dtype: torch.dtype, device: torch.device,
               gen: torch.Generator, *, kmeans_iters: int = 10) -> Case:
    """Random inputs of ``op`` at ``shape`` (created on the CPU from ``gen``, then moved)."""
    s = shape

    def randn(*size, grad=False):
        t = torch.randn(*size, generator=gen).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    labels, img, cls = _present_pairs(s, device)
    if op == "masked_average_pool":
        feats, cams = randn(s.B, s.D, s.H, s.W, grad=True), randn(s.B, s.L, s.H, s.W)
        g_emb = randn(s.B, s.L, s.D)
        return Case((feats, cams, labels), {}, (feats,), lambda out: ([out[0]], [g_emb]))
    if op == "bank_nce_loss":
        query, bank = randn(s.Np, s.D, grad=True), randn(s.L, s.S, s.D)
        # mixup partner: a random present class of a random image; weight ~ Beta(8, 8)
        partner = torch.randint(s.Np, (s.Np,), generator=gen).to(device)
        mix_target = cls[partner]
        beta = torch.distributions.Beta(torch.tensor(8.0), torch.tensor(8.0))
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
        mix_weight = beta.sample((s.Np,)).to(device=device, dtype=torch.float32)
        kwargs = dict(temperature=0.07, mix_target=mix_target, mix_weight=mix_weight, reduction="mean")
        return Case((query, bank, cls), kwargs, (query,),
                    lambda out: ([out], [torch.ones_like(out)]))
    if op == "prototype_attention":
        q, k, v = randn(s.B, s.HW, s.D, grad=True), randn(s.P, s.D, grad=True), randn(s.P, s.D, grad=True)
        g_out = randn(s.B, s.HW, s.D)
        return Case((q, k, v), {"scale": None}, (q, k, v), lambda out: ([out], [g_out]))
    if op == "ema_update_":
        bank0 = randn(s.L, s.S, s.D)
        ptr0 = torch.randint(s.S, (s.L,), generator=gen).to(device)
        emb = randn(s.Np, s.D)
        bank, ptr = bank0.clone(), ptr0.clone()
        return Case((bank, ptr, emb, cls), {"gamma": 0.99},
                    fresh_args=lambda: (bank0.clone(), ptr0.clone(), emb, cls))
    if op == "kmeans":
        points = randn(s.L, s.S, s.D)
        return Case((points, s.K), {"iters": kmeans_iters, "tol": 0.0, "seed": 0})
    raise ValueError(f"unknown op {op!r}")


def resolve(spec: str) -> Callable:
    """``"module:function"`` -> the function (ImportError/AttributeError when it cannot be had)."""
    module_name, fn_name = spec.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def provider(op: str, backend: str) -> Callable:
    """The function ``backend`` runs for ``op`` (``compile``: torch.compile of the torch path)."""
    from rca_fast.ops import _dispatch
    if backend == "compile":
        return torch.compile(resolve(_dispatch.PROVIDERS[op]["torch"]))
    return resolve(_dispatch.PROVIDERS[op][backend])


def select_backends(op: str, device: torch.device, requested: Optional[Sequence[str]]):
    """(backends to run, {backend: why skipped}) for ``op`` on ``device``.

    Default: every backend ``rca_fast.ops.available_backends`` lists, plus ``compile``; Triton on
    the CPU only when asked for (interpreter timings say nothing about the kernels' speed)."""
    from rca_fast.ops import _dispatch, available_backends
    available = available_backends(op, device)
    if requested is None:
        wanted = [b for b in ALL_BACKENDS if not (b == "triton" and device.type != "cuda")]
        silent = True
    else:
        # torch first: it is the reference of the err and xtorch columns
        wanted, silent = sorted(set(requested), key=ALL_BACKENDS.index), False
    run, skipped = [], {}
    for name in wanted:
        if name == "compile" or name in available:
            run.append(name)
        elif name not in _dispatch.PROVIDERS[op]:
            if not silent:
                skipped[name] = f"{op} has no {name} backend"
        else:
            try:
                resolve(_dispatch.PROVIDERS[op][name])
                why = "not available on this device"
                if name == "triton" and device.type != "cuda":
                    why += " (Triton on the CPU needs TRITON_INTERPRET=1)"
            except Exception as exc:
                why = f"cannot be loaded: {type(exc).__name__}: {exc}"
            skipped[name] = why
    return run, skipped


def _float_outputs(out) -> List[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Largest |got - want| over the outputs, relative to the largest |want| (float64)."""
    worst = 0.0
    for g, w in zip(got, want):
        g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
        if g64.shape != w64.shape:
            return float("inf")
        if not bool(torch.isfinite(g64).all()):
            return float("nan")
        scale = max(float(w64.abs().max()) if w64.numel() else 0.0, 1e-30)
        worst = max(worst, float((g64 - w64).abs().max()) / scale if w64.numel() else 0.0)
    return worst


def _row(shape, op, direction, backend, dtype_name, timing, nbytes, flops, ceilings) -> dict:
    ms = timing.ms
    roof_ms, bound = ceil.roofline_ms(nbytes, flops, ceilings, dtype_name)
    row = dict(shape=shape.name, op=op, short=counts.SHORT[op], direction=direction,
               backend=backend, dtype=dtype_name, **timing.as_dict(), bytes=int(nbytes),
               flops=int(flops), GBps=nbytes / (ms * 1e-3) / 1e9, TFLOPs=flops / (ms * 1e-3) / 1e12,
               intensity=flops / nbytes, roofline_ms=roof_ms, roofline_frac=roof_ms / ms, bound=bound,
               rate=ceil.rate_key(dtype_name, ceilings),
               # faster than its roofline: a ceiling or the work count does not hold for this row
               above_ceiling=roof_ms > ms)
    return row


def profile_op(op: str, shape: counts.ProfileShape, dtype_name: str, device: torch.device,
               backends: List[str], timer: Timer, ceilings: dict, *, kmeans_iters: int,
               check: bool, seed: int, on_done: Callable[[], None] = lambda: None):
    """Rows for ``op`` at ``shape`` on each backend (forward, and backward where it has one),
    {backend: why it failed}, and {backend: one-line summaries of what torch logged meanwhile}
    (graph breaks of torch.compile and the like: kept out of the table's way)."""
    dtype = DTYPES[dtype_name]
    case = build_case(op, shape, dtype, device, torch.Generator().manual_seed(seed),
                      kmeans_iters=kmeans_iters)
    directions = ["fwd", "bwd"] if case.grad_inputs else ["fwd"]
    work = {d: counts.work(op, d, shape, dtype, kmeans_iters=kmeans_iters) for d in directions}
    rows, failed, reference, logged = [], {}, {}, {}
    for backend in backends:
        records = []
        try:
            with torch_logs.captured(records):
                fn = provider(op, backend)
                fwd = lambda: fn(*case.args, **case.kwargs)  # noqa: E731
                # correctness against the torch backend (first in the list), on fresh copies for in-place ops
                if check and op != "kmeans":
                    args = case.fresh_args() if case.fresh_args else case.args
                    out = fn(*args, **case.kwargs)
                    got = _float_outputs(out)
                    if case.grad_inputs:
                        outs, grads = case.grad_outputs(out)
                        got_g = list(torch.autograd.grad(outs, case.grad_inputs, grads))
                    if backend == "torch":
                        reference["fwd"], reference["bwd"] = got, (got_g if case.grad_inputs else None)
                timing = timer.time(fwd)
                row = _row(shape, op, "fwd", backend, dtype_name, timing, *work["fwd"], ceilings)
                if check and "fwd" in reference and op != "kmeans":
                    row["rel_err_vs_torch"] = rel_err(got, reference["fwd"])
                rows.append(row)
                on_done()
                if "bwd" in directions:
                    # a fresh forward graph before every timed backward (outside the timed region):
                    # compiled backward graphs donate their buffers and cannot run twice on one graph
                    timing = timer.time(lambda pair: torch.autograd.grad(pair[0], case.grad_inputs, pair[1]),
                                        setup=lambda: case.grad_outputs(fwd()))
                    row = _row(shape, op, "bwd", backend, dtype_name, timing, *work["bwd"], ceilings)
                    if check and reference.get("bwd") is not None:
                        row["rel_err_vs_torch"] = rel_err(got_g, reference["bwd"])
                    rows.append(row)
                    on_done()
        except Exception as exc:  # one broken backend must not hide the others' numbers
            failed[backend] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if records:
            logged[backend] = torch_logs.summary(records)
    torch_ms = {r["direction"]: r["ms"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        if r["direction"] in torch_ms:
            r["speedup_vs_torch"] = torch_ms[r["direction"]] / r["ms"]
    return rows, failed, logged


def run(shapes: Sequence[counts.ProfileShape], *, dtype_name: str = "fp32",
        device: torch.device, backends: Optional[Sequence[str]] = None,
        ops: Optional[Sequence[str]] = None, timer: Optional[Timer] = None,
        ceiling_kwargs: Optional[dict] = None, kmeans_iters: int = 10, check: bool = True,
        seed: int = 0, progress: Optional[bool] = None) -> dict:
    """Measure the ceilings, then profile ``ops`` (default: all) at each shape.

    Returns the profile document: environment, ceilings, shapes, rows, skipped and failed backends.
    """
    from tqdm.auto import tqdm
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    device = torch.device(device)
    op_names = list(dict.fromkeys(op for op, _ in counts.OPS))
    if ops is not None:
        by_short = {short: op for op, short in counts.SHORT.items()}
        ops = [by_short.get(o, o) for o in ops]           # map, nce, attention, ema accepted too
        unknown = [o for o in ops if o not in op_names]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; choose from {op_names}")
        op_names = [o for o in op_names if o in ops]
    timer = timer or Timer(device)
    # the ceilings are probed on the ops' own products and traffic too, so that they bound them
    gemms = [g for shape in shapes for g in counts.gemm_shapes(shape)]
    traffic = [counts.work(op, d, shape, DTYPES[dtype_name], kmeans_iters=kmeans_iters)[0] // 2
               for shape in shapes for op, d in counts.OPS if op in op_names]
    probes: List[dict] = []
    with torch_logs.captured([]):
        ceilings = ceil.measure(device, dtypes=(dtype_name,), gemms=gemms, copy_sizes=traffic,
                                probes=probes, **(ceiling_kwargs or {}))
    plan = []
    for shape in shapes:
        for op in op_names:
            chosen, skipped = select_backends(op, device, backends)
            plan.append((shape, op, chosen, skipped))
    total = sum(len(chosen) * sum(1 for o, _ in counts.OPS if o == op) for _, op, chosen, _ in plan)
    bar = tqdm(total=total, desc="rca_fast.profile ops", unit="row",
               disable=(not progress) if progress is not None else None)
    rows, skipped_all, failed_all, notes = [], [], [], []
    for shape, op, chosen, skipped in plan:
        bar.set_postfix_str(f"{shape.name} {counts.SHORT[op]}")
        got, failed, logged = profile_op(op, shape, dtype_name, device, chosen, timer, ceilings,
                                 kmeans_iters=kmeans_iters, check=check, seed=seed,
                                 on_done=lambda: bar.update(1))
        rows += got
        skipped_all += [dict(shape=shape.name, op=op, backend=b, reason=r) for b, r in skipped.items()]
        failed_all += [dict(shape=shape.name, op=op, backend=b, error=e) for b, e in failed.items()]
        notes += [dict(shape=shape.name, op=op, backend=b, note=line)
                  for b, lines in logged.items() for line in lines]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return {"mode": "ops", **environment(device), "dtype": dtype_name, "kmeans_iters": kmeans_iters,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "ceilings": ceilings, "ceiling_probes": probes, "shapes": [s.as_dict() for s in shapes],
            "work_formulas": {f"{op}.{d}": counts.formula_doc(op, d) for op, d in counts.OPS},
            "rows": rows, "skipped": skipped_all, "failed": failed_all, "torch_notes": notes}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


ABOVE = "above!"
ABOVE_NOTE = (f"{ABOVE} = measured faster than its roofline (ms < roof ms): a ceiling or the work count "
              f"does not hold for that row, so its %roof is no result "
              f"(profile.json: \"above_ceiling\": true)")


def _best_probe(doc: dict, key: str) -> str:
    """' (product 1x2116x512x200, 2 threads)': which probe set the ceiling ``key``."""
    best = next((p for p in doc.get("ceiling_probes", []) if p["key"] == key and p.get("best")), None)
    if best is None:
        return ""
    what = (f"{best['bytes'] / 2 ** 20:.3g} MiB" if "bytes" in best
            else "product " + "x".join(str(v) for v in best["gemm"]))
    return f" ({what}, {best['threads']} thread{'s' if best['threads'] != 1 else ''})"


def _roof_pct(row: dict) -> str:
    return ABOVE if row.get("above_ceiling") else _fmt(100 * row["roofline_frac"], ".1f")


def table(doc: dict) -> str:
    """The rows as a fixed-width text table (columns explained by ``--help``)."""
    head = ["shape", "op", "dir", "backend", "ms", "p20-p80", "MB", "GFLOP", "GB/s", "TFLOP/s",
            "FLOP/B", "roof ms", "%roof", "bound", "xtorch", "err"]
    lines = [head]
    for r in doc["rows"]:
        lines.append([r["shape"], r["short"], r["direction"], r["backend"], _fmt(r["ms"], ".4g"),
                      f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}", _fmt(r["bytes"] / 1e6, ".4g"),
                      _fmt(r["flops"] / 1e9, ".4g"), _fmt(r["GBps"], ".4g"), _fmt(r["TFLOPs"], ".3g"),
                      _fmt(r["intensity"], ".3g"), _fmt(r["roofline_ms"], ".3g"),
                      _roof_pct(r), r["bound"],
                      _fmt(r.get("speedup_vs_torch"), ".2f"), _fmt(r.get("rel_err_vs_torch"), ".1e")])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) if i >= 4 else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    out.insert(1, "-" * len(out[0]))
    c = doc["ceilings"]
    rates = ", ".join(f"{k.split('_')[0]} {c[k]:.3g} TFLOP/s{_best_probe(doc, k)}"
                      for k in ("bf16_TFLOPs", "tf32_TFLOPs", "fp32_TFLOPs") if k in c)
    out.insert(0, f"device: {doc['device']}  |  ceilings: copy {c['copy_GBps']:.4g} GB/s"
                  f"{_best_probe(doc, 'copy_GBps')}, {rates}  |  "
                  f"dtype {doc['dtype']}")
    for s in doc["skipped"]:
        out.append(f"skipped: {s['shape']} {s['op']} [{s['backend']}]: {s['reason']}")
    for f in doc["failed"]:
        out.append(f"FAILED:  {f['shape']} {f['op']} [{f['backend']}]: {f['error']}")
    if any(r.get("above_ceiling") for r in doc["rows"]):
        out.append(ABOVE_NOTE)
    for n in doc.get("torch_notes", []):
        out.append(f"note: {n['shape']} {counts.SHORT.get(n['op'], n['op'])} [{n['backend']}]: torch logged: "
                   f"{n['note']}")
    return "\n".join(out)
