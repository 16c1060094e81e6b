"""Table 1 from the grid's runs: top-1 mean +- sample std over seeds per (method, dataset), the
paper's number and the difference beside it, trainable parameters summed over the tasks (TTP) and
GMACs per image. Every accuracy is read from a run's own ``eval/test/metrics.json``.

SoyAgeing appears twice: pooled (one sweep on all rounds at once) and as the mean of its rounds
(per seed, the mean over the round sweeps' test top-1; then mean +- std of those over the seeds that
finished every round).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from ..analysis.paper import PAPER_ROWS, TABLE1, paper_top1
from ..data.catalog import CATALOG
from ..data.folder import dataset_counts
from ..io import atomic_write_text
from ..methods import METHODS, method_spec
from ..paths import RunDir
from ..recipe import load_recipe
from ..sweep import Sweep
from .grid import Grid, read_failures, rounds_of, row_recipe, sweep_recipe


def seed_top1(sweep: Sweep) -> dict[int, float]:
    """Phase 2's test top-1 per seed, from the run folders ``plan.json`` lists (empty before phase 2)."""
    plan = sweep.root / "plan.json"
    if not plan.is_file():
        return {}
    out = {}
    for e in json.loads(plan.read_text(encoding="utf-8"))["phase2"]["runs"]:
        m = RunDir(sweep.root / e["run"]).eval_metrics("test")
        if m.is_file():
            out[e["seed"]] = json.loads(m.read_text(encoding="utf-8"))["top1"]
    return out


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); None where there are too few values."""
    return (statistics.fmean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None)


def _num_classes(sweep: Sweep, task: str) -> int:
    """The task's class count as its runs saw it (a run's metrics.json), else the catalog's, the
    dataset's on disk or the generator's (2 where nothing says: the cost barely depends on it)."""
    for run in sorted((sweep.root / "runs").glob("*/")):
        for m in RunDir(run).eval_metrics_files():
            return json.loads(m.read_text(encoding="utf-8"))["num_classes"]
    return dataset_counts(task, sweep.overrides.get("data", {}).get("root")).num_classes or 2


def row_title(row: str) -> str:
    """How the table names a row: the method's title, or for another recipe of it, or for a method that
    trains every weight, the paper's name of that row (``TrFG* (full fine-tuning)``, ``SIMT* (full
    fine-tuning)``), else the title with the recipe's name."""
    if row in METHODS and not (row in PAPER_ROWS and "all" in method_spec(row).trains):
        return method_spec(row).display_name
    if row in PAPER_ROWS:
        return PAPER_ROWS[row].title
    return f"{method_spec(load_recipe(row).model.method).display_name} ({row})"


def method_cost(grid: Grid, method: str) -> dict:
    """TTP (trainable parameters summed over the table's datasets, SoyAgeing once, pooled) and MACs
    per image of the first dataset's model, built on the meta device from the sweeps' recipe."""
    from ..analysis.report import static_cost

    ttp, macs = 0, None
    for d in grid.datasets:
        sweep = grid.sweep(method, d)
        c = static_cost(sweep_recipe(sweep), _num_classes(sweep, d))
        ttp += c["params_trainable"]
        macs = c["macs"] if macs is None else macs
    return {"ttp": ttp, "macs": macs}


def columns(grid: Grid) -> list[tuple[str, str, tuple[str, ...]]]:
    """(column key, title, tasks averaged per seed): a dataset, and after a pooled one its rounds' mean."""
    cols = []
    for d in grid.datasets:
        title = CATALOG[d].title.split(" (")[0]
        rounds = rounds_of(d)
        cols.append((d, f"{title} (pooled)" if rounds else title, (d,)))
        if rounds:
            cols.append((f"{d}_rounds", f"{title} (mean of {len(rounds)} rounds)", rounds))
    return cols


def table_rows(grid: Grid) -> list[dict]:
    """One row per (method, column): the per-seed numbers, their mean and std, the paper's number."""
    rows = []
    for method in grid.methods:
        cost = method_cost(grid, method)
        for key, title, tasks in columns(grid):
            per_task = [seed_top1(grid.sweep(method, t)) for t in tasks]
            seeds = [s for s in grid.seeds if all(s in p for p in per_task)]
            values = [statistics.fmean(p[s] for p in per_task) for s in seeds]
            mean, std = mean_std(values)
            paper = paper_top1(row_recipe(method), key.removesuffix("_rounds"))
            rows.append({
                "method": method, "title": row_title(method), "column": key, "column_title": title,
                "n": len(values), "seeds": seeds, "top1": values, "mean": mean, "std": std, "paper": paper,
                "diff": mean - paper if mean is not None and paper is not None else None,
                "ttp_m": cost["ttp"] / 1e6, "gmacs": cost["macs"] / 1e9,
            })
    return rows


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def cell(row: dict) -> str:
    """``ours ± std (paper p, Δ d)``; "-" where a number is missing."""
    out = f"{_f(row['mean'])} ± {_f(row['std'])}"
    if row["paper"] is not None:
        out += f" ({_f(row['paper'])}, {_f(row['diff'], '+.2f')})"
    return out


def _by_method(grid: Grid, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    return [(m, [r for r in rows if r["method"] == m]) for m in grid.methods]


def markdown(grid: Grid, rows: list[dict]) -> str:
    cols = columns(grid)
    head = ["Method", *(t for _, t, _ in cols), f"TTP (M, {len(grid.datasets)} tasks)", f"GMACs ({grid.image_size} px)"]
    lines = [f"# Table 1: `{grid.name}`", "",
             f"Test top-1 % at the last epoch, {grid.image_size} px: mean ± sample std over seeds "
             f"{', '.join(map(str, grid.seeds))}, with (the paper's number, our difference); the paper's numbers: "
             f"{TABLE1}. Each sweep picks its learning rate on val first. \"-\" where there is no number yet.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, rs in _by_method(grid, rows):
        lines.append(f"| {rs[0]['title']} | " + " | ".join(cell(r) for r in rs)
                     + f" | {rs[0]['ttp_m']:.3f} | {rs[0]['gmacs']:.3f} |")
    failures = read_failures(grid)
    if failures:
        lines += ["", f"Sweeps that stopped on an error ({len(failures)}; the same command retries them):", ""]
        lines += [f"- {cell}: {why}" for cell, why in sorted(failures.items())]
    return "\n".join([*lines, ""])


CSV_FIELDS = ("method", "column", "n", "seeds", "top1", "mean", "std", "paper", "diff", "ttp_m", "gmacs")


def csv_text(rows: list[dict]) -> str:
    f = io.StringIO()
    w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "seeds": " ".join(map(str, r["seeds"])), "top1": " ".join(f"{v:.4f}" for v in r["top1"]),
                    **{k: "" if r[k] is None else f"{r[k]:.4f}" for k in ("mean", "std", "paper", "diff")}})
    return f.getvalue()


def latex(grid: Grid, rows: list[dict]) -> str:
    """A booktabs tabular: ours as mean$\\pm$std, the paper's number and the difference in small type."""
    cols = columns(grid)
    out = [r"\begin{tabular}{l" + "c" * len(cols) + "rr}", r"\toprule",
           "Method & " + " & ".join(t for _, t, _ in cols) + r" & TTP (M) & GMACs \\", r"\midrule"]
    for _, rs in _by_method(grid, rows):
        cells = []
        for r in rs:
            c = f"{_f(r['mean'])}$\\pm${_f(r['std'])}"
            if r["paper"] is not None:
                c += f" {{\\scriptsize ({_f(r['paper'])}, {_f(r['diff'], '+.2f')})}}"
            cells.append(c)
        title = rs[0]["title"].replace("+", "{+}")
        out.append(f"{title} & " + " & ".join(cells) + f" & {rs[0]['ttp_m']:.3f} & {rs[0]['gmacs']:.3f} \\\\")
    return "\n".join([*out, r"\bottomrule", r"\end{tabular}", ""])


def write_table(grid: Grid) -> Path:
    """Write ``table1.{md,csv,tex}`` from the runs as they are now; returns the markdown's path."""
    rows = table_rows(grid)
    atomic_write_text(grid.root / "table1.md", markdown(grid, rows))
    atomic_write_text(grid.root / "table1.csv", csv_text(rows))
    atomic_write_text(grid.root / "table1.tex", latex(grid, rows))
    return grid.root / "table1.md"
