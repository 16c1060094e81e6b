"""CAL: counterfactual attention learning on WS-DAN attention maps (reference/FGIR.md §4), pure torch.

The head reads the backbone's patch tokens as a feature map (there is no CLS token), makes M attention
maps from it (1x1 conv, BatchNorm, ReLU) and pools the features under each map (bilinear attention
pooling, BAP). Training adds what makes CAL more than a head: a counterfactual branch (the same pooling
under random maps, whose logits are subtracted), class feature centres, and two more images per sample,
cropped to and dropped from one of its own attention maps. Evaluation crops the image to where the
mean map fires, at three thresholds, on the image and its mirror (or one crop, ``model.cal_single_crop``).
The :class:`CAL` method object runs these passes; `UfgirViT` only runs the backbone for it.

Everything that decides a box or a drop runs in float32 without gradient, and every random draw
(which maps, which thresholds, the counterfactual maps) comes from torch's seeded generators, which the
training checkpoint saves: a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..precision import float32_region
from .base import Method, Selection, TrainStep
from .two_pass import crop_resize

#: Added under the signed square root (and to the map sums that weight the choice of maps).
EPS = 1e-6
#: BAP features are scaled by this before the classifier, as WS-DAN does.
LOGIT_SCALE = 100.0
#: Evaluation crops from the mean map: (threshold as a fraction of the map's max, padding as a fraction
#: of the image side), in the reference's pass order; the single-crop mode keeps the last one.
EVAL_CROPS = ((0.3, 0.1), (0.2, 0.1), (0.1, 0.05))
SINGLE_CROP = EVAL_CROPS[-1:]
#: Training: the crop's threshold range and padding, the drop's threshold range, the centre step.
TRAIN_CROP_THETA, TRAIN_CROP_PADDING, TRAIN_DROP_THETA = (0.4, 0.6), 0.1, (0.2, 0.5)
CENTRE_BETA = 0.05


class CALOutput(NamedTuple):
    """What CAL's forward returns in train mode (and its loss reads)."""

    logits: torch.Tensor      # (B, C): (raw + crop) / 2, what a training accuracy would read
    raw: torch.Tensor         # (B, C): the raw image's logits
    aug: torch.Tensor         # (2B, C): the crops', then the drops' logits
    aux: torch.Tensor         # (3B, C): counterfactual effect (logits minus logits under random maps): raw, crops, drops
    features: torch.Tensor    # (B, M*D): the raw image's BAP features


def bilinear_pool(maps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """BAP: the features averaged under each map, (B, M, h, w) and (B, D, h, w) -> (B, M*D) flattened
    map-major (index m*D + d), signed square root (sign(0) = 0, so a dead map gives exact zeros), then
    L2-normalised over all M*D."""
    h, w = features.shape[-2:]
    pooled = torch.einsum("bmhw,bdhw->bmd", maps, features).flatten(1) / (h * w)  # (B, M*D)
    return F.normalize(torch.sign(pooled) * torch.sqrt(pooled.abs() + EPS), dim=-1)


class WSDANHead(nn.Module):
    """CAL's head: attention maps, BAP, a bias-free Linear on 100x the pooled features, the counterfactual
    branch, and the class feature centres (a buffer, so they are saved with the checkpoint; the
    reference kept them in a plain tensor and lost them on every restart)."""

    def __init__(self, dim: int, num_classes: int, maps: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(dim, maps, 1, bias=False)
        self.bn = nn.BatchNorm2d(maps, eps=1e-3)
        self.fc = nn.Linear(maps * dim, num_classes, bias=False)
        self.register_buffer("feature_center", torch.zeros(num_classes, maps * dim))

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> the M attention maps (B, M, h, w), non-negative."""
        return F.relu(self.bn(self.conv(features)))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(LOGIT_SCALE * pooled)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], counterfactual: bool = False,
                pre_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Patch tokens (B, N, D) after the final norm, on ``grid`` -> (logits (B, C), the counterfactual
        effect (B, C) or None, the BAP features (B, M*D), the maps (B, M, h, w)), all in float32.

        The counterfactual effect is the logits minus the logits under fake maps: uniform on [0, 2) in
        train mode, all ones in eval mode (there it only costs time, so it is computed when asked)."""
        B, N, D = tokens.shape
        with float32_region(tokens):
            x = tokens.float().transpose(1, 2).reshape(B, D, *grid)       # (B, D, h, w): token n at (n // w, n % w)
            maps = self.attention(x)
            pooled = bilinear_pool(maps, x)
            if pre_logits:
                return pooled, None, pooled, maps
            logits = self.classify(pooled)
            aux = None
            if counterfactual:
                fake = torch.rand_like(maps) * 2 if self.training else torch.ones_like(maps)
                aux = logits - self.classify(bilinear_pool(fake, x))
        return logits, aux, pooled, maps

    def loss(self, out: CALOutput, target: torch.Tensor) -> torch.Tensor:
        """CAL's training loss, and the centre update it implies (labels are needed for both).

        CE(raw)/3 + CE(crops and drops)*2/3 + CE(the three counterfactual effects) + the centre loss,
        sum((F - c_y)^2)/B with c_y the class's centre L2-normalised before this step's update, which
        is centre[y] += 0.05 (F - c_y). Plain cross-entropy: CAL ignores label smoothing. With a class
        twice in the batch the updates do not add up: the last sample of each class writes its centre
        (deterministically, so that a resumed run stays exact)."""
        y2, y3 = target.repeat(2), target.repeat(3)
        feats = out.features.float()
        with torch.no_grad():
            centre = F.normalize(self.feature_center[target], dim=-1)      # (B, M*D)
            order = torch.arange(len(target), device=target.device)
            last = torch.full((self.feature_center.shape[0],), -1, dtype=torch.long, device=target.device)
            last = last.scatter_reduce(0, target, order, reduce="amax")    # per class: its last sample in the batch
            classes = (last >= 0).nonzero().squeeze(1)
            rows = last[classes]
            self.feature_center[classes] += CENTRE_BETA * (feats[rows] - centre[rows])
        ce = F.cross_entropy
        return (ce(out.raw.float(), target) / 3 + ce(out.aug.float(), y2) * 2 / 3 + ce(out.aux.float(), y3)
                + ((feats - centre) ** 2).sum() / len(target))


def _fires(maps: torch.Tensor, theta: torch.Tensor | float, size: int) -> torch.Tensor:
    """Where each map, upsampled to the image (bilinear, aligned corners), reaches ``theta`` (a number,
    or one per sample) times the map's own maximum: (B, 1, h, w) -> (B, 1, S, S) bool, in float32."""
    B = maps.shape[0]
    with float32_region(maps):
        m = maps.float()
        up = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=True)   # (B, 1, S, S)
        theta = torch.as_tensor(theta, dtype=torch.float32, device=m.device).expand(B)
        return up >= (theta * m.flatten(1).amax(dim=1)).view(B, 1, 1, 1)


@torch.no_grad()
def attention_boxes(maps: torch.Tensor, theta: torch.Tensor | float, padding: float, size: int) -> torch.Tensor:
    """Where each map fires, as the reference's crop boxes: (B, 1, h, w) maps -> (B, 4) int64 pixels
    [top, bottom, left, right) on a ``size`` x ``size`` image.

    The map is upsampled (bilinear, aligned corners) to the image; the mask is where it is at least
    ``theta`` times the map's own maximum; the box spans the mask's rows and columns, widened by
    ``padding * size`` on each side, with the edges truncated toward zero (``int``) and clamped to
    the image. An all-zero map (threshold 0) gives the whole image."""
    mask = _fires(maps, theta, size)[:, 0]                                          # (B, S, S)
    pad = padding * size
    boxes = []
    for rows, cols in zip(mask.any(dim=2).tolist(), mask.any(dim=1).tolist(), strict=True):
        if not any(rows):  # cannot happen for a threshold <= 1; the whole image rather than a crash
            boxes.append([0, size, 0, size])
            continue
        r = [i for i, v in enumerate(rows) if v]
        c = [i for i, v in enumerate(cols) if v]
        boxes.append([max(int(r[0] - pad), 0), min(int(r[-1] + pad), size),
                      max(int(c[0] - pad), 0), min(int(c[-1] + pad), size)])
    return torch.tensor(boxes, dtype=torch.long)


@torch.no_grad()
def attention_drop(images: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The images with every pixel where the (upsampled) map reaches ``theta`` of its max set to zero;
    (B, 3, S, S) images, (B, 1, h, w) maps, (B,) thresholds."""
    return images * (~_fires(maps, theta, images.shape[-1])).to(images.dtype)


@torch.no_grad()
def choose_maps(maps: torch.Tensor, count: int = 2) -> torch.Tensor:
    """Per sample, ``count`` of its maps drawn with replacement, each with probability proportional
    to the square root of its sum: (B, M, h, w) -> (B, count, h, w)."""
    weights = torch.sqrt(maps.float().sum(dim=(2, 3)) + EPS)                        # (B, M)
    idx = torch.multinomial(weights, count, replacement=True)                       # (B, count)
    return maps.gather(1, idx[:, :, None, None].expand(-1, -1, *maps.shape[-2:]))


def uniform(low: float, high: float, n: int) -> torch.Tensor:
    """``n`` draws from U(low, high) on torch's default (seeded, checkpointed) CPU generator."""
    return low + (high - low) * torch.rand(n)


class CAL(Method):
    """CAL's passes: three per training step (the image; its crop and its drop together), and in
    evaluation the image and its mirror with three crops each (8 passes), or the image and one crop."""

    single_pass = False
    traceable = False
    timm_head = False
    train_passes = 3
    upstream_head_keys = (("dfsm.attentions.conv.", "head.conv."), ("dfsm.attentions.bn.", "head.bn."),
                          ("dfsm.fc.", "head.fc."))
    MODES = {"8 passes": 8, "2 passes (single crop)": 2}

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.maps = cfg.cal_maps
        self.single_crop = cfg.cal_single_crop

    @property
    def eval_modes(self) -> dict[str, int]:
        return dict(self.MODES)

    @property
    def eval_mode(self) -> str:
        return "2 passes (single crop)" if self.single_crop else "8 passes"

    def build_head(self, vit, num_classes):
        return WSDANHead(vit.embed_dim, num_classes, maps=self.maps)

    def pools_cls(self, model) -> bool:
        return False

    def head_pass(self, model, x: torch.Tensor, counterfactual: bool = False) -> tuple:
        """One backbone pass of images (B, 3, S, S) into the head: (logits, counterfactual effect or
        None, BAP features, attention maps); see `WSDANHead.forward`."""
        tokens = model.vit.norm(model.encode(x)[0])[:, model.num_prefix_tokens:]  # (B, N, D): no CLS token
        return model.head(tokens, model.feature_info[-1].out_grid, counterfactual)

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        """One pass's logits (or BAP features) from the final normed tokens; ``model(x)`` averages
        them with its crops'."""
        return model.head(x[:, model.num_prefix_tokens:], model.feature_info[-1].out_grid, pre_logits=pre_logits)[0]

    def attention_crops(self, model, x: torch.Tensor, eval_mode: str | None = None) -> dict:
        """The first pass and the crops it chooses: the pass's ``logits`` (B, C) and attention ``maps``
        (B, M, h, w), their ``mean_map`` (B, 1, h, w), and for each (threshold, padding) of the mode's
        ``settings`` (returned too) the ``boxes`` (K, B, 4) [top, bottom, left, right) and the ``crops``
        (K, B, 3, S, S). On the meta device (cost counting) each crop is the whole image."""
        settings = EVAL_CROPS if self.passes(eval_mode) == 8 else SINGLE_CROP
        logits, _, _, maps = self.head_pass(model, x)
        mean_map = maps.mean(dim=1, keepdim=True)                                  # (B, 1, h, w)
        S = x.shape[-1]
        if x.is_meta:
            boxes = torch.zeros(len(settings), x.shape[0], 4, dtype=torch.long)
            crops = x.expand(len(settings), *x.shape)
        else:
            boxes = torch.stack([attention_boxes(mean_map, theta, pad, S) for theta, pad in settings])
            crops = torch.stack([crop_resize(x, b) for b in boxes])                # (K, B, 3, S, S)
        return {"logits": logits, "maps": maps, "mean_map": mean_map, "boxes": boxes, "crops": crops,
                "settings": settings}

    def forward(self, model, x, eval_mode=None):
        """Evaluation logits: per view (the image and, with 8 passes, its mirror), the mean of the
        view's pass and its crops' passes; then the mean over views. The views share one backbone
        pass, and all their crops another (BatchNorm is in eval mode, so batching changes nothing)."""
        mode = self._mode(eval_mode)
        B = x.shape[0]
        views = torch.cat([x, x.flip(3)]) if self.passes(mode) == 8 else x         # (V*B, 3, S, S)
        first = self.attention_crops(model, views, mode)
        K = first["boxes"].shape[0]
        crop_logits = self.head_pass(model, first["crops"].flatten(0, 1))[0]       # (K*V*B, C)
        per_view = (first["logits"] + crop_logits.view(K, views.shape[0], -1).sum(0)) / (K + 1)  # (V*B, C)
        return per_view.view(-1, B, per_view.shape[-1]).mean(0)                   # (B, C)

    def train_outputs(self, model, x: torch.Tensor) -> CALOutput:
        """The three passes: the image; then, together, its crop to one attention map (threshold
        U(0.4, 0.6) of the map's max, 10 % padding) and its drop of another (threshold U(0.2, 0.5)),
        the two maps drawn per sample by `choose_maps`."""
        B, S = x.shape[0], x.shape[-1]
        raw, aux_raw, features, maps = self.head_pass(model, x, counterfactual=True)
        with torch.no_grad():
            chosen = choose_maps(maps.detach())                                     # (B, 2, h, w)
            boxes = attention_boxes(chosen[:, :1], uniform(*TRAIN_CROP_THETA, B), TRAIN_CROP_PADDING, S)
            crops = crop_resize(x, boxes)
            drops = attention_drop(x, chosen[:, 1:], uniform(*TRAIN_DROP_THETA, B))
        aug, aux_aug, _, _ = self.head_pass(model, torch.cat([crops, drops]), counterfactual=True)
        return CALOutput((raw + aug[:B]) / 2, raw, aug, torch.cat([aux_raw, aux_aug]), features)

    def forward_train(self, model, x, target, criterion):
        """CAL's own loss (`WSDANHead.loss`; it ignores the recipe's label smoothing)."""
        out = self.train_outputs(model, x)
        with float32_region(out.logits):
            return TrainStep(model.head.loss(out, target), out.logits)

    def select(self, model, x):
        first = self.attention_crops(model, x)  # the image's crops; its mirror's are the same idea, mirrored
        labels = tuple(f"{theta:g} × max" for theta, _ in first["settings"])
        return Selection("crops where the mean attention map reaches a share of its max", model.feature_info[-1].out_grid,
                         boxes=first["boxes"], crops=first["crops"], labels=labels)

    @classmethod
    def upstream_settings(cls, config: argparse.Namespace) -> dict[str, Any]:
        # the reference builds CAL's 12 blocks whatever the flags say
        return {"cal_single_crop": bool(getattr(config, "cal_single_crop", False)), "depth": None}

    def upstream_normalise(self, key: str) -> str:
        return key.removeprefix("encoder.0.")  # CAL wraps the ViT: encoder = Sequential(ViT, Rearrange)

    def upstream_missing(self, model):
        return {"head.feature_center": torch.zeros_like(model.head.feature_center)}  # never saved: from zero


__all__ = ["CAL", "CALOutput", "EVAL_CROPS", "SINGLE_CROP", "WSDANHead", "attention_boxes", "attention_drop",
           "bilinear_pool", "choose_maps", "uniform"]
