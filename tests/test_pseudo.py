"""rca_fast.pseudo (the public gen_labels rules) and rca_fast.refine (par, crf extra).

Oracles: a literal per-pixel loop of the public rules written here in float64, and a literal
per-pixel loop of the par propagation.
"""
import builtins
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rca_fast import pseudo
from rca_fast.data import SyntheticShapes
from rca_fast.refine import par_refine
from rca_fast.utils.metrics import ConfusionMeter


# ---------------------------------------------------------------- oracle of the rules
def rules_loop(maps, classes, num_classes, sal):
    """Per pixel, literally: scale, background score, planes, conflict, arg-max, saliency, 1%."""
    k, h, w = maps.shape
    lo = [min(float(v) for v in maps[i].ravel()) for i in range(k)]
    hi = [max(float(v) for v in maps[i].ravel()) for i in range(k)]
    label = np.zeros((h, w), np.int64)
    for y in range(h):
        for x in range(w):
            cam = [(float(maps[i, y, x]) - lo[i]) / (hi[i] - lo[i] + 1e-8) for i in range(k)]
            bg = (1.0 - max(cam)) ** 4 if k else 1.0
            planes = [0.0] * (num_classes + 1)
            planes[0] = bg if sal is None else 1.0 - float(sal[y, x]) / 255.0
            s = 0.0 if sal is None else float(sal[y, x])
            for i, c in enumerate(classes):
                planes[c + 1] = cam[i]
                if cam[i] > 0.8:
                    s = 255.0
            over = sum(1 for p in planes if p > 0.9)
            best = max(range(len(planes)), key=lambda j: (planes[j], -j))  # first of the maxima
            if over > 1:
                best = 255
            if best == 0 and s >= 32:
                best = 255
            label[y, x] = best
    if sum(1 for v in label.ravel() if 0 < v < 255) < 0.01 * h * w:
        label[:] = 255
    return label


def hand_made(gen, h=23, w=31, num_classes=7):
    """Maps that hit every rule: two overlapping strong blobs (conflict), a weak third class,
    saliency that is high over some background."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    classes = sorted(torch.randperm(num_classes, generator=gen)[:3].tolist())
    maps = []
    for i, (cy, cx) in enumerate(((8, 9), (10, 13), (17, 25))):
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (4.0 + i) ** 2))
        noise = torch.rand(h, w, generator=gen, dtype=torch.float64) * 0.2
        maps.append(((blob * (1.0 if i < 2 else 0.6) + noise).clamp(0, 1) * 255).round())
    maps = torch.stack(maps).to(torch.uint8).numpy()
    sal = (torch.rand(h, w, generator=gen) * 80).round()
    sal[:, : w // 3] = 0                                   # some background with no saliency at all
    return maps, classes, sal.numpy().astype(np.uint8)


def write_case(root, name, image, maps, classes, sal):
    for d in ("maps", "images", "sal"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, "images", name + ".png"))  # lossless for the test
    for m, c in zip(maps, classes):
        Image.fromarray(m).save(os.path.join(root, "maps", f"{name}_{c}.png"))
    if sal is not None:
        Image.fromarray(sal).save(os.path.join(root, "sal", name + ".png"))
    with open(os.path.join(root, "list.txt"), "a") as f:
        f.write(" ".join([name] + [str(c) for c in classes]) + "\n")


# ---------------------------------------------------------------- the rules
@pytest.mark.parametrize("use_sal", [False, True])
def test_rules_match_literal_loop(gen, use_sal):
    maps, classes, sal = hand_made(gen)
    sal = sal if use_sal else None
    got = pseudo.pseudo_label(np.zeros(maps.shape[1:] + (3,), np.uint8), maps, classes, 7, saliency=sal)
    want = rules_loop(maps, classes, 7, sal)
    np.testing.assert_array_equal(got, want)
    # the cases the maps were made for are really there
    assert (want == 255).any() and ((want > 0) & (want < 255)).any()
    cams = pseudo.class_scores(maps)
    assert ((cams > 0.9).sum(axis=0) > 1).any()                      # a conflict of two classes


def test_conflict_and_saliency_ignore_cases(gen):
    """Pixels fixed by hand: conflict of two classes, saliency-ignored background, a clean pixel."""
    h, w = 11, 13
    maps = np.zeros((2, h, w), np.uint8)
    maps[:, 0, 0] = 255                     # both classes at 1.0 -> conflict -> 255
    maps[0, 2:8, 2:8] = 200                 # class a alone in a block
    maps[1, 9, 12] = 255                    # class b's peak elsewhere
    sal = np.zeros((h, w), np.uint8)
    sal[2:8, 2:8] = 255                     # salient object: background plane 0 there
    sal[10, 0:3] = 40                       # background (no class) with saliency >= 32 -> 255
    sal[10, 3] = 31                         # just under the threshold -> stays background
    got = pseudo.pseudo_label(np.zeros((h, w, 3), np.uint8), maps, [1, 4], 5, saliency=sal)
    np.testing.assert_array_equal(got, rules_loop(maps, [1, 4], 5, sal))
    assert got[0, 0] == 255 and (got[10, 0:3] == 255).all() and got[10, 3] == 0 and got[4, 4] == 2
    assert got[9, 12] == 255  # class b at 1.0 and the background plane (saliency 0) at 1.0: conflict


def test_one_percent_rule(gen):
    h, w = 29, 37  # 1073 pixels: 10 object pixels are < 1%, 11 are not
    for n, all_ignored in ((10, True), (11, False)):
        maps = np.zeros((1, h, w), np.uint8)
        idx = torch.randperm(h * w, generator=gen)[:n]
        maps[0].reshape(-1)[idx.numpy()] = 255
        got = pseudo.pseudo_label(np.zeros((h, w, 3), np.uint8), maps, [2], 3)
        np.testing.assert_array_equal(got, rules_loop(maps, [2], 3, None))
        assert (got == 255).all() == all_ignored


def test_program_writes_palette_pngs_matching_loop(tmp_path, gen):
    root = str(tmp_path)
    cases = []
    for i in range(3):
        maps, classes, sal = hand_made(gen, h=17 + i, w=21 + 2 * i)
        image = (torch.rand(maps.shape[1:] + (3,), generator=gen) * 255).to(torch.uint8).numpy()
        write_case(root, f"img{i}", image, maps, classes, sal)
        cases.append((f"img{i}", maps, classes, sal))
    out = os.path.join(root, "out")
    pseudo.main(["--maps", f"{root}/maps", "--list", f"{root}/list.txt", "--images", f"{root}/images",
                 "--saliency", f"{root}/sal", "--out", out, "--refine", "none", "--num-classes", "7",
                 "--workers", "1", "--no-progress"])
    for name, maps, classes, sal in cases:
        with Image.open(os.path.join(out, name + ".png")) as img:
            assert img.mode == "P"
            np.testing.assert_array_equal(np.array(img), rules_loop(maps, classes, 7, sal))


@pytest.mark.parametrize("missing", ["map", "image", "saliency"])
def test_missing_file_is_named(tmp_path, gen, missing):
    root = str(tmp_path)
    maps, classes, sal = hand_made(gen)
    write_case(root, "x", np.zeros(maps.shape[1:] + (3,), np.uint8), maps, classes, sal)
    path = {"map": f"{root}/maps/x_{classes[1]}.png", "image": f"{root}/images/x.png",
            "saliency": f"{root}/sal/x.png"}[missing]
    os.remove(path)
    with pytest.raises(FileNotFoundError) as err:
        pseudo.main(["--maps", f"{root}/maps", "--list", f"{root}/list.txt", "--images", f"{root}/images",
                     "--saliency", f"{root}/sal", "--out", f"{root}/out", "--refine", "none",
                     "--num-classes", "7", "--workers", "1", "--no-progress"])
    assert os.path.splitext(path)[0] in str(err.value)


def test_crf_without_extra_names_it(tmp_path, monkeypatch, gen):
    real_import = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    root = str(tmp_path)
    maps, classes, sal = hand_made(gen)
    write_case(root, "x", np.zeros(maps.shape[1:] + (3,), np.uint8), maps, classes, None)
    with pytest.raises(ImportError, match=r'pip install "\.\[crf\]"'):
        pseudo.main(["--maps", f"{root}/maps", "--list", f"{root}/list.txt", "--images", f"{root}/images",
                     "--out", f"{root}/out", "--refine", "crf", "--num-classes", "7", "--no-progress"])
    from rca_fast.refine import crf_refine
    with pytest.raises(ImportError, match=r'pip install "\.\[crf\]"'):
        crf_refine(np.zeros((5, 6, 3), np.uint8), np.ones((2, 5, 6), np.float32) / 2)


# ---------------------------------------------------------------- par
def par_loop(image, scores, dilations, iters, w_colour=0.3, w_pos=0.01, w_dist=1.0):
    """Literal float64 per-pixel par (module doc of rca_fast.refine), replicate borders."""
    c3, h, w = image.shape
    offs = [(0, 0)] + [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                       if (dy, dx) != (0, 0)]
    K = len(offs)
    dist = [math.hypot(dy, dx) for dy, dx in offs]
    mean_d = sum(dist) / K
    sd = math.sqrt(sum((v - mean_d) ** 2 for v in dist) / K)
    pos = [-(v / (w_dist * sd + 1e-8)) ** 2 for v in dist]
    pmax = max(pos)
    pz = sum(math.exp(p - pmax) for p in pos)
    pos_soft = [math.exp(p - pmax) / pz for p in pos]

    def at(arr, y, x):
        return arr[..., min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    A = np.zeros((K, h, w))
    for y in range(h):
        for x in range(w):
            nb = [at(image, y + dy, x + dx) for dy, dx in offs]
            col = []
            for k in range(K):
                terms = []
                for ch in range(c3):
                    vals = [float(n[ch]) for n in nb]
                    m = sum(vals) / K
                    std = math.sqrt(sum((v - m) ** 2 for v in vals) / K)
                    terms.append(-(abs(vals[k] - float(image[ch, y, x])) / (w_colour * std + 1e-8)) ** 2)
                col.append(sum(terms) / c3)
            cmax = max(col)
            z = sum(math.exp(v - cmax) for v in col)
            for k in range(K):
                A[k, y, x] = (math.exp(col[k] - cmax) / z + w_pos * pos_soft[k]) / (1 + w_pos)
    s = scores.astype(np.float64)
    for _ in range(iters):
        new = np.zeros_like(s)
        for y in range(h):
            for x in range(w):
                for k, (dy, dx) in enumerate(offs):
                    new[:, y, x] += A[k, y, x] * at(s, y + dy, x + dx)
        s = new
    return s


def test_par_matches_literal_loop_and_batches(gen):
    h, w = 9, 11
    images = (torch.rand(2, 3, h, w, generator=gen) * 255).round()
    scores = torch.rand(2, 3, h, w, generator=gen)
    got = par_refine(images, scores, iters=3, dilations=(1, 3))
    for b in range(2):
        want = par_loop(images[b].double().numpy(), scores[b].double().numpy(), (1, 3), 3)
        np.testing.assert_allclose(got[b].double().numpy(), want, rtol=1e-4, atol=1e-5)
        one = par_refine(images[b:b + 1], scores[b:b + 1], iters=3, dilations=(1, 3))
        torch.testing.assert_close(one[0], got[b], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(par_refine(images, scores, iters=0), scores)


def test_par_validates():
    img, s = torch.zeros(1, 3, 5, 6), torch.zeros(1, 2, 5, 6)
    with pytest.raises(ValueError, match="images"):
        par_refine(torch.zeros(1, 4, 5, 6), s)
    with pytest.raises(ValueError, match="scores"):
        par_refine(img, torch.zeros(1, 2, 5, 7))
    with pytest.raises(ValueError, match="dilations"):
        par_refine(img, s, dilations=(0,))
    with pytest.raises(ValueError, match="NaN"):
        par_refine(img, torch.full((1, 2, 5, 6), float("nan")))


def cam_like_maps(mask, classes, gen, stride=8, noise=0.15):
    """CAM-like maps from a ground-truth mask: class area pooled to 1/stride, noised, upsampled
    (blobby, misplaced edges -- what the trained network's maps look like at feature resolution)."""
    out = []
    for c in classes:
        m = torch.from_numpy((mask == c + 1).astype(np.float32))[None, None]
        low = F.avg_pool2d(m, stride)
        low = low + noise * torch.rand(low.shape, generator=gen)
        up = F.interpolate(low, size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
        out.append((up.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.stack(out)


def test_par_improves_miou_over_none_on_synthetic(gen):
    """On the synthetic scenes, from CAM-like maps of their masks (see cam_like_maps)."""
    ds = SyntheticShapes(12, 6, 64, seed=int(torch.randint(0, 10 ** 6, (1,), generator=gen)), split="val")
    meters = {"none": ConfusionMeter(7), "par": ConfusionMeter(7)}
    for i in range(len(ds)):
        classes = np.flatnonzero(ds.labels[i]).tolist()
        maps = cam_like_maps(ds.masks[i], classes, gen)
        for method, meter in meters.items():
            meter.update(pseudo.pseudo_label(ds.images[i], maps, classes, 6, refine=method), ds.masks[i])
    none, par = meters["none"].miou(), meters["par"].miou()
    print(f"mIoU none {none:.3f} par {par:.3f}")
    assert par > none + 0.05


def test_gt_saliency_stand_in(tmp_path, gen):
    """python -m rca_fast.data saliency: box blur (replicate borders) of the foreground, noise 0 here."""
    from rca_fast.data.__main__ import main as data_main
    from rca_fast.utils.palette import save_label_png
    h, w = 9, 14
    mask = torch.randint(0, 4, (h, w), generator=gen).numpy().astype(np.uint8)
    mask[0, 0] = 255
    save_label_png(str(tmp_path / "m" / "a.png"), mask)
    (tmp_path / "l.txt").write_text("a 0 2\n")
    data_main(["saliency", "--masks", str(tmp_path / "m"), "--list", str(tmp_path / "l.txt"), "--out",
               str(tmp_path / "s"), "--blur", "3", "--noise", "0"])
    got = np.array(Image.open(tmp_path / "s" / "a.png"))
    fg = ((mask > 0) & (mask < 255)).astype(np.float64)
    want = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            want[y, x] = sum(fg[min(max(y + a, 0), h - 1), min(max(x + b, 0), w - 1)]
                             for a in (-1, 0, 1) for b in (-1, 0, 1)) / 9
    np.testing.assert_allclose(got, np.round(want * 255), atol=1)


def test_image_whose_only_non_background_pixels_are_ignored_becomes_all_ignore(gen):
    """Rule 6 counts object pixels only: an image with > 1% ignore pixels (two classes in
    conflict over a block) but no object pixel at all is all 255, not background + 255."""
    h, w = 21, 27
    maps = np.zeros((2, h, w), np.uint8)
    y, x = (
        int(torch.randint(0, h - 5, (1,), generator=gen)),
        int(torch.randint(0, w - 6, (1,), generator=gen)),
    )
    block = (torch.rand(2, 5, 6, generator=gen) * 15 + 240).round().to(torch.uint8).numpy()
    maps[:, y:y + 5, x:x + 6] = block        # both scaled > 0.9 there: a conflict, 30 px = 5% of the image
    want = rules_loop(maps, [0, 3], 4, None)
    got = pseudo.pseudo_label(np.zeros((h, w, 3), np.uint8), maps, [0, 3], 4)
    np.testing.assert_array_equal(got, want)
    assert (want == 255).all()
    # the rule's premise in this draw: before rule 6 there are only background and ignore pixels
    cams = pseudo.class_scores(maps)
    conflict = (cams > 0.9).sum(axis=0) > 1
    assert conflict.sum() == 30 and (cams[:, ~conflict] == 0).all()


def test_program_par_defaults_are_the_documented_ones(tmp_path, monkeypatch, gen):
    """``python -m rca_fast.pseudo`` without --refine / --par-* refines with par at the dilations
    and number of propagation steps the README states (read from its text)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    m = re.search(r"`--refine par` \(default\).*?dilations ([\d, ]+?), (\d+)\s+propagation steps", readme,
                  re.DOTALL)
    assert m, "README no longer states the par dilations and steps in the form this test reads"
    dilations, steps = tuple(int(d) for d in m.group(1).split(",")), int(m.group(2))
    calls = []
    real = pseudo.par_refine

    def spy(images, scores, **kwargs):
        calls.append(kwargs)
        return real(images, scores, **kwargs)

    monkeypatch.setattr(pseudo, "par_refine", spy)
    root = str(tmp_path)
    maps, classes, sal = hand_made(gen, h=13, w=15)
    write_case(
        root, "x", (torch.rand(13, 15, 3, generator=gen) * 255).to(torch.uint8).numpy(), maps, classes, sal
    )
    pseudo.main(["--maps", f"{root}/maps", "--list", f"{root}/list.txt", "--images", f"{root}/images",
                 "--out", f"{root}/out", "--num-classes", "7", "--workers", "1", "--no-progress"])
    assert len(calls) == 1
    assert calls[0].get("iters") == steps and tuple(calls[0].get("dilations")) == dilations, calls[0]
