"""Step mode: N training steps under torch.profiler, split into the parts of a step.

The trainer builds everything (``rca_fast.utils.train_args.parse_args`` and
``rca_fast.train.Trainer``: data, model, optimiser) and runs each step (``Trainer.train_step``);
this module only labels what runs:

* forward: ``record_function`` ranges opened and closed by forward hooks on the model's parts
  (``backbone``, ``coarse_head``, ``final_head``, ``projector``, ``aggregation`` and the model
  itself), and around every public op (MAP, NCE, attention, EMA, k-means) by wrapping the
  provider ``rca_fast.ops._dispatch.implementation`` returns -- all removed afterwards;
* backward: every autograd node carries the sequence number of the forward op that made it, so
  a backward kernel is charged to the part whose forward made its node (no hooks, no syncs);
* data loading (``next`` on the trainer's loader and the copy to the device), the bank update
  (``model.update_bank``), the k-means refresh (once, amortised over the steps of an epoch) and
  the optimiser (torch's own ``Optimizer.step`` ranges).

On a GPU a part's time is the device time of the kernels it launched; data loading is host
time; "idle" is the rest of the step's wall time (launch gaps, host work, syncs).  On the CPU a
part's time is the host time of its ops, and "untracked" is Python time between ops.
"""
from __future__ import annotations

import os
import random
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch.autograd.profiler import record_function

from .jsonout import write_json
from .timing import Timer, environment

PREFIX = "rca::"
MODEL_PARTS = {"backbone": "backbone", "coarse_head": "CAM heads", "final_head": "CAM heads",
               "projector": "RCA head: projector", "aggregation": "RCA head: aggregation layers"}
OP_PARTS = {"masked_average_pool": "RCA head: MAP", "bank_nce_loss": "RCA head: NCE",
            "prototype_attention": "RCA head: attention", "ema_update_": "bank update",
            "kmeans": "k-means refresh"}
RANGE_PARTS = {"data": "data loading", "model": "RCA head: regions, mixup (model glue)",
               "update_bank": "bank update", "kmeans": "k-means refresh"}
LOSS_AND_OTHER = "loss and other"
# parts with a forward and a backward row, in print order
DIFFERENTIABLE = ["backbone", "CAM heads", "RCA head: projector", "RCA head: MAP", "RCA head: NCE",
                  "RCA head: attention", "RCA head: aggregation layers",
                  "RCA head: regions, mixup (model glue)", LOSS_AND_OTHER]
ORDER = (["data loading"] + [f"{p} {d}" for p in DIFFERENTIABLE for d in ("fwd", "bwd")]
         + ["bank update", "optimiser"])
ENGINE = "autograd::engine::evaluate_function"
STEP, DATA, KMEANS = PREFIX + "step", PREFIX + "data", PREFIX + "kmeans"


def part_of_range(name: str) -> Optional[str]:
    """The part a profiler range belongs to (None: not one of ours)."""
    if name.startswith("Optimizer."):
        return "optimiser"
    if not name.startswith(PREFIX):
        return None
    key = name[len(PREFIX):]
    if key.startswith("op::"):
        return OP_PARTS.get(key[4:])
    if key.startswith("module::"):
        return MODEL_PARTS.get(key[8:])
    return RANGE_PARTS.get(key)


class Labels:
    """Installs the ranges (module hooks, op wrappers, instance wrappers); ``remove()`` undoes all."""

    def __init__(self, model: torch.nn.Module):
        from rca_fast.ops import _dispatch
        self._dispatch = _dispatch
        self._original_impl = _dispatch.implementation
        self._model = model
        self._handles = []
        self._open: Dict[int, list] = {}
        for name in MODEL_PARTS:
            module = getattr(model, name, None)
            if isinstance(module, torch.nn.Module):
                self._hook(module, f"{PREFIX}module::{name}")
        self._hook(model, f"{PREFIX}model")
        original = self._original_impl

        def implementation(op, device, dtypes=None):
            fn = original(op, device, dtypes)

            def labelled(*args, **kwargs):
                with record_function(f"{PREFIX}op::{op}"):
                    return fn(*args, **kwargs)
            return labelled
        _dispatch.implementation = implementation
        for method, label in (("update_bank", "update_bank"), ("refresh_prototypes", "kmeans")):
            bound = getattr(model, method)

            def wrapped(*args, _bound=bound, _label=label, **kwargs):
                with record_function(f"{PREFIX}{_label}"):
                    return _bound(*args, **kwargs)
            setattr(model, method, wrapped)   # an instance attribute: the class is untouched

    def _hook(self, module: torch.nn.Module, label: str) -> None:
        def pre(mod, inputs):
            rf = record_function(label)
            rf.__enter__()
            self._open.setdefault(id(mod), []).append(rf)

        def post(mod, inputs, output):
            stack = self._open.get(id(mod))
            if stack:
                stack.pop().__exit__(None, None, None)
        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._dispatch.implementation = self._original_impl
        for method in ("update_bank", "refresh_prototypes"):
            self._model.__dict__.pop(method, None)


def _innermost_part(event) -> Optional[str]:
    e = event
    while e is not None:
        part = part_of_range(e.name)
        if part is not None:
            return part
        e = e.cpu_parent
    return None


def _engine_ancestor(event):
    e = event
    while e is not None:
        if e.name.startswith(ENGINE):
            return e
        e = e.cpu_parent
    return None


def _is_cpu(event) -> bool:
    return str(getattr(event, "device_type", "CPU")).endswith("CPU")


def split_events(events, on_gpu: bool) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Microseconds per key of :data:`ORDER` over ``events`` (kernel time on a GPU, host self time
    on the CPU), and per key the microseconds of each op name charged to it.

    A forward event goes to the innermost of our ranges around it ("loss and other" when none);
    an event under an autograd node goes to the part whose forward made the node (the forward op
    with the node's sequence number on the forward thread).  Our own step, data and
    k-means ranges are left out: their time is measured as wall time."""
    cpu_events = [e for e in events if _is_cpu(e)]
    forward_part: Dict[tuple, str] = {}
    for e in sorted(cpu_events, key=lambda ev: ev.time_range.start):
        # several forward ops can see one sequence number; the node's maker is the last of them
        if e.sequence_nr is not None and e.sequence_nr >= 0 and _engine_ancestor(e) is None:
            forward_part[(e.thread, e.sequence_nr)] = _innermost_part(e) or LOSS_AND_OTHER
    totals: Dict[str, float] = {}
    by_op: Dict[str, Dict[str, float]] = {}
    for e in cpu_events:
        if e.name in (STEP, DATA, KMEANS):
            continue
        us = float(sum(k.duration for k in e.kernels)) if on_gpu else float(e.self_cpu_time_total)
        if us <= 0:
            continue
        node = _engine_ancestor(e)
        if node is None:
            part = _innermost_part(e) or LOSS_AND_OTHER
            key = f"{part} fwd" if part in DIFFERENTIABLE else part
        else:
            part = forward_part.get((node.fwd_thread, node.sequence_nr))
            key = f"{part} bwd" if part in DIFFERENTIABLE else f"{LOSS_AND_OTHER} bwd"
        if key in ("data loading", "k-means refresh"):
            continue
        totals[key] = totals.get(key, 0.0) + us
        ops = by_op.setdefault(key, {})
        ops[e.name] = ops.get(e.name, 0.0) + us
    return totals, by_op


def _range_us(events, name: str) -> List[float]:
    """Wall time (host) of every occurrence of our range ``name``."""
    return [float(e.cpu_time_total) for e in events if e.name == name and _is_cpu(e)]


def _batches(trainer, epoch: int):
    """The trainer's batches of ``epoch``, then of the next epochs, without end."""
    while True:
        for batch in trainer.batches(epoch):
            yield batch
        epoch += 1


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_public(trainer, batch: dict, timer: Timer) -> Optional[dict]:
    """Time the region contrast + bank update of rca_fast and of the public code's per-region
    loops (``rca_fast.ref.public_head``) on the same inputs (this model's features, projector
    features, coarse CAMs, labels and bank, captured from one forward pass); None with the
    contrast off."""
    import copy

    from rca_fast.model.rca import region_contrast
    from rca_fast.ref import public_head as public
    model, device = trainer.model, trainer.device
    captured = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda mod, inp, out, _n=name: captured.__setitem__(_n, out.detach()))
        for name in ("backbone", "projector", "coarse_head")]
    try:
        with torch.no_grad():
            batch = _to_device(batch, device)
            model(batch["image"], batch["label"].float())
    finally:
        for h in handles:
            h.remove()
    if "projector" not in captured:  # contrast off: no region contrast to compare
        return None
    features, cams = captured["backbone"], captured["coarse_head"]
    logits = cams.mean(dim=(2, 3))
    labels = batch["label"].float()
    query = captured["projector"].clone().requires_grad_(True)
    memory = copy.deepcopy(model.bank)
    gen = torch.Generator().manual_seed(0)

    def ours():
        query.grad = None
        rc = region_contrast(features, query, cams, logits, labels.bool(), memory.bank,
                             temperature=model.temperature, mixup=model.mixup,
                             mixup_alpha=model.mixup_alpha, generator=gen)
        rc.loss.backward()
        memory.update(rc.emb, rc.target, rc.score)

    bank, ptr, rng = model.bank.bank.detach().clone(), [0] * model.num_classes, random.Random(0)

    def loops():
        query.grad = None
        loss, rows = public.public_rca_head(features, query, cams, logits, labels, bank,
                                            temperature=model.temperature, alpha=model.mixup_alpha,
                                            rng=rng)
        loss.backward()
        public.public_bank_update(bank, ptr, rows, gamma=model.bank.gamma,
                                  threshold=model.bank.score_threshold)

    t_ours, t_public = timer.time(ours), timer.time(loops)
    return {"rca_fast_ms": t_ours.ms, "public_ms": t_public.ms, "rca_fast_timing": t_ours.as_dict(),
            "public_timing": t_public.as_dict(), "inputs": {
                "B": int(labels.shape[0]), "L": int(labels.shape[1]), "D": int(features.shape[1]),
                "HW": list(features.shape[2:]), "S": int(model.bank.slots),
                "regions": int(labels.sum())}, "source": public.__name__}


def _train_argv(rest: List[str], out: str) -> List[str]:
    """The trainer's flags; its output folder goes under the profile's unless given."""
    argv = list(rest)
    if not any(a == "--snapshot_dir" or a.startswith("--snapshot_dir=") for a in argv):
        argv += ["--snapshot_dir", os.path.join(out, "train")]
    return argv


def run(args, rest: List[str]) -> dict:
    """Build the trainer from ``rest`` (trainer flags), profile ``args.steps`` steps; the document."""
    from torch.profiler import ProfilerActivity, profile
    from tqdm.auto import tqdm

    from rca_fast.train import Trainer
    from rca_fast.utils.train_args import parse_args
    if args.steps < 1 or args.warmup_steps < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup-steps >= 0, "
                         f"got {args.steps}, {args.warmup_steps}")
    out = args.profile_out
    targs = parse_args(_train_argv(rest, out))
    trainer = Trainer(targs)
    model, device = trainer.model, trainer.device
    on_gpu = device.type == "cuda"
    # the contrast term joins at --contrast-start-epoch (2): profile the steady state, with it
    epoch = max(2, targs.contrast_start_epoch)
    trainer.set_lr(epoch)
    model.train()
    batches = _batches(trainer, epoch)
    bar = tqdm(total=args.warmup_steps + args.steps + 1, desc="rca_fast.profile step", unit="step",
               disable={"auto": None, "on": False, "off": True}[args.progress])
    for _ in range(args.warmup_steps):  # cudnn autotuning, Triton compilation, allocator growth
        trainer.train_step(_to_device(next(batches), device), epoch)
        bar.update(1)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    labels = Labels(model)
    try:
        with profile(activities=activities) as prof:
            model.refresh_prototypes(seed=targs.seed * 1000 + epoch)   # labelled rca::kmeans
            _sync(device)
            bar.update(1)
            for _ in range(args.steps):
                with record_function(STEP):
                    with record_function(DATA):
                        batch = _to_device(next(batches), device)
                        _sync(device)
                    trainer.train_step(batch, epoch)
                    _sync(device)
                bar.update(1)
    finally:
        labels.remove()
        bar.close()
    events = prof.events()
    steps = args.steps
    step_us = _range_us(events, STEP)
    wall_ms = sum(step_us) / 1e3 / steps
    data_ms = sum(_range_us(events, DATA)) / 1e3 / steps
    kmeans_ms = sum(_range_us(events, KMEANS)) / 1e3
    per_epoch = trainer.steps_per_epoch()
    totals, by_op = split_events(events, on_gpu)
    split = [{"part": "data loading", "ms": data_ms, "kind": "part"}]
    split += [{"part": key, "ms": totals.get(key, 0.0) / 1e3 / steps, "kind": "part"} for key in ORDER[1:]]
    split += [{"part": key, "ms": us / 1e3 / steps, "kind": "part"}
              for key, us in sorted(totals.items()) if key not in ORDER]
    tracked = sum(r["ms"] for r in split)
    split.append({"part": "idle (launch gaps, host work)" if on_gpu else "untracked (Python between ops)",
                  "ms": max(wall_ms - tracked, 0.0), "kind": "part"})
    split.append({"part": f"k-means refresh (1 per {per_epoch} steps)", "ms": kmeans_ms / per_epoch,
                  "kind": "part", "once_ms": kmeans_ms})
    step_ms = wall_ms + kmeans_ms / per_epoch
    for r in split:
        r["share"] = r["ms"] / step_ms if step_ms > 0 else float("nan")
        top = sorted(by_op.get(r["part"], {}).items(), key=lambda kv: -kv[1])[:5]
        if top:  # the heaviest ops of the part, ms per step: where to look next
            r["top_ops"] = {name: us / 1e3 / steps for name, us in top}
    split.append({"part": "step (amortised k-means included)", "ms": step_ms, "share": 1.0, "kind": "total"})
    doc = {"mode": "step", **environment(device), "steps": steps, "warmup_steps": args.warmup_steps,
           "epoch": epoch, "steps_per_epoch": per_epoch, "time_base": "device" if on_gpu else "host",
           "trainer_args": {k: v for k, v in vars(targs).items()
                            if isinstance(v, (int, float, str, bool, type(None)))},
           "step_wall_ms": wall_ms, "kmeans_refresh_ms": kmeans_ms, "split": split, "public": None}
    if not args.no_public:
        timer = Timer(device, warmup=1, min_reps=3, max_reps=20, budget_ms=2000)
        cmp = compare_public(trainer, next(batches), timer)
        if cmp is not None:
            est = step_ms - cmp["rca_fast_ms"] + cmp["public_ms"]
            cmp["step_with_public_ms"] = est
            cmp["step_speedup"] = est / step_ms
            doc["public"] = cmp
            split.append({"part": "region contrast + bank update, rca_fast (same inputs, apart)",
                          "ms": cmp["rca_fast_ms"], "share": cmp["rca_fast_ms"] / step_ms, "kind": "compare"})
            split.append({"part": "region contrast + bank update, public loops (same inputs)",
                          "ms": cmp["public_ms"], "share": cmp["public_ms"] / step_ms, "kind": "compare"})
            split.append({"part": "step with the public loops (estimated)", "ms": est,
                          "share": est / step_ms, "kind": "compare"})
    os.makedirs(out, exist_ok=True)
    doc["files"] = {"json": os.path.join(out, "step.json")}
    if not args.no_trace:
        doc["files"]["trace"] = os.path.join(out, "trace.json")
        prof.export_chrome_trace(doc["files"]["trace"])
    return doc


def table(doc: dict) -> str:
    """The split as text: part, ms per step, share of the step."""
    width = max(len(r["part"]) for r in doc["split"])
    base = "device time of each part's kernels" if doc["time_base"] == "device" else "host time"
    lines = [f"device: {doc['device']}  |  {doc['steps']} profiled steps (epoch {doc['epoch']}), {base}",
             f"{'part'.ljust(width)}  {'ms':>9}  {'share':>7}", "-" * (width + 20)]
    for r in doc["split"]:
        if r["kind"] == "total" or (r["kind"] == "compare" and "rca_fast" in r["part"]):
            lines.append("-" * (width + 20))
        if r["kind"] == "part" and r["ms"] == 0.0:
            continue
        share = r.get("share")
        share_text = "" if share is None or share != share else f"{100 * share:6.1f}%"
        lines.append(f"{r['part'].ljust(width)}  {r['ms']:9.3f}  {share_text:>7}")
    if doc.get("public"):
        p = doc["public"]
        lines.append(f"public loops / rca_fast on the region contrast + bank update: "
                     f"{p['public_ms'] / p['rca_fast_ms']:.1f}x; whole step: {p['step_speedup']:.2f}x "
                     f"({p['inputs']['regions']} regions, B{p['inputs']['B']}-L{p['inputs']['L']}-"
                     f"S{p['inputs']['S']}-D{p['inputs']['D']})")
    return "\n".join(lines)


def main(args, rest: List[str]) -> dict:
    """``python -m rca_fast.profile step``: profile, print the split, write step.json (+ trace, png)."""
    from . import plots
    doc = run(args, rest)
    if not args.no_plot and not plots.available():
        print("matplotlib is not installed: no step.png (pip install matplotlib)", file=sys.stderr)
    elif not args.no_plot:
        doc["files"]["plot"] = plots.step_bars(
            [r for r in doc["split"] if r["kind"] != "part" or r["ms"] > 0],
            os.path.join(args.profile_out, "step.png"),
            title=f"rca_fast training step ({doc['time_base']} time)\n{doc['device']}")
    write_json(doc["files"]["json"], doc)
    print(table(doc))
    print(f"wrote {', '.join(doc['files'].values())}")
    return doc
