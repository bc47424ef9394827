"""Method check on the synthetic data (issue 12): does RCA beat its CAM-only baseline, from scratch
and with a pretrained backbone?  Paired seeds, both heads.

Regimes: ``scratch`` (the tiny backbone from He-normal init) and ``pretrained`` (the tiny backbone
from ``python -m rca_fast.pretrain``: multi-label classification on separate synthetic scenes,
data seed 1000, run once by this script when its file is missing).  Variants, each trained with
the same seeds (so the runs are paired by seed: same data, same order, same initial weights of
the shared layers):

    baseline         --no-contrast --no-aggregation
    public RCA       --recipe public       (what the public code computes; since issue 19 with its
                                           input pipeline, linear aggregation, k-means max_iter 300
                                           and projector bias: method_check_faithful.md, run with
                                           --variants baseline "public RCA" "improved RCA")
    improved RCA     --recipe improved     (the committed method_check.md ran the first improved
                                           recipe, before --aggregation-zero-start joined it; the
                                           current recipe's runs: method_check_zero_start.md, and
                                           with the public input pipeline method_check_faithful.md)
    contrast only    --no-aggregation      (public recipe)
    aggregation only --no-contrast         (public recipe)

Every run reports the CAM mIoU of the final head O (as ``rca_fast.train`` evaluates it: flip,
best background threshold) and of the coarse head P (same procedure).  Per regime and variant the
script writes mean +- std and the paired difference to the baseline of the same seed (mean,
standard error = std / sqrt(n), seeds better), to ``benchmarks/results/method_check[_TAG].{md,json,png}``,
rewritten after every finished run (a partial check keeps what it has).

    nice -n 5 python benchmarks/method_check.py                     # 8 seeds x 2 regimes x 5 variants
    python benchmarks/method_check.py --seeds 0 1 --regimes scratch -- --epoch 10   # a pilot

Arguments after ``--`` go to every training run, after the check's budget flags (``BUDGET``:
shortened so that the 80 runs fit in about 45 minutes on a shared 2-core CPU).  Every run is its
own process with 1 torch thread (``--threads``: a run is not reproducible across thread counts);
``--jobs`` runs go side by side.  Finished runs (``result.json`` in their folder under ``--work``)
are read back, not retrained.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from harness import RESULTS, device_name, git_commit  # noqa: E402

# A long check can run from a frozen copy of a commit (``git archive``; the shared working tree may
# change under it): RCA_FAST_COMMIT names that commit, --results points back at the repository's folder.
COMMIT = os.environ.get("RCA_FAST_COMMIT") or git_commit()

VARIANTS = {
    "baseline": ["--no-contrast", "--no-aggregation"],
    "public RCA": ["--recipe", "public"],
    "improved RCA": ["--recipe", "improved"],
    "contrast only": ["--no-aggregation"],
    "aggregation only": ["--no-contrast"],
}
REGIMES = ("scratch", "pretrained")
# The check's budget (the trainer's synthetic default is 96 px, 640 images, 15 epochs = 600 steps,
# ~140 s per run on an idle core): 64 px, 320 images, 8 epochs of 20 steps = 160 steps, lr
# x0.1 after epoch 6, 96 evaluation images.  Shortened so that 80 runs fit in ~45 minutes on the
# shared 2-core CPU; the absolute mIoUs are lower than the default budget's.
BUDGET = ["--input_size", "64", "--crop_size", "64", "--num-images", "320", "--val-images", "96",
          "--epoch", "8", "--decay_points", "6"]
PRETRAIN = ["--num-images", "1280", "--epochs", "12", "--image-size", "96", "--data-seed", "1000"]


def slug(text: str) -> str:
    return text.replace(" ", "_")


# ----------------------------------------------------------------------------- one run (child process)

def coarse_head_miou(trainer) -> float:
    """CAM mIoU of the coarse head P, evaluated exactly as Trainer.evaluate does the final head."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from rca_fast.data.collate import collate
    from rca_fast.utils.cams import multiscale_cams, normalise_cams, parse_scales
    from rca_fast.utils.metrics import CamSweepMeter

    model = trainer.model.eval()

    def coarse(images):
        out = model(images)
        return SimpleNamespace(cams=out.coarse_cams, logits=out.coarse_logits)

    meter = CamSweepMeter(trainer.args.num_classes + 1)
    loader = DataLoader(trainer.eval_set, batch_size=32, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            cams, _ = multiscale_cams(coarse, batch["image"], scales=parse_scales(trainer.args.eval_scales),
                                      flip=True, out_size=tuple(batch["mask"].shape[-2:]))
            cams = normalise_cams(cams, batch["label"]).numpy()
            for i in range(cams.shape[0]):
                keys = np.flatnonzero(batch["label"][i].numpy() > 0)
                meter.update(cams[i, keys], keys, batch["mask"][i].numpy())
    return float(meter.result()["miou"])


def run_one(regime: str, variant: str, seed: int, out: str, pretrained: str, extra) -> dict:
    """Train one (regime, variant, seed) in this process; write and return ``out/result.json``."""
    import torch

    from rca_fast.train import Trainer
    from rca_fast.utils.train_args import parse_args

    argv = VARIANTS[variant] + BUDGET + ["--seed", str(seed), "--out", out, "--no-progress", "--threads", "1"]
    argv += (["--pretrained", pretrained] if regime == "pretrained" else []) + list(extra)
    trainer = Trainer(parse_args(argv))
    metrics = trainer.fit()
    torch.set_num_threads(1)
    row = {"regime": regime, "variant": variant, "seed": seed, "final_miou": metrics["cam_miou"],
           "coarse_miou": coarse_head_miou(trainer), "best_threshold": metrics.get("cam_best_threshold"),
           "steps": metrics["steps"], "seconds": metrics["seconds"], "argv": argv,
           "bank_rows": sum(h["bank_rows"] for h in metrics["history"])}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row


# ----------------------------------------------------------------------------- statistics and output

def mean_std(values):
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan"))


def paired(rows, regime: str, variant: str, key: str):
    """Paired difference variant - baseline over the seeds both have: (mean, standard error, better, n)."""
    base = {r["seed"]: r[key] for r in rows if r["regime"] == regime and r["variant"] == "baseline"}
    diffs = [r[key] - base[r["seed"]] for r in rows
             if r["regime"] == regime and r["variant"] == variant and r["seed"] in base]
    if not diffs:
        return None
    m, s = mean_std(diffs)
    return {"mean": m, "se": s / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan"),
            "better": sum(d > 0 for d in diffs), "n": len(diffs)}


def summarise(rows):
    summary = {}
    for regime in REGIMES:
        for variant in VARIANTS:
            sel = [r for r in rows if r["regime"] == regime and r["variant"] == variant]
            if not sel:
                continue
            entry = {"n": len(sel)}
            for key in ("final_miou", "coarse_miou"):
                m, s = mean_std([r[key] for r in sel])
                entry[key] = {"mean": m, "std": s}
                if variant != "baseline":
                    entry[key]["paired"] = paired(rows, regime, variant, key)
            summary.setdefault(regime, {})[variant] = entry
    return summary


def pct(x):
    return "n/a" if x is None or x != x else f"{100 * x:.2f}"


def diff_text(p):
    if not p:
        return ""
    se = "" if p["se"] != p["se"] else f" +- {100 * p['se']:.2f}"
    z = "" if not p["se"] or p["se"] != p["se"] else f" ({p['mean'] / p['se']:+.1f} SE)"
    return f"{100 * p['mean']:+.2f}{se}{z}, {p['better']}/{p['n']} better"


def write_results(rows, args, extra, started: float, pretrain_info) -> dict:
    import torch

    summary = summarise(rows)
    name = "method_check" + (f"_{args.tag}" if args.tag else "")
    os.makedirs(args.results, exist_ok=True)
    lines = [f"# Method check on synthetic data{' (' + args.tag + ')' if args.tag else ''}", "",
             f"Seeds {args.seeds}; {len(rows)} runs done of {args.planned}; 1 torch thread per run, "
             f"{args.jobs} "
             f"runs side by side; device {device_name(torch.device('cpu'))}; commit {COMMIT}; "
             f"{(time.time() - started) / 60:.0f} min.", "",
             f"Budget (shortened to fit 80 runs in ~45 min on a shared 2-core CPU): `{' '.join(BUDGET)}`"
             + (f", plus `{' '.join(extra)}`" if extra else "") + ". Pretrained regime: the tiny backbone "
                                                                  "from "
             f"`python -m rca_fast.pretrain {' '.join(PRETRAIN)}` (other data seeds than the runs')"
             + (f", {pretrain_info}" if pretrain_info else "") + ".", "",
             "CAM mIoU (%) of the final head O and of the coarse head P; paired = the variant minus the "
             "baseline of the same seed: mean +- standard error (mean / SE), seeds better.", ""]
    for regime, per in summary.items():
        lines += [f"## {regime}", "", "| variant | runs | final O: mean +- std | paired vs baseline | "
                  "coarse P: mean +- std | paired vs baseline |", "|---|---|---|---|---|---|"]
        for variant, e in per.items():
            f, c = e["final_miou"], e["coarse_miou"]
            lines.append(f"| {variant} | {e['n']} | {pct(f['mean'])} +- {pct(f['std'])} | "
                         f"{diff_text(f.get('paired'))} | "
                         f"{pct(c['mean'])} +- {pct(c['std'])} | {diff_text(c.get('paired'))} |")
        lines.append("")
    lines += ["Per run:", "",
              "| regime | variant | seed | final O (%) | coarse P (%) | threshold | bank rows | "
              "steps | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["regime"], list(VARIANTS).index(r["variant"]), r["seed"])):
        lines.append(f"| {r['regime']} | {r['variant']} | {r['seed']} | {pct(r['final_miou'])} | "
                     f"{pct(r['coarse_miou'])} | {r['best_threshold']} | {r['bank_rows']} | {r['steps']} | "
                     f"{r['seconds']:.0f} |")
    with open(os.path.join(args.results, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    payload = {"name": name, "budget_flags": BUDGET, "extra_flags": list(extra), "pretrain_flags": PRETRAIN,
               "seeds": args.seeds, "variants": VARIANTS, "summary": summary, "runs": rows,
               "threads_per_run": 1,
               "jobs": args.jobs, "device": device_name(torch.device("cpu")), "torch": torch.__version__,
               "commit": COMMIT, "wall_seconds": round(time.time() - started, 1)}
    with open(os.path.join(args.results, name + ".json"), "w") as f:
        json.dump(payload, f, indent=1)
    plot(summary, os.path.join(args.results, name + ".png"), args.tag)
    return payload


def plot(summary, path: str, tag: str) -> None:
    """Paired difference to the baseline per variant (+- 2 SE), final and coarse head, one panel per
    regime."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    regimes = [r for r in REGIMES if r in summary]
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        names = [v for v in summary[regime] if v != "baseline"]
        for j, (key, color) in enumerate((("final_miou", "#c0392b"), ("coarse_miou", "#2e86c1"))):
            ps = [summary[regime][v][key].get("paired") or {} for v in names]
            means = [100 * p.get("mean", float("nan")) for p in ps]
            errs = [200 * p["se"] if p.get("se") == p.get("se") and p.get("se") is not None else 0
                    for p in ps]
            xs = [i + (j - 0.5) * 0.36 for i in range(len(names))]
            ax.bar(xs, means, width=0.36, yerr=errs, capsize=4, color=color, alpha=0.85,
                   label="final head O" if j == 0 else "coarse head P")
        base = summary[regime].get("baseline", {}).get("final_miou", {}).get("mean")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15)
        ax.set_ylabel("CAM mIoU minus baseline (points)")
        ax.set_title(f"{regime} (baseline final {pct(base)}%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("RCA method check, synthetic data" + (f" ({tag})" if tag else "") +
                 ": paired difference to the baseline, mean +- 2 SE over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver

def ensure_pretrained(path: str) -> str:
    if not os.path.isfile(path):
        print(f"[method check] pretraining the tiny backbone -> {path}", flush=True)
        subprocess.run([sys.executable, "-m", "rca_fast.pretrain", "--out", path, "--no-progress"] + PRETRAIN,
                       check=True, cwd=ROOT)
    with open(path + ".json") as f:
        last = json.load(f)["history"][-1]
    return (f"final pretraining loss {last['loss']:.3f}, exact-match accuracy {last['exact_match']:.2f} "
            f"on its images")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--variants", nargs="+", default=None, help=f"default: {list(VARIANTS)}")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (each its own process, 1 thread)")
    p.add_argument("--work", default=None, help="run folders (default: runs/method_check[_TAG])")
    p.add_argument("--pretrained", default=os.path.join("runs", "pretrained", "tiny.pt"),
                   help="weights of the pretrained regime (made by rca_fast.pretrain when missing)")
    p.add_argument("--define", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra variant, e.g. 'improved, no copy=--recipe improved --first-write ema' "
                        "(then name it in --variants)")
    p.add_argument("--results", default=RESULTS,
                   help="folder of the result files (default benchmarks/results)")
    p.add_argument("--one", nargs=3, metavar=("REGIME", "VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for definition in args.define:
        name, sep, flags = definition.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--define must be NAME=FLAGS, got {definition!r}")
        VARIANTS[name.strip()] = shlex.split(flags)
    args.variants = args.variants or [v for v in VARIANTS if not any(v == d.partition("=")[0].strip()
                                                                      for d in args.define)]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; known {list(VARIANTS)} (add one with --define)")
    work = args.work or os.path.join("runs", "method_check" + (f"_{args.tag}" if args.tag else ""))
    if args.one:
        regime, variant, seed = args.one[0], args.one[1].replace("_", " "), int(args.one[2])
        return run_one(regime, variant, seed, os.path.join(work, regime, slug(variant), f"seed{seed}"),
                       args.pretrained, extra)
    started = time.time()
    pretrain_info = ensure_pretrained(args.pretrained) if "pretrained" in args.regimes else ""
    # seeds outermost: a partial check already compares every variant of both regimes on the first seeds
    jobs = [(regime, variant,
             seed) for seed in args.seeds for regime in args.regimes for variant in args.variants]
    args.planned = len(jobs)
    rows = []

    def launch(job):
        regime, variant, seed = job
        done = os.path.join(work, regime, slug(variant), f"seed{seed}", "result.json")
        if not os.path.isfile(done):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", regime, slug(variant), str(seed),
                   "--work", work, "--pretrained", args.pretrained]
            cmd += [f"--define={d}" for d in args.define] + ["--"] + extra
            log = done[:-len("result.json")] + "run.log"
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
        with open(done) as f:
            return json.load(f)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(launch, job): job for job in jobs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except subprocess.CalledProcessError as exc:
                print(f"[method check] {futures[fut]} failed ({exc}); see its run.log", flush=True)
                continue
            rows.append(row)
            print(f"[method check] {row['regime']:10s} {row['variant']:16s} seed {row['seed']}: final "
                  f"{pct(row['final_miou'])}%, coarse {pct(row['coarse_miou'])}% ({row['seconds']:.0f}s; "
                  f"{len(rows)}/{len(jobs)} after {(time.time() - started) / 60:.1f} min)", flush=True)
            write_results(rows, args, extra, started, pretrain_info)
    return write_results(rows, args, extra, started, pretrain_info)


if __name__ == "__main__":
    main()
