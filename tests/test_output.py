"""Issue 37, output a person reads and output a program reads: nothing cut, nothing wrapped in a pipe,
every recipe key shown and described, honest tables, and the small things (counts, warnings)."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.recipe import load_recipe, parse_overrides
from ufgir_cli.recipe_docs import recipe_keys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

runner = CliRunner()


def _commands(group, path=()):
    """Every command of the CLI (groups included) as its argument path."""
    yield path
    if hasattr(group, "commands"):  # a group (Typer may carry its own click: no isinstance)
        for name, cmd in group.commands.items():
            yield from _commands(cmd, (*path, name))


# ---- 2. never cut, never wrap what a program reads -------------------------------------------

def test_no_help_cuts_a_path_or_default_at_80_columns():
    import typer.main

    root = typer.main.get_command(app)
    paths = list(_commands(root))
    assert len(paths) > 20
    for path in paths:
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert res.exit_code == 0, (path, res.output)
        assert "…" not in res.output, (path, [line for line in res.output.splitlines() if "…" in line])
    # a default longer than its column is folded onto the next line, whole
    res = runner.invoke(app, ["reproduce", "--help"], env={"COLUMNS": "80"})
    flat = re.sub(r"[\s│]", "", res.output)
    assert "cotton80,soyageing,soygene,soyglobal,soylocal" in flat


def test_quiet_log_records_are_one_line_each_in_a_pipe(capsys, monkeypatch):
    from ufgir_cli.cli.progress import RichProgress

    monkeypatch.setenv("COLUMNS", "80")
    record = {"step": 120, "epoch": 2.5, "time": 1.0, **{f"test/metric_{k}": 0.123456 * k for k in range(12)},
              "train/loss": 1.23456789, "train/lr": 3e-4}
    RichProgress(quiet=True).on_log(record)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and len(out) > 200
    assert out.startswith("step=120 epoch=2.5 ") and "train/lr=0.0003" in out and "time=" not in out


def test_consoles_do_not_wrap_in_a_pipe_and_tables_never_cut_on_a_terminal(monkeypatch):
    from rich.table import Table

    from ufgir_cli.cli._common import UNWRAPPED_WIDTH, UfgirConsole

    monkeypatch.setenv("COLUMNS", "80")
    piped = UfgirConsole(file=io.StringIO())
    assert not piped.is_terminal and piped.width == UNWRAPPED_WIDTH
    piped.print("x " * 200)
    assert piped.file.getvalue().count("\n") == 1
    path = "/a/very/long/path/" + "folder_" * 12 + "run/checkpoints/last.pt"
    t = Table("what", "where")
    t.add_row("run folder", path)
    term = UfgirConsole(file=io.StringIO(), force_terminal=True, width=60, color_system=None)
    term.print(t)
    text = term.file.getvalue()
    assert "…" not in text and path in re.sub(r"[\s│]", "", text)  # folded onto more lines, every character kept


# ---- 3. every key, described -------------------------------------------------------------------

def test_recipes_show_prints_every_key_and_still_loads(tmp_path):
    res = runner.invoke(app, ["recipes", "show", "quickstart"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for k in recipe_keys():
        section, _, leaf = k.key.rpartition(".")
        assert re.search(rf"^(# )?{leaf}( =| \(unset\))", text, re.M), k.key
    assert "# depth (unset): " in text and "# compile (unset): torch.compile" in text
    assert "# num_classes (unset): Taken from the dataset" in text
    (tmp_path / "shown.toml").write_text(text)
    assert load_recipe(tmp_path / "shown.toml") == load_recipe("quickstart")
    assert tomllib.loads(text)["model"]["backbone"] == "ufgir_vit_micro_patch8_64"


def test_recipes_keys_lists_every_key_with_type_default_and_description():
    keys = recipe_keys()
    assert len(keys) > 70 and all(k.description for k in keys), [k.key for k in keys if not k.description]
    res = runner.invoke(app, ["recipes", "keys"])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    for k in keys:  # one line per key when piped, the description on it
        line = next(x for x in lines if re.search(rf"│ {re.escape(k.key)} +│", x))
        assert k.description[:40] in line, k.key
    res = runner.invoke(app, ["recipes", "keys", "train.e"])
    rows = [x for x in res.stdout.splitlines() if x.startswith("│")]
    assert [x.split("│")[1].strip() for x in rows] == ["train.epochs"]
    assert "│ int " in rows[0] and "│ 50 " in rows[0] and "Passes over the training split." in rows[0]
    res = runner.invoke(app, ["recipes", "keys", "nope"])
    assert res.exit_code == 2 and "sections: description, data, model" in res.output


def test_inspect_describes_this_model_and_its_aggregator_block():
    micro = ["--set", "model.backbone=ufgir_vit_micro_patch8_64", "--set", "model.image_size=64", "--num-classes", "10"]
    res = runner.invoke(app, ["inspect", "-r", "ila_plus", *micro])
    assert res.exit_code == 0, res.output
    assert ("ILA+ on this 6-block backbone: down-sampling ILA after blocks 1 and 3 + same-resolution ILA after "
            "blocks 0, 2, 4 and 5") in res.stdout
    assert "blocks 3 and 7" not in res.stdout
    for recipe, blocks in (("transfg", 5), ("glsim", 6)):
        res = runner.invoke(app, ["inspect", "-r", recipe, *micro])
        assert res.exit_code == 0, res.output
        row = next(x for x in res.stdout.splitlines() if "aggregator block (in the head)" in x)
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[:2] == [str(blocks), "head"]
        block = int(cells[-1].replace(",", ""))
        foot = re.search(r"aggregator block ([\d,]+); head ([\d,]+) for 10 classes", res.stdout)
        assert foot and int(foot[1].replace(",", "")) == block > 10 * int(foot[2].replace(",", "")) // 10
        assert int(foot[2].replace(",", "")) < block  # the head is the classifier alone, not the 7 M block


def test_an_ila_method_without_ila_positions_is_refused():
    from ufgir_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="has no ILA and would train as 'linear'"):
        load_recipe("ila", {"model": {"ila_ds_locs": []}})
    with pytest.raises(RecipeError, match="would train as 'adapter'.*--set model.method=adapter"):
        load_recipe("ila_pp", {"model": {"ila_ds_locs": [], "ila_locs": []}})
    assert load_recipe("ila_plus", {"model": {"ila_ds_locs": []}}).model.ila_locs  # same-resolution ILA: kept


# ---- 4. tables ---------------------------------------------------------------------------------

def _fake_grid(tmp_path, seeds_of):
    """A 2-row x 1-dataset grid with made-up metrics.json files: ``seeds_of[row]`` seeds finished."""
    from ufgir_cli.reproduce import make_grid

    grid = make_grid(["linear", "ila_pp"], ["cotton80"], image_size=64, seeds=(1, 10), lrs=(0.1, 0.03),
                     overrides=parse_overrides(["model.backbone=ufgir_vit_micro_patch8_64"]), out=tmp_path)
    top1 = {}
    for row in grid.methods:
        sweep = grid.sweep(row, "cotton80")
        runs = []
        for seed in seeds_of[row]:
            top1[row, seed] = 40.0 + seed / 10 + (5 if row == "ila_pp" else 0)
            run = f"runs/p2_lr0.03_seed{seed}"
            (sweep.root / run / "eval" / "test").mkdir(parents=True)
            (sweep.root / run / "eval" / "test" / "metrics.json").write_text(json.dumps(
                {"top1": top1[row, seed], "top5": 90.0, "per_class_mean": 39.5, "num_classes": 80}))
            runs.append({"seed": seed, "lr": 0.03, "run": run})
        (sweep.root / "plan.json").write_text(json.dumps({"phase2": {"lr": 0.03, "runs": runs}}))
    return grid, top1


def test_table_says_n1_the_chosen_lr_and_writes_a_long_csv_and_a_tex_float(tmp_path):
    from ufgir_cli.reproduce import write_table

    grid, top1 = _fake_grid(tmp_path, {"linear": (1, 10), "ila_pp": (1,)})
    md = write_table(grid).read_text()
    assert "± -" not in md and "1 tasks" not in md and "TTP (M, 1 task)" in md
    linear = [top1["linear", s] for s in (1, 10)]
    assert f"| Linear probe | `ufgir_vit_micro_patch8_64` | {statistics.mean(linear):.2f} ± {statistics.stdev(linear):.2f} (39.03, " in md
    assert f"| ILA++ | `ufgir_vit_micro_patch8_64` | {top1['ila_pp', 1]:.2f} (n=1) (" in md
    assert "- Linear probe (ufgir_vit_micro_patch8_64): Cotton80 0.03" in md  # the learning rate each chose
    assert "- ILA++ (ufgir_vit_micro_patch8_64): Cotton80 0.03" in md
    wide = list(csv.DictReader(io.StringIO((grid.root / "table1.csv").read_text())))
    assert [(r["method"], r["n"], r["lr"]) for r in wide] == [("linear", "2", "0.03"), ("ila_pp", "1", "0.03")]
    assert wide[1]["std"] == "" and "seeds" not in wide[0]  # no per-seed values packed into one field
    long = list(csv.DictReader(io.StringIO((grid.root / "table1_long.csv").read_text())))
    assert list(long[0])[:8] == ["method", "recipe", "row", "backbone", "image_size", "dataset", "seed", "lr"]
    assert [(r["method"], r["seed"], float(r["top1"])) for r in long] == [
        ("linear", "1", top1["linear", 1]), ("linear", "10", top1["linear", 10]), ("ila_pp", "1", top1["ila_pp", 1])]
    assert {(r["backbone"], r["image_size"], r["dataset"], r["lr"]) for r in long} == {
        ("ufgir_vit_micro_patch8_64", "64", "cotton80", "0.03")}
    assert long[0]["paper_top1"] == "39.0300" and long[0]["run"].endswith("p2_lr0.03_seed1")
    tex = (grid.root / "table1.tex").read_text()
    assert tex.startswith("% ") and r"\usepackage{booktabs}" in tex.splitlines()[0]
    for part in (r"\begin{table}", r"\caption{", r"\label{tab:ufgir-", r"\toprule", r"\end{table}", "64\\,px",
                 r"ufgir\_vit\_micro\_patch8\_64", "ViT-B/16 at 448 px", "not like for like", "(n=1)"):
        assert part in tex, part
    assert tex.count("{") == tex.count("}")


def test_plural():
    from ufgir_cli.io import plural

    assert (plural(1, "task"), plural(2, "task"), plural(0, "image"), plural(1, "minibatch", "minibatches"),
            plural(3, "minibatch", "minibatches")) == ("1 task", "2 tasks", "0 images", "1 minibatch", "3 minibatches")


# ---- 6. small things ---------------------------------------------------------------------------

def test_make_demo_prints_results_once():
    from pathlib import Path

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "ufgir) eval" in demo.lower() or "$(UFGIR) eval" in demo
    assert "echo \"results:" not in demo  # `ufgir eval` prints it


def test_eval_warns_on_a_split_it_trained_on_and_tensorboard_has_the_recipe(tiny_runs, small_synthetic, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from ufgir_cli.recipe_sections import splits_share_images

    assert splits_share_images("train_val", "val") and splits_share_images("train", "train_val")
    assert not splits_share_images("train", "val") and not splits_share_images("train_val", "test")
    run = tiny_runs("linear")
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    res = runner.invoke(app, ["eval", str(run), "--split", "val", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "warning: the model trained on train_val, which shares its images with val" in " ".join(res.stderr.split())
    res = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert res.exit_code == 0 and "warning" not in res.output and res.stdout.count("results:") == 1

    events = EventAccumulator(str(run))
    events.Reload()
    recipe_text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'method = "linear"' in recipe_text and "[optim]" in recipe_text
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["model.method"].string_value == "linear" and hp["train.epochs"].number_value == 1
    assert hp["optim.lr"].number_value == pytest.approx(load_recipe("quickstart").optim.lr)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "test/top1" in {m.name.tag for m in experiment.metric_infos}
