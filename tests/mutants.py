"""Planted one-line bugs: does the suite catch them?  (Not a test module: pytest does not collect it.)

    nice -n 10 python tests/mutants.py                 # every mutant but csrc/ (~15 min on 2 busy cores)
    python tests/mutants.py --list                     # ids, files, tests
    python tests/mutants.py -k kmeans -k infer         # mutants whose id contains a word
    python tests/mutants.py --clean                    # first check each test selection passes unmutated
    python tests/mutants.py --rev HEAD                 # the last commit instead of the working tree
    python tests/mutants.py --recheck                  # a mutant its selection misses: rerun on all of tests/

Each mutant is (id, file, original snippet, replacement, tests).  The working tree (tracked and
untracked-but-not-ignored files, as they are now) is copied once to a scratch folder; there the
snippet, which must occur exactly once, is replaced, the mutant's tests run with the scratch
folder first on PYTHONPATH (its ``rca_fast`` and, through a ``rca_fast/kernels`` link, its
``kernels/`` are what gets imported, with the built extension ``rca_fast/_C*.so`` copied beside),
and the file is restored.  A mutant is *caught* when a test fails, *missed* when all pass,
*stale* when its snippet is no longer in the file (update the list), *error* on a timeout.
With ``--recheck`` a mutant its narrow selection misses runs again against the whole ``tests/``
folder: *caught-wide* when some other test fails (it is caught; widen its selection to that
test), *MISSED* only when the whole suite passes with the bug in.
Mutants of csrc/ (the extension's CPU twin) run only with ``--ext``: each rebuilds the extension
CPU-only in the scratch copy (about 2.5 minutes on 2 cores), then the original build is put back.

Run it after touching a tested behaviour (README, "Contributing"); add a mutant for every bug a
new test is there to catch.  Keep each mutant's test selection narrow: the whole list runs on a
2-core CPU.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, file, original, replacement, pytest arguments).  Originals are exact substrings (one line or
# part of one); the tests are node ids or "-k" selections, narrow enough to run in seconds.
MUTANTS = [
    # ---------------------------------------------------------------- CAM inference (utils/cams.py, infer.py)
    ("infer-no-unflip", "rca_fast/utils/cams.py",
     "cams = cams[:b] + cams[b:].flip(-1)", "cams = cams[:b] + cams[b:]",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop"]),
    ("infer-first-scale-only", "rca_fast/utils/cams.py",
     "total = cams if total is None else total + cams", "total = cams if total is None else total",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop"]),
    ("infer-no-relu", "rca_fast/utils/cams.py",
     "F.interpolate(F.relu(out.cams.float())", "F.interpolate((out.cams.float())",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop"]),
    ("infer-relu-after-upsample", "rca_fast/utils/cams.py",
     "cams = F.interpolate(F.relu(out.cams.float()), size=out_size, mode=\"bilinear\", align_corners=False)",
     "cams = F.relu(F.interpolate(out.cams.float(), size=out_size, mode=\"bilinear\", align_corners=False))",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop"]),
    ("infer-normalise-no-clamp", "rca_fast/utils/cams.py",
     "cams = cams.clamp_min(0) / (peak + eps)", "cams = cams / (peak + eps)",
     ["tests/test_infer_evaluate.py", "-k", "normalise_cams"]),
    ("infer-normalise-global-max", "rca_fast/utils/cams.py",
     "peak = cams.flatten(2).amax(dim=2).clamp_min(0)[..., None, None]",
     "peak = cams.flatten(1).amax(dim=1).clamp_min(0)[..., None, None, None]",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop or normalise_cams"]),
    ("infer-margin-doubled", "rca_fast/infer.py",
     "- args.bg_threshold) < args.ignore_margin] = 255",
     "- args.bg_threshold) < 2 * args.ignore_margin] = 255",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop"]),
    ("infer-margin-one-side", "rca_fast/infer.py",
     "label[np.abs(cams.max(axis=0) - args.bg_threshold) < args.ignore_margin] = 255",
     "label[(cams.max(axis=0) - args.bg_threshold < args.ignore_margin) & (cams.max(axis=0) > "
     "args.bg_threshold)]"
     " = 255",
     ["tests/test_infer_evaluate.py", "-k", "multiscale_flip_loop"]),
    ("label-ties-to-class", "rca_fast/utils/metrics.py",
     "return np.where(top > bg_threshold, keys[best] + 1, 0)",
     "return np.where(top >= bg_threshold, keys[best] + 1, 0)",
     ["tests/test_infer_evaluate.py", "-k", "cam_sweep"]),
    ("train-eval-no-flip", "rca_fast/train/evaluation.py",
     "cams, _ = multiscale_cams(self.model, images, scales=scales, flip=True, out_size=out_size)",
     "cams, _ = multiscale_cams(self.model, images, scales=scales, flip=False, out_size=out_size)",
     ["tests/test_train.py", "-k", "synthetic_smoke"]),
    ("train-transform-flip-not-recorded", "rca_fast/data/transforms.py",
     "            image = image[:, ::-1]\n", "            image = image[::-1]\n",
     ["tests/test_data.py", "-k", "train_transform"]),
    # ---------------------------------------------------------------- evaluate (utils/metrics.py)
    ("miou-ignore-pred-255-skipped", "rca_fast/utils/metrics.py",
     "p = np.where(p == IGNORE, C, p)", "p = np.where(p == IGNORE, gt[valid], p)",
     ["tests/test_infer_evaluate.py", "-k", "confusion_meter_matches or png_cli"]),
    ("miou-union-no-fp", "rca_fast/utils/metrics.py",
     "union = matrix.sum(axis=1) + matrix[:, :C].sum(axis=0) - tp", "union = matrix.sum(axis=1)",
     ["tests/test_infer_evaluate.py", "-k", "confusion_meter_matches or png_cli"]),
    ("miou-nan-as-zero", "rca_fast/utils/metrics.py",
     "return float(np.nanmean(iou)) if", "return float(np.nan_to_num(iou).mean()) if",
     ["tests/test_infer_evaluate.py", "-k", "confusion_meter_matches or png_cli or voc_folder"]),
    ("sweep-bin-side", "rca_fast/utils/metrics.py",
     "cams.max(axis=0), side=\"left\")", "cams.max(axis=0), side=\"right\")",
     ["tests/test_infer_evaluate.py", "-k", "cam_sweep or npy_sweep"]),
    # ---------------------------------------------------------------- k-means (ref; ops default on CPU)
    ("kmeans-tol-sum-not-mean", "rca_fast/ref/kmeans.py",
     "tol_abs = tol * x.var(1, unbiased=False).mean(-1)", "tol_abs = tol * x.var(1, unbiased=False).sum(-1)",
     ["tests/test_kmeans.py", "-k", "divides_the_summed_variance"]),
    ("kmeans-tol-1000x", "rca_fast/ref/kmeans.py",
     "tol_abs = tol * x.var(1, unbiased=False).mean(-1)",
     "tol_abs = 1000 * tol * x.var(1, unbiased=False).mean(-1)",
     ["tests/test_kmeans.py", "-k", "lloyd_iterations"]),
    ("kmeans-no-labels-stop", "rca_fast/ref/kmeans.py",
     "done |= (labels == prev).all(-1)", "pass",
     ["tests/test_kmeans.py", "-k", "lloyd_iterations"]),
    ("kmeans-no-reseed", "rca_fast/ref/kmeans.py",
     "if bool(empty.any()):", "if False:",
     ["tests/test_kmeans.py", "-k", "reseeded"]),
    ("kmeans-mean-off-by-one", "rca_fast/ref/kmeans.py",
     "/ counts.clamp(min=1).unsqueeze(-1)", "/ (counts + 1).unsqueeze(-1)",
     ["tests/test_kmeans.py", "-k", "lloyd_iterations"]),
    ("kmeans-ninit-worst", "rca_fast/ref/kmeans.py",
     "best = inertia.view(L, n_init).argmin(-1)", "best = inertia.view(L, n_init).argmax(-1)",
     ["tests/test_kmeans.py", "-k", "n_init or sklearn"]),
    # ---------------------------------------------------------------- memory bank / EMA
    ("bank-gather-reverse", "rca_fast/model/memory_bank.py",
     "return (torch.cat([e[:c] for e, c in zip(embs, counts)]),",
     "embs, tgts, counts = embs[::-1], tgts[::-1], counts[::-1]\n    return (torch.cat([e[:c] for e, c in "
     "zip(embs, counts)]),",
     ["tests/test_memory_bank.py", "-k", "distributed"]),
    ("bank-threshold-inclusive", "rca_fast/model/memory_bank.py",
     "> self.score_threshold  # strictly above", ">= self.score_threshold",
     ["tests/test_memory_bank.py", "-k", "not distributed"]),
    ("ema-gamma-swapped", "rca_fast/ref/ema.py",
     "bank[c, s] = (gamma * bank[c, s].to(cd) + (1 - gamma) * rows[sel])",
     "bank[c, s] = ((1 - gamma) * bank[c, s].to(cd) + gamma * rows[sel])",
     ["tests/test_ema.py"]),
    ("ema-ptr-not-wrapped", "rca_fast/ref/ema.py",
     "ptr.copy_((ptr + per_class) % S)", "ptr.copy_(ptr + per_class)",
     ["tests/test_ema.py"]),
    ("ema-same-class-same-slot", "rca_fast/ref/ema.py",
     "slot = (ptr[target] + rank) % slots", "slot = (ptr[target] + 0 * rank) % slots",
     ["tests/test_ema.py"]),
    # ---------------------------------------------------------------- masked average pooling
    ("map-mask-ge", "rca_fast/ref/map.py",
     "return x > x.mean(dim=(-2, -1), keepdim=True)", "return x >= x.mean(dim=(-2, -1), keepdim=True)",
     ["tests/test_map.py"]),
    ("map-sum-not-mean", "rca_fast/ref/map.py",
     "emb = sums / count.clamp(min=1).unsqueeze(-1).to(acc)", "emb = sums / 1",
     ["tests/test_map.py"]),
    ("map-labels-count-off", "rca_fast/ref/map.py",
     "vals = (sums / cnt.clamp(min=1).unsqueeze(-1).to(acc))",
     "vals = (sums / (cnt + 1).unsqueeze(-1).to(acc))",
     ["tests/test_map.py"]),
    # ---------------------------------------------------------------- bank NCE (ref)
    ("nce-no-temperature", "rca_fast/ref/nce.py",
     "(inv_norm / temperature)).reshape(-1, L, S)", "(inv_norm / 0.07)).reshape(-1, L, S)",
     ["tests/test_nce.py"]),
    ("nce-mix-weight-swapped", "rca_fast/ref/nce.py",
     "loss = w * loss + (1 - w) * class_nce(", "loss = (1 - w) * loss + w * class_nce(",
     ["tests/test_nce.py"]),
    ("nce-positive-in-negatives", "rca_fast/ref/nce.py",
     "neg_lse = class_lse.masked_fill(F.one_hot(target, L).bool(), float(\"-inf\")).logsumexp(-1)",
     "neg_lse = class_lse.logsumexp(-1)",
     ["tests/test_nce.py"]),
    ("nce-no-slot-norm", "rca_fast/ref/nce.py",
     "inv_norm = m.norm(dim=-1).clamp(min=EPS).reciprocal()",
     "inv_norm = m.norm(dim=-1).clamp(min=EPS) * 0 + 1",
     ["tests/test_nce.py"]),
    # ---------------------------------------------------------------- prototype attention (ref)
    ("attn-scale-ignored", "rca_fast/ref/attention.py",
     "scale = D ** -0.5 if scale is None else scale", "scale = D ** -0.5",
     ["tests/test_attention.py"]),
    ("attn-default-scale-d", "rca_fast/ref/attention.py",
     "scale = D ** -0.5 if scale is None else scale", "scale = D ** -1.0 if scale is None else scale",
     ["tests/test_attention.py"]),
    # ---------------------------------------------------------------- Triton kernels (interpreter: narrow)
    ("triton-nce-temperature", "kernels/nce/forward.py",
     "N, S, D, n_row_blocks, n_chunks, n_units, s_chunk, 1.0 / temperature,",
     "N, S, D, n_row_blocks, n_chunks, n_units, s_chunk, 1.0 / 0.07,",
     ["tests/test_nce_triton.py", "-k", "mixup_temperature"]),
    ("triton-nce-bwd-temperature", "kernels/nce/backward.py",
     "return (inv_q * (v / temperature - radial)).to(query.dtype)",
     "return (inv_q * (v / 0.07 - radial)).to(query.dtype)",
     ["tests/test_nce_triton.py", "-k", "mixup_temperature"]),
    # ---------------------------------------------------------------- dispatch: backend_for names what runs
    ("provider-map-fp64-fallback", "kernels/map/forward.py",
     "    emb, count, _ = map_fwd(features, cams.detach(), labels)\n",
     "    emb, count, _ = map_fwd(features, cams.detach(), labels) if features.dtype != torch.float64 else (*__import__('rca_fast.ref.map', fromlist=['_']).masked_average_pool(features, cams, labels), None)\n",
     ["tests/test_dispatch_truth.py"]),
    ("ext-kmeans-fp64-fallback", "rca_fast/_ext.py",
     "    squeeze = points.dim() == 2\n",
     "    if points.dtype == torch.float64:\n        return __import__('rca_fast.ref.kmeans', fromlist=['_']).kmeans(points, k, iters=iters, tol=tol, seed=seed, init=init, n_init=n_init)\n    squeeze = points.dim() == 2\n",
     ["tests/test_dispatch_truth.py"]),
    ("provider-nce-fp64-fallback", "kernels/nce/forward.py",
     "    N = query.shape[0]\n    weights = None\n",
     "    if query.dtype == torch.float64:\n        from rca_fast.ref.nce import bank_nce_loss as reference\n        return reference(query, bank, target, temperature=temperature, mix_target=mix_target, mix_weight=mix_weight, reduction=reduction)\n    N = query.shape[0]\n    weights = None\n",
     ["tests/test_layout.py", "-k", "lower_layers"]),
    ("ext-no-cuda-fallback", "rca_fast/_ext.py",
     "    squeeze = points.dim() == 2\n",
     "    if points.device.type == 'cuda' and not WITH_CUDA:\n        from .ref.kmeans import kmeans as reference\n        return reference(points, k, iters=iters, tol=tol, seed=seed, init=init, n_init=n_init)\n    squeeze = points.dim() == 2\n",
     ["tests/test_layout.py", "-k", "nothing_above_it and _ext"]),
    ("dispatch-importlib-only", "rca_fast/ops/_dispatch.py",
     "    if not _import_by_statement(module_name):", "    if True:",
     ["tests/test_dispatch.py", "-k", "first_call_inside_fullgraph"]),
    ("dispatch-no-float64-rule", "rca_fast/ops/_dispatch.py",
     'if reason is None and backend == "triton" and torch.float64 in dtypes and not _interpreting(device):',
     'if reason is None and backend == "triton" and torch.float64 in dtypes and not True:',
     ["tests/test_dispatch_truth.py"]),
    ("dispatch-ignores-supports", "rca_fast/ops/_dispatch.py",
     "reason = supports(op, device, tuple(dtypes))", "reason = None",
     ["tests/test_dispatch_truth.py"]),
    ("triton-map-mask-ge", "kernels/map/forward.py",
     "inside = ((cam.to(tl.float64) - shift3) > mean3) & used3 & hw_ok",
     "inside = ((cam.to(tl.float64) - shift3) >= mean3) & used3 & hw_ok",
     ["tests/test_map_triton.py", "-k", "loop_oracle"]),
    ("triton-map-bwd-no-count", "kernels/map/backward.py",
     "grad = tl.where(count > 0, div_precise(grad, tl.maximum(count, 1).to(acc_dtype)), 0.0)",
     "grad = tl.where(count > 0, grad, 0.0)",
     ["tests/test_map_triton.py", "-k", "gradient_matches_loop"]),
    ("triton-attn-scale-lo-dropped", "kernels/attention/tiles.py",
     "return s * scale_hi + s * scale_lo", "return s * scale_hi",
     ["tests/test_attention_triton.py", "-k", "fp64_forward or loop_oracle"]),
    ("triton-attn-bwd-scale", "kernels/attention/backward.py",
     "d_scores = scale_scores(probs * (d_probs - delta[:, None]), scale_hi, scale_lo)",
     "d_scores = probs * (d_probs - delta[:, None])",
     ["tests/test_attention_triton.py", "-k", "fp64_forward"]),
    ("launch-grid-limit-off-by-one", "kernels/launch_rule.py",
     "            if n > limit:", "            if n > limit + 1:",
     ["tests/test_kernel_guards.py", "-k", "grid"]),
    # ---------------------------------------------------------------- launch guards and the fixed rule (issue 23)
    ("nce-int32-guard-gt", "kernels/nce/tiles.py",
     "        if extent >= 2 ** 31:", "        if extent > 2 ** 31:",
     ["tests/test_kernel_guards.py", "-k", "int32"]),
    ("map-int32-guard-gt", "kernels/map/tiles.py",
     "    if extent >= 2 ** 31:", "    if extent > 2 ** 31:",
     ["tests/test_kernel_guards.py", "-k", "int32"]),
    ("nce-bwd-guard-no-splits", "kernels/nce/backward.py",
     '"splits * N * D (partial gradients)": n_splits * N * D', '"splits * N * D (partial gradients)": N * D',
     ["tests/test_kernel_guards.py", "-k", "int32"]),
    ("nce-fixed-rule-row-block", "kernels/nce/forward.py",
     "return 16 if N <= 16 else 32 if N <= 32 else 64", "return 16 if N <= 16 else 32",
     ["tests/test_fixed_rule.py", "-k", "choose"]),
    ("compile-headroom-rule-off", "kernels/offline_compile.py",
     'if row.get("fixed") and row["registers"] > max_fixed_registers:',
     'if False and row.get("fixed") and row["registers"] > max_fixed_registers:',
     ["tests/test_compile_check.py", "-k", "headroom"]),
    ("map-slots-larger-bound", "kernels/map/tiles.py",
     "return min(4 if has_labels else 8, pow2(L))", "return max(4 if has_labels else 8, pow2(L))",
     ["tests/test_kernel_guards.py", "-k", "slots"]),
    # ---------------------------------------------------------------- the extension's CPU twin (--ext)
    ("ext-kmeans-no-reseed", "csrc/cpu/kmeans.cpp",
     "if (empties > 0) reseed_empty(r, empties);", "(void)empties;",
     ["tests/test_kmeans_ext.py", "-k", "stale and cpu"]),
    ("ext-kmeans-tol-1000x", "csrc/ops.cpp",
     "return tol * feature_variance_cpu(x);", "return 1000 * tol * feature_variance_cpu(x);",
     ["tests/test_kmeans_ext.py", "-k", "lloyd_iterations and cpu"]),
    ("ext-ema-gamma-swapped", "csrc/cpu/ema.cpp",
     "const cd_t a = static_cast<cd_t>(gamma);", "const cd_t a = static_cast<cd_t>(1.0 - gamma);",
     ["tests/test_ema_ext.py", "-k", "cpu"]),
    # ---------------------------------------------------------------- final CAM heads (model/heads.py)
    ("heads-loop-bias-of-class-0", "rca_fast/model/heads.py",
     "y = F.relu(F.conv2d(y, w[l], b[l], padding=1), inplace=True)",
     "y = F.relu(F.conv2d(y, w[l], b[0], padding=1), inplace=True)",
     ["tests/test_final_heads.py", "-k", "per_class_loop and L3 and loop"]),
    ("heads-loop-classifier-of-class-0", "rca_fast/model/heads.py",
     "maps.append(F.conv2d(y, wc[l], bc[l]))", "maps.append(F.conv2d(y, wc[0], bc[l]))",
     ["tests/test_final_heads.py", "-k", "per_class_loop and L3 and loop"]),
    ("heads-grouped-third-conv-skipped", "rca_fast/model/heads.py",
     "maps = self.classifier(self.body(features))   # grouped", "maps = self.classifier(F.relu(self.body[:4](features)))  #",
     ["tests/test_final_heads.py", "-k", "per_class_loop and L1 and grouped"]),
    # ---------------------------------------------------------------- losses (model/losses.py)
    ("loss-coarse-weight-dropped", "rca_fast/model/losses.py",
     "total = cls + coarse_weight * coarse", "total = cls + coarse",
     ["tests/test_losses.py"]),
    ("loss-contrast-start-off-by-one", "rca_fast/model/losses.py",
     "if contrast is not None and epoch >= contrast_start_epoch:",
     "if contrast is not None and epoch > contrast_start_epoch:",
     ["tests/test_losses.py"]),
    # ---------------------------------------------------------------- issue 19: the public recipe, bank, maps
    ("jitter-fixed-order", "rca_fast/data/transforms.py",
     "order = rng.sample(range(4), 4)", "order = [0, 1, 2, 3]; rng.sample(range(4), 4)",
     ["tests/test_public_pipeline.py", "-k", "order_is_random"]),
    ("jitter-no-hue", "rca_fast/data/transforms.py",
     "order = rng.sample(range(4), 4)", "order = [o for o in rng.sample(range(4), 4) if o != 3]",
     ["tests/test_public_pipeline.py", "-k", "torchvisions_with_hue"]),
    ("public-resize-keeps-aspect", "rca_fast/data/transforms.py",
     "image = np.array(Image.fromarray(image).resize((s, s), Image.BILINEAR))", "image = resize_long(image, s)",
     ["tests/test_public_pipeline.py", "-k", "square_resize"]),
    ("public-order-shuffled", "rca_fast/train/loop.py",
     'return getattr(self.args, "input_pipeline", "public") != "public"', "return True",
     ["tests/test_public_pipeline.py", "-k", "list_order"]),
    ("public-softmax-aggregation", "rca_fast/utils/train_args.py",
     '"public": dict(aggregation="linear",', '"public": dict(aggregation="softmax",',
     ["tests/test_public_pipeline.py", "-k", "defaults_linear"]),
    ("kmeans-100-iterations", "rca_fast/ops/kmeans.py",
     "iters: int = 300", "iters: int = 100",
     ["tests/test_public_pipeline.py", "-k", "defaults_linear"]),
    ("projector-no-bias", "rca_fast/model/heads.py",
     "nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)",
     "nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)",
     ["tests/test_public_pipeline.py", "-k", "projector"]),
    ("ext-ema-no-version-bump", "rca_fast/_ext.py",
     "    torch.autograd.graph.increment_version(bank)\n", "",
     ["tests/test_bank_inplace.py"]),
    ("att-dir-no-fill", "rca_fast/train/loop.py",
     "                    self.att_maps.fill_missing(\n", "                    0 and self.att_maps.fill_missing(\n",
     ["tests/test_att_dir_every_image.py", "-k", "every_tagged_class"]),
    ("pretrained-not-required", "rca_fast/train/trainer.py",
     "        require_pretrained(args, resuming=bool(resume))", "        pass",
     ["tests/test_pretrained_required.py"]),
    # ---------------------------------------------------------------- checkpoints, pseudo labels (issue 20)
    ("ckpt-tmp-in-system-tmp", "rca_fast/utils/checkpoint.py",
     'suffix=".tmp", dir=folder)', 'suffix=".tmp", dir=None)',
     ["tests/test_checkpoint.py", "-k", "beside_the_target"]),
    ("pseudo-one-percent-counts-ignore", "rca_fast/pseudo.py",
     "objects = int(((label > 0) & (label < 255)).sum())", "objects = int((label > 0).sum())",
     ["tests/test_pseudo.py", "-k", "only_non_background"]),
    ("par-default-dilations", "rca_fast/refine.py",
     "DEFAULT_DILATIONS: Tuple[int, ...] = (1, 2, 4, 8, 12, 24)", "DEFAULT_DILATIONS: Tuple[int, ...] = (1, 2, 4, 8, 12)",
     ["tests/test_pseudo.py", "-k", "par_defaults"]),
    ("pseudo-par-iters-default", "rca_fast/pseudo.py",
     'p.add_argument("--par-iters", type=int, default=10,', 'p.add_argument("--par-iters", type=int, default=5,',
     ["tests/test_pseudo.py", "-k", "par_defaults"]),
    ("att-grid-floor", "rca_fast/utils/att_maps.py",
     "return max(1, math.ceil(h1 / stride)), max(1, math.ceil(w1 / stride))",
     "return max(1, int(h1 // stride)), max(1, int(w1 // stride))",
     ["tests/test_att_dir_grid.py"]),
    # ---------------------------------------------------------------- DDP paths (2 gloo ranks, ~40 s each)
    ("att-sync-exists-min", "rca_fast/utils/att_maps.py",
     "        dist.all_reduce(t, op=dist.ReduceOp.MAX)\n        self.exists = t.cpu().bool()",
     "        dist.all_reduce(t, op=dist.ReduceOp.MIN)\n        self.exists = t.cpu().bool()",
     ["tests/test_ddp_paths.py"]),
    ("att-merge-flags-replaced", "rca_fast/utils/att_maps.py",
     "self.exists = reduce_max(self.exists.to(torch.uint8)).bool()", "self.exists = self.exists.clone()",
     ["tests/test_ddp_paths.py"]),
    ("att-merge-maps-summed", "rca_fast/utils/att_maps.py",
     "            dist.all_reduce(t, op=dist.ReduceOp.MAX)\n            return t.cpu()",
     "            dist.all_reduce(t, op=dist.ReduceOp.SUM)\n            return t.cpu()",
     ["tests/test_ddp_paths.py"]),
    ("ddp-contrast-start-off-by-one", "rca_fast/train/step.py",
     "self.model.contrast = epoch >= self.args.contrast_start_epoch",
     "self.model.contrast = epoch > self.args.contrast_start_epoch",
     ["tests/test_ddp_paths.py"]),
    ("ddp-ranks-seeded-alike-torch", "rca_fast/train/trainer.py",
     "torch.manual_seed(args.seed + 1000003 * self.rank)", "torch.manual_seed(args.seed)",
     ["tests/test_ddp_paths.py"]),
    ("ddp-ranks-seeded-alike-numpy", "rca_fast/train/trainer.py",
     "np.random.seed((args.seed + 1000003 * self.rank) % 2 ** 32)", "np.random.seed(args.seed % 2 ** 32)",
     ["tests/test_ddp_paths.py"]),
    # ---------------------------------------------------------------- defaults vs the README's table (issue 20)
    ("default-weight-decay", "rca_fast/utils/train_args.py",
     'pub.add_argument("--weight_decay", type=float, default=5e-4)',
     'pub.add_argument("--weight_decay", type=float, default=5e-3)',
     ["tests/test_readme_defaults.py"]),
    ("default-improved-start-epoch", "rca_fast/utils/train_args.py",
     'prototype_init="zeros",\n                     aggregation_start_epoch=4, first_write="copy"',
     'prototype_init="zeros",\n                     aggregation_start_epoch=3, first_write="copy"',
     ["tests/test_readme_defaults.py"]),
    ("default-voc-bank-slots", "rca_fast/utils/train_args.py",
     'bank_slots=500, num_workers=8,\n                snapshot_dir="runs/pascal/model"',
     'bank_slots=512, num_workers=8,\n                snapshot_dir="runs/pascal/model"',
     ["tests/test_readme_defaults.py"]),
    ("readme-public-wd-miscited", "README.md",
     "lr 1e-3, wd 5e-4 on all parameters", "lr 1e-3, wd 5e-3 on all parameters",
     ["tests/test_readme_defaults.py"]),
    # ---------------------------------------------------------------- step 3: rca_fast.segment
    ("segment-loss-mean-over-all-pixels", "rca_fast/model/segmentation.py",
     "return total / valid.sum().clamp_min(1)", "return total / target.numel()",
     ["tests/test_segment.py", "-k", "loss_ignores"]),
    ("segment-poly-off-by-one", "rca_fast/segment/trainer.py",
     "1.0 - min(step, total) / total", "1.0 - min(step + 1, total) / total",
     ["tests/test_segment.py", "-k", "poly"]),
    ("segment-no-new-layer-mult", "rca_fast/segment/trainer.py",
     'group["lr"] = self.args.lr * group.get("lr_mult", 1.0) * factor', 'group["lr"] = self.args.lr * factor',
     ["tests/test_segment.py", "-k", "poly"]),
    ("segment-resume-restarts-epoch", "rca_fast/segment/trainer.py",
     "for batch in self.batches(epoch, self.step % spe):", "for batch in self.batches(epoch, 0):",
     ["tests/test_segment.py", "-k", "resume"]),
    ("segment-label-size-unchecked", "rca_fast/data/seg_pairs.py",
     "if _png_size(label_path) != _png_size(image_path):", "if False:",
     ["tests/test_segment.py", "-k", "mismatched"]),
    ("segment-flip-image-only", "rca_fast/data/seg_pairs.py",
     "image, label = image[:, ::-1], label[:, ::-1]", "image = image[:, ::-1]",
     ["tests/test_segment.py", "-k", "aligned"]),
    ("segment-eval-flip-not-undone", "rca_fast/segment/predict.py",
     "[0].flip(-1)", "[0]",
     ["tests/test_segment.py", "-k", "multiscale"]),
]


def scratch_copy(dest: str, rev=None) -> None:
    """The working tree as it is now (tracked + untracked non-ignored files), or commit ``rev``,
    and the built extension, with rca_fast/kernels -> ../kernels so the copy's kernels are imported."""
    if rev:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    else:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
        for rel in filter(None, files):
            src = os.path.join(ROOT, rel)
            if not os.path.isfile(src):  # deleted in the working tree
                continue
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    for so in glob.glob(os.path.join(ROOT, "rca_fast", "_C*.so")):
        shutil.copy2(so, os.path.join(dest, "rca_fast"))
    link = os.path.join(dest, "rca_fast", "kernels")
    if not os.path.exists(link):
        os.symlink(os.path.join("..", "kernels"), link)


def scratch_env(dest: str) -> dict:
    env = dict(os.environ, PYTHONPATH=dest + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def check_imports(dest: str) -> None:
    """The scratch copy's code, not the editable install's, must be what the tests import."""
    code = ("import importlib, rca_fast, rca_fast.kernels; k = "
            "importlib.import_module('rca_fast.ref.kmeans'); "
            "print(rca_fast.__file__); print(rca_fast.kernels.__file__); print(k.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=dest, env=scratch_env(dest), capture_output=True,
                         text=True)
    if res.returncode:
        raise SystemExit(f"the scratch copy {dest} does not import:\n{res.stderr[-2000:]}")
    out = res.stdout.split()
    real = os.path.realpath(dest)
    bad = [p for p in out if not os.path.realpath(p).startswith(real)]
    if bad:
        raise SystemExit(f"the scratch copy is not what gets imported: {bad}")


def rebuild_extension(dest: str) -> bool:
    """Rebuild rca_fast._C (CPU sources only) in the scratch copy; True when it built."""
    env = dict(scratch_env(dest), RCA_FAST_EXT_CPU_ONLY="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest, env=env,
                         capture_output=True, text=True)
    if res.returncode:
        print("    extension build failed:\n    " + "\n    ".join(res.stderr.strip().splitlines()[-5:]))
    return res.returncode == 0


def run_tests(dest: str, args, timeout: float) -> tuple:
    """(pytest exit code or 'timeout', seconds, last lines)."""
    start = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                             cwd=dest, env=scratch_env(dest), capture_output=True, text=True, timeout=timeout)
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-3:])
        return res.returncode, time.time() - start, tail
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", action="append", default=[],
                   help="run the mutants whose id contains this (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--clean", action="store_true", help="first run each distinct test selection unmutated")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    p.add_argument("--keep", default=None, help="scratch folder to use and keep (default: a temporary one)")
    p.add_argument("--ext", action="store_true",
                   help="also run the csrc/ mutants (one extension rebuild each)")
    p.add_argument("--rev", default=None, help="copy this commit (e.g. HEAD) instead of the working tree")
    p.add_argument("--recheck", action="store_true",
                   help="run a mutant its selection misses against the whole tests/ folder before calling it missed")
    p.add_argument("--recheck-timeout", type=float, default=3600, help="seconds for one whole-suite recheck")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.k or any(w in m[0] for w in a.k)]
    if a.list:
        for mid, path, _, _, tests in chosen:
            print(f"{mid:34s} {path:30s} {' '.join(tests)}")
        return 0
    dest = a.keep or tempfile.mkdtemp(prefix="rca_mutants_")
    os.makedirs(dest, exist_ok=True)
    scratch_copy(dest, a.rev)
    check_imports(dest)
    print(f"scratch copy: {dest}")
    if a.clean:
        for tests in sorted({tuple(m[4]) for m in chosen}):
            code, secs, tail = run_tests(dest, list(tests), a.timeout)
            print(f"clean {'ok  ' if code == 0 else 'FAIL'} {secs:6.1f}s {' '.join(tests)}", flush=True)
            if code != 0:
                print(tail)
                return 2
    results = []
    for mid, path, old, new, tests in chosen:
        target = os.path.join(dest, path)
        native = path.startswith("csrc/")
        if native and not a.ext:
            results.append((mid, "skipped", 0.0))
            print(f"{mid:34s} skipped (csrc/: run with --ext)", flush=True)
            continue
        with open(target) as f:
            text = f.read()
        if text.count(old) != 1:
            results.append((mid, "stale", 0.0))
            print(f"{mid:34s} stale (snippet found {text.count(old)} times in {path})", flush=True)
            continue
        with open(target, "w") as f:
            f.write(text.replace(old, new))
        built = glob.glob(os.path.join(dest, "rca_fast", "_C*.so"))
        saved = {so: open(so, "rb").read() for so in built} if native else {}
        try:
            if native and not rebuild_extension(dest):
                code, secs, tail = 2, 0.0, "the mutated extension does not build"
            else:
                code, secs, tail = run_tests(dest, tests, a.timeout)
            # 1: a test failed; 2: collection failed (the mutated code does not import) -- both caught.
            # 5 (no test selected), 4 (usage) and timeouts are errors of the list, not verdicts.
            verdict = {0: "MISSED", 1: "caught", 2: "caught"}.get(code, "error")
            if verdict == "MISSED" and a.recheck:  # still mutated (and rebuilt): the whole folder
                print(f"{mid:34s} missed by its selection: rechecking against the whole tests/ folder", flush=True)
                wide, wide_secs, wide_tail = run_tests(dest, ["tests"], a.recheck_timeout)
                secs += wide_secs
                if wide in (1, 2):
                    verdict, tail = "caught-wide", wide_tail
                elif wide != 0:
                    verdict = "error"
        finally:
            with open(target, "w") as f:
                f.write(text)
            for so, data in saved.items():  # the original build back
                with open(so, "wb") as f:
                    f.write(data)
        results.append((mid, verdict, secs))
        print(f"{mid:34s} {verdict:7s} {secs:6.1f}s  {' '.join(tests)}", flush=True)
        if verdict != "caught" and tail:
            print("    " + tail.replace("\n", "\n    "))
    caught = sum(v in ("caught", "caught-wide") for _, v, _ in results)
    counted = sum(v in ("caught", "caught-wide", "MISSED") for _, v, _ in results)
    print(f"\ncaught {caught} of {counted} mutants"
          + "".join(f"; {sum(v == k for _, v, _ in results)} {k}" for k in ("caught-wide", "stale", "error", "skipped")
                    if any(v == k for _, v, _ in results)))
    if not a.keep:
        shutil.rmtree(dest, ignore_errors=True)
    return 0 if caught == counted else 1


if __name__ == "__main__":
    sys.exit(main())
