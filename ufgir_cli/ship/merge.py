"""``ufgir export --merge``: the model with its method's updates folded into the backbone's weights.

The method object does the folding (`Method.export_model`: peft's merge for LoRA, DoRA and GLoRA, the
scales and shifts into the layer before them for SSF; BitFit's biases are the backbone's own already),
so a LoRA, SSF or BitFit model becomes a plain timm ViT of the same module structure, at a plain ViT's
cost. Modules that do not fold stay (ILA with LoRA keeps its ILAs). The merged model is checked against
the unmerged one before anything is written (`MERGE_TOLERANCE`).
"""

from __future__ import annotations

from ..errors import ExportError
from ..model.vit import UfgirViT
from .parity import check_parity, eager_logits, model_image_size, parity_batch

#: Max |logit difference| between the merged model and the model as trained.
MERGE_TOLERANCE = 1e-5


def merged_model(model: UfgirViT, tolerance: float = MERGE_TOLERANCE) -> tuple[UfgirViT, float]:
    """(the merged model, its max |logit difference| from ``model``); a method with nothing to fold
    whose model is not a plain timm ViT already is refused in one line."""
    method = model.method
    merged = method.export_model(model)
    if not method.merges and merged.timm_equivalent() is None:
        raise ExportError(f"--merge: method {method.name!r} ({method.spec.display_name}) has nothing that folds into "
                          "the backbone's weights (its modules run beside them); export without --merge")
    x = parity_batch(2, model_image_size(model))
    diff = check_parity(eager_logits(merged, x), eager_logits(model, x), tolerance,
                        f"the merged model ({method.merges or 'nothing folded'})")
    return merged, diff


__all__ = ["MERGE_TOLERANCE", "merged_model"]
