"""The sweep's results: the learning rate phase 1 chose and why, phase 2's numbers per seed and
their mean +- sample standard deviation, as ``sweep.json`` (for programs) and ``summary.md`` (for
people). Every number is read from a run's own ``eval/<split>/metrics.json``, never from memory."""

from __future__ import annotations

import json
import statistics

from ..io import atomic_write_json, atomic_write_text
from .plan import RULE, Run, Sweep, run_entry

METRICS = ("top1", "top5", "per_class_mean", "per_class_std", "loss")
SHOWN = (("top1", "top-1"), ("top5", "top-5"), ("per_class_mean", "per-class mean"))


def read_metrics(run: Run) -> dict | None:
    """The run's final evaluation, or None while it has none."""
    return json.loads(run.metrics_file.read_text()) if run.metrics_file.is_file() else None


def choose_lr(phase1: list[Run]) -> tuple[float, str] | None:
    """The learning rate with the highest val top-1 (ties: the smaller one) and a sentence saying
    why; None when no phase-1 run has finished."""
    scored = [(m["top1"], r.lr) for r in phase1 if (m := read_metrics(r)) is not None]
    if not scored:
        return None
    top1, lr = max(scored, key=lambda s: (s[0], -s[1]))
    tied = sorted(x for t, x in scored if t == top1 and x != lr)
    why = f"val top-1 {top1:.2f} is the highest of {len(scored)} learning rates"
    if tied:
        why += f", tied with lr {', '.join(f'{x:g}' for x in tied)}; the smaller wins"
    return lr, why


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1); the std is None below two values."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def _row(sweep: Sweep, run: Run, failed: dict[str, str]) -> dict:
    """A run's line: ``status`` is finished, failed (in this command), or the run's own status kind
    (running, resumable, failed, pending: `RunDir.status`), ``detail`` that status in one line."""
    m = read_metrics(run)
    own = run.status()
    status = "finished" if m is not None else "failed" if run.key in failed else own.kind
    numbers = {k: m[k] for k in (*METRICS, "num_images")} if m is not None else None
    row = {**run_entry(sweep, run), "status": status, "detail": str(own), run.split: numbers}
    if status == "failed":
        row["error"] = failed.get(run.key) or own.reason
    return row


def write_report(sweep: Sweep, phase1: list[Run], phase2: list[Run], failed: dict[str, str]) -> dict:
    """Write ``sweep.json`` and ``summary.md`` from the runs' files as they are now; returns the JSON."""
    choice = choose_lr(phase1)
    rows2 = [_row(sweep, r, failed) for r in phase2]
    done = [r["test"] for r in rows2 if r["test"] is not None]
    report = {
        "name": sweep.name, "recipe": sweep.recipe, "overrides": sweep.overrides, "rule": RULE,
        "phase1": [_row(sweep, r, failed) for r in phase1],
        "chosen_lr": choice[0] if choice else None, "chosen_because": choice[1] if choice else None,
        "phase2": rows2,
        "test": {k: mean_std([m[k] for m in done]) for k in METRICS},
    }
    atomic_write_json(sweep.root / "sweep.json", report)
    atomic_write_text(sweep.root / "summary.md", summary_markdown(report))
    return report


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(rows: list[dict], split: str, first: str) -> list[str]:
    head = [first, *(f"{split} {label} %" for _, label in SHOWN), "run"]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for r in rows:
        m = r[split]
        nums = [_cell(m[k]) if m else r["status"] for k, _ in SHOWN]
        out.append(f"| {r[first]:g} | " + " | ".join(nums) + f" | `{r['run']}` |")
    return out


def summary_markdown(report: dict) -> str:
    """The sweep for a README or a lab notebook: both phases' tables, the choice and its rule, and
    test mean +- sample std over seeds."""
    lines = [
        f"# Sweep `{report['name']}`", "",
        f"Recipe `{report['recipe']}`, overrides `{json.dumps(report['overrides'], sort_keys=True)}`. "
        "Numbers are percent at the last epoch, from each run's `eval/<split>/metrics.json`.", "",
        "## Phase 1: learning rate, trained on train, evaluated on val", "",
        *_table(report["phase1"], "val", "lr"), "",
    ]
    if report["chosen_lr"] is None:
        lines += ["No learning rate has finished phase 1 yet.", ""]
        return "\n".join(lines)
    lines += [f"Chosen lr **{report['chosen_lr']:g}**: {report['chosen_because']}. Rule: {report['rule']}.", "",
              f"## Phase 2: lr {report['chosen_lr']:g}, trained on train_val, evaluated on test, per seed", "",
              *_table(report["phase2"], "test", "seed")]
    t = report["test"]
    n = t["top1"]["n"]
    if n:
        cells = [f"{_cell(t[k]['mean'])} ± {_cell(t[k]['std'])}" for k, _ in SHOWN]
        lines.append(f"| mean ± std (n = {n}) | " + " | ".join(cells) + " | |")
    lines += ["", "Mean ± sample standard deviation (n - 1) over the seeds that finished; "
              "\"-\" where there is no number (one seed has no spread).", ""]
    return "\n".join(lines)

