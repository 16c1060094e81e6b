"""A recipe's model: what the backbone's name did not tell (depth, numerics) read from timm, the timm
backbone with the recipe's weights, the method's modules around it (`UfgirViT`), and the checks a
built model must pass (a plugin's rules, every adapted module on the forward path)."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..recipe import ModelConfig
from .backbone import backbone_facts, create_backbone
from .methods import build_method, check_plugin
from .methods.onpath import check_on_path
from .vit import UfgirViT


def build_model(model_cfg: ModelConfig, num_classes: int) -> UfgirViT:
    """The model of a recipe: timm backbone with the recipe's weights, plus the method's modules."""
    if num_classes is None or num_classes < 2:
        raise RecipeError("model.num_classes must be >= 2 (set it, or let training take it from the dataset)")
    if not (model_cfg.resolved and model_cfg.numerics_resolved):  # the name did not tell them: ask timm
        depth, numerics = backbone_facts(model_cfg)
        model_cfg = model_cfg.for_backbone(depth).with_numerics(numerics)
    method = build_method(model_cfg)
    vit = create_backbone(model_cfg, num_classes if method.timm_head else 0)
    model = UfgirViT(vit, model_cfg, num_classes, method)
    if not next(model.parameters()).is_meta:
        if method.spec.origin:
            check_plugin(model)
        check = method.path_check(model)
        if check is not None:
            # One image: a forward and a backward per mode, once per configuration and process
            # (about 1 % of an epoch of the smallest UFG dataset for ViT-B/16 on a CPU).
            check_on_path(model, check, torch.randn(1, *model.data_config()["input_size"],
                                                    generator=torch.Generator().manual_seed(0)))
    return model


def meta_model(model_cfg: ModelConfig, num_classes: int) -> UfgirViT:
    """The recipe's model on the meta device: every check of the build, its structure, shapes and
    cost, without weights or memory (a ViT-L in about a second)."""
    with torch.device("meta"):
        return build_model(model_cfg.model_copy(update={"weights": "none"}), num_classes)


__all__ = ["build_model", "meta_model"]
