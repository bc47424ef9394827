"""--att_dir map grids of images whose resized size is not a multiple of the feature stride.

The running maxima live on a ``ceil(h / stride) x ceil(w / stride)`` grid of the image resized
to ``--input_size`` (rca_fast.utils.att_maps): the feature map a network with padded
convolutions gives for that image, its last row and column partly outside it.  Oracle: integer
ceilings written here, and where a single hot feature cell of a crop must land on that grid.
"""
import math

import numpy as np
import torch

from rca_fast.utils.att_maps import AttentionMaps

STRIDE, CROP = 8, 48  # a 48 x 48 crop gives a 6 x 6 feature map


def test_grid_is_the_ceiling_of_the_resized_size_over_the_stride(gen, tmp_path):
    checked = 0
    while checked < 6:
        H0, W0 = (int(v) for v in torch.randint(37, 97, (2,), generator=gen))
        size = int(torch.randint(50, 75, (1,), generator=gen))
        scale = size / max(H0, W0)
        h, w = max(1, round(H0 * scale)), max(1, round(W0 * scale))
        if h % STRIDE == 0 and w % STRIDE == 0:
            continue  # ceil and floor agree: not the case under test
        want = (-(-h // STRIDE), -(-w // STRIDE))
        assert want != (h // STRIDE, w // STRIDE)
        hh, ww = min(CROP, h), min(CROP, w)
        fy = int(torch.randint(0, (hh - 1) // STRIDE + 1, (1,), generator=gen))
        fx = int(torch.randint(0, (ww - 1) // STRIDE + 1, (1,), generator=gen))
        cams = torch.zeros(1, 1, CROP // STRIDE, CROP // STRIDE)
        cams[0, 0, fy, fx] = 1.0
        view = torch.tensor([[H0, W0, h, w, 0, 0, 0, 0, 0, hh, ww]])   # crop at the resized image's origin
        acc = AttentionMaps(str(tmp_path / f"att{checked}"), ["a"], 1, input_size=size, epochs=5)
        acc.update(cams, torch.zeros(1, 1), torch.ones(1, 1), [0], 2, (CROP, CROP), view)
        m = acc.maps[(0, 0)].numpy()
        assert m.shape == want, f"image {H0}x{W0} resized to {h}x{w}: grid {m.shape}, ceil gives {want}"
        # the hot cell's centre in resized pixels lands in the grid cell of that position
        cy, cx = fy * STRIDE + (STRIDE - 1) / 2, fx * STRIDE + (STRIDE - 1) / 2
        iy, ix = np.unravel_index(np.argmax(m), m.shape)
        assert (
            abs(iy - math.floor((cy + 0.5) / h * want[0])) <= 1
            and abs(ix - math.floor((cx + 0.5) / w * want[1])) <= 1
        )
        # grid cells whose centre lies beyond what the crop copied were not seen: 0
        rows = [(g + 0.5) / want[0] * h - 0.5 >= hh - 0.5 for g in range(want[0])]
        cols = [(g + 0.5) / want[1] * w - 0.5 >= ww - 0.5 for g in range(want[1])]
        assert all(m[g].max() == 0 for g in range(want[0]) if rows[g])
        assert all(m[:, g].max() == 0 for g in range(want[1]) if cols[g])
        assert acc.image_map(0, 0).shape == (H0, W0)
        checked += 1
