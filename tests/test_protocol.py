"""The protocol fails early, not after hours of training (issue 27): every model is built on the meta
device before the first run, method defaults follow the backbone's depth, rows take their own
overrides, one failed sweep does not stop the table, a stop is not an error, estimates say what they
are, and run keys leave out what depends on the machine."""

from __future__ import annotations

import os
import signal

import pytest
from typer.testing import CliRunner

from ufgir_cli import geometry
from ufgir_cli.cli import app
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.engine.state import Interrupted
from ufgir_cli.recipe import load_recipe, load_saved_recipe, parse_overrides
from ufgir_cli.reproduce import load_grid, make_grid, run_local, run_status
from ufgir_cli.reproduce.grid import read_failures

runner = CliRunner()
#: A timm ViT whose depth (36) the name does not tell: only a build finds it.
DEEP = "vit_small_patch16_36x1_224"


def tiny(data_root) -> list[str]:
    return [f"data.root={data_root}", "data.num_workers=0", "model.backbone=ufgir_vit_micro_patch8_64",
            "model.weights=none", "train.epochs=1", "train.batch_size=8", "train.precision=fp32",
            "schedule.warmup_steps=2", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from ufgir_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    generate_synthetic(root / "cotton80", num_classes=4, train_val=6, test=4, size=64, seed=0)
    return root  # soygene is missing: a sweep on it stops on a DatasetError


def sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


# ---- 1. everything validated before the first step -------------------------------------------

def test_a_layout_only_a_build_can_refuse_stops_reproduce_and_sweep_before_anything_is_written(tmp_path):
    """The recipe cannot know the depth of DEEP; the meta build can, before anything trains or is written."""
    bad = ["model.backbone=" + DEEP, "model.ila_ds_locs=[3,40]", "model.weights=none"]
    for extra in (["--dry-run"], []):
        res = runner.invoke(app, ["reproduce", "--methods", "linear,ila", "--datasets", "cotton80", "--image-size", "224",
                                  "--out", str(tmp_path / "r"), *sets(bad), *extra])
        assert res.exit_code == 2, res.output
        assert "ila on cotton80 (recipe ila): model.ila_ds_locs [3, 40] names a block past the last one; " \
               "the backbone has 36 blocks" in res.output
    res = runner.invoke(app, ["sweep", "-r", "ila", "--dataset", "cotton80", "--out", str(tmp_path / "s"), *sets(bad)])
    assert res.exit_code == 2 and "sweep ila_cotton80_" in res.output and "names a block past" in res.output, res.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


# ---- 2. defaults from the backbone's depth -----------------------------------------------------

def test_positions_resolved_at_build_are_saved_with_the_run(tmp_path, small_synthetic, monkeypatch):
    """A backbone whose name does not tell its depth: the build reads it, and the run's recipe.toml
    holds the positions it derived (after blocks 1 and 3 of the micro ViT's 6)."""
    from ufgir_cli.engine.train import fit
    from ufgir_cli.model import meta_model

    cfg = load_recipe("ila_pp", {"model": {"backbone": DEEP}}).model
    assert cfg.ila_ds_locs is None and meta_model(cfg, 4).cfg.ila_ds_locs == (11, 23)  # 3 and 7 of 12 -> of 36
    monkeypatch.delitem(geometry.BACKBONE_DEPTHS, "ufgir_vit_micro_patch8_64")
    recipe = load_recipe("ila_plus", parse_overrides([*tiny(small_synthetic), "data.dataset=x", "model.image_size=64"]))
    assert recipe.model.ila_ds_locs is None
    fit(recipe, tmp_path / "run")
    saved = load_saved_recipe(tmp_path / "run" / "recipe.toml").model
    assert (saved.ila_ds_locs, saved.ila_locs) == ((1, 3), (0, 2, 4, 5))


def test_the_depth_table_matches_timm():
    """Every backbone of the table, built on the meta device: its blocks are the table's, and its attention
    projects q, k and v apart exactly where `separate_qkv` says (where LoRA's default targets change)."""
    import timm
    import torch

    import ufgir_cli.model  # noqa: F401 - registers the micro ViT

    for name, depth in geometry.BACKBONE_DEPTHS.items():
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False)
        assert len(vit.blocks) == depth, name
        assert geometry.separate_qkv(name) == (getattr(vit.blocks[0].attn, "q_proj", None) is not None), name
    assert geometry.separate_qkv("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k")
    assert geometry.backbone_depth(DEEP) is None and geometry.backbone_depth("vit_base_patch16_18x2_224") is None
    assert geometry.backbone_depth("vit_large_patch16_224.augreg_in21k") == 24


# ---- 3. per-row overrides, recipe rows, a recipe's learning rates ----------------------------

def test_rows_take_their_own_overrides_and_recipes_their_own_learning_rates(tmp_path):
    res = runner.invoke(app, ["reproduce", "--methods", "linear,ila_pp,transfg_ft", "--datasets", "cotton80",
                              "--image-size", "64", "--out", str(tmp_path), "--name", "g", "--dry-run", "--step-seconds", "1",
                              *sets(["model.backbone=ufgir_vit_micro_patch8_64", "model.ila_ds_locs=[1,3]",
                                     "ila_pp:model.ila_ds_locs=[2,4]"])])
    assert res.exit_code == 0, res.output
    assert "notice: model.ila_ds_locs [1, 3] dropped: method 'linear' has no ILA" in res.output
    assert "checked: 3 distinct model(s) of 3 sweeps" in res.output
    grid = make_grid(["linear", "ila_pp", "transfg_ft"], ["cotton80"], image_size=64, out=tmp_path,
                     overrides=parse_overrides(["model.backbone=ufgir_vit_micro_patch8_64"]),
                     row_overrides={"ila_pp": parse_overrides(["model.ila_ds_locs=[2,4]"])})
    recipes = {row: load_recipe(s.recipe, s.overrides) for row, _, s in grid.sweeps()}
    assert recipes["ila_pp"].model.ila_ds_locs == (2, 4) and recipes["linear"].model.ila_ds_locs == ()
    assert recipes["transfg_ft"].model.depth == 5 and recipes["transfg_ft"].model.train_backbone
    sweeps = {row: s for row, _, s in grid.sweeps()}
    assert sweeps["transfg_ft"].lrs == (0.03, 0.01, 0.003, 0.001) and sweeps["linear"].lrs[0] == 0.3
    with pytest.raises(Exception, match="'adapter' is not one of --methods"):
        make_grid(["linear"], ["cotton80"], out=tmp_path, row_overrides={"adapter": {"train": {"epochs": 1}}})


# ---- 4 and 5. a failed sweep does not stop the table; a stop is not an error -----------------

def test_one_failed_sweep_does_not_stop_the_table(tmp_path, data_root):
    res = runner.invoke(app, ["reproduce", "--methods", "linear", "--datasets", "soygene,cotton80", "--image-size", "64",
                              "--seeds", "1", "--lr", "0.1", "--name", "t", "--out", str(tmp_path), "-q", *sets(tiny(data_root))])
    assert res.exit_code == 1, res.output
    assert f"table: {tmp_path / 't' / 'table1.md'}" in res.output and "1 of 2 sweeps of t stopped on an error" in res.output
    table = (tmp_path / "t" / "table1.md").read_text()
    assert "- linear soygene: split file" in table and "run `ufgir download soygene`" in table  # the failure under the table, the finished cell filled
    rows = run_status(load_grid("t", tmp_path))
    assert {r["status"] for r in rows if r["task"] == "cotton80"} == {"done"}
    soygene = [r for r in rows if r["task"] == "soygene"]
    assert {r["status"] for r in soygene} == {"failed"} and "its sweep stopped: split file" in soygene[0]["detail"]


class SigintAt(Callback):
    """Ctrl-C at a step (in place of the live display, which the command stops at the end)."""

    def __init__(self, step: int):
        self.step = step
        self.progress = self

    def stop(self):
        pass

    def on_step(self, step, logs):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_exits_130_and_the_stopped_run_is_resumable(tmp_path, data_root, monkeypatch):
    import ufgir_cli.cli.progress as progress

    monkeypatch.setattr(progress, "RichProgress", lambda quiet: SigintAt(1))
    res = runner.invoke(app, ["reproduce", "--methods", "linear", "--datasets", "cotton80", "--image-size", "64",
                              "--seeds", "1", "--lr", "0.1", "--name", "s", "--out", str(tmp_path), "-q", *sets(tiny(data_root))])
    assert res.exit_code == 130, res.output
    assert "reproduce s stopped by SIGINT" in res.output and "the same command continues it" in res.output
    assert "error" not in res.output
    stopped = [r for r in run_status(load_grid("s", tmp_path)) if r["status"] != "pending"]
    assert [(r["status"], r["step"]) for r in stopped] == [("resumable", 1)] and "step 1" in stopped[0]["detail"]
    with pytest.raises(Interrupted):  # the library raises it too, never records it as a failure
        run_local(load_grid("s", tmp_path), callbacks=lambda run: [SigintAt(2)])
    assert not read_failures(load_grid("s", tmp_path))


# ---- 6. honest estimates ------------------------------------------------------------------------

def test_the_dry_run_says_which_step_times_were_measured_and_counts_the_generated_set(tmp_path):
    res = runner.invoke(app, ["reproduce", "--methods", "linear,cal", "--datasets", "synthetic", "--image-size", "224",
                              "--out", str(tmp_path), "--dry-run", "--bench", "benchmarks/results/cpu.json"])
    assert res.exit_code == 0, res.output
    assert "step time linear: measured, benchmarks/results/cpu.json (" in res.output
    assert "step time cal: estimated, the plain ViT's step in benchmarks/results/cpu.json" in res.output
    assert "steps unknown" not in res.output and "this machine" not in res.output


# ---- 7. run keys that travel --------------------------------------------------------------------

def test_workers_are_the_machines_and_stay_unset_in_the_saved_recipe():
    from ufgir_cli.cores import data_workers
    from ufgir_cli.recipe import dump_resolved

    quick = load_recipe("quickstart", env=False)
    assert quick.data.num_workers is None and "num_workers" not in dump_resolved(quick)
    assert data_workers(3) == 3 and data_workers(None) == min(4, data_workers(None, 1))
