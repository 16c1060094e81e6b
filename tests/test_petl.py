"""Today's PETL baselines (issue 30): LoRA, DoRA and GLoRA through peft, SSF, BitFit, and ILA with LoRA.

Counts against peft's own and the paper's ViT-B/16; checkpoints with timm's names and an unchanged
backbone hash; the build-time check that every adapted module reaches the logits (and its refusal);
the default targets on every backbone family; one LoRA run through every tool; resume; exports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.errors import RecipeError
from ufgir_cli.methods import FAMILY_TITLES, METHODS
from ufgir_cli.model import build_model, meta_model
from ufgir_cli.model.backbone import MICRO
from ufgir_cli.model.methods import onpath
from ufgir_cli.model.methods.onpath import PathCheck, check_on_path
from ufgir_cli.recipe import load_recipe

runner = CliRunner()
NEW = ("lora", "dora", "glora", "ssf", "bitfit", "ila_lora")
PEFT_METHODS = ("lora", "dora", "glora")
QKV = r"blocks\.\d+\.attn\.qkv"
#: The micro ViT as the quickstart recipe runs it (6 blocks, width 96, 64 px).
MICRO_MODEL = {"backbone": MICRO, "image_size": 64, "layer_norm_eps": 1e-6, "mean": [0.5] * 3, "std": [0.5] * 3,
               "drop": 0.0}


def micro(method: str, weights: str = "none", seed: int = 0, **model):
    r = load_recipe(method, {"model": {**MICRO_MODEL, "weights": weights, **model}})
    torch.manual_seed(seed)
    return build_model(r.model, 4)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture
def fresh_checks(monkeypatch):
    """The build-time check runs again for configurations that passed earlier in this process."""
    monkeypatch.setattr(onpath, "_passed", set())


# ---- counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_trainable_count_is_what_peft_reports_for_the_same_config(method):
    """The CLS token stays frozen (peft's convention), so ours equals peft's count with the head as a
    module to save, on the same timm model."""
    import timm
    from peft import GloraConfig, LoraConfig, get_peft_model

    ours = micro(method)
    assert not ours.vit.cls_token.requires_grad
    config = {"lora": LoraConfig(r=8, lora_alpha=8, target_modules=QKV, modules_to_save=["head"]),
              "dora": LoraConfig(r=8, lora_alpha=8, target_modules=QKV, use_dora=True, modules_to_save=["head"]),
              "glora": GloraConfig(r=8, target_modules=QKV, modules_to_save=["head"])}[method]
    theirs = get_peft_model(timm.create_model(MICRO, num_classes=4), config)
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0]


#: ViT-B/16, besides the head (769 per class): the README's rows.
VIT_B16 = {"lora": 294_912, "dora": 322_560, "glora": 663_672, "ssf": 205_824 + 768, "bitfit": 102_912,
           "ila_lora": 331_776 + 40_496 + 768}
ILA_PP_ADAPTERS = 313_536  # reference/ILA.md section 3: ILA++ = 354,032 = DS-ILA 40,496 + adapters


def _vit_b16(method: str, **model):
    return meta_model(load_recipe(method, {"model": {"weights": "none", **model}}).model, 200)


def test_vit_b16_counts_and_the_rank_of_ila_with_lora():
    for method, n in VIT_B16.items():
        assert trainable(_vit_b16(method)) == n + 769 * 200, method
    lora = {r: trainable(_vit_b16("lora", lora_rank=r)) - 769 * 200 for r in (7, 8, 9, 10)}
    closest = min(lora, key=lambda r: abs(lora[r] - ILA_PP_ADAPTERS))
    assert closest == 9 == load_recipe("ila_lora").model.lora_rank
    assert load_recipe("lora").model.lora_rank == 8 and load_recipe("ila_pp").model.lora_rank is None


def test_families_colour_them():
    assert {FAMILY_TITLES[METHODS[m].family] for m in NEW if m != "ila_lora"} == {"PETL"}
    assert FAMILY_TITLES[METHODS["ila_lora"].family] == "ILA"


# ---- checkpoints keep timm's names ----------------------------------------------------------------


@pytest.mark.parametrize("method", NEW)
def test_state_dict_names_are_timms_and_the_backbone_hash_is_unchanged(method):
    plain = micro("linear", weights="timm")
    model = micro(method, weights="timm")
    sd = model.state_dict()
    assert not [k for k in sd if re.search(r"base_layer|\.default\b", k)]
    assert not [k for k in model.trainable_state_dict() if re.search(r"base_layer|\.default\b", k)]
    assert model.backbone_state_dict().keys() == plain.backbone_state_dict().keys()
    assert model.backbone_sha256() == plain.backbone_sha256()
    assert "vit.blocks.0.attn.qkv.weight" in sd
    added = {"lora": "vit.blocks.0.attn.qkv.lora_A.weight", "dora": "vit.blocks.0.attn.qkv.lora_magnitude_vector.weight",
             "glora": "vit.blocks.0.attn.qkv.glora_A.Xd", "ssf": "vit.blocks.0.attn.qkv.ssf_scale",
             "ila_lora": "vit.blocks.0.attn.qkv.lora_B.weight", "bitfit": "vit.blocks.0.attn.qkv.bias"}[method]
    assert added in model.trainable_state_dict()
    # A model of another seed takes the whole state dict, strictly, and computes the same.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
        sd = model.state_dict()
        other = micro(method, weights="timm", seed=1)
        other.load_state_dict(sd)
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(other.eval()(x), model.eval()(x))


# ---- every adapted module is on the forward path --------------------------------------------------


def test_the_cls_only_last_block_runs_a_wrapped_qkv():
    model = micro("lora", lora_init_weights="random").train()
    assert model.cls_only_last_block
    x = torch.randn(2, 3, 64, 64)
    fast = model(x)
    full = model.forward_head(model.forward_features(x))
    assert (fast - full).abs().max().item() < 1e-5
    last = model.vit.blocks[-1].attn.qkv
    fast.square().sum().backward()
    assert last.lora_B["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        last.lora_B["default"].weight.zero_()
        assert (model.eval()(x) - fast).abs().max().item() > 1e-4  # the last block's LoRA changed the logits


class Bypass(nn.Module):
    """Two Linear layers of which the forward calls one and applies the other's weight itself."""

    def __init__(self):
        super().__init__()
        self.used, self.bypassed, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.used(x) + F.linear(x, self.bypassed.weight, self.bypassed.bias))


def test_a_module_the_forward_bypasses_is_refused_in_one_line():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    toy = inject_adapter_in_model(LoraConfig(r=2, target_modules=["used", "bypassed"]), Bypass())
    units = {n: [p for k, p in m.named_parameters() if not k.startswith("base_layer.")]
             for n, m in toy.named_modules() if isinstance(m, BaseTunerLayer)}
    assert set(units) == {"used", "bypassed"}
    check = PathCheck("model.lora_targets 'used|bypassed'", units,
                      {n: toy.get_submodule(n) for n in ("used", "bypassed", "out")})
    with pytest.raises(RecipeError) as e:
        check_on_path(toy, check, torch.randn(4, 8))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.lora_targets 'used|bypassed': a non-zero adapter on bypassed does not change model(x)")
    assert msg.endswith("modules that do: used, out")
    check_on_path(toy, PathCheck("used only", {"used": units["used"]}), torch.randn(4, 8))  # the one on the path passes


def test_a_last_block_that_reads_the_qkv_weight_is_refused(monkeypatch, fresh_checks):
    """The fast path as it was: the last block's qkv weight applied directly, so its LoRA never runs."""
    from ufgir_cli.model import runner as runner_module  # the plain ViT's block runner calls it
    from ufgir_cli.model.attention import _attend, merge_heads

    def weight_only(attn, x):
        B, N, C = x.shape
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(x[:, :1], w[:C], b[:C]).reshape(B, 1, attn.num_heads, -1).transpose(1, 2)
        k, v = F.linear(x, w[C:], b[C:]).reshape(B, N, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return merge_heads(attn, _attend(attn, q, k, v, None))

    monkeypatch.setattr(runner_module, "cls_attention", weight_only)
    with pytest.raises(RecipeError) as e:
        micro("lora")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(rf"model.lora_targets '{QKV}' (lora on {MICRO}): a non-zero adapter on blocks.5.attn.qkv "
                          "does not change model(x) in train mode")
    assert msg.endswith("modules that do: patch_embed.proj, blocks.{0-5}.attn.qkv, blocks.{0-5}.attn.proj, "
                        "blocks.{0-5}.mlp.fc1, blocks.{0-5}.mlp.fc2")


def test_the_check_leaves_no_trace(fresh_checks):
    model = micro("ila_lora", drop=0.1, drop_path=0.1)  # BatchNorm statistics, dropout, stochastic depth
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    rng = torch.get_rng_state()
    check_on_path(model, model.method.path_check(model), x)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


#: One backbone per family ufgir supports (geometry.BACKBONE_DEPTHS), two blocks, a small image.
FAMILIES = {"vit_small_patch16_224": 32, "deit3_small_patch16_224": 32, "vit_base_patch16_clip_224": 32,
            "vit_small_patch14_dinov2": 28, "vit_small_patch14_reg4_dinov2": 28, MICRO: 64}


@pytest.mark.parametrize("backbone", [*FAMILIES, "vit_base_patch16_siglip_224"])
def test_default_targets_work_on_every_backbone_family(backbone, fresh_checks):
    cfg = {"backbone": backbone, "weights": "none", "image_size": FAMILIES.get(backbone, 32), "depth": 2}
    for method in ("lora", "ssf", "bitfit"):  # SigLIP too: its attention pool feeds the linear head
        r = load_recipe(method, {"model": cfg})
        model = build_model(r.model, 3)  # the build-time check ran
        wrapped = [n for n, m in model.vit.named_modules() if type(m).__name__ in ("Linear", "ScaleShift")
                   and hasattr(m, "base_layer")]
        if method == "lora":
            assert wrapped == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


# ---- recipe keys ----------------------------------------------------------------------------------


def test_recipe_keys_reach_peft():
    model = micro("lora", lora_rank=4, lora_alpha=16, lora_dropout=0.25, lora_use_rslora=True,
                  lora_init_weights="gaussian", lora_targets=r"blocks\.[01]\.mlp\.fc\d")
    layers = {n: m for n, m in model.vit.named_modules() if hasattr(m, "lora_A")}
    assert sorted(layers) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    fc1 = layers["blocks.0.mlp.fc1"]
    assert fc1.r["default"] == 4 and fc1.scaling["default"] == 16 / 4 ** 0.5
    assert fc1.lora_dropout["default"].p == 0.25
    assert trainable(model) == 2 * 4 * (96 + 384 + 384 + 96) + 4 * 96 + 4  # LoRAs + head, no CLS token


@pytest.mark.parametrize(("method", "model", "match"), [
    ("lora", {"lora_targets": r"blocks\.\d+\.nope"}, r"matches no module; its Linear layers are "
                                                     r"blocks\.\{0-5\}\.attn\.qkv"),
    ("lora", {"lora_targets": "head"}, "matches the classifier head"),
    ("lora", {"lora_targets": r"blocks\.0"}, r"matches blocks\.0 \(a Block\); LoRA adapts Linear and Conv2d layers"),
    ("glora", {"lora_targets": r"patch_embed\.proj"}, r"matches patch_embed\.proj \(a Conv2d\); GLoRA adapts Linear"),
    ("glora", {"lora_dropout": 0.1}, "model.lora_dropout do nothing for method 'glora'"),
    ("glora", {"lora_init_weights": "gaussian"}, "GLoRA starts at zero"),
    ("ila_lora", {"lora_init_weights": "orthogonal"}, "peft cannot adapt them .*even"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(method, model, match):
    with pytest.raises(RecipeError, match=match) as e:
        micro(method, **model)
    assert "\n" not in str(e.value)


def test_lora_keys_given_to_another_method_are_dropped_with_a_notice():
    """As ILA positions are: one grid can set them for its LoRA rows, and the other rows' run keys stay."""
    from ufgir_cli.errors import RecipeNotice
    from ufgir_cli.sweep.runkey import run_key

    with pytest.warns(RecipeNotice, match="model.lora_rank and model.lora_dropout dropped: method 'ila_pp' has no LoRA"):
        r = load_recipe("ila_pp", {"model": {"lora_rank": 4, "lora_dropout": 0.1}})
    assert r.model.lora_rank is None and r.model.lora_dropout == 0.0
    assert run_key(r) == run_key(load_recipe("ila_pp"))


def test_a_target_that_is_not_a_regex_is_refused_when_the_recipe_loads():
    with pytest.raises(RecipeError, match="model.lora_targets"):
        load_recipe("lora", {"model": {"lora_targets": "blocks.(qkv"}})


def test_peft_is_not_imported_by_the_model_package_or_the_help():
    code = ("import sys\nimport ufgir_cli.model\nfrom typer.testing import CliRunner\nfrom ufgir_cli.cli import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
            "print(sorted(m for m in ('peft', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---- every tool ------------------------------------------------------------------------------------


def _tiny_train(data_root: Path, **train) -> dict:
    return {"data": {"dataset": "synthetic", "root": str(data_root), "num_workers": 0},
            "model": {**MICRO_MODEL, "weights": "timm"},
            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", **train},
            "eval": {"every": 0}, "optim": {"lr": 0.05}, "schedule": {"warmup_steps": 2},
            "logging": {"tensorboard": False}}


def _sets(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _sets(v, f"{prefix}{k}.")
        else:
            out += ["--set", f"{prefix}{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


@pytest.fixture(scope="module")
def lora_run(small_synthetic, tmp_path_factory) -> Path:
    """A LoRA run of one epoch on the micro ViT (its shipped weights), trained through the CLI."""
    out = tmp_path_factory.mktemp("lora")
    res = runner.invoke(app, ["train", "--recipe", "lora", "--out", str(out), "--name", "run", "--quiet",
                              *_sets(_tiny_train(small_synthetic.parent))])
    assert res.exit_code == 0, res.output
    return out / "run"


def test_a_lora_run_through_eval_metrics_visualize_and_compare(lora_run):
    res = runner.invoke(app, ["eval", str(lora_run)])
    assert res.exit_code == 0, res.output
    m = json.loads((lora_run / "eval" / "test" / "metrics.json").read_text())
    assert m["num_images"] == 16 and m["checkpoint"] == "last"
    ckpt = torch.load(lora_run / "checkpoints" / "last.pt", weights_only=True)
    assert not ckpt["full"] and "vit.blocks.5.attn.qkv.lora_A.weight" in ckpt["state_dict"]
    assert not [k for k in ckpt["state_dict"] if "base_layer" in k or ".default" in k]
    assert ckpt["backbone"]["sha256"] == micro("linear", weights="timm").backbone_sha256()
    res = runner.invoke(app, ["metrics", str(lora_run), "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["visualize", "rollout", str(lora_run), "--batch-size", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = lora_run.parent / "compare.png"
    res = runner.invoke(app, ["compare", str(lora_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_suffix(".json").read_text())["runs"][0]["family"] == "PETL"


def test_a_lora_run_exports_with_parity_and_its_delta_reattaches(lora_run):
    from safetensors import safe_open

    import ufgir_cli
    from ufgir_cli.ship import load_pt2, parity_batch

    for args in (["--adapter-only"], ["--format", "onnx"], ["--format", "pt2"]):
        res = runner.invoke(app, ["export", str(lora_run), *args])
        assert res.exit_code == 0, res.output
        assert "max |diff|" in res.stdout
    model, recipe = ufgir_cli.load_run(lora_run)
    x = parity_batch(3, 64)
    with torch.no_grad():
        want = model.eval()(x)
        delta, _ = ufgir_cli.load_run(lora_run / "export" / "adapter.safetensors")
        assert torch.equal(delta.eval()(x), want)
        with safe_open(str(lora_run / "export" / "adapter.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert keys == set(model.trainable_state_dict()) and "vit.blocks.0.attn.qkv.lora_B.weight" in keys
        graph = load_pt2(lora_run / "export" / "model.pt2")
        assert (graph(x) - want).abs().max().item() < 1e-4
        # The pt2 graph is the plain ViT's: LoRA merged into the weights (no LoRA matmuls left).
        names = {n for n, _ in graph.named_parameters()} | {n for n, _ in graph.named_buffers()}
        assert not any("lora" in n for n in names)


def test_a_lora_run_trained_at_one_size_evaluates_at_twice_that(lora_run):
    """As a run trained at 224 px evaluates at 448: the position grid is resampled, the LoRAs carry over."""
    import ufgir_cli

    model, _ = ufgir_cli.load_run(lora_run)
    model.set_input_size(128)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        y = model.eval()(x)
        assert y.shape == (2, 4)
        for layer in (m for m in model.vit.modules() if hasattr(m, "lora_B")):
            layer.lora_B["default"].weight.zero_()
        assert (model(x) - y).abs().max().item() > 0  # the trained LoRAs acted at the new size
    res = runner.invoke(app, ["export", str(lora_run), "--format", "pt2", "--image-size", "128",
                              "--out", str(lora_run / "export" / "model_128.pt2")])
    assert res.exit_code == 0, res.output


def test_a_lora_run_resumes_bit_exactly(small_synthetic, tmp_path):
    from ufgir_cli.engine.callbacks import Callback
    from ufgir_cli.engine.train import fit
    from ufgir_cli.model.checkpoint import read_checkpoint

    class Stop(Callback):
        class Stopped(Exception):
            pass

        def on_step(self, step, logs):
            if step == 4:
                raise self.Stopped

    over = _tiny_train(small_synthetic.parent, epochs=2, deterministic=True, checkpoint_every=1)
    over["model"]["drop"] = 0.1
    over["model"]["lora_dropout"] = 0.1
    recipe = load_recipe("lora", over)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(recipe, tmp_path / "ref")
        with pytest.raises(Stop.Stopped):
            fit(recipe, tmp_path / "cut", callbacks=[Stop()])
        fit(recipe, tmp_path / "cut", resume=True)
    finally:
        torch.set_num_threads(before)
    a, b = (read_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("ref", "cut"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(".lora_A." in k for k in a["state_dict"])
    for k, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][k]), k


@pytest.mark.parametrize("method", [m for m in NEW if m != "lora"])
def test_every_new_method_trains_and_exports_with_parity(method, small_synthetic, tmp_path):
    """One epoch, then a pt2 graph (updates merged) and an adapter delta, each checked against the run."""
    import ufgir_cli
    from ufgir_cli.engine.train import fit
    from ufgir_cli.ship import export_pt2, export_safetensors, parity_batch

    run = tmp_path / "run"
    summary = fit(load_recipe(method, _tiny_train(small_synthetic.parent)), run)
    assert summary["final_top1"] is not None
    model, recipe = ufgir_cli.load_run(run)
    sha = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["backbone"]["sha256"]
    assert sha == micro("linear", weights="timm").backbone_sha256()
    assert export_pt2(model, recipe, tmp_path / "m.pt2").max_abs_diff <= 1e-4
    assert export_safetensors(model, recipe, tmp_path / "a.safetensors", adapter_only=True,
                              backbone_sha256=sha).max_abs_diff == 0.0
    x = parity_batch(2, 64)
    with torch.no_grad():
        assert torch.equal(ufgir_cli.load_run(tmp_path / "a.safetensors")[0].eval()(x), model.eval()(x))


def test_reproduce_runs_the_new_rows_with_the_protocol_and_no_paper_number(tmp_path):
    """Each row a sweep (SGD, the learning-rate phase then the seeds), its cell in the table, no paper number."""
    root = tmp_path / "data"
    from ufgir_cli.data.synthetic import generate_synthetic

    generate_synthetic(root / "cotton80", num_classes=4, train_val=6, test=4, size=64)
    args = ["reproduce", "--methods", "lora,ila_lora", "--datasets", "cotton80", "--image-size", "64", "--seeds", "1",
            "--lr", "0.1", "--name", "petl", "--out", str(tmp_path / "grids"), "-q"]
    tiny = _tiny_train(root)
    tiny["data"].pop("dataset")
    tiny["model"].pop("image_size")
    tiny.pop("optim")
    res = runner.invoke(app, [*args, *_sets(tiny)])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "grids" / "petl" / "table1.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"LoRA", "ILA + LoRA"}, table
    for title in ("LoRA", "ILA + LoRA"):
        assert not re.search(r"\(\d+\.\d+, [+-]", rows[title]), rows[title]  # a paper number shows "(paper, difference)"
    for method in ("lora", "ila_lora"):
        plan = json.loads(next((tmp_path / "grids" / "petl").rglob(f"*{method}*/plan.json")).read_text())
        assert plan, method
