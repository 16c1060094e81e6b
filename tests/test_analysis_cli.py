"""`ufgir metrics`, `ufgir visualize` and `ufgir compare` on two tiny trained runs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.viz import figures

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(small_synthetic, tmp_path_factory):
    """An ILA++ run and a linear-probe run (micro ViT, random backbone, one epoch), both evaluated on test."""
    from ufgir_cli.engine.report import eval_run
    from ufgir_cli.engine.train import fit
    from ufgir_cli.recipe import load_recipe

    base = tmp_path_factory.mktemp("analysis_runs")
    out = {}
    for name, model in (("ila", {}), ("lin", {"method": "linear", "ila_ds_locs": []})):
        recipe = load_recipe("quickstart", {
            "model": {"weights": "none", **model},
            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
            "data": {"num_workers": 0, "root": str(small_synthetic)},
        })
        fit(recipe, base / name)
        eval_run(base / name, device="cpu")
        out[name] = base / name
    return out


def _text(res) -> str:
    """The command's output as one line: no box drawing, wrapped lines joined."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())


def _size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        return im.size


def test_metrics_with_vs_writes_json_and_figures(runs):
    res = runner.invoke(app, ["metrics", str(runs["ila"]), "--batch-size", "5", "--vs", str(runs["lin"]),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = runs["ila"] / "analysis"
    doc = json.loads((out / "metrics.json").read_text())
    cka = doc["attention_cka"]
    # 16 test images in minibatches of 5, 5, 5, 1: the last one is left out and said so
    assert cka["skipped_minibatch_sizes"] == [1] and cka["images"] == 15 and cka["minibatches"] == 3
    assert "left out 1 minibatch(es) of fewer than 4 images (1)" in _text(res)
    m = torch.tensor(cka["matrix"], dtype=torch.float64)
    assert m.shape == (6, 6) and torch.equal(m, m.T)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(6, dtype=torch.float64))
    assert doc["tokens_per_block"] == [65, 37, 37, 17, 17, 17]
    assert doc["encoder_groups"] == [[0, 2], [2, 4], [4, 6]]
    assert len(doc["features"]["attention_entropy"]) == 6

    from ufgir_cli.analysis.cost import count_flops, count_params
    from ufgir_cli.model.checkpoint import load_run

    model, _ = load_run(runs["ila"])
    cost = doc["cost"]
    assert cost["macs"] == count_flops(model, 64) // 2 and cost["params_trainable"] == count_params(model).trainable
    assert cost["images_per_s"] > 0 and cost["batch_size"] == 8
    assert f"trainable {cost['params_trainable']:,}" in _text(res)

    vs = doc["vs"]
    assert vs["method"] == "linear" and vs["tokens_per_block"] == [65] * 6 and vs["attention_cka"]["images"] == 15
    assert doc["figures"] == {"cka": "cka_vs_lin.png", "features": "features_vs_lin.png"}
    assert _size(out / "cka_vs_lin.png") == (2 * figures.CKA_PX[0], figures.CKA_PX[1])
    assert _size(out / "features_vs_lin.png") == figures.FEATURES_PX


def test_metrics_refuses_minibatches_too_small_for_cka(runs):
    res = runner.invoke(app, ["metrics", str(runs["ila"]), "--batch-size", "3"])
    assert res.exit_code == 2 and "needs >= 4 images per minibatch" in _text(res)


def test_visualize_rollout_one_panel_per_group(runs):
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--batch-size", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    folder = runs["ila"] / "analysis" / "visualize" / "rollout_groups_mean_test"
    grid = folder / "grid.png"
    assert res.output.strip() == str(grid)
    pw, ph = figures.PANEL_PX
    # groups 0-2, 2-4, 4-6: three panels per image, two images per row of (at most) 8 panels
    assert _size(grid) == (6 * pw + figures.COLORBAR_PX, 2 * ph)
    singles = sorted(p.name for p in folder.glob("0*.png"))
    assert singles == ["000_c00_000_test.png", "001_c00_001_test.png", "002_c00_002_test.png", "003_c00_003_test.png"]
    assert _size(folder / singles[0]) == (3 * pw + figures.COLORBAR_PX, ph)
    # a smaller second call leaves no per-image file of the first behind, and nothing of the user's
    (folder / "my_notes.png").write_bytes(b"mine")
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.glob("*.png")) == ["000_c00_000_test.png", "001_c00_001_test.png",
                                                            "grid.png", "my_notes.png"]


def test_visualize_rollout_across_and_attention_on_files(runs, small_synthetic):
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--across", "--batch-size", "3",
                              "--cols", "2", "--fusion", "max", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pw, ph = figures.PANEL_PX
    assert _size(runs["ila"] / "analysis/visualize/rollout_across_max_test/grid.png") == (2 * pw + figures.COLORBAR_PX, 2 * ph)

    img = next((small_synthetic / "images" / "c01").glob("*_test.png"))
    ckpt = runs["ila"] / "checkpoints" / "last.pt"
    res = runner.invoke(app, ["visualize", "attention", str(ckpt), "--images", str(img), "--layer", "2",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    folder = runs["ila"] / "analysis" / "visualize" / "attention_l2_mean_images"
    assert _size(folder / "grid.png") == (pw + figures.COLORBAR_PX, ph)
    assert (folder / f"000_{img.stem}.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["rollout", "--group", "1-3"], "spans a down-sampling ILA"),
    (["rollout", "--group", "0-2", "--across"], "exclude each other"),
    (["attention", "--layer", "6"], "not a block of this 6-block model"),
    (["attention", "--fusion", "median"], "not one of mean, max, min"),
])
def test_visualize_bad_options(runs, args, message):
    res = runner.invoke(app, ["visualize", args[0], str(runs["ila"]), "--batch-size", "1", "--device", "cpu", *args[1:]])
    assert res.exit_code == 2 and message in _text(res)


def test_analysis_report_as_a_library(runs):
    """What the commands draw is computed by ufgir_cli.analysis.report, callable without the CLI."""
    from functools import partial

    from ufgir_cli.analysis.report import block_attention, compare_rows, rollout_maps, visualize
    from ufgir_cli.errors import OptionError

    shown = visualize(runs["ila"], partial(rollout_maps, fusion="mean"), count=3, device="cpu")
    assert shown.images.shape == (3, 64, 64, 3) and shown.images.dtype.name == "uint8"
    assert [label for label, _ in shown.maps] == ["rollout 0-2", "rollout 2-4", "rollout 4-6"]
    assert all(m.shape == (3, 64, 64) and 0 <= m.min() and m.max() <= 1 for _, m in shown.maps)
    assert shown.stems[0] == "c00_000_test" and shown.titles[0].startswith("c00_000_test\ntrue layout_ab00 · pred ")
    with pytest.raises(OptionError, match="--layer: 6 is not a block"):
        visualize(runs["ila"], partial(block_attention, layer=6), count=1, device="cpu")
    rows, missing = compare_rows([runs["lin"], runs["ila"] / "nothing"])
    assert [r["method"] for r in rows] == ["linear"] and "does not exist" in missing[0]


def test_compare_table_plot_and_paper_number(runs, tmp_path):
    # a copy of the ILA++ run relabelled as SoyAgeing picks up the paper's 75.00 (ILA++ at 448 px)
    soy = tmp_path / "soy"
    shutil.copytree(runs["ila"] / "eval", soy / "eval")
    text = (runs["ila"] / "recipe.toml").read_text()
    (soy / "recipe.toml").write_text(text.replace('dataset = "synthetic"', 'dataset = "soyageing"'))
    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    shutil.copy(runs["lin"] / "recipe.toml", unevaluated / "recipe.toml")
    out = tmp_path / "cmp.png"
    res = runner.invoke(app, ["compare", str(runs["ila"]), str(runs["lin"]), str(soy), str(unevaluated),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert _size(out) == figures.SCATTER_PX
    table = json.loads(out.with_suffix(".json").read_text())
    rows = {r["label"]: r for r in table["runs"]}
    assert set(rows) == {"ila", "lin", "soy"}
    ila_top1 = json.loads((runs["ila"] / "eval/test/metrics.json").read_text())["top1"]
    assert rows["ila"]["top1"] == ila_top1 and rows["ila"]["paper_top1_448px"] is None
    assert rows["soy"]["paper_top1_448px"] == 75.00 and "75.00" in res.output
    assert rows["ila"]["trainable"] > rows["lin"]["trainable"] and rows["ila"]["macs"] < rows["lin"]["macs"]
    assert "unevaluated" in table["skipped"][0] and "ufgir eval" in _text(res)

    res = runner.invoke(app, ["compare", str(unevaluated)])
    assert res.exit_code == 2 and "none of the runs has eval/test/metrics.json" in _text(res)
