"""Slurm through submitit: what a job asks for, what it does when Slurm stops it, what Slurm says of it.

**The request.** One array task per sweep; each runs its sweep's runs one after another on one node.
A job asks for GPUs only when told to (``gpus``, with an optional type: ``--gres=gpu[:type]:N``), so
it fits a CPU partition; CPUs per task default to what the recipes' data loaders use (their
``data.num_workers`` + 1, per GPU), memory to the partition's default. Anything else is an extra
sbatch option.

**The stops.** Slurm warns a job ahead of its time limit with SIGUSR2 (submitit asks for
``--signal=USR2@90``) and pre-empts, requeues (``scontrol requeue``) or cancels it with SIGTERM. A
training run catches both (`engine.state.STOP_SIGNALS`): it finishes its step, saves, and the sweep
stops. Then the job (`JobSignals.stop`)

- at the time limit: hands over to submitit, which requeues it (``scontrol requeue``) with one fewer
  time-outs left; the requeued job runs the same sweep, which resumes at the saved step;
- on SIGTERM: exits without a result. Slurm requeues a pre-empted job itself, and a waiting
  ``ufgir reproduce`` goes on waiting for it; a cancelled job ends as cancelled.

Between runs (an evaluation, a report) there is nothing unsaved, and either signal stops the sweep
at once. How many time-outs a job may have is derived from the planned hours (`planned_requeues`).

**The answers.** ``jobs.json`` in the grid's folder records which job runs which sweep. `job_states`
asks Slurm through submitit (one ``sacct`` call) and reads the job's logs: queued, running,
requeued, completed, cancelled or failed, with the cause of a failure (the last telling line of the
job's error log) and the log's path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LaunchError, OptionError, TrainingError
from ..io import atomic_write_json

#: sbatch options that submitit or ufgir set themselves: an --sbatch of one of these is refused,
#: naming the option that sets it where there is one.
OWN_SBATCH = {"output": None, "error": None, "array": None, "signal": None, "open-mode": None, "wrap": None,
              "job-name": None, "time": "--time", "partition": "--partition", "account": "--account",
              "qos": "--qos", "constraint": "--constraint", "mem": "--mem", "cpus-per-task": "--cpus-per-task",
              "gres": "--gpus-per-run / --gpu-type", "gpus": "--gpus-per-run", "gpus-per-node": "--gpus-per-run",
              "nodes": None, "ntasks-per-node": None, "ntasks": None}
#: Time-outs allowed beyond what the plan needs, for evaluation, start-up and estimates that are off.
REQUEUE_MARGIN = 2
#: Planned hours are scaled by this before dividing them into jobs (the same reasons).
HOURS_SLACK = 1.25
#: Time-outs allowed when the plan has no step times (no ``--step-seconds`` and no bench file).
UNKNOWN_PLAN_REQUEUES = 20
#: Minutes of a job that are not training: interpreter, torch, data and model set-up.
JOB_START_MIN = 1.0
JOBS_FILE = "jobs.json"
#: What status shows for a job, from Slurm's state (sacct) and whether it ever started.
JOB_KINDS = ("queued", "running", "requeued", "completed", "cancelled", "failed", "unknown")


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks Slurm for. ``gpus`` = 0 is a CPU job; ``cpus_per_task``,
    ``max_requeues`` None: derived (`sbatch_parameters`, `planned_requeues`); ``sbatch``: extra
    options as ``key=value`` or ``flag`` (a leading ``--`` is allowed)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 1440
    gpus: int = 0
    gpu_type: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    max_requeues: int | None = None
    sbatch: tuple[str, ...] = ()
    parallel: int | None = None
    signal_delay_s: int = 90


def parse_sbatch(items: tuple[str, ...] | list[str]) -> dict:
    """``--sbatch`` values as submitit's ``additional_parameters``: ``mail-type=END`` ->
    {"mail-type": "END"}, ``exclusive`` -> {"exclusive": True}. Options ufgir or submitit set are refused."""
    out: dict = {}
    for item in items:
        key, eq, value = item.strip().removeprefix("--").partition("=")
        key = key.strip().replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (eq and not value.strip()):
            raise OptionError(f"--sbatch {item!r}: give an sbatch option as key=value or a bare flag, e.g. "
                              "--sbatch mail-type=END --sbatch exclusive")
        if key in OWN_SBATCH:
            how = f"use {OWN_SBATCH[key]}" if OWN_SBATCH[key] else "ufgir and submitit set it"
            raise OptionError(f"--sbatch {key}: {how}")
        out[key] = value.strip() if eq else True
    return out


def default_cpus(num_workers: int, gpus: int) -> int:
    """CPUs per task when not given: the data loader's workers plus the process that trains, per GPU."""
    return (num_workers + 1) * max(gpus, 1)


def planned_requeues(hours: float | None, time_min: int, signal_delay_s: int = 90) -> int:
    """Time-outs one job may have: its sweep's planned hours (times HOURS_SLACK) over the minutes of
    one job that train (the limit less the warning and JOB_START_MIN), less the first job, plus
    REQUEUE_MARGIN. UNKNOWN_PLAN_REQUEUES when the hours are unknown. A pre-emption does not count
    (submitit counts only the signals that come near the time limit)."""
    if hours is None:
        return UNKNOWN_PLAN_REQUEUES
    work_min = max(time_min - signal_delay_s / 60 - JOB_START_MIN, 1.0)
    jobs = max(math.ceil(hours * HOURS_SLACK * 60 / work_min), 1)
    return jobs - 1 + REQUEUE_MARGIN


def sbatch_parameters(opts: SlurmOptions, *, name: str, cpus_per_task: int, n_jobs: int) -> dict:
    """The submitit ``SlurmExecutor`` parameters of one array task: one node, one task, GPUs only
    when asked (``--gres=gpu[:type]:N``, which both of Slurm's consumable-resource plugins read)."""
    if opts.gpu_type and not opts.gpus:
        raise OptionError("--gpu-type: give --gpus-per-run too (a job asks for GPUs only when told how many)")
    params = {"job_name": name, "time": int(opts.time_min), "nodes": 1, "ntasks_per_node": 1,
              "cpus_per_task": int(cpus_per_task), "array_parallelism": opts.parallel or n_jobs,
              "signal_delay_s": opts.signal_delay_s}
    if opts.gpus:
        params["gres"] = f"gpu:{opts.gpu_type}:{opts.gpus}" if opts.gpu_type else f"gpu:{opts.gpus}"
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    extra = parse_sbatch(opts.sbatch)
    if extra:
        params["additional_parameters"] = extra
    return params


def describe_request(params: dict, max_requeues: int, hours: float | None) -> str:
    """One line: what each job asks for and how often it may be requeued at its time limit."""
    gpus = "no GPU"
    if "gres" in params:  # gpu:N or gpu:TYPE:N
        *kind, count = params["gres"].split(":")[1:]
        gpus = " ".join([count, *kind, "GPU" if count == "1" else "GPUs"])
    parts = [f"partition {params.get('partition', '(default)')}", f"{params['cpus_per_task']} CPUs", gpus]
    if "mem" in params:
        parts.append(f"{params['mem']} memory")
    h, m = divmod(params["time"], 60)
    parts.append(f"{h}:{m:02d} h per job")
    why = (f"longest sweep {hours:.1f} h planned" if hours is not None
           else "planned hours unknown: give --step-seconds or --max-requeues")
    parts.append(f"up to {max_requeues} requeues at the time limit ({why})")
    return ", ".join(parts)


# ---- inside the job ---------------------------------------------------------------------------


class JobStopped(BaseException):  # noqa: N818 - like KeyboardInterrupt: passes every `except Exception`
    """SIGTERM or the time-limit signal between training runs: nothing is unsaved, the sweep stops."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def time_limit_signal() -> int:
    """The signal Slurm sends ahead of the time limit: submitit's (SIGUSR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    import submitit

    return int(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))


class JobSignals:
    """``with JobSignals() as signals:`` around a sweep inside a submitit job. SIGTERM and the time-limit
    signal raise `JobStopped` while no training run holds them (a run's own handlers save first and
    raise `Interrupted`); :meth:`stop` then ends the job the way Slurm expects."""

    def __init__(self, time_limit: int | None = None):
        self.time_limit = time_limit_signal() if time_limit is None else time_limit
        self.old: dict = {}

    def __enter__(self) -> JobSignals:
        if threading.current_thread() is threading.main_thread():
            for s in {signal.SIGTERM, self.time_limit}:
                self.old[s] = signal.signal(s, self._raise)
        return self

    def _raise(self, signum, frame):
        raise JobStopped(signum)

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def stop(self, signum: int) -> None:
        """End the job after a stop (never returns). The time limit: call submitit's own handler, which
        calls the job's ``checkpoint``, requeues it and exits (or raises, when the job has timed out
        too often: then the job fails with that reason). Anything else: exit without a result, so that
        submitit's waiting side keeps waiting while Slurm requeues a pre-empted job."""
        handler = self.old.get(signum)
        self.__exit__()
        if signum == self.time_limit and callable(handler):
            handler(signum, None)
        raise SystemExit(128 + signum)


def assigned_gpus(n: int, environ: dict | None = None) -> list[str] | None:
    """The GPU slot of a job whose runs take ``n`` GPUs each. One or none: None (the run trains in
    the job's own process, on the GPU Slurm gave it). More: one slot of the GPUs Slurm assigned
    (its ``CUDA_VISIBLE_DEVICES``, which a second job on the node sees as other ids), never 0..n-1
    over them; 0..n-1 only where Slurm set nothing."""
    if n <= 1:
        return None
    env = os.environ if environ is None else environ
    ids = [x.strip() for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if not ids:
        return [",".join(str(i) for i in range(n))]
    if len(ids) < n:
        raise TrainingError(f"the job has GPUs {','.join(ids)} (CUDA_VISIBLE_DEVICES), fewer than --gpus-per-run {n}")
    return [",".join(ids[:n])]


# ---- what Slurm says ---------------------------------------------------------------------------


@dataclass
class JobInfo:
    """A sweep's job as Slurm and its logs tell: ``kind`` one of JOB_KINDS, ``state`` Slurm's own
    word, ``cause`` of a failure or cancellation, ``log`` the job's error log."""

    method: str
    task: str
    job_id: str
    folder: str = ""
    kind: str = "unknown"
    state: str = "UNKNOWN"
    cause: str | None = None
    log: str | None = None


def job_kind(state: str, started: bool) -> str:
    """Slurm's state (sacct's word) as one of JOB_KINDS; ``started``: the job wrote its log before, so
    a pending job is one that was requeued."""
    state = (state or "UNKNOWN").split()[0].upper()
    if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "RESV_DEL_HOLD", "SPECIAL_EXIT"):
        return "requeued" if started or state != "PENDING" else "queued"
    if state in ("RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING",
                 "STAGE_OUT"):
        return "running"
    if state == "COMPLETED":
        return "completed"
    if state.startswith("CANCELLED"):
        return "cancelled"
    if state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "REVOKED"):
        return "failed"
    return "unknown"


#: Lines of a job's error log that say why it ended, newest first wins.
_TELLING = re.compile(r"(Error|Exception|error:|\*\*\*|Killed|oom|OOM|CANCELLED|TIMEOUT|not requeued)")
_SUBMITIT_LOG = re.compile(r"^submitit (INFO|WARNING|ERROR|DEBUG) ")


def log_cause(text: str) -> str | None:
    """The line of a job's error log that says why it ended: the last one that names an error, a
    kill or Slurm's own ``*** ... ***`` notice (a Python traceback ends in its exception), else the
    last line; submitit's own log lines are skipped. None for an empty log."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _SUBMITIT_LOG.match(ln.strip())]
    if not lines:
        return None
    for ln in reversed(lines):
        if _TELLING.search(ln):
            return _short_exception(ln)
    return lines[-1]


def _short_exception(line: str) -> str:
    """``ufgir_cli.errors.TrainingError: text`` -> ``TrainingError: text``."""
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\w*:)", r"\1", line)


def result_cause(result_pickle: Path) -> str | None:
    """The exception line of a job that ended in an error (submitit's result file holds its traceback)."""
    if not result_pickle.is_file():
        return None
    try:
        from submitit.core.utils import pickle_load

        outcome, value = pickle_load(result_pickle)
    except Exception:  # noqa: BLE001 - a torn or foreign file: fall back to the log
        return None
    return log_cause(str(value)) if outcome == "error" else None


def record_jobs(root: Path, entries: list[tuple[str, str, object]]) -> None:
    """Add (method, task, submitit job) to ``jobs.json``; a sweep submitted again points at its new job."""
    path = root / JOBS_FILE
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"jobs": []}
    fresh = {(m, t) for m, t, _ in entries}
    jobs = [j for j in record["jobs"] if (j["method"], j["task"]) not in fresh]
    for method, task, job in entries:
        jobs.append({"method": method, "task": task, "job_id": job.job_id, "folder": str(job.paths.folder),
                     "cluster": type(job).__name__, "submitted": time.time()})
    atomic_write_json(path, {"jobs": jobs})


def recorded_jobs(root: Path) -> list[dict]:
    path = root / JOBS_FILE
    return json.loads(path.read_text(encoding="utf-8"))["jobs"] if path.is_file() else []


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job now, by id: one ``sacct`` call through submitit's watcher (a fresh one,
    which remembers nothing from earlier calls); "UNKNOWN" where sacct has no record or fails."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()
    for job_id in job_ids:
        watcher.register_job(job_id)
    quiet = logging.getLogger("submitit")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a failing sacct is reported as "unknown", not as a warning
    try:
        watcher.update()
    finally:
        quiet.setLevel(level)
    return {job_id: watcher.get_state(job_id, mode="cache") for job_id in job_ids}


#: Why a job is cancelled that Slurm has no record of (`vanished`).
CANCELLED_BEFORE_START = "before it started"


def vanished(job_id: str, states: dict[str, str]) -> bool:
    """An array task of which Slurm's accounting knows nothing while it knows another task of its
    array (``states``: `slurm_states` of them all): it was cancelled before it started. Slurm drops
    such a task from its array's pending record and writes none of its own, so to sacct, and to
    submitit's waiting, it would stay unknown forever."""
    main, _, task = job_id.partition("_")
    return bool(task) and states.get(job_id, "UNKNOWN") == "UNKNOWN" and any(
        other != job_id and other.partition("_")[0] == main and state != "UNKNOWN" for other, state in states.items())


def job_states(root: Path) -> dict[tuple[str, str], JobInfo]:
    """Every recorded Slurm job of a grid as Slurm says now (`slurm_states`) and its logs tell, by
    (method, task). Jobs of other executors (submitit's local one) are left out; without submitit
    every state is unknown."""
    recs = [r for r in recorded_jobs(root) if r.get("cluster") == "SlurmJob"]
    infos = {(r["method"], r["task"]): JobInfo(r["method"], r["task"], r["job_id"], r["folder"]) for r in recs}
    try:
        from submitit import SlurmJob
    except ImportError:
        return infos
    states = slurm_states([r["job_id"] for r in recs]) if recs else {}
    for info in infos.values():
        job = SlurmJob(folder=info.folder, job_id=info.job_id)
        info.state = states[info.job_id]
        started = job.paths.stdout.exists() or job.paths.stderr.exists()
        info.kind = job_kind(info.state, started)
        info.log = str(job.paths.stderr)
        if info.kind == "completed" and result_cause(job.paths.result_pickle):
            info.kind = "failed"  # the function raised, submitit wrote its error; Slurm saw exit 0
        if info.kind == "failed":
            info.cause = result_cause(job.paths.result_pickle) or _read_cause(job.paths.stderr) or info.state
        elif info.kind == "cancelled":
            info.cause = info.state.lower().replace("cancelled by ", "by uid ")
        elif vanished(info.job_id, states):
            info.kind, info.cause = "cancelled", CANCELLED_BEFORE_START
    return infos


def _read_cause(path: Path) -> str | None:
    try:
        return log_cause(path.read_text(encoding="utf-8", errors="replace")[-20000:])
    except OSError:
        return None


def with_jobs(rows: list[dict], jobs: dict[tuple[str, str], JobInfo]) -> list[dict]:
    """`run_status` rows with their sweep's job: ``job`` (its id) and ``job_state`` (Slurm's word) on
    every row that has one, and a run that is not done or running takes the job's kind when the job
    explains where it stands: queued, requeued, cancelled or failed (the job's cause and log)."""
    out = []
    for row in rows:
        info = jobs.get((row["method"], row["task"]))
        if info is None:
            out.append(row)
            continue
        row = {**row, "job": info.job_id, "job_state": info.state, "job_kind": info.kind}
        if row["status"] not in ("done", "running") and info.kind in ("queued", "requeued", "cancelled", "failed"):
            step = f", step {row['step']}" if row.get("step") is not None else ""
            cause = f": {info.cause}" if info.cause else ""
            log = f" (log: {info.log})" if info.kind == "failed" and info.log else ""
            row.update(status=info.kind, reason=info.cause,
                       detail=f"{info.kind} (job {info.job_id}{step}{cause}){log}")
        elif row["status"] != "done":
            row["detail"] = f"{row['detail']} · job {info.job_id} {info.kind}"
        out.append(row)
    return out


def active(jobs: dict[tuple[str, str], JobInfo]) -> dict[tuple[str, str], JobInfo]:
    """The jobs that Slurm still holds (queued, running or requeued)."""
    return {k: j for k, j in jobs.items() if j.kind in ("queued", "running", "requeued")}


def attach(info: JobInfo):
    """The submitit job of a recorded one, to wait for it from another command."""
    from submitit import SlurmJob

    return SlurmJob(folder=info.folder, job_id=info.job_id)


# ---- submitting and waiting -----------------------------------------------------------------------


@contextlib.contextmanager
def refused_as_one_line():
    """A submission sbatch refuses is one line (``LaunchError``) with sbatch's own message, not
    submitit's traceback; what submitit prints meanwhile is kept for that line."""
    from submitit.core.utils import FailedJobError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            yield
    except (FailedJobError, subprocess.CalledProcessError, OSError, ValueError) as e:
        # sbatch's refusal; sbatch missing; a parameter submitit cannot write
        text = f"{e}\n{printed.getvalue()}"
        said = [ln.strip() for ln in text.splitlines() if "error:" in ln.lower()]  # "sbatch: error: ..."
        why = said[-1] if said else (text.strip().splitlines() or [type(e).__name__])[-1]
        raise LaunchError(f"Slurm refused the jobs: {why.removeprefix('sbatch: error: ')}") from None


def failure_line(job, label: str) -> str:
    """One line for a job that did not succeed: its id, what it ran, the cause and the log."""
    cause = result_cause(job.paths.result_pickle) or _read_cause(job.paths.stderr)
    state = None
    if cause is None:
        with contextlib.suppress(Exception):
            state = job.state
        cause = f"no result (Slurm state {state or 'unknown'})"
    if "timed-out too many times" in cause:
        cause += " (raise --max-requeues, or --time)"
    return f"job {job.job_id} ({label}): {cause} (log: {job.paths.stderr})"
