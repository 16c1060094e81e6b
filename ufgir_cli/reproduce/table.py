"""Table 1 from the grid's runs: top-1 mean +- sample std over seeds per (method, dataset), the
paper's number and the difference beside it, the learning rate each sweep chose, trainable parameters
summed over the tasks (TTP) and GMACs per image, as markdown, a wide CSV, a LaTeX table float, and a
long CSV with one row per run. Every accuracy is read from a run's own ``eval/test/metrics.json``.

SoyAgeing appears twice: pooled (one sweep on all rounds at once) and as the mean of its rounds
(per seed, the mean over the round sweeps' test top-1; then mean +- std of those over the seeds that
finished every round).
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path

from ..analysis.paper import PAPER_IMAGE_SIZE, PAPER_ROWS, TABLE1, paper_sources, paper_top1
from ..data.catalog import get_spec
from ..data.folder import dataset_counts
from ..io import atomic_write_text, plural
from ..methods import METHODS, method_spec
from ..paths import RunDir
from ..recipe import load_recipe
from ..sweep import Sweep
from .grid import Grid, read_failures, rounds_of, row_recipe, split_row, sweep_recipe


def _phase2(sweep: Sweep) -> dict:
    """``plan.json``'s phase 2 (its learning rate and runs), empty before phase 1 has chosen."""
    plan = sweep.root / "plan.json"
    return json.loads(plan.read_text(encoding="utf-8")).get("phase2", {}) if plan.is_file() else {}


def seed_runs(sweep: Sweep) -> dict[int, dict]:
    """Phase 2's finished runs by seed: the learning rate, the run folder and its test ``metrics.json``,
    from the run folders ``plan.json`` lists (empty before phase 2)."""
    phase2, out = _phase2(sweep), {}
    for e in phase2.get("runs", []):
        m = RunDir(sweep.root / e["run"]).eval_metrics("test")
        if m.is_file():
            out[e["seed"]] = {"lr": e.get("lr", phase2.get("lr")), "run": sweep.root / e["run"],
                              "metrics": json.loads(m.read_text(encoding="utf-8"))}
    return out


def seed_top1(sweep: Sweep) -> dict[int, float]:
    """Phase 2's test top-1 per seed, from the run folders ``plan.json`` lists (empty before phase 2)."""
    return {seed: r["metrics"]["top1"] for seed, r in seed_runs(sweep).items()}


def chosen_lr(sweep: Sweep) -> float | None:
    """The learning rate phase 1 chose (on val) for phase 2, None before it has chosen."""
    return _phase2(sweep).get("lr")


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


def method_cost(grid: Grid, row: str) -> dict:
    """TTP (trainable parameters summed over the table's datasets, SoyAgeing once, pooled) and MACs
    per image of the first dataset's model, built on the meta device from the sweeps' recipe."""
    from ..analysis.report import static_cost

    ttp, macs = 0, None
    for d in grid.datasets:
        sweep = grid.sweep(row, d)
        c = static_cost(sweep_recipe(sweep), _num_classes(sweep, d))
        ttp += c["params_trainable"]
        macs = c["macs"] if macs is None else macs
    return {"ttp": ttp, "macs": macs}


def columns(grid: Grid) -> list[tuple[str, str, tuple[str, ...]]]:
    """(column key, title, tasks averaged per seed): a dataset, and after a pooled one its rounds' mean."""
    cols = []
    for d in grid.datasets:
        title = get_spec(d).title.split(" (")[0]
        rounds = rounds_of(d)
        cols.append((d, f"{title} (pooled)" if rounds else title, (d,)))
        if rounds:
            cols.append((f"{d}_rounds", f"{title} (mean of {len(rounds)} rounds)", rounds))
    return cols


def table_rows(grid: Grid) -> list[dict]:
    """One row per (row, column), a row being a method (or recipe) on a backbone: the per-seed numbers,
    their mean and std, the paper's number, the learning rate each of the column's sweeps chose (None
    where it has not chosen yet) and the backbone."""
    rows = []
    for row in grid.rows:
        method = split_row(row)[0]
        cost = method_cost(grid, row)
        backbone = sweep_recipe(grid.sweep(row, grid.tasks[0])).model.backbone
        for key, title, tasks in columns(grid):
            per_task = [seed_top1(grid.sweep(row, t)) for t in tasks]
            seeds = [s for s in grid.seeds if all(s in p for p in per_task)]
            values = [statistics.fmean(p[s] for p in per_task) for s in seeds]
            mean, std = mean_std(values)
            paper = paper_top1(row_recipe(method), key.removesuffix("_rounds"))
            rows.append({
                "method": method, "row": row, "title": row_title(method), "column": key, "column_title": title,
                "n": len(values), "seeds": seeds, "top1": values, "mean": mean, "std": std, "paper": paper,
                "diff": mean - paper if mean is not None and paper is not None else None,
                "lr": [chosen_lr(grid.sweep(row, t)) for t in tasks], "backbone": backbone,
                "ttp_m": cost["ttp"] / 1e6, "gmacs": cost["macs"] / 1e9,
            })
    return rows


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _ours(row: dict, pm: str = " ± ") -> str:
    """Mean ± sample std over seeds; with one seed the mean and "n=1" (one value has no spread); "-"
    with none."""
    if row["n"] == 0:
        return "-"
    return f"{_f(row['mean'])} (n=1)" if row["n"] == 1 else f"{_f(row['mean'])}{pm}{_f(row['std'])}"


def cell(row: dict) -> str:
    """``ours ± std (paper p, Δ d)``; "-" where a number is missing, "(n=1)" where one seed has no spread."""
    out = _ours(row)
    if row["paper"] is not None:
        out += f" ({_f(row['paper'])}, {_f(row['diff'], '+.2f')})"
    return out


def lr_cell(row: dict) -> str:
    """The learning rate the column's sweep chose; a rounds column lists each round's, in round order."""
    lrs = row["lr"]
    if all(x is None for x in lrs):
        return "-"
    if len(set(lrs)) == 1:
        return f"{lrs[0]:g}"
    return " / ".join("-" if x is None else f"{x:g}" for x in lrs)


def _by_method(grid: Grid, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The table's rows in order (a method on a backbone), each with its cells."""
    return [(k, [r for r in rows if r["row"] == k]) for k in grid.rows]


def _backbones(rows: list[dict]) -> str:
    """The backbone of every row, or the list of them where they differ (each row names its own)."""
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    return names[0] if len(names) == 1 else f"per row ({', '.join(names)})"


def cited(grid: Grid) -> str:
    """The sources of the paper numbers in the grid's rows (the ILA paper's Table 1 where none has one)."""
    return "; ".join(paper_sources(row_recipe(split_row(r)[0]) for r in grid.rows)) or TABLE1


def markdown(grid: Grid, rows: list[dict]) -> str:
    cols = columns(grid)
    head = ["Method", "Backbone", *(t for _, t, _ in cols), f"TTP (M, {plural(len(grid.datasets), 'task')})",
            f"GMACs ({grid.image_size} px)"]
    lines = [f"# Table 1: `{grid.name}`", "",
             f"Test top-1 % at the last epoch, {grid.image_size} px, backbone {_backbones(rows)}: mean ± sample std "
             f"over seeds {', '.join(map(str, grid.seeds))} (\"n=1\" where one seed has finished: one value has no "
             f"spread), with (the paper's number, our difference); the paper's numbers: {cited(grid)}. Each sweep picks "
             "its learning rate on val first (listed below the table). \"-\" where there is no number yet.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, rs in _by_method(grid, rows):
        lines.append(f"| {rs[0]['title']} | `{rs[0]['backbone']}` | " + " | ".join(cell(r) for r in rs)
                     + f" | {rs[0]['ttp_m']:.3f} | {rs[0]['gmacs']:.3f} |")
    lines += ["", "Learning rate chosen on val (phase 1) per cell; a rounds column lists each round's:", ""]
    lines += [f"- {rs[0]['title']} ({rs[0]['backbone']}): " + " · ".join(f"{r['column_title']} {lr_cell(r)}" for r in rs)
              for _, rs in _by_method(grid, rows)]
    failures = read_failures(grid)
    if failures:
        lines += ["", f"Sweeps that stopped on an error ({len(failures)}; the same command retries them):", ""]
        lines += [f"- {cell}: {why}" for cell, why in sorted(failures.items())]
    return "\n".join([*lines, ""])


CSV_FIELDS = ("method", "backbone", "column", "n", "mean", "std", "paper", "diff", "lr", "ttp_m", "gmacs")


def csv_text(rows: list[dict]) -> str:
    """The wide table: one row per (method, column), as table1.md (per-seed values: :func:`long_csv_text`)."""
    f = io.StringIO()
    w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "lr": "" if lr_cell(r) == "-" else lr_cell(r),
                    **{k: "" if r[k] is None else f"{r[k]:.4f}" for k in ("mean", "std", "paper", "diff")}})
    return f.getvalue()


LONG_FIELDS = ("method", "recipe", "row", "backbone", "image_size", "dataset", "seed", "lr", "top1", "top5",
               "per_class_mean", "paper_top1", "run")


def long_rows(grid: Grid) -> list[dict]:
    """One row per finished phase-2 run of the grid (every method x task x seed): what it is and its test
    numbers, for pandas or a spreadsheet. ``row`` is the table's row (a method or a packaged recipe),
    ``dataset`` the task (a SoyAgeing round is its own), ``paper_top1`` the paper's number for the task's
    dataset (rounds: the pooled set's row of the paper, where it has one)."""
    out = []
    for key in grid.rows:
        row = split_row(key)[0]
        recipe = row_recipe(row)
        for task in grid.tasks:
            sweep = grid.sweep(key, task)
            model = sweep_recipe(sweep).model
            for seed, r in sorted(seed_runs(sweep).items()):
                m = r["metrics"]
                out.append({"method": model.method, "recipe": recipe, "row": row, "backbone": model.backbone,
                            "image_size": model.image_size, "dataset": task, "seed": seed, "lr": r["lr"],
                            "top1": m.get("top1"), "top5": m.get("top5"), "per_class_mean": m.get("per_class_mean"),
                            "paper_top1": paper_top1(recipe, task),
                            "run": r["run"].relative_to(grid.root).as_posix()})
    return out


def long_csv_text(rows: list[dict]) -> str:
    f = io.StringIO()
    w = csv.DictWriter(f, LONG_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r[k] is None else f"{r[k]:.4f}" if isinstance(r[k], float) and k != "lr" else r[k]
                    for k in LONG_FIELDS})
    return f.getvalue()


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """``text`` as LaTeX prints it literally (underscores in backbone names, percent signs)."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


#: The paper's Table 1 backbone (timm's name), to say when ours differs.
PAPER_BACKBONE = "vit_base_patch16_224.orig_in21k"
#: What table1.tex needs in the document's preamble (it says so in its first line).
TEX_PACKAGES = ("booktabs",)


def latex(grid: Grid, rows: list[dict]) -> str:
    """A ``table`` float: a booktabs tabular (ours as mean$\\pm$std, the paper's number and the difference
    in small type), a caption and notes that say the resolution, the backbone and what the paper's
    column is; the packages it needs in its first line."""
    cols = columns(grid)
    seeds = ", ".join(map(str, grid.seeds))
    out = [f"% Table 1 of the reproduction `{grid.name}`, written by `ufgir reproduce`. Needs "
           + ", ".join(rf"\usepackage{{{p}}}" for p in TEX_PACKAGES) + " in the preamble.",
           r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{Test top-1 accuracy (\%) at the last epoch, {grid.image_size}\,px: mean $\pm$ sample standard "
           rf"deviation over seeds {seeds}; in small type the paper's number and our difference. TTP: trainable "
           rf"parameters summed over the {plural(len(grid.datasets), 'task')} (millions); GMACs: multiply-adds per "
           rf"image at {grid.image_size}\,px.}}",
           rf"\label{{tab:ufgir-{re.sub(r'[^A-Za-z0-9_.:-]', '-', grid.name)}}}",
           r"\begin{tabular}{ll" + "c" * len(cols) + "rr}", r"\toprule",
           "Method & Backbone & " + " & ".join(tex_escape(t) for _, t, _ in cols) + r" & TTP (M) & GMACs \\", r"\midrule"]
    for _, rs in _by_method(grid, rows):
        cells = []
        for r in rs:
            c = _ours(r, r"$\pm$")
            if r["paper"] is not None:
                c += f" {{\\scriptsize ({_f(r['paper'])}, {_f(r['diff'], '+.2f')})}}"
            cells.append(c)
        title = tex_escape(rs[0]["title"]).replace("+", "{+}")
        out.append(f"{title} & {tex_escape(rs[0]['backbone'])} & " + " & ".join(cells) + f" & {rs[0]['ttp_m']:.3f} & {rs[0]['gmacs']:.3f} \\\\")
    apart = ([f"{grid.image_size}\\,px"] if grid.image_size != PAPER_IMAGE_SIZE else []) + \
        ([f"backbone {tex_escape(_backbones(rows))}"] if {r["backbone"] for r in rows} != {PAPER_BACKBONE} else [])
    paper_note = f"the paper's numbers are {tex_escape(cited(grid))}" + (
        f"; ours differ ({' and '.join(apart)}), so the difference is not like for like" if apart else "")
    out += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip",
            rf"\parbox{{\linewidth}}{{\footnotesize Resolution {grid.image_size}\,px; backbone "
            rf"{tex_escape(_backbones(rows))}; learning rate chosen per cell on the validation split (table1.md); "
            rf"n=1: one seed finished, no spread; -: no number yet. In parentheses: {paper_note}.}}",
            r"\end{table}", ""]
    return "\n".join(out)


def write_table(grid: Grid) -> Path:
    """Write ``table1.{md,csv,tex}`` and ``table1_long.csv`` (one row per run) from the runs as they are
    now; returns the markdown's path."""
    rows = table_rows(grid)
    atomic_write_text(grid.root / "table1.md", markdown(grid, rows))
    atomic_write_text(grid.root / "table1.csv", csv_text(rows))
    atomic_write_text(grid.root / "table1_long.csv", long_csv_text(long_rows(grid)))
    atomic_write_text(grid.root / "table1.tex", latex(grid, rows))
    return grid.root / "table1.md"
