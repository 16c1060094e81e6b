"""SSF and BitFit: PETL baselines that tune the backbone's own features, a few lines each.

SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features") follows each operation of the
frozen backbone with a learned per-channel scale and shift: the patch embedding's convolution, every
Linear (``qkv``, ``proj``, ``fc1``, ``fc2``) and every LayerNorm, the final one included. The head
and the CLS token train too, as in every other PETL row here. A scale and shift after a linear
operation fold into its weight and bias exactly (W' = diag(s) W, b' = s b + t), so the exported
graph is the plain ViT's. Initialisation is the paper's: scales N(1, 0.02^2), shifts N(0, 0.02^2).

BitFit (Ben Zaken et al., ACL 2022) trains every bias of the backbone (the patch embedding's, every
Linear's and every LayerNorm's) and the head; nothing is added.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..wrapped import keep_unwrapped_names
from .base import UfgirViT
from .linear import LinearHead
from .onpath import PathCheck

#: The layer types SSF follows with a scale and shift, and the dim of their output channels.
SSF_LAYERS: tuple[tuple[type[nn.Module], int], ...] = ((nn.Conv2d, 1), (nn.Linear, -1), (nn.LayerNorm, -1))


class ScaleShift(nn.Module):
    """``base_layer(x) * ssf_scale + ssf_shift`` along the output channels (dim 1 of a convolution's
    output, the last dim otherwise). ``weight`` and ``bias`` are the base layer's."""

    def __init__(self, base_layer: nn.Module, channels: int, dim: int):
        super().__init__()
        self.base_layer = base_layer
        self.dim = dim
        self.ssf_scale = nn.Parameter(torch.empty(channels))
        self.ssf_shift = nn.Parameter(torch.empty(channels))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
        nn.init.normal_(self.ssf_shift, std=0.02)

    @property
    def weight(self) -> torch.Tensor | None:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _along(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(y.dtype)
        return t.view(-1, *([1] * (y.dim() - 2))) if self.dim == 1 else t           # (C, 1, 1) or (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y * self._along(self.ssf_scale, y) + self._along(self.ssf_shift, y)

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The base layer with the scale and shift folded into its weight and bias (a new module)."""
        base = copy.deepcopy(self.base_layer)
        s, t = self.ssf_scale.detach(), self.ssf_shift.detach()
        if base.weight is None:  # a LayerNorm without affine: the scale becomes its weight
            base.weight = nn.Parameter(s.clone(), requires_grad=False)
        else:
            base.weight.mul_(s.view(-1, *([1] * (base.weight.dim() - 1))))
        if base.bias is None:
            base.bias = nn.Parameter(t.clone(), requires_grad=False)
        else:
            base.bias.mul_(s).add_(t)
        return base


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _backbone_layers(vit: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """The patch embedding's convolution, every Linear and LayerNorm of the backbone but its head:
    name -> (layer, dim of its output channels)."""
    out = {}
    for n, m in vit.named_modules():
        if not n or n == "head" or n.startswith("head."):
            continue
        for kind, dim in SSF_LAYERS:
            if isinstance(m, kind):  # timm's LayerNorm is a subclass of torch's
                out[n] = (m, dim)
                break
    return out


class SSF(LinearHead):
    """A learned per-channel scale and shift after every operation of the frozen backbone."""

    block_label = "SSF"
    merges = "the scales and shifts"

    def adapt_backbone(self, model: UfgirViT) -> None:
        for name, (layer, dim) in _backbone_layers(model.vit).items():
            channels = layer.out_channels if isinstance(layer, nn.Conv2d) else \
                layer.out_features if isinstance(layer, nn.Linear) else layer.normalized_shape[-1]
            wrapped = ScaleShift(layer, channels, dim)
            keep_unwrapped_names(wrapped)
            _replace(model.vit, name, wrapped)

    @staticmethod
    def _units(model: UfgirViT) -> dict[str, ScaleShift]:
        return {n: m for n, m in model.vit.named_modules() if isinstance(m, ScaleShift)}

    def trainable_parts(self, model: UfgirViT) -> dict[str, list[nn.Module | nn.Parameter]]:
        return {"ssf": [p for m in self._units(model).values() for p in (m.ssf_scale, m.ssf_shift)]}

    def path_check(self, model: UfgirViT) -> PathCheck:
        units = self._units(model)
        key = f"{type(self).__name__}|" + model.cfg.model_dump_json(exclude={"weights", "num_classes", "image_size"})
        return PathCheck(f"ssf on {model.cfg.backbone}", {n: [m.ssf_scale, m.ssf_shift] for n, m in units.items()},
                         dict(units), key=key)

    def export_model(self, model: UfgirViT) -> UfgirViT:
        """A copy with every scale and shift folded into the layer before it."""
        folded = copy.deepcopy(model)
        for name, m in self._units(folded).items():
            _replace(folded.vit, name, m.folded())
        return folded


class BitFit(LinearHead):
    """Every bias of the backbone trains, with the head."""

    block_label = "BitFit (biases)"
    # Nothing to merge: its trained biases are the backbone's own (`export_model` is the model itself,
    # already a plain timm ViT).

    @staticmethod
    def _biases(model: UfgirViT) -> dict[str, list[nn.Parameter]]:
        """Module name -> its biases, for every module of the backbone but the head: a layer's ``bias``, and
        the query and value biases that timm's Eva attention holds apart from its fused qkv."""
        return {n: bs for n, m in model.vit.named_modules() if n and n != "head" and not n.startswith("head.")
                if (bs := [p for k, p in m.named_parameters(recurse=False) if k in ("bias", "q_bias", "v_bias")])}

    def trainable_parts(self, model: UfgirViT) -> dict[str, list[nn.Module | nn.Parameter]]:
        return {"bias": [b for bs in self._biases(model).values() for b in bs]}

    def path_check(self, model: UfgirViT) -> PathCheck:
        biases = self._biases(model)
        key = f"{type(self).__name__}|" + model.cfg.model_dump_json(exclude={"weights", "num_classes", "image_size"})
        return PathCheck(f"bitfit on {model.cfg.backbone}", biases,
                         {n: model.vit.get_submodule(n) for n in biases}, key=key)


__all__ = ["SSF", "BitFit", "ScaleShift"]
