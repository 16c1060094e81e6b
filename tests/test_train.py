"""Training and evaluation: schedule, run folder, frozen/trainable tensors, eval reproduction, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.engine.optim import lr_at, param_groups
from ufgir_cli.engine.report import eval_run
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import DatasetError, TrainingError
from ufgir_cli.model.checkpoint import load_run, read_checkpoint
from ufgir_cli.recipe import ScheduleConfig, load_recipe

runner = CliRunner()


def small_recipe(data_root, **train):
    return load_recipe("quickstart", {
        "model": {"weights": "none"},
        "data": {"root": str(data_root), "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", **train},
        "eval": {"every": 1},
        "optim": {"lr": 0.05},
        "schedule": {"warmup_steps": 2},
        "logging": {"log_every": 2},
    })


# ---- schedule -----------------------------------------------------------------------------


def test_lr_schedule_hand_values():
    cfg = ScheduleConfig(warmup_steps=500, warmup_lr=1e-6, min_lr=1e-5)
    total, base = 10_000, 0.1
    assert lr_at(0, total, base, cfg) == pytest.approx(1e-6)
    assert lr_at(250, total, base, cfg) == pytest.approx(1e-6 + 250 * (0.1 - 1e-6) / 500)
    # warmup counts inside the cosine: at the end of warmup the cosine is already at t = 500 / 10000
    assert lr_at(500, total, base, cfg) == pytest.approx(1e-5 + 0.5 * (0.1 - 1e-5) * (1 + math.cos(math.pi * 0.05)))
    assert lr_at(total, total, base, cfg) == pytest.approx(1e-5)


def test_lr_schedule_matches_timm():
    from timm.scheduler import CosineLRScheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    total = 2_000
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=1e-5, warmup_t=500, warmup_lr_init=1e-6,
                              warmup_prefix=False, t_in_epochs=False)
    cfg = ScheduleConfig(warmup_steps=500, warmup_lr=1e-6, min_lr=1e-5)
    for step in (0, 1, 250, 499, 500, 501, 1000, 1999):
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, total, 0.1, cfg), rel=1e-9)


def test_weight_decay_groups_follow_the_model():
    r = load_recipe("ila_pp", {"model": {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 96,
                                         "ila_ds_locs": [1, 3]}})
    from ufgir_cli.model import build_model

    m = build_model(r.model, 5)
    decay, no_decay = param_groups(m, 0.05)
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == trainable
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(p is m.vit.cls_token for p in no_decay["params"])


# ---- a real short run -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(small_synthetic, tmp_path_factory):
    recipe = small_recipe(small_synthetic)
    run_dir = tmp_path_factory.mktemp("runs") / "r1"
    from ufgir_cli.model import build_model

    torch.manual_seed(recipe.train.seed)
    before = build_model(recipe.model.model_copy(update={"num_classes": 4}), 4).state_dict()
    steps: dict[int, dict] = {}

    class Steps(Callback):
        def on_step(self, step, logs):
            steps[step] = logs

    summary = fit(recipe, run_dir, callbacks=[Steps()])
    return run_dir, summary, before, steps


def test_run_folder_contents(run):
    run_dir, summary, _, _ = run
    for f in ("recipe.toml", "provenance.json", "metrics.jsonl", "checkpoints/last.pt"):
        assert (run_dir / f).is_file(), f
    assert not (run_dir / "checkpoints" / "best.pt").exists()  # paper protocol: no selection on test
    assert list(run_dir.glob("events.out.tfevents.*"))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)) and steps[-1] == summary["steps"] == 6  # 24 images / 8 * 2 epochs
    assert {"step", "epoch", "time", "train/loss", "train/lr"} <= set(recs[0])
    assert "test/top1" in recs[-1] and recs[-1]["epoch"] == 2.0
    assert summary["final_top1"] == recs[-1]["test/top1"] and summary["best_top1"] is None  # no selection on test
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["backbone"]["name"] == "ufgir_vit_micro_patch8_64" and len(prov["backbone"]["sha256"]) == 64
    assert len(prov["dataset"]["splits_sha256"]) == 64 and prov["torch"] == torch.__version__


def test_fit_writes_its_final_evaluation_like_eval(run):
    """fit() leaves eval/<split>/ as `ufgir eval --checkpoint last` would: the same three files, byte for byte."""
    run_dir, summary, _, _ = run
    out = run_dir / "eval" / "test"
    written = {f: (out / f).read_text() for f in ("metrics.json", "per_class.csv", "predictions.csv")}
    assert json.loads(written["metrics.json"])["top1"] == summary["final_top1"]
    assert json.loads(written["metrics.json"])["checkpoint"] == "last"
    eval_run(run_dir, checkpoint="last", num_workers=0)
    assert {f: (out / f).read_text() for f in written} == written


def test_loss_tags_have_one_meaning_each(run):
    """3 equal steps per epoch, a log line every 2 steps: records at steps 2, 3 (epoch end), 4, 6
    (epoch end). train/loss averages the steps since the previous record, train/loss_epoch the
    epoch, train/loss_step (callbacks only) one step."""
    run_dir, _, _, steps = run
    recs = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    loss = {k: v["train/loss_step"] for k, v in steps.items()}
    assert sorted(recs) == [2, 3, 4, 6] and sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert recs[2]["train/loss"] == pytest.approx((loss[1] + loss[2]) / 2)
    assert recs[3]["train/loss"] == pytest.approx(loss[3])
    assert recs[3]["train/loss_epoch"] == pytest.approx((loss[1] + loss[2] + loss[3]) / 3)
    assert recs[4]["train/loss"] == pytest.approx(loss[4])
    assert recs[6]["train/loss"] == pytest.approx((loss[5] + loss[6]) / 2)
    assert recs[6]["train/loss_epoch"] == pytest.approx((loss[4] + loss[5] + loss[6]) / 3)
    assert "train/loss_epoch" not in recs[2] and "train/loss_epoch" not in recs[4]


def test_callback_list_calls_every_hook_of_every_callback():
    import inspect

    from ufgir_cli.engine.callbacks import CallbackList

    hooks = [n for n in vars(Callback) if n.startswith("on_")]
    calls = []

    class Recorder(Callback):
        pass

    for name in hooks:
        setattr(Recorder, name, lambda self, *args, name=name: calls.append((self, name, args)))
    a, b = Recorder(), Recorder()
    both = CallbackList([a, b])
    arity = {name: len(inspect.signature(getattr(Callback, name)).parameters) - 1 for name in hooks}
    for name in hooks:
        getattr(both, name)(*range(arity[name]))
    assert len(hooks) == 8 and calls == [(cb, name, tuple(range(arity[name]))) for name in hooks for cb in (a, b)]


def test_frozen_identical_trainable_changed(run):
    run_dir, _, before, _ = run
    model, recipe = load_run(run_dir)
    after = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    for name, t in after.items():
        if name in trainable:
            assert not torch.equal(t, before[name]), f"{name} did not change"
        elif name.startswith("vit."):
            assert torch.equal(t, before[name]), f"frozen {name} changed"


def test_checkpoint_is_weights_only_and_full_for_random_backbone(run):
    run_dir = run[0]
    ck = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ck["full"] is True and ck["method"] == "ila_pp" and ck["num_classes"] == 4
    assert ck["train_state"]["step"] == 6 and ck["train_state"]["epoch"] == 2


def test_eval_reproduces_logged_top1(run):
    run_dir, summary, _, _ = run
    metrics, out, _ = eval_run(run_dir, num_workers=0)
    assert metrics["top1"] == summary["final_top1"]
    assert metrics["num_images"] == 16 and metrics["num_classes"] == 4 and metrics["checkpoint"] == "last"
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"top1", "top5", "per_class_mean", "per_class_std", "loss", "num_images", "num_classes",
                          "split", "checkpoint"}
    preds = (out / "predictions.csv").read_text().splitlines()
    assert preds[0] == "path,target,prediction,probability" and len(preds) == 17
    correct = sum(int(line.split(",")[1]) == int(line.split(",")[2]) for line in preds[1:])
    assert correct / 16 * 100 == pytest.approx(metrics["top1"])
    per_class = (out / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 5 and per_class[0] == "class_id,name,images,top1"


def test_cli_eval_prints_table(run):
    run_dir, summary, _, _ = run
    res = runner.invoke(app, ["eval", str(run_dir), "--checkpoint", "last"])
    assert res.exit_code == 0, res.output
    assert f"{summary['final_top1']:.2f}" in res.output


def test_cli_eval_compiled_gives_the_same_numbers(run):
    run_dir = run[0]
    eager, _, _ = eval_run(run_dir, num_workers=0, precision="fp32")
    res = runner.invoke(app, ["eval", str(run_dir), "--precision", "fp32", "--device", "cpu", "--compile"])
    assert res.exit_code == 0, res.output
    compiled = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    assert compiled["top1"] == eager["top1"] and compiled["top5"] == eager["top5"]
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)


def test_cli_eval_compile_without_compiler_is_one_line(run, monkeypatch):
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    import ufgir_cli.engine.report as report

    class NoCompiler(torch.nn.Module):  # what a compiled model does at its first call without gcc
        def forward(self, x):
            raise InductorError(InvalidCxxCompiler("/nonexistent/g++"), None)

    def no_compiler(model):
        return NoCompiler()

    monkeypatch.setattr(report, "compiled_for_inference", no_compiler)
    run_dir = run[0]
    res = runner.invoke(app, ["eval", str(run_dir), "--device", "cpu", "--compile"])
    assert res.exit_code == 2
    msg = res.output.strip()
    assert "\n" not in msg and "--compile" in msg and "C++ compiler" in msg and "/nonexistent/g++" in msg


def test_existing_run_folder_is_refused(run, small_synthetic):
    run_dir = run[0]
    with pytest.raises(TrainingError, match="exists"):
        fit(small_recipe(small_synthetic), run_dir)


def test_val_protocol_writes_best(small_synthetic, tmp_path):
    r = small_recipe(small_synthetic, epochs=1, split="train").model_copy()
    r = load_recipe("quickstart", {"model": {"weights": "none"}, "data": {"root": str(small_synthetic), "num_workers": 0},
                                   "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "split": "train"},
                                   "eval": {"split": "val"}})
    summary = fit(r, tmp_path / "v")
    best = read_checkpoint(tmp_path / "v" / "checkpoints" / "best.pt")
    assert best["metrics"]["val/top1"] == summary["best_top1"] == summary["final_top1"]  # one epoch: best is last


# ---- bad dataset folders: one line naming file and line, nothing written -------------------------


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda root: (root / "splits" / "train_val.csv").write_text("class_id,path\n0,images/missing.png\n"),
         r"train_val.csv:2: image images/missing.png does not exist"),
        (lambda root: (root / "splits" / "train_val.csv").write_text("class_id,path\n9,images/c00/c00_000_train_val.png\n"),
         r"train_val.csv:2: class id 9 is out of range 0..3"),
        (lambda root: (root / "splits" / "test.csv").write_text("class_id,path\n"), r"test.csv lists no images"),
        (lambda root: (root / "splits" / "test.csv").unlink(), r"test.csv is missing"),
    ],
)
def test_bad_split_files(small_synthetic, tmp_path, edit, pattern):
    root = _copy(small_synthetic, tmp_path / "data" / "synthetic")
    edit(root)
    r = small_recipe(root).model_copy(update={"data": small_recipe(root).data.model_copy(update={"dataset": "mydata"})})
    run_dir = tmp_path / "runs" / "bad"
    with pytest.raises(DatasetError, match=pattern) as e:
        fit(r, run_dir)
    assert "\n" not in str(e.value)
    assert not run_dir.exists()
    res = runner.invoke(app, ["train", "-r", "quickstart", "--set", f"data.root={root}", "--set", "model.weights=none",
                              "--dataset", "mydata",
                              "--out", str(tmp_path / "runs"), "--name", "bad2"])
    assert res.exit_code == 2 and "error:" in res.output
    assert not (tmp_path / "runs" / "bad2").exists()


# ---- the shipped backbone: PETL that works on a CPU ---------------------------------------------


def test_quickstart_ila_pp_learns_on_the_shipped_backbone(tmp_path):
    """ILA++ on the frozen, shipped micro ViT learns the synthetic UFGIR task: the loss falls, test
    top-1 reaches at least twice chance, frozen tensors stay bit-identical, trainable ones change."""
    from ufgir_cli.model import build_model

    r = load_recipe("quickstart", {"train": {"epochs": 6}, "eval": {"every": 0}, "data": {"num_workers": 0}})
    torch.manual_seed(r.train.seed)
    before = build_model(r.model.model_copy(update={"num_classes": 10}), 10).state_dict()
    summary = fit(r, tmp_path / "qs")
    recs = [json.loads(line) for line in (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in recs]
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary["final_top1"] >= 2 * 100 / 10, summary["final_top1"]
    model, _ = load_run(tmp_path / "qs")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, t in model.state_dict().items():
        if name in trainable:
            assert not torch.equal(t, before[name]), f"{name} did not change"
        elif name.startswith("vit."):
            assert torch.equal(t, before[name]), f"frozen {name} changed"


def test_frozen_weights_cast_is_exact_and_restored():
    from ufgir_cli.model import build_model
    from ufgir_cli.model.precision import autocast, frozen_weights_cast

    cfg = {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 96, "ila_ds_locs": [1, 3]}
    torch.manual_seed(0)
    model = build_model(load_recipe("ila_pp", {"model": cfg}).model, 5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad(), autocast("cpu", "bf16"):
        plain = model(x)
    with frozen_weights_cast(model, "bf16") as cast:
        assert model.vit.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
        assert model.adapters[0].attn.down.weight.dtype == torch.float32  # trainable: autocast caches it
        assert model.vit.norm.weight.dtype == torch.float32  # only Linear and Conv weights
        with torch.no_grad(), autocast("cpu", "bf16"):
            logits_cast = model(x)
        with cast.originals():
            assert model.vit.blocks[0].mlp.fc1.weight.dtype == torch.float32
        assert model.vit.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    # patch embedding (2) + 12 blocks x (qkv, proj, fc1, fc2) x (weight, bias)
    assert cast.count == 2 + 12 * 4 * 2
    assert torch.equal(plain, logits_cast)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    with frozen_weights_cast(model, "fp32") as none:
        assert none.count == 0


def test_fit_gives_the_process_its_torch_flags_back(small_synthetic, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    seen = {}

    class Probe(Callback):
        def on_step(self, step, logs):
            seen[step] = torch.are_deterministic_algorithms_enabled()

    fit(small_recipe(small_synthetic, epochs=1, deterministic=True), tmp_path / "run", callbacks=[Probe()])
    assert seen and all(seen.values())  # on while training
    assert not torch.are_deterministic_algorithms_enabled()  # and off again afterwards
    assert not torch.backends.cudnn.deterministic


def test_bf16_run_checkpoints_the_float32_frozen_weights(small_synthetic, tmp_path):
    """A random-init backbone is saved whole; held in bf16 for the run, it must be written in float32."""
    from ufgir_cli.model import build_model

    recipe = small_recipe(small_synthetic, epochs=1, precision="bf16")
    torch.manual_seed(recipe.train.seed)
    before = build_model(recipe.model.model_copy(update={"num_classes": 4}), 4).state_dict()
    fit(recipe, tmp_path / "run")
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["full"] is True
    w = "vit.blocks.0.mlp.fc1.weight"
    assert saved["state_dict"][w].dtype == torch.float32 and torch.equal(saved["state_dict"][w], before[w])
