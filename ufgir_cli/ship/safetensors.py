"""Writing a safetensors export: the full state_dict, with ``adapter_only`` the PETL delta, or with
``merged`` the merged model's (`ship.merge`): timm's own state dict (``blocks.0.attn.qkv.weight``, no
``vit.`` prefix) when that model is a plain timm ViT, so timm loads the file as it is.

The header metadata makes the file self-describing (see :mod:`ufgir_cli.model.delta`, which reads
it back); the written file is reloaded with ``load_delta`` and checked against eager PyTorch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import ExportError
from ..model.build import build_model
from ..model.delta import FORMAT_VERSION, LAYOUT_TIMM, LAYOUT_UFGIR, SAFETENSORS_FORMAT, load_delta
from ..model.vit import UfgirViT
from ..recipe import Recipe, dump_resolved
from .parity import (
    DEFAULT_TOLERANCE,
    ExportResult,
    eager_logits,
    model_image_size,
    parity_batch,
    write_checked,
)


def export_safetensors(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, adapter_only: bool = False, *,
                       backbone_sha256: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                       merged: UfgirViT | None = None) -> ExportResult:
    """Write the full state_dict, or with ``adapter_only`` the PETL delta, plus identity metadata.

    ``backbone_sha256`` is the hash of the backbone the run started from (a checkpoint stores it).
    It is not ``model.backbone_sha256()``: training updates backbone tensors such as the CLS token,
    so a trained model no longer hashes like the backbone its delta attaches to. When it is not
    given for an adapter-only export, the backbone is re-created from ``model.weights`` and hashed;
    a full export then records the hash of the model's own backbone tensors. ``merged``: the model with
    its updates folded in (`ship.merge.merged_model`), written instead of ``model`` and checked against it.
    """
    from safetensors.torch import save as st_save

    out = Path(out)
    t0 = time.perf_counter()
    m = recipe.model
    if adapter_only:
        if model.plan.train_backbone:
            raise ExportError(f"method {m.method!r} trains the whole backbone, so there is no adapter delta; "
                              "export without --adapter-only")
        if m.weights == "none":
            raise ExportError("--adapter-only needs a backbone re-creatable from model.weights, but this run used "
                              "weights = \"none\" (random init); export the full model instead")
        backbone_sha256 = backbone_sha256 or build_model(m, model.num_classes).backbone_sha256()
    layout = LAYOUT_UFGIR
    if merged is not None and adapter_only:
        raise ExportError("--merge writes the whole merged model; leave out --adapter-only")
    if merged is None:
        state = model.trainable_state_dict() if adapter_only else model.state_dict()
    elif merged.timm_equivalent() is not None:
        state, layout = merged.vit.state_dict(), LAYOUT_TIMM
    else:
        state = merged.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "adapter_only": "true" if adapter_only else "false",
        "method": m.method,
        "num_classes": str(model.num_classes),
        "backbone": m.backbone,
        "backbone_weights": m.weights,
        "backbone_sha256": backbone_sha256 or model.backbone_sha256(),
        "merged": "true" if merged is not None else "false",
        "layout": layout,
        "recipe": dump_resolved(recipe),
    }
    data = st_save(tensors, metadata=metadata)
    x = parity_batch(2, model_image_size(model))
    diff = write_checked(out, data, lambda f: eager_logits(load_delta(f)[0], x), model, x, tolerance,
                         f"safetensors export {out}" + (" (merged)" if merged is not None else ""))
    return ExportResult(out, "safetensors", diff, tolerance, out.stat().st_size, time.perf_counter() - t0)
