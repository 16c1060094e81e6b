"""ViT backbones from timm, and the PETL model that wraps them. The only module that knows timm.

:class:`UfgirViT` keeps a stock timm ``VisionTransformer`` as ``self.vit`` (so its weights load and
hash exactly as timm defines them) and runs the blocks itself, inserting parallel adapters, prompts
and inter-layer adapters around them as the method's :class:`~.methods.MethodPlan` says.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, ModelError, RecipeError
from ..recipe import ModelConfig, check_geometry
from .adapters import BlockAdapters
from .ila import ILA, Dropout, prompt_init_bound, xavier_linear_
from .methods import MethodPlan, method_plan

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
    return _create_vision_transformer(MICRO, pretrained=pretrained, **dict(args, **kwargs))


# --------------------------------------------------------------------------------------------
# Backbone creation and weights


def _timm_kwargs(cfg: ModelConfig, num_classes: int) -> dict:
    # Dropout is applied by UfgirViT on branch outputs only (the reference's placement); timm's own
    # dropouts (incl. the MLP hidden one, costly on CPU) stay off.
    return dict(num_classes=num_classes, drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                drop_path_rate=cfg.drop_path)


def create_backbone(cfg: ModelConfig, num_classes: int) -> VisionTransformer:
    """A timm ViT with the recipe's weights, LayerNorm eps and input size."""
    kwargs = _timm_kwargs(cfg, num_classes)
    weights = cfg.weights
    try:
        if weights == "none":
            vit = timm.create_model(cfg.backbone, pretrained=False, img_size=cfg.image_size, **kwargs)
        elif weights == "timm":
            try:
                vit = timm.create_model(cfg.backbone, pretrained=True, **kwargs)
            except (OSError, RuntimeError, ValueError) as e:
                if "Unknown model" in str(e):
                    raise
                raise ModelError(
                    f"pretrained weights for model.backbone {cfg.backbone!r} are not in timm's cache and "
                    f"cannot be fetched ({type(e).__name__}); run once with network access, or set "
                    "model.weights to a local .npz/.safetensors/.pth file, or to none"
                ) from None
        else:
            vit = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
            load_weights_file(vit, Path(weights).expanduser())
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise RecipeError(
                f"model.backbone {cfg.backbone!r} is not a timm model; use a ViT name such as "
                "vit_base_patch16_224.orig_in21k (list them with timm.list_models('vit_*'))"
            ) from None
        raise
    if not isinstance(vit, VisionTransformer):
        raise RecipeError(f"model.backbone {cfg.backbone!r} is not a plain timm VisionTransformer")
    if cfg.layer_norm_eps is not None:
        for m in vit.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = cfg.layer_norm_eps
    if tuple(vit.patch_embed.img_size) != (cfg.image_size, cfg.image_size):
        resize_input(vit, cfg.image_size, cfg.pos_embed_resize)
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
        from timm.models.vision_transformer import _load_weights

        head = {k: v.clone() for k, v in vit.head.state_dict().items()}
        _load_weights(vit, str(path))
        if head:
            vit.head.load_state_dict(head)
        return
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = checkpoint_filter_fn(_read_state_dict(path), vit)
    own = vit.state_dict()
    head_keys = {f"head.{k}" for k in vit.head.state_dict()}
    sd = {k: v for k, v in sd.items() if not (k in head_keys and v.shape != own[k].shape)}
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise CheckpointError(
            f"weights file {path} does not fit {type(vit).__name__}: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}; check model.backbone"
        )


def resize_input(vit: VisionTransformer, size: int, mode: str) -> None:
    """Change the input size, resampling the position grid (CLS/prefix positions kept).

    ``bilinear_corners`` is the reference's corner-aligned bilinear resize; ``bicubic`` is timm's.
    """
    old = vit.pos_embed.detach().clone()
    gh, gw = vit.patch_embed.grid_size
    vit.set_input_size(img_size=(size, size))
    if mode != "bilinear_corners":
        return
    npt = 0 if vit.no_embed_class else vit.num_prefix_tokens
    D = old.shape[-1]
    grid = old[:, npt:].reshape(1, gh, gw, D).permute(0, 3, 1, 2)                       # (1, D, gh, gw)
    grid = F.interpolate(grid, size=vit.patch_embed.grid_size, mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D)                                    # (1, gh'*gw', D)
    vit.pos_embed = nn.Parameter(torch.cat([old[:, :npt], grid], dim=1), requires_grad=vit.pos_embed.requires_grad)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order (names, dtypes, shapes and bytes; not file bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The model


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            probs: list[torch.Tensor] | None) -> torch.Tensor:
    """Softmax attention over (B, heads, N, hd) tensors: fused SDPA, or the explicit path when
    ``probs`` asks for the maps. On a CPU, bf16 training also takes the explicit path: the CPU
    flash-attention backward is about 2.7x slower than two bf16 matmuls there (ViT-B/16, batch 8,
    measured); the forward and every other device/precision use SDPA."""
    q, k = attn.q_norm(q), attn.k_norm(k)
    cpu_bf16_backward = q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad
    if probs is None and not cpu_bf16_backward:
        drop = attn.attn_drop.p if attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    a = (q * attn.scale) @ k.transpose(-2, -1)                            # (B, heads, Nq, N)
    a = a.softmax(dim=-1)
    if probs is not None:
        probs.append(a)
    return attn.attn_drop(a) @ v


def _autocast_input(h: torch.Tensor) -> torch.Tensor:
    """In inference, a LayerNorm output cast once to the autocast dtype. Why: under CPU autocast the
    norm runs in float32, and each consumer (attention or MLP, plus its parallel adapter) would cast
    it again; the values are the same either way. Not when it needs a gradient: the branches'
    gradients would then be summed in bf16 instead of float32."""
    device = h.device.type
    if h.dtype == torch.float32 and not h.requires_grad and device in ("cpu", "cuda") \
            and torch.is_autocast_enabled(device):
        return h.to(torch.get_autocast_dtype(device))
    return h


def _merge_heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    B, nh, N, hd = x.shape
    x = x.transpose(1, 2).reshape(B, N, nh * hd)                          # (B, N, D)
    x = getattr(attn, "norm", nn.Identity())(x)
    return attn.proj(x)


def explicit_attention(attn: nn.Module, x: torch.Tensor, probs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """timm ``Attention`` forward, able to hand out the attention maps (see `_attend`)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k, v = qkv.unbind(0)
    return _merge_heads(attn, _attend(attn, q, k, v, probs))


def cls_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention output for the first token only: its query against every key and value.

    Why: the classifier reads the CLS token alone, so in the last block every other row of the
    query, the output projection and the MLP is computed and thrown away (6.6 % of ViT-B/16's
    multiply-adds at 224 px, 4.6 % of ILA++'s)."""
    B, N, C = x.shape
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :1], w[:C], None if b is None else b[:C])           # (B, 1, D)
    kv = F.linear(x, w[C:], None if b is None else b[C:])                 # (B, N, 2D)
    q = q.reshape(B, 1, attn.num_heads, -1).transpose(1, 2)               # (B, heads, 1, hd)
    k, v = kv.reshape(B, N, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, hd)
    return _merge_heads(attn, _attend(attn, q, k, v, None))


class UfgirViT(nn.Module):
    """A timm ViT plus the PETL modules of one method. timm's model contract is kept."""

    def __init__(self, vit: VisionTransformer, cfg: ModelConfig):
        super().__init__()
        for blk in vit.blocks:
            if not all(hasattr(blk, a) for a in ("norm1", "attn", "norm2", "mlp")) or not hasattr(blk.attn, "qkv"):
                raise RecipeError(f"model.backbone {cfg.backbone!r}: blocks are not pre-norm ViT blocks")
        self.vit = vit
        self.cfg = cfg
        self.method = cfg.method
        self.plan: MethodPlan = method_plan(cfg)
        depth, D = len(vit.blocks), vit.embed_dim
        self.embed_dim = D
        self.num_features = vit.num_features
        self.num_classes = vit.num_classes
        patch = vit.patch_embed.patch_size[0]
        try:
            check_geometry(cfg, depth=depth, patch=patch)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        plan = self.plan

        self.drop = Dropout(cfg.drop)
        self.adapters = (
            nn.ModuleList(
                BlockAdapters(D, cfg.adapter_dim, cfg.adapter_scale, plan.adapters, cfg.adapter_kernel, cfg.adapter_init)
                for _ in range(depth)
            )
            if plan.adapters
            else None
        )
        self.ila = nn.ModuleDict(
            {
                str(i): ILA(
                    D, cfg.ila_dim, downsample=i in plan.ila_ds_locs, kernel_size=cfg.ila_kernel,
                    norm=cfg.ila_norm, cls_conv=cfg.ila_cls_conv, residual_init=cfg.ila_residual_init,
                    dws_mult=cfg.ila_dws_mult, drop=cfg.drop,
                )
                for i in plan.ila_positions
            }
        )
        self.prompt_len = cfg.prompt_len if plan.prompts else 0
        self.prompts = None
        if plan.prompts:
            n = 1 if plan.prompts == "shallow" else depth
            bound = prompt_init_bound(patch, D)
            self.prompts = nn.Parameter(torch.empty(n, cfg.prompt_len, D).uniform_(-bound, bound))
        self.prompt_drop = Dropout(cfg.prompt_dropout)
        if isinstance(vit.head, nn.Linear):
            xavier_linear_(vit.head)  # the reference's init for every Linear, the head included
        self.grad_checkpointing = False
        self.freeze()

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens that flow through the encoder (CLS/registers + shallow prompts)."""
        shallow = self.prompt_len if self.plan.prompts == "shallow" else 0
        return self.vit.num_prefix_tokens + shallow

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Patch grid that each block attends over."""
        g = tuple(self.vit.patch_embed.grid_size)
        out = []
        for i in range(len(self.vit.blocks)):
            out.append(g)
            if str(i) in self.ila:
                g = self.ila[str(i)].out_grid(g)
        return out

    @property
    def tokens_per_block(self) -> list[int]:
        """Sequence length each block outputs, after any ILA that follows it."""
        g = tuple(self.vit.patch_embed.grid_size)
        out = []
        for i in range(len(self.vit.blocks)):
            if str(i) in self.ila:
                g = self.ila[str(i)].out_grid(g)
            out.append(self.num_prefix_tokens + g[0] * g[1])
        return out

    # ---- freezing -------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module | nn.Parameter]:
        """The explicit list of what trains for this method (never chosen by name matching)."""
        if self.plan.train_backbone:
            return [self]
        out: list[nn.Module | nn.Parameter] = [self.vit.get_classifier()]
        if self.vit.cls_token is not None:
            out.append(self.vit.cls_token)
        if self.adapters is not None:
            out.append(self.adapters)
        out.append(self.ila)
        if self.prompts is not None:
            out.append(self.prompts)
        return out

    def freeze(self) -> None:
        self.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors plus every buffer outside the backbone (BatchNorm statistics)."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.named_buffers() if not n.startswith("vit.")}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        head = {f"vit.head.{k}" for k in self.vit.head.state_dict()}
        return {k[4:]: v for k, v in self.state_dict().items() if k.startswith("vit.") and k not in head}

    def backbone_sha256(self) -> str:
        return state_dict_sha256(self.backbone_state_dict())

    # ---- timm contract --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        out = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        if self.prompts is not None:
            out.add("prompts")
        return out

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.vit.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        if isinstance(self.vit.head, nn.Linear):
            xavier_linear_(self.vit.head)
        self.vit.head.requires_grad_(True)

    def _block(self, i: int, x: torch.Tensor, grid: tuple[int, int], probs: list | None,
               cls_only: bool = False) -> torch.Tensor:
        """Block ``i`` with its method's modules. ``cls_only`` (see `cls_only_last_block`) returns the
        CLS row alone, (B, 1, D): keys and values still come from every token, and everything after
        attention is token-wise, so it runs on that one row."""
        blk = self.vit.blocks[i]
        P = self.num_prefix_tokens
        deep = self.plan.prompts == "deep"
        if deep:  # insert this block's prompts after the prefix tokens, remove them after the block
            p = self.prompt_drop(self.prompts[i]).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :P], p, x[:, P:]], dim=1)                  # (B, P + L + HW, D)
            P = P + self.prompt_len
        ad = self.adapters[i] if self.adapters is not None else None
        h = _autocast_input(blk.norm1(x))
        if cls_only:
            a = cls_attention(blk.attn, h)
            h, x = h[:, :1], x[:, :1]                                          # (B, 1, D) from here on
        else:
            a = explicit_attention(blk.attn, h, probs)
        a = self.drop(blk.ls1(a))
        if ad is not None:
            a = a + ad.attn(h, grid, P)
        x = x + blk.drop_path1(a)
        h = _autocast_input(blk.norm2(x))
        m = self.drop(blk.ls2(blk.mlp(h)))
        if ad is not None:
            m = m + ad.mlp(h, grid, P)
        x = x + blk.drop_path2(m)
        if deep:
            x = torch.cat([x[:, : self.num_prefix_tokens], x[:, P:]], dim=1)  # (B, P + HW, D)
        ila = self.ila[str(i)] if str(i) in self.ila else None
        if ila is not None:
            x = ila(x, grid, self.num_prefix_tokens)
        return x

    def forward_features(self, x: torch.Tensor, probs: list | None = None, outputs: list | None = None) -> torch.Tensor:
        """Tokens after the final norm. ``probs`` collects each block's attention (explicit path);
        ``outputs`` collects each block's output tokens, after the ILA that follows it."""
        return self.vit.norm(self._encode(x, probs, outputs))

    def _encode(self, x: torch.Tensor, probs: list | None = None, outputs: list | None = None,
                last_cls_only: bool = False) -> torch.Tensor:
        """Image -> the last block's tokens (all of them, or the CLS row with ``last_cls_only``)."""
        vit = self.vit
        x = vit.patch_embed(x)                                                 # (B, HW, D)
        x = vit._pos_embed(x)                                                  # (B, 1 + HW, D)
        x = vit.norm_pre(vit.patch_drop(x))
        if self.plan.prompts == "shallow":
            n = vit.num_prefix_tokens
            p = self.prompt_drop(self.prompts[0]).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :n], p, x[:, n:]], dim=1)                      # (B, 1 + L + HW, D)
        grids = self.grids
        for i, grid in enumerate(grids):
            if last_cls_only and i == len(grids) - 1:
                return self._block(i, x, grid, None, cls_only=True)            # (B, 1, D)
            if self.grad_checkpointing and self.training and probs is None and not torch.jit.is_scripting():
                x = checkpoint(self._block, i, x, grid, None, use_reentrant=False)
            else:
                x = self._block(i, x, grid, probs)
            if outputs is not None:
                outputs.append(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    @property
    def cls_only_last_block(self) -> bool:
        """True when the logits depend on the last block's CLS row alone: CLS pooling, and nothing
        after or inside the last block that mixes tokens (an ILA there, ConvPass, deep prompts)."""
        last = str(len(self.vit.blocks) - 1)
        return (self.vit.global_pool == "token" and getattr(self.vit, "attn_pool", None) is None
                and last not in self.ila and self.plan.adapters != "convpass" and self.plan.prompts != "deep")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Equal to ``forward_head(forward_features(x))``; when only the CLS token reaches the
        head, the last block is computed for that token alone (`cls_only_last_block`)."""
        if not self.cls_only_last_block:
            return self.forward_head(self.forward_features(x))
        return self.forward_head(self.vit.norm(self._encode(x, last_cls_only=True)))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-softmax attention of every block, (B, heads, S, S) each; eval mode only."""
        if self.training:
            raise RuntimeError("attention_maps() needs eval mode: call model.eval() first")
        probs: list[torch.Tensor] = []
        self.forward_features(x, probs)
        return probs

    def data_config(self) -> dict:
        """What an input must look like, as timm's ``resolve_model_data_config`` says it: input size,
        the normalisation (the recipe's ``model.mean``/``model.std`` when set, else the backbone's
        pretrained config), and the pretrained config's interpolation and crop ratio."""
        pcfg = self.vit.pretrained_cfg or {}
        size = int(self.vit.patch_embed.img_size[0])
        return {
            "input_size": (3, size, size),
            "mean": tuple(self.cfg.mean or pcfg.get("mean", (0.5, 0.5, 0.5))),
            "std": tuple(self.cfg.std or pcfg.get("std", (0.5, 0.5, 0.5))),
            "interpolation": pcfg.get("interpolation", "bicubic"),
            "crop_pct": pcfg.get("crop_pct", 1.0),
        }

    @property
    def default_cfg(self) -> dict:
        return self.vit.pretrained_cfg

    pretrained_cfg = default_cfg


def build_model(model_cfg: ModelConfig, num_classes: int) -> UfgirViT:
    """The model of a recipe: timm backbone with the recipe's weights, plus the method's modules."""
    if num_classes is None or num_classes < 2:
        raise RecipeError("model.num_classes must be >= 2 (set it, or let training take it from the dataset)")
    vit = create_backbone(model_cfg, num_classes)
    return UfgirViT(vit, model_cfg)
