"""The RCA network (DESIGN §2): backbone, coarse CAM head, region contrast with the memory bank,
prototype aggregation and the final CAM head.

    F = backbone(I)                          (B, D, h, w), output stride 8
    P = coarse_head(F)                       (B, L, h, w)   coarse CAMs
    F_hat = aggregation(F, bank prototypes)  (B, D, h, w)
    O = final_head(F_hat)                    (B, L, h, w)   final CAMs
    logits = GAP(O), coarse_logits = GAP(P)

With labels, the region of each present class l of image b is ``softmax_l(P)[b] > its spatial
mean``; its contrast query is the masked average of ``projector(F)``, its bank row the masked
average of F (detached), and the region-mixup NCE against the bank gives the contrast loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from .. import ops
from .backbones import BACKBONES, build_backbone
from .heads import CAMHead, PerClassCAMHead, Projector, PrototypeAggregation
from .memory_bank import MemoryBank

MIN_IMAGE_SIZE = 16  # two feature pixels per side at stride 8 (BatchNorm needs more than one value)


@dataclass
class RCAOutput:
    """What ``RCAModel.forward`` returns.  N = present (image, class) pairs with a non-empty region."""

    logits: torch.Tensor                          # (B, L) GAP of the final CAMs O
    cams: torch.Tensor                            # (B, L, h, w) final CAMs O
    coarse_logits: torch.Tensor                   # (B, L) GAP of the coarse CAMs P
    coarse_cams: torch.Tensor                     # (B, L, h, w)
    contrast_loss: Optional[torch.Tensor] = None  # scalar (labels given, contrast on)
    bank_emb: Optional[torch.Tensor] = None       # (N, D) detached masked averages of F
    bank_target: Optional[torch.Tensor] = None    # (N,) int64 class of each row
    bank_score: Optional[torch.Tensor] = None     # (N,) sigmoid of the FINAL-head logit of that class
    region_image: Optional[torch.Tensor] = None   # (N,) int64 image of each row
    mix_partner: Optional[torch.Tensor] = None    # (N,) int64 row mixed into each row (mixup on)
    mix_weight: Optional[torch.Tensor] = None     # (N,) weight w of each row's own region


class RegionContrast(NamedTuple):
    """Result of :func:`region_contrast` (rows ordered by image, then class)."""

    loss: Optional[torch.Tensor]     # scalar or None (contrast off)
    emb: torch.Tensor                # (N, D) detached bank rows
    target: torch.Tensor             # (N,) int64
    score: torch.Tensor              # (N,)
    image: torch.Tensor              # (N,) int64
    partner: Optional[torch.Tensor]  # (N,) int64 or None
    weight: Optional[torch.Tensor]   # (N,) or None


@torch.compiler.disable  # host-side draws with data-dependent sizes: torch.compile cannot trace them
def draw_mixup(region_image: torch.Tensor, num_images: int, alpha: float,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Region-mixup draws, as the public code: each row's partner is a random present class of a
    random image of the batch; its weight is w ~ Beta(alpha, alpha).

    Args:
        region_image: (N,) int64 image of each row, sorted (rows grouped by image).
        num_images: B.  alpha: Beta parameter (> 0).
        generator: optional CPU ``torch.Generator``; with it the draws depend only on its state
            (the Beta draw runs on a forked global RNG seeded from it), without it on the global RNG.
    Returns:
        partner (N,) int64 row index (an image is drawn uniformly among the images holding at
        least one row, then a row of it uniformly) and weight (N,) float32, both on
        ``region_image.device``.
    """
    device = region_image.device
    img = region_image.detach().cpu()
    N = img.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device)
    per_image = torch.bincount(img, minlength=num_images)                  # (B,)
    first_row = per_image.cumsum(0) - per_image                             # rows are grouped by image
    candidates = per_image.nonzero().squeeze(1)
    pick = candidates[torch.randint(len(candidates), (N,), generator=generator)]
    within = (torch.rand(N, generator=generator, dtype=torch.float64) * per_image[pick]).long()
    partner = first_row[pick] + torch.minimum(within, per_image[pick] - 1)
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        weight = beta.sample((N,))
    else:
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            weight = beta.sample((N,))
    return partner.to(device), weight.to(device)


def region_contrast(features: torch.Tensor, query_features: Optional[torch.Tensor], coarse_cams: torch.Tensor,
                    score_logits: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, *,
                    temperature: float = 0.07, contrast: bool = True, mixup: bool = True,
                    mixup_alpha: float = 8.0, generator: Optional[torch.Generator] = None,
                    draws: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> RegionContrast:
    """The RCA head on given tensors: regions, bank rows and the region-mixup contrast loss.

    Args:
        features: (B, D, h, w) backbone features F (bank rows; no gradient taken).
        query_features: (B, D, h, w) projector features (contrast queries; differentiable);
            unused (may be None) when ``contrast`` is False.
        coarse_cams: (B, L, h, w) coarse CAMs P (regions = softmax over classes > spatial mean).
        score_logits: (B, L) the logits whose sigmoid is each row's bank score: the public code
            gates the bank write with its FINAL head's (GAP of O), which ``RCAModel`` passes.
        labels: (B, L) bool present classes.
        bank: (L, S, D) memory bank (constant).
        mixup: mix each query with a partner row (:func:`draw_mixup`, or ``draws`` = (partner
            (N,), weight (N,)) given by the caller, N = rows kept).
    Returns:
        RegionContrast.  Rows are the present (b, l) pairs in image-major order, without the
        empty regions (count 0): those enter neither the loss nor the bank.  The loss is each
        row's NCE (``w*NCE(q, l) + (1-w)*NCE(q, l_partner)`` with q mixed), averaged over an
        image's rows, summed over the images (0 when there is no row).
    """
    B, L = labels.shape
    # Masks from at least float32 probabilities, also under autocast (bf16 would merge near-ties).
    acc = torch.float64 if coarse_cams.dtype == torch.float64 else torch.float32
    probs = coarse_cams.detach().to(acc).softmax(dim=1)
    pairs = labels.nonzero()                                                # (n, 2) image-major
    image, target = pairs[:, 0], pairs[:, 1]
    with torch.no_grad():
        bank_emb, count = ops.masked_average_pool(features.detach(), probs, labels)
    keep = count[image, target] > 0                                         # drop empty regions
    image, target = image[keep], target[keep]
    emb = bank_emb[image, target]
    score = torch.sigmoid(score_logits.detach()[image, target])
    if not contrast:
        return RegionContrast(None, emb, target, score, image, None, None)
    query_emb, _ = ops.masked_average_pool(query_features, probs, labels)
    query = query_emb[image, target]                                        # (N, D)
    partner = weight = None
    if image.numel() == 0:
        return RegionContrast(query_features.sum() * 0, emb, target, score, image, None, None)
    if mixup:
        partner, weight = draws if draws is not None else draw_mixup(image, B, mixup_alpha, generator)
        weight = weight.to(query.dtype)
        w = weight.unsqueeze(1)
        query = w * query + (1 - w) * query[partner]
        per_row = ops.bank_nce_loss(query, bank, target, temperature=temperature,
                                    mix_target=target[partner], mix_weight=weight, reduction="none")
    else:
        per_row = ops.bank_nce_loss(query, bank, target, temperature=temperature, reduction="none")
    per_image = per_row.new_zeros(B).index_add(0, image, per_row)
    rows = torch.bincount(image, minlength=B).to(per_row.dtype)
    loss = (per_image / rows.clamp(min=1)).sum()
    return RegionContrast(loss, emb, target, score, image, partner, weight)


class RCAModel(nn.Module):
    """RCA classification network with its memory bank (interface: notes/model_api.md).

    Args:
        num_classes: L.  backbone: "vgg16" | "resnet50" | "tiny".
        pretrained: local torchvision-style state dict of the backbone (never downloaded).
        bank_slots: S.  prototypes: K per class.  gamma: bank EMA momentum.
        score_threshold: bank rows are written only when sigmoid(final-head logit) is above it.
        temperature: NCE tau.  contrast: compute the contrast loss.  mixup: region mixup
            (in training mode only; eval forwards use the plain NCE).  mixup_alpha: Beta parameter.
        aggregation: "softmax" (paper) | "linear" (public code) | "none".
        attention_scale: softmax temperature "sqrt" (1/sqrt(D)) | "one" | "learned".
        prototype_init, first_write, kmeans_warm_start: see :class:`MemoryBank`.
    New layers (heads, projector, aggregation, resnet50's conv1x1) get the public code's
    initialisation: every conv weight N(0, 0.01), PyTorch's default biases.
        shared_final_head: one final CAM head for all classes instead of one branch per class.
        final_head_impl: how the per-class final head runs its branches: "auto" (per device, see
            ``heads.FINAL_HEAD_AUTO``) or one of ``heads.FINAL_HEAD_IMPLS``; same parameters
            whichever runs (ignored with ``shared_final_head``).
        bank_dtype: dtype of the memory bank.
    Head widths equal the feature dimension D (512 for vgg16/resnet50, 64 for tiny).
    """

    def __init__(self, num_classes: int = 20, *, backbone: str = "vgg16", pretrained: Optional[str] = None,
                 bank_slots: int = 500, prototypes: int = 10, gamma: float = 0.99,
                 score_threshold: float = 0.7, temperature: float = 0.07, contrast: bool = True,
                 mixup: bool = True, mixup_alpha: float = 8.0, aggregation: str = "softmax",
                 shared_final_head: bool = False, bank_dtype: torch.dtype = torch.float32,
                 attention_scale: str = "sqrt", prototype_init: str = "randn", first_write: str = "ema",
                 kmeans_warm_start: bool = False, final_head_impl: str = "auto"):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"RCAModel: num_classes must be an int >= 1, got {num_classes!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"RCAModel: backbone must be one of {BACKBONES}, got {backbone!r}")
        if not temperature > 0:
            raise ValueError(f"RCAModel: temperature must be > 0, got {temperature}")
        if not mixup_alpha > 0:
            raise ValueError(f"RCAModel: mixup_alpha must be > 0, got {mixup_alpha}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone, pretrained)
        D = self.backbone.out_channels
        self.feature_dim = D
        self.temperature = float(temperature)
        self.contrast = bool(contrast)
        self.mixup = bool(mixup)
        self.mixup_alpha = float(mixup_alpha)
        self.aggregation_mode = aggregation
        self.coarse_head = CAMHead(D, D, num_classes)
        # Without contrast the projector would be an unused parameter set (DDP rejects those).
        self.projector = Projector(D) if self.contrast else None
        self.aggregation = PrototypeAggregation(D, aggregation, attention_scale)
        self.final_head = (CAMHead(D, D, num_classes) if shared_final_head
                           else PerClassCAMHead(D, D, num_classes, impl=final_head_impl))
        self.bank = MemoryBank(num_classes, bank_slots, D, gamma=gamma, prototypes=prototypes,
                               score_threshold=score_threshold, dtype=bank_dtype,
                               prototype_init=prototype_init,
                               first_write=first_write, kmeans_warm_start=kmeans_warm_start)
        self.init_new_layers_()

    @torch.no_grad()
    def init_new_layers_(self) -> None:
        """The public code's init of the layers RCA adds: conv weights N(0, 0.01), biases as PyTorch
        sets them (the Linear key/value layers keep PyTorch's default too)."""
        for module in self.new_modules():
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.normal_(0.0, 0.01)

    def new_modules(self) -> list:
        """Modules not in a pretrained backbone file: heads, projector, aggregation, backbone new layers."""
        mods = [self.coarse_head, self.final_head,
                self.aggregation] + ([self.projector] if self.projector else [])
        for prefix in self.backbone.new_layer_prefixes:
            mods.append(self.backbone.get_submodule(prefix.rstrip(".")))
        return mods

    def _check_inputs(self, images, labels) -> Optional[torch.Tensor]:
        """Validate images/labels; returns labels as bool (B, L) or None."""
        if not isinstance(images, torch.Tensor):
            raise TypeError("RCAModel.forward: images must be a torch.Tensor (B, 3, H, W), got "
                            f"{type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("RCAModel.forward: images must have shape (B, 3, H, W), got "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"RCAModel.forward: images must be a float tensor, got {images.dtype}")
        if min(images.shape[2:]) < MIN_IMAGE_SIZE or images.shape[0] < 1:
            raise ValueError(f"RCAModel.forward: images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} "
                             f"with B >= 1, got shape {tuple(images.shape)}")
        param = next(self.parameters())
        if images.device != param.device:
            raise ValueError(f"RCAModel.forward: images must be on the model's device {param.device}, "
                             f"got {images.device}")
        if labels is None:
            return None
        if not isinstance(labels, torch.Tensor):
            raise TypeError("RCAModel.forward: labels must be a torch.Tensor (B, L), got "
                            f"{type(labels).__name__}")
        want = (images.shape[0], self.num_classes)
        if tuple(labels.shape) != want:
            raise ValueError(f"RCAModel.forward: labels must have shape (B, L) = {want}, got "
                             f"{tuple(labels.shape)}")
        if labels.device != images.device:
            raise ValueError(f"RCAModel.forward: labels must be on {images.device} like images, got "
                             f"{labels.device}")
        if labels.dtype != torch.bool:
            if labels.is_complex() or not bool(((labels == 0) | (labels == 1)).all()):
                raise ValueError("RCAModel.forward: labels must be a 0/1 (or bool) multi-hot tensor, got "
                                 "other values")
            labels = labels != 0
        return labels

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                generator: Optional[torch.Generator] = None) -> RCAOutput:
        """Class scores and CAMs of both heads; with ``labels`` also the contrast loss and bank rows.

        Args:
            images: (B, 3, H, W) normalised float, H, W >= 16.
            labels: optional (B, L) 0/1 multi-hot (float, int or bool).
            generator: optional CPU generator for the mixup draws (reproducible runs and tests).
        Returns:
            RCAOutput (CAMs at output stride 8: h = H//8 for vgg16, ceil(H/8) for resnet50/tiny).
        """
        present = self._check_inputs(images, labels)
        features = self.backbone(images)
        coarse_cams = self.coarse_head(features)
        coarse_logits = coarse_cams.mean(dim=(2, 3))
        fused = self.aggregation(features, self.bank.prototypes)
        cams = self.final_head(fused)
        out = RCAOutput(logits=cams.mean(dim=(2, 3)), cams=cams, coarse_logits=coarse_logits,
                        coarse_cams=coarse_cams)
        if present is None:
            return out
        query_features = self.projector(features) if self.contrast else None
        # the bank write is gated by the final head's score, as the public code does
        rc = region_contrast(features, query_features, coarse_cams, out.logits, present, self.bank.bank,
                             temperature=self.temperature, contrast=self.contrast,
                             mixup=self.mixup and self.training, mixup_alpha=self.mixup_alpha,
                             generator=generator)
        out.contrast_loss, out.bank_emb = rc.loss, rc.emb
        out.bank_target, out.bank_score = rc.target, rc.score
        out.region_image, out.mix_partner, out.mix_weight = rc.image, rc.partner, rc.weight
        return out

    @torch.no_grad()
    def update_bank(self, out: RCAOutput) -> int:
        """EMA-write ``out``'s bank rows whose score is above the threshold; returns rows applied."""
        if not isinstance(out, RCAOutput):
            raise TypeError(f"RCAModel.update_bank: out must be an RCAOutput, got {type(out).__name__}")
        if out.bank_emb is None:
            return 0
        return self.bank.update(out.bank_emb, out.bank_target, out.bank_score)

    @torch.no_grad()
    def refresh_prototypes(self, seed: int = 0, **kmeans_kwargs) -> torch.Tensor:
        """k-means of each class's bank slots -> ``bank.prototypes`` (L, K, D) (kwargs: ``ops.kmeans``'s)."""
        return self.bank.refresh_prototypes(seed, **kmeans_kwargs)

    # parameters the public code names ``extra*`` (lr x10 / x20): its CAM heads and projector; our
    # resnet50's new conv1x1 is a head-like new layer and joins them
    EXTRA_PREFIXES = ("coarse_head.", "final_head.", "projector.")

    def is_extra(self, name: str) -> bool:
        if name.startswith(self.EXTRA_PREFIXES):
            return True
        return name.startswith("backbone.") and self.backbone.is_new_layer(name[len("backbone."):])

    def param_groups(self, lr: float, weight_decay: float) -> list:
        """SGD parameter groups with the public code's multipliers.

        ``extra`` parameters (the CAM heads, the projector; resnet50's conv1x1): weights lr x10,
        biases lr x20; every other parameter (backbone, and the aggregation's Q/K/V, ``aggre``
        (``out``) and ``concat_project`` (``fuse``) layers, which the public code does not name
        ``extra``): weights x1, biases x2.  Weight decay on every parameter, biases included, as
        the public code.  Every group carries ``lr_mult`` (for learning-rate schedules) and
        ``name``; empty groups are left out.
        """
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"RCAModel.param_groups: need lr > 0 and weight_decay >= 0, got {lr}, "
                             f"{weight_decay}")
        groups = {("base", "weight"): [], ("base", "bias"): [], ("extra", "weight"): [],
                  ("extra", "bias"): []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "extra" if self.is_extra(name) else "base"
            groups[(part, "bias" if name.endswith("bias") else "weight")].append(param)
        mults = {("base", "weight"): 1, ("base", "bias"): 2, ("extra", "weight"): 10, ("extra", "bias"): 20}
        return [{"params": params, "lr": lr * mults[key], "lr_mult": mults[key], "weight_decay": weight_decay,
                 "name": "_".join(key)}
                for key, params in groups.items() if params]
