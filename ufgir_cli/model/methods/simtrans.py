"""SimTrans (SIM-Trans, ACM MM'22) as the reference implements it (reference/FGIR.md §8), pure torch.

After each of the backbone's last three blocks (D-3, D-2 and D-1, the reference's blocks 9, 10 and its
"part layer" on a 12-block ViT), a structure injection reads that block's CLS attention over the patches:

- the parts are the patches whose head-summed attention is above its mean over the patches (strict);
- the anchor is the part with the largest head-mean attention w (masked patches count 0);
- every part gets its distance and angle from the anchor on the grid, ``[|d| / g, (atan2(d_col, d_row)
  / pi + 1) / 2]`` (the angle with the column difference first, a straight-above patch at exactly 1.0:
  +0.0 minus nothing, never a negated -0.0), the others [0, 0];
- a two-layer graph convolution (no biases, weights stored (in, out)) over the rank-1 adjacency w wᵀ
  (not normalised, no identity) turns them into one feature per patch, and the anchor's row is added
  to the CLS token; the patch tokens pass unchanged.

The head reads the three injected CLS tokens after the final norm (the reference's ``part_norm``):
BatchNorm, Linear to 1024, BatchNorm, ELU, Linear to the classes. The injections are edits of the token
stream (`Method.stream_edits`), so every pass through the backbone (features, intermediates, attention
maps) sees the stream the logits come from.

What ufgir decides differently from the reference (FGIR.md §8, "pitfalls"): the backbone starts from
the recipe's weights like every other method (``model.weights = "none"`` is the reference's random
start); the five groups of parameters it builds and never uses are not built; and the GCN's middle
dropout, which the reference leaves on in evaluation (``F.dropout`` with its default ``training=True``),
is off in evaluation unless ``model.simtrans_eval_dropout`` asks for it. In training the dropout sits
where the reference's ViT copy has it: on the embeddings, after the MLP's GELU and after its fc2
(``model.drop``), and the GCN's three (0.1), none on the attention output.

The selection and the graph convolution run in float32 whatever the autocast (an fp16 tie moves the
anchor; adjacency values go down to 1e-8).
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RecipeError, RecipeNotice
from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..ila import Dropout
from ..precision import float32_region
from .base import Method, PatchPanel, Selection

#: Structure injections: after each of the backbone's last this many blocks.
INJECTIONS = 3
#: The graph convolution's hidden width, its dropout (all three sites) and LeakyReLU slope.
GCN_HIDDEN, GCN_DROP, LEAK = 512, 0.1, 0.2
#: The head's hidden width.
HEAD_HIDDEN = 1024
#: Parameters the reference builds and never uses (no gradient reaches them): left out of the model,
#: dropped with a notice when its checkpoint is imported.
UNUSED = ("embeddings.struc_token", "embeddings.struct_head.", "encoder.part_structure.fc1.",
          "encoder.part_structure.struct_head.", "encoder.part_structure.struct_head_new.")
#: The reference's block naming -> its ILA backbone's (which `model.convert` maps to timm).
_BLOCK_PARTS = {"attention_norm": "norm1", "ffn_norm": "norm2", "ffn.fc1": "pwff.fc1", "ffn.fc2": "pwff.fc2",
                "attn.query": "attn.proj_q", "attn.key": "attn.proj_k", "attn.value": "attn.proj_v", "attn.out": "proj"}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class GraphConv(nn.Module):
    """One graph convolution as the reference writes it: LeakyReLU(A (X W)) with W stored (in, out),
    no bias, then its own dropout (training only)."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        bound = 1.0 / math.sqrt(fout)
        self.weight = nn.Parameter(torch.empty(fin, fout).uniform_(-bound, bound))
        self.drop = Dropout(GCN_DROP)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """(B, N, in) node features, (B, N, N) adjacency -> (B, N, out)."""
        return self.drop(F.leaky_relu(adjacency @ (x @ self.weight), LEAK))


class StructureGCN(nn.Module):
    """The two graph convolutions every injection shares: (distance, angle) per patch -> a feature of
    the backbone's width per patch."""

    def __init__(self, dim: int, hidden: int = GCN_HIDDEN):
        super().__init__()
        self.gc1 = GraphConv(2, hidden)
        self.gc2 = GraphConv(hidden, dim)

    def forward(self, coords: torch.Tensor, adjacency: torch.Tensor, noise: torch.Tensor | None = None,
                drop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 2) coordinates and (B, N, N) adjacency -> (the first layer's output (B, N, hidden), the
        output (B, N, D)). The dropout between the layers runs in training, or when ``drop`` (the
        reference's eval-time dropout); ``noise`` (B, N, hidden) replaces its draw (keep mask x 1/0.9)."""
        first = self.gc1(coords, adjacency)
        h = F.relu(first)
        if noise is not None:
            h = h * noise
        elif self.training or drop:
            h = F.dropout(h, GCN_DROP, training=True)  # torch's own draw: the reference's stream on a CPU
        return first, self.gc2(h, adjacency)


class ThreeClsHead(nn.Module):
    """SimTrans's head on the three injected CLS tokens after the final norm, concatenated (B, 3 D):
    BatchNorm1d, Linear to 1024, BatchNorm1d, ELU, Linear to the classes (PyTorch's default inits, as
    the reference leaves them)."""

    def __init__(self, dim: int, num_classes: int, parts: int = INJECTIONS, hidden: int = HEAD_HIDDEN):
        super().__init__()
        self.norm_in = nn.BatchNorm1d(parts * dim)
        self.hidden = nn.Linear(parts * dim, hidden)
        self.norm_hidden = nn.BatchNorm1d(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def stages(self, cls: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the first BatchNorm, the Linear, the second BatchNorm and the ELU."""
        out = [self.norm_in(cls)]
        out.append(self.hidden(out[-1]))
        out.append(self.norm_hidden(out[-1]))
        out.append(F.elu(out[-1]))
        return out

    def forward(self, cls: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.stages(cls)[-1]                                             # (B, 1024)
        return x if pre_logits else self.fc(x)


def part_structure(cls_rows: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """What one injection reads of a block's attention: ``cls_rows`` (B, heads, N), the CLS row over
    the N patches of ``grid`` (row-major) -> ``head_sum`` (B, N), ``threshold`` (B,), ``mask`` (B, N)
    bool (the parts), ``weight`` w (B, N) (head mean, 0 outside the mask), ``anchor`` (B,) and
    ``anchor_value`` (B,), ``anchor_rc`` (B, 2) (row, column), ``coords`` (B, N, 2) (distance, angle; 0
    outside the mask) and ``adjacency`` (B, N, N) = w wᵀ. Call it in float32."""
    head_sum = cls_rows.sum(dim=1)                                           # (B, N)
    threshold = head_sum.mean(dim=1)                                         # (B,)
    mask = head_sum > threshold[:, None]
    keep = mask.to(cls_rows.dtype)
    weight = (cls_rows * keep[:, None]).mean(dim=1)                          # (B, N)
    anchor_value, anchor = weight.max(dim=-1)                                # (B,)
    gh, gw = grid
    dev = cls_rows.device
    cells = torch.stack([torch.arange(gh, device=dev).repeat_interleave(gw),
                         torch.arange(gw, device=dev).repeat(gh)], dim=-1).to(cls_rows.dtype)  # (N, 2): (row, col)
    anchor_rc = cells[anchor]                                                # (B, 2)
    # The difference as the reference forms it (cell minus anchor): +0.0 in the anchor's column, so a
    # patch straight above it has atan2(+0.0, negative) = pi, an angle of exactly 1.0.
    rel = (cells[None] - anchor_rc[:, None]) / torch.tensor([gh, gw], device=dev, dtype=cls_rows.dtype)  # (B, N, 2)
    dist = torch.sqrt(torch.sum(rel**2, dim=-1))                             # (B, N)
    angle = (torch.atan2(rel[..., 1], rel[..., 0]) / math.pi + 1) / 2        # (B, N), in (0, 1]
    # The anchor's column spelled out (what torch's atan2 gives there: 1.0 above, 0.5 at and below the
    # anchor), because the ONNX exporter's atan2 takes +0.0 for not positive and would give 0.0 above.
    above = torch.where(rel[..., 0] < 0, 1.0, 0.5).to(angle.dtype)
    angle = torch.where(rel[..., 1] == 0, above, angle)
    coords = torch.stack([dist * keep, angle * keep], dim=-1)                # (B, N, 2)
    adjacency = weight.unsqueeze(2) @ weight.unsqueeze(1)                    # (B, N, N): rank 1
    return {"head_sum": head_sum, "threshold": threshold, "mask": mask, "weight": weight, "anchor": anchor,
            "anchor_value": anchor_value, "anchor_rc": anchor_rc, "coords": coords, "adjacency": adjacency}


class SimTrans(Method):
    """The structure injections (stream edits after the last three blocks), their shared GCN
    (``model.structure``) and the three-CLS head (``model.head``)."""

    timm_head = False
    reads_intermediates = True
    min_train_batch = 2  # BatchNorm1d on (B, features): training statistics need two images
    upstream_head_keys = (("part_head.0.", "head.norm_in."), ("part_head.1.", "head.hidden."),
                          ("part_head.2.", "head.norm_hidden."), ("part_head.4.", "head.fc."),
                          ("encoder.part_structure.gcn.", "structure."))

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.eval_dropout = cfg.simtrans_eval_dropout

    # ---- building -------------------------------------------------------------------------
    @staticmethod
    def injection_blocks(depth: int) -> tuple[int, ...]:
        """The blocks an injection follows: the last three (9, 10, 11 of 12)."""
        return tuple(range(depth - INJECTIONS, depth))

    def build_head(self, vit, num_classes):
        depth = len(vit.blocks)
        if depth < INJECTIONS:
            raise RecipeError(f"method {self.name!r} injects after each of the last {INJECTIONS} blocks; the backbone "
                              f"has {depth}: use a deeper backbone or model.depth >= {INJECTIONS}")
        return ThreeClsHead(vit.embed_dim, num_classes)

    def extra_parameters(self, vit):
        return {"structure": StructureGCN(vit.embed_dim)}

    def backbone_dropout(self, vit, rate):
        """The reference's ViT copy drops on the embeddings, after the MLP's GELU and after its fc2,
        not on the attention output."""
        if rate:
            vit.pos_drop = Dropout(rate)
            for blk in vit.blocks:
                blk.mlp.drop1, blk.mlp.drop2 = Dropout(rate), Dropout(rate)
        return 0.0

    def block_notes(self, model):
        blocks = self.injection_blocks(len(model.vit.blocks))
        return {i: "structure injection" + (" (part layer)" if i == blocks[-1] else "") for i in blocks}

    # ---- the injections -------------------------------------------------------------------
    def stream_edits(self, model, noise: torch.Tensor | None = None, record: list[dict] | None = None):
        """One edit per injection block. ``noise`` (injections, B, N, 512): the GCN's middle dropout
        drawn beforehand (keep mask x 1/0.9), used in place of a draw; ``record`` receives what each
        injection computed, in order."""
        info = model.feature_info
        return {i: partial(self._inject, model, info[i].out_grid, None if noise is None else noise[j], record)
                for j, i in enumerate(self.injection_blocks(len(info)))}

    def _inject(self, model, grid: tuple[int, int], noise: torch.Tensor | None, record: list[dict] | None,
                x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Block output (B, T, D) and its attention (B, heads, T, T) -> the same tokens with the anchor's
        structure feature added to the CLS token."""
        P = model.num_prefix_tokens
        with float32_region(x):
            found = part_structure(attn[:, :, 0, P:].float(), grid)          # the CLS row over the patches
            first, out = model.structure(found["coords"], found["adjacency"], noise, drop=self.eval_dropout)
            index = found["anchor"].view(-1, 1, 1).expand(-1, 1, out.shape[-1])
            feature = out.gather(1, index).squeeze(1)                        # (B, D): the anchor's row
        cls = x[:, :1] + feature.unsqueeze(1).to(x.dtype)
        if record is not None:
            record.append({**found, "cls_rows": attn[:, :, 0, P:], "gcn_gc1_output": first, "gcn_output": out,
                           "structure_feature": feature, "cls_before": x[:, 0], "cls_after": cls[:, 0]})
        return torch.cat([cls, x[:, 1:]], dim=1)                             # (B, T, D): patches unchanged

    # ---- running --------------------------------------------------------------------------
    def pools_cls(self, model) -> bool:
        return False  # the last block's attention over every token feeds its injection

    def forward(self, model, x, eval_mode=None):
        self._mode(eval_mode)
        depth = len(model.vit.blocks)
        last, inter = model.encode(x, frozenset(self.injection_blocks(depth)[:-1]))
        return model.forward_head(model.vit.norm(last), intermediates=[*inter, last])

    def head_input(self, model, x: torch.Tensor, intermediates: list[torch.Tensor] | None) -> torch.Tensor:
        """(B, 3 D): the CLS tokens after the first two injections and the final one, each after the
        final norm (``x`` holds the final normed tokens; ``intermediates`` every block's output, or at
        least the last three)."""
        if intermediates is None:
            raise ValueError(f"the {self.name} head reads the CLS token after each of the last {INJECTIONS} blocks: "
                             "call model(x), or pass forward_head(x, intermediates=[each block's output tokens])")
        norm = model.vit.norm
        return torch.cat([norm(intermediates[-3][:, 0]), norm(intermediates[-2][:, 0]), x[:, 0]], dim=1)

    def forward_head(self, model, x, pre_logits=False, intermediates=None):
        return model.head(self.head_input(model, x, intermediates), pre_logits)

    @torch.no_grad()
    def trace(self, model, x: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, Any]:
        """One eval pass with everything it computed: ``logits``, ``head_input``, ``head_stages``,
        ``attention`` (per block), ``outputs`` (per block, after its injection), and per injection,
        stacked on a first axis, the `part_structure` values, ``cls_rows``, ``gcn_gc1_output``,
        ``gcn_output``, ``structure_feature``, ``cls_before``, ``cls_after`` and ``part_norm_cls``.
        ``noise`` (injections, B, N, 512) replaces the GCN's middle dropout draw (see `stream_edits`)."""
        depth = len(model.vit.blocks)
        record: list[dict] = []
        maps: list[torch.Tensor] = []
        last, inter = model.encode(x, frozenset(range(depth)), tap=lambda a, _: maps.append(a),
                                   edits=self.stream_edits(model, noise, record))
        cls = self.head_input(model, model.vit.norm(last), inter)
        stages = model.head.stages(cls)
        out: dict[str, Any] = {k: torch.stack([r[k] for r in record]) for k in record[0]}
        out.update(logits=model.head.fc(stages[-1]), head_input=cls, head_stages=stages, attention=maps, outputs=inter,
                   part_norm_cls=cls.view(len(x), INJECTIONS, -1).transpose(0, 1))
        return out

    def select(self, model, x):
        found = self.trace(model, x)
        blocks = self.injection_blocks(len(model.vit.blocks))
        steps = [PatchPanel(f"block {i}{' (part layer)' if i == blocks[-1] else ''}: parts, anchor (blue)",
                            picked=[m.nonzero().squeeze(1) for m in found["mask"][j]],
                            anchors=[a.view(1) for a in found["anchor"][j]])
                 for j, i in enumerate(blocks)]
        return Selection("parts above the mean CLS attention and their anchor, at each structure injection",
                         model.feature_info[-1].out_grid, steps=steps)

    # ---- reference checkpoints ------------------------------------------------------------
    @classmethod
    def upstream_settings(cls, config: argparse.Namespace) -> dict[str, Any]:
        # The reference's SimTrans builds its own 12-block ViT copy with LayerNorm eps 1e-6 whatever the
        # flags say (1e-12 moves the fixture's logits by 1.4e-4).
        return {"layer_norm_eps": 1e-6, "depth": None}

    def upstream_rename(self, state):
        """The reference's SimTrans keys (``transformer.`` prefix, its own ViT copy's names, the last
        block as ``encoder.part_layer``) under its ILA backbone's names; the five unused groups dropped
        with a notice (any other key is left for the mapping, which refuses what it does not know)."""
        state = {k.removeprefix("transformer."): t for k, t in state.items()}
        layers = [int(m[1]) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))]
        part_layer = max(layers, default=-1) + 1
        out, dropped = {}, {}
        for k, t in state.items():
            if k.startswith(UNUSED):
                dropped[k] = t
                continue
            if m := re.fullmatch(r"encoder\.(?:layer\.(\d+)|part_layer)\.(.+)\.(weight|bias)", k):
                sub = _BLOCK_PARTS.get(m[2])
                if sub is not None:
                    k = f"encoder.blocks.{m[1] or part_layer}.{sub}.{m[3]}"
            elif k.startswith("encoder.part_norm."):
                k = "encoder_norm." + k.removeprefix("encoder.part_norm.")
            else:
                k = {"embeddings.cls_token": "class_token",
                     "embeddings.position_embeddings": "positional_embedding.pos_embedding"}.get(k, k)
                k = re.sub(r"^embeddings\.patch_embeddings\.", "patch_embedding.", k)
            out[k] = t
        if dropped:
            count = sum(t.numel() for k, t in dropped.items() if not k.endswith(_BUFFERS))
            groups = sorted({next(p for p in UNUSED if k.startswith(p)).rstrip(".") for k in dropped})
            warnings.warn(RecipeNotice(f"left out {count:,} parameters the reference's SimTrans builds and never uses "
                                       f"({', '.join(groups)})"), stacklevel=2)
        return out


__all__ = ["GraphConv", "SimTrans", "StructureGCN", "ThreeClsHead", "part_structure"]
