"""The RCA head written the way the public RCA code runs it: Python loops per image, per present
class and per bank row (the baseline (a) of ``benchmarks/bench_rca_head.py`` and of the step
profile's comparison, ``rca_fast.profile.step_mode.compare_public``).

Written from the description in DESIGN §2 (no public code is copied):
  * masked average pooling per (image, present class): mask = softmax-over-classes CAM > its
    spatial mean, ``sum(feature * mask) / sum(mask)``, for the projector features (queries) and
    the backbone features (bank rows);
  * region mixup per region: partner = a random present class of a random image, w ~ Beta(a, a);
  * NCE per region against the whole bank (cosine, tau), per positive slot
    ``-log(e^{s+} / (e^{s+} + sum_neg e^{s-}))`` averaged over the S slots, with the public
    code's stabilisation (subtract the row max, clamp the denominator at 1e-4);
  * loss per image = mean over its regions, summed over images;
  * bank update row by row at the class's ring pointer for the rows whose score is above the
    threshold.
The loops are written sensibly (the normalised bank is computed once per step, the negatives'
sum once per region), so the comparison measures vectorisation, not a careless baseline.
"""
from __future__ import annotations

import random
from typing import List, Tuple

import torch
import torch.nn.functional as F


def _nce_public(sims: torch.Tensor, c: int) -> torch.Tensor:
    """One region's eq. 4 from its similarities (L, S) / tau to every bank slot, class c."""
    pos = sims[c]                                                         # (S,)
    neg = torch.cat([sims[:c], sims[c + 1:]]).reshape(-1)                 # ((L-1) S,)
    top = torch.cat([pos, neg]).max().detach()
    pos_e, neg_sum = torch.exp(pos - top), torch.exp(neg - top).sum()
    return -torch.log(pos_e / (pos_e + neg_sum).clamp(min=1e-4)).mean()


def public_rca_head(features: torch.Tensor, query_features: torch.Tensor, cams: torch.Tensor,
                    score_logits: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, *,
                    temperature: float = 0.07, alpha: float = 8.0, rng: random.Random
                    ) -> Tuple[torch.Tensor, List[Tuple[int, torch.Tensor, float]]]:
    """Contrast loss (scalar, differentiable w.r.t. ``query_features``) and the bank rows.

    Args: features (B, D, H, W) backbone features; query_features (B, D, H, W) projector features;
    cams (B, L, H, W) coarse CAMs; score_logits (B, L): the logits whose sigmoid gates
    the bank write (the public code passes its final head's, GAP of O); labels (B, L) 0/1; bank (L, S, D);
    rng: Python random generator for the mixup draws.
    Returns: (loss, [(class, bank row (D,), score)]).
    """
    B, L = labels.shape
    probs = torch.softmax(cams.detach(), dim=1)
    regions = [[] for _ in range(B)]                                      # per image: (class, query)
    rows = []
    for b in range(B):
        for l in range(L):
            if labels[b, l] == 0:
                continue
            mask = (probs[b, l] > probs[b, l].mean()).to(features.dtype)
            n = mask.sum()
            if n == 0:
                continue
            query = (query_features[b] * mask).sum(dim=(1, 2)) / n
            emb = (features[b].detach() * mask).sum(dim=(1, 2)) / n
            regions[b].append((l, query))
            rows.append((l, emb, float(torch.sigmoid(score_logits[b, l]))))
    bank_n = F.normalize(bank.reshape(-1, bank.shape[-1]).float(), dim=1)
    images_with_regions = [b for b in range(B) if regions[b]]
    loss = query_features.new_zeros(())
    for b in range(B):
        if not regions[b]:
            continue
        image_loss = 0.0
        for l, query in regions[b]:
            j = rng.choice(images_with_regions)
            l_mix, q_mix = rng.choice(regions[j])
            w = rng.betavariate(alpha, alpha)
            mixed = w * query + (1 - w) * q_mix
            sims = (bank_n @ F.normalize(mixed, dim=0)).reshape(L, -1) / temperature
            image_loss = image_loss + w * _nce_public(sims, l) + (1 - w) * _nce_public(sims, l_mix)
        loss = loss + image_loss / len(regions[b])
    return loss, rows


@torch.no_grad()
def public_bank_update(bank: torch.Tensor, ptr: List[int], rows, *, gamma: float = 0.99,
                       threshold: float = 0.7) -> int:
    """Row-by-row EMA write at each class's ring pointer; ``ptr`` is a Python list, advanced."""
    applied = 0
    S = bank.shape[1]
    for l, emb, score in rows:
        if score <= threshold:
            continue
        bank[l, ptr[l]] = gamma * bank[l, ptr[l]] + (1 - gamma) * emb
        ptr[l] = (ptr[l] + 1) % S
        applied += 1
    return applied
