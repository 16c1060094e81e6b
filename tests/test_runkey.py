"""Run keys: a canonical form of the resolved recipe, pinned, and today's keys still found (issue 25, item 6).

``tests/data/compat/recipe_key.toml`` is the resolved recipe of a sweep run (quickstart, phase 1,
lr 0.03, seed 1) as the release before canonical keys wrote it (``ufgir recipes show quickstart
--set data.num_workers=0 --set train.epochs=1 --set optim.lr=0.03 --set train.seed=1 --set
train.split=train --set eval.split=val``); that release named the run by the sha256 of exactly
these bytes. Both keys are pinned to literals: a change that moves either retrains finished runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ufgir_cli.recipe import TrainConfig, load_recipe, load_saved_recipe
from ufgir_cli.sweep import make_sweep, run_sweep
from ufgir_cli.sweep.plan import make_run, phase1_runs
from ufgir_cli.sweep.runkey import added_keys, canonical_recipe, legacy_run_key, machine_run_key, run_key

STORED = Path(__file__).parent / "data" / "compat" / "recipe_key.toml"
KEY = "c62c33cc2a91"  # run_key of the stored recipe (the machine's keys left out, issue 27 item 7)
MACHINE_KEY = "d92d193e4479"  # its key while data.num_workers, train.threads and train.device were in it
LEGACY_KEY = "dc9bbc893f5a"  # the key that release gave it: sha256 of the file's bytes


@pytest.fixture(scope="module")
def stored():
    return load_saved_recipe(STORED)


def test_the_key_of_a_stored_recipe_is_pinned(stored):
    assert run_key(stored) == KEY and machine_run_key(stored) == MACHINE_KEY
    assert canonical_recipe(stored) == {
        "data": {"dataset": "synthetic"},
        "model": {"backbone": "ufgir_vit_micro_patch8_64", "image_size": 64, "ila_ds_locs": [1, 3], "ila_locs": [],
                  "layer_norm_eps": 1e-6, "drop": 0, "adapter_init": "zero", "mean": [0.5] * 3, "std": [0.5] * 3},
        "optim": {"lr": 0.03},
        "schedule": {"warmup_steps": 50},
        "train": {"epochs": 1, "batch_size": 32, "precision": "fp32", "split": "train"},
        "eval": {"split": "val", "every": 5},
    }  # train.seed = 1 is the default: left out; the description is prose: left out; workers are the machine's


def test_the_machines_keys_and_the_sweep_section_change_no_key(stored):
    """Workers, threads and device depend on where a run starts: a sweep planned on a login node goes on
    on a compute node. An unset num_workers keys as the 4 it resolved to before it could be unset."""
    other = load_recipe(STORED, {"data": {"num_workers": 7}, "train": {"threads": 3, "device": "cpu"},
                                 "sweep": {"lrs": [0.5]}}, env=False)
    assert run_key(other) == KEY and legacy_run_key(other) is not None
    unset = load_recipe(STORED, {"data": {"num_workers": None}}, env=False)
    four = load_recipe(STORED, {"data": {"num_workers": 4}}, env=False)
    assert machine_run_key(unset) == machine_run_key(four) and legacy_run_key(unset) == legacy_run_key(four)


def test_the_legacy_key_is_the_hash_of_the_resolved_toml_as_written_then(stored):
    assert hashlib.sha256(STORED.read_bytes()).hexdigest()[:12] == LEGACY_KEY
    assert legacy_run_key(stored) == LEGACY_KEY


def test_a_key_at_its_default_changes_no_key(stored):
    spelled_out = load_recipe(STORED, {"model": {"cal_maps": 32, "crop_tokens": None, "depth": None},
                                       "train": {"seed": 1, "grad_checkpointing": False, "threads": None},
                                       "optim": {"lr": 3e-2, "label_smoothing": 0}}, env=False)
    assert run_key(spelled_out) == KEY and legacy_run_key(spelled_out) == LEGACY_KEY
    # One spelling per value: -0.0 is 0 and a whole float an int (the legacy TOML wrote "-0.0": another key).
    assert run_key(load_recipe(STORED, {"model": {"drop_path": -0.0, "adapter_scale": 1}}, env=False)) == KEY
    assert run_key(stored.model_copy(update={"description": "reworded"})) == KEY
    changed = load_recipe(STORED, {"model": {"cal_maps": 16}}, env=False)
    assert run_key(changed) != KEY and canonical_recipe(changed)["model"]["cal_maps"] == 16


class TrainLater(TrainConfig):
    """The train section as a later release might have it: one key more, whose default keeps today's behaviour."""

    new_knob: int = 0


def test_a_key_added_later_changes_no_key_at_its_default(stored):
    later = stored.model_copy(update={"train": TrainLater(**stored.train.model_dump())})
    assert (run_key(later), legacy_run_key(later), added_keys(later)) == (KEY, LEGACY_KEY, [])
    used = stored.model_copy(update={"train": TrainLater(**stored.train.model_dump(), new_knob=2)})
    assert run_key(used) != KEY and canonical_recipe(used)["train"]["new_knob"] == 2
    assert added_keys(used) == ["train.new_knob"] and legacy_run_key(used) is None  # no run made before can match


def finish(folder: Path, split: str, top1: float) -> None:
    m = {"top1": top1, "top5": 100.0, "per_class_mean": top1, "per_class_std": 0.0, "loss": 1.0, "num_images": 8}
    (folder / "eval" / split).mkdir(parents=True)
    (folder / "eval" / split / "metrics.json").write_text(json.dumps(m))


def test_runs_finished_under_legacy_keys_are_found_and_not_trained_again(tmp_path):
    """A sweep whose runs all finished before canonical keys: the same command trains nothing."""
    sweep = make_sweep("quickstart", {"data": {"num_workers": 0}}, lrs=(0.1, 0.03), seeds=(1, 10), out=tmp_path)
    legacy = {}
    for phase, lr, seed, top1 in ((1, 0.1, 1, 50.0), (1, 0.03, 1, 75.0), (2, 0.03, 1, 70.0), (2, 0.03, 10, 72.0)):
        run = make_run(sweep, phase, lr, seed)
        old = legacy_run_key(run.recipe)
        assert old is not None and old != run.key
        legacy[(phase, lr, seed)] = folder = run.run_dir.with_name(run.run_dir.name.replace(run.key, old))
        finish(folder, run.split, top1)
    events = []
    report = run_sweep(sweep, on_event=lambda kind, run, info: events.append((kind, run.phase, run.lr, run.seed)))
    assert sorted(events) == sorted(("skipped", *k) for k in legacy)  # nothing trained, evaluated or resumed
    assert report["chosen_lr"] == 0.03 and report["test"]["top1"]["mean"] == pytest.approx(71.0)
    rows = [*report["phase1"], *report["phase2"]]
    assert {r["run"] for r in rows} == {f.relative_to(sweep.root).as_posix() for f in legacy.values()}
    assert sorted(p.name for p in (sweep.root / "runs").iterdir()) == sorted(f.name for f in legacy.values())


def test_a_new_key_folder_wins_over_a_legacy_one(tmp_path):
    sweep = make_sweep("quickstart", lrs=(0.1,), seeds=(1,), out=tmp_path)
    run = phase1_runs(sweep)[0]
    old = run.run_dir.with_name(run.run_dir.name.replace(run.key, legacy_run_key(run.recipe)))
    assert run.run_dir.name.endswith(run.key) and not old.exists()  # neither exists: the new name
    old.mkdir(parents=True)
    assert phase1_runs(sweep)[0].run_dir == old
    run.run_dir.mkdir()
    assert phase1_runs(sweep)[0].run_dir == run.run_dir
