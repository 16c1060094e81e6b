"""CLCA (reference/CLCA.md): the official code's checkpoint imports (its ``args``, the carrier's position row
split off, the unused 1000-way head dropped, counts both ways) and reproduces every stored value of the
``clca_t16_224`` fixture within the FGIR_README's tolerances (token counts, GAP pool lengths and EViT
selections exactly); GMACs of ViT-B/16 CLIP at 448 px; the recipes and their schedule; training, resume,
export and inspection."""

from __future__ import annotations

import argparse
import re
import warnings

import pytest
import torch
from resume_check import trains_and_resumes_bit_exactly
from upstream_check import load_with_notices, max_abs_diff

from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.engine.optim import lr_at, param_groups
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import CheckpointError, RecipeNotice
from ufgir_cli.model import load_upstream_checkpoint, meta_model
from ufgir_cli.recipe import load_recipe

NAME = "clca_t16_224"


def _checkpoint(fixture_dir) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(fixture_dir / f"{NAME}.upstream.pth", weights_only=True)


@pytest.fixture(scope="module")
def upstream(fixture_dir):
    model, recipe, notices = load_with_notices(fixture_dir / f"{NAME}.upstream.pth")
    ex = torch.load(fixture_dir / f"{NAME}.expected.pt", weights_only=True)
    x = ex["input"]
    with torch.no_grad(), model.reduction.recording() as reductions, model.method.recording() as cache:
        logits = model(x)
    with torch.no_grad():
        _, outputs = model.encode(x, frozenset(range(12)))
        maps = model.attention_maps(x)
    return model, recipe, notices, ex, {"logits": logits, "reductions": reductions, "cache": cache,
                                        "outputs": outputs, "maps": maps}


# ---- import ------------------------------------------------------------------------------------


def test_import_reads_the_args_and_drops_the_unused_head_with_both_counts(upstream):
    model, recipe, notices, ex, _ = upstream
    m = recipe.model
    assert (m.method, m.backbone, m.image_size, m.num_classes) == ("clca", "vit_tiny_patch16_224", 224, 10)
    assert (m.token_reduction, m.keep_rate, m.reduction_locs, m.layer_norm_eps) == ("evit", 0.1, (3, 6, 9), 1e-6)
    assert (m.mean, m.std, m.pos_embed_resize) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    o, s = recipe.optim, recipe.schedule
    assert (o.name, o.lr, o.weight_decay, o.clip_grad) == ("adamw", 1e-4, 0.05, 0.0)
    assert (s.warmup_epochs, s.warmup_lr, s.min_lr, s.cooldown_epochs, recipe.train.epochs) == (2, 1e-6, 1e-5, 5, 50)
    total = sum(p.numel() for p in model.parameters())
    assert total == ex["total_params"] - 193_000 == 5_531_338 and ex["total_params"] == 5_724_338
    assert any("5,531,338 parameters here, 5,724,338 with it" in n for n in notices)
    state = model.state_dict()
    assert not any(k.startswith("vit.head.") or k.startswith("vit.norm.") for k in state)
    assert state["vit.pos_embed"].shape == (1, 197, 192) and state["clr_pos"].shape == (1, 1, 192)


def test_the_carrier_row_is_split_off_before_resampling(fixture_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        model, _ = load_upstream_checkpoint(fixture_dir / f"{NAME}.upstream.pth")
    raw = _checkpoint(fixture_dir)["model"]["pos_embed"]
    model.set_input_size(448)
    assert torch.equal(model.clr_pos.detach(), raw[:, -1:].float())         # untouched by the resampling
    assert torch.equal(model.vit.pos_embed.detach()[:, :1], raw[:, :1].float())
    assert model.vit.pos_embed.shape == (1, 785, 192) and model.feature_info[0].tokens_attended == 786
    assert [b.tokens_attended for b in model.feature_info] == [786] * 4 + [87] * 3 + [17] * 3 + [10, 12]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 448, 448)).shape == (1, 10)


def test_settings_ufgir_does_not_implement_are_refused(fixture_dir, tmp_path):
    ck = _checkpoint(fixture_dir)
    for change, says in (({"num_clr": 2}, "--num_clr 2"), ({"clc_recover_at_last": False}, "--clc_recover_at_last"),
                         ({"model": "dyvit_vit_tiny_patch16_224"}, "dyvit")):
        args = argparse.Namespace(**{**vars(ck["args"]), **change})
        torch.save({**ck, "args": args}, tmp_path / "odd.pth")
        with pytest.raises(CheckpointError, match=says) as e:
            load_upstream_checkpoint(tmp_path / "odd.pth")
        assert "\n" not in str(e.value)


# ---- the fixture, value by value -----------------------------------------------------------------


def test_token_counts_pool_lengths_and_selections_exactly(upstream):
    model, _, _, ex, got = upstream
    assert model.tokens_per_block == ex["tokens_per_block"] == [t.shape[1] for t in got["outputs"]]
    red = got["reductions"]
    assert [r["block"] for r in red] == ex["reduction_blocks"] and [r["kept"].shape[1] for r in red] == ex["keep_counts"]
    for j, r in enumerate(red):
        assert torch.equal(r["kept"], ex["kept_indices"][j])                # descending score order
        assert torch.equal(r["dropped"], ex["dropped_indices"][j])          # ascending
        assert max_abs_diff(r["scores"], ex["cls_attn"][j]) <= 1e-5
        assert max_abs_diff(r["fused"], ex["fused_tokens"][j]) <= 1e-5
    cache = [c for c in got["cache"] if c["pool_len"] is not None]
    assert [c["pool_len"] for c in cache] == ex["cache_gap_pool_len"]
    assert [c["block"] for c in got["cache"] if c["recovered"]] == ex["recovery_blocks"]


def test_every_value_within_1e5(upstream):
    model, _, _, ex, got = upstream
    assert max_abs_diff(got["logits"], ex["logits"]) <= 1e-5
    for i in range(11):
        assert max_abs_diff(got["outputs"][i], ex["block_inputs"][i + 1]) <= 1e-5, i
    assert max_abs_diff(got["outputs"][11], ex["final_tokens"]) <= 1e-5
    for i, a in enumerate(got["maps"]):
        assert max_abs_diff(a, ex["attention"][i]) <= 1e-5 and max_abs_diff(a[:, :, 0], ex["attention_cls_rows"][i]) <= 1e-5, i
    cache = [c for c in got["cache"] if c["pool_len"] is not None]
    for i, c in enumerate(cache):
        assert max_abs_diff(c["gap"], ex["cache_gap"][i][:, 0]) <= 1e-5 and max_abs_diff(c["carrier"], ex["cache_carrier"][i][:, 0]) <= 1e-5
    head_input = torch.stack([got["outputs"][i][:, 0] for i in model.method.head_blocks(12)], dim=-1)  # (B, D, 4)
    assert max_abs_diff(head_input, ex["head_input"]) <= 1e-5
    with torch.no_grad():
        stages = model.head.stages(ex["head_input"])
        pw = model.head.fc(stages[-1])
    for got_t, key in zip(stages + [pw], ("head_bn1_output", "head_dwconv_output", "head_bn2_output",
                                          "head_gelu_output", "head_pwconv_output"), strict=True):
        assert max_abs_diff(got_t, ex[key]) <= 1e-5, key


def test_a_wiring_change_is_far_outside_the_tolerance(upstream):
    """The tolerance can fail: keep rate 0.11 instead of 0.1 (the README's own wiring check) moves the logits."""
    model, _, _, ex, _ = upstream
    model.reduction.keep_rate = 0.11
    try:
        with torch.no_grad():
            assert max_abs_diff(model(ex["input"]), ex["logits"]) > 1e-2
    finally:
        model.reduction.keep_rate = 0.1


def test_macs_of_the_fixture_and_of_vit_b16_clip_at_448(upstream):
    model, _, _, ex, _ = upstream
    assert count_flops(model, 224) // 2 == ex["macs_flop_counter"] == 440_157_312
    for recipe, paper, params in (("clca", 25.165, 86_278_666), ("clca_keep07", 50.847, 86_278_666)):
        meta = meta_model(load_recipe(recipe, {"model": {"image_size": 448}}).model, 10)
        assert count_flops(meta, 448) / 2e9 == pytest.approx(paper, rel=1e-3)
        assert sum(p.numel() for p in meta.parameters()) == params == 87_047_666 - 769_000
    # DeiT 3 (no position for the class token): the carrier gets none either; 86,612,210 with the unused head.
    deit3 = meta_model(load_recipe("clca", {"model": {"backbone": "deit3_base_patch16_224.fb_in22k_ft_in1k"}}).model, 10)
    assert sum(p.numel() for p in deit3.parameters()) == 86_612_210 - 769_000 and getattr(deit3, "clr_pos", None) is None


# ---- the recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rate"), [("clca", 0.1), ("clca_keep07", 0.7)])
def test_recipes_carry_the_official_numerics_and_schedule(name, rate):
    r = load_recipe(name)
    m = r.model
    assert (m.backbone, m.method, m.token_reduction, m.keep_rate, m.reduction_locs, m.image_size) == \
        ("vit_base_patch16_clip_224.laion2b", "clca", "evit", rate, (3, 6, 9), 224)
    assert (m.mean, m.std, m.layer_norm_eps, m.pos_embed_resize, m.drop) == \
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1e-5, "bicubic", 0.0)
    assert int(r.data.resize_ratio * 448) == 512 and int(r.data.resize_ratio * 224) == 256
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.clip_grad, r.train.batch_size) == ("adamw", 1e-4, 0.05, 0, 32)
    s = r.schedule
    assert (s.warmup_epochs, s.warmup_lr, s.min_lr, s.cooldown_epochs, r.train.epochs) == (2, 1e-6, 1e-5, 5, 50)
    assert r.sweep.lrs == (3e-4, 1e-4, 3e-5)


def test_the_schedule_is_timms_cosine_with_warmup_and_cooldown_at_every_epoch():
    from timm.scheduler import CosineLRScheduler

    s, spe = load_recipe("clca").schedule, 7
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    timm_sched = CosineLRScheduler(opt, t_initial=45, warmup_t=2, warmup_lr_init=1e-6, lr_min=1e-5)
    for epoch in range(50):
        assert lr_at(epoch * spe, 50 * spe, 1e-4, s, spe) == pytest.approx(timm_sched._get_lr(epoch)[0], rel=1e-12), epoch
    assert lr_at(46 * spe + 3, 50 * spe, 1e-4, s, spe) == 1e-5                # inside the cool-down
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_at(0, 100, 1e-4, s)


def test_reproduce_sweeps_the_clca_rows_over_their_adamw_grid():
    from ufgir_cli.reproduce.grid import make_grid, sweep_recipe

    grid = make_grid(("clca", "clca_keep07"), ("soyageing",))
    sweeps = list(grid.sweeps())
    assert {row for row, _, _ in sweeps} == {"clca", "clca_keep07"} and grid.image_size == 448
    for _, _, sweep in sweeps:
        assert tuple(sweep.lrs) == (3e-4, 1e-4, 3e-5) and sweep_recipe(sweep).optim.name == "adamw"


def test_the_carrier_and_its_position_take_no_weight_decay():
    model = meta_model(load_recipe("clca").model, 10)
    groups = param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert id(model.clr) not in decayed and id(model.clr_pos) not in decayed
    assert id(model.vit.blocks[0].attn.qkv.weight) in decayed


# ---- everything a method gets -------------------------------------------------------------------


def _recipe(root, epochs: int, kind: str = "evit", **train):
    """The micro ViT (6 blocks: reductions inside 1, 3, 4) with CLCA, on tiny synthetic data."""
    return load_recipe("quickstart", {
        "model": {"method": "clca", "ila_ds_locs": [], "ila_locs": [], "drop": 0.0, "token_reduction": kind,
                  "keep_rate": 0.5},
        "data": {"root": str(root), "num_workers": 0},
        "train": {"epochs": epochs, "batch_size": 8, "precision": "fp32", **train},
        "eval": {"every": 0}, "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "schedule": {"warmup_epochs": 1, "cooldown_epochs": 1}, "logging": {"log_every": 1},
    })


@pytest.mark.parametrize("kind", ["evit", "tome"])
def test_trains_and_resumes_bit_exactly(small_synthetic, tmp_path, one_thread, kind):
    ref = trains_and_resumes_bit_exactly(_recipe(small_synthetic, epochs=3, kind=kind), tmp_path)
    assert "clr" in ref and "clr_pos" in ref and ref["head.norm_in.num_batches_tracked"] == 9


@pytest.mark.parametrize("kind", ["evit", "tome"])
def test_both_reductions_export(small_synthetic, tmp_path, one_thread, kind):
    """EViT's top-k and ToMe's matching have shapes fixed by the input size: both trace (ONNX, torch.export)."""
    from ufgir_cli.ship import export_model

    run = tmp_path / kind
    fit(_recipe(small_synthetic, epochs=1, kind=kind), run)
    for fmt in ("onnx", "pt2", "safetensors"):
        assert export_model(run, fmt).max_abs_diff <= 1e-4, fmt


def test_analysis_that_needs_the_grid_is_refused_in_one_line(small_synthetic, tmp_path, one_thread):
    from typer.testing import CliRunner

    from ufgir_cli.cli import app

    run = tmp_path / "clca"
    fit(_recipe(small_synthetic, epochs=1), run)
    cli = CliRunner()
    for args, says in ((["metrics", str(run)], "--no-attention-cka --no-features"),
                       (["visualize", "rollout", str(run)], "attention rollout multiplies maps over a patch grid")):
        res = cli.invoke(app, args, env={"COLUMNS": "300", "UFGIR_DATA_DIR": str(small_synthetic.parent)})
        assert res.exit_code != 0 and says in res.output, res.output
    res = cli.invoke(app, ["metrics", str(run), "--no-attention-cka", "--no-features"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output


def test_inspect_shows_tokens_per_block():
    from typer.testing import CliRunner

    from ufgir_cli.cli import app

    res = CliRunner().invoke(app, ["inspect", "--recipe", "clca", "--num-classes", "10"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rows = {int(m[1]): line.split("│") for line in res.output.splitlines() if (m := re.match(r"│\s+(\d+)\s+│", line))}
    assert "EViT keep 0.1, +6 cached tokens" in rows[3][6] and "+2 cached tokens" in rows[10][6] and rows[4][6].strip() == "-"
    assert [int(rows[i][4]) for i in range(12)] == [198] * 4 + [28] * 3 + [11] * 3 + [9, 11]      # tokens attended
    assert [int(rows[i][5]) for i in range(12)] == [198] * 3 + [28] * 3 + [11] * 3 + [9, 11, 11]  # tokens out
    assert rows[0][3].strip() == "14x14 -> tokens" and rows[5][3].strip() == "-"
    assert f"total {85_811_712 + 1_537 * 10:,}" in res.output and "5.96 GMACs" in res.output


def test_import_upstream_makes_a_run_that_exports_and_evaluates_the_same(fixture_dir, tmp_path):
    from ufgir_cli.recipe import load_saved_recipe
    from ufgir_cli.ship import export_model, import_upstream

    run = tmp_path / "clca"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        model, recipe = import_upstream(fixture_dir / f"{NAME}.upstream.pth", run)
    assert load_saved_recipe(run / "recipe.toml") == recipe
    ex = torch.load(fixture_dir / f"{NAME}.expected.pt", weights_only=True)
    with torch.no_grad():
        assert max_abs_diff(model(ex["input"]), ex["logits"]) <= 1e-5
    assert export_model(run, "onnx").max_abs_diff <= 1e-4
