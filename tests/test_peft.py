"""LoRA in and out (issue 31): peft adapter folders written and read, merged exports.

Checked with peft and timm themselves on the micro ViT (its shipped weights, no Hub): the folder that
`ufgir export --format peft` writes loads with ``PeftModel.from_pretrained`` on a plain timm model, by the
README's own code, and gives the run's logits; `ufgir import-peft` makes a run that evaluates as the
original did; `ufgir export --merge` leaves a plain timm ViT's tensors that compute the unmerged model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ufgir_cli
from ufgir_cli.cli import app
from ufgir_cli.model import build_model
from ufgir_cli.model.backbone import MICRO
from ufgir_cli.recipe import load_recipe
from ufgir_cli.ship import parity_batch
from ufgir_cli.ship.runs import write_imported_run

runner = CliRunner()
PEFT_METHODS = ("lora", "dora", "glora")
#: The micro ViT as the quickstart recipe runs it (timm's LayerNorm eps).
MICRO_MODEL = {"backbone": MICRO, "image_size": 64, "weights": "timm"}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *words: str) -> None:
    assert res.exit_code != 0, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def made_run(root: Path, method: str, **model) -> Path:
    """A run folder of ``method`` on the micro ViT with every trainable tensor moved off its start (a LoRA's
    B off zero), saved as a training run saves it; the lora recipe's own numerics (the reference's
    LayerNorm eps 1e-12, not timm's) unless ``model`` says otherwise."""
    recipe = load_recipe(method, {"model": {**MICRO_MODEL, **model}, "data": {"dataset": "synthetic"}})
    torch.manual_seed(0)
    m = build_model(recipe.model, 4)
    sha = m.backbone_sha256()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    root.mkdir(parents=True, exist_ok=True)
    stand_in = root / f"{method}.source"
    stand_in.write_text("made by the test")
    return write_imported_run(root / method, m, recipe, imported_from=stand_in, import_format="test",
                              backbone_sha256=sha).root


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root, runs = tmp_path_factory.mktemp("made"), {}

    def get(method: str) -> Path:
        if method not in runs:
            runs[method] = made_run(root, method)
        return runs[method]

    return get


@pytest.fixture(scope="module")
def lora_run(small_synthetic, tmp_path_factory) -> Path:
    """A LoRA run of one epoch on the micro ViT, trained through the CLI, evaluated on test."""
    out = tmp_path_factory.mktemp("lora")
    sets = {"data.dataset": "synthetic", "data.root": str(small_synthetic.parent), "data.num_workers": "0",
            "model.backbone": MICRO, "model.image_size": "64", "model.weights": "timm", "model.numerics": "backbone",
            "train.epochs": "1", "train.batch_size": "8", "train.precision": "fp32", "eval.every": "0",
            "logging.tensorboard": "false", "optim.lr": "0.05", "schedule.warmup_steps": "2"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["train", "--recipe", "lora", "--out", str(out), "--name", "run", "--quiet", *args])
    assert res.exit_code == 0, res.output
    run = out / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
        res = invoke("eval", run)
    assert res.exit_code == 0, res.output
    return run


def readme_model(folder: Path):
    """The model that the README's Python block builds, run as a user runs it."""
    text = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "timm.create_model(" in code and "PeftModel.from_pretrained(" in code
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own code is what is under test
    return scope["model"]


# ---- export --format peft ---------------------------------------------------------------------------


def test_a_trained_lora_exports_a_peft_folder_that_plain_peft_loads_with_the_runs_logits(lora_run):
    from peft import PeftModel

    res = invoke("export", lora_run, "--format", "peft")
    assert res.exit_code == 0, res.output
    folder = lora_run / "export" / "peft"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {f.name for f in folder.iterdir()}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"] and config["r"] == 8
    import timm

    model, _ = ufgir_cli.load_run(lora_run)  # what `ufgir eval` runs
    x = parity_batch(3, 64)
    want = logits(model, x)
    theirs = PeftModel.from_pretrained(timm.create_model(MICRO, pretrained=True, num_classes=4), str(folder))
    assert (logits(theirs, x) - want).abs().max().item() <= 1e-5
    assert (logits(readme_model(folder), x) - want).abs().max().item() <= 1e-5
    assert "img_size" not in (folder / "README.md").read_text()  # 64 px is the micro ViT's own size


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_peft_method_exports_and_the_readme_sets_the_runs_layer_norm_eps(method, made):
    run = made(method)
    res = invoke("export", run, "--format", "peft")
    assert res.exit_code == 0, res.output
    folder = run / "export" / "peft"
    readme = (folder / "README.md").read_text()
    assert "m.eps = 1e-12" in readme  # the lora recipe's reference numerics, not timm's 1e-6
    model, _ = ufgir_cli.load_run(run)
    x = parity_batch(2, 64)
    assert (logits(readme_model(folder), x) - logits(model, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("method", "words"), [("ssf", ("has no peft equivalent",)), ("bitfit", ("has no peft equivalent",)),
                                               ("ila_lora", ("also trains", "ila"))])
def test_methods_peft_lacks_are_refused_in_one_line_and_write_nothing(method, made, words):
    run = made(method)
    one_line_error(invoke("export", run, "--format", "peft"), "--format peft", *words)
    assert not (run / "export" / "peft").exists()


def test_a_weights_file_and_another_input_size_reach_the_readme(tmp_path):
    """A local weights file goes through timm's ``pretrained_cfg_overlay``; an input size other than timm's
    default through ``img_size`` (timm resamples the positions bicubic, as the run did)."""
    from ufgir_cli.model.backbone import MICRO_WEIGHTS

    run = made_run(tmp_path, "lora", weights=str(MICRO_WEIGHTS), image_size=96, numerics="backbone")
    res = invoke("export", run, "--format", "peft")
    assert res.exit_code == 0, res.output
    folder = run / "export" / "peft"
    readme = (folder / "README.md").read_text()
    assert "img_size=96" in readme and "pretrained_cfg_overlay={'file': " in readme and "m.eps" not in readme
    model, _ = ufgir_cli.load_run(run)
    x = parity_batch(2, 96)
    assert (logits(readme_model(folder), x) - logits(model, x)).abs().max().item() <= 1e-5
    # the reference's corner-aligned resampling is not timm's: refused rather than approximated
    other = made_run(tmp_path / "ref", "lora", image_size=96)
    one_line_error(invoke("export", other, "--format", "peft"), "bilinear_corners", "model.pos_embed_resize")


def test_merge_and_peft_together_are_refused(made):
    one_line_error(invoke("export", made("lora"), "--format", "peft", "--merge"), "--merge")


# ---- import-peft --------------------------------------------------------------------------------------


def test_round_trip_export_import_evaluates_the_same(lora_run, tmp_path, small_synthetic, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    folder = lora_run / "export" / "peft"
    if not folder.is_dir():
        assert invoke("export", lora_run, "--format", "peft").exit_code == 0
    back = tmp_path / "back"
    res = invoke("import-peft", folder, "--backbone", MICRO, "--out", back)
    assert res.exit_code == 0, res.output
    ours, _ = ufgir_cli.load_run(lora_run)
    theirs, recipe = ufgir_cli.load_run(back)
    assert recipe.model.method == "lora" and recipe.data.dataset == "synthetic"
    x = parity_batch(3, 64)
    assert (logits(theirs, x) - logits(ours, x)).abs().max().item() <= 1e-5
    res = invoke("eval", back, "--precision", "fp32")  # the run trained and evaluated in fp32; an import's is "auto"
    assert res.exit_code == 0, res.output
    a, b = (json.loads((r / "eval" / "test" / "metrics.json").read_text()) for r in (lora_run, back))
    assert a["num_images"] == b["num_images"] == 16
    assert a["top1"] == b["top1"] and abs(a["loss"] - b["loss"]) <= 1e-5
    provenance = json.loads((back / "provenance.json").read_text())
    assert provenance["imported_from"]["format"].startswith("peft adapter folder (LoraConfig")
    # ... and exports like any run: merged, checked against itself
    res = invoke("export", back, "--merge")
    assert res.exit_code == 0, res.output
    # an existing run is kept unless --overwrite
    one_line_error(invoke("import-peft", folder, "--backbone", MICRO, "--out", back), "--overwrite")


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_folder_written_by_peft_alone_imports_with_peft_logits(use_dora, tmp_path):
    """Trained elsewhere: listed target names (peft's suffix rule), its own rank and alpha, timm's numerics."""
    import timm
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = timm.create_model(MICRO, pretrained=True, num_classes=5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"], use_dora=use_dora)
    theirs = get_peft_model(base, config)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(str(tmp_path / "adapter"))
    res = invoke("import-peft", tmp_path / "adapter", "--backbone", MICRO, "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    model, recipe = ufgir_cli.load_run(tmp_path / "run")
    m = recipe.model
    assert (m.method, m.lora_rank, m.lora_alpha, m.image_size) == ("dora" if use_dora else "lora", 4, 8.0, 64)
    assert model.num_classes == 5
    assert len(model.method.target_names(model.vit)) == 12  # 6 blocks x (qkv, fc1)
    x = parity_batch(2, 64)
    assert (logits(model, x) - logits(theirs, x)).abs().max().item() <= 1e-5


def test_import_refusals_are_one_line(tmp_path):
    import timm
    from peft import LoraConfig, get_peft_model

    one_line_error(invoke("import-peft", tmp_path, "--backbone", MICRO, "--out", tmp_path / "a"),
                   "is not a peft adapter folder")
    base = timm.create_model(MICRO, pretrained=True, num_classes=3)
    get_peft_model(base, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"], bias="all")) \
        .save_pretrained(str(tmp_path / "bias"))
    one_line_error(invoke("import-peft", tmp_path / "bias", "--backbone", MICRO, "--out", tmp_path / "b"),
                   "bias", "lacks")
    base = timm.create_model(MICRO, pretrained=True, num_classes=3)
    get_peft_model(base, LoraConfig(r=2, target_modules=["qkv"])).save_pretrained(str(tmp_path / "headless"))
    one_line_error(invoke("import-peft", tmp_path / "headless", "--backbone", MICRO, "--out", tmp_path / "c"),
                   "holds no classifier")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))


# ---- export --merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "glora", "ssf", "bitfit"])
def test_merged_export_is_a_plain_timm_vit_with_the_unmerged_logits(method, tmp_path):
    import timm
    from safetensors.torch import load_file

    run = made_run(tmp_path, method, numerics="backbone")  # timm's LayerNorm eps: plain timm computes the same
    res = invoke("export", run, "--merge")
    assert res.exit_code == 0, res.output
    path = run / "export" / "model.merged.safetensors"
    model, _ = ufgir_cli.load_run(run)
    state = load_file(str(path))
    plain = timm.create_model(MICRO, num_classes=4)
    assert set(state) == set(plain.state_dict())  # timm's own names, nothing else: same module structure
    plain.load_state_dict(state)
    x = parity_batch(3, 64)
    want = logits(model, x)
    assert (logits(plain, x) - want).abs().max().item() <= 1e-5
    again, _ = ufgir_cli.load_run(path)  # ufgir reads it back too (predict, eval)
    assert (logits(again, x) - want).abs().max().item() <= 1e-5
    assert not any("lora" in n or "ssf" in n or "glora" in n for n, _ in again.named_parameters())


def test_merged_ila_lora_keeps_its_ilas_and_folds_its_lora(made, tmp_path):
    run = made("ila_lora")
    for args in (["--merge"], ["--merge", "--format", "pt2"]):
        res = invoke("export", run, *args)
        assert res.exit_code == 0, res.output
    from safetensors import safe_open

    with safe_open(str(run / "export" / "model.merged.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["layout"] == "ufgir" and f.metadata()["merged"] == "true"
    assert any(k.startswith("ila.") for k in keys) and not any("lora" in k for k in keys)
    model, _ = ufgir_cli.load_run(run)
    merged, _ = ufgir_cli.load_run(run / "export" / "model.merged.safetensors")
    x = parity_batch(2, 64)
    assert (logits(merged, x) - logits(model, x)).abs().max().item() <= 1e-5


def test_merge_is_refused_where_nothing_folds(tmp_path):
    run = made_run(tmp_path, "adapter")
    one_line_error(invoke("export", run, "--merge"), "--merge", "nothing that folds")
    assert not (run / "export" / "model.merged.safetensors").exists()
