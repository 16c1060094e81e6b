"""`ufgir eval`: top-1/top-5, per-class accuracy and predictions of a run or checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ._common import (
    BatchSizeOpt,
    CheckpointOpt,
    DeviceOpt,
    RunArg,
    SplitOpt,
    check_precision,
    console,
    err_console,
    resolve_run,
)


def eval_cmd(
    run: RunArg = None,
    split: SplitOpt = None,
    checkpoint: CheckpointOpt = "auto",
    batch_size: BatchSizeOpt = None,
    precision: Annotated[str | None, typer.Option(callback=check_precision,
                                                  help="fp32, bf16, fp16 or auto (default: the run's).")] = None,
    device: DeviceOpt = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model first (weights frozen "
                                           "into the graph): tens of seconds once, faster batches after; "
                                           "needs a C++ compiler on a CPU.")] = False,
) -> None:
    """Evaluate --split (default: the recipe's eval.split) and write
    eval/<split>/{metrics.json,per_class.csv,predictions.csv} under the run."""
    from ..errors import OptionError

    run = resolve_run(run)
    if run.suffix.lower() in (".onnx", ".pt2"):  # before torch: this is not a file eval reads
        raise OptionError(f"{run}: `ufgir eval` reads run folders, checkpoints (.pt) and .safetensors exports, not "
                          f"{run.suffix} graphs; run an exported graph on images with `ufgir predict {run} IMAGES`")
    from ..engine.report import eval_run
    from ..recipe_sections import splits_share_images

    m, out, recipe = eval_run(run, split, checkpoint, batch_size, precision, device, compile_model=compile_)
    if splits_share_images(recipe.train.split, m["split"]):
        err_console.print(f"[yellow]warning:[/] the model trained on {recipe.train.split}, which shares its images with "
                          f"{m['split']}: these numbers are not on held-out images (this run holds out "
                          f"{recipe.eval.split})", soft_wrap=True)
    t = Table(title=f"{recipe.model.method} on {recipe.data.dataset} · {m['split']} · checkpoint {m['checkpoint']}",
              title_justify="left")
    for col in ("top-1 %", "top-5 %", "per-class mean %", "per-class std %", "loss", "images", "classes"):
        t.add_column(col, justify="right")
    t.add_row(f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['per_class_mean']:.2f}", f"{m['per_class_std']:.2f}",
              f"{m['loss']:.4f}", str(m["num_images"]), str(m["num_classes"]))
    console.print(t)
    console.print(f"results: {out}", soft_wrap=True, markup=False)
