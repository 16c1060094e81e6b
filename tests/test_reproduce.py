"""`ufgir reproduce`: a 2-method x 2-dataset x 2-seed grid of tiny runs, killed and continued here
and through submitit, ending in a table whose every cell is the runs' own mean and sample std."""

from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.errors import RecipeError
from ufgir_cli.recipe import parse_overrides
from ufgir_cli.reproduce import make_grid, run_local, run_status, submit, wait_and_tabulate, write_table
from ufgir_cli.reproduce.grid import StepTime, bench_step_seconds, plan_rows, step_time
from ufgir_cli.reproduce.table import seed_top1

runner = CliRunner()
METHODS, DATASETS, SEEDS = ("linear", "adapter"), ("cotton80", "soygene"), (1, 10)


def tiny_sets(data_root) -> list[str]:
    """Each method's recipe on the micro ViT: 1 epoch of 2-3 steps, a checkpoint after every step."""
    return [f"data.root={data_root}", "data.num_workers=0", "model.backbone=ufgir_vit_micro_patch8_64",
            "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "model.layer_norm_eps=1e-6", "train.epochs=1",
            "train.batch_size=8", "train.precision=fp32", "train.checkpoint_every=1", "schedule.warmup_steps=2",
            "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two different synthetic datasets in the folders of two Table-1 datasets (data.root holds both)."""
    from ufgir_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(DATASETS):
        generate_synthetic(root / name, num_classes=4, train_val=6, test=4, size=64, seed=seed)
    return root


def grid_args(data_root, out) -> list[str]:
    args = ["reproduce", "--methods", ",".join(METHODS), "--datasets", ",".join(DATASETS), "--image-size", "64",
            "--seeds", ",".join(map(str, SEEDS)), "--lr", "0.1", "--name", "tiny", "--out", str(out), "-q"]
    for s in tiny_sets(data_root):
        args += ["--set", s]
    return args


def tiny_grid(data_root, out):
    return make_grid(METHODS, DATASETS, image_size=64, seeds=SEEDS, lrs=(0.1,),
                     overrides=parse_overrides(tiny_sets(data_root)), name="tiny", out=out)


class KillAt(Callback):
    """Stands in for a SIGKILL in the middle of one run (its step-1 checkpoint is written)."""

    class Killed(Exception):
        pass

    def __init__(self, hit: bool):
        self.hit = hit

    def on_step(self, step, logs):
        if self.hit and step == 2:
            raise self.Killed("killed")


@pytest.fixture(scope="module")
def killed(data_root, tmp_path_factory):
    """The grid killed in the last run (phase 2, seed 10) of its last sweep, adapter on soygene; a snapshot of that
    state for the submitit test (fewer runs left to train keep both tests short)."""
    grid = tiny_grid(data_root, tmp_path_factory.mktemp("reproduce"))
    with pytest.raises(KillAt.Killed):
        run_local(grid, callbacks=lambda run: [KillAt("adapter_soygene" in str(run.run_dir) and run.seed == 10
                                                      and run.phase == 2)])
    snapshot = tmp_path_factory.mktemp("snapshot") / "tiny"
    shutil.copytree(grid.root, snapshot)
    return grid, snapshot


def cells(markdown: str) -> dict[str, list[str]]:
    """table1.md's rows by method title, after its backbone column (every row names its backbone)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            c = [x.strip() for x in line.strip("|").split("|")]
            assert c[1] == "`ufgir_vit_micro_patch8_64`", line
            rows[c[0]] = c[2:]
    return rows


def assert_table_is_the_runs_own(grid):
    """Every cell: mean and sample std of the phase-2 runs' test top-1 in their metrics.json."""
    rows = cells((grid.root / "table1.md").read_text())
    assert set(rows) == {"Linear probe", "Adapter"}
    for method, title in (("linear", "Linear probe"), ("adapter", "Adapter")):
        for i, d in enumerate(DATASETS):
            sweep = grid.sweep(method, d)
            runs = sorted((sweep.root / "runs").glob("p2_*"))
            own = [json.loads((r / "eval" / "test" / "metrics.json").read_text())["top1"] for r in runs]
            assert len(own) == 2
            mean, std = statistics.mean(own), statistics.stdev(own)
            paper = {"linear": {"cotton80": 39.03, "soygene": 21.31}, "adapter": {"cotton80": 48.19, "soygene": 57.04}}
            p = paper[method][d]
            assert rows[title][i] == f"{mean:.2f} ± {std:.2f} ({p:.2f}, {mean - p:+.2f})"
    csv_rows = (grid.root / "table1.csv").read_text().splitlines()
    assert csv_rows[0].startswith("method,backbone,column,n,") and len(csv_rows) == 1 + 4
    assert all(",ufgir_vit_micro_patch8_64," in r for r in csv_rows[1:])
    assert r"\pm" in (grid.root / "table1.tex").read_text()


def test_killed_grid_continues_here(killed, data_root):
    grid, _ = killed
    before = {p: p.stat().st_mtime_ns for p in grid.root.glob("sweeps/*/runs/*/eval/*/metrics.json")}
    assert len(before) == 3 * 3 + 2  # three sweeps of 3 runs, then phase 1 and seed 1 of the last
    status = {(r["method"], r["task"], r["phase"], r["seed"]): r["status"] for r in run_status(grid)}
    # the in-process stand-in for a kill raised an exception, which the run records as its failure
    assert status[("adapter", "soygene", 2, 10)] == "failed" and status[("linear", "soygene", 2, 10)] == "done"
    assert list(status.values()).count("done") == 11 and len(status) == 12
    res = runner.invoke(app, grid_args(data_root, grid.root.parent))
    assert res.exit_code == 0, res.output
    started = [line for line in res.output.splitlines() if line.startswith("started")]
    assert len(started) == 1 and "adapter soygene phase 2 lr 0.1 seed 10" in started[0]  # resumed, nothing redone
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert_table_is_the_runs_own(grid)
    res = runner.invoke(app, ["reproduce", "status", "tiny", "--out", str(grid.root.parent)])
    assert res.exit_code == 0 and "12 done · 0 running · 0 resumable · 0 failed · 0 pending" in res.output


def test_status_tells_a_live_run_from_a_killed_one(killed, tmp_path):
    """`reproduce status` on a copy of the killed grid: the interrupted run's status.json as a live owner
    (a running process's pid on this host) leaves it, then as SIGKILL leaves it (the pid gone)."""
    import os
    import subprocess

    from ufgir_cli.model.checkpoint import read_checkpoint
    from ufgir_cli.paths import RunDir, this_host
    from ufgir_cli.reproduce import load_grid

    _, snapshot = killed
    shutil.copytree(snapshot, tmp_path / "tiny")
    grid = load_grid("tiny", tmp_path)
    row = next(r for r in run_status(grid) if (r["method"], r["task"], r["phase"], r["seed"]) == ("adapter", "soygene", 2, 10))
    run = RunDir(row["run"])
    saved = read_checkpoint(run.last)["train_state"]["step"]
    record = {**run.read_status(), "state": "running", "host": this_host(), "heartbeat": 0.0, "reason": None}
    assert record["saved_step"] == saved == 1

    def shown() -> tuple[dict, str]:
        rows = {(r["method"], r["task"], r["phase"], r["seed"]): r for r in run_status(grid)}
        res = runner.invoke(app, ["reproduce", "status", "tiny", "--out", str(tmp_path)])
        assert res.exit_code == 0, res.output
        return rows, res.output

    live = subprocess.Popen(["sleep", "30"])
    try:
        run.status_file.write_text(json.dumps({**record, "pid": live.pid}))
        rows, out = shown()
        r = rows[("adapter", "soygene", 2, 10)]
        assert (r["status"], r["owner"], r["step"]) == ("running", f"{live.pid}@{this_host()}", record["step"])
        line = f"running   adapter      soygene        phase 2 lr 0.1 seed 10  running (pid {live.pid}@{this_host()}"
        assert line in out and "11 done · 1 running · 0 resumable · 0 failed · 0 pending" in out
    finally:
        live.kill()
        live.wait()
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert dead.pid != os.getpid()
    run.status_file.write_text(json.dumps({**record, "pid": dead.pid}))
    rows, out = shown()
    r = rows[("adapter", "soygene", 2, 10)]
    assert (r["status"], r["step"], r["reason"]) == ("resumable", saved, "owner gone")
    assert f"resumable adapter      soygene        phase 2 lr 0.1 seed 10  resumable (step {saved}, owner gone)" in out
    assert "11 done · 0 running · 1 resumable · 0 failed · 0 pending" in out
    finished = rows[("linear", "soygene", 2, 10)]
    assert (finished["status"], finished["detail"]) == ("done", "done")
    assert RunDir(finished["run"]).read_status()["state"] == "done"


def test_killed_grid_continues_through_submitit(killed):
    """The same killed state finished as a job array by submitit's LocalExecutor (one process per sweep)."""
    submitit = pytest.importorskip("submitit")
    _, snapshot = killed
    from ufgir_cli.reproduce import load_grid

    grid = load_grid("tiny", snapshot.parent)  # what the killed command recorded in grid.json
    ex = submitit.LocalExecutor(folder=snapshot / "submitit")
    ex.update_parameters(timeout_min=5)
    jobs = submit(grid, ex)
    assert len(jobs) == 1  # the killed sweep; the other three are finished
    wait_and_tabulate(grid, jobs)
    assert_table_is_the_runs_own(grid)
    assert not submit(grid, ex)  # nothing left to run


def test_a_sweep_job_requeues_itself_unchanged(tmp_path):
    pytest.importorskip("submitit")
    from ufgir_cli.reproduce import SweepJob

    job = SweepJob(tiny_grid(tmp_path, tmp_path).sweep("linear", "cotton80"), gpus_per_run=2)
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}


def test_soyageing_is_pooled_and_the_mean_of_its_rounds(tmp_path):
    """Made-up metrics.json files: the rounds column is the per-seed mean over rounds, then mean ± std."""
    grid = make_grid(["linear"], ["soyageing"], image_size=64, seeds=(1, 10), lrs=(0.1,),
                     overrides=parse_overrides(["model.backbone=ufgir_vit_micro_patch8_64"]), out=tmp_path)
    assert grid.tasks == ("soyageing", "soyageing_r1", "soyageing_r3", "soyageing_r4", "soyageing_r5", "soyageing_r6")
    top1 = {}
    for k, task in enumerate(grid.tasks):
        sweep = grid.sweep("linear", task)
        runs = []
        for seed in grid.seeds:
            top1[task, seed] = 40.0 + 3 * k + seed / 10
            run = f"runs/p2_seed{seed}"
            (sweep.root / run / "eval" / "test").mkdir(parents=True)
            (sweep.root / run / "eval" / "test" / "metrics.json").write_text(
                json.dumps({"top1": top1[task, seed], "num_classes": 198}))
            runs.append({"seed": seed, "run": run})
        (sweep.root / "plan.json").write_text(json.dumps({"phase2": {"runs": runs}}))
        assert seed_top1(sweep) == {s: top1[task, s] for s in grid.seeds}
    row = cells(write_table(grid).read_text())["Linear probe"]
    pooled = [top1["soyageing", s] for s in grid.seeds]
    rounds = [statistics.mean(top1[t, s] for t in grid.tasks[1:]) for s in grid.seeds]
    for cell, values in zip(row[:2], (pooled, rounds), strict=True):
        m = statistics.mean(values)
        assert cell == f"{m:.2f} ± {statistics.stdev(values):.2f} (48.61, {m - 48.61:+.2f})"
    assert "SoyAgeing (mean of 5 rounds)" in (grid.root / "table1.md").read_text()


def test_dry_run_counts_runs_steps_and_hours(tmp_path):
    res = runner.invoke(app, ["reproduce", "--methods", "ila_pp", "--datasets", "cotton80", "--dry-run",
                              "--step-seconds", "2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    # cotton80: 80 classes x 3 train_val images; train keeps 2 per class. ila_pp: 50 epochs, batch 8.
    steps = 5 * 50 * 20 + 3 * 50 * 30
    assert re.search(rf"ila_pp\s+cotton80\s+8\s+50\s+8\s+{steps}\s+2.00\s+{steps * 2 / 3600:.1f}", res.output), res.output
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    grid = make_grid(["ila_pp", "linear"], ["cotton80"], out=tmp_path)
    rows = plan_rows(grid, {"ila_pp": StepTime(1.0, "given"), "linear": StepTime(None, "unknown")})
    assert rows[1]["hours"] is None and rows[0]["steps"] == steps


def test_step_times_say_measured_or_estimated_by_passes_and_gmacs(tmp_path):
    bench = tmp_path / "cpu.json"
    bench.write_text(json.dumps({"machine": "a test box", "date": "2026-12-05", "rows": [
        {"method": "timm", "size": 448, "batch": 8, "mode": "train", "precision": "bf16", "s_per_batch": 16.0},
        {"method": "ila_pp", "size": 448, "batch": 8, "mode": "train", "precision": "bf16", "s_per_batch": 8.0}]}))
    assert bench_step_seconds(bench, "ila_pp", 448, 16, "bf16") == 16.0
    assert bench_step_seconds(bench, "vpt_deep", 448, 8, "auto") is None  # no row of its own
    grid = make_grid(["ila_pp", "linear", "glsim", "cal"], ["cotton80"], out=tmp_path)
    t = {m: step_time(grid, m, bench) for m in grid.methods}
    assert (t["ila_pp"].how, t["ila_pp"].seconds) == ("measured", 8.0) and "a test box" in t["ila_pp"].note
    assert t["linear"].how == "estimated" and t["linear"].seconds == pytest.approx(16.0, rel=0.02)
    # GLSim trains two passes (image and crop), CAL three (image, crop, drop): not IFA's one.
    assert 1.9 < t["glsim"].seconds / t["linear"].seconds < 2.2 and 2.9 < t["cal"].seconds / t["linear"].seconds < 3.5
    assert step_time(grid, "linear", tmp_path / "none.json").how == "unknown"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"methods": ["nope"]}, "neither a packaged recipe"),
    ({"datasets": ["cotton80", "nope"]}, "--datasets"),
    ({"overrides": {"data": {"dataset": "x"}}}, "data.dataset"),
    ({"name": "../x"}, "--name"),
])
def test_bad_grids_fail_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        make_grid(**kwargs, out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_default_rows_are_the_papers_methods():
    from ufgir_cli.reproduce import PAPER_METHODS

    assert set(PAPER_METHODS) == {"linear", "vpt_shallow", "vpt_deep", "adapter", "convpass", "ifa", "mpncov", "glsim", "rams",
                                  "transfg", "ffvt", "cal", "simtrans", "ila_plus", "ila_pp", "clca", "clca_keep07"}
