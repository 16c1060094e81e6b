"""`ufgir import-upstream`: a run folder from a reference-implementation (fgir_vit) checkpoint.

The tensor mapping is :func:`ufgir_cli.model.convert.load_upstream_checkpoint`; this module only
assembles the run folder (recipe, checkpoint, provenance) so every ufgir command accepts it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from ..model.convert import load_upstream_checkpoint
from ..model.vit import UfgirViT
from ..recipe import Recipe, recipe_from_dict
from .runs import check_new_run, write_imported_run


def import_upstream(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                    dataset: str | None = None) -> tuple[UfgirViT, Recipe]:
    """Turn a reference-implementation checkpoint into a run folder every ufgir command accepts.

    ``dataset`` replaces the dataset name taken from the reference config: the checkpoint stores
    its recipe, so this is the moment to name the dataset folder that ``ufgir eval`` should use.
    The folder is assembled beside ``out`` and renamed into place, so a failed import leaves no
    half-written run; ``overwrite`` replaces a whole existing run (a stale ``best.pt`` or eval
    result of another model must not survive next to the imported weights).
    """
    src, out = Path(src), Path(out)
    check_new_run(out, overwrite)
    try:
        model, recipe = load_upstream_checkpoint(src)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:  # a config or tensors of another layout
        what = f"its config has no {e.name!r}" if isinstance(e, AttributeError) and e.name else \
            "its config or tensors are not laid out as the reference implementation writes them"
        raise CheckpointError(f"{src} cannot be imported: {what}; import-upstream reads checkpoints saved by the "
                              "reference implementation (fgir_vit) for one of its methods") from e
    if dataset is not None:
        data = recipe.model_dump(mode="json")
        data["data"]["dataset"] = dataset
        recipe = recipe_from_dict(data)
    write_imported_run(out, model, recipe, imported_from=src, overwrite=overwrite)
    return model, recipe
