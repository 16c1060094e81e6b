"""The method table: the only list of methods, and what each row says is what the model does."""

from __future__ import annotations

import argparse
import ast
import itertools
import re
from pathlib import Path

import pytest
import torch

from ufgir_cli import recipe
from ufgir_cli.methods import METHOD_NAMES, METHODS, TABLE, _flag_holds, _specificity, detect_upstream
from ufgir_cli.model import build_model
from ufgir_cli.recipe import load_recipe, packaged_recipe_names

#: Parameter names of each trainable part (the model's module names), matched from the start.
PART_NAMES = {"head": r"(vit\.)?head\.", "cls": r"vit\.cls_token", "anchor": "anchor_cls", "adapters": r"adapters\.",
              "ila": r"ila\.", "prompts": "prompts", "lora": r"vit\..*\.g?lora_", "ssf": r"vit\..*\.ssf_(scale|shift)$",
              "bias": r"vit\..*\.bias$"}


def test_the_table_is_the_only_list_of_names():
    assert METHOD_NAMES == tuple(m.name for m in TABLE) and not hasattr(recipe, "METHODS")  # one list, one name
    assert len(set(METHOD_NAMES)) == len(TABLE)
    for name in METHOD_NAMES:
        assert recipe.ModelConfig(method=name, ila_locs=None, ila_ds_locs=None).method == name
    with pytest.raises(ValueError, match="unknown method 'nope'; known: linear, full"):
        recipe.ModelConfig(method="nope")


#: Names that a module might dispatch on: the methods, their method objects' keys, and the head and
#: selector kinds that code used to compare with.
_DISPATCH_NAMES = set(METHOD_NAMES) | {m.impl for m in TABLE} | {
    "aggregator", "avg_cls", "psm", "maws", "rollout", "shallow", "deep"}
_DISPATCH_HOME = ("methods.py", "model/methods/", "model/prompts.py")


def _string_comparisons(path) -> list[tuple[int, str]]:
    """(line, name) of every ``==``/``!=``/``in`` comparison against one of `_DISPATCH_NAMES`."""
    tree = ast.parse(path.read_text())
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            consts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            hits += [(node.lineno, c.value) for c in consts
                     if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value in _DISPATCH_NAMES]
    return hits


def test_no_module_outside_the_methods_dispatches_on_a_name():
    """A method's behaviour lives in its object: no other module compares method, head or selector names."""
    pkg = Path(recipe.__file__).parent
    found = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith(_DISPATCH_HOME) or rel == "methods.py":
            continue
        if hits := _string_comparisons(path):
            found[rel] = hits
    assert found == {}


@pytest.mark.parametrize("spec", TABLE, ids=lambda s: s.name)
def test_every_row_has_a_packaged_recipe_that_builds(spec):
    assert spec.recipe_name in packaged_recipe_names()
    r = load_recipe(spec.recipe_name, {"model": {"weights": "none"}})
    assert r.model.method == spec.name
    with torch.device("meta"):
        build_model(r.model, 10)


@pytest.mark.parametrize("spec", TABLE, ids=lambda s: s.name)
def test_trainable_parts_are_the_rows(spec):
    cfg = {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 96, "prompt_len": 4}
    if spec.has_ila:
        cfg["ila_ds_locs"] = [1, 3]
    r = load_recipe(spec.recipe_name, {"model": cfg})
    m = build_model(r.model, 5)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    if spec.trains == ("all",):
        assert trainable == {n for n, _ in m.named_parameters()}
        return
    for part in spec.trains:
        assert any(re.match(PART_NAMES[part], n) for n in trainable), part
    allowed = "|".join(f"(?:{PART_NAMES[part]})" for part in spec.trains)
    assert all(re.match(allowed, n) for n in trainable), sorted(n for n in trainable if not re.match(allowed, n))


def test_model_builds_what_the_row_says():
    for spec in TABLE:
        cfg = load_recipe(spec.recipe_name, {"model": {"weights": "none"}}).model
        with torch.device("meta"):
            m = build_model(cfg, 10)
        assert m.plan.adapters == spec.adapter and (m.plan.prompts and m.plan.prompts.name) == spec.prompts
        assert cfg.ila_ds_locs == spec.ila_ds_locs
        assert bool(cfg.ila_locs) == spec.ila_rest
        kinds = ({"down"} | ({"same"} if spec.ila_rest else set())) if spec.has_ila else set()
        assert {b.ila for b in m.feature_info} - {None} == kinds


def _old_detection(c: argparse.Namespace) -> str:
    """The rule import-upstream used before the table (kept here as the oracle)."""
    prompt = (getattr(c, "prompt", None) or "").lower()
    adapter = getattr(c, "adapter", None)
    if getattr(c, "ila", False):
        if adapter:
            return "ila_pp"
        return "ila_plus" if getattr(c, "ila_locs", None) else "ila"
    if adapter == "convpass":
        return "convpass"
    if adapter:
        return "adapter"
    if prompt:
        return "vpt_deep" if "deep" in prompt else "vpt_shallow"
    return "linear" if getattr(c, "freeze_backbone", False) else "full"


def test_upstream_detection_is_unambiguous_and_matches_the_reference_rules():
    for ila, adapter, prompt, ila_locs, freeze in itertools.product(
        (False, True), (None, "adapter", "convpass"), (None, "vpt_shallow", "deep"), ([], [0, 1]), (False, True)
    ):
        flags = {"ila": ila, "adapter": adapter, "prompt": prompt, "ila_locs": ila_locs, "freeze_backbone": freeze}
        spec = detect_upstream(flags)
        assert spec is not None and spec.name == _old_detection(argparse.Namespace(**flags)), flags
        # no other matching row is as specific: the answer never depends on the table's order
        hits = [m for m in TABLE if all(_flag_holds(flags.get(k), t) for k, t in m.upstream)]
        assert sum(_specificity(m) == _specificity(spec) for m in hits) == 1, (flags, [m.name for m in hits])


def test_the_ila_methods_and_their_default_positions():
    assert {m.name for m in TABLE if m.has_ila} == {"ila", "ila_plus", "ila_pp", "ila_lora"}
    assert METHODS["ila_plus"].default_ila_locs(12, (3, 7)) == (0, 1, 2, 4, 5, 6, 8, 9, 10, 11)


def test_the_readme_lists_every_method_of_the_table():
    """The README's methods table is written from the method table: a new row must show up there."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    missing = [m.recipe_name for m in TABLE if m.recipe_name not in rows]
    assert not missing, f"README.md's methods table lacks {missing}"


def test_a_method_that_needs_a_cls_token_refuses_a_backbone_without_one():
    """Methods declare what they need of the backbone (``MethodSpec.needs``); SigLIP has no CLS token.
    A family the name tells is refused when the recipe loads; any other backbone when the model is built."""
    from ufgir_cli.errors import RecipeError

    assert "cls_token" in METHODS["transfg"].needs and "patch_grid" in METHODS["ila_pp"].needs
    assert "cls_token" not in METHODS["mpncov"].needs  # it pools the patch tokens
    assert "cls_token" not in METHODS["linear"].needs  # it classifies what timm's head pools
    with pytest.raises(RecipeError, match=r"method 'transfg' reads the CLS token, and model.backbone "
                       r"'vit_base_patch16_siglip_224' \(SigLIP / SigLIP 2\) has none; choose another backbone"):
        load_recipe("transfg", {"model": {"backbone": "vit_base_patch16_siglip_224", "weights": "none"}})
    r = load_recipe("transfg", {"model": {"backbone": "vit_medium_patch16_gap_256", "weights": "none"}})  # no family
    with torch.device("meta"), pytest.raises(RecipeError, match="'transfg' needs cls token of its backbone"):
        build_model(r.model, 10)
