"""State-dict names of wrapped layers: timm's, never the wrapper's.

peft replaces a target ``qkv`` by a layer that holds the original as ``qkv.base_layer`` and its
adapter under the adapter's name (``qkv.lora_A.default.weight``); SSF's wrapper holds the original the
same way. Checkpoints, adapter deltas and the backbone's sha256 must not depend on that: a wrapped
layer's state dict names its tensors without the wrapper's parts (``qkv.weight``, ``qkv.lora_A.weight``),
and loading maps them back. Each wrapped layer carries its own name map and two hooks (plain
functions of the module, so that deep copies, meta copies and DDP's prefixes keep working).
"""

from __future__ import annotations

from torch import nn

#: Path parts a wrapper adds: the wrapped original, and peft's adapter name.
WRAPPER_PARTS = frozenset({"base_layer", "default"})


def unwrapped_name(name: str) -> str:
    """``qkv.base_layer.weight`` -> ``qkv.weight``; ``qkv.lora_A.default.weight`` -> ``qkv.lora_A.weight``."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_PARTS)


def _save_unwrapped(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    names = module._ufgir_unwrapped  # wrapped local name -> ours
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        local = k[len(prefix):] if k.startswith(prefix) else None
        state_dict[prefix + names[local] if local in names else k] = v


def _load_unwrapped(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                    missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    back = {ours: wrapped for wrapped, ours in module._ufgir_unwrapped.items()}
    for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in back]:
        state_dict[prefix + back[k[len(prefix):]]] = state_dict.pop(k)


def keep_unwrapped_names(layer: nn.Module) -> None:
    """Make ``layer``'s state dict use unwrapped names (call once its adapter is in place)."""
    if hasattr(layer, "_ufgir_unwrapped"):
        raise ValueError(f"{type(layer).__name__} keeps unwrapped names already")
    names = {k: unwrapped_name(k) for k in layer.state_dict(keep_vars=True)}
    if len(set(names.values())) != len(names):
        raise ValueError(f"unwrapped names of {type(layer).__name__} collide: {sorted(names)}")
    layer._ufgir_unwrapped = {k: v for k, v in names.items() if k != v}
    layer.register_state_dict_post_hook(_save_unwrapped)
    layer.register_load_state_dict_pre_hook(_load_unwrapped)


__all__ = ["WRAPPER_PARTS", "keep_unwrapped_names", "unwrapped_name"]
