"""ViT backbones from timm: creation, weights, input size. The one module that builds timm models.

Everything ufgir needs from timm goes through here, through timm's public API (``create_model``,
``build_model_with_cfg``, ``VisionTransformer.load_pretrained``/``set_input_size``), with one
exception: :func:`embed_tokens` calls the private ``VisionTransformer._pos_embed`` (and
``model/eva.py``'s ``EvaRunner.embed`` the ``Eva._pos_embed``), isolated in those functions and checked
by ``tests/test_model.py::test_timm_private_api`` so that a timm release that changes it fails loudly. Elsewhere timm appears only as ``timm.create_model`` when pretraining the
micro backbone (engine/pretrain.py) and as a version string in run provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, eva, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..errors import CheckpointError, ModelError, RecipeError, did_you_mean
from ..methods import method_spec
from ..paths import hub_client_settings, unresolvable
from ..recipe import ModelConfig
from .state import load_strict

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# --------------------------------------------------------------------------------------------
# Our own small backbone, pretrained on synthetic leaves (see `ufgir pretrain-backbone`).

MICRO = "ufgir_vit_micro_patch8_64"
MICRO_WEIGHTS = ASSETS / f"{MICRO}.synthetic.safetensors"

default_cfgs = generate_default_cfgs(
    {
        f"{MICRO}.synthetic": {
            "url": "",
            "file": str(MICRO_WEIGHTS),
            "num_classes": 0,
            "input_size": (3, 64, 64),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "mit",
        }
    }
)


@register_model
def ufgir_vit_micro_patch8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, patch 8, 64 px, width 96, depth 6, 3 heads: trains on two CPU cores in minutes."""
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0)
    return build_model_with_cfg(VisionTransformer, MICRO, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **dict(args, **kwargs))


# --------------------------------------------------------------------------------------------
# Backbone creation and weights


def _timm_kwargs(cfg: ModelConfig, num_classes: int) -> dict:
    # Dropout is applied by UfgirViT on branch outputs only (the reference's placement); timm's own
    # dropouts (incl. the MLP hidden one, costly on CPU) stay off.
    kwargs = dict(num_classes=num_classes, drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=cfg.drop_path)
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    return kwargs


def _drop_class_token(vit: VisionTransformer, name: str, kwargs: dict) -> VisionTransformer:
    """The same ViT without a CLS token, for methods that pool the patch tokens alone (MPN-COV).
    Pretrained weights carry a CLS token and its position: both are left out, every other tensor is
    kept (timm cannot load CLS-ful weights into a model without one). Registers stay (prefix tokens
    still); a backbone without a CLS token (SigLIP) is returned as it is."""
    if getattr(vit, "cls_token", None) is None:
        return vit
    size = int(vit.patch_embed.img_size[0])
    if isinstance(vit, eva.Eva):  # its final norm stays where it was (EVA-02's after the pooling)
        kwargs = {**kwargs, "use_fc_norm": not isinstance(vit.fc_norm, nn.Identity)}
    bare = timm.create_model(name, pretrained=False, img_size=size, class_token=False, global_pool="", **kwargs)
    state = {k: v for k, v in vit.state_dict().items() if k != "cls_token"}
    if not vit.no_embed_class and vit.pos_embed is not None:
        state["pos_embed"] = state["pos_embed"][:, 1:]                                # (1, reg + HW, D)
    load_strict(bare, state, f"model.backbone {name!r} without its CLS token")
    return bare


def unknown_backbone(name: str) -> RecipeError:
    """The one line for a name timm does not know, with the nearest of timm's ViT names."""
    arch, _, tag = name.partition(".")
    near = did_you_mean(arch, timm.list_models("*vit*"))
    if near and tag:
        near = near.replace("?)", f" with .{tag}?)")
    return RecipeError(f"model.backbone {name!r} is not a timm model{near}; use a ViT name such as "
                       "vit_base_patch16_224.orig_in21k (list them with timm.list_models('vit_*'))")


def backbone_facts(cfg: ModelConfig) -> tuple[int, dict]:
    """Blocks and numerics (`numerics_of`) of the recipe's backbone as timm builds it (on the meta
    device: no weights, no memory), for a backbone whose name does not tell them."""
    try:
        with torch.device("meta"):
            vit = timm.create_model(cfg.backbone, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise unknown_backbone(cfg.backbone) from None
        raise
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise RecipeError(f"model.backbone {cfg.backbone!r} is not a plain timm VisionTransformer (it has no blocks)")
    return len(blocks), numerics_of(vit)


def backbone_blocks(cfg: ModelConfig) -> int:
    """Blocks of the recipe's backbone as timm builds it (see `backbone_facts`)."""
    return backbone_facts(cfg)[0]


def numerics_of(vit: nn.Module) -> dict:
    """What a timm ViT says of its own numerics, by recipe key (``geometry.NUMERIC_KEYS``): its
    pretrained config's mean, std, interpolation and 1 / crop_pct, its LayerNorm eps (read before
    a recipe sets it), and timm's position resampling (bicubic)."""
    pcfg = getattr(vit, "pretrained_cfg", None) or {}
    out: dict = {"pos_embed_resize": "bicubic"}
    eps = next((m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)), None)
    if eps is not None:
        out["layer_norm_eps"] = float(eps)
    for key in ("mean", "std"):
        if pcfg.get(key) is not None and len(pcfg[key]) == 3:
            out[key] = tuple(float(v) for v in pcfg[key])
    if pcfg.get("crop_pct"):
        out["resize_ratio"] = 1.0 / float(pcfg["crop_pct"])
    if pcfg.get("interpolation") in ("bicubic", "bilinear"):
        out["interpolation"] = pcfg["interpolation"]
    return out


def _gated(e: BaseException) -> bool:
    """An error of the Hub saying the weights are gated (their licence must be accepted first)."""
    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:  # pragma: no cover - an old huggingface_hub
        return "gated" in str(e).lower()
    while e is not None:
        if isinstance(e, GatedRepoError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _pretrained(name: str, kwargs: dict) -> VisionTransformer:
    """timm's pretrained model; with a ``depth`` below the published one (TransFG and FFVT keep D - 1
    blocks), its first ``depth`` blocks: timm loads pretrained weights strictly, so the published model
    is built and its state, less the blocks past ``depth``, loaded into the shorter one."""
    depth = kwargs.get("depth")
    if depth is None:
        return timm.create_model(name, pretrained=True, **kwargs)
    full = timm.create_model(name, pretrained=True, **{k: v for k, v in kwargs.items() if k != "depth"})
    if depth > len(full.blocks):
        raise RecipeError(f"model.depth {depth} is more than the {len(full.blocks)} blocks of model.backbone {name!r}")
    vit = timm.create_model(name, pretrained=False, **kwargs)
    beyond = tuple(f"blocks.{i}." for i in range(depth, len(full.blocks)))
    load_strict(vit, {k: v for k, v in full.state_dict().items() if not k.startswith(beyond)},
                f"model.backbone {name!r} cut to its first {depth} blocks")
    return vit


@contextlib.contextmanager
def _offline_if_unreachable():
    """huggingface_hub's offline mode while the Hub's host does not resolve: cached weights still load,
    missing ones fail at once (one line, below) instead of after the client's retries (about 50 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or unresolvable(hub_client_settings()["endpoint"] or constants.ENDPOINT) is None:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _pretrained_failure(name: str, e: BaseException) -> ModelError:
    """One line for pretrained weights that cannot be had: gated (naming the licence and HF_TOKEN), or
    not cached and not fetchable."""
    if _gated(e):
        try:
            pcfg = timm.get_pretrained_cfg(name)
        except (RuntimeError, ValueError):
            pcfg = None
        licence = getattr(pcfg, "license", None) or "its licence"
        repo = getattr(pcfg, "hf_hub_id", None) or name
        return ModelError(f"pretrained weights for model.backbone {name!r} are gated on the Hugging Face Hub "
                          f"(licence: {licence}): accept it at https://huggingface.co/{repo}, then set HF_TOKEN "
                          "to a token of that account (or set model.weights to a local file)")
    return ModelError(
        f"pretrained weights for model.backbone {name!r} are not in timm's cache and "
        f"cannot be fetched ({type(e).__name__}); run once with network access, or set "
        "model.weights to a local .npz/.safetensors/.pth file, or to none; or, offline, train the method on the "
        "shipped micro ViT: `ufgir train -r quickstart --set model.method=METHOD` (README: every method on a laptop)"
    )


def create_backbone(cfg: ModelConfig, num_classes: int) -> VisionTransformer:
    """A timm ViT with the recipe's weights, LayerNorm eps and input size; ``num_classes`` for timm's
    own head (0 for a headless backbone, when the method brings its own head; MPN-COV's and CAL's
    also lose the CLS token in `_drop_class_token`)."""
    kwargs = _timm_kwargs(cfg, num_classes)
    weights = cfg.weights
    try:
        if weights == "none":
            vit = timm.create_model(cfg.backbone, pretrained=False, img_size=cfg.image_size, **kwargs)
        elif weights == "timm":
            try:
                with _offline_if_unreachable():
                    vit = _pretrained(cfg.backbone, kwargs)
            except (OSError, RuntimeError, ValueError) as e:
                if "Unknown model" in str(e):
                    raise
                raise _pretrained_failure(cfg.backbone, e) from None
        else:
            vit = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
            load_weights_file(vit, Path(weights).expanduser())
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise unknown_backbone(cfg.backbone) from None
        raise
    if not isinstance(vit, VisionTransformer | eva.Eva):
        raise RecipeError(f"model.backbone {cfg.backbone!r} is neither a plain timm VisionTransformer nor timm's "
                          "Eva (EVA-02, DINOv3)")
    if tuple(vit.patch_embed.img_size) != (cfg.image_size, cfg.image_size):
        resize_input(vit, cfg.image_size, cfg.pos_embed_resize)
    if not method_spec(cfg.method).class_token:
        vit = _drop_class_token(vit, cfg.backbone, kwargs)
    if cfg.drop_path and cfg.drop_path_schedule == "uniform":  # the reference: one rate in every block
        for blk in vit.blocks:
            blk.drop_path1, blk.drop_path2 = DropPath(cfg.drop_path), DropPath(cfg.drop_path)
    if cfg.layer_norm_eps is not None:
        for m in vit.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = cfg.layer_norm_eps
    if not method_spec(cfg.method).final_norm:
        vit.norm = nn.Identity()
    return vit


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain weights file"
        raise CheckpointError(
            f"weights file {path} cannot be read safely (weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"weights file {path} holds no state_dict")
    return obj


def load_weights_file(vit: VisionTransformer, path: Path) -> None:
    """Load Google ``.npz``, ``.safetensors`` or ``.pth`` weights into ``vit`` (head excluded)."""
    if not path.is_file():
        raise ModelError(f"model.weights file {path} does not exist; give an existing file, 'timm' or 'none'")
    if path.suffix == ".npz":
        head = {k: v.clone() for k, v in vit.head.state_dict().items()}
        vit.load_pretrained(str(path))
        if head:
            vit.head.load_state_dict(head)
        return
    sd = (eva.checkpoint_filter_fn if isinstance(vit, eva.Eva) else checkpoint_filter_fn)(_read_state_dict(path), vit)
    own = vit.state_dict()
    head_keys = {f"head.{k}" for k in vit.head.state_dict()}
    sd = {k: v for k, v in sd.items() if not (k in head_keys and v.shape != own[k].shape)}
    load_strict(vit, sd, f"weights file {path}", expected=(set(own) - head_keys) | (head_keys & set(sd)),
                hint="check model.backbone")


def resize_input(vit: VisionTransformer, size: int, mode: str) -> None:
    """Change the input size, resampling the position grid (CLS/prefix positions kept).

    ``bilinear_corners`` is the reference's corner-aligned bilinear resize; ``bicubic`` is timm's.
    """
    old = vit.pos_embed.detach().clone() if vit.pos_embed is not None else None
    gh, gw = vit.patch_embed.grid_size
    vit.set_input_size(img_size=(size, size))
    if mode != "bilinear_corners" or old is None:  # rotary positions alone (DINOv3): timm's own resize
        return
    npt = 0 if vit.no_embed_class else vit.num_prefix_tokens
    D = old.shape[-1]
    grid = old[:, npt:].reshape(1, gh, gw, D).permute(0, 3, 1, 2)                       # (1, D, gh, gw)
    grid = F.interpolate(grid, size=vit.patch_embed.grid_size, mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D)                                    # (1, gh'*gw', D)
    vit.pos_embed = nn.Parameter(torch.cat([old[:, :npt], grid], dim=1), requires_grad=vit.pos_embed.requires_grad)


def save_timm_folder(vit: VisionTransformer, folder: Path, data_config: dict, label_names: list[str] | None) -> None:
    """timm's own ``config.json`` + ``model.safetensors`` of ``vit`` in ``folder`` (what
    ``timm.create_model('hf-hub:OWNER/NAME', pretrained=True)`` reads), with ufgir's preprocessing:
    ``data_config`` holds mean, std, interpolation and ``crop_pct`` (1 / the square resize ratio; timm's
    ``squash`` crop mode is ufgir's square resize then centre crop)."""
    from timm.models import save_for_hf

    model_config = {"label_names": list(label_names)} if label_names else None
    save_for_hf(vit, str(folder), model_config=model_config, safe_serialization=True,
                data_config={**data_config, "crop_mode": "squash"})


def load_timm_folder(folder: Path) -> VisionTransformer:
    """The model timm builds from a folder written by :func:`save_timm_folder` (its parity check)."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True)


def timm_call(cfg: ModelConfig, num_classes: int) -> dict:
    """The keyword arguments of ``timm.create_model(cfg.backbone, **kwargs)`` that build the recipe's
    backbone the way a timm user would, with its weights and timm's head of ``num_classes``: what a peft
    adapter folder attaches to (``img_size`` only where the recipe's differs from timm's default; a
    weights file through ``pretrained_cfg_overlay``)."""
    kwargs: dict = {"pretrained": cfg.weights != "none", "num_classes": num_classes}
    if cfg.weights not in ("timm", "none"):
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(cfg.weights).expanduser().resolve())}
    if default_image_size(cfg.backbone) != cfg.image_size:
        kwargs["img_size"] = cfg.image_size
    return kwargs


def default_image_size(name: str) -> int:
    """The input size timm builds ``name`` for when no ``img_size`` is given (on the meta device)."""
    with torch.device("meta"):
        return int(create_timm(name, {"pretrained": False}).patch_embed.img_size[0])


def create_timm(name: str, kwargs: dict) -> VisionTransformer:
    """``timm.create_model(name, **kwargs)``, as a user of timm alone writes it (see `timm_call`); weights
    that cannot be fetched are a one-line ModelError."""
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if "Unknown model" in str(e):
            raise RecipeError(f"model.backbone {name!r} is not a timm model; use a ViT name such as "
                              "vit_base_patch16_224.orig_in21k (list them with timm.list_models('vit_*'))") from None
        raise _pretrained_failure(name, e) from None


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order (names, dtypes, shapes and bytes; not file bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def new_block_like(vit: VisionTransformer, eps: float) -> nn.Module:
    """A fresh transformer block of the backbone's width, heads and MLP ratio (random init, no
    dropout of its own): TransFG's and FFVT's aggregator, which never takes the backbone's weights."""
    last = vit.blocks[-1]
    attn = last.attn
    bias = any(getattr(m, "bias", None) is not None for m in (attn.qkv, getattr(attn, "q_proj", None)) if m is not None) \
        or getattr(attn, "q_bias", None) is not None                       # timm's Eva holds q/v biases apart
    return Block(vit.embed_dim, attn.num_heads, mlp_ratio=last.mlp.fc2.in_features / vit.embed_dim,
                 qkv_bias=bias, norm_layer=partial(nn.LayerNorm, eps=eps))


def embed_tokens(vit: VisionTransformer, x: torch.Tensor, cls_token: torch.Tensor | None = None,
                 suffix: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, S, S) -> the tokens entering block 0, as timm's ``forward_features`` makes them:
    patch embedding, prefix tokens and position embedding, patch dropout, pre-norm. ``cls_token``
    (1, 1, D) stands in for the model's own (GLSim's second pass), at the CLS position. ``suffix`` (1, n, D)
    is appended after the patch tokens, before the pre-norm (CLCA's carrier token).

    The one call into timm's private API (``_pos_embed``); see the module docstring."""
    x = vit.patch_embed(x)                                                 # (B, HW, D)
    x = vit._pos_embed(x)                                                  # (B, prefix + HW, D)
    x = stand_in_cls(vit, x, cls_token)
    if suffix is not None:
        x = torch.cat([x, suffix.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)    # (B, prefix + HW + n, D)
    return vit.norm_pre(vit.patch_drop(x))


def stand_in_cls(vit: nn.Module, x: torch.Tensor, cls_token: torch.Tensor | None) -> torch.Tensor:
    """Embedded tokens (B, prefix + HW, D) with ``cls_token`` (1, 1, D) in the CLS token's place, with
    the CLS position where it has one (registers stay); ``x`` as it is when ``cls_token`` is None."""
    if cls_token is None:
        return x
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("a stand-in CLS token needs a ViT with a CLS token")
    cls = cls_token if vit.no_embed_class or vit.pos_embed is None else cls_token + vit.pos_embed[:, :1]
    return torch.cat([cls.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)


__all__ = ["MICRO", "MICRO_WEIGHTS", "backbone_facts", "create_backbone", "embed_tokens", "load_timm_folder",
           "load_weights_file", "new_block_like", "numerics_of", "resize_input", "save_timm_folder", "stand_in_cls",
           "state_dict_sha256"]
