"""Datasets: synthetic scenes, VOC/COCO list readers, class-list writer, transforms, palette."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rca_fast.data import (DataFileError, SyntheticShapes, TrainTransform, VOCClassification, VOCSegmentation,
                           load_cls_labels, normalize_image, read_class_list, write_class_list)
from rca_fast.data.synthetic import class_names, class_spec, export_voc
from rca_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rca_fast.utils.palette import save_label_png, voc_palette


# ---------------------------------------------------------------- synthetic
@pytest.mark.parametrize("L,size", [(3, 40), (6, 56)], ids=["L3-S40", "L6-S56"])
def test_synthetic_tags_match_masks(L, size, gen):
    seed = int(torch.randint(0, 10_000, (1,), generator=gen))
    ds = SyntheticShapes(12, L, size, seed=seed)
    assert ds.images.shape == (12, size, size, 3) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (12, size, size) and ds.labels.shape == (12, L)
    for i in range(len(ds)):
        mask, label = ds.masks[i], ds.labels[i]
        in_mask = {int(v) - 1 for v in np.unique(mask) if 1 <= v <= L}
        tagged = {c for c in range(L) if label[c] == 1}
        assert in_mask == tagged, f"image {i}: classes in mask {in_mask}, tags {tagged}"
        assert 1 <= len(tagged) <= 3
        assert set(np.unique(mask).tolist()) <= set(range(L + 1)) | {255}
        assert set(np.unique(label).tolist()) <= {0.0, 1.0}


def test_synthetic_deterministic_and_index_stable(gen):
    seed = int(torch.randint(0, 10_000, (1,), generator=gen))
    a = SyntheticShapes(5, 4, 32, seed=seed)
    b = SyntheticShapes(8, 4, 32, seed=seed)  # a longer set starts with the same scenes
    assert np.array_equal(a.images, b.images[:5]) and np.array_equal(a.masks, b.masks[:5])
    c = SyntheticShapes(5, 4, 32, seed=seed + 1)
    assert not np.array_equal(a.images, c.images)
    v = SyntheticShapes(5, 4, 32, seed=seed, split="val")
    assert not np.array_equal(a.images, v.images)


def test_synthetic_item_layout():
    ds = SyntheticShapes(3, 5, 33, seed=1)
    item = ds[2]
    assert item["image"].shape == (3, 33, 33) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (33, 33) and item["mask"].dtype == torch.int64
    assert item["label"].shape == (5,) and item["name"] == "syn_train_00002"


def test_synthetic_not_trivial():
    """Objects cover a minority of the image; backgrounds carry clutter (varied colours)."""
    ds = SyntheticShapes(20, 6, 64, seed=3)
    fg = (ds.masks > 0) & (ds.masks < 255)
    assert 0.03 < fg.mean() < 0.5
    bg_pixels = ds.images[~fg].astype(np.float64)
    assert bg_pixels.std(axis=0).min() > 20  # not a flat background


@pytest.mark.parametrize("L", [6, 20, 80], ids=["L6", "L20", "L80"])
def test_class_spec_unique(L):
    spec = class_spec(L)
    assert len(spec) == L and len(set(spec)) == L
    names = class_names(L)
    assert len(set(names)) == L
    if L == 6:  # several classes share a shape and several share a texture
        shapes = [s for s, _, _ in spec]
        textures = [t for _, t, _ in spec]
        assert len(set(shapes)) < L and len(set(textures)) < L


# ---------------------------------------------------------------- transforms / palette
def test_normalize_image_matches_loop(gen):
    img = torch.randint(0, 256, (2, 5, 7, 3), generator=gen, dtype=torch.uint8)
    out = normalize_image(img)
    assert out.shape == (2, 3, 5, 7)
    for b in range(2):
        for c in range(3):
            for y in range(5):
                for x in range(7):
                    want = (float(img[b, y, x, c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
                    assert abs(float(out[b, c, y, x]) - want) < 1e-5


def test_normalize_image_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        normalize_image(torch.zeros(4, 4, 3))


@pytest.mark.parametrize("h,w,crop", [(20, 30, 24), (50, 41, 24)], ids=["small-H20W30", "large-H50W41"])
def test_train_transform_crops_the_resized_flipped_image(h, w, crop, gen):
    """Without colour jitter, each crop is the image resized (longer side = input size x a scale
    in [0.9, 1.1], aspect kept), flipped when the view says so, normalised pixel by pixel here,
    copied from (sy, sx) to (dy, dx), zero (the mean colour) elsewhere; both flips occur."""
    img = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    size = 40
    transform = TrainTransform(size, crop, seed=int(torch.randint(1 << 30, (), generator=gen)), jitter=False)
    flips = set()
    for _ in range(20):  # both flips: all 20 alike has probability 2e-6
        out, view = transform.with_view(img)
        H0, W0, rh, rw, flipped, sy, sx, dy, dx, hh, ww = view.tolist()
        assert out.shape == (3, crop, crop) and (H0, W0) == (h, w)
        assert round(0.9 * size) <= max(rh, rw) <= round(1.1 * size)
        assert abs(rh / rw - h / w) < 2 / min(rh, rw)  # aspect kept up to rounding
        assert (hh, ww) == (min(crop, rh), min(crop, rw))
        assert 0 <= sy <= rh - hh and 0 <= sx <= rw - ww and 0 <= dy <= crop - hh and 0 <= dx <= crop - ww
        resized = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BILINEAR))
        if flipped:
            resized = resized[:, ::-1]
        flips.add(flipped)
        want = torch.zeros(3, crop, crop, dtype=torch.float64)
        for c in range(3):
            for y in range(hh):
                for x in range(ww):
                    value = float(resized[sy + y, sx + x, c]) / 255.0
                    want[c, dy + y, dx + x] = (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    assert flips == {0, 1}


def test_voc_palette_and_png_roundtrip(tmp_path, gen):
    pal = voc_palette()
    # the VOC colour map, built bit by bit here as the oracle
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        assert tuple(pal[k]) == (r, g, b)
    label = torch.randint(0, 21, (9, 13), generator=gen).numpy().astype(np.uint8)
    label[0, :3] = 255
    save_label_png(str(tmp_path / "x.png"), label)
    back = Image.open(tmp_path / "x.png")
    assert back.mode == "P" and np.array_equal(np.asarray(back), label)


# ---------------------------------------------------------------- VOC / COCO readers
def _write_voc(root, names_labels, size=(20, 24), broken=()):
    os.makedirs(root / "JPEGImages", exist_ok=True)
    os.makedirs(root / "SegmentationClass", exist_ok=True)
    rng = np.random.default_rng(0)
    for name, classes in names_labels:
        path = root / "JPEGImages" / f"{name}.jpg"
        if name in broken:
            path.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        mask = np.zeros(size, np.uint8)
        for k, c in enumerate(classes):
            mask[k * 3:(k + 1) * 3, :5] = c + 1
        mask[-1, -1] = 255
        save_label_png(str(root / "SegmentationClass" / f"{name}.png"), mask)


def test_read_class_list_public_format(tmp_path):
    (tmp_path / "l.txt").write_text("2007_000032 0 14 \n2007_000039 19\n\n2007_000063 8 11 8\n")
    entries = read_class_list(str(tmp_path / "l.txt"), 20)
    assert [n for n, _ in entries] == ["2007_000032", "2007_000039", "2007_000063"]
    for (_, lab), classes in zip(entries, ([0, 14], [19], [8, 11])):
        want = np.zeros(20, np.float32)
        for c in classes:
            want[c] = 1
        assert np.array_equal(lab, want)


def test_read_class_list_errors_name_the_file(tmp_path):
    (tmp_path / "l.txt").write_text("a 0 20\n")
    with pytest.raises(ValueError, match=r"l\.txt:1.*class 20"):
        read_class_list(str(tmp_path / "l.txt"), 20)
    with pytest.raises(DataFileError, match="nope.txt"):
        read_class_list(str(tmp_path / "nope.txt"), 20)


def test_read_class_list_names_with_folder_or_extension(tmp_path):
    (tmp_path / "l.txt").write_text("JPEGImages/2007_000032.jpg 3\n2007_000039.JPG 4\n/x/y/2007_000063 5\n")
    entries = read_class_list(str(tmp_path / "l.txt"), 20)
    assert [n for n, _ in entries] == ["2007_000032", "2007_000039", "2007_000063"]
    assert [int(lab.argmax()) for _, lab in entries] == [3, 4, 5]


def test_sixteen_bit_mask_above_255_is_refused_naming_the_file(tmp_path):
    from rca_fast.data.voc import load_mask

    ok = np.array([[0, 3], [255, 1]], np.uint16)
    Image.fromarray(ok).save(tmp_path / "ok.png")  # a 16-bit grey PNG
    assert np.array_equal(load_mask(str(tmp_path / "ok.png")), ok.astype(np.uint8))
    bad = np.array([[0, 3], [300, 1]], np.uint16)  # 300 would wrap to 44 in uint8
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(DataFileError, match=r"bad\.png.*300"):
        load_mask(str(tmp_path / "bad.png"))


def test_irn_cls_labels(tmp_path, gen):
    L = 20
    vecs = (torch.rand(3, L, generator=gen) < 0.2).float().numpy()
    # IRN stores 2007_000032 as the integer 2007000032; a str key works as well
    np.save(tmp_path / "cls_labels.npy", {2007000032: vecs[0], 2008000005: vecs[1], "2011_003276": vecs[2]})
    (tmp_path / "names.txt").write_text("2007_000032\n2008_000005\n2011_003276\n")
    labels = load_cls_labels(str(tmp_path / "cls_labels.npy"))
    entries = read_class_list(str(tmp_path / "names.txt"), L, labels)
    for (name, lab), want in zip(entries, vecs):
        assert np.array_equal(lab, want), name
    (tmp_path / "bad.txt").write_text("2012_000001\n")
    with pytest.raises(ValueError, match="2012_000001"):
        read_class_list(str(tmp_path / "bad.txt"), L, labels)


def test_write_class_list_from_masks(tmp_path):
    truth = [("a", [2, 7]), ("b", []), ("c", [19])]
    _write_voc(tmp_path, truth)
    rows = write_class_list(str(tmp_path / "SegmentationClass"), ["a", "b", "c"], str(tmp_path / "out.txt"))
    assert rows == [("a", [2, 7]), ("b", []), ("c", [19])]
    assert (tmp_path / "out.txt").read_text().split("\n")[:3] == ["a 2 7", "b", "c 19"]
    with pytest.raises(DataFileError, match=r"SegmentationClass[/\\]zz\.png"):
        write_class_list(str(tmp_path / "SegmentationClass"), ["zz"], str(tmp_path / "o2.txt"))


def test_voc_datasets_and_file_errors(tmp_path):
    _write_voc(tmp_path, [("a", [1]), ("b", [3, 4]), ("bad", [0])], broken=("bad",))
    (tmp_path / "train.txt").write_text("a 1\nb 3 4\n")
    ds = VOCClassification(str(tmp_path / "train.txt"), str(tmp_path / "JPEGImages"), 20,
                           TrainTransform(24, 16, seed=0))
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["label"].nonzero().flatten().tolist() == [3, 4]
    seg = VOCSegmentation(str(tmp_path / "train.txt"), str(tmp_path / "JPEGImages"), 20,
                          mask_dir=str(tmp_path / "SegmentationClass"), long_side=12)
    it = seg[0]
    assert it["mask"].shape == (20, 24) and it["image"].shape == (3, 10, 12) and it["size"] == (20, 24)
    # a missing image: named at construction
    (tmp_path / "missing.txt").write_text("a 1\nghost 2\n")
    with pytest.raises(DataFileError, match=r"JPEGImages[/\\]ghost\.jpg"):
        VOCClassification(str(tmp_path / "missing.txt"), str(tmp_path / "JPEGImages"), 20,
                          TrainTransform(24, 16))
    # an unreadable image: named when loaded
    (tmp_path / "broken.txt").write_text("bad 0\n")
    ds = VOCClassification(str(tmp_path / "broken.txt"), str(tmp_path / "JPEGImages"), 20,
                           TrainTransform(24, 16))
    with pytest.raises(DataFileError, match=r"bad\.jpg"):
        ds[0]
    # a missing mask
    os.remove(tmp_path / "SegmentationClass" / "b.png")
    with pytest.raises(DataFileError, match=r"SegmentationClass[/\\]b\.png"):
        VOCSegmentation(str(tmp_path / "train.txt"), str(tmp_path / "JPEGImages"), 20,
                        mask_dir=str(tmp_path / "SegmentationClass"))


def test_export_voc_roundtrip(tmp_path):
    paths = export_voc(str(tmp_path), train=4, val=2, num_classes=5, image_size=32, seed=2)
    syn = SyntheticShapes(4, 5, 32, seed=2)
    entries = read_class_list(paths["train_list"], 5)
    assert [n for n, _ in entries] == syn.names
    for (name, lab), want in zip(entries, syn.labels):
        assert np.array_equal(lab, want)
    mask = np.asarray(Image.open(tmp_path / "SegmentationClass" / f"{syn.names[1]}.png"))
    assert np.array_equal(mask, syn.masks[1])
    rows = write_class_list(str(tmp_path / "SegmentationClass"), syn.names, str(tmp_path / "re.txt"), 5)
    assert [sorted(c) for _, c in rows] == [np.flatnonzero(l).tolist() for l in syn.labels]


def test_data_cli_class_list(tmp_path, capsys):
    from rca_fast.data.__main__ import main as data_main

    _write_voc(tmp_path, [("a", [4]), ("b", [0, 9])])
    (tmp_path / "names.txt").write_text("a\nb\n")
    data_main(["class-list", "--data-root", str(tmp_path), "--names", "names.txt", "--out",
               str(tmp_path / "o.txt")])
    assert (tmp_path / "o.txt").read_text() == "a 4\nb 0 9\n"
    data_main(["synthetic", "--out", str(tmp_path / "syn"), "--train", "2", "--val", "1", "--image-size",
               "32"])
    assert (tmp_path / "syn" / "JPEGImages" / "syn_val_00000.jpg").is_file()
