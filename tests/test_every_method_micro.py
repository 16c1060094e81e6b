"""Issue 36, part 2: every method of the table trains on the shipped micro ViT on a CPU, the README's
route (`ufgir train -r quickstart --set model.method=NAME`), with the micro ViT's own numerics and the
depth- and size-dependent settings following the backbone, and evaluates. The table is iterated, so a
method added later is covered."""

from __future__ import annotations

import json
import warnings

import pytest

from ufgir_cli.engine.report import eval_run
from ufgir_cli.engine.train import fit
from ufgir_cli.methods import METHODS
from ufgir_cli.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_route(method: str, root) -> dict:
    """What the README's route sets besides the method: a tiny run of 2 optimiser steps on a tiny set."""
    return {"model": {"method": method}, "data": {"root": str(root), "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 12, "precision": "fp32"}, "eval": {"every": 0},
            "schedule": {"warmup_steps": 1}}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_two_steps_on_the_micro_vit_and_evaluates(method, small_synthetic, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RecipeNotice: ILA positions dropped for a method without ILA, ...
        recipe = load_recipe("quickstart", micro_route(method, small_synthetic))
    m = recipe.model
    assert (m.backbone, m.weights, m.image_size) == ("ufgir_vit_micro_patch8_64", "timm", 64)
    assert (m.mean, m.std, m.drop) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.0)  # the micro ViT's own
    summary = fit(recipe, tmp_path / method)
    assert summary["steps"] == 2  # 24 train_val images in batches of 12
    saved = load_recipe(tmp_path / method / "recipe.toml", env=False)
    assert saved.model.method == method
    metrics, out, _ = eval_run(tmp_path / method, device="cpu")
    assert metrics["num_images"] == 16 and 0.0 <= metrics["top1"] <= 100.0
    assert json.loads((out / "metrics.json").read_text())["top1"] == metrics["top1"]
