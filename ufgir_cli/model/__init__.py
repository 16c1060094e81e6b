"""Models: timm ViT backbones with PETL methods (ILA, adapters, prompts). Imports torch and timm."""

from .convert import load_upstream_checkpoint
from .vit import UfgirViT, build_model, create_backbone, meta_model

__all__ = ["UfgirViT", "build_model", "create_backbone", "load_upstream_checkpoint", "meta_model"]
