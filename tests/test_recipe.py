"""Recipes: resolution order, validation errors that name the key, round trips."""

from __future__ import annotations

import pytest

from ufgir_cli.errors import RecipeError, RecipeNotice
from ufgir_cli.methods import METHOD_NAMES as METHODS
from ufgir_cli.recipe import (
    dump_resolved,
    load_recipe,
    load_saved_recipe,
    packaged_recipe_names,
    parse_overrides,
)


def test_packaged_recipes_cover_every_method():
    names = packaged_recipe_names()
    assert set(METHODS) | {"quickstart"} <= set(names)
    for m in METHODS:
        r = load_recipe(m)
        assert r.model.method == m
        assert r.model.image_size == 224
        # The paper's backbone, except CLCA's recipes, which carry its official CLIP ViT-B/16 (reference/CLCA.md §2).
        paper = "vit_base_patch16_clip_224.laion2b" if m == "clca" else "vit_base_patch16_224.orig_in21k"
        assert r.model.backbone == paper


def test_paper_defaults():
    r = load_recipe("ila_pp")
    assert r.model.ila_ds_locs == (3, 7) and r.model.ila_locs == ()
    assert r.optim.name == "sgd" and r.optim.nesterov and r.optim.lr == 0.1 and r.optim.weight_decay == 0.0
    assert r.schedule.warmup_steps == 500 and r.schedule.warmup_lr == 1e-6 and r.schedule.min_lr == 1e-5
    assert r.train.epochs == 50 and r.train.batch_size == 8 and r.optim.clip_grad == 1.0
    assert r.train.split == "train_val" and r.eval.split == "test"
    assert r.model.layer_norm_eps == 1e-12 and r.model.drop == 0.1
    assert load_recipe("ila_plus").model.ila_locs == (0, 1, 2, 4, 5, 6, 8, 9, 10, 11)


def test_resolution_order(monkeypatch, tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nepochs = 3\nbatch_size = 4\n[model]\nmethod = "adapter"\n')
    assert load_recipe(f).train.epochs == 3
    monkeypatch.setenv("UFGIR_TRAIN__EPOCHS", "5")
    r = load_recipe(f)
    assert (r.train.epochs, r.train.batch_size, r.model.method) == (5, 4, "adapter")
    r = load_recipe(f, parse_overrides(["train.epochs=7"]))
    assert r.train.epochs == 7
    # a saved recipe is reloaded as written, without the environment
    saved = tmp_path / "saved.toml"
    saved.write_text(dump_resolved(load_recipe(f)))
    assert load_saved_recipe(saved).train.epochs == 5
    monkeypatch.setenv("UFGIR_TRAIN__EPOCHS", "9")
    assert load_saved_recipe(saved).train.epochs == 5


def test_method_switch_fills_ila_positions():
    assert load_recipe("ila_pp", {"model": {"method": "adapter"}}).model.ila_ds_locs == ()
    assert load_recipe("adapter", {"model": {"method": "ila"}}).model.ila_ds_locs == (3, 7)


def test_dump_round_trip(tmp_path):
    r = load_recipe("vpt_deep", parse_overrides(["model.image_size=448", "optim.lr=0.03", "model.mean=[0.5,0.5,0.5]"]))
    p = tmp_path / "recipe.toml"
    p.write_text(dump_resolved(r))
    assert load_saved_recipe(p) == r


def test_parse_overrides_types():
    o = parse_overrides(["a.b=3", "a.c=[1, 2]", "d=hello", "e.f=true", "e.g=0.5"])
    assert o == {"a": {"b": 3, "c": [1, 2]}, "d": "hello", "e": {"f": True, "g": 0.5}}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train": {"epoch": 3}}, "train.epoch"),
        ({"model": {"image_size": "big"}}, "model.image_size"),
        ({"model": {"ila_ds_locs": [3, 12]}}, "model.ila_ds_locs"),
        ({"model": {"image_size": 230}}, "model.image_size"),
        ({"model": {"image_size": 64}}, "model.ila_ds_locs"),  # 4x4 grid: 4 -> 2, then too small
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"model": {"method": "qlora"}}, "model.method"),
        ({"model": {"ila_locs": [3], "ila_ds_locs": [3]}}, "model.ila_locs"),
        ({"eval": {"split": "train_val"}}, "train.split"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(RecipeError) as e:
        load_recipe("ila_pp", overrides)
    msg = str(e.value)
    assert key in msg, msg
    assert "\n" not in msg


def test_unknown_key_lists_allowed(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text("[train]\nepochz = 3\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.epochz'.*allowed in \[train\] are: epochs"):
        load_recipe(f)


def test_missing_recipe_file_is_an_error():
    with pytest.raises(RecipeError, match="recipe 'nope.toml' not found.*ila_pp"):
        load_recipe("nope.toml")


def test_unknown_environment_variable(monkeypatch):
    monkeypatch.setenv("UFGIR_TRAIN__EPOHCS", "3")
    with pytest.raises(RecipeError, match="UFGIR_TRAIN__EPOHCS names no recipe key"):
        load_recipe("ila_pp")
    monkeypatch.delenv("UFGIR_TRAIN__EPOHCS")
    monkeypatch.setenv("UFGIR_TRAIN__EPOCHS", "many")
    with pytest.raises(RecipeError, match="train.epochs"):
        load_recipe("ila_pp")


def test_name_and_toml_suffix_resolve_the_same():
    assert load_recipe("ila_pp.toml") == load_recipe("ila_pp")


def test_ila_positions_follow_the_backbones_depth():
    """The paper's after-blocks-3-and-7 of 12 is after round(D/3)-1 and round(2D/3)-1; ILA+ fills the
    rest; TransFG and FFVT run D-1 blocks. Names whose depth is unknown resolve at model build."""
    micro = {"backbone": "ufgir_vit_micro_patch8_64", "image_size": 64}
    m = load_recipe("ila_plus", {"model": micro}).model
    assert (m.ila_ds_locs, m.ila_locs) == ((1, 3), (0, 2, 4, 5))
    assert load_recipe("ila_pp", {"model": {"backbone": "vit_large_patch16_224"}}).model.ila_ds_locs == (7, 15)
    assert load_recipe("ila", {}).model.ila_ds_locs == (3, 7)
    assert load_recipe("transfg", {"model": micro}).model.depth == 5
    assert load_recipe("ffvt", {}).model.depth == 11
    assert load_recipe("transfg", {"model": {"depth": 8}}).model.depth == 8  # given: kept
    unknown = load_recipe("ila", {"model": {"backbone": "some_vit_patch16_224"}}).model
    assert unknown.ila_ds_locs is None and not unknown.resolved
    assert unknown.for_backbone(6).ila_ds_locs == (1, 3) and unknown.for_backbone(6).resolved
    with pytest.raises(RecipeError, match="no room"):
        load_recipe("ila", {"model": {"backbone": "ufgir_vit_micro_patch8_64", "depth": 2, "image_size": 64}})


def test_ila_positions_are_dropped_for_a_method_without_ila_and_kept_between_ila_methods():
    with pytest.warns(RecipeNotice, match=r"model.ila_ds_locs \[1, 3\] dropped: method 'linear' has no ILA"):
        m = load_recipe("quickstart", {"model": {"method": "linear"}}).model
    assert (m.ila_ds_locs, m.ila_locs) == ((), ())
    m = load_recipe("quickstart", {"model": {"method": "ila_plus"}}).model
    assert (m.ila_ds_locs, m.ila_locs) == ((1, 3), (0, 2, 4, 5))
    m = load_recipe("ila_pp", {"model": {"ila_ds_locs": [2, 5], "method": "ila"}}).model
    assert m.ila_ds_locs == (2, 5)
