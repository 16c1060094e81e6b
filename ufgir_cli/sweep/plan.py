"""What a sweep runs: the paper's protocol spelled out as runs, each keyed by its resolved recipe.

Phase 1 trains every learning rate on ``train`` and evaluates the last epoch on ``val``; phase 2
trains the chosen rate on ``train_val`` once per seed and evaluates the last epoch on ``test``.
A run's folder name ends in its run key, a hash of the canonical form of its resolved recipe
(``runkey.py``), so repeating a command finds its runs again, a changed recipe (file, ``--set`` or
``UFGIR_*`` environment) makes new ones beside them, and a recipe key added at its default later
changes nothing. Run folders named by the key of before (the hash of the whole resolved TOML) are
still found: see :func:`make_run`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError, UfgirError
from ..io import atomic_write_json
from ..paths import RunDir, RunStatus
from ..recipe import Recipe, load_recipe
from .runkey import legacy_run_key, machine_run_key, run_key

PAPER_LRS = (0.3, 0.1, 0.03, 0.01, 0.003)
DEFAULT_SEEDS = (1, 10, 100)
RULE = "highest val top-1 at the last epoch; ties go to the smaller learning rate"
#: (train.split, eval.split) per phase.
PHASE_SPLITS = {1: ("train", "val"), 2: ("train_val", "test")}
#: Keys the sweep sets on every run; a --set of one of them would be silently replaced.
SWEPT_KEYS = {"optim": ("lr",), "train": ("seed", "split"), "eval": ("split",)}


@dataclass(frozen=True)
class Sweep:
    """One sweep as asked for: where it lives and what it varies."""

    name: str
    root: Path  # sweeps/<name>; run folders under root / "runs"
    recipe: str  # the recipe name or path, as given
    overrides: dict  # --set and --dataset, nested as load_recipe takes them
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # phase 1 trains with the first


@dataclass(frozen=True)
class Run:
    phase: int
    lr: float
    seed: int
    recipe: Recipe
    key: str  # run_key(recipe): 12 hex digits of the sha256 of its canonical form
    run_dir: Path  # <sweep>/runs/p<phase>_lr<lr>_seed<seed>_<key>, or a legacy key's folder (make_run)

    @property
    def split(self) -> str:
        """The split its final evaluation is on: val in phase 1, test in phase 2."""
        return self.recipe.eval.split

    @property
    def folder(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def metrics_file(self) -> Path:
        """The final evaluation: its presence makes the run done."""
        return self.folder.eval_metrics(self.split)

    def status(self) -> RunStatus:
        return self.folder.status(self.split)

    @property
    def label(self) -> str:
        return f"phase {self.phase} lr {self.lr:g} seed {self.seed}"


def make_sweep(recipe: str, overrides: dict | None = None, *, lrs=None, seeds=DEFAULT_SEEDS,
               name: str | None = None, out: str | Path = "sweeps") -> Sweep:
    """Check what is asked (the base recipe loads, the swept keys are left to the sweep) and name it.
    ``lrs`` None: the recipe's own ``sweep.lrs``, else the paper's grid."""
    overrides = overrides or {}
    taken = [f"{s}.{k}" for s, keys in SWEPT_KEYS.items() for k in keys if k in (overrides.get(s) or {})]
    if taken:
        raise RecipeError(f"--set {', '.join(taken)}: the sweep sets these per run (use --lr and --seeds)")
    base = load_recipe(recipe, overrides)  # fails here, before anything is written, if the recipe is wrong
    lrs = base.sweep.lrs or PAPER_LRS if lrs is None else lrs
    lrs, seeds = tuple(float(x) for x in lrs), tuple(int(x) for x in seeds)
    if not lrs or any(not x > 0 for x in lrs) or len(set(lrs)) != len(lrs):
        raise RecipeError(f"--lr {','.join(map(str, lrs))}: give distinct positive learning rates")
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds")
    name = name or default_sweep_name(recipe, base.data.dataset, overrides)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
        raise RecipeError(f"--name {name!r}: use letters, digits and . _ = + - (it names a folder)")
    return Sweep(name, Path(out) / name, str(recipe), overrides, lrs, seeds)


def default_sweep_name(recipe: str, dataset: str, overrides: dict) -> str:
    """``<recipe>_<dataset>`` and, with overrides, a short hash of them: no timestamp, so repeating
    a command continues its sweep. The dataset is in the name already, so it stays out of the hash."""
    stem = Path(recipe).stem if recipe.endswith(".toml") else recipe
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}_{dataset}")
    rest = {**overrides, "data": {k: v for k, v in (overrides.get("data") or {}).items() if k != "dataset"}}
    rest = {k: v for k, v in rest.items() if v != {}}
    if rest:
        name += "_" + hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8]
    return name


def make_run(sweep: Sweep, phase: int, lr: float, seed: int) -> Run:
    train_split, eval_split = PHASE_SPLITS[phase]
    over = {**sweep.overrides}
    for section, values in (("optim", {"lr": lr}), ("train", {"seed": seed, "split": train_split}),
                            ("eval", {"split": eval_split})):
        over[section] = {**(over.get(section) or {}), **values}
    recipe = load_recipe(sweep.recipe, over)
    key = run_key(recipe)
    older = (machine_run_key(recipe), legacy_run_key(recipe))
    return Run(phase, lr, seed, recipe, key, run_folder(sweep, phase, lr, seed, key, older))


def run_folder(sweep: Sweep, phase: int, lr: float, seed: int, key: str, older: tuple[str | None, ...] = ()) -> Path:
    """The run's folder under ``<sweep>/runs``: the one named by its key, unless only one named by an
    older key of the same recipe exists (keyed with the machine's keys, or before canonical keys);
    that one is then used as it is (skipped when finished, resumed or evaluated as its files say),
    not trained again."""
    def named(k: str) -> Path:
        return sweep.root / "runs" / f"p{phase}_lr{lr:g}_seed{seed}_{k}"

    if not named(key).exists():
        for k in older:
            if k is not None and k != key and named(k).is_dir():
                return named(k)
    return named(key)


def phase1_runs(sweep: Sweep) -> list[Run]:
    return [make_run(sweep, 1, lr, sweep.seeds[0]) for lr in sweep.lrs]


def phase2_runs(sweep: Sweep, lr: float) -> list[Run]:
    return [make_run(sweep, 2, lr, seed) for seed in sweep.seeds]


def run_entry(sweep: Sweep, run: Run) -> dict:
    """A run as plan.json and sweep.json list it (its folder relative to the sweep)."""
    return {"phase": run.phase, "lr": run.lr, "seed": run.seed, "train_split": run.recipe.train.split,
            "eval_split": run.split, "key": run.key, "run": run.run_dir.relative_to(sweep.root).as_posix()}


def write_plan(sweep: Sweep, phase1: list[Run], phase2: list[Run], lr: float | None) -> None:
    """``plan.json``: what this command runs. Phase 2's runs are known once phase 1 has chosen."""
    atomic_write_json(sweep.root / "plan.json", {
        "name": sweep.name, "recipe": sweep.recipe, "overrides": sweep.overrides, "lrs": list(sweep.lrs),
        "seeds": list(sweep.seeds), "rule": RULE,
        "phase1": {"train_split": "train", "eval_split": "val", "runs": [run_entry(sweep, r) for r in phase1]},
        "phase2": {"train_split": "train_val", "eval_split": "test", "lr": lr,
                   "runs": [run_entry(sweep, r) for r in phase2]},
    })


def check_models(items: Iterable[tuple[str, Recipe]]) -> int:
    """Build each ``(label, recipe)``'s model on the meta device (no weights, no memory), so that a
    layout that cannot work (a block past the last one, a method the backbone cannot carry) is refused
    before anything trains, in one line that starts with the label. Models that differ only in their
    class count are built once; returns how many were built."""
    from ..data.folder import dataset_counts
    from ..model.build import meta_model

    built: set[str] = set()
    for label, recipe in items:
        key = recipe.model.model_dump_json(exclude={"num_classes"})
        if key in built:
            continue
        classes = recipe.model.num_classes or dataset_counts(recipe.data.dataset, recipe.data.root).num_classes or 2
        try:
            meta_model(recipe.model, classes)
        except UfgirError as e:
            raise RecipeError(f"{label}: {e}") from None
        built.add(key)
    return len(built)
