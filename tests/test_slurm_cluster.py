"""`ufgir reproduce --launcher slurm` against a real Slurm: `make test-slurm` starts a single-node one
on this machine (tests/slurm/cluster.sh: munge, MariaDB + slurmdbd, slurmctld, slurmd; four stand-in
GPUs) and runs this module with ``--run-slurm``; without it every test here is skipped.

Every command is the one a user types, in a subprocess; jobs run through sbatch and srun as on a
cluster. Checked: a tiny CPU-only grid and its table; a real time limit (the job saves its step on
SIGUSR2 and submitit requeues it) and a pre-emption (``scontrol requeue``: SIGTERM, Slurm requeues)
with no step trained twice or lost (every TensorBoard event file of a run, counted raw); the states
`status` reports (queued, requeued, cancelled, failed with the cause and the log, never submitted);
a refused submission in one line; two GPU jobs on one node each on the GPUs Slurm gave it.

Slurm holds a requeued job 121 s before it may start again; where a test waits for one it lets it
start at once (``scontrol update StartTime=now``), which changes nothing the job sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from ufgir_cli.paths import RunDir

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
TINY = ("cotton80", "soygene")  # 4 classes x 6 images at 64 px: seconds per sweep
PAPER = {"cotton80": 39.03, "soygene": 21.31}  # linear probe, Table 1


def slurm(*args: str, check: bool = True) -> str:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not os.environ.get("SLURM_CONF") or subprocess.run(["scontrol", "ping"], capture_output=True).returncode:
        pytest.fail("no Slurm answers: start one with tests/slurm/cluster.sh start and export SLURM_CONF "
                    "(make test-slurm does both)")
    yield
    slurm("scancel", "--user", os.environ.get("USER", "root"), check=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny data sets, and a larger Cotton80 (4 classes x 150 images at 32 px, 240-300 steps per epoch at
    batch 2) for runs that must still be training when Slurm stops them."""
    from ufgir_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(TINY):
        generate_synthetic(root / "tiny" / name, num_classes=4, train_val=6, test=4, size=64, seed=seed)
    generate_synthetic(root / "long" / "cotton80", num_classes=4, train_val=150, test=4, size=32, seed=0)
    return root


def common_sets(root: Path) -> list[str]:
    return [f"data.root={root}", "data.num_workers=0", "model.backbone=ufgir_vit_micro_patch8_64",
            "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "model.layer_norm_eps=1e-6",
            "train.precision=fp32", "schedule.warmup_steps=2", "train.threads=1"]


def tiny_args(data: Path, out: Path, name: str, *extra: str, datasets=TINY, seeds="1,10") -> list[str]:
    sets = [*common_sets(data / "tiny"), "train.epochs=1", "train.batch_size=8", "logging.tensorboard=false"]
    return ["reproduce", "--methods", "linear", "--datasets", ",".join(datasets), "--image-size", "64", "--seeds",
            seeds, "--lr", "0.1", "--name", name, "--out", str(out), "--launcher", "slurm",
            *[a for s in sets for a in ("--set", s)], *extra]


def long_args(data: Path, out: Path, name: str, epochs: int, *extra: str) -> list[str]:
    """One sweep (lr 0.1, seed 1) on the larger Cotton80, every step logged to TensorBoard."""
    sets = [*common_sets(data / "long"), f"train.epochs={epochs}", "train.batch_size=2", "logging.log_every=1",
            "eval.every=0"]
    return ["reproduce", "--methods", "linear", "--datasets", "cotton80", "--image-size", "32", "--seeds", "1",
            "--lr", "0.1", "--name", name, "--out", str(out), "--launcher", "slurm",
            *[a for s in sets for a in ("--set", s)], *extra]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def ufgir(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ufgir_cli", *args], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=REPO)


def ufgir_bg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ufgir_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)


def status_rows(name: str, out: Path) -> list[dict]:
    res = ufgir("reproduce", "status", name, "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def jobs_of(out: Path, name: str) -> list[dict]:
    return json.loads((out / name / "jobs.json").read_text())["jobs"]


def wait_until(what: str, check, timeout: float = 300, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def release_requeued() -> list[str]:
    """Let every job that Slurm holds after a requeue (reason BeginTime) start now."""
    held = [ln.split()[0] for ln in slurm("squeue", "-h", "-t", "PD", "-o", "%i %r").splitlines()
            if ln.strip().endswith("BeginTime")]
    for job in held:
        slurm("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    return held


@contextlib.contextmanager
def requeued_jobs_start_at_once():
    stop = threading.Event()

    def loop():
        while not stop.wait(2):
            release_requeued()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def tb_steps(run: Path) -> Counter:
    """How often each step's ``train/loss`` was written over all of a run's event files: a step
    trained twice shows twice (TensorBoard's purge marker would hide it from the viewer)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen: Counter = Counter()
    for f in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            seen.update(event.step for v in event.summary.value if v.tag == "train/loss")
    return seen


def runs_of(out: Path, name: str) -> dict[str, RunDir]:
    """The sweep's run folders by phase: p1 (phase 1), p2 (phase 2)."""
    runs = sorted((out / name / "sweeps" / "linear_cotton80" / "runs").glob("p*"))
    return {r.name[:2]: RunDir(r) for r in runs}


def assert_every_step_once(run: RunDir, steps: int) -> int:
    """Every step 1..steps written exactly once; returns how many event files (segments) the run has."""
    seen = tb_steps(run.root)
    assert seen == Counter({s: 1 for s in range(1, steps + 1)}), (
        f"{run.name}: trained twice {sorted(s for s, n in seen.items() if n > 1)[:10]}, "
        f"missing {sorted(set(range(1, steps + 1)) - set(seen))[:10]}")
    return len(list(run.root.glob("events.out.tfevents.*")))


def last_step(run: RunDir) -> int:
    """The newest step in metrics.jsonl (0 before the first; a line being written is skipped)."""
    for line in reversed(run.metrics_log.read_text().splitlines() if run.metrics_log.is_file() else []):
        with contextlib.suppress(ValueError):
            return json.loads(line)["step"]
    return 0


# ---- the tests ---------------------------------------------------------------------------------


def test_a_tiny_grid_on_a_cpu_partition(data, tmp_path):
    res = ufgir(*tiny_args(data, tmp_path, "tiny", "--time", "10"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no GPU" in res.stdout and "table: " in res.stdout, res.stdout
    sbatch = next((tmp_path / "tiny" / "submitit").glob("*/*_submission.sh")).read_text()
    assert "--cpus-per-task=1" in sbatch and "gpu" not in sbatch and "gres" not in sbatch
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in (tmp_path / "tiny" / "table1.md").read_text().splitlines() if line.startswith("| Linear")}
    cells = rows["Linear probe"][2:4]  # after the method and its backbone
    for cell, task in zip(cells, TINY, strict=True):
        sweep = tmp_path / "tiny" / "sweeps" / f"linear_{task}" / "runs"
        own = [json.loads((r / "eval" / "test" / "metrics.json").read_text())["top1"] for r in sorted(sweep.glob("p2_*"))]
        mean, std = statistics.mean(own), statistics.stdev(own)
        assert cell == f"{mean:.2f} ± {std:.2f} ({PAPER[task]:.2f}, {mean - PAPER[task]:+.2f})"
    rows = status_rows("tiny", tmp_path)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    assert {(r["task"], r["job_kind"], r["job_state"]) for r in rows} == {(t, "completed", "COMPLETED") for t in TINY}
    assert {r["job"] for r in rows} == {j["job_id"] for j in jobs_of(tmp_path, "tiny")}


def test_the_time_limit_requeues_and_no_step_is_trained_twice(data, tmp_path):
    """--time 3: Slurm sends SIGUSR2 60-90 s into each job (its timer runs every 30 s); the run saves
    that step, submitit requeues the job and the next one resumes there. 30 epochs: 7200 steps on
    train, then 9000 on train_val, at 10-20 ms a step on one CPU: phase 2 alone outlasts a job, so
    at least one signal comes in the middle of a run (one between two runs saves nothing)."""
    with requeued_jobs_start_at_once():
        res = ufgir(*long_args(data, tmp_path, "limit", 30, "--time", "3"), timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    log = next((tmp_path / "limit" / "submitit").glob("*/*_0_log.out")).read_text()
    requeues = log.count("Requeued job")
    assert requeues >= 1 and "Caught signal SIGUSR2" in log and "this job is timed-out" in log, log[-3000:]
    runs = runs_of(tmp_path, "limit")
    p1, p2 = assert_every_step_once(runs["p1"], 7200), assert_every_step_once(runs["p2"], 9000)
    # a requeue in the middle of a run starts a new event file at the saved step (one between runs does not)
    assert 1 <= p1 + p2 - 2 <= requeues
    assert {RunDir(r.root).status().kind for r in runs.values()} == {"done"}
    top1 = json.loads(runs["p2"].eval_metrics("test").read_text())["top1"]
    assert f"| {top1:.2f} ± - (39.03, {top1 - 39.03:+.2f}) |" in (tmp_path / "limit" / "table1.md").read_text()
    print(f"\ntime limit: {requeues} requeue(s), {p1 + p2 - 2} in the middle of a run; 16200 steps, each trained once")


def test_a_preemption_is_not_a_failure(data, tmp_path):
    """`scontrol requeue` mid-training: SIGTERM, the run saves its step, Slurm requeues the job. The
    waiting command neither fails nor writes a table early; status says requeued; the job resumes."""
    waiting = ufgir_bg(*long_args(data, tmp_path, "preempt", 4, "--time", "30"))
    try:
        job = wait_until("the job", lambda: (tmp_path / "preempt" / "jobs.json").is_file()
                         and jobs_of(tmp_path, "preempt")[0]["job_id"], timeout=120)
        p1 = wait_until("training", lambda: runs_of(tmp_path, "preempt").get("p1"), timeout=120)
        wait_until("step 300", lambda: last_step(p1) >= 300, timeout=120, every=0.2)
        row = next(r for r in status_rows("preempt", tmp_path) if r["phase"] == 1)
        assert row["status"] == "running" and row["detail"].endswith(f"· job {job} running"), row
        slurm("scontrol", "requeue", job)
        wait_until("the requeued job held", lambda: "BeginTime" in slurm("squeue", "-h", "-j", job, "-o", "%r"))
        status = p1.status()
        assert (status.kind, status.reason) == ("resumable", "stopped by SIGTERM")
        saved = status.step
        assert saved >= 300 and tb_steps(p1.root) == Counter({s: 1 for s in range(1, saved + 1)})  # saved where it stopped
        row = next(r for r in status_rows("preempt", tmp_path) if r["phase"] == 1)
        assert (row["status"], row["job"], row["step"]) == ("requeued", job, saved), row
        assert row["detail"] == f"requeued (job {job}, step {saved})"
        assert waiting.poll() is None and not (tmp_path / "preempt" / "table1.md").exists()
        release_requeued()
        out, err = waiting.communicate(timeout=600)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, out + err
    runs = runs_of(tmp_path, "preempt")
    assert assert_every_step_once(runs["p1"], 960) == 2 and assert_every_step_once(runs["p2"], 1200) == 1
    table = tmp_path / "preempt" / "table1.md"
    assert table.stat().st_mtime >= runs["p2"].eval_metrics("test").stat().st_mtime  # written once all was done
    assert " - ± -" not in table.read_text()
    print(f"\npre-emption at step {saved}, resumed there")


def test_status_of_queued_cancelled_and_never_submitted_jobs(data, tmp_path):
    from ufgir_cli.recipe import parse_overrides
    from ufgir_cli.reproduce import make_grid
    from ufgir_cli.reproduce.grid import write_grid

    write_grid(make_grid(["linear"], ["cotton80"], image_size=64, seeds=(1,), lrs=(0.1,), name="never", out=tmp_path,
                         overrides=parse_overrides(common_sets(data / "tiny"))))
    rows = status_rows("never", tmp_path)
    assert [(r["status"], r.get("job")) for r in rows] == [("pending", None), ("pending", None)]

    res = ufgir(*tiny_args(data, tmp_path, "held", "--sbatch", "hold", "--no-wait", "--time", "10"))
    assert res.returncode == 0, res.stderr
    assert "`ufgir reproduce table held` writes" in res.stdout
    jobs = {j["task"]: j["job_id"] for j in jobs_of(tmp_path, "held")}
    slurm("scancel", jobs["soygene"])  # a queued array task: Slurm keeps no record of it
    shown: list = []

    def cancelled():
        shown.append(ufgir("reproduce", "status", "held", "--out", str(tmp_path)))
        return "cancelled" in shown[-1].stdout

    with contextlib.suppress(AssertionError):  # sacct shows it after seconds, at times a minute or two
        wait_until("the cancellation", cancelled, timeout=240, every=3)
    res = shown[-1]
    assert res.stdout.count(f"queued (job {jobs['cotton80']})") == 3, res.stdout
    assert res.stdout.count(f"cancelled (job {jobs['soygene']}: before it started)") == 3, res.stdout
    assert "0 done · 0 running · 0 resumable · 0 failed · 0 pending · 3 queued · 3 cancelled" in res.stdout
    # the same command again: the queued sweep is not submitted twice; the cancelled one is
    res = ufgir(*tiny_args(data, tmp_path, "held", "--sbatch", "hold", "--no-wait", "--time", "10"))
    assert res.returncode == 0, res.stderr
    assert f"linear on cotton80: job {jobs['cotton80']} is queued; not submitted again" in res.stdout
    assert "submitted 1 job(s)" in res.stdout
    slurm("scancel", jobs["cotton80"].split("_")[0])


def test_a_failed_job_shows_its_cause_and_log(data, tmp_path):
    """The job is held, its data removed, then released: the waiting command exits 1 with one line
    for the job (the exception from the job's log, and the log's path); status shows the same."""
    root = tmp_path / "data"
    shutil.copytree(data / "tiny", root / "tiny")
    waiting = ufgir_bg(*tiny_args(root, tmp_path, "broken", "--sbatch", "hold", "--time", "10",
                                  datasets=("cotton80",), seeds="1"))
    try:
        job = wait_until("the job", lambda: (tmp_path / "broken" / "jobs.json").is_file()
                         and jobs_of(tmp_path, "broken")[0]["job_id"], timeout=120)
        shutil.rmtree(root / "tiny" / "cotton80" / "splits")
        slurm("scontrol", "release", job)
        out, err = waiting.communicate(timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    log = next((tmp_path / "broken" / "submitit").glob(f"{job}/{job}_0_log.err"))
    assert lines[0].startswith("error: 1 job(s) of broken failed") and len(lines) == 2, err
    assert lines[1].startswith(f"job {job} (linear on cotton80): DatasetError: ") and lines[1].endswith(f"(log: {log})")
    rows = status_rows("broken", tmp_path)
    assert {r["status"] for r in rows} == {"failed"}
    assert all(r["detail"].startswith(f"failed (job {job}: DatasetError: ") for r in rows)


@pytest.mark.parametrize(("ask", "said"), [
    ("partition", "Slurm refused the jobs: Batch job submission failed: Invalid partition name specified"),
    ("cpus", "Slurm refused the jobs: Batch job submission failed: More processors requested than permitted"),
])
def test_a_refused_submission_is_one_line(data, tmp_path, ask, said):
    node_cpus = int(slurm("sinfo", "-h", "-N", "-o", "%c").split()[0])
    extra = ("--partition", "nope") if ask == "partition" else ("--cpus-per-task", str(node_cpus + 1))
    res = ufgir(*tiny_args(data, tmp_path, "refused", *extra))
    assert res.returncode == 2, res.stdout + res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [f"error: {said}"]


def test_gpu_jobs_keep_the_gpus_slurm_assigned(data, tmp_path):
    """Two sweeps of runs of 2 GPUs each on the 4 stand-in GPUs, at once: one job gets GPUs 0,1, the
    other 2,3, and each run (torchrun, 2 processes, CPU here) sees the job's own."""
    res = ufgir(*tiny_args(data, tmp_path, "gpus", "--partition", "gpu", "--gpus-per-run", "2", "--cpus-per-task",
                           "1", "--time", "10", seeds="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 GPUs" in res.stdout
    seen = {}
    for prov in (tmp_path / "gpus" / "sweeps").glob("*/runs/*/provenance.json"):
        hw = json.loads(prov.read_text())["hardware"]
        seen.setdefault(hw["slurm_job_id"], set()).add(hw["cuda_visible_devices"])
    assert sorted(tuple(v) for v in seen.values()) == [("0,1",), ("2,3",)], seen
