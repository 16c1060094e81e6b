"""Checkpoints written by the reference implementation (package ``fgir_vit``) -> our model.

The reference stores ``{'config': argparse.Namespace, 'model': state_dict, ...}``; CLCA's official code
``{'args': argparse.Namespace, 'model': state_dict, ...}`` (its method object reads those,
`Method.upstream_recipe`). We read it with
``weights_only=True`` plus ``argparse.Namespace`` on the allow-list, infer the method from the config's
flags (with the reference's meanings, see the fixtures README; each method's flags are its row's
``upstream`` in ``ufgir_cli/methods.py``), and map every key with strict
checking: an unmapped or missing key is an error that lists it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..geometry import REFERENCE_NUMERICS, backbone_depth
from ..methods import METHOD_NAMES, MethodSpec, detect_upstream
from ..recipe import Recipe, recipe_from_dict
from .build import build_model
from .checkpoint import torch_load_failure
from .methods import method_class
from .state import load_strict
from .vit import UfgirViT

#: Reference model names -> timm backbones (the architecture; weights come from the checkpoint).
UPSTREAM_BACKBONES = {
    "vit_t16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224.orig_in21k",
    "vit_b32": "vit_base_patch32_224.orig_in21k",
    "vit_l16": "vit_large_patch16_224.orig_in21k",
    "vit_l32": "vit_large_patch32_224.orig_in21k",
}

_ILA_SUBKEYS = {
    "adapter_down": "down",
    "adapter_up": "up",
    "norm1.1": "norm1.norm",
    "norm3.1": "norm3.norm",
    "adapter_cls": "cls_conv",
    "ds_conv": "ds_conv",
    "adapter_conv.0": "dw",
    "adapter_conv.1.0": "norm2.norm",
    "adapter_conv.2": "pw",
}
_BLOCK_SUBKEYS = {
    "attn.proj_q": None,  # merged into attn.qkv below
    "attn.proj_k": None,
    "attn.proj_v": None,
    "proj": "attn.proj",
    "norm1": "norm1",
    "norm2": "norm2",
    "pwff.fc1": "mlp.fc1",
    "pwff.fc2": "mlp.fc2",
}
_ADAPTER_SUBKEYS = {"adapter_down": "down", "adapter_up": "up", "adapter_conv": "conv"}
#: A transformer block of the reference: an encoder block, or TransFG's/FFVT's aggregator block.
_BLOCK = r"(encoder\.blocks\.\d+|aggregator\.blocks\.0)"


def _block_name(ref: str) -> str:
    """``encoder.blocks.3`` -> ``vit.blocks.3``; ``aggregator.blocks.0`` -> ``head.block``."""
    return "head.block" if ref.startswith("aggregator") else "vit." + ref.removeprefix("encoder.")


def read_upstream(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the config, and nothing else
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path} cannot be read as a reference checkpoint with weights_only=True "
            f"({torch_load_failure(path, e)}); is it complete and written by fgir_vit?"
        ) from None
    if isinstance(ckpt, dict) and "config" not in ckpt and isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt = {**ckpt, "config": ckpt["args"]}  # CLCA's train.py saves its arguments as 'args'
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a reference checkpoint: expected keys 'config' (or 'args') and 'model'")
    return ckpt


def _method(c: argparse.Namespace) -> MethodSpec:
    """The method row whose reference flags (``methods.MethodSpec.upstream``) this config matches."""
    spec = detect_upstream(vars(c))
    if spec is None:
        raise CheckpointError("the reference config's flags (ila, adapter, prompt, freeze_backbone, ...) match no "
                              f"method ufgir knows ({', '.join(METHOD_NAMES)})")
    return spec


def _flag(c: argparse.Namespace, name: str, default: Any) -> Any:
    """A reference config value, or ``default`` when it is absent or None (CAL's wrapper never writes
    its model config back: ``hidden_dropout_prob``, ``layer_norm_eps`` ... stay None, FGIR.md §4)."""
    value = getattr(c, name, None)
    return default if value is None else value


def recipe_from_upstream(c: argparse.Namespace) -> Recipe:
    """Our recipe for a reference config: the architecture exactly, the training settings mapped."""
    spec = _method(c)
    own = method_class(spec).upstream_recipe(c)
    if own is not None:
        return recipe_from_dict(own)
    name = _flag(c, "model_name", "vit_b16")
    if name not in UPSTREAM_BACKBONES:
        raise CheckpointError(
            f"reference model_name {name!r} is not supported; known: {', '.join(UPSTREAM_BACKBONES)}"
        )
    method = spec.name
    model: dict[str, Any] = {
        "backbone": UPSTREAM_BACKBONES[name],
        "weights": "none",
        "image_size": int(c.image_size),
        "num_classes": int(c.num_classes),
        "method": method,
        "adapter_dim": int(_flag(c, "adapter_dim", 8)),
        "adapter_kernel": int(_flag(c, "adapter_kernel_size", 3)),
        "ila_dim": int(_flag(c, "adapter_dim", 8)),
        "ila_kernel": int(_flag(c, "ila_ds_kernel_size", 3)),
        "ila_norm": getattr(c, "ila_norm1", "bn") or "none",
        "ila_cls_conv": bool(_flag(c, "ila_cls_conv", True)),
        "ila_dws_mult": int(_flag(c, "ila_dws_conv_groups", 1)),
        "prompt_len": int(_flag(c, "prompt_len", 100)),
        "drop": float(_flag(c, "hidden_dropout_prob", 0.1)),
        # The reference's numerics, spelled out: its backbones are the reference's whatever the timm name.
        "numerics": "reference",
        "layer_norm_eps": float(_flag(c, "layer_norm_eps", REFERENCE_NUMERICS["layer_norm_eps"])),
        **{k: REFERENCE_NUMERICS[k] for k in ("mean", "std", "pos_embed_resize")},
    }
    if "all" not in spec.trains and getattr(c, "freeze_backbone", True) is False:
        model["train_backbone"] = True  # the reference trained every weight of this method (GLSim's README)
    depth = getattr(c, "num_hidden_layers", None)
    if depth and depth != backbone_depth(model["backbone"]):
        model["depth"] = int(depth)
    model.update(method_class(spec).upstream_settings(c))  # the method's own keys
    if spec.has_ila:
        model["ila_ds_locs"] = list(getattr(c, "ila_ds_locs", spec.ila_ds_locs) or [])
        model["ila_locs"] = list(getattr(c, "ila_locs", []) or []) if spec.ila_rest else []
    data = {"dataset": getattr(c, "dataset_name", None) or "unknown",
            **{k: REFERENCE_NUMERICS[k] for k in ("resize_ratio", "interpolation")}}
    optim = {
        "name": "adamw" if str(getattr(c, "opt", "sgd")).lower() == "adamw" else "sgd",
        "lr": float(getattr(c, "lr", 0.1) or 0.1),
        "weight_decay": float(getattr(c, "weight_decay", 0.0) or 0.0),
        "clip_grad": getattr(c, "clip_grad", 1.0),
        "label_smoothing": float(getattr(c, "smoothing", 0.0)) if getattr(c, "ls", False) else 0.0,
    }
    train = {"epochs": int(getattr(c, "epochs", 50)), "batch_size": int(getattr(c, "batch_size", 8)),
             "seed": int(getattr(c, "seed", 1))}
    return recipe_from_dict({"description": f"imported from the reference implementation ({name}, {method})",
                             "data": data, "model": model, "optim": optim, "train": train})


def convert_state_dict(sd: dict[str, torch.Tensor], model: UfgirViT, c: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Reference keys -> our keys; raises listing every key that maps nowhere."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    ds_locs = list(getattr(c, "ila_ds_locs", []) or [])
    ila_locs = list(getattr(c, "ila_locs", []) or [])
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    method = model.method
    state = method.upstream_rename({k.removeprefix("module.").removeprefix("model."): t for k, t in sd.items()})
    for k, t in state.items():
        ours = method.map_upstream_key(k, state)
        if ours is not None:
            if ours:  # "": a key that only repeats another, checked by the method
                out[ours] = t
        elif k == "class_token":
            out["vit.cls_token"] = t.reshape(1, 1, -1)
        elif k == "anchor_class_token" and model.anchor_cls is not None:
            out["anchor_cls"] = t.reshape(1, 1, -1)
        elif k.startswith("patch_embedding."):
            out["vit.patch_embed.proj." + k.split(".", 1)[1]] = t
        elif k == "positional_embedding.pos_embedding":
            out["vit.pos_embed"] = t
        elif k.startswith("encoder_norm."):
            out["vit.norm." + k.split(".", 1)[1]] = t
        elif k.startswith("aggregator") and not hasattr(model.head, "block"):
            unmapped.append(k)  # an aggregator block, and the model has none
        elif k.startswith("aggregator_norm."):
            out["head.norm." + k.split(".", 1)[1]] = t
        elif model.head is not None and k.startswith(("head.", "dfsm.")):
            unmapped.append(k)  # the method's head did not claim it
        elif k.startswith("head.head."):
            out["vit.head." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("encoder.prompt"):
            if model.prompts is None:
                unmapped.append(k)
            else:
                out["prompts"] = t.reshape(model.prompts.shape)
        elif m := re.fullmatch(_BLOCK + r"\.attn\.proj_([qkv])\.(weight|bias)", k):
            qkv.setdefault((_block_name(m[1]), m[3]), {})[m[2]] = t
        elif m := re.fullmatch(r"encoder\.blocks\.(\d+)\.adapter_(attn|pwffn)\.(\w+)\.(weight|bias)", k):
            which = "attn" if m[2] == "attn" else "mlp"
            sub = _ADAPTER_SUBKEYS.get(m[3])
            if sub is None or model.adapters is None:
                unmapped.append(k)
            else:
                out[f"adapters.{m[1]}.{which}.{sub}.{m[4]}"] = t
        elif m := re.fullmatch(_BLOCK + r"\.(.+)\.(weight|bias)", k):
            sub = _BLOCK_SUBKEYS.get(m[2])
            if sub is None:
                unmapped.append(k)
            else:
                out[f"{_block_name(m[1])}.{sub}.{m[3]}"] = t
        elif m := re.fullmatch(r"encoder\.(ila_ds|ila)\.(\d+)\.(.+)\.(\w+)", k):
            locs = ds_locs if m[1] == "ila_ds" else ila_locs
            j = int(m[2])
            sub = _ILA_SUBKEYS.get(m[3])
            if sub is None or j >= len(locs):
                unmapped.append(k)
            else:
                out[f"ila.{locs[j]}.{sub}.{m[4]}"] = t
        else:
            unmapped.append(k)
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(f"{block}: attn.proj_[qkv].{kind} (incomplete: {sorted(parts)})")
            continue
        out[f"{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    out.update(method.upstream_missing(model))
    if unmapped:
        raise CheckpointError(f"reference checkpoint has keys that map to nothing in {method.name}: {unmapped[:8]}"
                              + (f" (+{len(unmapped) - 8} more)" if len(unmapped) > 8 else ""))
    return out


def load_upstream_checkpoint(path: str | Path) -> tuple[UfgirViT, Recipe]:
    """An eval-mode model with the reference's numerics, and the recipe reconstructed from its config."""
    ckpt = read_upstream(path)
    c = ckpt["config"]
    if not isinstance(c, argparse.Namespace):
        raise CheckpointError(f"{path}: 'config' is a {type(c).__name__}, expected argparse.Namespace")
    recipe = recipe_from_upstream(c)
    model = build_model(recipe.model, recipe.model.num_classes)
    sd = convert_state_dict(ckpt["model"], model, c)
    load_strict(model, sd, f"reference checkpoint {path}")
    return model.eval(), recipe
