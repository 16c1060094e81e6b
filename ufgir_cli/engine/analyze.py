"""What `ufgir metrics`, `ufgir visualize` and `ufgir compare` write, as library calls.

Each function computes (``analysis``), draws (``viz``) and writes the files of one command, and returns
what it wrote; the commands only parse options, call one of these and print. From Python (a notebook)
the same call writes the same files::

    from ufgir_cli.engine.analyze import write_metrics, write_rollout
    report = write_metrics("runs/demo_quickstart")
    drawn = write_rollout("runs/demo_quickstart")     # drawn.grid, drawn.files, drawn.notes

It sits in ``engine`` because it joins two siblings below it (``analysis`` for the numbers, ``viz`` for
the figures), which may not import each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..analysis import compare as ac
from ..analysis import report as ar
from ..analysis import tokens as at
from ..io import atomic_write_json, read_json_object
from ..paths import RunDir, runs_dir
from ..viz import figures as vf
from ..viz.compare import draw_compare
from ..viz.style import save


@dataclass
class MetricsReport:
    """What `write_metrics` wrote: ``metrics.json`` (its content is ``doc``), the figures by name, and
    per analysed run its results and label (the run, then ``vs``)."""

    json_path: Path
    doc: dict
    figures: dict[str, Path]
    results: list[dict]
    labels: list[str]


def write_metrics(run: str | Path, *, split: str = "test", batches: int | None = None, batch_size: int | None = None,
                  cka: bool = True, features: bool = True, cost: bool = True, vs: str | Path | None = None,
                  checkpoint: str = "auto", device: str = "auto", dpi: int = 200, formats: Sequence[str] = (),
                  progress=None) -> MetricsReport:
    """Attention CKA, feature statistics and cost of ``run`` on ``split`` (and of ``vs`` on the same
    images): ``<run>/analysis/metrics.json`` and the CKA and feature figures."""
    run = Path(run)
    kw = dict(checkpoint=checkpoint, device=device, split=split, batches=batches, batch_size=batch_size,
              cka=cka, features=features, cost=cost)
    res, recipe = ar.measure(run, progress=progress, **kw)
    results, recipes, labels = [res], [recipe], [ar.run_label(run, recipe)]
    if vs is not None:
        other, other_recipe = ar.measure(Path(vs), data_recipe=recipe, progress=progress, **kw)
        results.append(other)
        recipes.append(other_recipe)
        labels.append(ar.run_label(Path(vs), other_recipe))
    out = RunDir.of(run).analysis_dir
    suffix = f"_vs_{RunDir.of(vs).name}" if vs is not None else ""
    names = [ar.method_title(r.model.method) for r in recipes]
    if len(set(names)) < len(names):  # two runs of one method: only their folders tell them apart
        names = labels
    seen = f"{ar.dataset_title(recipe.data.dataset)} · {split}"
    groups = [r["encoder_groups"] for r in results]
    figures: dict[str, Path] = {}
    if cka:
        fig = vf.draw_cka([r["attention_cka"]["matrix"] for r in results], names, groups=groups,
                          title=f"Attention CKA between blocks · {seen}")
        figures["cka"] = save(fig, out / f"cka{suffix}.png", dpi, formats)
    if features:
        fig = vf.draw_features([r["features"] for r in results], names, groups=groups,
                               title=f"Features per block · {seen}")
        figures["features"] = save(fig, out / f"features{suffix}.png", dpi, formats)
    doc = {**res, "figures": {k: p.name for k, p in figures.items()}}
    if vs is not None:
        doc["vs"] = results[1]
    doc = merge_metrics(read_json_object(out / "metrics.json"), doc)
    atomic_write_json(out / "metrics.json", doc)
    return MetricsReport(out / "metrics.json", doc, figures, results, labels)


#: What `ufgir metrics` measures on images of one split, and what it measures of the model alone.
_ON_IMAGES = ("attention_cka", "features")
_OF_MODEL = ("cost",)


def merge_metrics(old: dict, new: dict) -> dict:
    """``new`` with the blocks it did not compute kept from ``old`` (the earlier metrics.json), so that
    `metrics --no-cost` after `metrics` keeps the cost. Only a block of the same run and checkpoint
    carries over, and an image block only when it is of the same split as this call's (or this call
    measured no images); a comparison (``vs``) merges likewise, and an earlier one stays when none is asked."""
    if not old or (old.get("run"), old.get("checkpoint")) != (new.get("run"), new.get("checkpoint")):
        return new
    out = dict(new)
    for key in _OF_MODEL:
        if key not in out and key in old:
            out[key] = old[key]
    if not any(k in new for k in _ON_IMAGES):  # no images measured now: the earlier image blocks stand as they were
        out.update({k: old[k] for k in ("split", "batch_size", "dataset", *_ON_IMAGES) if k in old})
    elif old.get("split") == new.get("split"):
        out.update({k: old[k] for k in _ON_IMAGES if k in old and k not in new})
    out["figures"] = {**(old.get("figures") or {}), **(new.get("figures") or {})}
    if isinstance(old.get("vs"), dict):
        out["vs"] = merge_metrics(old["vs"], new["vs"]) if isinstance(new.get("vs"), dict) else old["vs"]
    return out


def visualize_folder(run: str | Path, kind: str, split: str, images: Sequence[Path] | None) -> Path:
    """Where a `visualize` figure of ``kind`` goes: ``<run>/analysis/visualize/<kind>_<split or images>/``."""
    return RunDir.of(run).analysis("visualize", f"{kind}_{'images' if images else split}")


@dataclass
class Drawn:
    """What a `visualize` writer wrote: the grid's PNG, every file written (the grid's in each format
    first), and what a reader of the figure should know that it does not say (classes left out)."""

    grid: Path
    files: list[Path]
    notes: list[str] = field(default_factory=list)


def _class_note(classes: tuple[int, int] | None, per_class: int) -> list[str]:
    """A note when the figure shows some of the split's classes, not all."""
    if classes is None or classes[0] >= classes[1]:
        return []
    shown, total = classes
    return [f"{shown} of {total} classes shown ({per_class} image{'s' if per_class != 1 else ''} each, spread over "
            f"the class ids); --batch-size {total * per_class} shows every class"]


def _write_maps(run: str | Path, kind: str, what: str, make_maps: Callable, *, split: str = "test",
                images: Sequence[Path] | None = None, per_class: int = 1, count: int = 8, cols: int | None = None,
                checkpoint: str = "auto", device: str = "auto", dpi: int = 200, formats: Sequence[str] = (),
                cmap: str = vf.CMAP) -> Drawn:
    """Maps over the images into `visualize_folder` (a grid and one figure per image)."""
    shown = ar.visualize(Path(run), make_maps, split=split, images=images, count=count, per_class=per_class,
                         checkpoint=checkpoint, device=device)
    if len(shown.maps) == 1:  # one map per image: its blocks go in the title rather than over every panel
        what = f"{what}, {shown.maps[0][0]}"
    files = vf.save_overlay_folder(shown.images, shown.maps, shown.captions, shown.stems,
                                   visualize_folder(run, kind, split, images), title=f"{what} · {shown.title}",
                                   cols=cols, dpi=dpi, formats=formats, cmap=cmap)
    return Drawn(files[0], files, _class_note(shown.classes, per_class))


def write_rollout(run: str | Path, *, group: str | None = None, across: bool = False, fusion: str = "mean",
                  discard: float = 0.0, **shown) -> Drawn:
    """Attention rollout per encoder group (or ``across`` the whole network). ``shown``: the image and
    figure options of `_write_maps`."""
    kind = f"rollout_{'across' if across else (group or 'groups')}_{fusion}" + (f"_discard{discard:g}" if discard else "")
    what = "Attention rollout" + (" across down-sampling ILAs" if across else "") + \
        (f", {fusion} of heads" if fusion != "mean" else "")
    return _write_maps(run, kind, what, partial(ar.rollout_maps, group=group, across=across, fusion=fusion,
                                                discard=discard), **shown)


def write_attention(run: str | Path, *, layer: int | None = None, fusion: str = "mean", **shown) -> Drawn:
    """The head-fused CLS attention of one block (default: the last)."""
    kind = f"attention_{'last' if layer is None else f'l{layer}'}_{fusion}"
    what = "CLS attention" + (f", {fusion} of heads" if fusion != "mean" else "")
    return _write_maps(run, kind, what, partial(ar.block_attention, layer=layer, fusion=fusion), **shown)


def write_crops(run: str | Path, **shown) -> Drawn:
    """What the method selects or crops (`Method.select`) over the images, as one grid. ``shown``: the
    image and figure options of `_write_selection`."""
    return _write_selection(run, "crops", ar.selections, **shown)


def write_tokens(run: str | Path, **shown) -> Drawn:
    """Which patches survive each token reduction (`analysis.tokens`) over the images, as one grid."""
    return _write_selection(run, "tokens", at.token_selections, **shown)


def _write_selection(run: str | Path, kind: str, select: Callable, *, split: str = "test",
                     images: Sequence[Path] | None = None, per_class: int = 1, count: int = 8, cols: int | None = None,
                     checkpoint: str = "auto", device: str = "auto", dpi: int = 200,
                     formats: Sequence[str] = ()) -> Drawn:
    """Panels per image, made by ``select`` (`analysis.report.selections` or `analysis.tokens.token_selections`),
    as one grid in the run's ``visualize/<kind>`` folder."""
    sel = select(Path(run), split=split, images=images, count=count, per_class=per_class, checkpoint=checkpoint,
                 device=device)
    fig = vf.draw_selection(sel.panels, sel.captions, title=f"{sel.what} · {sel.title}", cols=cols)
    grid = save(fig, visualize_folder(run, kind, split, images) / "grid.png", dpi, formats)
    return Drawn(grid, [grid.with_suffix(f".{f}") for f in dict.fromkeys(("png", *formats))],
                 _class_note(sel.classes, per_class))


@dataclass
class Comparison:
    """What `write_comparison` found and wrote: the runs' rows, the points drawn (runs that differ only
    in their seed as one, mean ± std), the paper's points drawn beside them, the runs left out (and why),
    and the figure and its JSON table (None when nothing was compared)."""

    rows: list[dict]
    points: list[dict] = field(default_factory=list)
    paper: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    figure: Path | None = None
    table: Path | None = None


def write_comparison(runs: Sequence[str | Path], *, split: str = "test", out: Path | None = None, paper: bool = False,
                     dpi: int = 200, formats: Sequence[str] = ()) -> Comparison:
    """Top-1 on ``split`` against multiply-adds and trainable parameters of evaluated runs (run folders,
    checkpoints, sweep or reproduction folders; seeds of one setting as one point with a ± std error
    bar), with the paper's Table 1 numbers when ``paper``: the figure at ``out`` (default
    ``runs/compare_<split>.png``) and its ``.json`` table beside it."""
    rows, missing = ac.compare_rows([Path(r) for r in runs], split)
    if not rows:
        return Comparison(rows, missing=missing)
    out = Path(out or runs_dir() / f"compare_{split}").with_suffix(".png")
    cited = ac.paper_points([r["dataset"] for r in rows]) if paper else []
    datasets = list(dict.fromkeys(r["dataset_title"] for r in rows + cited))
    points = ac.compare_points(rows, with_dataset=len(datasets) > 1)
    first_cite = cited[0]["cite"] if cited else None
    for c in cited:  # a point from another source than the ILA paper's names it
        c["label"] = (c["method_title"] if len(datasets) == 1 else f"{c['method_title']} · {c['dataset_title']}") + \
            (f" [{c['cite']}]" if c["cite"] != first_cite else "")

    def point(r: dict, from_paper: bool) -> dict:
        return {"label": r["label"], "gmacs": r["gmacs"], "top1": r["top1"], "trainable": r["trainable"],
                "family": r["family"], "paper": from_paper, "std": r.get("std"), "backbone": r.get("backbone"),
                "cite": r.get("cite")}

    seen = f"{datasets[0]} · " if len(datasets) == 1 else ""
    fig = draw_compare([point(r, False) for r in points] + [point(r, True) for r in cited],
                          title=f"Top-1 against cost · {seen}{split}")
    figure = save(fig, out, dpi, formats)
    atomic_write_json(out.with_suffix(".json"), {"split": split, "points": points, "runs": rows, "paper": cited,
                                                 "skipped": missing})
    return Comparison(rows, points, cited, missing, figure, out.with_suffix(".json"))


__all__ = ["Comparison", "Drawn", "MetricsReport", "visualize_folder", "write_attention", "write_comparison", "write_crops",
           "write_metrics", "write_rollout", "write_tokens"]
