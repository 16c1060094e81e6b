"""Models: timm ViT backbones with PETL methods (ILA, adapters, prompts). Imports torch and timm."""

from .build import build_model, meta_model
from .convert import load_upstream_checkpoint
from .vit import UfgirViT, create_backbone

__all__ = ["UfgirViT", "build_model", "create_backbone", "load_upstream_checkpoint", "meta_model"]
