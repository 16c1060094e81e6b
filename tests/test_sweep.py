"""`ufgir sweep`: the paper's LR protocol, killed half-way and continued, numbers traced to metrics.json."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.errors import RecipeError, TrainingError
from ufgir_cli.recipe import load_recipe, parse_overrides
from ufgir_cli.sweep import RULE, make_sweep, run_sweep
from ufgir_cli.sweep.plan import Run
from ufgir_cli.sweep.summary import choose_lr, mean_std

runner = CliRunner()


def quick_sets(data_root) -> list[str]:
    """The quickstart recipe cut to seconds: 1 epoch of 2-3 steps, a checkpoint after every step."""
    return [f"data.root={data_root}", "data.num_workers=0", "train.epochs=1", "train.batch_size=8",
            "train.checkpoint_every=1", "schedule.warmup_steps=2", "logging.tensorboard=false"]


class KillAt(Callback):
    """Stands in for a SIGKILL: an exception out of the middle of one run (its step-1 checkpoint is written)."""

    class Killed(Exception):
        pass

    def __init__(self, run: Run, target: tuple[int, int], step: int = 2, error: type[Exception] = Killed):
        self.hit = (run.phase, run.seed if run.phase == 2 else run.lr) == target
        self.step, self.error = step, error

    def on_step(self, step, logs):
        if self.hit and step == self.step:
            raise self.error("killed")


def table_rows(markdown: str) -> dict[str, list[str]]:
    """summary.md's table rows by their first cell."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| lr |") and not line.startswith("| seed |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def killed_and_continued(small_synthetic, tmp_path_factory):
    """2 LRs x 2 seeds, 1 epoch: killed inside phase 2's first seed, then the same command again (CLI)."""
    out = tmp_path_factory.mktemp("sweeps")
    sets = quick_sets(small_synthetic)
    args = ["sweep", "-r", "quickstart", "--lr", "0.1,0.03", "--seeds", "1,10", "--out", str(out), "-q"]
    for s in sets:
        args += ["--set", s]
    sweep = make_sweep("quickstart", parse_overrides(sets), lrs=(0.1, 0.03), seeds=(1, 10), out=out)
    first: list[tuple[str, str]] = []
    with pytest.raises(KillAt.Killed):
        run_sweep(sweep, on_event=lambda kind, run, info: first.append((kind, run.label)),
                  callbacks=lambda run: [KillAt(run, (2, 1))])
    done = {p: p.stat().st_mtime_ns for p in (sweep.root / "runs").glob("*/eval/*/metrics.json")}
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return sweep, first, done, res.output, args


def test_killed_sweep_continues_without_repeating_a_finished_run(killed_and_continued):
    sweep, first, done, output, _ = killed_and_continued
    assert [k for k, _ in first] == ["started", "finished", "started", "finished", "started"]
    assert len(done) == 2  # the two phase-1 runs finished before the kill
    lines = [line for line in output.splitlines() if re.match(r"(started|finished|skipped|failed) ", line)]
    what = [re.sub(r" lr \S+", "", line.split(":")[0]) + (" resuming" if "resuming" in line else "") for line in lines]
    assert what == ["skipped  phase 1 seed 1", "skipped  phase 1 seed 1", "started  phase 2 seed 1 resuming",
                    "finished phase 2 seed 1", "started  phase 2 seed 10", "finished phase 2 seed 10"]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished runs were not touched
    runs = sorted((sweep.root / "runs").iterdir())
    assert len(runs) == 4 and all(len(list(r.glob("eval/*/metrics.json"))) == 1 for r in runs)
    resumed = next(r for r in runs if r.name.startswith("p2_") and "_seed1_" in r.name)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 3  # 24 train_val images / 8, the log cut back on resume


def test_every_number_in_summary_is_the_runs_own(killed_and_continued):
    sweep, _, _, output, _ = killed_and_continued
    report = json.loads((sweep.root / "sweep.json").read_text())
    rows = table_rows((sweep.root / "summary.md").read_text())
    test_numbers = {k: [] for k in ("top1", "top5", "per_class_mean")}
    for phase, split, first in (("phase1", "val", "lr"), ("phase2", "test", "seed")):
        assert len(report[phase]) == 2
        for entry in report[phase]:
            own = json.loads((sweep.root / entry["run"] / "eval" / split / "metrics.json").read_text())
            assert own["split"] == split and own["checkpoint"] == "last"
            assert entry["status"] == "finished" and entry[split]["top1"] == own["top1"]
            row = rows[f"{entry[first]:g}"]
            assert row == [f"{own['top1']:.2f}", f"{own['top5']:.2f}", f"{own['per_class_mean']:.2f}", f"`{entry['run']}`"]
            if split == "test":
                for k in test_numbers:
                    test_numbers[k].append(own[k])
    cells = [f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" for v in test_numbers.values()]
    assert rows["mean ± std (n = 2)"] == [*cells, ""]
    assert report["test"]["top1"]["std"] == pytest.approx(statistics.stdev(test_numbers["top1"]))
    val = {e["lr"]: e["val"]["top1"] for e in report["phase1"]}
    best = max(val.values())
    assert report["chosen_lr"] == min(lr for lr, v in val.items() if v == best)
    assert all(e["lr"] == report["chosen_lr"] for e in report["phase2"])
    assert RULE in (sweep.root / "summary.md").read_text() and report["rule"] == RULE
    plan = json.loads((sweep.root / "plan.json").read_text())
    assert plan["phase2"]["lr"] == report["chosen_lr"] and len(plan["phase2"]["runs"]) == 2
    assert f"{report['test']['top1']['mean']:.2f} ± {report['test']['top1']['std']:.2f}" in output


def test_more_seeds_on_gpu_slots_add_only_the_new_run(killed_and_continued):
    """--gpus: one `ufgir train` subprocess per slot (on a CPU-only host CUDA_VISIBLE_DEVICES hides nothing)."""
    sweep, _, _, _, args = killed_and_continued
    args = [a if a != "1,10" else "1,10,100" for a in args]
    res = runner.invoke(app, [*args, "--gpus", "0"])
    assert res.exit_code == 0, res.output
    started = [line for line in res.output.splitlines() if line.startswith("started")]
    assert len(started) == 1 and "seed 100" in started[0] and "on gpu 0" in started[0]
    report = json.loads((sweep.root / "sweep.json").read_text())
    assert [e["seed"] for e in report["phase2"]] == [1, 10, 100] and report["test"]["top1"]["n"] == 3
    assert (sweep.root / "logs").is_dir()


def test_a_failing_learning_rate_is_reported_and_the_sweep_goes_on(small_synthetic, tmp_path):
    sweep = make_sweep("quickstart", parse_overrides(quick_sets(small_synthetic)), lrs=(0.1, 0.03), seeds=(1,),
                       out=tmp_path)
    events = []
    with pytest.raises(TrainingError, match="1 run.s. of sweep .* failed"):
        run_sweep(sweep, on_event=lambda kind, run, info: events.append((kind, run.phase, run.lr)),
                  callbacks=lambda run: [KillAt(run, (1, 0.1), step=1, error=TrainingError)])
    assert ("failed", 1, 0.1) in events and ("finished", 2, 0.03) in events
    report = json.loads((sweep.root / "sweep.json").read_text())
    assert report["phase1"][0]["status"] == "failed" and report["phase1"][0]["error"] == "killed"
    assert report["chosen_lr"] == 0.03 and report["test"]["top1"]["n"] == 1 and report["test"]["top1"]["std"] is None
    assert "| 0.1 | failed | failed | failed |" in (sweep.root / "summary.md").read_text()


# ---- pieces ---------------------------------------------------------------------------------


def _run_with_val(tmp_path, lr: float, top1: float) -> Run:
    recipe = load_recipe("quickstart", {"train": {"split": "train"}, "eval": {"split": "val"}})
    run = Run(1, lr, 1, recipe, "k", tmp_path / f"lr{lr}")
    run.metrics_file.parent.mkdir(parents=True)
    run.metrics_file.write_text(json.dumps({"top1": top1}))
    return run


def test_ties_go_to_the_smaller_learning_rate(tmp_path):
    runs = [_run_with_val(tmp_path, lr, v) for lr, v in ((0.3, 40.0), (0.1, 75.0), (0.01, 75.0), (0.03, 60.0))]
    lr, why = choose_lr(runs)
    assert lr == 0.01 and "75.00" in why and "tied with lr 0.1" in why
    assert choose_lr([]) is None


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == {"mean": pytest.approx(7 / 3), "std": pytest.approx(statistics.stdev([1, 2, 4])),
                                         "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}


def test_names_and_keys_follow_the_recipe(small_synthetic, tmp_path):
    from ufgir_cli.sweep.plan import make_run

    sets = parse_overrides(quick_sets(small_synthetic))
    a = make_sweep("quickstart", sets, out=tmp_path)
    assert a.name == make_sweep("quickstart", sets, out=tmp_path).name  # no timestamp: the same command, the same sweep
    assert a.name.startswith("quickstart_synthetic_") and a.lrs == (0.3, 0.1, 0.03, 0.01, 0.003) and a.seeds == (1, 10, 100)
    assert make_sweep("quickstart", out=tmp_path).name == "quickstart_synthetic"
    changed = make_sweep("quickstart", {**sets, "train": {**sets["train"], "epochs": 2}}, out=tmp_path)
    assert changed.name != a.name
    r1, r2 = make_run(a, 1, 0.1, 1), make_run(dataclasses.replace(a, overrides=changed.overrides), 1, 0.1, 1)
    assert r1.key != r2.key and r1.run_dir.parent == r2.run_dir.parent  # a changed recipe is a new run, same sweep
    assert (r1.recipe.train.split, r1.split) == ("train", "val")
    p2 = make_run(a, 2, 0.1, 10)
    assert (p2.recipe.train.split, p2.split, p2.recipe.train.seed, p2.recipe.optim.lr) == ("train_val", "test", 10, 0.1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"overrides": {"optim": {"lr": 0.1}}}, "optim.lr"),
    ({"overrides": {"train": {"seed": 3}}}, "train.seed"),
    ({"lrs": (0.1, 0.1)}, "distinct positive"),
    ({"lrs": (0.0,)}, "distinct positive"),
    ({"name": "../x"}, "--name"),
])
def test_bad_sweeps_fail_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        make_sweep("quickstart", out=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_a_stop_signal_stops_the_sweep_with_how_to_continue(small_synthetic, tmp_path):
    """What `fit` raises after SIGINT saved its checkpoint becomes the sweep's stop, exit code kept."""
    import signal

    from ufgir_cli.engine.state import Interrupted

    sweep = make_sweep("quickstart", parse_overrides(quick_sets(small_synthetic)), lrs=(0.1,), seeds=(1,), out=tmp_path)
    with pytest.raises(Interrupted, match="stopped by SIGINT.*same `ufgir sweep` command") as e:
        run_sweep(sweep, callbacks=lambda run: [KillAt(run, (1, 0.1), step=1,
                                                       error=lambda msg: Interrupted(msg, signal.SIGINT))])
    assert e.value.exit_code == 130
