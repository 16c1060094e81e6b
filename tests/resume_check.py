"""The check every method's training test makes: the loss falls over 3 epochs, and a run stopped by
SIGTERM at step 4 resumes to the same tensors and the same logged records as a run never stopped."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import TrainingError
from ufgir_cli.model.checkpoint import read_checkpoint
from ufgir_cli.recipe import Recipe


class StopAtStep4(Callback):
    def on_step(self, step, logs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("time", "train/images_per_s")}


def trains_and_resumes_bit_exactly(recipe: Recipe, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Train ``recipe`` (3 epochs) once through and once stopped at step 4 then resumed; assert the
    loss falls and both end equal; return the finished state dict for the caller's own checks."""
    fit(recipe, tmp_path / "ref")
    epochs = [r["train/loss_epoch"] for r in records(tmp_path / "ref") if "train/loss_epoch" in r]
    assert len(epochs) == 3 and all(math.isfinite(v) for v in epochs) and epochs[-1] < epochs[0]
    with pytest.raises(TrainingError):
        fit(recipe, tmp_path / "stopped", callbacks=[StopAtStep4()])
    fit(recipe, tmp_path / "stopped", resume=True)
    ref = read_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["state_dict"]
    resumed = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["state_dict"]
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert [comparable(r) for r in records(tmp_path / "ref")] == [comparable(r) for r in records(tmp_path / "stopped")]
    return ref
