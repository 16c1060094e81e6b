"""`ufgir export`, `ufgir import-upstream`, `ufgir import-peft`, `ufgir predict`: getting models out of and into ufgir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..io import plural
from ._common import (
    BatchSizeOpt,
    CheckpointOpt,
    TopkOpt,
    check_export_format,
    console,
    err_console,
    resolve_run,
)

SourceArg = Annotated[Path | None, typer.Argument(
    help="A run folder, a checkpoint file, or a safetensors export (default: the most recent run under ./runs).",
    show_default=False)]


def export(
    source: SourceArg = None,
    fmt: Annotated[str, typer.Option("--format", "-f", callback=check_export_format, help="safetensors, onnx, pt2, "
                                     "or peft (a peft adapter folder for a plain timm ViT: LoRA, DoRA, GLoRA).")
                   ] = "safetensors",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: <run>/export/model.<ext>, "
                                             "<run>/export/adapter.safetensors with --adapter-only, "
                                             "model.merged.safetensors with --merge, the folder peft/).")] = None,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="safetensors: only the trainable PETL tensors "
                                               "(re-attach to the same backbone with load_run).")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Fold LoRA/DoRA/GLoRA, SSF (and BitFit's biases) into the "
                                        "backbone's weights: a plain timm ViT (ILA with LoRA keeps its ILAs); checked "
                                        "against the unmerged model.")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 18,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch",
                                                help="Any batch size, or a fixed batch of 1.")] = True,
    image_size: Annotated[int | None, typer.Option("--image-size", help="onnx/pt2: input size in px "
                                                   "(position embeddings resampled; default: the trained size).")] = None,
    checkpoint: CheckpointOpt = "auto",
    tolerance: Annotated[float | None, typer.Option("--tolerance", min=0.0, help="Max abs logit difference vs eager "
                                                    "PyTorch (default: 1e-4; peft: 1e-5).")] = None,
) -> None:
    """Export a model (safetensors, ONNX, torch.export pt2 or a peft adapter folder), check it against eager
    PyTorch, write MODEL_CARD.md."""
    from ..ship import export_model, human_bytes

    r = export_model(resolve_run(source), fmt, out, checkpoint=checkpoint, adapter_only=adapter_only, opset=opset,
                     dynamic_batch=dynamic_batch, image_size=image_size, tolerance=tolerance, merge=merge)
    what = f"{r.format}" + (f" opset {r.opset}" if r.opset else "") + (" adapter-only" if adapter_only else "") + \
        (" merged" if merge else "")
    console.print(f"wrote {escape(str(r.path))} ({what}, {human_bytes(r.size_bytes)}) in {r.seconds:.1f} s", soft_wrap=True)
    console.print(f"parity vs eager PyTorch: max |diff| = {r.max_abs_diff:.3g} (tolerance {r.tolerance:g})")
    if r.sidecar is not None:
        console.print(f"recipe sidecar: {escape(str(r.sidecar))}", soft_wrap=True)
    if r.card is not None:
        console.print(f"model card: {escape(str(r.card))}", soft_wrap=True)
    else:
        console.print(f"README: {escape(str(r.path / 'README.md'))} (the timm + peft call that loads it)", soft_wrap=True)


def import_upstream(
    checkpoint: Annotated[Path, typer.Argument(help="A .pth checkpoint written by the reference implementation.",
                                               show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder to create "
                                             "(default: ./runs/<checkpoint name>).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset the run evaluates on "
                                                "(default: the reference config's dataset_name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
) -> None:
    """Turn a reference-implementation (paper) checkpoint into a run folder for eval, export, predict."""
    from ..paths import runs_dir
    from ..ship import import_upstream as do_import

    out = out or runs_dir() / checkpoint.name.split(".")[0]
    model, recipe = do_import(checkpoint, out, overwrite=overwrite, dataset=dataset)
    m = recipe.model
    console.print(f"imported {m.method} on {m.backbone} ({model.num_classes} classes, {m.image_size} px) "
                  f"into {escape(str(out))}", soft_wrap=True)
    console.print(f"next: ufgir eval {escape(str(out))}   ·   ufgir export {escape(str(out))} --format onnx", soft_wrap=True)


def import_peft(
    folder: Annotated[Path, typer.Argument(help="A peft adapter folder (adapter_config.json, adapter_model.safetensors) "
                                           "trained on a timm ViT, its classifier in modules_to_save.",
                                           show_default=False)],
    backbone: Annotated[str, typer.Option("--backbone", help="The timm model it was trained on "
                                          "(e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k).", show_default=False)],
    weights: Annotated[str, typer.Option("--weights", help="The backbone's weights: timm (its pretrained tag) or a "
                                         "local .safetensors/.pth/.npz file.")] = "timm",
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input size in px (default: timm's for "
                                                   "the backbone).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder to create "
                                             "(default: ./runs/<folder name>).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset the run evaluates on.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
) -> None:
    """Turn a peft adapter folder (LoRA, DoRA, GLoRA on a timm ViT) into a run folder for eval, analyse, export."""
    from ..paths import runs_dir
    from ..ship import import_peft as do_import

    out = out or runs_dir() / folder.resolve().name
    model, recipe = do_import(folder, out, backbone, weights=weights, image_size=image_size, dataset=dataset,
                              overwrite=overwrite)
    m = recipe.model
    console.print(f"imported {m.method} on {m.backbone} ({model.num_classes} classes, {m.image_size} px) "
                  f"into {escape(str(out))}; its logits match peft's", soft_wrap=True)
    console.print(f"next: ufgir eval {escape(str(out))}   ·   ufgir export {escape(str(out))} --merge", soft_wrap=True)


def predict(
    model: Annotated[Path, typer.Argument(help="A run folder, checkpoint, .safetensors/.onnx/.pt2 export, or hf://OWNER/NAME.",
                                          show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).",
                                                 show_default=False)],
    topk: TopkOpt = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Top-k classes and probabilities for images, with the run's eval preprocessing (on CPU)."""
    from ..errors import DatasetError
    from ..paths import HubRef
    from ..ship import collect_images, load_predictor, predict_images

    skipped: list[tuple[Path, str]] = []

    def on_skip(path: Path, reason: str) -> None:
        skipped.append((path, reason))
        err_console.print(f"[yellow]skipped[/] {escape(str(path))}: {reason}", soft_wrap=True)

    files = collect_images(images, on_skip)
    predictor = load_predictor(model)
    preds = predict_images(predictor, files, topk=topk, batch_size=batch_size, on_skip=on_skip)
    if not preds:
        raise DatasetError("no readable images among the inputs; give image files (png, jpg, bmp, tif, webp) or folders")
    if as_json:
        typer.echo(json.dumps({
            "model": str(HubRef.parse(model) or model),
            "predictions": [{"path": str(p.path), "top": [{"class_id": c, "name": n, "probability": q}
                                                           for c, n, q in p.top]} for p in preds],
            "skipped": [{"path": str(p), "reason": r} for p, r in skipped],
        }, indent=2))
        return
    _, source = predictor.class_names()
    t = Table(title=f"{predictor.recipe.model.method} · {plural(len(preds), 'image')} · class names from "
                    f"{escape(source) if source else 'class ids (no classes.csv found)'}", title_justify="left")
    t.add_column("image", overflow="fold")
    t.add_column("top-1")
    t.add_column("p", justify="right")
    if topk > 1:
        t.add_column(f"next {min(topk, predictor.num_classes) - 1}")
    for p in preds:
        _, n, q = p.top[0]
        row = [escape(str(p.path)), escape(n), f"{q:.3f}"]
        if topk > 1:
            row.append(escape(", ".join(f"{nn} {qq:.3f}" for _, nn, qq in p.top[1:])))
        t.add_row(*row)
    console.print(t)
