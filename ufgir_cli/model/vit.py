"""The PETL model: a stock timm ViT run block by block, with the modules of one method around it.

:class:`UfgirViT` keeps a timm ``VisionTransformer`` as ``self.vit`` (so its weights load and hash
exactly as timm defines them) and runs the blocks itself, inserting parallel adapters, prompts and
inter-layer adapters around them as the method's :class:`~.methods.MethodPlan` says. Everything else
that makes a method (its head, passes, selection, loss, evaluation modes) belongs to its method object,
``self.method`` (``model/methods/``), to which ``forward`` hands over. Its geometry (what each block
attends over and outputs) has one source, :attr:`UfgirViT.feature_info`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import RecipeError
from ..geometry import check_geometry
from ..methods import method_spec
from ..recipe import ModelConfig
from .adapters import BlockAdapters
from .attention import autocast_input, explicit_attention
from .backbone import MICRO, create_backbone, numerics_of, resize_input, state_dict_sha256
from .eva import block_runner
from .feature_info import BlockInfo, check_output_fmt, take_indices
from .ila import ILA, Dropout, prompt_init_bound, xavier_linear_
from .methods import Method, MethodPlan, StreamEdit, TrainStep, build_method, method_plan
from .reduction import TokenReduction

#: Receives each block's post-softmax attention (B, heads, S, S) and, when asked, its key-0 logits
#: (B, heads, S) (see `UfgirViT.encode`).
AttentionTap = Callable[[torch.Tensor, "torch.Tensor | None"], None]


class UfgirViT(nn.Module):
    """A timm ViT plus the PETL modules of one method, with timm's model contract: ``forward``,
    ``forward_features``, ``forward_head``, ``forward_intermediates``, ``reset_classifier``,
    ``no_weight_decay``, ``set_grad_checkpointing``, ``set_input_size``, ``pretrained_cfg``, plus
    ``feature_info`` (the block geometry) and ``data_config()``."""

    def __init__(self, vit: VisionTransformer, cfg: ModelConfig, num_classes: int | None = None,
                 method: Method | None = None):
        super().__init__()
        #: How the blocks of this backbone's class run (a plain ViT's, timm's Eva: ``model/eva.py``).
        self.runner = block_runner(vit)
        self.runner.check(vit, cfg.backbone)
        if not cfg.resolved:  # positions from the blocks at hand (build_model resolves before building)
            cfg = cfg.for_backbone(len(vit.blocks) + method_spec(cfg.method).replaces_blocks)
        if not cfg.numerics_resolved:  # likewise the numerics, from the backbone at hand
            cfg = cfg.with_numerics(numerics_of(vit))
        self.vit = vit
        #: The model section as built, with every depth-derived key filled in (the run saves this one).
        self.cfg = cfg
        #: The method object: head, passes, selection, loss, evaluation modes (``model/methods/``).
        self.method: Method = method or build_method(cfg)
        self.plan: MethodPlan = method_plan(cfg)
        self.reduction = TokenReduction.of(cfg, len(vit.blocks))  # EViT, ToMe or None (`model/reduction.py`)
        if self.reduction is not None and not self.runner.reduces_tokens:
            raise RecipeError(f"model.token_reduction {cfg.token_reduction!r} runs on plain timm ViT blocks, and "
                              f"model.backbone {cfg.backbone!r} has timm's Eva blocks; drop model.token_reduction "
                              "or choose a plain ViT backbone")
        depth, D = len(vit.blocks), vit.embed_dim
        self.embed_dim = D
        self.num_features = vit.num_features
        self.num_classes = vit.num_classes if num_classes is None else num_classes
        patch = vit.patch_embed.patch_size[0]
        self._check_needs(vit, cfg)
        try:
            check_geometry(cfg, depth=depth, patch=patch)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        plan = self.plan

        # The recipe's dropout on every block's branch outputs, unless the method drops elsewhere.
        self.drop = Dropout(self.method.backbone_dropout(vit, cfg.drop))
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
        # A method's own head replaces timm's, which is then headless.
        self.head = self.method.build_head(vit, self.num_classes)
        self.prompt_len = cfg.prompt_len if plan.prompts else 0
        self.prompts = None
        if plan.prompts:
            n = depth if plan.prompts.per_block else 1
            bound = prompt_init_bound(patch, D)
            self.prompts = nn.Parameter(torch.empty(n, cfg.prompt_len, D).uniform_(-bound, bound))
        self.prompt_drop = Dropout(cfg.prompt_dropout)
        self.anchor_cls = None  # GLSim and RAMS: the crop pass's own CLS token (`Method.extra_parameters`)
        for name, p in self.method.extra_parameters(vit).items():
            setattr(self, name, p)
        if isinstance(vit.head, nn.Linear):
            xavier_linear_(vit.head)  # the reference's init for every Linear, the head included
        #: The backbone's own tensors (by state-dict name under ``vit.``), before the method adapts any
        #: of its layers: what `backbone_sha256` hashes, whatever LoRA or SSF adds beside them.
        self._backbone_keys = frozenset(vit.state_dict())
        self.method.adapt_backbone(self)
        self.grad_checkpointing = False
        #: ``forward`` may run the last block for the CLS row alone where that is exact (see
        #: `cls_only_last_block`); False runs every token, as cost counting does.
        self.last_block_cls_only = True
        self.freeze()

    def _check_needs(self, vit: VisionTransformer, cfg: ModelConfig) -> None:
        """What the method declares it needs of the backbone (``MethodSpec.needs``), checked on the
        built backbone: one line naming the method, the backbone and the missing part."""
        spec = self.method.spec
        missing = {"cls_token": spec.class_token and getattr(vit, "cls_token", None) is None,
                   "abs_pos_embed": getattr(vit, "pos_embed", None) is None,
                   "patch_grid": not hasattr(vit.patch_embed, "grid_size")}
        for need in spec.needs:
            if missing.get(need, False):
                raise RecipeError(f"method {spec.name!r} needs {need.replace('_', ' ')} of its backbone, and "
                                  f"model.backbone {cfg.backbone!r} has none; choose another backbone or method")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens of every block's output (CLS/registers + shallow prompts, or VQT's query-only
        prompt rows, which a block passes on in front of the CLS token and the next block drops)."""
        stays = self.prompt_len if self.plan.prompts and self.plan.prompts.stays else 0
        return self.vit.num_prefix_tokens + stays

    @property
    def feature_info(self) -> list[BlockInfo]:
        """Per block: what it attends over and what it outputs. The one source of the model's
        geometry; ``grids``, ``tokens_per_block``, the analysis and ``ufgir inspect`` read it."""
        P, D = self.num_prefix_tokens, self.embed_dim
        kind = self.plan.prompts
        deep = self.prompt_len if kind and kind.replaced else 0
        keys = P - self.prompt_len if kind and kind.query_only else P  # VQT's prompts are never attended to
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
        return out if self.reduction is None else self.reduction.geometry(self, out)

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Patch grid that each block attends over."""
        return [b.grid for b in self.feature_info]

    @property
    def tokens_per_block(self) -> list[int]:
        """Sequence length each block outputs, after any ILA that follows it."""
        return [b.tokens_out for b in self.feature_info]

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """timm's ``set_input_size``: change the input size in place. The position grid is resampled
        the way the recipe says (``model.pos_embed_resize``), ``self.cfg`` gets the new ``image_size``,
        and the geometry follows. A layout whose down-sampling ILAs no longer fit is a RecipeError,
        nothing changed. Square inputs only; the patch size stays the backbone's."""
        if patch_size is not None and patch_size != self.vit.patch_embed.patch_size[0]:
            raise ValueError("set_input_size: ufgir keeps the backbone's patch size")
        if img_size is None:
            return
        size = img_size if isinstance(img_size, int) else tuple(img_size)
        if not isinstance(size, int):
            if size[0] != size[1]:
                raise ValueError(f"set_input_size: img_size {size} is not square")
            size = size[0]
        image_size = int(size)
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
        parts = {"head": [self.get_classifier()], "cls": [self.vit.cls_token], "anchor": [self.anchor_cls],
                 "adapters": [self.adapters], "ila": [self.ila], "prompts": [self.prompts],
                 **self.method.trainable_parts(self)}
        lacking = [p for p in self.plan.trains if p not in parts]
        if lacking:
            raise RecipeError(f"method {self.method.name!r} trains {', '.join(lacking)} by its row, which its method "
                              f"object {type(self.method).__name__} does not provide (trainable_parts)")
        return [m for p in self.plan.trains for m in parts[p] if m is not None]

    def freeze(self) -> None:
        self.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors plus every buffer outside the backbone (BatchNorm statistics), by their
        state-dict names (timm's for a wrapped layer's: `model.wrapped`)."""
        keep = {id(p) for p in self.parameters() if p.requires_grad}
        keep |= {id(b) for n, b in self.named_buffers() if not n.startswith("vit.")}
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) in keep}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's own tensors without its head, by timm's names: a LoRA's or SSF's tensors
        beside them stay out, so an adapted backbone hashes like the same backbone without them."""
        head = {f"vit.head.{k}" for k in self.vit.head.state_dict()}
        return {k[4:]: v for k, v in self.state_dict().items()
                if k.startswith("vit.") and k not in head and k[4:] in self._backbone_keys}

    def backbone_sha256(self) -> str:
        return state_dict_sha256(self.backbone_state_dict())

    def timm_equivalent(self) -> VisionTransformer | None:
        """The timm ViT inside, when it holds every tensor of this model (no adapters, ILAs, prompts or
        method head beside it, no token reduction: a linear probe, full fine-tuning), so that timm alone may compute
        the same logits; None otherwise. Whether it does (LayerNorm eps, a dropped final norm) is for a parity check."""
        if self.reduction is not None or set(self.state_dict()) != {f"vit.{k}" for k in self.vit.state_dict()}:
            return None
        return self.vit

    # ---- timm contract --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        out = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        if self.prompts is not None:
            out.add("prompts")
        return out | self.method.no_weight_decay(self)

    def param_layers(self) -> dict[str, int]:
        """Each parameter's layer for layer-wise learning-rate decay (``optim.layer_decay``): 0 for the
        embedding (patch embedding, CLS and register tokens, positions, prompts, the anchor CLS), i + 1
        for block i and the adapters and ILA that follow it, depth + 1 for the rest (the final norm,
        pooling and heads)."""
        vit, depth = self.vit, len(self.vit.blocks)
        layer: dict[int, int] = {}
        for i, blk in enumerate(vit.blocks):
            parts = [blk, self.adapters[i] if self.adapters is not None else None, self.ila[str(i)] if str(i) in self.ila else None]
            layer |= {id(p): i + 1 for m in parts if m is not None for p in m.parameters()}
        embedding = [vit.patch_embed, vit.norm_pre, *(getattr(vit, k, None) for k in ("cls_token", "reg_token", "pos_embed")),
                     self.prompts, self.anchor_cls]
        for part in embedding:
            params = part.parameters() if isinstance(part, nn.Module) else [part] if part is not None else []
            layer |= {id(p): 0 for p in params}
        return {name: layer.get(id(p), depth + 1) for name, p in self.named_parameters()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head if self.head is not None else self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if self.head is not None:  # a method's head: rebuilt whole, its own init, in the model's mode
            self.head = self.method.build_head(self.vit, num_classes).train(self.training)
        else:
            self.vit.reset_classifier(num_classes, global_pool)
            if isinstance(self.vit.head, nn.Linear):
                xavier_linear_(self.vit.head)
        self.get_classifier().requires_grad_(True)

    def _block(self, i: int, x: torch.Tensor, grid: tuple[int, int], cls_only: bool = False,
               tap: AttentionTap | None = None, tap_key0: bool = False) -> torch.Tensor:
        """Block ``i`` with its method's modules. ``cls_only`` (see `cls_only_last_block`) returns the
        CLS row alone, (B, 1, D): keys and values still come from every token, and everything after
        attention is token-wise, so it runs on that one row. ``tap``: see `encode`."""
        blk = self.vit.blocks[i]
        P = self.num_prefix_tokens
        kind = self.plan.prompts
        L = self.prompt_len if kind and kind.query_only else 0
        if L:  # the previous block's prompt rows out, this block's prompts in: they only ask (queries)
            P -= L
            p = self.prompt_drop(self.prompts[i].expand(x.shape[0], -1, -1)).to(x.dtype)  # per-sample mask
            x = torch.cat([p, x[:, L:] if i else x], dim=1)                   # (B, L + P + HW, D)
        deep = kind is not None and kind.replaced
        if deep:  # insert this block's prompts after the prefix tokens, remove them after the block
            p = self.prompt_drop(self.prompts[i]).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :P], p, x[:, P:]], dim=1)                  # (B, P + L + HW, D)
            P = P + self.prompt_len
        ad = self.adapters[i] if self.adapters is not None else None
        h = autocast_input(blk.norm1(x))
        if cls_only:
            a = self.runner.cls_attention(blk, h, grid)
            h, x = h[:, :1], x[:, :1]                                          # (B, 1, D) from here on
        else:
            a = self._attention(blk, h, grid, L, tap, tap_key0)
        a = self.drop(self.runner.scale_attn(blk, a))
        if ad is not None:
            a = a + ad.attn(h, grid, P)
        x = x + blk.drop_path1(a)
        h = autocast_input(blk.norm2(x))
        m = self.drop(self.runner.scale_mlp(blk, blk.mlp(h)))
        if ad is not None:
            m = m + ad.mlp(h, grid, P)
        x = x + blk.drop_path2(m)
        if deep:
            x = torch.cat([x[:, : self.num_prefix_tokens], x[:, P:]], dim=1)  # (B, P + HW, D)
        ila = self.ila[str(i)] if str(i) in self.ila else None
        if ila is not None:
            x = ila(x, grid, self.num_prefix_tokens)
        return x

    def _attention(self, blk: nn.Module, h: torch.Tensor, grid: tuple[int, int], query_only: int,
                   tap: AttentionTap | None, tap_key0: bool) -> torch.Tensor:
        """A block's attention; with a ``tap``, the explicit path, whose maps (and key-0 logits when
        ``tap_key0``) the tap receives."""
        if tap is None:
            return self.runner.attention(blk, h, grid, None, query_only)
        maps: list[torch.Tensor] = []
        key0: list[torch.Tensor] | None = [] if tap_key0 else None
        out = self.runner.attention(blk, h, grid, maps, query_only, key0)
        tap(maps[0], key0[0] if key0 is not None else None)
        return out

    def encode(self, x: torch.Tensor, take: frozenset[int] = frozenset(), stop: int | None = None, *,
               last_cls_only: bool = False, cls_token: torch.Tensor | None = None,
               tap: AttentionTap | None = None, tap_key0: bool = False,
               edits: dict[int, StreamEdit] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image -> (the last run block's tokens, the outputs of the blocks in ``take``): the one pass
        through the backbone that every method runs. Runs blocks 0..``stop`` (default: all); with
        ``last_cls_only`` the last block yields its CLS row alone; ``cls_token`` replaces the model's
        CLS token (the crop pass of GLSim and RAMS); ``tap`` receives every block's post-softmax
        attention (B, heads, S, S), in block order, and with ``tap_key0`` its key-0 logits (B, heads, S)
        too (FFVT). Gradient checkpointing is off while tapping (a recomputed block would tap twice).
        ``edits`` (default: the method's own, `Method.stream_edits`): per block, how its output changes
        before the next block (and before ``take`` keeps it); an edited block runs the explicit
        attention path, whose maps its edit receives."""
        vit = self.vit
        edits = self.method.stream_edits(self) if edits is None else edits
        x = self.runner.embed(vit, x, cls_token, self.method.suffix_tokens(self))  # (B, 1 + HW (+ suffix), D)
        run = self.reduction.start(self) if self.reduction is not None else None
        if self.plan.prompts is not None and self.plan.prompts.at_embedding:
            n = vit.num_prefix_tokens
            p = self.prompt_drop(self.prompts[0]).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :n], p, x[:, n:]], dim=1)                      # (B, 1 + L + HW, D)
        blocks = self.feature_info[: None if stop is None else stop + 1]
        outputs = []
        for b in blocks:
            edit = edits.get(b.index)
            if run is not None:  # token reduction: the pass runs each block, its reduction and edit
                x = run.block(b, x, edit, tap, tap_key0)
            elif last_cls_only and b.index == len(blocks) - 1 and edit is None:
                return self._block(b.index, x, b.grid, cls_only=True), outputs  # (B, 1, D)
            elif edit is not None:
                x = self._edited_block(b, x, edit, tap, tap_key0)
            elif self.grad_checkpointing and self.training and tap is None and not torch.jit.is_scripting():
                x = checkpoint(self._block, b.index, x, b.grid, use_reentrant=False)
            else:
                x = self._block(b.index, x, b.grid, tap=tap, tap_key0=tap_key0)
            if b.index in take:
                outputs.append(x)
        return x, outputs

    def _edited_block(self, b: BlockInfo, x: torch.Tensor, edit: StreamEdit, tap: AttentionTap | None,
                      tap_key0: bool) -> torch.Tensor:
        """Block ``b`` then its edit, which receives the block's attention maps (as ``tap`` does too)."""
        maps: list[torch.Tensor] = []

        def keep(a: torch.Tensor, key0: torch.Tensor | None) -> None:
            maps.append(a)
            if tap is not None:
                tap(a, key0)

        return edit(self._block(b.index, x, b.grid, tap=keep, tap_key0=tap_key0), maps[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, (B, tokens_per_block[-1], D)."""
        return self.vit.norm(self.encode(x)[0])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        tap: AttentionTap | None = None,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's ``forward_intermediates``: ``(final normed tokens, intermediates)``, or the
        intermediates alone with ``intermediates_only``.

        An intermediate is a block's output after the ILA that follows it (length
        ``tokens_per_block[i]``), split like timm's into patch tokens, (B, H_i*W_i, D) for ``"NLC"``
        or (B, D, H_i, W_i) on the block's ``out_grid`` for ``"NCHW"``, and, with
        ``return_prefix_tokens``, its prefix tokens (B, num_prefix_tokens, D) as ``(patches, prefix)``
        pairs. ``indices``: None = every block, n = the last n, a list = those blocks. ``norm``
        applies the final norm to each; ``stop_early`` (and ``intermediates_only``, whose caller
        never sees the rest) stops after the last block asked for. ``tap`` receives each block's attention maps
        in the same pass (see `encode`; an addition to timm's signature)."""
        info = self.feature_info
        take = check_output_fmt(info, take_indices(len(info), indices), output_fmt)
        stop = take[-1] if (stop_early or intermediates_only) and take else None
        x, inter = self.encode(x, frozenset(take), stop, tap=tap)
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
        norm): pass them as ``intermediates`` (``model(x)`` does). Methods whose logits need more than
        one pass (``method.single_pass`` False) refuse: call ``model(x)``."""
        return self.method.forward_head(self, x, pre_logits=pre_logits, intermediates=intermediates)

    @property
    def cls_only_last_block(self) -> bool:
        """True when the logits depend on the last block's CLS row alone: the method pools the CLS
        token, and nothing after or inside the last block mixes tokens (an ILA there, ConvPass, deep
        prompts)."""
        last = str(len(self.vit.blocks) - 1)
        mixes = last in self.ila or (self.adapters is not None and self.adapters[-1].mixes_tokens) \
            or (self.plan.prompts is not None and self.plan.prompts.replaced) or self.reduction is not None
        return self.method.pools_cls(self) and not mixes

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, criterion: nn.Module | None = None,
                *, eval_mode: str | None = None) -> torch.Tensor | TrainStep:
        """Logits (B, C) of images (B, 3, S, S), for every method in train and eval mode: the method
        object runs its passes (``forward_head(forward_features(x))`` for single-pass methods, where the
        last block runs for the CLS row alone when that is exact, `cls_only_last_block`).

        With ``target`` (and the recipe's ``criterion``), the training entry point: a `TrainStep` of the
        method's own loss (float32, outside autocast) and the logits. It goes through ``forward`` so
        that DistributedDataParallel sees it. ``eval_mode``: one of ``method.eval_modes`` (CAL's)."""
        if target is None:
            return self.method.forward(self, x, eval_mode)
        if criterion is None:
            raise ValueError("model(x, target) needs the criterion too (the recipe's cross-entropy)")
        return self.method.forward_train(self, x, target, criterion)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-softmax attention of every block, (B, heads, S, S) each; eval mode only."""
        if self.training:
            raise RuntimeError("attention_maps() needs eval mode: call model.eval() first")
        maps: list[torch.Tensor] = []
        self.encode(x, tap=lambda a, _: maps.append(a))
        return maps

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


__all__ = ["MICRO", "BlockInfo", "UfgirViT", "create_backbone", "explicit_attention", "resize_input", "state_dict_sha256"]
