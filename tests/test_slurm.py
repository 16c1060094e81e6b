"""The Slurm launcher without a cluster: what a job asks sbatch for, how many requeues it may have,
what it does on the time-limit signal and on SIGTERM, what `status` makes of Slurm's states and
logs, and one-line errors. ``sbatch``, ``srun`` and ``sacct`` are stand-in scripts on PATH that
submitit calls as it would call Slurm's; `make test-slurm` runs the real thing
(tests/test_slurm_cluster.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.errors import LaunchError, OptionError, TrainingError
from ufgir_cli.paths import RunDir
from ufgir_cli.recipe import parse_overrides
from ufgir_cli.reproduce import StepTime, load_grid, longest_sweep_hours, make_grid, plan_rows
from ufgir_cli.reproduce.slurm import (
    UNKNOWN_PLAN_REQUEUES,
    JobInfo,
    SlurmOptions,
    assigned_gpus,
    job_kind,
    log_cause,
    parse_sbatch,
    planned_requeues,
    sbatch_parameters,
    with_jobs,
)

submitit = pytest.importorskip("submitit")
runner = CliRunner()
DATASETS = ("cotton80", "soygene")


def sets(data_root) -> list[str]:
    return [f"data.root={data_root}", "data.num_workers=0", "model.backbone=ufgir_vit_micro_patch8_64",
            "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "model.layer_norm_eps=1e-6", "train.epochs=1",
            "train.batch_size=8", "train.precision=fp32", "schedule.warmup_steps=2", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from ufgir_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(DATASETS):
        generate_synthetic(root / name, num_classes=4, train_val=6, test=4, size=64, seed=seed)
    return root


def grid_args(data_root, out, *extra) -> list[str]:
    args = ["reproduce", "--methods", "linear", "--datasets", ",".join(DATASETS), "--image-size", "64", "--seeds",
            "1,10", "--lr", "0.1", "--name", "g", "--out", str(out), "--launcher", "slurm", *extra]
    for s in sets(data_root):
        args += ["--set", s]
    return args


def render(params: dict) -> list[str]:
    """The sbatch file submitit writes for these parameters (its own writer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="true", folder="/jobs", **params).splitlines()


# ---- what a job asks for ------------------------------------------------------------------------


def test_a_cpu_job_asks_for_no_gpu_and_the_cpus_its_loaders_use():
    params = sbatch_parameters(SlurmOptions(time_min=90), name="ufgir-g", cpus_per_task=5, n_jobs=4)
    lines = render(params)
    assert "#SBATCH --cpus-per-task=5" in lines and "#SBATCH --time=90" in lines
    assert not [ln for ln in lines if "gpu" in ln or "gres" in ln], lines
    assert not [ln for ln in lines if "--partition" in ln or "--mem" in ln or "--qos" in ln]  # the cluster's defaults
    assert "#SBATCH --signal=USR2@90" in lines and "#SBATCH --array=0-3%4" not in lines  # one job: no array here


def test_gpus_type_qos_constraint_memory_and_extra_options_reach_sbatch():
    opts = SlurmOptions(partition="a100", account="lab", qos="high", constraint="a100|h100", time_min=1440, gpus=2,
                        gpu_type="a100", mem="64G", sbatch=("--mail-type=END", "exclusive", "comment=table 1"))
    lines = render({**sbatch_parameters(opts, name="ufgir-g", cpus_per_task=10, n_jobs=3), "map_count": 3})
    for want in ("--gres=gpu:a100:2", "--partition=a100", "--account=lab", "--qos=high", "--constraint='a100|h100'",
                 "--mem=64G", "--mail-type=END", "--exclusive", "--comment='table 1'", "--cpus-per-task=10",
                 "--array=0-2%3", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {want}" in lines, (want, lines)
    assert not [ln for ln in lines if "gpus-per-node" in ln]
    assert "gpu:1" in sbatch_parameters(SlurmOptions(gpus=1), name="n", cpus_per_task=1, n_jobs=1)["gres"]


@pytest.mark.parametrize(("items", "match"), [
    (["time=10"], "--sbatch time: use --time"),
    (["gres=gpu:1"], "use --gpus-per-run / --gpu-type"),
    (["output=x.log"], "ufgir and submitit set it"),
    (["mail type=END"], "key=value or a bare flag"),
    (["mail-type="], "key=value or a bare flag"),
])
def test_sbatch_options_that_ufgir_sets_or_cannot_read_are_refused(items, match):
    with pytest.raises(OptionError, match=match):
        parse_sbatch(items)


def test_a_gpu_type_needs_a_gpu_count():
    with pytest.raises(OptionError, match="--gpu-type: give --gpus-per-run"):
        sbatch_parameters(SlurmOptions(gpu_type="a100"), name="n", cpus_per_task=1, n_jobs=1)


def test_requeues_follow_the_planned_hours_and_the_time_limit():
    # 100 h, 24 h jobs: 1437.5 training minutes each; 100 h x 1.25 = 7500 min -> 6 jobs -> 5 requeues + 2 spare
    assert planned_requeues(100.0, 1440) == 7
    assert planned_requeues(100.0, 240) == 33  # 7500 / 237.5 -> 32 jobs
    assert planned_requeues(0.5, 1440) == 2  # one job is enough: the spare ones only
    assert planned_requeues(None, 1440) == UNKNOWN_PLAN_REQUEUES
    assert planned_requeues(10.0, 3) == 751  # 750 min over jobs of 3 min that train 30 s, counted as 1 min


def test_a_job_of_several_gpus_keeps_the_gpus_slurm_assigned():
    assert assigned_gpus(1, {"CUDA_VISIBLE_DEVICES": "3"}) is None  # in-process: torch sees Slurm's GPU
    assert assigned_gpus(2, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2,3"]  # a second job on the node: not 0,1
    assert assigned_gpus(2, {}) == ["0,1"]  # Slurm set nothing: every GPU of the node is visible
    with pytest.raises(TrainingError, match="GPUs 2 .*fewer than --gpus-per-run 2"):
        assigned_gpus(2, {"CUDA_VISIBLE_DEVICES": "2"})


# ---- Slurm's word and the job's logs ----------------------------------------------------------------


@pytest.mark.parametrize(("state", "started", "kind"), [
    ("PENDING", False, "queued"), ("PENDING", True, "requeued"), ("REQUEUED", True, "requeued"),
    ("PREEMPTED", True, "requeued"), ("RUNNING", True, "running"), ("COMPLETING", True, "running"),
    ("COMPLETED", True, "completed"), ("CANCELLED by 0", False, "cancelled"), ("CANCELLED", True, "cancelled"),
    ("FAILED", True, "failed"), ("TIMEOUT", True, "failed"), ("OUT_OF_MEMORY", True, "failed"),
    ("NODE_FAIL", True, "failed"), ("UNKNOWN", False, "unknown"), ("", False, "unknown"),
])
def test_slurm_states_map_to_what_status_shows(state, started, kind):
    assert job_kind(state, started) == kind


def test_the_cause_is_the_telling_line_of_the_error_log():
    traceback = """submitit INFO (2026-01-01 10:00:00,000) - Starting with JobEnvironment(job_id=7)
Traceback (most recent call last):
  File "/x/submitit/core/_submit.py", line 11, in <module>
    raise error
ufgir_cli.errors.DatasetError: dataset folder /d/cotton80 has no splits/train.csv; run `ufgir download cotton80`
submitit ERROR (2026-01-01 10:00:01,000) - Submitted job triggered an exception
"""
    assert log_cause(traceback).startswith("DatasetError: dataset folder /d/cotton80 has no splits/train.csv")
    oom = "some output\nslurmstepd: error: Detected 1 oom_kill event in StepId=7.0. Some of the step tasks have been " \
          "OOM Killed.\nsrun: error: node1: task 0: Out Of Memory\n"
    assert log_cause(oom) == "srun: error: node1: task 0: Out Of Memory"
    limit = "slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T10:00:00 DUE TO TIME LIMIT ***\n"
    assert "DUE TO TIME LIMIT" in log_cause(limit)
    assert log_cause("just words\n\n") == "just words" and log_cause("") is None
    assert log_cause("submitit WARNING (x) - Bypassing signal SIGTERM\n") is None


def test_status_rows_take_the_job_that_explains_them():
    rows = [{"method": "linear", "task": t, "status": s, "detail": s, "step": step, "reason": None}
            for t, s, step in (("cotton80", "done", 9), ("soygene", "resumable", 4), ("soylocal", "pending", None),
                               ("soyglobal", "pending", None), ("cub", "pending", None))]
    jobs = {("linear", "cotton80"): JobInfo("linear", "cotton80", "7_0", kind="completed", state="COMPLETED"),
            ("linear", "soygene"): JobInfo("linear", "soygene", "7_1", kind="requeued", state="PENDING"),
            ("linear", "soylocal"): JobInfo("linear", "soylocal", "7_2", kind="failed", state="FAILED",
                                            cause="DatasetError: no splits", log="/l/7_2_0_log.err"),
            ("linear", "soyglobal"): JobInfo("linear", "soyglobal", "7_3", kind="cancelled", state="CANCELLED by 0",
                                             cause="by uid 0")}
    out = {r["task"]: r for r in with_jobs(rows, jobs)}
    assert (out["cotton80"]["status"], out["cotton80"]["detail"], out["cotton80"]["job"]) == ("done", "done", "7_0")
    assert (out["soygene"]["status"], out["soygene"]["detail"]) == ("requeued", "requeued (job 7_1, step 4)")
    assert out["soylocal"]["detail"] == "failed (job 7_2: DatasetError: no splits) (log: /l/7_2_0_log.err)"
    assert out["soyglobal"]["detail"] == "cancelled (job 7_3: by uid 0)"
    assert out["cub"] == rows[4]  # never submitted: pending, as its folder says


# ---- submitting, with stand-ins for sbatch, srun and sacct ------------------------------------------


def fake_slurm(bin_dir: Path, *, sbatch_error: str | None = None, states: dict[str, str] | None = None) -> Path:
    """``sbatch`` that answers "Submitted batch job 4242" (or fails with ``sbatch_error``) and keeps the
    script it was given; ``srun`` that exists; ``sacct`` that prints ``states``."""
    bin_dir.mkdir(exist_ok=True)
    script = {"sbatch": (f'echo "sbatch: error: {sbatch_error}" >&2; exit 1' if sbatch_error else
                         f'cp "$1" {bin_dir}/last.sbatch; echo "Submitted batch job 4242"'),
              "srun": "exit 0",
              "sacct": "echo 'JobID|State|NodeList'" + "".join(f"; echo '{j}|{s}|node1'" for j, s in (states or {}).items())}
    for name, body in script.items():
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_submission_records_its_jobs_and_status_asks_slurm(data_root, tmp_path, monkeypatch):
    bins = fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bins}{os.pathsep}{os.environ['PATH']}")
    res = runner.invoke(app, grid_args(data_root, tmp_path / "r", "--no-wait", "--time", "120", "--step-seconds", "1",
                                       "--qos", "normal"))
    assert res.exit_code == 0, res.output
    # the plan counts the catalog's images: SoyGene's sweep, 1 epoch of 1 lr + 2 seeds at batch 8, is the longest
    grid = load_grid("g", tmp_path / "r")
    one = {"linear": StepTime(1.0, "given")}
    hours = longest_sweep_hours(grid, one)
    assert hours == max(r["steps"] for r in plan_rows(grid, one)) / 3600 and 1 < hours < 2
    assert "submitted 2 job(s) as array 4242: partition (default), 1 CPUs, no GPU, 2:00 h per job, up to " \
           f"{planned_requeues(hours, 120)} requeues at the time limit (longest sweep {hours:.1f} h planned)" in res.output
    assert planned_requeues(hours, 120) == 2
    assert "`ufgir reproduce table g` writes" in res.output
    sbatch = (bins / "last.sbatch").read_text().splitlines()
    assert "#SBATCH --qos=normal" in sbatch and "#SBATCH --cpus-per-task=1" in sbatch
    assert not [ln for ln in sbatch if "gpu" in ln or "gres" in ln]
    jobs = json.loads((tmp_path / "r" / "g" / "jobs.json").read_text())["jobs"]
    assert [(j["task"], j["job_id"], j["cluster"]) for j in jobs] == [("cotton80", "4242_0", "SlurmJob"),
                                                                     ("soygene", "4242_1", "SlurmJob")]
    pickled = submitit.SlurmJob(folder=jobs[1]["folder"], job_id="4242_1").submission()
    assert pickled.function.sweep.name == "linear_soygene" and pickled._timeout_countdown == 2  # the requeues

    # Slurm says: the first queued, the second ran once and waits again (requeued: its log exists)
    Path(jobs[1]["folder"]).mkdir(parents=True, exist_ok=True)
    (Path(jobs[1]["folder"]) / "4242_1_0_log.out").write_text("submitit INFO - Starting\n")
    fake_slurm(bins, states={"4242_0": "PENDING", "4242_1": "PENDING"})
    res = runner.invoke(app, ["reproduce", "status", "g", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert res.output.count("queued    linear       cotton80") == 3 and "queued (job 4242_0)" in res.output
    assert res.output.count("requeued  linear       soygene") == 3 and "requeued (job 4242_1)" in res.output
    assert "0 done · 0 running · 0 resumable · 0 failed · 0 pending · 3 queued · 3 requeued" in res.output

    # the same command again: Slurm still holds both, nothing is submitted twice
    res = runner.invoke(app, grid_args(data_root, tmp_path / "r", "--no-wait", "--time", "120"))
    assert res.exit_code == 0 and "job(s) as array" not in res.output, res.output
    assert "linear on cotton80: job 4242_0 is queued; not submitted again" in res.output

    # a queued array task cancelled: Slurm drops it from the array's record and keeps none of its own
    fake_slurm(bins, states={"4242_0": "PENDING"})
    res = runner.invoke(app, ["reproduce", "status", "g", "--out", str(tmp_path / "r")])
    assert res.output.count("queued (job 4242_0)") == 3, res.output
    assert res.output.count("cancelled (job 4242_1: before it started)") == 3, res.output

    # cancelled and failed: the cause from the job's error log, and where the log is
    err = Path(jobs[1]["folder"]) / "4242_1_0_log.err"
    err.write_text("Traceback (most recent call last):\nOSError: [Errno 28] No space left on device\n"
                   "srun: error: node1: task 0: Exited with exit code 1\n")
    fake_slurm(bins, states={"4242_0": "CANCELLED by 1000", "4242_1": "FAILED"})
    res = runner.invoke(app, ["reproduce", "status", "g", "--out", str(tmp_path / "r"), "--json"])
    rows = json.loads(res.output)
    assert Counter(r["status"] for r in rows) == {"cancelled": 3, "failed": 3}
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["job"] == "4242_1" and failed["job_state"] == "FAILED"
    assert failed["detail"] == f"failed (job 4242_1: srun: error: node1: task 0: Exited with exit code 1) (log: {err})"
    assert next(r for r in rows if r["status"] == "cancelled")["reason"] == "by uid 1000"

    # --no-wait's table: from the runs as they are (none finished: every cell "-")
    res = runner.invoke(app, ["reproduce", "table", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "0 of 2 cells with every seed" in res.output
    assert "| Linear probe | `ufgir_vit_micro_patch8_64` | - (39.03, -) | - (21.31, -) |" in (tmp_path / "r" / "g" / "table1.md").read_text()


def test_waiting_ends_for_a_task_cancelled_before_it_started(data_root, tmp_path, monkeypatch):
    """sacct no longer lists it, which submitit's waiting alone would take as "not done yet", forever."""
    from submitit.core.utils import cloudpickle_dump

    from ufgir_cli.reproduce import slurm_executor, submit, wait_and_tabulate

    bins = fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bins}{os.pathsep}{os.environ['PATH']}")
    grid = make_grid(["linear"], DATASETS, image_size=64, seeds=(1,), lrs=(0.1,), overrides=parse_overrides(sets(data_root)),
                     name="w", out=tmp_path)
    jobs = submit(grid, slurm_executor(grid, SlurmOptions(max_requeues=0)))
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1"]
    jobs[0].paths.result_pickle.parent.mkdir(parents=True, exist_ok=True)
    cloudpickle_dump(("success", {}), jobs[0].paths.result_pickle)  # the first finished
    fake_slurm(bins, states={"4242_0": "COMPLETED"})  # the second is gone from sacct
    with pytest.raises(TrainingError) as e:
        wait_and_tabulate(grid, jobs, poll_s=0.05, vanished_every_s=0)
    assert str(e.value).splitlines()[1] == "job 4242_1 (linear on soygene): cancelled before it started"


def test_ctrl_c_stops_the_waiting_not_the_jobs(tmp_path):
    from ufgir_cli.reproduce import wait_and_tabulate

    class Waiting:
        job_id = "7_0"

        def done(self):
            raise KeyboardInterrupt

    grid = make_grid(["linear"], ["cotton80"], image_size=64, name="c", out=tmp_path,
                     overrides=parse_overrides(["model.backbone=ufgir_vit_micro_patch8_64"]))
    with pytest.raises(TrainingError) as e:
        wait_and_tabulate(grid, [Waiting()])
    assert e.value.exit_code == 130
    assert str(e.value) == ("stopped waiting; the jobs go on in Slurm. Follow them with `ufgir reproduce status c`, "
                            "and once they are done write the table with `ufgir reproduce table c`")
    assert not (grid.root / "table1.md").exists()


def test_a_refused_submission_is_one_line(data_root, tmp_path, monkeypatch):
    bins = fake_slurm(tmp_path / "bin", sbatch_error="Batch job submission failed: Invalid generic resource (gres) "
                                                      "specification")
    monkeypatch.setenv("PATH", f"{bins}{os.pathsep}{os.environ['PATH']}")
    res = runner.invoke(app, grid_args(data_root, tmp_path / "r", "--gpus-per-run", "1"))
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1] == "error: Slurm refused the jobs: Batch job submission failed: Invalid generic resource (gres) " \
                        "specification", res.output
    assert not [ln for ln in lines if "Traceback" in ln or "sbatch: error" in ln]
    assert not (tmp_path / "r" / "g" / "jobs.json").exists()
    with pytest.raises(LaunchError, match="--launcher slurm: Could not detect \"srun\""):
        from ufgir_cli.reproduce import slurm_executor

        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        slurm_executor(make_grid(["linear"], ["cotton80"], image_size=64, overrides=parse_overrides(sets(data_root)),
                                 out=tmp_path), SlurmOptions())


def test_a_failed_job_is_reported_with_its_cause_and_log(data_root, tmp_path):
    """A sweep whose data went missing fails inside its job (submitit's local executor runs the job in a
    process of its own); waiting reports it in one line with the cause and the log, after the table."""
    import shutil

    from ufgir_cli.reproduce import submit, wait_and_tabulate

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    grid = make_grid(["linear"], ["cotton80"], image_size=64, seeds=(1,), lrs=(0.1,),
                     overrides=parse_overrides(sets(data)), name="f", out=tmp_path)
    shutil.rmtree(data / "cotton80" / "splits")
    ex = submitit.LocalExecutor(folder=grid.root / "submitit" / "%j")
    ex.update_parameters(timeout_min=5)
    jobs = submit(grid, ex)
    with pytest.raises(TrainingError) as e:
        wait_and_tabulate(grid, jobs)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("1 job(s) of f failed") and len(lines) == 2
    assert lines[1].startswith(f"job {jobs[0].job_id} (linear on cotton80): DatasetError: ")
    assert lines[1].endswith(f"(log: {jobs[0].paths.stderr})")
    assert (grid.root / "table1.md").is_file()  # the table of what finished (nothing) is still written


# ---- inside the job: the time limit and SIGTERM ---------------------------------------------------


class SignalAt(Callback):
    """Sends ``sig`` to this process after step ``step`` of the phase-1 run, as Slurm would."""

    def __init__(self, sig: int, step: int):
        self.sig, self.step = sig, step

    def on_step(self, step, logs):
        if step == self.step:
            os.kill(os.getpid(), self.sig)


def tb_steps(run: Path) -> Counter:
    """How often each step's ``train/loss`` was written, over every TensorBoard file of the run: a
    step trained twice (work lost at a stop and redone) shows twice, even where TensorBoard's purge
    marker hides it from the viewer."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen: Counter = Counter()
    for f in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            seen.update(event.step for v in event.summary.value if v.tag == "train/loss")
    return seen


@pytest.fixture
def sweep_job(small_synthetic, tmp_path, monkeypatch):
    """A SweepJob of one lr and one seed (phase 1: 2 epochs of 2 steps), whose phase-1 run gets a signal."""
    from ufgir_cli.reproduce import launch
    from ufgir_cli.sweep import make_sweep, run_sweep

    over = parse_overrides([f"data.root={small_synthetic}", "data.num_workers=0", "train.epochs=2", "train.batch_size=8",
                            "schedule.warmup_steps=2", "logging.log_every=1", "eval.every=0"])
    sweep = make_sweep("quickstart", over, lrs=(0.1,), seeds=(1,), out=tmp_path)

    def signalled(sig, step=3, between=False):
        def run(sweep, gpus=None):
            def event(kind, run, info):
                if between and kind == "finished":
                    os.kill(os.getpid(), sig)
            return run_sweep(sweep, gpus=gpus, on_event=event,
                             callbacks=lambda run: [SignalAt(sig, step)] if run.phase == 1 and not between else [])
        monkeypatch.setattr(launch, "run_sweep", run)

    return launch.SweepJob(sweep), sweep, signalled


def phase1_run(sweep) -> RunDir:
    return RunDir(next((sweep.root / "runs").glob("p1_*")))


def test_the_time_limit_signal_saves_the_step_then_submitit_requeues(sweep_job, monkeypatch):
    from ufgir_cli.model.checkpoint import read_checkpoint
    from ufgir_cli.reproduce import launch
    from ufgir_cli.sweep import run_sweep

    job, sweep, signalled = sweep_job
    requeues = []

    def submitits_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        requeues.append((signum, job.checkpoint()))
        raise SystemExit(-1)  # submitit: scontrol requeue, then sys.exit(-1)

    before = signal.signal(signal.SIGUSR2, submitits_handler)
    try:
        signalled(signal.SIGUSR2, step=3)
        with pytest.raises(SystemExit) as e:
            job()
        assert e.value.code == -1 and len(requeues) == 1
        assert requeues[0][0] == signal.SIGUSR2 and requeues[0][1].function is job
        assert signal.getsignal(signal.SIGUSR2) is submitits_handler  # handed back as found
        run = phase1_run(sweep)
        status = run.status()
        assert (status.kind, status.step, status.reason) == ("resumable", 3, "stopped by SIGUSR2")
        assert read_checkpoint(run.last)["train_state"]["step"] == 3  # the step the signal came in, not an epoch end
        # the requeued job: the same object, the sweep resumes at step 3
        monkeypatch.setattr(launch, "run_sweep", run_sweep)
        report = job()
    finally:
        signal.signal(signal.SIGUSR2, before)
    p2 = RunDir(next((sweep.root / "runs").glob("p2_*")))
    assert report["top1"]["mean"] == json.loads(p2.eval_metrics("test").read_text())["top1"]  # the job's result: the sweep's
    assert tb_steps(run.root) == Counter({s: 1 for s in range(1, 5)})  # 4 steps, each trained once
    assert run.status().kind == "done"


def test_sigterm_saves_and_ends_the_job_without_a_result(sweep_job):
    """Pre-emption or `scontrol requeue`: the run saves, the job exits 143 and writes no result (Slurm
    requeues it; submitit's waiting side waits on), submitit's time-limit handler is not called."""
    job, sweep, signalled = sweep_job
    called = []
    before = signal.signal(signal.SIGUSR2, lambda *a: called.append(a))
    try:
        signalled(signal.SIGTERM, step=3)
        with pytest.raises(SystemExit) as e:
            job()
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert e.value.code == 143 and not called
    status = phase1_run(sweep).status()
    assert (status.kind, status.step, status.reason) == ("resumable", 3, "stopped by SIGTERM")


def test_a_signal_between_runs_stops_the_job_at_once(sweep_job):
    job, sweep, signalled = sweep_job
    signalled(signal.SIGTERM, between=True)  # as the phase-1 run finishes
    with pytest.raises(SystemExit) as e:
        job()
    assert e.value.code == 143
    assert phase1_run(sweep).status().kind == "done" and not list((sweep.root / "runs").glob("p2_*"))


def test_data_loader_workers_ignore_every_stop_signal():
    """Slurm signals every process of a job step; a worker killed by SIGUSR2 would crash the step
    before the main process saves."""
    from ufgir_cli.data.datasets import init_worker
    from ufgir_cli.engine.state import STOP_SIGNALS, is_stop_exit

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        init_worker(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert [is_stop_exit(rc) for rc in (130, 143, 140, -12, -15, 1, 2, 137, -9)] == [True] * 5 + [False] * 4
