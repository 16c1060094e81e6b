"""A run folder for a model that ufgir did not train (``import-peft``, ``import-upstream``): the files a
training run leaves.

The recipe, the ``last`` checkpoint and the provenance are written with the training loop's own code
(`checkpoint_payload`, `save_checkpoint`, `write_provenance`) into the layout `RunDir` names, so every
command that takes a run (eval, analyse, export, predict, push) takes it. The folder is assembled beside
``out`` and renamed into place: a failed import leaves no half-written run, and ``overwrite`` replaces a
whole earlier run (a stale ``best.pt`` or evaluation of another model must not survive beside it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..engine.provenance import write_provenance
from ..errors import CheckpointError
from ..io import atomic_write_text, replace_dir
from ..model.checkpoint import checkpoint_payload, save_checkpoint
from ..model.vit import UfgirViT
from ..paths import RunDir
from ..recipe import Recipe, dump_resolved


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse, in one line, an ``out`` that is a file, or a run folder with something in it without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder for the new run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"run folder {out} exists and is not empty; pass --overwrite to replace it, or another --out")


def write_imported_run(out: str | os.PathLike, model: UfgirViT, recipe: Recipe, *, imported_from: Path,
                       import_format: str | None = None, overwrite: bool = False, backbone_sha256: str | None = None) -> RunDir:
    """Write ``model`` and ``recipe`` as the run folder ``out`` (see the module's docstring); the
    provenance names ``imported_from``, the file whose tensors were imported, and what it is.
    ``backbone_sha256``: the backbone the model started from, when it trained backbone tensors (the
    model's own hash otherwise, as `checkpoint_payload` takes it)."""
    out = Path(out)
    check_new_run(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        run = RunDir(tmp)
        atomic_write_text(run.recipe_file, dump_resolved(recipe))
        sha = backbone_sha256 or model.backbone_sha256()
        save_checkpoint(run.last, checkpoint_payload(model, recipe, backbone_sha256=sha))
        what = {} if import_format is None else {"import_format": import_format}  # None: provenance's default
        write_provenance(tmp, recipe, sha, imported_from=Path(imported_from), **what)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunDir(out)


__all__ = ["check_new_run", "write_imported_run"]
