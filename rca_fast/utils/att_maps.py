"""``--att_dir``: the training images' final maps, max-accumulated over epochs (the public train.py).

The public code, from its second epoch on (0-based epoch >= 1), takes for every training image j
of a batch and every present class c the final map O[j, c] (negatives set to 0, divided by its
max + 1e-8, x255, rounded), and when sigmoid(GAP(O))[j, c] >= 0.1 writes it -- or the element-wise
maximum with the file already there -- to ``<att_dir>/<index>_<c>.png``; in its last epoch a map
whose file does not exist yet is written whatever the score.

What :class:`AttentionMaps` does the same: the gate (probability >= 0.1), the normalisation and
rounding to 0..255, the maximum over epochs, the last-epoch write, from the second epoch on
(``start_epoch`` = 2, 1-based here as in the trainer).  Where it differs, and why:

* **names**: ``<image name>_<class>.png`` (``syn_train_00012_3.png``), not the position in the
  epoch (the public ``index + j``, which names images by their list position only because its
  loader does not shuffle; ``--input-pipeline augmented`` does, and ``rca_fast.pseudo`` /
  ``gen_labels.py`` read names);
* **where the running maximum lives**: in memory at feature resolution (uint8, one
  ``ceil(h / stride) x ceil(w / stride)`` grid per (image, present class) for the image resized
  to ``--input_size``), not as PNGs read and re-written every step; PNGs are written once at the
  end (:meth:`write_pngs`), upsampled (bilinear) to each image's own size -- what the next step
  needs (the public files are at feature size of the training input and need resizing);
* **augmentation**: the public loader has no crop or flip (square resize + colour jitter only),
  as ``--input-pipeline public`` (the default); ``augmented`` flips (synthetic, VOC) and crops
  (VOC).  Each item's ``view`` (see :func:`identity_view`) says where the input came from, and
  its map is put back in place (flipped back, shifted, rescaled -- the square input stretched
  back to the image's aspect) on the image's grid before the maximum; grid cells a crop did not
  cover keep their value.  Items without a ``view`` are taken as the whole image, unflipped;
* **scale-out and resume**: each DDP rank accumulates the images it sees; the "exists" flags
  are merged across ranks (all-reduce MAX) at the start of every epoch, so the last-epoch rule
  is decided as in a single process; the maps are merged (element-wise max, tensor all-reduces:
  :meth:`merge_ranks`) when a checkpoint is written and at the end; the checkpoint holds them,
  so ``--resume`` continues the maxima;
* **every tagged class gets a map**: the public loader shows every image in every epoch, so its
  last-epoch rule writes a map for every tagged class.  The trainer guarantees that outcome
  whatever the data order: after training, tagged classes still without a map (the
  ``augmented`` pipeline drops a shuffled partial batch; ``--max-steps``) are filled by one
  more forward pass of their images (:meth:`missing`, ``Trainer.fill_att_maps``).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# view layout (int64): original (H0, W0), resized (h, w), flip, crop source (sy, sx), crop
# destination (dy, dx), copied size (hh, ww); crop pixel (dy + t, dx + u) = resized (sy + t, sx + u),
# in the resized image after the flip.
VIEW_FIELDS = ("H0", "W0", "h", "w", "flip", "sy", "sx", "dy", "dx", "hh", "ww")


def identity_view(height: int, width: int, flip: bool = False) -> torch.Tensor:
    """The ``view`` of an un-cropped (H, W) image, optionally flipped."""
    return torch.tensor([height, width, height, width, int(bool(flip)), 0, 0, 0, 0, height, width],
                        dtype=torch.int64)


class AttentionMaps:
    """Running maxima of the training images' final maps (see the module doc).

    Args:
        att_dir: output folder.  names: image names of the training set (by dataset index).
        num_classes: L.  input_size: the long side images are resized to for training.
        epochs: the run's last epoch (1-based).  threshold: probability gate (0.1).
        start_epoch: first (1-based) epoch that accumulates (2 = the public second epoch).
    """

    def __init__(self, att_dir: str, names: Sequence[str], num_classes: int, input_size: int, epochs: int, *,
                 threshold: float = 0.1, start_epoch: int = 2):
        self.att_dir, self.names = att_dir, list(names)
        self.num_classes, self.input_size, self.epochs = int(num_classes), int(input_size), int(epochs)
        self.threshold, self.start_epoch = float(threshold), int(start_epoch)
        self.maps: Dict[Tuple[int, int], torch.Tensor] = {}          # (index, class) -> (gh, gw) uint8
        self.sizes: Dict[int, Tuple[int, int]] = {}                    # index -> (H0, W0)
        self.exists = torch.zeros(len(self.names), self.num_classes, dtype=torch.bool)
        self._grids: Dict = {}  # (view, grid, crop, device) -> sampling grid (views repeat: flips)

    # ---------------------------------------------------------------- geometry
    def grid_size(self, height: int, width: int, stride: float) -> Tuple[int, int]:
        """Feature-resolution grid of an (H0, W0) image resized to long side ``input_size``."""
        scale = self.input_size / max(height, width)
        h1, w1 = max(1, round(height * scale)), max(1, round(width * scale))
        return max(1, math.ceil(h1 / stride)), max(1, math.ceil(w1 / stride))

    @staticmethod
    def _sampling(view: Sequence[int], grid: Tuple[int, int], crop: Tuple[int, int], feat: Tuple[int, int],
                  device) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Where each image-grid cell lies in the crop's feature map.

        Returns (rows, cols, covered): with ``cols`` given, every cell lands exactly on a feature
        cell (no rescale: a flip, a shift by whole cells) and ``rows``/``cols`` are (gh,)/(gw,)
        int64 indices -- an exact gather; with ``cols`` None, ``rows`` is a (1, gh, gw, 2)
        grid_sample grid (bilinear).  ``covered`` (gh, gw) bool: cells inside the crop's image part.
        """
        H0, W0, h, w, flip, sy, sx, dy, dx, hh, ww = [int(v) for v in view]
        gh, gw = grid
        ch, cw = crop
        fh, fw = feat
        # centres of the image-grid cells as fractions of the image, then as resized-image pixels
        yr = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh * h - 0.5
        xr = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * w - 0.5
        if flip:
            xr = (w - 1) - xr
        ok_y = (yr >= sy - 0.5) & (yr < sy + hh - 0.5)
        ok_x = (xr >= sx - 0.5) & (xr < sx + ww - 0.5)
        covered = (ok_y[:, None] & ok_x[None, :]).to(device)
        # crop pixels -> feature-cell coordinates (cell centres at integers)
        fy = (yr - sy + dy + 0.5) * fh / ch - 0.5
        fx = (xr - sx + dx + 0.5) * fw / cw - 0.5
        iy, ix = fy.round(), fx.round()
        if (fy - iy).abs().max() < 1e-6 and (fx - ix).abs().max() < 1e-6:
            return (iy.clamp(0, fh - 1).long().to(device), ix.clamp(0, fw - 1).long().to(device), covered)
        gy, gx = (fy + 0.5) / fh * 2 - 1, (fx + 0.5) / fw * 2 - 1   # align_corners=False
        coords = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
        return coords[None].float().to(device), None, covered

    # ---------------------------------------------------------------- accumulation
    @torch.no_grad()
    def update(self, cams: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
               epoch: int, input_hw: Tuple[int, int], views: Optional[torch.Tensor] = None) -> int:
        """Fold one batch in.

        Args:
            cams: (B, L, hf, wf) final maps O of the training crops (any device/dtype).
            logits: (B, L) their GAP.  labels: (B, L) 0/1 tags.  indices: B dataset indices.
            epoch: 1-based epoch.  input_hw: (H, W) of the training input (the crop).
            views: (B, 11) int64 (:data:`VIEW_FIELDS`) or None (the input is the whole image).
        Returns:
            the number of (image, class) maps updated.
        """
        if epoch < self.start_epoch:
            return 0
        last = epoch >= self.epochs
        B, L, hf, wf = cams.shape
        size_in = (int(input_hw[0]), int(input_hw[1]))
        stride = size_in[0] / hf
        probs = torch.sigmoid(logits.detach().float()).cpu()
        present = (labels.detach().cpu() > 0)
        maps = F.relu(cams.detach().float())
        maps = maps / (maps.flatten(2).amax(dim=2)[..., None, None] + 1e-8)
        updated = 0
        for j in range(B):
            idx = int(indices[j])
            classes = [c for c in torch.nonzero(present[j]).flatten().tolist()
                       if probs[j, c] >= self.threshold or (last and not bool(self.exists[idx, c]))]
            if not classes:
                continue
            view = identity_view(*size_in).tolist() if views is None else views[j].tolist()
            grid = self.grid_size(view[0], view[1], stride)
            key = (tuple(view), grid, size_in, str(maps.device))
            if key not in self._grids:
                if len(self._grids) > 4096:  # random crops rarely repeat: keep the cache bounded
                    self._grids.clear()
                self._grids[key] = self._sampling(view, grid, size_in, (hf, wf), maps.device)
            rows, cols, covered = self._grids[key]
            if cols is not None:
                sampled = maps[j, classes][:, rows][:, :, cols]
            else:
                sampled = F.grid_sample(maps[j:j + 1, classes], rows, mode="bilinear", padding_mode="border",
                                        align_corners=False)[0]
            quant = torch.round(sampled * 255).clamp_(0, 255).to(torch.uint8).cpu()
            covered = covered.cpu() if covered.device.type != "cpu" else covered
            self.sizes[idx] = (int(view[0]), int(view[1]))
            for k, c in enumerate(classes):
                old = self.maps.get((idx, c))
                new = torch.where(covered, quant[k], torch.zeros_like(quant[k]))
                self.maps[(idx, c)] = new if old is None else torch.maximum(old, new)
                self.exists[idx, c] = True
                updated += 1
        return updated

    # ---------------------------------------------------------------- DDP
    def sync_exists(self) -> None:
        """All-reduce (MAX) of the exists flags (call on every rank at the start of an epoch).

        The trainer's end-of-epoch checkpoint already merges them (:meth:`merge_ranks`); this keeps
        the last-epoch rule right where an epoch ends without one."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        from ..distributed import collective_device
        t = self.exists.to(torch.uint8).to(collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.exists = t.cpu().bool()

    def merge_ranks(self, chunk_bytes: int = 64 << 20) -> None:
        """Element-wise max of every rank's maps, on every rank (collective).

        Tensor all-reduces (MAX) only, no pickled objects: the exists flags; which (image, class)
        holds a map on some rank and each image's (H0, W0, gh, gw); then the maps in one flat uint8
        buffer laid out the same on every rank (image-major, then class), a rank's missing maps as
        zeros, reduced in pieces of ``chunk_bytes`` (so the device never holds the whole buffer:
        ~500 MB for COCO's train set)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        from ..distributed import collective_device
        dev = collective_device()

        def reduce_max(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.cpu()

        n, L = self.exists.shape
        self.exists = reduce_max(self.exists.to(torch.uint8)).bool()
        have = torch.zeros(n, L, dtype=torch.uint8)
        geo = torch.zeros(n, 4, dtype=torch.int64)   # H0, W0, gh, gw (equal wherever known)
        for (i, c), m in self.maps.items():
            have[i, c] = 1
            geo[i, 2], geo[i, 3] = m.shape
        for i, (h0, w0) in self.sizes.items():
            geo[i, 0], geo[i, 1] = h0, w0
        have, geo = reduce_max(have).bool(), reduce_max(geo)
        keys = [tuple(k) for k in have.nonzero().tolist()]          # the common layout
        cells = [int(geo[i, 2] * geo[i, 3]) for i, _ in keys]
        flat = (
            torch.cat(
                [
                    self.maps[k].reshape(-1) if k in self.maps else torch.zeros(cells[j], dtype=torch.uint8)
                    for j, k in enumerate(keys)
                ]
            )
            if keys
            else torch.zeros(0, dtype=torch.uint8)
        )
        step = max(1, int(chunk_bytes))
        for start in range(0, flat.numel(), step):
            flat[start:start + step] = reduce_max(flat[start:start + step])
        offset = 0
        for (i, c), size in zip(keys, cells):
            self.maps[(i, c)] = flat[offset:offset + size].reshape(int(geo[i, 2]), int(geo[i, 3])).clone()
            self.sizes[i] = (int(geo[i, 0]), int(geo[i, 1]))
            offset += size

    def missing(self, tags: torch.Tensor) -> torch.Tensor:
        """(N, L) bool: tagged (image, class) pairs that have no map yet (``tags`` (N, L) 0/1)."""
        return (torch.as_tensor(tags) > 0) & ~self.exists

    @torch.no_grad()
    def fill_missing(self, model: torch.nn.Module, dataset, batch_size: int, device, collate) -> int:
        """Maps for the tagged classes that have none yet; returns how many were written.

        The public loader shows every image in its last epoch, so its last-epoch rule gives every
        tagged class a map (``rca_fast.pseudo`` needs them all).  Where a run did not see an image
        then (``--input-pipeline augmented`` drops a shuffled partial batch, and DDP's sampler the
        remainder over the ranks), the image goes through the trained ``model`` once more (eval
        mode, no gradient, ``dataset``'s training transform, batches of ``batch_size`` stacked by
        ``collate``) and only its missing classes are written, by the last-epoch rule (whatever
        the score).  ``dataset``: items with ``image``, ``index`` (and ``view``); ``labels`` (N, L).
        """
        todo = self.missing(torch.as_tensor(np.asarray(dataset.labels)))
        images = todo.any(dim=1).nonzero().flatten().tolist()
        if not images:
            return 0
        last = max(self.epochs, self.start_epoch)   # an epoch where the last-epoch rule applies
        was_training = model.training
        model.eval()
        written = 0
        for start in range(0, len(images), batch_size):
            batch = collate([dataset[i] for i in images[start:start + batch_size]])
            out = model(batch["image"].to(device))
            written += self.update(out.cams, out.logits, todo[batch["index"]], batch["index"], last,
                                   batch["image"].shape[-2:], batch.get("view"))
        model.train(was_training)
        return written

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors only (checkpoints load with weights_only=True)."""
        keys = sorted(self.maps)
        shapes = [tuple(self.maps[k].shape) for k in keys]
        flat = torch.cat([self.maps[k].reshape(-1) for k in keys]) if keys else torch.zeros(0,
                                                                                            dtype=torch.uint8)
        sizes = sorted(self.sizes)
        return {"keys": torch.tensor(keys, dtype=torch.int64).reshape(-1, 2),
                "shapes": torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2), "values": flat,
                "size_index": torch.tensor(sizes, dtype=torch.int64),
                "sizes": torch.tensor([self.sizes[i] for i in sizes], dtype=torch.int64).reshape(-1, 2),
                "exists": self.exists.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], merge: bool = False) -> None:
        """Restore (or, with ``merge``, max-merge) a :meth:`state_dict`; ValueError on another dataset."""
        exists = state["exists"].cpu().bool()
        if tuple(exists.shape) != tuple(self.exists.shape):
            raise ValueError(f"attention maps in the checkpoint are for {tuple(exists.shape)} (images, "
                             "classes), "
                             f"this run has {tuple(self.exists.shape)}")
        if not merge:
            self.maps, self.sizes = {}, {}
            self.exists = exists.clone()
        else:
            self.exists |= exists
        values, offset = state["values"].cpu(), 0
        for (i, c), (gh, gw) in zip(state["keys"].tolist(), state["shapes"].tolist()):
            m = values[offset:offset + gh * gw].reshape(gh, gw).clone()
            offset += gh * gw
            old = self.maps.get((i, c))
            self.maps[(i, c)] = m if old is None else torch.maximum(old, m)
        for i, hw in zip(state["size_index"].tolist(), state["sizes"].tolist()):
            self.sizes[int(i)] = (int(hw[0]), int(hw[1]))

    # ---------------------------------------------------------------- output
    def image_map(self, index: int, cls: int) -> np.ndarray:
        """(H0, W0) uint8 of one accumulated map at its image's size (bilinear from the grid)."""
        m = self.maps[(index, cls)].float()[None, None]
        up = F.interpolate(m, size=self.sizes[index], mode="bilinear", align_corners=False)[0, 0]
        return up.round().clamp(0, 255).to(torch.uint8).numpy()

    def write_pngs(self, progress: bool = True) -> int:
        """Write ``<att_dir>/<name>_<class>.png`` for every accumulated map; returns the count."""
        from PIL import Image
        from tqdm import tqdm

        os.makedirs(self.att_dir, exist_ok=True)
        for (i, c) in tqdm(sorted(self.maps), desc="attention maps", disable=not progress, leave=False,
                           dynamic_ncols=True):
            Image.fromarray(self.image_map(i, c)).save(os.path.join(self.att_dir, f"{self.names[i]}_{c}.png"))
        return len(self.maps)

