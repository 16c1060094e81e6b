"""Live training progress with rich: epoch and step bars (loss, lr, images/s, ETA) and a summary."""

from __future__ import annotations

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..engine.callbacks import Callback
from ..io import plural
from ._common import console


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class RichProgress(Callback):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=False, disable=quiet,
        )
        self.epoch_task = self.step_task = self.eval_task = None
        self.info: dict = {}

    def on_train_start(self, info: dict) -> None:
        self.info = info
        threads = f", {info['threads']} CPU threads" if info.get("threads") else ""
        console.print(
            f"training on {info['device']} ({info['precision']}{threads}) · {plural(info['train_images'], 'image')} · "
            f"{info['params_trainable']:,} of {info['params_total']:,} parameters trainable · run {info['run_dir']}",
            soft_wrap=True, markup=False,
        )
        if info.get("resumed"):  # every mode, live or --quiet: where this run goes on from
            epoch = info["start_step"] // max(info["steps_per_epoch"], 1)
            console.print(f"resuming from step {info['start_step']} (epoch {epoch + 1} of {info['epochs']})",
                          soft_wrap=True, markup=False)
        if info.get("extension"):
            ext = info["extension"]
            console.print(f"[yellow]note:[/] train.epochs raised from {ext['epochs_before']} to {ext['epochs_after']}: "
                          f"{escape(ext['note'])} (recorded in provenance.json)", soft_wrap=True)
        for line in info.get("warnings", ()):
            console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)
        if not self.quiet:
            self.progress.start()
            self.epoch_task = self.progress.add_task("epochs", total=info["epochs"], status="",
                                                     completed=info["start_step"] // max(info["steps_per_epoch"], 1))

    def on_epoch_start(self, epoch: int, steps: int, done: int) -> None:
        if self.quiet:
            return
        if self.step_task is not None:
            self.progress.remove_task(self.step_task)
        self.step_task = self.progress.add_task(f"epoch {epoch + 1}", total=steps, completed=done, status="")

    def on_step(self, step: int, logs: dict) -> None:
        if not self.quiet and self.step_task is not None:
            self.progress.update(self.step_task, advance=1,
                                 status=f"loss {logs['train/loss_step']:.4f} lr {logs['train/lr']:.2e}")

    def on_log(self, record: dict) -> None:
        if not self.quiet and self.step_task is not None and "train/images_per_s" in record:
            self.progress.update(self.step_task, status=f"loss {record['train/loss']:.4f} lr {record['train/lr']:.2e} "
                                                        f"{record['train/images_per_s']:.0f} img/s")
        if self.quiet:
            # one record, one line, whatever the width: cluster logs are grepped by key=value
            console.print(" ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "time"),
                          soft_wrap=True, markup=False, highlight=False)

    def on_eval_start(self, split: str, batches: int) -> None:
        if not self.quiet:
            self.eval_task = self.progress.add_task(f"eval {split}", total=self.info.get("eval_images"), status="")

    def on_eval_batch(self, n: int) -> None:
        if self.eval_task is not None:
            self.progress.update(self.eval_task, advance=n)

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        if self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None
        if not self.quiet:
            self.progress.update(self.epoch_task, completed=epoch)
            evals = " ".join(f"{k} {v:.2f}" for k, v in record.items() if k.endswith("/top1"))
            self.progress.console.print(f"epoch {epoch}: train/loss_epoch {record['train/loss_epoch']:.4f} {evals}")

    def on_train_end(self, summary: dict) -> None:
        self.close()
        console.print(summary_table(summary))

    def close(self) -> None:
        """Stop the live display (it draws its last state once, then a newline) and flush stdout, so that
        what is printed next, on stdout or stderr, starts on a line of its own."""
        if self.progress.live.is_started:  # in a log, every stop() would add a blank line
            self.progress.stop()
        console.file.flush()


def summary_table(s: dict) -> Table:
    t = Table(title="training summary", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    split = s["split"]
    if s.get("final_top1") is not None:
        t.add_row(f"{split} top-1 (final epoch)", f"{s['final_top1']:.2f} %")
    if s.get("best_top1") is not None:  # only when selecting on val
        t.add_row("val top-1 (best, checkpoints/best.pt)", f"{s['best_top1']:.2f} %")
    t.add_row("time", f"{s['time_s']:.1f} s")
    if s.get("peak_memory_mb"):
        t.add_row("peak memory", f"{s['peak_memory_mb']:.0f} MiB")
    t.add_row("parameters trainable / total", f"{s['params_trainable']:,} / {s['params_total']:,}")
    t.add_row("multiply-adds per image", f"{s['macs'] / 1e9:.3f} G")
    t.add_row("device · precision", f"{s['device']} · {s['precision']}")
    if s.get("nonfinite_skipped"):
        t.add_row("non-finite steps skipped", str(s["nonfinite_skipped"]))
    t.add_row("run folder", s["run_dir"])
    return t
