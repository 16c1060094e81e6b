"""What ``ufgir reproduce`` runs: one ``ufgir sweep`` per (row, task), the paper's protocol in each.

A row is a method (its packaged recipe) or a packaged recipe by name (``transfg_ft``: TransFG with
every weight trained). A task is a dataset as the sweep trains it. SoyAgeing is the pooled set *and*
each of its rounds (``soyageing_r1``, ...): Table 1 shows both. ``grid.json`` records the arguments,
the per-row ``--set ROW:key=value`` included, so ``ufgir reproduce status NAME`` and a requeued job
rebuild the same sweeps, and the sweep folders under ``sweeps/`` keep their runs between commands (a
finished run is never trained again). Every (row, task) model is built on the meta device before
the first run (`check_grid`), so a layout that cannot work stops the command at once.

With ``--backbones``, every row runs on each backbone (``model.backbone`` set per sweep, above the
plain ``--set`` and below the row's own ``--set ROW:key=value``): a cell's row is then the method and
the backbone (`row_key`, ``ila_pp+vit_base_patch16_dinov3.lvd1689m``), which names its sweeps; without
it, rows, sweep names and run keys are what they always were.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..analysis.paper import PAPER_ROWS
from ..data.catalog import CATALOG, catalog_name, get_spec
from ..data.folder import dataset_counts
from ..errors import DatasetError, RecipeError
from ..io import atomic_write_json
from ..methods import TABLE, method_spec
from ..paths import RunDir, RunStatus
from ..recipe import packaged_recipe_names
from ..sweep import DEFAULT_SEEDS, Sweep, check_models, make_sweep
from ..sweep.plan import PHASE_SPLITS

TABLE1_DATASETS = ("cotton80", "soyageing", "soygene", "soyglobal", "soylocal")
#: The default rows: methods whose own recipe has a paper number (the ILA paper's Table 1: frozen backbone, and
#: SimTrans's SIMT*, fully fine-tuned; CLCA's Table I), then the paper rows of other recipes marked to run too
#: (``clca_keep07``).
PAPER_METHODS = tuple(m.name for m in TABLE if m.recipe_name in PAPER_ROWS) + \
    tuple(r.recipe for r in PAPER_ROWS.values() if r.extra_row)
TRAIN_FRAC = 0.8  # the share of each class's train_val images in the train split (data/folder.py)


def rounds_of(dataset: str) -> tuple[str, ...]:
    """The per-round datasets of a pooled one (SoyAgeing), else none."""
    spec = CATALOG.get(dataset)
    if spec is None or len(spec.rounds) < 2:
        return ()
    return tuple(f"{dataset}_r{r}" for r in spec.rounds if f"{dataset}_r{r}" in CATALOG)


def row_recipe(row: str) -> str:
    """The packaged recipe a row trains: a recipe's name as it is, a method's name its own recipe."""
    if row in packaged_recipe_names():
        return row
    try:
        return method_spec(row).recipe_name
    except ValueError as e:
        raise RecipeError(f"--methods: {row!r} is neither a packaged recipe ({', '.join(packaged_recipe_names())}) "
                          f"nor a method: {e}") from None


#: Between a row and its backbone in a cell's row key and sweep names (no method, recipe or timm name has it).
BACKBONE_SEP = "+"


def row_key(row: str, backbone: str | None) -> str:
    """A cell's row: the method (or recipe) row, and the backbone when the grid has a backbone axis."""
    return row if backbone is None else f"{row}{BACKBONE_SEP}{backbone}"


def split_row(key: str) -> tuple[str, str | None]:
    """`row_key`'s inverse: (method or recipe row, backbone or None)."""
    row, sep, backbone = key.partition(BACKBONE_SEP)
    return row, (backbone if sep else None)


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, section by section (nested dicts merged)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class Grid:
    """One reproduction as asked for; ``root`` is ``reproduce/<name>``."""

    name: str
    root: Path
    methods: tuple[str, ...]  # the rows: method or packaged recipe names
    datasets: tuple[str, ...]  # Table 1's columns, as given
    image_size: int
    seeds: tuple[int, ...]
    lrs: tuple[float, ...] | None  # None: each recipe's own sweep.lrs, else the paper's
    overrides: dict  # --set, applied to every sweep
    row_overrides: dict = field(default_factory=dict)  # --set ROW:key=value, over --set for that row
    backbones: tuple[str, ...] = ()  # --backbones: every row on each; empty: model.backbone as the recipes say

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every dataset a sweep trains on: the columns, each pooled set followed by its rounds."""
        return tuple(t for d in self.datasets for t in (d, *rounds_of(d)))

    @property
    def rows(self) -> tuple[str, ...]:
        """The table's rows (`row_key`): each method, on each backbone of the axis, methods outermost."""
        return tuple(row_key(m, b) for m in self.methods for b in (self.backbones or (None,)))

    def sweep(self, row: str, task: str) -> Sweep:
        """The sweep of a cell: --set, then the row's backbone, then --set ROW:key=value, then the task."""
        method, backbone = split_row(row)
        over = merged(self.overrides, {"model": {"backbone": backbone}} if backbone else {})
        over = merged(over, self.row_overrides.get(method) or {})
        over = merged(over, {"data": {"dataset": task}, "model": {"image_size": self.image_size}})
        return make_sweep(row_recipe(method), over, lrs=self.lrs, seeds=self.seeds, name=f"{row}_{task}",
                          out=self.root / "sweeps")

    def sweeps(self) -> list[tuple[str, str, Sweep]]:
        """(row, task, sweep) for every cell of the grid, rows outermost."""
        return [(r, t, self.sweep(r, t)) for r in self.rows for t in self.tasks]


def check_grid(grid: Grid) -> int:
    """Build every (row, task) model on the meta device: a layout that cannot work is refused in one
    line naming the row, the task and the recipe, before anything is written or trained."""
    return check_models((f"{row} on {task} (recipe {sweep.recipe})", sweep_recipe(sweep))
                        for row, task, sweep in grid.sweeps())


def _dataset_name(name: str) -> str:
    """A catalog dataset in any case, or one of the user's own (`ufgir datasets add`); else --datasets' error."""
    try:
        return catalog_name(name) or get_spec(name).name
    except DatasetError as e:
        raise RecipeError(f"--datasets: {e}") from None


def make_grid(methods=None, datasets=TABLE1_DATASETS, *, image_size: int = 448, seeds=DEFAULT_SEEDS,
              lrs=None, overrides: dict | None = None, row_overrides: dict | None = None, name: str | None = None,
              out: str | Path = "reproduce", backbones=()) -> Grid:
    """Check what is asked (known rows, known datasets, every sweep's recipe loads) before anything
    is written."""
    backbones = tuple(backbones or ())
    methods = tuple(methods or PAPER_METHODS)
    for m in methods:
        row_recipe(m)
    datasets = tuple(_dataset_name(d) for d in datasets)
    if not datasets or len(set(datasets)) != len(datasets):
        raise RecipeError(f"--datasets {','.join(datasets)}: give distinct names from `ufgir datasets`")
    if len(set(methods)) != len(methods) or not methods:
        raise RecipeError(f"--methods {','.join(methods)}: give distinct method names")
    overrides, row_overrides = overrides or {}, row_overrides or {}
    check_backbones(backbones)
    per_sweep = (("data", "dataset", "--datasets"), ("model", "image_size", "--image-size"))
    for row, over in [("", overrides), *row_overrides.items()]:
        for section, key, flag in (*per_sweep, *((("model", "backbone", "--backbones"),) if backbones else ())):
            if key in (over.get(section) or {}):
                raise RecipeError(f"--set {row + ':' if row else ''}{section}.{key}: reproduce sets it per sweep "
                                  f"(use {flag})")
    unknown_rows = [r for r in row_overrides if r not in methods]
    if unknown_rows:
        raise RecipeError(f"--set {unknown_rows[0]}:...: {unknown_rows[0]!r} is not one of --methods "
                          f"({', '.join(methods)})")
    hashed = merged(overrides, {f"{r}:": o for r, o in row_overrides.items()})
    name = name or default_grid_name(image_size, merged(hashed, {"--backbones": list(backbones)} if backbones else {}))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
        raise RecipeError(f"--name {name!r}: use letters, digits and . _ = + - (it names a folder)")
    grid = Grid(name, Path(out) / name, methods, datasets, int(image_size), tuple(int(s) for s in seeds),
                None if lrs is None else tuple(float(x) for x in lrs), overrides, row_overrides, backbones)
    grid.sweeps()  # every sweep's recipe loads and its overrides are allowed
    return grid


def check_backbones(backbones: tuple[str, ...]) -> None:
    """--backbones: distinct names, none with `BACKBONE_SEP` (it would split the row key)."""
    if len(set(backbones)) != len(backbones) or any(not b or BACKBONE_SEP in b for b in backbones):
        raise RecipeError(f"--backbones {','.join(backbones)}: give distinct timm names, e.g. "
                          "vit_base_patch16_224.orig_in21k,vit_base_patch16_dinov3.lvd1689m")


def default_grid_name(image_size: int, overrides: dict) -> str:
    """``table1_<size>`` and, with --set, a short hash of it: the same command continues its grid."""
    name = f"table1_{image_size}"
    if overrides:
        name += "_" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    return name


def write_grid(grid: Grid) -> None:
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(grid).items() if k != "root"}
    atomic_write_json(grid.root / "grid.json", record)


def load_grid(name: str, out: str | Path = "reproduce") -> Grid:
    """The grid a former ``ufgir reproduce --name NAME`` wrote (its ``grid.json``)."""
    path = Path(out) / name / "grid.json"
    if not path.is_file():
        known = sorted(p.parent.name for p in Path(out).glob("*/grid.json"))
        raise RecipeError(f"no reproduction {name!r} under {out}/ (known: {', '.join(known) or 'none'})")
    g = json.loads(path.read_text(encoding="utf-8"))
    return Grid(g["name"], Path(out) / name, tuple(g["methods"]), tuple(g["datasets"]), g["image_size"],
                tuple(g["seeds"]), None if g["lrs"] is None else tuple(g["lrs"]), g["overrides"],
                g.get("row_overrides") or {}, tuple(g.get("backbones") or ()))


# ---- the plan ---------------------------------------------------------------------------------


def images_per_epoch(task: str, phase: int, root: str | None = None) -> int | None:
    """Training images of a sweep phase (None where nothing counts the dataset): phase 1 trains on
    train, ``floor(0.8 n)`` of each class's n train_val images; phase 2 on train_val. The counts are
    the catalog's, else the dataset's on disk, else the generator's (`dataset_counts`)."""
    c = dataset_counts(task, root)
    if not c.train_val or not c.num_classes:
        return None
    if PHASE_SPLITS[phase][0] == "train_val":
        return c.train_val
    return c.num_classes * math.floor(TRAIN_FRAC * (c.train_val // c.num_classes))


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step of one row, and how they were found."""

    seconds: float | None
    how: str  # "given", "measured" (a bench row of this method), "estimated" (scaled from another) or "unknown"
    note: str = ""


def plan_rows(grid: Grid, step_times: dict[str, StepTime]) -> list[dict]:
    """One row per sweep: runs, epochs, optimizer steps and hours at ``step_times[row]``."""
    rows = []
    for row, task, sweep in grid.sweeps():
        recipe = sweep_recipe(sweep)
        per_step = recipe.train.batch_size * recipe.train.grad_accum
        steps = 0
        for phase, n_runs in ((1, len(sweep.lrs)), (2, len(sweep.seeds))):
            n = images_per_epoch(task, phase, recipe.data.root)
            steps = None if n is None or steps is None else steps + n_runs * recipe.train.epochs * math.ceil(n / per_step)
        t = step_times.get(row) or StepTime(None, "unknown")
        rows.append({"method": row, "backbone": recipe.model.backbone, "task": task, "runs": len(sweep.lrs) + len(sweep.seeds), "lrs": list(sweep.lrs),
                     "epochs": recipe.train.epochs, "batch_size": per_step, "steps": steps, "step_s": t.seconds,
                     "step_how": t.how, "hours": steps * t.seconds / 3600 if steps is not None and t.seconds is not None
                     else None})
    return rows


def sweep_recipe(sweep: Sweep):
    from ..recipe import load_recipe

    return load_recipe(sweep.recipe, sweep.overrides)


def _bench_rows(bench: Path, image_size: int) -> tuple[dict, list[dict]]:
    if not bench.is_file():
        return {}, []
    data = json.loads(bench.read_text(encoding="utf-8"))
    rows = [r for r in data.get("rows", []) if r.get("mode") == "train" and r.get("size") == image_size
            and not r.get("compile") and not r.get("grad_checkpointing")]
    return data, rows


def _bench_hit(rows: list[dict], name: str, precision: str, backbone: str | None = None) -> dict | None:
    """The bench row of ``name`` at ``precision``; ``auto`` takes bf16 where the file has it (what auto
    picks on bf16-capable hardware), else fp32. With ``backbone``, a row that names another is no hit."""
    for prec in (("bf16", "fp32") if precision == "auto" else (precision,)):
        hit = [r for r in rows if r["method"] == name and r.get("precision") == prec
               and (backbone is None or r.get("backbone", backbone) == backbone)]
        if hit:
            return hit[0]
    return None


def bench_step_seconds(bench: Path, method: str, image_size: int, batch_size: int, precision: str) -> float | None:
    """Seconds per training step of ``method`` measured in a ``make bench`` result file at this image
    size and precision, scaled from its batch to ``batch_size``; None when the file has no such row."""
    _, rows = _bench_rows(bench, image_size)
    hit = _bench_hit(rows, method, precision)
    return hit["s_per_batch"] * batch_size / hit["batch"] if hit else None


def step_time(grid: Grid, row: str, bench: Path) -> StepTime:
    """A row's step time from a ``make bench`` file: measured where the file has the row's method at the
    grid's image size (on the row's backbone, where the file names one), else estimated from the plain
    ViT's measured step (``timm``), scaled by the method's training cost per image on its backbone (its
    passes and GMACs, counted on the meta device) over the plain ViT's on the bench's backbone. The
    note says which file and machine measured it."""
    from ..analysis.report import static_cost

    recipe = sweep_recipe(grid.sweep(row, grid.tasks[0]))
    batch, precision = recipe.train.batch_size * recipe.train.grad_accum, recipe.train.precision
    data, rows = _bench_rows(bench, grid.image_size)
    where = f"{bench} ({data.get('machine', 'machine not recorded')}, {data.get('date', 'undated')})"
    hit = _bench_hit(rows, recipe.model.method, precision, recipe.model.backbone)
    if hit is not None:
        return StepTime(hit["s_per_batch"] * batch / hit["batch"], "measured", where)
    base = _bench_hit(rows, "timm", precision)
    if base is None:
        return StepTime(None, "unknown", f"{bench} has no {grid.image_size} px training row" if rows or data
                        else f"no bench file {bench}")
    classes = dataset_counts(grid.tasks[0], recipe.data.root).num_classes or 2
    plain = recipe.model_copy(update={"model": recipe.model.model_copy(update={
        "method": "linear", "ila_locs": (), "ila_ds_locs": (), "depth": None, "train_backbone": False,
        "backbone": base.get("backbone", recipe.model.backbone)})})
    ratio = static_cost(recipe, classes)["train_macs"] / static_cost(plain, classes)["train_macs"]
    return StepTime(base["s_per_batch"] * batch / base["batch"] * ratio, "estimated",
                    f"the plain ViT's step in {where} x {ratio:.2f} (passes and GMACs)")


def method_step_times(grid: Grid, step_seconds: float | None, bench: Path) -> dict[str, StepTime]:
    """Each row's step time: ``step_seconds`` for all when given, else `step_time` from the bench file."""
    return {r: StepTime(step_seconds, "given", "--step-seconds") if step_seconds is not None else step_time(grid, r, bench)
            for r in grid.rows}


# ---- status -----------------------------------------------------------------------------------


def read_failures(grid: Grid) -> dict[str, str]:
    """``failures.json``: the sweeps that stopped on an error in the last command, "row task" -> why."""
    return _read(grid.root / "failures.json") or {}


def write_failures(grid: Grid, failures: dict[str, str]) -> None:
    atomic_write_json(grid.root / "failures.json", failures)


def run_status(grid: Grid) -> list[dict]:
    """Every run of the grid as its own folder says (`RunDir.status`): done, running (its owner lives:
    the same host's pid, or another host's fresh heartbeat), resumable (stopped, or its owner died),
    failed (its error record; for a run that left none, its sweep's report or the error that stopped
    its sweep) or pending. ``status`` is the kind, ``detail`` the one line with step, owner and reason.
    Phase 2's runs are listed by seed until phase 1 has chosen their learning rate."""
    rows = []
    sweep_failed = read_failures(grid)
    for method, task, sweep in grid.sweeps():
        plan = _read(sweep.root / "plan.json") or {}
        report = _read(sweep.root / "sweep.json") or {}
        failed = {e["key"]: e.get("error") for p in ("phase1", "phase2") for e in report.get(p, [])
                  if e.get("status") == "failed"}
        entries = [(1, e) for e in (plan.get("phase1") or {}).get("runs", [])]
        entries += [(2, e) for e in (plan.get("phase2") or {}).get("runs", [])]
        known = {(p, e["seed"] if p == 2 else e["lr"]) for p, e in entries}
        entries += [(1, {"lr": lr, "seed": sweep.seeds[0]}) for lr in sweep.lrs if (1, lr) not in known]
        entries += [(2, {"lr": None, "seed": s}) for s in sweep.seeds if (2, s) not in known]
        for phase, e in entries:
            folder = RunDir(sweep.root / e["run"]) if "run" in e else None
            status = folder.status(PHASE_SPLITS[phase][1]) if folder is not None else RunStatus("pending")
            if status.kind == "pending" and e.get("key") in failed:
                status = RunStatus("failed", reason=failed[e["key"]] or "see the sweep's sweep.json")
            elif status.kind == "pending" and f"{method} {task}" in sweep_failed:
                status = RunStatus("failed", reason=f"its sweep stopped: {sweep_failed[f'{method} {task}']}")
            rows.append({"method": method, "task": task, "phase": phase, "lr": e["lr"], "seed": e["seed"],
                         "status": status.kind, "detail": str(status), "step": status.step, "owner": status.owner,
                         "reason": status.reason, "run": str(folder.root) if folder is not None else None})
    return rows


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
