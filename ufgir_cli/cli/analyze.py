"""`ufgir metrics`, `ufgir visualize rollout|attention` and `ufgir compare`: why a model attends the way
it does, and what it costs.

The numbers come from ``ufgir_cli.analysis`` and the figures from ``ufgir_cli.viz``; this module only
loads runs and images, wires them together and writes results under ``<run>/analysis/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ._common import DeviceOpt, RunArg, console

CheckpointOpt = Annotated[str, typer.Option("--checkpoint", help="best, last or auto (best if present).")]
FusionOpt = Annotated[str, typer.Option("--fusion", help="Head fusion: mean, max or min.")]
SourceSplitOpt = Annotated[str, typer.Option("--split", help="Split whose first --batch-size images are shown.")]
ImagesOpt = Annotated[
    list[Path] | None,
    typer.Option("--images", help="Image files to show instead of a split (repeatable).", show_default=False),
]
VisBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="How many images of the split to show.")]
ColsOpt = Annotated[int, typer.Option("--cols", min=1, help="Panels per row of the grid.")]

visualize_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich")


# --------------------------------------------------------------------------------------------
# Shared plumbing


def _load(run: Path, checkpoint: str, device: str) -> tuple[Any, Any, Path, str]:
    """(model in eval mode, recipe, checkpoint file, device) of a run folder or checkpoint file."""
    from ..model.checkpoint import load_run, resolve_checkpoint
    from ..model.precision import resolve_device

    device = resolve_device(device)
    ckpt = resolve_checkpoint(run, checkpoint)
    model, recipe = load_run(ckpt, device=device)
    return model.eval(), recipe, ckpt, device


def _label(run_dir: Path, recipe) -> str:
    return f"{run_dir.name} ({recipe.model.method})"


def _fusion(value: str) -> str:
    from ..analysis.rollout import FUSIONS

    if value not in FUSIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(FUSIONS)}", param_hint="--fusion")
    return value


def cost_section(model, recipe, device: str, throughput: bool = True) -> dict:
    """Parameters, MACs and FLOPs per image (as `ufgir inspect` counts them) and, when asked, measured
    inference speed at the recipe's batch size and precision."""
    from ..analysis.cost import cost_summary, measure_inference
    from ..model.precision import resolve_precision

    out = cost_summary(model, recipe.model.image_size)
    out["image_size"] = recipe.model.image_size
    if throughput:
        t = measure_inference(model, recipe.model.image_size, recipe.train.batch_size, device=device,
                              precision=resolve_precision(recipe.train.precision, device))
        out.update(images_per_s=t.images_per_s, latency_ms=t.latency_ms, peak_memory_mb=t.peak_memory_mb,
                   batch_size=t.batch_size, device=t.device, precision=t.precision)
    return out


# --------------------------------------------------------------------------------------------
# ufgir metrics


def _measure(run: Path, *, checkpoint: str, device: str, split: str, data_recipe, batches: int | None,
             batch_size: int | None, cka: bool, features: bool, cost: bool) -> tuple[dict, Any]:
    """Everything `metrics` reports for one run; images come from ``data_recipe``'s dataset (or the run's)."""
    from ..analysis.cka import MIN_BATCH
    from ..analysis.features import analyse_batches
    from ..analysis.rollout import encoder_groups
    from ..data.datasets import normalize
    from ..data.loaders import make_loader, open_split
    from ..model.checkpoint import checkpoint_tag
    from ..paths import run_dir_of

    model, recipe, ckpt, device = _load(run, checkpoint, device)
    res: dict = {
        "run": str(run_dir_of(run)), "checkpoint": checkpoint_tag(ckpt), "method": recipe.model.method,
        "backbone": recipe.model.backbone, "image_size": recipe.model.image_size,
        "tokens_per_block": model.tokens_per_block,
        "encoder_groups": [list(g) for g in encoder_groups(model.grids)],
    }
    if cka or features:
        data = data_recipe or recipe
        sf = open_split(data, split)
        bs = batch_size or max(MIN_BATCH if cka else 1, recipe.eval.batch_size or recipe.train.batch_size)
        loader = make_loader(sf, recipe, train=False, batch_size=bs)
        data_cfg = model.data_config()
        mean, std = data_cfg["mean"], data_cfg["std"]
        stream = (normalize(x.to(device), mean, std) for x, _, _ in loader if len(x))
        total = len(sf.samples) if batches is None else min(len(sf.samples), batches * bs)
        with _progress(f"analysing {run_dir_of(run).name}", total) as advance:
            res.update(analyse_batches(model, stream, cka=cka, features=features, max_batches=batches,
                                       on_batch=advance))
        res.update(dataset=data.data.dataset, split=split, batch_size=bs)
    if cost:
        res["cost"] = cost_section(model, recipe, device)
    return res, recipe


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar of images on a terminal (silent in logs and tests); yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _print_metrics(res: dict, title: str) -> None:
    t = Table(title=title, title_justify="left")
    cka, feat = res.get("attention_cka"), res.get("features")
    for col in ("block", "tokens"):
        t.add_column(col, justify="right")
    if cka:
        t.add_column("mean CKA", justify="right")
    if feat:
        for col in ("norm", "distance", "attn px", "entropy/logS"):
            t.add_column(col, justify="right")
    for i, tokens in enumerate(res["tokens_per_block"]):
        row = [str(i), str(tokens)]
        if cka:
            row.append(_fmt(cka["mean_offdiag_per_block"][i]))
        if feat:
            row += [_fmt(feat["feature_norm"][i], ".2f"), _fmt(feat["pairwise_distance"][i], ".2f"),
                    _fmt(feat["attention_distance_px_mean"][i], ".1f"),
                    _fmt(feat["attention_entropy_normalized_mean"][i])]
        t.add_row(*row)
    if cka or feat:
        console.print(t)
    if cka:
        skipped = cka["skipped_minibatch_sizes"]
        sizes = ", ".join(map(str, skipped))
        note = f" · left out {len(skipped)} minibatch(es) of fewer than 4 images ({sizes})" if skipped else ""
        console.print(f"mean off-diagonal attention CKA: {_fmt(cka['mean_offdiag'])} "
                      f"({cka['images']} images, {cka['minibatches']} minibatch(es){note})", soft_wrap=True)
    c = res.get("cost")
    if c:
        speed = (f" · {c['images_per_s']:.1f} images/s, {c['latency_ms']:.1f} ms per batch of {c['batch_size']} "
                 f"({c['device']}, {c['precision']})" if "images_per_s" in c else "")
        peak = f" · peak memory {c['peak_memory_mb']:.0f} MiB" if c.get("peak_memory_mb") else ""
        console.print(f"parameters: total {c['params_total']:,} · trainable {c['params_trainable']:,} · per image "
                      f"{c['macs'] / 1e9:.2f} GMACs / {c['flops'] / 1e9:.2f} GFLOPs{speed}{peak}", soft_wrap=True)


def metrics(
    run: RunArg,
    split: Annotated[str, typer.Option("--split", help="Split whose images are analysed.")] = "test",
    batches: Annotated[int | None, typer.Option("--batches", min=1, help="Use at most this many minibatches (default: all).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Minibatch size (default: the recipe's, at least 4).")] = None,
    attention_cka: Annotated[bool, typer.Option("--attention-cka/--no-attention-cka", help="CKA between the attention of every pair of blocks.")] = True,
    features: Annotated[bool, typer.Option("--features/--no-features", help="Per-block feature norms, distances, attention distance and entropy.")] = True,
    cost: Annotated[bool, typer.Option("--cost/--no-cost", help="Parameters, MACs/FLOPs and measured inference speed.")] = True,
    vs: Annotated[Path | None, typer.Option("--vs", help="Another run or checkpoint, analysed on the same images and drawn beside this one.")] = None,
    checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Attention CKA, feature statistics and cost of a run: analysis/metrics.json plus PNG figures."""
    if not (attention_cka or features or cost):
        raise typer.BadParameter("nothing to compute: keep at least one of --attention-cka, --features, --cost")
    if attention_cka and batch_size is not None and batch_size < 4:
        raise typer.BadParameter(f"{batch_size} is too small for attention CKA (needs >= 4 images per minibatch)",
                                 param_hint="--batch-size")
    from ..io import atomic_write_json
    from ..paths import run_dir_of
    from ..viz.figures import save_cka, save_feature_metrics

    kw = dict(checkpoint=checkpoint, device=device, split=split, batches=batches, batch_size=batch_size,
              cka=attention_cka, features=features, cost=cost)
    res, recipe = _measure(run, data_recipe=None, **kw)
    run_dir = run_dir_of(run)
    out = run_dir / "analysis"
    labels, results = [_label(run_dir, recipe)], [res]
    if vs is not None:
        other, other_recipe = _measure(vs, data_recipe=recipe, **kw)
        labels.append(_label(run_dir_of(vs), other_recipe))
        results.append(other)
    suffix = f"_vs_{run_dir_of(vs).name}" if vs is not None else ""
    figures = {}
    if attention_cka:
        figures["cka"] = save_cka([r["attention_cka"]["matrix"] for r in results], labels,
                                  out / f"cka{suffix}.png").name
    if features:
        figures["features"] = save_feature_metrics([r["features"] for r in results], labels,
                                                   out / f"features{suffix}.png").name
    doc = {**res, "figures": figures}
    if vs is not None:
        doc["vs"] = results[1]
    atomic_write_json(out / "metrics.json", doc)
    for r, label in zip(results, labels, strict=True):
        _print_metrics(r, f"{label} · {r.get('dataset', recipe.data.dataset)} {split}")
    console.print(f"results: {out / 'metrics.json'}" + "".join(f"\nfigure: {out / f}" for f in figures.values()),
                  soft_wrap=True, markup=False)


# --------------------------------------------------------------------------------------------
# ufgir visualize


def _class_names(recipe) -> list[str] | None:
    """The dataset's class names, when its folder is present (a model can be shown without its data)."""
    from ..data.folder import read_classes
    from ..errors import DatasetError
    from ..paths import dataset_dir

    try:
        return read_classes(dataset_dir(recipe.data.dataset, recipe.data.root))
    except DatasetError:
        return None


def _load_images(recipe, split: str, images: list[Path] | None, count: int):
    """(uint8 (B, 3, S, S) images, targets or Nones, file stems, class names) as the model's eval transform sees them."""
    import torch

    from ..data.datasets import load_image, preprocess_for
    from ..data.loaders import open_split

    tf = preprocess_for(recipe, train=False)
    if images:
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise typer.BadParameter(f"no such file: {', '.join(missing)}", param_hint="--images")
        x = torch.stack([tf(load_image(str(p)), None) for p in images])       # (B, 3, S, S) uint8
        return x, [None] * len(images), [p.stem for p in images], _class_names(recipe)
    sf = open_split(recipe, split)
    rows = sf.samples[:count]
    x = torch.stack([tf(load_image(path), None) for path, _ in rows])          # (B, 3, S, S) uint8
    return x, [t for _, t in rows], [Path(path).stem for path, _ in rows], sf.class_names


def _visualize(run: Path, *, split: str, images: list[Path] | None, count: int, cols: int, checkpoint: str,
               device: str, name: str, make_maps) -> None:
    """Load, run once, turn the attention into maps with ``make_maps(model, attention) -> [(label, (B, h, w))]``,
    and write the grid plus one PNG per image under ``<run>/analysis/visualize/<name>/``."""
    import torch

    from ..analysis.rollout import upsample
    from ..data.datasets import normalize
    from ..paths import run_dir_of
    from ..viz.figures import Overlay, save_overlays

    model, recipe, _, device = _load(run, checkpoint, device)
    x, targets, stems, class_names = _load_images(recipe, split, images, count)
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    probs: list[torch.Tensor] = []
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(normalize(x.to(device), mean, std), probs))
    preds = logits.argmax(dim=1).tolist()
    maps = [(label, upsample(m, tuple(x.shape[-2:])).cpu().numpy()) for label, m in make_maps(model, probs)]

    def cls_name(c: int | None) -> str:
        if c is None:
            return "?"
        return class_names[c] if class_names and c < len(class_names) else f"class {c}"

    pictures = x.permute(0, 2, 3, 1).numpy()                                   # (B, S, S, 3) uint8
    out = run_dir_of(run) / "analysis" / "visualize" / name
    per_image = len(maps)
    panels, written = [], set()
    for b in range(x.shape[0]):
        head = f"{stems[b]}\ntrue {cls_name(targets[b])} · pred {cls_name(preds[b])}"
        own = [Overlay(pictures[b], m[b], f"{head}\n{label}") for label, m in maps]
        written.add(save_overlays(own, out / f"{b:03d}_{stems[b]}.png", cols=per_image, per_image=per_image).name)
        panels += own
    grid = save_overlays(panels, out / "grid.png", cols=cols, per_image=per_image)
    for old in out.glob("[0-9][0-9][0-9]_*.png"):  # per-image files of an earlier, larger call
        if old.name not in written:
            old.unlink()
    console.print(str(grid), soft_wrap=True, markup=False)


def _model_kernels(model) -> dict[int, int]:
    return {int(i): m.kernel_size for i, m in model.ila.items() if m.downsample}


@visualize_app.command("rollout")
def rollout(
    run: RunArg,
    split: SourceSplitOpt = "test",
    images: ImagesOpt = None,
    batch_size: VisBatchOpt = 8,
    cols: ColsOpt = 8,
    group: Annotated[str | None, typer.Option("--group", help="Blocks a-b (b exclusive) inside one encoder group, e.g. 0-4 (default: every group).")] = None,
    fusion: FusionOpt = "mean",
    discard: Annotated[float, typer.Option("--discard", min=0.0, max=0.99, help="Drop this fraction of the weakest attention entries per block.")] = 0.0,
    across: Annotated[bool, typer.Option("--across", help="One map through all blocks, carried over each down-sampling ILA.")] = False,
    checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Attention rollout per encoder group (or --across the whole network) over the images; prints the grid path."""
    from ..analysis import rollout as ro

    fusion = _fusion(fusion)
    if across and group is not None:
        raise typer.BadParameter("--group and --across exclude each other", param_hint="--group")

    def make_maps(model, attention):
        grids = [tuple(g) for g in model.grids]
        if across:
            return [(f"rollout across 0-{len(grids)}",
                     ro.rollout_across(attention, grids, _model_kernels(model), fusion, discard))]
        if group is not None:
            try:
                groups = [ro.parse_group(group, grids)]
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--group") from None
        else:
            groups = ro.encoder_groups(grids)
        return [(f"rollout {a}-{b}", ro.rollout(attention[a:b], grids[a], fusion, discard)) for a, b in groups]

    what = "across" if across else (group or "groups")
    name = f"rollout_{what}_{fusion}" + (f"_discard{discard:g}" if discard else "") + f"_{'images' if images else split}"
    _visualize(run, split=split, images=images, count=batch_size, cols=cols, checkpoint=checkpoint, device=device,
               name=name, make_maps=make_maps)


@visualize_app.command("attention")
def attention(
    run: RunArg,
    split: SourceSplitOpt = "test",
    images: ImagesOpt = None,
    batch_size: VisBatchOpt = 8,
    cols: ColsOpt = 8,
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="Block whose CLS attention is shown (default: the last).")] = None,
    fusion: FusionOpt = "mean",
    checkpoint: CheckpointOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """The head-fused CLS attention of one block over the images; prints the grid path."""
    from ..analysis.rollout import attention_l

    fusion = _fusion(fusion)

    def make_maps(model, maps):
        depth = len(maps)
        block = depth - 1 if layer is None else layer
        if block >= depth:
            raise typer.BadParameter(f"{block} is not a block of this {depth}-block model (0-{depth - 1})",
                                     param_hint="--layer")
        return [(f"attention block {block}", attention_l(maps[block], tuple(model.grids[block]), fusion))]

    name = f"attention_{'last' if layer is None else f'l{layer}'}_{fusion}_{'images' if images else split}"
    _visualize(run, split=split, images=images, count=batch_size, cols=cols, checkpoint=checkpoint, device=device,
               name=name, make_maps=make_maps)


# --------------------------------------------------------------------------------------------
# ufgir compare


def _run_recipe(path: Path):
    """The saved recipe of a run folder, or the one stored in a checkpoint file."""
    from ..model.checkpoint import read_checkpoint, resolve_checkpoint
    from ..paths import run_dir_of
    from ..recipe import load_saved_recipe, recipe_from_dict

    saved = run_dir_of(path) / "recipe.toml"
    if saved.is_file():
        return load_saved_recipe(saved)
    return recipe_from_dict(read_checkpoint(resolve_checkpoint(path))["recipe"])


def _static_cost(recipe, num_classes: int) -> dict:
    """Parameters and MACs of a recipe's model, built on the meta device (no weights, no compute)."""
    import torch

    from ..analysis.cost import cost_summary
    from ..model import build_model

    cfg = recipe.model.model_copy(update={"weights": "none"})  # structure and cost need no weights
    with torch.device("meta"):
        model = build_model(cfg, cfg.num_classes or num_classes)
    return cost_summary(model, cfg.image_size)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders or checkpoint files.", show_default=False)],
    split: Annotated[str, typer.Option("--split", help="Whose eval results to compare (eval/<split>/metrics.json).")] = "test",
    out: Annotated[Path | None, typer.Option("--out", help="The accuracy-vs-MACs PNG (default: compare_<split>.png beside the first run); a .json table is written beside it.")] = None,
) -> None:
    """Top-1 against multiply-adds and trainable parameters of several runs, with the paper's number beside ours."""
    import json

    from ..analysis.paper import PAPER_IMAGE_SIZE, paper_top1
    from ..io import atomic_write_json
    from ..paths import run_dir_of
    from ..viz.figures import save_accuracy_vs_macs

    rows, missing = [], []
    for run in runs:
        if not run.exists():
            missing.append(f"{run}: does not exist")
            continue
        run_dir = run_dir_of(run)
        result = run_dir / "eval" / split / "metrics.json"
        if not result.is_file():
            missing.append(f"{run}: no {result.relative_to(run_dir)}; run `ufgir eval {run} --split {split}`")
            continue
        m = json.loads(result.read_text(encoding="utf-8"))
        recipe = _run_recipe(run)
        c = _static_cost(recipe, m["num_classes"])
        rows.append({
            "run": str(run_dir), "label": run_dir.name, "method": recipe.model.method, "dataset": recipe.data.dataset,
            "image_size": recipe.model.image_size, "checkpoint": m.get("checkpoint"), "top1": m["top1"],
            "paper_top1_448px": paper_top1(recipe.model.method, recipe.data.dataset),
            "macs": c["macs"], "gmacs": c["macs"] / 1e9, "trainable": c["params_trainable"], "total": c["params_total"],
        })
    for line in missing:
        console.print(f"[yellow]skipped[/] {escape(line)}", soft_wrap=True)
    if not rows:
        raise typer.BadParameter(f"none of the runs has eval/{split}/metrics.json; evaluate them first with "
                                 f"`ufgir eval RUN --split {split}`", param_hint="RUNS")
    t = Table(title=f"comparison · {split} (paper: ViT-B/16 at {PAPER_IMAGE_SIZE} px)", title_justify="left")
    for col in ("run", "method", "dataset", "px", "top-1 %", "paper %", "GMACs", "trainable"):
        t.add_column(col, justify="left" if col in ("run", "method", "dataset") else "right", overflow="fold")
    for r in rows:
        t.add_row(r["label"], r["method"], r["dataset"], str(r["image_size"]), f"{r['top1']:.2f}",
                  _fmt(r["paper_top1_448px"], ".2f"), f"{r['gmacs']:.2f}", f"{r['trainable']:,}")
    console.print(t)
    out = out or run_dir_of(runs[0]).parent / f"compare_{split}.png"
    points = [{"label": f"{r['label']} ({r['method']})", "gmacs": r["gmacs"], "top1": r["top1"],
               "trainable": r["trainable"]} for r in rows]
    save_accuracy_vs_macs(points, out, f"top-1 on {split} vs cost (marker area: trainable parameters)")
    atomic_write_json(out.with_suffix(".json"), {"split": split, "runs": rows, "skipped": missing})
    console.print(f"figure: {out}\ntable: {out.with_suffix('.json')}", soft_wrap=True, markup=False)
