"""A backbone axis for the protocol (issue 32, part 4): `ufgir reproduce --backbones` and `ufgir sweep
--backbones` run every row on each backbone, with --set below the backbone and --set ROW:key=value
above it; table1.* names the backbone in every row, `compare` gives each backbone its marker, and a
dry run plans ILA++ and the linear probe on five backbones and five datasets at 448 px."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.errors import RecipeError
from ufgir_cli.recipe import load_recipe, load_saved_recipe, parse_overrides
from ufgir_cli.reproduce import load_grid, make_grid, plan_rows, write_table
from ufgir_cli.reproduce.grid import StepTime, write_grid
from ufgir_cli.sweep import make_sweep
from ufgir_cli.sweep.plan import phase1_runs
from ufgir_cli.viz import compare

runner = CliRunner()
#: Five of today's backbones, one per family of `geometry.FAMILIES` that Table 1 might ask for.
FIVE = ("vit_base_patch16_224.orig_in21k", "vit_base_patch16_clip_224.openai", "vit_base_patch14_reg4_dinov2.lvd142m",
        "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", "vit_base_patch16_dinov3.lvd1689m")
MICRO, TINY = "ufgir_vit_micro_patch8_64", "vit_tiny_patch16_224"


def test_the_dry_run_plans_ila_pp_and_the_probe_on_five_backbones_and_five_datasets_at_448(tmp_path):
    res = runner.invoke(app, ["reproduce", "--methods", "ila_pp,linear", "--backbones", ",".join(FIVE),
                              "--image-size", "448", "--dry-run", "--step-seconds", "0.5", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    grid = make_grid(["ila_pp", "linear"], backbones=FIVE, out=tmp_path)
    rows = plan_rows(grid, {r: StepTime(0.5, "given") for r in grid.rows})
    assert len(grid.rows) == 10 and len(rows) == 10 * len(grid.tasks) and len(grid.datasets) == 5
    total_runs, total_hours = sum(r["runs"] for r in rows), sum(r["hours"] for r in rows)
    assert f"total: {total_runs} runs, {sum(r['steps'] for r in rows)} steps, {total_hours:.1f} h on one device" in res.output
    for b in FIVE:  # runs and hours per backbone, which add up to the total
        mine = [r for r in rows if r["backbone"] == b]
        assert f"backbone {b}: {sum(r['runs'] for r in mine)} runs, {sum(r['hours'] for r in mine):.1f} h" in res.output
        assert re.search(rf"ila_pp\s+{re.escape(b)}\s+cotton80\s+\d+\s+\d+", res.output), res.output
    assert "checked: " in res.output and f"of {10 * len(grid.tasks)} sweeps built on the meta device" in res.output
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_rows_on_each_backbone_keep_the_per_row_precedence_and_the_run_keys(tmp_path):
    """--set < the row's backbone < --set ROW:key=value; without --backbones nothing changes (names, keys)."""
    over = parse_overrides(["train.epochs=3", "model.ila_ds_locs=[1,3]"])
    grid = make_grid(["linear", "ila_pp"], ["cotton80"], image_size=128, backbones=(MICRO, TINY), out=tmp_path,
                     overrides=over, row_overrides={"ila_pp": parse_overrides(["model.ila_ds_locs=[0,2]"])})
    assert grid.rows == (f"linear+{MICRO}", f"linear+{TINY}", f"ila_pp+{MICRO}", f"ila_pp+{TINY}")
    recipes = {row: load_recipe(s.recipe, s.overrides) for row, _, s in grid.sweeps()}
    assert {r: (x.model.backbone, x.train.epochs) for r, x in recipes.items()} == {
        f"linear+{MICRO}": (MICRO, 3), f"linear+{TINY}": (TINY, 3), f"ila_pp+{MICRO}": (MICRO, 3), f"ila_pp+{TINY}": (TINY, 3)}
    assert recipes[f"ila_pp+{TINY}"].model.ila_ds_locs == (0, 2) == recipes[f"ila_pp+{MICRO}"].model.ila_ds_locs
    assert grid.sweep(f"ila_pp+{TINY}", "cotton80").name == f"ila_pp+{TINY}_cotton80"
    # a cell's runs are the runs `--set model.backbone=B` trains: the same keys
    alone = make_sweep("ila_pp", {"train": {"epochs": 3}, "model": {"ila_ds_locs": [0, 2], "backbone": TINY, "image_size": 128},
                                  "data": {"dataset": "cotton80"}}, out=tmp_path / "alone")
    assert [r.key for r in phase1_runs(grid.sweep(f"ila_pp+{TINY}", "cotton80"))] == [r.key for r in phase1_runs(alone)]
    plain = make_grid(["linear"], ["cotton80"], image_size=128, out=tmp_path, overrides=parse_overrides([f"model.backbone={MICRO}"]))
    assert plain.rows == ("linear",) and plain.sweeps()[0][2].name == "linear_cotton80" and plain.name == \
        make_grid(["linear"], ["cotton80"], image_size=128, out=tmp_path, overrides=parse_overrides([f"model.backbone={MICRO}"])).name
    assert grid.name != make_grid(["linear", "ila_pp"], ["cotton80"], image_size=128, out=tmp_path, overrides=over,
                                  backbones=(MICRO,)).name
    write_grid(grid)
    assert load_grid(grid.name, tmp_path) == grid
    for bad, msg in (({"overrides": parse_overrides([f"model.backbone={MICRO}"])}, "--set model.backbone: reproduce sets it"),
                     ({"row_overrides": {"linear": {"model": {"backbone": MICRO}}}}, "--set linear:model.backbone"),
                     ({"backbones": (MICRO, MICRO)}, "--backbones")):
        with pytest.raises(RecipeError, match=msg):
            make_grid(["linear"], ["cotton80"], image_size=128, out=tmp_path, **{"backbones": (MICRO, TINY), **bad})


def test_every_table_row_names_its_backbone(tmp_path):
    grid = make_grid(["linear"], ["cotton80"], image_size=64, seeds=(1,), lrs=(0.1,), backbones=(MICRO, TINY), out=tmp_path)
    for b, top1 in ((MICRO, 41.0), (TINY, 52.0)):  # one finished seed each
        sweep = grid.sweep(f"linear+{b}", "cotton80")
        (sweep.root / "runs/p2/eval/test").mkdir(parents=True)
        (sweep.root / "runs/p2/eval/test/metrics.json").write_text(json.dumps({"top1": top1, "num_classes": 80}))
        (sweep.root / "plan.json").write_text(json.dumps({"phase2": {"lr": 0.1, "runs": [{"seed": 1, "run": "runs/p2"}]}}))
    md = write_table(grid).read_text()
    assert f"| Linear probe | `{MICRO}` | 41.00 (n=1) (39.03, +1.97) |" in md
    assert f"| Linear probe | `{TINY}` | 52.00 (n=1) (39.03, +12.97) |" in md
    assert f"backbone per row ({MICRO}, {TINY})" in md
    wide = list(csv.DictReader(io.StringIO((grid.root / "table1.csv").read_text())))
    assert [(r["method"], r["backbone"], r["mean"]) for r in wide] == [("linear", MICRO, "41.0000"), ("linear", TINY, "52.0000")]
    long = list(csv.DictReader(io.StringIO((grid.root / "table1_long.csv").read_text())))
    assert [(r["row"], r["backbone"], r["top1"]) for r in long] == [("linear", MICRO, "41.0000"), ("linear", TINY, "52.0000")]
    tex = (grid.root / "table1.tex").read_text()
    assert "Method & Backbone &" in tex and r"Linear probe & ufgir\_vit\_micro\_patch8\_64 & 41.00 (n=1)" in tex


def test_compare_gives_each_backbone_its_marker():
    pts = [{"label": "ILA++ (backbone a)", "gmacs": 13.1, "top1": 75.0, "trainable": 507_062, "family": "ILA",
            "paper": False, "backbone": "vit_base_patch16_224.orig_in21k"},
           {"label": "ILA++ (backbone b)", "gmacs": 15.0, "top1": 80.0, "trainable": 507_062, "family": "ILA",
            "paper": False, "backbone": "vit_base_patch16_dinov3.lvd1689m"},
           {"label": "Linear probe", "gmacs": 17.6, "top1": 48.6, "trainable": 153_030, "family": "PETL",
            "paper": False, "backbone": "vit_base_patch16_dinov3.lvd1689m"}]
    marks = compare.backbone_markers(pts)
    assert marks == {"vit_base_patch16_224.orig_in21k": "o", "vit_base_patch16_dinov3.lvd1689m": "s"}
    assert compare.backbone_markers(pts[1:]) == {}  # one backbone: circles, no legend entry
    fig = compare.draw_compare(pts, title="t")
    ax = fig.axes[0]
    shapes = [c.get_paths()[0].vertices.shape[0] for c in ax.collections]
    assert shapes[0] != shapes[1] and shapes[1] == shapes[2]  # a circle's path has more vertices than a square's
    legend = ax.artists[0]
    assert legend.get_title().get_text() == "method family · backbone"
    assert [t.get_text() for t in legend.get_texts()][-2:] == ["vit_base_patch16_224", "vit_base_patch16_dinov3"]


def test_sweep_runs_one_sweep_per_backbone(tmp_path, small_synthetic):
    args = ["sweep", "-r", "linear", "--backbones", f"{MICRO},{TINY}", "--lr", "0.1", "--seeds", "1", "--out", str(tmp_path),
            "-q", *[a for s in (f"data.root={small_synthetic.parent}", f"data.dataset={small_synthetic.name}",
                                "data.num_workers=0", "model.weights=none", "model.image_size=64", "train.epochs=1",
                                "train.batch_size=8", "train.precision=fp32", "schedule.warmup_steps=1",
                                "logging.tensorboard=false") for a in ("--set", s)]]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2 and all((p / "sweep.json").is_file() for p in folders)
    backbones = {load_saved_recipe(next((p / "runs").glob("p2_*")) / "recipe.toml").model.backbone for p in folders}
    assert backbones == {MICRO, TINY}
    bad = runner.invoke(app, [*args, "--set", f"model.backbone={MICRO}"])
    assert bad.exit_code == 2 and "give the backbones in one place" in bad.output
