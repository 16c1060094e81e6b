"""`ufgir metrics`: attention CKA, feature statistics and cost of a run, optionally beside another run.

The library call `ufgir_cli.engine.analyze.write_metrics` computes and writes ``<run>/analysis/metrics.json``
and the figures; this module parses the options and prints the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..io import plural
from ._common import (
    BatchSizeOpt,
    CheckpointOpt,
    DeviceOpt,
    DpiOpt,
    FormatOpt,
    RunArg,
    SplitOpt,
    console,
    figure_formats,
    fmt,
    image_progress,
    print_eval_modes,
    resolve_run,
)


def _print_metrics(res: dict, title: str) -> None:
    t = Table(title=title, title_justify="left")
    cka, feat = res.get("attention_cka"), res.get("features")
    for col in ("block", "group", "tokens attended", "tokens out"):
        t.add_column(col, justify="right")
    if cka:
        t.add_column("mean CKA", justify="right")
    if feat:
        for col in ("norm", "distance", "attn px", "entropy/logS"):
            t.add_column(col, justify="right")
    group_of = {i: f"{a}-{b - 1}" for a, b in res["encoder_groups"] for i in range(a, b)}
    attended = res.get("tokens_attended") or ["-"] * len(res["tokens_per_block"])
    for i, tokens in enumerate(res["tokens_per_block"]):
        row = [str(i), group_of[i], str(attended[i]), str(tokens)]
        if cka:
            row.append(fmt(cka["mean_offdiag_per_block"][i]))
        if feat:
            row += [fmt(feat["feature_norm"][i], ".2f"), fmt(feat["pairwise_distance"][i], ".2f"),
                    fmt(feat["attention_distance_px_mean"][i], ".1f"),
                    fmt(feat["attention_entropy_normalized_mean"][i])]
        t.add_row(*row)
    if cka or feat:
        console.print(t)
    if cka:
        skipped = cka["skipped_minibatch_sizes"]
        sizes = ", ".join(map(str, skipped))
        note = f" · left out {len(skipped)} minibatch(es) of fewer than 4 images ({sizes})" if skipped else ""
        console.print(f"mean off-diagonal attention CKA: {fmt(cka['mean_offdiag'])} "
                      f"({plural(cka['images'], 'image')}, {plural(cka['minibatches'], 'minibatch', 'minibatches')}{note})", soft_wrap=True)
    c = res.get("cost")
    if c:
        speed = (f" · {c['images_per_s']:.1f} images/s, {c['latency_ms']:.1f} ms per batch of {c['batch_size']} "
                 f"({c['device']}, {c['precision']})" if "images_per_s" in c else "")
        peak = f" · peak memory {c['peak_memory_mb']:.0f} MiB" if c.get("peak_memory_mb") else ""
        console.print(f"parameters: total {c['params_total']:,} · trainable {c['params_trainable']:,} · per image "
                      f"{c['macs'] / 1e9:.2f} GMACs / {c['flops'] / 1e9:.2f} GFLOPs{speed}{peak}", soft_wrap=True)
        print_eval_modes(c)


def metrics(
    run: RunArg = None,
    split: SplitOpt = "test",
    batches: Annotated[int | None, typer.Option("--batches", min=1, help="Use at most this many minibatches (default: all).")] = None,
    batch_size: BatchSizeOpt = None,
    attention_cka: Annotated[bool, typer.Option("--attention-cka/--no-attention-cka", help="CKA between the attention of every pair of blocks.")] = True,
    features: Annotated[bool, typer.Option("--features/--no-features", help="Per-block feature norms, distances, attention distance and entropy.")] = True,
    cost: Annotated[bool, typer.Option("--cost/--no-cost", help="Parameters, MACs/FLOPs and measured inference speed.")] = True,
    vs: Annotated[Path | None, typer.Option("--vs", help="Another run or checkpoint, analysed on the same images and drawn beside this one.")] = None,
    checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto",
    dpi: DpiOpt = 200,
    vector: FormatOpt = None,
) -> None:
    """Attention CKA, feature statistics and cost of a run's --split images (minibatches of at least 4 for
    CKA): analysis/metrics.json plus figures (PNG, and --format pdf/svg)."""
    formats = figure_formats(vector)
    run = resolve_run(run)
    if not (attention_cka or features or cost):
        raise typer.BadParameter("nothing to compute: keep at least one of --attention-cka, --features, --cost")
    if attention_cka and batch_size is not None and batch_size < 4:
        raise typer.BadParameter(f"{batch_size} is too small for attention CKA (needs >= 4 images per minibatch)",
                                 param_hint="--batch-size")
    from ..engine.analyze import write_metrics

    with image_progress() as progress:
        rep = write_metrics(run, split=split, batches=batches, batch_size=batch_size, cka=attention_cka,
                            features=features, cost=cost, vs=vs, checkpoint=checkpoint, device=device, dpi=dpi,
                            formats=formats, progress=progress)
    for r, label in zip(rep.results, rep.labels, strict=True):
        _print_metrics(r, f"{label} · {r['dataset']} {split}")
    also = "".join(f" (+ .{f})" for f in formats)
    console.print(f"results: {rep.json_path}" + "".join(f"\nfigure: {p}{also}" for p in rep.figures.values()),
                  soft_wrap=True, markup=False)
