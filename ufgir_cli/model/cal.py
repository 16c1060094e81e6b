"""CAL: counterfactual attention learning on WS-DAN attention maps (reference/FGIR.md §4), pure torch.

The head reads the backbone's patch tokens as a feature map (there is no CLS token), makes M attention
maps from it (1x1 conv, BatchNorm, ReLU) and pools the features under each map (bilinear attention
pooling, BAP). Training adds what makes CAL more than a head: a counterfactual branch (the same pooling
under random maps, whose logits are subtracted), class feature centres, and two more images per sample,
cropped to and dropped from one of its own attention maps. Evaluation crops the image to where the
mean map fires, at three thresholds, on the image and its mirror (or one crop, ``model.cal_single_crop``).

Everything that decides a box or a drop runs in float32 without gradient, and every random draw
(which maps, which thresholds, the counterfactual maps) comes from torch's seeded generators, which the
training checkpoint saves: a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .precision import float32_region

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


__all__ = ["CALOutput", "EVAL_CROPS", "SINGLE_CROP", "WSDANHead", "attention_boxes", "attention_drop",
           "bilinear_pool", "choose_maps", "uniform"]
