"""What ``ufgir reproduce`` runs: one ``ufgir sweep`` per (method, task), the paper's protocol in each.

A task is a dataset as the sweep trains it. SoyAgeing is the pooled set *and* each of its rounds
(``soyageing_r1``, ...): Table 1 shows both. ``grid.json`` records the arguments, so ``ufgir
reproduce status NAME`` and a requeued job rebuild the same sweeps, and the sweep folders under
``sweeps/`` keep their runs between commands (a finished run is never trained again).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.paper import PAPER_TOP1
from ..data.catalog import CATALOG
from ..errors import RecipeError
from ..io import atomic_write_json
from ..methods import TABLE, method_spec
from ..paths import RunDir, RunStatus
from ..sweep import DEFAULT_SEEDS, PAPER_LRS, Sweep, make_sweep
from ..sweep.plan import PHASE_SPLITS

TABLE1_DATASETS = ("cotton80", "soyageing", "soygene", "soyglobal", "soylocal")
#: Methods with a number in the paper's Table 1: the default rows.
PAPER_METHODS = tuple(m.name for m in TABLE if any((m.name, d) in PAPER_TOP1 for d in TABLE1_DATASETS))
TRAIN_FRAC = 0.8  # the share of each class's train_val images in the train split (data/folder.py)


def rounds_of(dataset: str) -> tuple[str, ...]:
    """The per-round datasets of a pooled one (SoyAgeing), else none."""
    spec = CATALOG.get(dataset)
    if spec is None or len(spec.rounds) < 2:
        return ()
    return tuple(f"{dataset}_r{r}" for r in spec.rounds if f"{dataset}_r{r}" in CATALOG)


@dataclass(frozen=True)
class Grid:
    """One reproduction as asked for; ``root`` is ``reproduce/<name>``."""

    name: str
    root: Path
    methods: tuple[str, ...]
    datasets: tuple[str, ...]  # Table 1's columns, as given
    image_size: int
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    overrides: dict  # --set, applied to every sweep

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every dataset a sweep trains on: the columns, each pooled set followed by its rounds."""
        return tuple(t for d in self.datasets for t in (d, *rounds_of(d)))

    def sweep(self, method: str, task: str) -> Sweep:
        data = {**(self.overrides.get("data") or {}), "dataset": task}
        model = {**(self.overrides.get("model") or {}), "image_size": self.image_size}
        over = {**self.overrides, "data": data, "model": model}
        return make_sweep(method_spec(method).recipe_name, over, lrs=self.lrs, seeds=self.seeds,
                          name=f"{method}_{task}", out=self.root / "sweeps")

    def sweeps(self) -> list[tuple[str, str, Sweep]]:
        """(method, task, sweep) for every cell of the grid, methods outermost."""
        return [(m, t, self.sweep(m, t)) for m in self.methods for t in self.tasks]


def make_grid(methods=None, datasets=TABLE1_DATASETS, *, image_size: int = 448, seeds=DEFAULT_SEEDS,
              lrs=PAPER_LRS, overrides: dict | None = None, name: str | None = None,
              out: str | Path = "reproduce") -> Grid:
    """Check what is asked (known methods with a recipe, known datasets, every sweep's recipe loads)
    before anything is written."""
    methods = tuple(methods or PAPER_METHODS)
    for m in methods:
        try:
            method_spec(m)
        except ValueError as e:
            raise RecipeError(f"--methods: {e}") from None
    datasets = tuple(datasets)
    unknown = [d for d in datasets if d not in CATALOG]
    if unknown or not datasets or len(set(datasets)) != len(datasets):
        raise RecipeError(f"--datasets {','.join(datasets)}: give distinct names from `ufgir datasets`")
    if len(set(methods)) != len(methods) or not methods:
        raise RecipeError(f"--methods {','.join(methods)}: give distinct method names")
    overrides = overrides or {}
    for section, key in (("data", "dataset"), ("model", "image_size")):
        if key in (overrides.get(section) or {}):
            raise RecipeError(f"--set {section}.{key}: reproduce sets it per sweep (use --datasets / --image-size)")
    name = name or default_grid_name(image_size, overrides)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
        raise RecipeError(f"--name {name!r}: use letters, digits and . _ = + - (it names a folder)")
    grid = Grid(name, Path(out) / name, methods, datasets, int(image_size), tuple(int(s) for s in seeds),
                tuple(float(x) for x in lrs), overrides)
    grid.sweeps()  # every sweep's recipe loads and its overrides are allowed
    return grid


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
                tuple(g["seeds"]), tuple(g["lrs"]), g["overrides"])


# ---- the plan ---------------------------------------------------------------------------------


def images_per_epoch(task: str, phase: int) -> int | None:
    """Training images of a sweep phase from the catalog (None for a dataset it does not count):
    phase 1 trains on train, ``floor(0.8 n)`` of each class's n train_val images; phase 2 on train_val."""
    spec = CATALOG.get(task)
    if spec is None or not spec.train_val or not spec.num_classes:
        return None
    if PHASE_SPLITS[phase][0] == "train_val":
        return spec.train_val
    return spec.num_classes * math.floor(TRAIN_FRAC * (spec.train_val // spec.num_classes))


def plan_rows(grid: Grid, step_seconds: dict[str, float | None]) -> list[dict]:
    """One row per sweep: runs, epochs, optimizer steps and hours at ``step_seconds[method]``."""
    rows = []
    for method, task, sweep in grid.sweeps():
        recipe = sweep_recipe(sweep)
        per_step = recipe.train.batch_size * recipe.train.grad_accum
        steps = 0
        for phase, n_runs in ((1, len(sweep.lrs)), (2, len(sweep.seeds))):
            n = images_per_epoch(task, phase)
            steps = None if n is None or steps is None else steps + n_runs * recipe.train.epochs * math.ceil(n / per_step)
        s = step_seconds.get(method)
        rows.append({"method": method, "task": task, "runs": len(sweep.lrs) + len(sweep.seeds),
                     "epochs": recipe.train.epochs, "batch_size": per_step, "steps": steps, "step_s": s,
                     "hours": steps * s / 3600 if steps is not None and s is not None else None})
    return rows


def sweep_recipe(sweep: Sweep):
    from ..recipe import load_recipe

    return load_recipe(sweep.recipe, sweep.overrides)


def bench_step_seconds(bench: Path, method: str, image_size: int, batch_size: int, precision: str) -> float | None:
    """Seconds per training step from a ``make bench`` result file: the method's row at this image size
    and precision (else the plain ViT's, ``timm``), scaled from its batch to ``batch_size``. ``auto``
    precision takes bf16 where the file has it (what auto picks on bf16-capable hardware), else fp32."""
    if not bench.is_file():
        return None
    rows = [r for r in json.loads(bench.read_text(encoding="utf-8")).get("rows", [])
            if r.get("mode") == "train" and r.get("size") == image_size
            and not r.get("compile") and not r.get("grad_checkpointing")]
    for prec in (("bf16", "fp32") if precision == "auto" else (precision,)):
        for name in (method, "timm"):
            hit = [r for r in rows if r["method"] == name and r.get("precision") == prec]
            if hit:
                return hit[0]["s_per_batch"] * batch_size / hit[0]["batch"]
    return None


def method_step_seconds(grid: Grid, step_seconds: float | None, bench: Path) -> dict[str, float | None]:
    """Seconds per training step of each method: ``step_seconds`` for all when given, else from the
    ``make bench`` file at the method's recipe batch and precision (`bench_step_seconds`)."""
    out = {}
    for m in grid.methods:
        if step_seconds is not None:
            out[m] = step_seconds
            continue
        r = sweep_recipe(grid.sweep(m, grid.tasks[0]))
        out[m] = bench_step_seconds(bench, m, grid.image_size, r.train.batch_size * r.train.grad_accum, r.train.precision)
    return out


# ---- status -----------------------------------------------------------------------------------


def run_status(grid: Grid) -> list[dict]:
    """Every run of the grid as its own folder says (`RunDir.status`): done, running (its owner lives:
    the same host's pid, or another host's fresh heartbeat), resumable (stopped, or its owner died),
    failed (its error record; for a run that left none, its sweep's report) or pending. ``status`` is
    the kind, ``detail`` the one line with step, owner and reason. Phase 2's runs are listed by seed
    until phase 1 has chosen their learning rate."""
    rows = []
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
            rows.append({"method": method, "task": task, "phase": phase, "lr": e["lr"], "seed": e["seed"],
                         "status": status.kind, "detail": str(status), "step": status.step, "owner": status.owner,
                         "reason": status.reason, "run": str(folder.root) if folder is not None else None})
    return rows


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
