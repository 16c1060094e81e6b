"""Where ufgir keeps datasets and runs.

``UFGIR_DATA_DIR`` wins over the platform's user data folder and ``UFGIR_RUNS_DIR`` over ``./runs``,
so that a cluster job can point every rank at shared storage without touching recipes.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from platformdirs import user_data_dir

from .errors import OptionError
from .io import read_json_object

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

APP = "ufgir"

#: Environment variables that configure the program but are not recipe keys.
NON_RECIPE_ENV = frozenset(
    {"UFGIR_DATA_DIR", "UFGIR_DEBUG", "UFGIR_RUNS_DIR", "UFGIR_DIST_TIMEOUT", "UFGIR_FIXTURES"}
)


def data_dir() -> Path:
    return Path(os.environ.get("UFGIR_DATA_DIR") or user_data_dir(APP)).expanduser()


def runs_dir() -> Path:
    return Path(os.environ.get("UFGIR_RUNS_DIR") or "runs")


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of dataset ``name``: ``root`` itself when it holds the dataset, else ``<root>/<name>``."""
    base = Path(root).expanduser() if root else data_dir()
    if (base / "splits").is_dir() and not (base / name).is_dir():
        return base
    return base / name


def hub_client_settings() -> dict[str, str | None]:
    """``endpoint`` and ``cache_dir`` for huggingface_hub calls, read from ``HF_ENDPOINT`` and
    ``HF_HUB_CACHE`` now: huggingface_hub reads them once, at import, so a later change would not hold."""
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "cache_dir": os.environ.get("HF_HUB_CACHE") or None}


def unresolvable(url: str) -> str | None:
    """Why the host of ``url`` does not resolve (this machine, or its DNS, is offline), else None. A local
    lookup, no connection: callers use it to fail at once instead of starting a client that retries."""
    import urllib.parse

    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        return f"cannot resolve {host} ({getattr(e, 'strerror', None) or e})"
    return None


HUB_SCHEME = "hf://"
# ``hf:/`` too: pathlib folds the double slash (``Path("hf://a/b")`` is ``hf:/a/b``), and commands take Paths.
_HUB_REF = re.compile(r"hf:/{1,2}(?P<owner>[A-Za-z0-9][\w.-]*)/(?P<name>[\w.-]+)(?:@(?P<rev>[^\s@]+))?/?")


@dataclass(frozen=True)
class HubRef:
    """A model pushed to the Hugging Face Hub by `ufgir push`: ``hf://OWNER/NAME[@REVISION]``.

    Accepted wherever a run or checkpoint is (the one loader fetches it); what commands write for it
    goes to :meth:`run_dir`, never into the Hub's cache.
    """

    owner: str
    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, source: str | os.PathLike | RunDir) -> HubRef | None:
        """The reference ``source`` spells, or None for anything that does not start with ``hf:/``."""
        text = os.fspath(source)
        if not text.startswith("hf:/"):
            return None
        m = _HUB_REF.fullmatch(text)
        if m is None or m["owner"] in ("datasets", "spaces"):
            raise OptionError(f"{text!r} is not a Hub model reference; write {HUB_SCHEME}OWNER/NAME or "
                              f"{HUB_SCHEME}OWNER/NAME@REVISION (a model repo written by `ufgir push`)")
        return cls(m["owner"], m["name"], m["rev"])

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def run_dir(self) -> Path:
        """``<runs>/hf_<owner>_<name>[@<revision>]``: where commands write what they make of this model."""
        rev = f"@{self.revision.replace('/', '_')}" if self.revision else ""
        return runs_dir() / f"hf_{self.owner}_{self.name}{rev}"


def run_dir_of(source: str | os.PathLike) -> Path:
    """The run folder a source belongs to: a run folder, ``checkpoints/x.pt`` or ``export/x.*`` inside
    one; for a loose file, the folder holding it (results of that file are written there); for a Hub
    reference, ``HubRef.run_dir``."""
    ref = HubRef.parse(source)
    if ref is not None:
        return ref.run_dir()
    source = Path(source)
    if source.is_dir():
        return source
    if source.parent.name in (CHECKPOINTS, EXPORT):
        return source.parent.parent
    return source.parent


# --------------------------------------------------------------------------------------------
# The run folder

#: The owner of a training run rewrites ``status.json`` this often (seconds) while it trains.
HEARTBEAT_EVERY_S = 30.0
#: A heartbeat older than this (seconds) means the owner is gone, when it ran on another host (a Slurm
#: node seen from the login node: they share only the file system). Generous, for clock skew between
#: hosts and file systems that show a file's new content late. On the owner's own host its pid decides.
HEARTBEAT_STALE_S = 300.0
#: How much later than the start an owner recorded its pid's process may seem to have started and still be
#: that owner: /proc gives the boot time in whole seconds, and a clock stepped by NTP moves it. A reused pid
#: belongs to a process started long after (pids come round again only after hundreds of thousands).
_CLOCK_SLACK_S = 60.0
STATUS_FILE = "status.json"
STATUS_KINDS = ("done", "running", "resumable", "failed", "pending")


def this_host() -> str:
    return socket.gethostname()


def process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since the epoch, to about a second), from
    /proc; None where there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the whole line: starttime in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this host (signal 0 only checks, it sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands, from its files alone: ``kind`` is one of STATUS_KINDS; ``step`` the step of
    the running owner's last heartbeat, or of the checkpoint a resume starts from (None: unknown);
    ``owner`` is ``pid@host``; ``reason`` why a run stopped, failed or waits."""

    kind: str
    step: int | None = None
    epoch: int | None = None
    owner: str | None = None
    reason: str | None = None
    heartbeat_age_s: float | None = None

    def __str__(self) -> str:
        step = f"step {self.step}" if self.step is not None else "step ?"
        if self.kind == "running":
            return f"running (pid {self.owner}, {step})"
        if self.kind == "resumable":
            return f"resumable ({step}, {self.reason or 'stopped'})"
        if self.kind == "failed":
            return f"failed ({self.reason or 'no reason recorded'})"
        if self.kind == "pending" and self.reason:
            return f"pending ({self.reason})"
        return self.kind

    def as_dict(self) -> dict:
        return {**asdict(self), "text": str(self)}


class RunDir:
    """A run folder: its layout (every file and folder a run holds is named here and nowhere else),
    its status (:meth:`status`) and who owns it (``status.json``, written by the training loop).

    ``RunDir(path)`` takes the folder; :meth:`of` also takes a checkpoint or export inside one.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def of(cls, source: str | os.PathLike) -> RunDir:
        """The run a source belongs to (see :func:`run_dir_of`)."""
        return cls(run_dir_of(source))

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    # ---- layout ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.toml"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, tag: str) -> Path:
        """``checkpoints/<tag>.pt``: ``last`` (every save, what a resume reads) or ``best`` (on val)."""
        return self.checkpoints_dir / f"{tag}.pt"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def metrics_log(self) -> Path:
        """``metrics.jsonl``: one JSON record per log line, steps strictly increasing."""
        return self.root / "metrics.jsonl"

    @property
    def provenance_file(self) -> Path:
        return self.root / "provenance.json"

    @property
    def status_file(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def eval_root(self) -> Path:
        return self.root / "eval"

    def eval_dir(self, split: str) -> Path:
        """``eval/<split>/``: the evaluation of the run's own checkpoint (best or last) on ``split``."""
        return self.eval_root / split

    def eval_metrics(self, split: str) -> Path:
        return self.eval_dir(split) / "metrics.json"

    def eval_metrics_files(self) -> list[Path]:
        """Every ``eval/<split>/metrics.json`` of the run's own checkpoints, by split name."""
        return sorted(self.eval_root.glob("*/metrics.json"))

    def foreign_eval_dir(self, split: str, checkpoint: str | os.PathLike) -> Path:
        """``eval/other/<stem>_<hash>/<split>/``: the evaluation of a checkpoint that is not the run's own
        (``--checkpoint other.pt``), beside the run's results and never over them. ``<hash>`` is 8 hex
        digits of the checkpoint's absolute path, so two files of one name do not share a folder."""
        p = Path(checkpoint)
        tag = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
        return self.eval_root / "other" / f"{p.stem}_{tag}" / split

    def is_own_checkpoint(self, path: str | os.PathLike) -> bool:
        """True for a file in this run's ``checkpoints/`` folder."""
        p = Path(path)
        return p.parent.name == CHECKPOINTS and p.parent.parent.resolve() == self.root.resolve()

    def export_eval_dir(self, split: str, file: str | os.PathLike) -> Path:
        """``eval/export/<file name>/<split>/``: the evaluation of an exported file of this run (say
        ``export/model.safetensors``), beside the run's own results, which it never replaces."""
        return self.eval_root / EXPORT / Path(file).name / split

    def eval_dir_for(self, split: str, checkpoint: str | os.PathLike) -> Path:
        """Where an evaluation of ``checkpoint`` on ``split`` goes: ``eval/<split>/`` for the run's own
        checkpoint (or a loose file's own folder), :meth:`export_eval_dir` for a file in its ``export/``,
        else :meth:`foreign_eval_dir`."""
        p = Path(checkpoint)
        if p.parent.name == EXPORT and p.parent.parent.resolve() == self.root.resolve():
            return self.export_eval_dir(split, p)
        own = self.is_own_checkpoint(p) or p == self.root or p.parent.resolve() == self.root.resolve()
        return self.eval_dir(split) if own else self.foreign_eval_dir(split, p)

    @property
    def analysis_dir(self) -> Path:
        """``analysis/``: what `ufgir metrics` and `ufgir visualize` write."""
        return self.root / "analysis"

    def analysis(self, *parts: str) -> Path:
        """A file or folder under ``analysis/``, e.g. ``analysis("visualize", "rollout_test")``."""
        return self.analysis_dir.joinpath(*parts)

    @property
    def export_dir(self) -> Path:
        """``export/``: what `ufgir export` writes by default."""
        return self.root / EXPORT

    def export(self, name: str) -> Path:
        return self.export_dir / name

    def export_default(self, fmt: str, adapter_only: bool = False, merge: bool = False) -> Path:
        """Where `ufgir export --format fmt` writes unless told: ``export/model.<fmt>``, ``adapter.safetensors``
        for the PETL delta, ``model.merged.safetensors`` for the merged model, the folder ``peft`` for a peft
        adapter folder (``fmt``: one of :data:`EXPORT_FORMATS`)."""
        name = "adapter.safetensors" if adapter_only else "peft" if fmt == "peft" else \
            "model.merged.safetensors" if merge and fmt == "safetensors" else f"model.{fmt}"
        return self.export(name)

    def is_run(self) -> bool:
        """A folder that `ufgir train` (or `import-upstream`) made: it holds ``recipe.toml``."""
        return self.recipe_file.is_file()

    def changed_at(self) -> float:
        """When the run last changed: its newest checkpoint, metrics log or recipe (mtime)."""
        files = [*self.checkpoints_dir.glob("*.pt"), self.metrics_log, self.recipe_file]
        return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)

    def eval_split(self) -> str | None:
        """The split the run's final evaluation is on (its recipe's ``eval.split``), read without pydantic."""
        try:
            with open(self.recipe_file, "rb") as f:
                return str(tomllib.load(f)["eval"]["split"])
        except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
            return None

    # ---- status ----------------------------------------------------------------------------
    def read_status(self) -> dict:
        """``status.json`` as written (empty for a run made before it existed or a torn read)."""
        return read_json_object(self.status_file)

    def status(self, split: str | None = None, *, now: float | None = None, host: str | None = None) -> RunStatus:
        """Where the run stands (``split``: the final evaluation's, default the recipe's ``eval.split``):

        - running: its owner lives (same host: its pid exists; another host: a heartbeat younger than
          HEARTBEAT_STALE_S);
        - done: the final evaluation ``eval/<split>/metrics.json`` exists;
        - failed: the owner recorded an error (its one line is the reason);
        - resumable: a ``checkpoints/last.pt`` to go on from; the reason says why it stopped: a signal,
          or "owner gone" (killed, the node died) when the owner recorded nothing;
        - pending: nothing to go on from (new, or stopped before its first checkpoint).

        Runs made before ``status.json`` existed are judged from their files alone (step unknown).
        """
        rec = self.read_status()
        owner = f"{rec['pid']}@{rec['host']}" if "pid" in rec and "host" in rec else None
        age = (time.time() if now is None else now) - float(rec.get("heartbeat", 0)) if rec else None
        if rec.get("state") == "running" and self._owner_alive(rec, age, host or this_host()):
            return RunStatus("running", rec.get("step"), rec.get("epoch"), owner, None, age)
        split = split or self.eval_split()
        finished = self.eval_metrics(split).is_file() if split else bool(self.eval_metrics_files())
        if finished:
            return RunStatus("done", rec.get("step"), rec.get("epoch"), owner)
        saved = rec.get("saved_step")
        if rec.get("state") == "failed":
            return RunStatus("failed", saved, rec.get("saved_epoch"), owner, rec.get("reason"), age)
        if not self.last.is_file():
            why = "owner gone before its first checkpoint" if rec.get("state") == "running" else None
            return RunStatus("pending", None, None, owner, why)
        reason = {"running": "owner gone", "stopped": rec.get("reason") or "stopped",
                  "done": "trained, final evaluation not written"}.get(rec.get("state"), "stopped, reason unknown")
        return RunStatus("resumable", saved, rec.get("saved_epoch"), owner, reason, age)

    @staticmethod
    def _owner_alive(rec: dict, age: float | None, host: str) -> bool:
        if rec.get("host") != host:
            return age is not None and age < HEARTBEAT_STALE_S
        pid = int(rec.get("pid", 0))
        if not pid_alive(pid):
            return False
        # A process that started after the owner recorded its start is another one under a reused pid.
        started = process_started(pid)
        return started is None or "started" not in rec or started <= float(rec["started"]) + _CLOCK_SLACK_S


CHECKPOINTS = "checkpoints"
EXPORT = "export"
#: What `ufgir export --format` writes (each to its own place: `RunDir.export_default`).
EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "onnx", "pt2", "peft")
