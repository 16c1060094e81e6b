"""`ufgir import-upstream`: a run folder from a reference-implementation (fgir_vit) checkpoint.

The tensor mapping is :func:`ufgir_cli.model.convert.load_upstream_checkpoint`; this module only
assembles the run folder (recipe, checkpoint, provenance) so every ufgir command accepts it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..engine.provenance import write_provenance
from ..errors import CheckpointError
from ..io import atomic_write_text
from ..model.checkpoint import checkpoint_payload, save_checkpoint
from ..model.convert import load_upstream_checkpoint
from ..model.vit import UfgirViT
from ..paths import RunDir
from ..recipe import Recipe, dump_resolved, recipe_from_dict


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
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder for the new run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"run folder {out} exists and is not empty; pass --overwrite to replace it, or another --out")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        atomic_write_text(RunDir(tmp).recipe_file, dump_resolved(recipe))
        save_checkpoint(RunDir(tmp).last, checkpoint_payload(model, recipe))
        write_provenance(tmp, recipe, model.backbone_sha256(), imported_from=src)
        if out.exists():
            old = out.parent / f".{out.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, recipe
