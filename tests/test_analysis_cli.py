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
from ufgir_cli.viz import figures, style

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
                              "--device", "cpu", "--dpi", "100", "--format", "pdf"])
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
    for name in ("cka_vs_lin", "features_vs_lin"):
        w, h = _size(out / f"{name}.png")
        assert w / h <= style.MAX_ASPECT and 400 < w < 1500  # 100 dpi
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert "figure: " + str(out / "cka_vs_lin.png") + " (+ .pdf)" in res.output


def test_metrics_refuses_minibatches_too_small_for_cka(runs):
    res = runner.invoke(app, ["metrics", str(runs["ila"]), "--batch-size", "3"])
    assert res.exit_code == 2 and "needs >= 4 images per minibatch" in _text(res)


def test_visualize_rollout_one_image_per_class(runs):
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--batch-size", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    folder = runs["ila"] / "analysis" / "visualize" / "rollout_groups_mean_test"
    grid = folder / "grid.png"
    # every file written, one per line, the grid's first; 4 of the 4 classes: no note
    assert res.stdout.splitlines() == [str(grid), *(str(p) for p in sorted(folder.glob("0*.png")))]
    assert "note" not in res.output
    w, h = _size(grid)
    assert w / h <= style.MAX_ASPECT
    # one image of each of the 4 classes (not the first 4 images, which are all of class 0)
    singles = sorted(p.name for p in folder.glob("0*.png"))
    assert singles == ["000_c00_000_test.png", "001_c01_000_test.png", "002_c02_000_test.png", "003_c03_000_test.png"]
    w, h = _size(folder / singles[0])
    assert w / h <= style.MAX_ASPECT
    # a smaller second call leaves no per-image file of the first behind, and nothing of the user's
    (folder / "my_notes.png").write_bytes(b"mine")
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    # two of four classes: spread over them, the first and the last, and said so
    assert "note: 2 of 4 classes shown" in res.stderr and "--batch-size 4 shows every class" in res.stderr
    assert sorted(p.name for p in folder.glob("*.png")) == ["000_c00_000_test.png", "001_c03_000_test.png",
                                                            "grid.png", "my_notes.png"]


def test_visualize_rollout_across_and_attention_on_files(runs, small_synthetic):
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--across", "--batch-size", "4",
                              "--per-class", "2", "--cols", "2", "--fusion", "max", "--device", "cpu",
                              "--dpi", "80", "--format", "svg", "--format", "pdf"])
    assert res.exit_code == 0, res.output
    folder = runs["ila"] / "analysis/visualize/rollout_across_max_test"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "000_c00_000_test.png", "001_c00_001_test.png", "002_c03_000_test.png", "003_c03_001_test.png", "grid.png"]
    assert sorted(p.name for p in folder.glob("grid.*")) == ["grid.pdf", "grid.png", "grid.svg"]
    w, h = _size(folder / "grid.png")
    assert h > w / 2  # two panels per row: two rows

    img = next((small_synthetic / "images" / "c01").glob("*_test.png"))
    ckpt = runs["ila"] / "checkpoints" / "last.pt"
    res = runner.invoke(app, ["visualize", "attention", str(ckpt), "--images", str(img), "--layer", "2",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    folder = runs["ila"] / "analysis" / "visualize" / "attention_l2_mean_images"
    w, h = _size(folder / "grid.png")
    assert w / h <= style.MAX_ASPECT
    assert (folder / f"000_{img.stem}.png").is_file()


def test_visualize_takes_folders_and_several_files_after_one_images(runs, small_synthetic, tmp_path):
    """--images takes a folder (searched for images) and several files after it (what a shell glob gives),
    RUN anywhere among them; your files are named under their panels; --format pdf prints every file."""
    mine = tmp_path / "mine"
    mine.mkdir()
    files = sorted((small_synthetic / "images" / "c02").glob("*_test.png"))[:2]
    for f in files:
        shutil.copy(f, mine / f.name)
    extra = sorted((small_synthetic / "images" / "c03").glob("*_test.png"))[:2]
    res = runner.invoke(app, ["visualize", "attention", "--images", str(mine), *map(str, extra), str(runs["ila"]),
                              "--device", "cpu", "--dpi", "60", "--format", "pdf", "--cmap", "viridis"])
    assert res.exit_code == 0, res.output
    folder = runs["ila"] / "analysis" / "visualize" / "attention_last_mean_images"
    printed = res.stdout.splitlines()
    assert printed[:2] == [str(folder / "grid.png"), str(folder / "grid.pdf")]
    stems = [f.stem for f in files] + [f.stem for f in extra]
    assert printed[2:] == [str(folder / f"{i:03d}_{stem}.{ext}") for i, stem in enumerate(stems) for ext in ("png", "pdf")]
    assert all(__import__("pathlib").Path(p).is_file() for p in printed)
    res = runner.invoke(app, ["visualize", "attention", str(runs["ila"]), str(extra[0]), "--device", "cpu"])
    assert res.exit_code == 2 and "images go after --images" in _text(res)
    res = runner.invoke(app, ["visualize", "attention", str(runs["ila"]), "--images", str(tmp_path / "none"),
                              "--device", "cpu"])
    assert res.exit_code == 2 and "no such file or folder" in _text(res)
    res = runner.invoke(app, ["visualize", "rollout", str(runs["ila"]), "--cmap", "not_a_map", "--device", "cpu"])
    assert res.exit_code == 2 and "not a matplotlib colour map" in _text(res)


def test_own_images_are_named_in_their_captions(runs, small_synthetic):
    from functools import partial

    from ufgir_cli.analysis.report import rollout_maps, visualize

    img = next((small_synthetic / "images" / "c01").glob("*_test.png"))
    shown = visualize(runs["ila"], partial(rollout_maps), images=[img], device="cpu")
    assert shown.captions[0][1:] == (None, img.name) and shown.classes is None
    fig = figures.draw_overlays(shown.images, shown.maps, shown.captions, title="t")
    assert img.name in {t.get_text() for t in fig.texts}


@pytest.mark.parametrize("args,message", [
    (["rollout", "--group", "1-2"], "blocks 1-2 span a down-sampling ILA"),
    (["rollout", "--group", "0-6"], "outside blocks 0-5; this model's groups: 0-1, 2-3, 4-5"),
    (["rollout", "--format", "eps"], "not one of pdf, svg"),
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

    from ufgir_cli.analysis.compare import compare_rows
    from ufgir_cli.analysis.report import block_attention, rollout_maps, visualize
    from ufgir_cli.errors import OptionError

    shown = visualize(runs["ila"], partial(rollout_maps, fusion="mean"), count=3, device="cpu")
    assert shown.images.shape == (3, 64, 64, 3) and shown.images.dtype.name == "uint8"
    # figures name blocks inclusively, the run by method and dataset, each image by its classes
    assert [label for label, _ in shown.maps] == ["blocks 0-1", "blocks 2-3", "blocks 4-5"]
    assert all(m.shape == (3, 64, 64) and 0 <= m.min() and m.max() <= 1 for _, m in shown.maps)
    assert shown.stems == ["c00_000_test", "c01_000_test", "c03_000_test"]
    assert shown.captions[0][1] == "layout_ab00" and shown.title == "ILA++ · Synthetic leaves"
    one = visualize(runs["ila"], partial(rollout_maps, group="2-3"), count=1, device="cpu")
    assert [label for label, _ in one.maps] == ["blocks 2-3"]
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
                              "--out", str(out), "--paper"])
    assert res.exit_code == 0, res.output
    w, h = _size(out)
    assert w / h <= style.MAX_ASPECT
    table = json.loads(out.with_suffix(".json").read_text())
    rows = {r["label"]: r for r in table["runs"]}
    assert set(rows) == {"ila", "lin", "soy"}
    ila_top1 = json.loads((runs["ila"] / "eval/test/metrics.json").read_text())["top1"]
    assert rows["ila"]["top1"] == ila_top1 and rows["ila"]["paper_top1_448px"] is None
    assert rows["soy"]["paper_top1_448px"] == 75.00 and "75.00" in res.output
    assert rows["ila"]["trainable"] > rows["lin"]["trainable"] and rows["ila"]["macs"] < rows["lin"]["macs"]
    assert "unevaluated" in table["skipped"][0] and "ufgir eval" in _text(res)
    assert (rows["soy"]["family"], rows["soy"]["method_title"], rows["lin"]["family"]) == ("ILA", "ILA++", "PETL")
    # --paper: Table 1's SoyAgeing row, at the cost we count for ViT-B/16 at 448 px (ILA.md: 67.06 G for ILA++)
    paper = {p["method"]: p for p in table["paper"]}
    assert len(paper) == 16 + 2 and {p["dataset"] for p in paper.values()} == {"soyageing"}  # + CLCA's Table I
    assert (paper["clca"]["top1"], paper["clca"]["label"]) == (87.4, "CLCA (keep 10 %) · SoyAgeing [CLCA, Table I]")
    assert paper["ila_pp"]["label"] == "ILA++ · SoyAgeing" and "paper points: CLCA (Rios et al., ICASSP 2025) Table I" in _text(res)
    assert (paper["simtrans"]["method_title"], paper["simtrans"]["top1"]) == ("SIMT* (full fine-tuning)", 34.76)
    assert paper["transfg_ft"]["method_title"] == "TrFG* (full fine-tuning)" and paper["ifa"]["method_title"] == "IFA"
    assert (paper["ifa"]["family"], paper["ifa"]["top1"], paper["mpncov"]["family"]) == ("FGIR", 56.01, "FGIR")
    assert paper["ila_pp"]["top1"] == 75.00 and f"{paper['ila_pp']['gmacs']:.2f}" == "67.06"

    res = runner.invoke(app, ["compare", str(unevaluated)])  # listed with the command that evaluates it
    assert res.exit_code == 1 and "nothing to compare" in _text(res) and "ufgir eval" in _text(res)


def test_compare_aggregates_seeds_and_reads_sweep_folders(runs, tmp_path):
    """A sweep folder stands for its runs; runs that differ only in their seed are one point, mean ± sample std;
    two points of one method are told apart by the setting they differ in."""
    import statistics

    sweep = tmp_path / "sweeps" / "lin"
    (sweep / "plan.json").parent.mkdir(parents=True)
    (sweep / "plan.json").write_text("{}")
    top1 = {1: 30.0, 10: 34.0, 100: 35.0}
    for seed, value in top1.items():
        run = sweep / "runs" / f"p2_seed{seed}"
        shutil.copytree(runs["lin"], run, ignore=shutil.ignore_patterns("analysis", "events.*"))
        text = (run / "recipe.toml").read_text()
        (run / "recipe.toml").write_text(re.sub(r"\nseed = \d+", f"\nseed = {seed}", text))
        m = json.loads((run / "eval/test/metrics.json").read_text())
        (run / "eval/test/metrics.json").write_text(json.dumps({**m, "top1": value}))
    phase1 = sweep / "runs" / "p1_lr0.1"  # evaluated on val only: counted, not compared
    shutil.copytree(runs["lin"], phase1, ignore=shutil.ignore_patterns("analysis", "events.*", "eval"))
    other = tmp_path / "lin_lr"  # the linear probe at another learning rate: a point of its own
    shutil.copytree(runs["lin"], other, ignore=shutil.ignore_patterns("analysis", "events.*"))
    text = (other / "recipe.toml").read_text()
    (other / "recipe.toml").write_text(re.sub(r"\nlr = [0-9.e-]+", "\nlr = 0.03", text, count=1))
    out = tmp_path / "cmp.png"
    res = runner.invoke(app, ["compare", str(sweep), str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "1 of its 4 runs have no eval/test/metrics.json" in _text(res)
    table = json.loads(out.with_suffix(".json").read_text())
    assert len(table["runs"]) == 4 and len(table["points"]) == 2
    seeds = next(p for p in table["points"] if p["n"] == 3)
    assert sorted(seeds["seeds"]) == [1, 10, 100]
    assert seeds["top1"] == pytest.approx(statistics.mean(top1.values()))
    assert seeds["std"] == pytest.approx(statistics.stdev(top1.values()))
    lr = {p["n"]: p["label"] for p in table["points"]}
    assert lr[3].startswith("Linear probe (lr ") and lr[1] == "Linear probe (lr 0.03)" and lr[1] != lr[3]
    assert f"{seeds['top1']:.2f} ± {seeds['std']:.2f}" in res.output and "(n=1)" in res.output
    # a reproduction folder (grid.json, sweeps/*/plan.json) stands for every sweep's runs
    (tmp_path / "grid.json").write_text("{}")
    res = runner.invoke(app, ["compare", str(tmp_path), "--out", str(tmp_path / "grid_cmp.png")])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "grid_cmp.json").read_text())["runs"]) == 3
