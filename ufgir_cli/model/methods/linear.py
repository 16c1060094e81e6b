"""The methods whose classifier is timm's own Linear on the CLS token: the linear probe, full
fine-tuning, VPT, adapters, ConvPass and the ILA family (their differences are backbone modules that
`UfgirViT` builds from the table row). The base `Method` is exactly this method."""

from __future__ import annotations

from .base import Method


class LinearHead(Method):
    """timm's head on the pooled token; one pass; cross-entropy."""


__all__ = ["LinearHead"]
