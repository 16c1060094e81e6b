"""Issue 36, parts 4 and 5: one line instead of a traceback (and before torch is imported when the
arguments alone are wrong), "did you mean" for near misses, and nothing a command writes replaces
results it did not make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.data.loaders import dataset_root
from ufgir_cli.engine.analyze import merge_metrics
from ufgir_cli.errors import RecipeError
from ufgir_cli.recipe import load_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


# ---- argument errors: refused before torch is imported --------------------------------------------

_BEFORE_TORCH = """
import sys
from typer.testing import CliRunner
from ufgir_cli.cli import app
res = CliRunner().invoke(app, sys.argv[1:])
print(res.exit_code, "torch" in sys.modules)
print(res.output)
"""


@pytest.mark.parametrize("args, says", [
    (["eval", "RUN", "--precision", "banana"], "'banana' is not one of auto, fp32, bf16, fp16"),
    (["eval", "RUN", "--split", "bogus"], "'bogus' is not one of train, val, train_val, test"),
    (["metrics", "RUN", "--split", "tset"], "'tset' is not one of train, val, train_val, test"),
    (["eval", "RUN", "--device", "gpu"], "'gpu' is not a device"),
    (["train", "-r", "quickstart", "--device", "cuda0"], "'cuda0' is not a device"),
    (["eval", "model.onnx"], "`ufgir eval` reads run folders, checkpoints (.pt) and .safetensors exports"),
    (["export", "RUN", "--format", "banana"], "'banana' is not one of safetensors, onnx, pt2, peft"),
])
def test_bad_arguments_are_refused_before_torch(tmp_path, args, says):
    (tmp_path / "RUN").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", _BEFORE_TORCH, *args], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    code, torch_loaded = out.stdout.split("\n", 1)[0].split()
    assert code == "2" and torch_loaded == "False", out.stdout + out.stderr
    assert says in " ".join(out.stdout.split()), out.stdout
    if args[1] == "model.onnx":
        assert "ufgir predict model.onnx IMAGES" in out.stdout


# ---- did you mean, any case, the variable named ----------------------------------------------------

@pytest.mark.parametrize("overrides, says", [
    ({"model": {"methd": "linear"}}, "unknown recipe key 'model.methd' (did you mean 'method'?)"),
    ({"model": {"method": "lineer"}}, "unknown method 'lineer' (did you mean 'linear'?)"),
])
def test_near_miss_keys_and_methods_are_suggested(overrides, says):
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstart", overrides)
    assert says in str(err.value)


def test_near_miss_checkpoint_tag_is_suggested(tmp_path):
    from ufgir_cli.errors import CheckpointError
    from ufgir_cli.model.checkpoint import resolve_checkpoint

    with pytest.raises(CheckpointError, match=r"--checkpoint 'bset' is neither .* \(did you mean 'best'\?\)"):
        resolve_checkpoint(tmp_path, "bset")


def test_near_miss_recipe_is_suggested():
    with pytest.raises(RecipeError, match=r"recipe 'quikstart' not found \(did you mean 'quickstart'\?\)"):
        load_recipe("quikstart")


def test_an_environment_value_names_its_variable(monkeypatch):
    monkeypatch.setenv("UFGIR_TRAIN__EPOCHS", "abc")
    with pytest.raises(RecipeError, match=r"'train.epochs' \(from environment variable UFGIR_TRAIN__EPOCHS\)"):
        load_recipe("quickstart")


def test_dataset_names_are_case_insensitive(tmp_path, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(tmp_path))
    assert dataset_root(load_recipe("quickstart", {"data": {"dataset": "Cotton80"}})) == tmp_path / "cotton80"
    seen = {}

    def fake_fit(recipe, run_dir, **kw):
        seen["dataset"] = recipe.data.dataset
        raise SystemExit(0)

    monkeypatch.setattr("ufgir_cli.engine.train.fit", fake_fit)
    runner.invoke(app, ["train", "-r", "quickstart", "--dataset", "SoyLocal", "--out", str(tmp_path)])
    assert seen == {"dataset": "soylocal"}


# ---- one line instead of a traceback --------------------------------------------------------------

@pytest.mark.parametrize("backbone, says", [
    ("resnet50", "model.backbone 'resnet50' is not a plain timm VisionTransformer"),
    ("vit_smal_patch16_224", "is not a timm model (did you mean 'vit_small_patch16_224'?)"),
])
def test_a_backbone_that_cannot_work_is_one_line(backbone, says, small_synthetic, tmp_path):
    res = runner.invoke(app, ["train", "-r", "linear", "--out", str(tmp_path), "--set", f"model.backbone='{backbone}'",
                              "--set", f"data.root='{small_synthetic}'", "--set", "model.weights='timm'"])
    assert says in _one_error_line(res)
    assert not any(tmp_path.iterdir())  # nothing written, nothing downloaded


def test_slurm_launcher_without_slurm_is_one_line(tmp_path, monkeypatch, small_synthetic):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no sacct
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    res = runner.invoke(app, ["reproduce", "--methods", "linear", "--datasets", "synthetic", "--image-size", "64",
                              "--seeds", "1", "--lr", "0.1", "--name", "g", "--out", str(tmp_path / "rep"),
                              "--launcher", "slurm", "--set", "model.weights='none'"])
    line = _one_error_line(res)
    assert "--launcher slurm: no Slurm here (sbatch and sacct not on PATH)" in line and "--launcher local" in line


def test_truncated_onnx_in_predict_is_one_line(tiny_runs, tmp_path, small_synthetic):
    pytest.importorskip("onnxruntime")
    run = tiny_runs("linear")
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 3])
    img = next((small_synthetic / "images").rglob("*.png"))
    line = _one_error_line(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), str(img)]))
    assert "is not a readable ONNX model" in line and "ufgir export RUN --format onnx" in line


# ---- nothing overwritten --------------------------------------------------------------------------

def test_eval_of_an_export_leaves_the_runs_own_results(tiny_runs, tmp_path, small_synthetic, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    run = tmp_path / "run"
    shutil.copytree(tiny_runs("linear"), run)
    own = (run / "eval" / "test" / "metrics.json").read_bytes()
    assert runner.invoke(app, ["export", str(run)]).exit_code == 0
    res = runner.invoke(app, ["eval", str(run / "export" / "model.safetensors"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (run / "eval" / "test" / "metrics.json").read_bytes() == own
    exported = json.loads((run / "eval" / "export" / "model.safetensors" / "test" / "metrics.json").read_text())
    assert exported["top1"] == json.loads(own)["top1"]  # the same weights, evaluated again


def test_metrics_merge_keeps_blocks_not_computed_again():
    cost = {"params_total": 10}
    old = {"run": "r", "checkpoint": "best", "split": "test", "cost": cost, "features": {"f": 1},
           "attention_cka": {"c": 1}, "figures": {"cka": "cka.png"}}
    new = {"run": "r", "checkpoint": "best", "split": "test", "attention_cka": {"c": 2},
           "vs": {"run": "o", "checkpoint": "best"}, "figures": {"cka": "cka_vs_o.png"}}
    merged = merge_metrics(old, new)
    assert merged["cost"] == cost and merged["features"] == {"f": 1} and merged["attention_cka"] == {"c": 2}
    assert merged["figures"] == {"cka": "cka_vs_o.png"} and merged["vs"] == new["vs"]
    # another split: the old image blocks are not this split's, and go; the cost is the model's, and stays
    moved = merge_metrics(old, {**new, "split": "val"})
    assert "features" not in moved and moved["cost"] == cost
    # another checkpoint: nothing carries over
    assert merge_metrics(old, {**new, "checkpoint": "last"}) == {**new, "checkpoint": "last"}


def test_metrics_vs_no_cost_keeps_the_earlier_cost(tiny_runs, tmp_path, small_synthetic, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    run = tmp_path / "run"
    shutil.copytree(tiny_runs("linear"), run)
    first = runner.invoke(app, ["metrics", str(run), "--no-attention-cka", "--no-features", "--device", "cpu"])
    assert first.exit_code == 0, first.output
    cost = json.loads((run / "analysis" / "metrics.json").read_text())["cost"]
    res = runner.invoke(app, ["metrics", str(run), "--vs", str(tiny_runs("linear")), "--no-cost", "--no-features",
                              "--device", "cpu", "--dpi", "50"])
    assert res.exit_code == 0, res.output
    doc = json.loads((run / "analysis" / "metrics.json").read_text())
    assert doc["cost"] == cost and doc["attention_cka"]["images"] > 0 and doc["vs"]["method"] == "linear"
