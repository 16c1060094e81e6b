"""`ufgir eval` as a library call: rebuild the model from its checkpoint, evaluate a split, write
``eval/<split>/{metrics.json,per_class.csv,predictions.csv}`` atomically (for a checkpoint that is not
the run's own, the folder `RunDir.eval_dir_for` names, so the run's own results stay)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
import torch._dynamo.exc

from ..data.folder import SplitFile
from ..errors import ModelError
from ..io import atomic_write_json, atomic_write_text
from ..model.checkpoint import load_model
from ..model.precision import resolve_precision
from ..paths import RunDir
from ..recipe import Recipe
from .evaluate import EvalResult, compiled_for_inference, evaluate
from .runtime import Runtime


def eval_run(path: str | Path, split: str | None = None, checkpoint: str = "auto", batch_size: int | None = None,
             precision: str | None = None, device: str = "auto", num_workers: int | None = None,
             on_batch=None, compile_model: bool = False) -> tuple[dict, Path, Recipe]:
    from ..data.loaders import make_loader, open_split

    loaded = load_model(path, checkpoint, device=device)
    model, recipe, ckpt_file, device = loaded.model, loaded.recipe, loaded.file, loaded.device
    split = split or recipe.eval.split
    prec = resolve_precision(precision or recipe.train.precision, device)
    sf = open_split(recipe, split)
    if sf.num_classes != model.num_classes:
        from ..errors import CheckpointError

        raise CheckpointError(f"{ckpt_file} has {model.num_classes} classes but {sf.root} has {sf.num_classes}")
    loader = make_loader(sf, recipe, train=False, batch_size=batch_size or recipe.eval.batch_size or recipe.train.batch_size,
                         workers=num_workers)
    try:
        res = evaluate(compiled_for_inference(model) if compile_model else model, loader, Runtime(device, prec),
                       num_classes=model.num_classes, on_batch=on_batch, data_config=model.data_config())
    except torch._dynamo.exc.TorchDynamoException as e:  # only torch.compile raises these
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"ufgir eval --compile: torch.compile failed ({why}); on a CPU it needs a working C++ "
                         "compiler (install gcc or set CXX), or evaluate without --compile") from None
    out = loaded.eval_dir(split)
    m = write_eval(loaded.run.root, sf, res, checkpoint=loaded.tag, precision=prec, out=out)
    return m, out, recipe


def write_eval(run_dir: Path, sf: SplitFile, res: EvalResult, *, checkpoint: str, precision: str,
               out: Path | None = None) -> dict:
    """Write ``{metrics.json,per_class.csv,predictions.csv}`` of one evaluation of ``sf`` into the run's
    ``eval/<split>/`` (or ``out``: `RunDir.eval_dir_for` names it); returns the metrics as saved.
    `eval_run` and the end of training share it, so a run's own final evaluation and a later ``ufgir eval`` leave the same files."""
    m = dict(res.metrics)
    per_class = m.pop("per_class")
    m.update({"split": sf.split, "checkpoint": checkpoint, "precision": precision})
    out = out or RunDir(run_dir).eval_dir(sf.split)
    atomic_write_json(out / "metrics.json", m)
    counts = [0] * sf.num_classes
    for _, t in sf.samples:
        counts[t] += 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_id", "name", "images", "top1"])
    for c, acc in enumerate(per_class):
        w.writerow([c, sf.class_names[c], counts[c], "" if acc != acc else f"{acc:.4f}"])
    atomic_write_text(out / "per_class.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "target", "prediction", "probability"])
    for i, t, p, pr in zip(res.indices.tolist(), res.targets.tolist(), res.preds.tolist(), res.probs.tolist(), strict=True):
        w.writerow([str(Path(sf.samples[i][0]).relative_to(sf.root)), t, p, f"{pr:.6f}"])
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    return m
