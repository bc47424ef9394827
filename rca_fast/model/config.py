"""The model from the training flags: the keyword dict a checkpoint stores, the model built from
it, and the initialisation of the layers the tiny backbone needs (shared by every program that
builds or loads a model: train, infer, the profiler, the method check)."""
from __future__ import annotations

from typing import Dict, Optional

import torch


def model_config(args) -> Dict:
    """RCAModel keyword arguments from the flags (plain values: stored in checkpoints)."""
    return dict(num_classes=args.num_classes, backbone=args.backbone, bank_slots=args.bank_slots,
                prototypes=args.prototypes, gamma=args.gamma, score_threshold=args.score_threshold,
                temperature=args.temperature, contrast=bool(args.contrast), mixup=bool(args.mixup),
                mixup_alpha=args.mixup_alpha, aggregation=args.aggregation_mode,
                shared_final_head=bool(args.shared_final_head),
                bank_dtype=getattr(args, "bank_dtype", "float32"),
                attention_scale=getattr(args, "attention_scale", "sqrt"),
                prototype_init=getattr(args, "prototype_init", "randn"),
                first_write=getattr(args, "first_write", "ema"),
                kmeans_warm_start=bool(getattr(args, "kmeans_warm_start", False)))


def build_model(config: Dict, pretrained: Optional[str] = None):
    """An RCAModel from a :func:`model_config` dict (as stored in a checkpoint)."""
    from ..utils.checkpoint import dtype_from_name
    from .rca import RCAModel

    kwargs = dict(config)
    kwargs["bank_dtype"] = dtype_from_name(kwargs.get("bank_dtype", "float32"))
    return RCAModel(pretrained=pretrained, **kwargs)


def kaiming_init_(model: torch.nn.Module, keep_pretrained: bool = False) -> None:
    """He-normal (fan-in, ReLU) weights and zero biases for every conv and linear layer
    (with ``keep_pretrained``: of the layers not loaded from a pretrained backbone file).

    Why: the tiny backbone and the CAM heads have no normalisation layers; under PyTorch's
    default init each conv + ReLU shrinks the signal about 2.4x, so across the 8 layers from
    image to CAM it all but vanishes and SGD stays at the class prior.  He-normal keeps the
    scale, and the network learns.  (VGG16/ResNet50 come with their own init or weights.)
    """
    modules = model.new_modules() if keep_pretrained else [model]
    # The linear (public) aggregation keeps the public init (convs N(0, 0.01), PyTorch's Linear):
    # its output is a product of three He-scaled maps, q.k summed over all L*K prototypes times v,
    # which is not a conv + ReLU stack; He-normal there gave logits ~1e9 in the first steps and a
    # NaN loss (synthetic data, tiny backbone, lr 0.01).
    linear = getattr(model.aggregation, "mode", None) == "linear"
    skip = set(model.aggregation.modules()) if linear else set()
    for module in (m for top in modules for m in top.modules() if m not in skip):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
