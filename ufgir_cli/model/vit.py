"""The PETL model: a stock timm ViT run block by block, with the modules of one method around it.

:class:`UfgirViT` keeps a timm ``VisionTransformer`` as ``self.vit`` (so its weights load and hash
exactly as timm defines them) and runs the blocks itself, inserting parallel adapters, prompts and
inter-layer adapters around them as the method's :class:`~.methods.MethodPlan` says. Its geometry
(what each block attends over and outputs) has one source, :attr:`UfgirViT.feature_info`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import RecipeError
from ..geometry import check_geometry
from ..recipe import ModelConfig
from .adapters import BlockAdapters
from .attention import autocast_input, cls_attention, explicit_attention
from .backbone import MICRO, create_backbone, embed_tokens, resize_input, state_dict_sha256
from .feature_info import BlockInfo, take_indices
from .heads import HEADS
from .ila import ILA, Dropout, prompt_init_bound, xavier_linear_
from .methods import MethodPlan, method_plan
from .selection import SelectionMixin


class UfgirViT(SelectionMixin, nn.Module):
    """A timm ViT plus the PETL modules of one method, with timm's model contract: ``forward``,
    ``forward_features``, ``forward_head``, ``forward_intermediates``, ``reset_classifier``,
    ``no_weight_decay``, ``set_grad_checkpointing``, ``set_input_size``, ``pretrained_cfg``, plus
    ``feature_info`` (the block geometry) and ``data_config()``."""

    def __init__(self, vit: VisionTransformer, cfg: ModelConfig, num_classes: int | None = None):
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
        self.num_classes = vit.num_classes if num_classes is None else num_classes
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
        # A comparison method's own head (model/heads.py) replaces timm's, which is then headless.
        self.head = HEADS[plan.head](vit, self.num_classes, cfg) if plan.head != "linear" else None
        self.prompt_len = cfg.prompt_len if plan.prompts else 0
        self.prompts = None
        if plan.prompts:
            n = 1 if plan.prompts == "shallow" else depth  # deep and vqt: one set per block
            bound = prompt_init_bound(patch, D)
            self.prompts = nn.Parameter(torch.empty(n, cfg.prompt_len, D).uniform_(-bound, bound))
        self.prompt_drop = Dropout(cfg.prompt_dropout)
        # GLSim and RAMS: the crop's pass has a CLS token of its own, starting as a copy of the image's.
        self.anchor_cls = nn.Parameter(vit.cls_token.detach().clone()) if self.crops_second_pass else None
        if isinstance(vit.head, nn.Linear):
            xavier_linear_(vit.head)  # the reference's init for every Linear, the head included
        self.grad_checkpointing = False
        self._attn_probs: list[torch.Tensor] | None = None  # set by collect_attention()
        # Per block, while a head selects: (softmax maps, None), or FFVT's (CLS rows, key-0 logits).
        self._selection: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        #: ``forward`` may run the last block for the CLS row alone where that is exact (see
        #: `cls_only_last_block`); False runs every token, as cost counting does.
        self.last_block_cls_only = True
        self.freeze()

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens of every block's output (CLS/registers + shallow prompts, or VQT's query-only
        prompt rows, which a block passes on in front of the CLS token and the next block drops)."""
        stays = self.prompt_len if self.plan.prompts in ("shallow", "vqt") else 0
        return self.vit.num_prefix_tokens + stays

    @property
    def feature_info(self) -> list[BlockInfo]:
        """Per block: what it attends over and what it outputs. The one source of the model's
        geometry; ``grids``, ``tokens_per_block``, the analysis and ``ufgir inspect`` read it."""
        P, D = self.num_prefix_tokens, self.embed_dim
        deep = self.prompt_len if self.plan.prompts == "deep" else 0
        keys = P - self.prompt_len if self.plan.prompts == "vqt" else P  # VQT's prompts are never attended to
        patch = self.vit.patch_embed.patch_size[0]
        g = tuple(self.vit.patch_embed.grid_size)
        out = []
        for i in range(len(self.vit.blocks)):
            ila = self.ila[str(i)] if str(i) in self.ila else None
            g_out = ila.out_grid(g) if ila is not None else g
            out.append(BlockInfo(
                index=i, module=f"vit.blocks.{i}", num_chs=D, reduction=patch, grid=g, num_prefix_tokens=P,
                num_prompts=deep, tokens_attended=keys + deep + g[0] * g[1],
                ila=None if ila is None else "down" if ila.downsample else "same",
                ila_kernel=None if ila is None else ila.kernel_size, out_grid=g_out, tokens_out=P + g_out[0] * g_out[1],
            ))
            g = g_out
        return out

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Patch grid that each block attends over."""
        return [b.grid for b in self.feature_info]

    @property
    def tokens_per_block(self) -> list[int]:
        """Sequence length each block outputs, after any ILA that follows it."""
        return [b.tokens_out for b in self.feature_info]

    def set_input_size(self, image_size: int) -> None:
        """Change the input size in place: the position grid is resampled the way the recipe says
        (``model.pos_embed_resize``), ``self.cfg`` gets the new ``image_size``, and the geometry
        follows. A layout whose down-sampling ILAs no longer fit is a RecipeError, nothing changed."""
        cfg = self.cfg.model_copy(update={"image_size": image_size})
        try:
            check_geometry(cfg, depth=len(self.vit.blocks), patch=self.vit.patch_embed.patch_size[0])
        except ValueError as e:
            raise RecipeError(str(e)) from None
        resize_input(self.vit, image_size, cfg.pos_embed_resize)
        self.cfg = cfg

    # ---- freezing -------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module | nn.Parameter]:
        """The explicit list of what trains for this method (never chosen by name matching)."""
        if self.plan.train_backbone:
            return [self]
        parts = {"head": self.get_classifier(), "cls": self.vit.cls_token, "anchor": self.anchor_cls, "adapters": self.adapters,
                 "ila": self.ila, "prompts": self.prompts}
        return [parts[p] for p in self.plan.trains if parts[p] is not None]

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
        return self.head if self.head is not None else self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if self.head is not None:  # a method's head: rebuilt whole, its own init
            self.head = HEADS[self.plan.head](self.vit, num_classes, self.cfg)
        else:
            self.vit.reset_classifier(num_classes, global_pool)
            if isinstance(self.vit.head, nn.Linear):
                xavier_linear_(self.vit.head)
        self.get_classifier().requires_grad_(True)

    @contextmanager
    def collect_attention(self) -> Iterator[list[torch.Tensor]]:
        """The one hook point for attention maps. Inside the block, every block's post-softmax
        attention, (B, heads, S, S), is appended to the yielded list in block order; attention takes
        the explicit path (fused attention keeps no maps) and ``forward`` computes every token of
        the last block. Gradient checkpointing is off meanwhile (a recomputed block would append twice)."""
        if self._attn_probs is not None:
            raise RuntimeError("collect_attention() is already active on this model")
        probs: list[torch.Tensor] = []
        self._attn_probs = probs
        try:
            yield probs
        finally:
            self._attn_probs = None

    def _block(self, i: int, x: torch.Tensor, grid: tuple[int, int], cls_only: bool = False) -> torch.Tensor:
        """Block ``i`` with its method's modules. ``cls_only`` (see `cls_only_last_block`) returns the
        CLS row alone, (B, 1, D): keys and values still come from every token, and everything after
        attention is token-wise, so it runs on that one row."""
        blk = self.vit.blocks[i]
        P = self.num_prefix_tokens
        deep = self.plan.prompts == "deep"
        vqt = self.plan.prompts == "vqt"
        L = self.prompt_len if vqt else 0
        if vqt:  # the previous block's prompt rows out, this block's prompts in: they only ask (queries)
            P -= L
            p = self.prompt_drop(self.prompts[i].expand(x.shape[0], -1, -1)).to(x.dtype)  # per-sample mask
            x = torch.cat([p, x[:, L:] if i else x], dim=1)                   # (B, L + P + HW, D)
        if deep:  # insert this block's prompts after the prefix tokens, remove them after the block
            p = self.prompt_drop(self.prompts[i]).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :P], p, x[:, P:]], dim=1)                  # (B, P + L + HW, D)
            P = P + self.prompt_len
        ad = self.adapters[i] if self.adapters is not None else None
        h = autocast_input(blk.norm1(x))
        if cls_only:
            a = cls_attention(blk.attn, h)
            h, x = h[:, :1], x[:, :1]                                          # (B, 1, D) from here on
        else:
            a = self._attention(blk.attn, h, L)
        a = self.drop(blk.ls1(a))
        if ad is not None:
            a = a + ad.attn(h, grid, P)
        x = x + blk.drop_path1(a)
        h = autocast_input(blk.norm2(x))
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

    def _attention(self, attn: nn.Module, h: torch.Tensor, query_only: int) -> torch.Tensor:
        """A block's attention, handing its maps to whoever asked: `collect_attention` and, while an
        aggregator head selects tokens, the selection (FFVT's also gets the key-0 logits)."""
        sel = self._selection
        if self._attn_probs is None and sel is None:
            return explicit_attention(attn, h, None, query_only=query_only)
        maps: list[torch.Tensor] = []
        key0: list[torch.Tensor] | None = [] if sel is not None and self.plan.selector == "maws" else None
        out = explicit_attention(attn, h, maps, query_only=query_only, key0=key0)
        if self._attn_probs is not None:
            self._attn_probs.extend(maps)
        if sel is not None:  # FFVT needs the CLS rows and key-0 logits only; the others, whole maps
            sel.append((maps[0][:, :, 0], key0[0]) if key0 is not None else (maps[0], None))
        return out

    def _encode(self, x: torch.Tensor, take: frozenset[int] = frozenset(), stop: int | None = None,
                last_cls_only: bool = False, cls_token: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image -> (the last run block's tokens, the outputs of the blocks in ``take``). Runs blocks
        0..``stop`` (default: all); with ``last_cls_only`` the last block yields its CLS row alone;
        ``cls_token`` replaces the model's CLS token (the crop pass of GLSim and RAMS)."""
        vit = self.vit
        x = embed_tokens(vit, x, cls_token)                                    # (B, 1 + HW, D)
        if self.plan.prompts == "shallow":
            n = vit.num_prefix_tokens
            p = self.prompt_drop(self.prompts[0]).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :n], p, x[:, n:]], dim=1)                      # (B, 1 + L + HW, D)
        blocks = self.feature_info[: None if stop is None else stop + 1]
        outputs = []
        for b in blocks:
            if last_cls_only and b.index == len(blocks) - 1:
                return self._block(b.index, x, b.grid, cls_only=True), outputs  # (B, 1, D)
            if self.grad_checkpointing and self.training and self._attn_probs is None and self._selection is None \
                    and not torch.jit.is_scripting():
                x = checkpoint(self._block, b.index, x, b.grid, use_reentrant=False)
            else:
                x = self._block(b.index, x, b.grid)
            if b.index in take:
                outputs.append(x)
        return x, outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, (B, tokens_per_block[-1], D)."""
        return self.vit.norm(self._encode(x)[0])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's ``forward_intermediates``: ``(final normed tokens, intermediates)``, or the
        intermediates alone with ``intermediates_only``.

        An intermediate is a block's output after the ILA that follows it (length
        ``tokens_per_block[i]``), split like timm's into patch tokens, (B, H_i*W_i, D) for ``"NLC"``
        or (B, D, H_i, W_i) on the block's ``out_grid`` for ``"NCHW"``, and, with
        ``return_prefix_tokens``, its prefix tokens (B, num_prefix_tokens, D) as ``(patches, prefix)``
        pairs. ``indices``: None = every block, n = the last n, a list = those blocks. ``norm``
        applies the final norm to each; ``stop_early`` (and ``intermediates_only``, whose caller
        never sees the rest) stops after the last block asked for."""
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt {output_fmt!r} is not one of NLC, NCHW")
        info = self.feature_info
        take = take_indices(len(info), indices)
        stop = take[-1] if (stop_early or intermediates_only) and take else None
        x, inter = self._encode(x, frozenset(take), stop)
        if norm:
            inter = [self.vit.norm(y) for y in inter]
        P = self.num_prefix_tokens
        prefix = [y[:, :P] for y in inter]                                     # (B, P, D) each
        inter = [y[:, P:] for y in inter]                                      # (B, H_i*W_i, D) each
        if output_fmt == "NCHW":
            inter = [y.reshape(y.shape[0], *info[i].out_grid, -1).permute(0, 3, 1, 2).contiguous()
                     for i, y in zip(take, inter, strict=True)]                # (B, D, H_i, W_i) each
        if return_prefix_tokens:
            inter = list(zip(inter, prefix, strict=True))
        if intermediates_only:
            return inter
        return self.vit.norm(x), inter

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     intermediates: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (or the head's input with ``pre_logits``) from the final normed tokens ``x``.

        IFA's and VQT's heads also read every block's output (prefix tokens included, before the final
        norm): pass them as ``intermediates`` (``model(x)`` does)."""
        kind = self.plan.head
        if kind == "linear":
            return self.vit.forward_head(x, pre_logits=pre_logits)
        if kind in ("aggregator", "avg_cls"):
            raise ValueError(f"the {self.method} head reads what it selects from attention or a second pass: "
                             "call model(x)")
        if kind == "mpncov":
            return self.head(x[:, self.num_prefix_tokens:], self.feature_info[-1].out_grid, pre_logits)
        if kind == "cal":  # one pass's logits (or BAP features); model(x) averages them with its crops'
            return self.head(x[:, self.num_prefix_tokens:], self.feature_info[-1].out_grid, pre_logits=pre_logits)[0]
        if intermediates is None:
            raise ValueError(f"the {self.method} head reads every block's output: call model(x), or pass "
                             "forward_head(x, intermediates=[each block's output tokens])")
        if kind == "ifa":
            return self.head(torch.stack([t[:, 0] for t in intermediates], dim=1), pre_logits)  # (B, depth, D)
        L = self.prompt_len  # vqt: the prompt rows of every block, then the normed CLS behind them
        return self.head([t[:, :L] for t in intermediates], x[:, L], pre_logits)

    @property
    def cls_only_last_block(self) -> bool:
        """True when the logits depend on the last block's CLS row alone: CLS pooling, and nothing
        after or inside the last block that mixes tokens (an ILA there, ConvPass, deep prompts)."""
        last = str(len(self.vit.blocks) - 1)
        pooled_cls = (self.vit.global_pool == "token" and self.plan.head == "linear") or self.plan.head == "ifa"
        return (pooled_cls and getattr(self.vit, "attn_pool", None) is None and last not in self.ila
                and self.plan.adapters != "convpass" and self.plan.prompts != "deep")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Equal to ``forward_head(forward_features(x))`` for single-pass methods; when only the
        CLS token reaches the head (and no attention is being collected), the last block is computed
        for that token alone (`cls_only_last_block`). The selecting and cropping methods run their own
        passes (`selection.SelectionMixin`); CAL in train mode returns a `CALOutput` for its loss."""
        if self.plan.head == "cal":
            return self._cal_train(x) if self.training else self._cal_eval(x)
        if self.crops_second_pass:
            return self._two_passes(x)
        if self.plan.head == "aggregator":
            return self.head(self.select_tokens(x)[0], self.vit.norm, self.drop)
        cls_only = self.last_block_cls_only and self._attn_probs is None and self.cls_only_last_block
        if self.plan.head in ("ifa", "vqt"):  # heads that read every block's output
            last, inter = self._encode(x, frozenset(range(len(self.vit.blocks))), last_cls_only=cls_only)
            return self.forward_head(self.vit.norm(last), intermediates=inter + [last] if cls_only else inter)
        if not cls_only:
            return self.forward_head(self.forward_features(x))
        return self.forward_head(self.vit.norm(self._encode(x, last_cls_only=True)[0]))

    def loss(self, output: torch.Tensor, target: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
        """The training loss of what ``forward`` returned in train mode. The training loop asks the
        model, not the criterion, so that a method with its own objective (several outputs, its own
        terms, a loss that ignores label smoothing) says it here; by default it is ``criterion`` (the
        recipe's cross-entropy) on the logits, in float32. CAL's is its own (`WSDANHead.loss`)."""
        if self.plan.head == "cal":
            return self.head.loss(output, target)
        return criterion(output.float(), target)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-softmax attention of every block, (B, heads, S, S) each; eval mode only."""
        if self.training:
            raise RuntimeError("attention_maps() needs eval mode: call model.eval() first")
        with self.collect_attention() as probs:
            self.forward_features(x)
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
    return UfgirViT(vit, model_cfg, num_classes)


__all__ = ["MICRO", "BlockInfo", "UfgirViT", "build_model", "create_backbone", "explicit_attention", "resize_input",
           "state_dict_sha256"]
