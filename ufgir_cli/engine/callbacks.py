"""What the training loop reports to: plain-dict events, no rich, no typer.

Events carry tags ``<split>/<metric>``; each tag has one meaning wherever it appears:

- ``on_step`` logs: ``train/loss_step`` (the step's mean per-sample loss over its micro-batches),
  ``train/lr``, ``train/grad_norm``. For progress displays; not written to disk.
- ``on_log`` records, the lines of ``metrics.jsonl`` and the TensorBoard scalars: ``step``, ``epoch``
  (fractional), ``time``, ``train/loss`` (mean per-sample loss over the steps since the previous
  record), ``train/lr`` and ``train/images_per_s``. A log line every ``logging.log_every`` steps adds
  ``train/grad_norm``; the record at each epoch's end adds ``train/loss_epoch`` (the epoch's mean
  per-sample loss) and, when it evaluated, ``<eval.split>/top1``, ``/top5``, ``/per_class_mean``
  and ``/loss``.

The CLI adds a rich progress callback; the loop itself always writes ``metrics.jsonl`` and, if
enabled, TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class Callback:
    """Hooks the loop calls; every one is optional."""

    def on_train_start(self, info: dict) -> None: ...
    def on_epoch_start(self, epoch: int, steps: int, done: int) -> None: ...
    def on_step(self, step: int, logs: dict) -> None: ...
    def on_log(self, record: dict) -> None: ...
    def on_eval_start(self, split: str, batches: int) -> None: ...
    def on_eval_batch(self, n: int) -> None: ...
    def on_epoch_end(self, epoch: int, record: dict) -> None: ...
    def on_train_end(self, summary: dict) -> None: ...


def _fan_out(hook: str):
    """A `CallbackList` hook: calls ``hook`` on every callback, in order."""

    def call(self: CallbackList, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    call.__name__, call.__qualname__ = hook, f"CallbackList.{hook}"
    return call


class CallbackList(Callback):
    """Many callbacks as one, so the loop calls each hook once. Signatures are `Callback`'s."""

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks = list(callbacks or [])

    on_train_start = _fan_out("on_train_start")
    on_epoch_start = _fan_out("on_epoch_start")
    on_step = _fan_out("on_step")
    on_log = _fan_out("on_log")
    on_eval_start = _fan_out("on_eval_start")
    on_eval_batch = _fan_out("on_eval_batch")
    on_epoch_end = _fan_out("on_epoch_end")
    on_train_end = _fan_out("on_train_end")


class JsonlLogger(Callback):
    """``metrics.jsonl``: one object per line, steps strictly increasing, each line fsynced.

    A fresh run starts an empty file. On resume the file is cut back to the checkpoint's step (the
    steps after it are trained again), and a torn last line from a kill is dropped, so no step is
    missing or appears twice.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.last_step = -1
        if resume_step is not None and path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill: drop it
                if rec.get("step", -1) > resume_step:
                    break
                kept.append(line)
            from ..io import atomic_write_text

            atomic_write_text(path, "".join(k + "\n" for k in kept))
            self.last_step = json.loads(kept[-1])["step"] if kept else -1
        self._f = open(path, "a" if resume_step is not None else "w", encoding="utf-8")  # noqa: SIM115 - kept open

    def on_log(self, record: dict) -> None:
        if record["step"] <= self.last_step:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.last_step = record["step"]

    def on_train_end(self, summary: dict) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()


def hparams_of(recipe) -> dict[str, str | int | float | bool]:
    """Every recipe key but the prose ``description``, flattened to ``section.key`` and to the values
    TensorBoard's HPARAMS tab takes (lists as their TOML text, unset as "unset")."""
    out: dict[str, str | int | float | bool] = {}
    for section, values in recipe.model_dump(mode="json").items():
        if not isinstance(values, dict):
            continue
        for key, v in values.items():
            out[f"{section}.{key}"] = "unset" if v is None or v == {} else \
                v if isinstance(v, str | int | float | bool) else json.dumps(v)
    return out


class TensorBoardLogger(Callback):
    """Scalars under the same tags as metrics.jsonl; at a run's start, its recipe as text and as
    hyperparameters (the HPARAMS tab compares runs by them, against the final evaluation's metrics).
    A resumed run writes a new event file that starts with a purge marker at the checkpoint's step + 1,
    so TensorBoard drops the old file's steps after the checkpoint and shows each step once."""

    def __init__(self, log_dir: Path, resume_step: int | None = None, recipe=None):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if recipe is not None and resume_step is None:
            self._describe(recipe)

    def _describe(self, recipe) -> None:
        from torch.utils.tensorboard.summary import hparams

        from ..recipe import dump_resolved

        text = dump_resolved(recipe)
        self.w.add_text("recipe", "\n".join("    " + line for line in text.splitlines()), 0)  # markdown: code
        split = recipe.eval.split
        metrics = [f"{split}/{m}" for m in ("top1", "top5", "per_class_mean", "loss")] + ["train/loss"]
        for summary in hparams(hparams_of(recipe), dict.fromkeys(metrics, 0.0)):  # experiment, start, end
            self.w.file_writer.add_summary(summary, 0)

    def on_log(self, record: dict) -> None:
        for k, v in record.items():
            if "/" in k and isinstance(v, int | float) and not isinstance(v, bool):
                self.w.add_scalar(k, v, record["step"], walltime=record.get("time", time.time()))
        self.w.flush()

    def on_train_end(self, summary: dict) -> None:
        self.close()

    def close(self) -> None:
        self.w.close()
