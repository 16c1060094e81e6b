"""`ufgir compare` as library calls: runs (or sweep and reproduction folders) as rows, runs that differ
only in their seed as one point with its spread, and the paper's Table 1 cells as points at the cost we
count for them. Nothing here draws or writes (``engine/analyze.py`` and ``viz`` do).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..data.catalog import CATALOG
from ..methods import all_methods
from ..paths import RunDir
from ..recipe import Recipe, load_recipe
from ..recipe_docs import recipe_keys
from ..recipe_sections import MACHINE_KEYS
from .paper import PAPER_IMAGE_SIZE, PAPER_ROWS, PAPER_TOP1, paper_top1
from .report import dataset_title, method_family, method_title, saved_recipe, static_cost

#: Recipe keys that do not change what a run measures (prose, the machine, logging) or that are what a
#: point's runs differ in (the seed): left out when `compare` groups runs into points.
NOT_COMPARED = frozenset({"description", "sweep", "logging", "data.root", *MACHINE_KEYS, "train.seed",
                          "train.checkpoint_every", "eval.every", "eval.batch_size"})


def recipe_settings(recipe: Recipe) -> dict:
    """What a run was, for comparing: every recipe key away from its default (dotted, values as JSON
    writes them), less `NOT_COMPARED`."""
    defaults = {k.key: k.default for k in recipe_keys()}
    out = {}
    for section, values in recipe.model_dump(mode="json").items():
        for key, v in (values.items() if isinstance(values, dict) else [(None, values)]):
            dotted = section if key is None else f"{section}.{key}"
            if dotted in NOT_COMPARED or section in NOT_COMPARED:
                continue
            default = defaults.get(dotted)
            if v != (list(default) if isinstance(default, tuple) else default):
                out[dotted] = v
    return out


def paper_row_of(recipe: Recipe) -> str:
    """The paper row a run measures: of the packaged recipes with a paper row and the run's method, the one whose
    model section differs from the run's in the fewest keys (``clca_keep07`` for a CLCA run at keep 0.7), the
    method's own on a tie."""
    method = recipe.model.method
    own = all_methods()[method].recipe_name if method in all_methods() else method
    run = recipe.model.model_dump(mode="json")

    def distance(name: str) -> tuple[int, bool]:
        model = load_recipe(name, env=False).model.model_dump(mode="json")
        return sum(model.get(k) != v for k, v in run.items() if k not in ("num_classes", "image_size")), name != own

    same = [r for r in PAPER_ROWS if r == own or load_recipe(r, env=False).model.method == method]
    return min(same, key=distance, default=own)


def compare_inputs(paths: Sequence[Path], split: str) -> tuple[list[Path], list[str]]:
    """The runs behind `compare`'s arguments: run folders and checkpoints as given; a sweep folder
    (``plan.json``) gives its run folders, a reproduction folder (``grid.json``) every sweep's, each with
    ``eval/<split>/metrics.json`` (a line per folder says how many of its runs have none yet)."""
    runs, notes = [], []
    for path in paths:
        if (path / "grid.json").is_file():
            sweeps = sorted(p.parent for p in path.glob("sweeps/*/plan.json"))
        elif (path / "plan.json").is_file():
            sweeps = [path]
        else:
            runs.append(path)
            continue
        found = [r for sw in sweeps for r in sorted((sw / "runs").glob("*/")) if RunDir(r).is_run()]
        done = [r for r in found if RunDir(r).eval_metrics(split).is_file()]
        runs += done
        if len(done) < len(found):
            notes.append(f"{path}: {len(found) - len(done)} of its {len(found)} runs have no eval/{split}/metrics.json "
                         f"(a sweep's phase-1 runs are evaluated on val: --split val compares those)")
    return runs, notes


def compare_rows(runs: Sequence[Path], split: str = "test") -> tuple[list[dict], list[str]]:
    """One row per evaluated run (top-1 on ``split``, the paper's number, cost, its seed and settings) and
    a line per argument left out. Sweep and reproduction folders stand for their runs (`compare_inputs`).

    ``compare runs/*`` also matches what is not a run (compare's own figure and table, a stray file):
    such arguments are left out with a note rather than failing the comparison.
    """
    runs, missing = compare_inputs(list(runs), split)
    rows = []
    for run in runs:
        if not run.exists():
            missing.append(f"{run}: does not exist")
            continue
        run_dir = RunDir.of(run)
        if not (run.suffix in (".pt", ".pth") if run.is_file() else RunDir(run).is_run()):
            missing.append(f"{run}: not a run folder, checkpoint, sweep or reproduction folder")
            continue
        result = run_dir.eval_metrics(split)
        if not result.is_file():
            missing.append(f"{run}: not evaluated on {split} yet; `ufgir eval {run} --split {split}` writes "
                           f"{result.relative_to(run_dir.root)}")
            continue
        m = json.loads(result.read_text(encoding="utf-8"))
        recipe = saved_recipe(run)
        c = static_cost(recipe, m["num_classes"])
        rows.append({
            "run": str(run_dir.root), "label": run_dir.name, "method": recipe.model.method, "dataset": recipe.data.dataset,
            "backbone": recipe.model.backbone,
            "method_title": method_title(recipe.model.method), "family": method_family(recipe.model.method),
            "dataset_title": dataset_title(recipe.data.dataset),
            "image_size": recipe.model.image_size, "checkpoint": m.get("checkpoint"), "top1": m["top1"],
            "paper_top1_448px": paper_top1(paper_row_of(recipe), recipe.data.dataset),
            "macs": c["macs"], "gmacs": c["macs"] / 1e9, "trainable": c["params_trainable"], "total": c["params_total"],
            "seed": recipe.train.seed, "settings": recipe_settings(recipe),
        })
    return rows, missing


def _setting_text(key: str, value) -> str:
    """One setting as a label says it: "448 px", "lr 0.03", "backbone vit_small_patch16_224"."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "image_size":
        return f"{value} px"
    shown = f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list | dict) else str(value)
    return f"{leaf} {shown}"


def compare_points(rows: Sequence[dict], with_dataset: bool) -> list[dict]:
    """Runs that differ only in their seed, as one point: top-1 mean and sample std (None below two
    runs), ``n``, seeds and runs. Each point's label is the method (and the dataset, ``with_dataset``);
    points that would share a label add the settings they differ in (at most two, e.g. "lr 0.03"), else
    their first run's folder name."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r)
    points = []
    for members in groups.values():
        first, values = members[0], [r["top1"] for r in members]
        base = first["method_title"] + (f" · {first['dataset_title']}" if with_dataset else "")
        points.append({**{k: first[k] for k in ("method", "dataset", "backbone", "method_title", "dataset_title", "family",
                                                 "image_size", "paper_top1_448px", "macs", "gmacs", "trainable",
                                                 "total", "settings")},
                       "label": base, "top1": statistics.fmean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values),
                       "seeds": [r["seed"] for r in members], "runs": [r["run"] for r in members]})
    by_label: dict[str, list[dict]] = {}
    for pt in points:
        by_label.setdefault(pt["label"], []).append(pt)
    defaults = {k.key: k.default for k in recipe_keys()}
    first_keys = ("model.image_size", "optim.lr", "model.backbone", "model.weights")
    for same in (v for v in by_label.values() if len(v) > 1):
        keys = sorted({k for pt in same for k in pt["settings"] if len({json.dumps(q["settings"].get(k)) for q in same}) > 1},
                      key=lambda k: (first_keys.index(k) if k in first_keys else len(first_keys), k))
        for pt in same:
            told = ", ".join(_setting_text(k, pt["settings"].get(k, defaults.get(k))) for k in keys[:2])
            pt["label"] += f" ({told})"
        labels = [pt["label"] for pt in same]
        for pt in same:  # still alike (they differ in a third setting): their folders tell them apart
            if labels.count(pt["label"]) > 1:
                pt["label"] += f" [{Path(pt['runs'][0]).name}]"
    return points


def paper_points(datasets: Sequence[str]) -> list[dict]:
    """The papers' cells for these datasets as compare points (the ILA paper's Table 1, CLCA's Table I): the
    top-1 at the cost that we count for the row's packaged recipe at the paper's image size (448 px) and the
    dataset's classes, with its ``source`` and short ``cite``; ``backbone`` None where the source does not say it."""
    points = []
    for dataset in dict.fromkeys(datasets):
        spec = CATALOG.get(dataset)
        for (name, ds), top1 in PAPER_TOP1.items():
            if ds != dataset or spec is None:
                continue
            recipe = load_recipe(name, {"model": {"image_size": PAPER_IMAGE_SIZE}, "data": {"dataset": dataset}})
            method = recipe.model.method
            c = static_cost(recipe, spec.num_classes)
            # a row that trains every weight is named as the paper stars it ("SIMT* (full fine-tuning)")
            starred = recipe.model.train_backbone or "all" in all_methods()[method].trains
            title = PAPER_ROWS[name].title if name != method or starred else method_title(method)
            row = PAPER_ROWS[name]
            points.append({"method": name, "dataset": dataset, "method_title": title,
                           "backbone": recipe.model.backbone if row.backbone_stated else None,
                           "dataset_title": dataset_title(dataset), "family": method_family(method), "top1": top1,
                           "gmacs": c["macs"] / 1e9, "trainable": c["params_trainable"], "image_size": PAPER_IMAGE_SIZE,
                           "source": row.source, "cite": row.cite})
    return points
