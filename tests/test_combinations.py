"""Down-sampling and token reduction together (issue 35, part 2): which method parts refuse a reduction, from the
methods' declared needs (`MethodSpec.reduction_refusal`); ILA++'s ILAs followed by EViT or ToMe on a tiny ViT
(token counts as ``feature_info`` says, ToMe's patch count after the ILAs, a gradient); the recipes
``linear_evit``, ``adapter_evit``, ``ila_pp_evit`` and their GMACs at 448 px on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.errors import RecipeError
from ufgir_cli.methods import METHODS, TABLE
from ufgir_cli.model import build_model, meta_model
from ufgir_cli.recipe import ModelConfig, load_recipe

TINY = dict(backbone="vit_tiny_patch16_224", weights="none", num_classes=5, layer_norm_eps=1e-6, drop=0.0,
            image_size=128)
EVIT = {"token_reduction": "evit", "keep_rate": 0.5}


def _load(**model):
    return load_recipe(None, {"model": model}, env=False)


# ---- what is refused, and why -----------------------------------------------------------------

@pytest.mark.parametrize("method", [m.name for m in TABLE if "patch_grid" in m.needs and not m.has_ila])
def test_a_method_that_needs_the_grid_to_its_last_block_is_refused_in_one_line(method):
    """ConvPass, MPN-COV, TransFG, GLSim, RAMS, CAL, SimTrans: wherever the reduction goes."""
    with pytest.raises(RecipeError) as e:
        _load(method=method, **EVIT, reduction_locs=[10])
    msg = str(e.value)
    assert "\n" not in msg and f"method {method!r}" in msg and "patch grid up to its last block" in msg


def test_ilas_at_or_after_the_first_reduction_are_refused_naming_them():
    # ILA++'s default down-sampling ILAs follow blocks 3 and 7; the default reductions are inside 3, 6, 9.
    with pytest.raises(RecipeError, match=r"ILA after blocks 3, 7, .*inside block 3 .*all > 7"):
        _load(method="ila_pp", **EVIT)
    with pytest.raises(RecipeError, match=r"ILA after block 7, .*inside block 6"):
        _load(method="ila_lora", **EVIT, reduction_locs=[6, 9])
    with pytest.raises(RecipeError, match=r"ILA after blocks 8, 9, 10, 11,"):  # ILA+: same-resolution ILA everywhere
        _load(method="ila_plus", **EVIT, reduction_locs=[8])
    with pytest.raises(RecipeError, match="per-block prompts"):
        _load(method="vqt", **EVIT)
    assert _load(method="ila_pp", **EVIT, reduction_locs=[8, 10]).model.reduction_locs == (8, 10)
    assert _load(method="ila", **EVIT, ila_ds_locs=[1, 2], reduction_locs=[3]).model.ila_ds_locs == (1, 2)


def test_the_refusal_reads_declared_needs_not_names():
    """A method row's `grid_for` decides: the same row with its grid needed everywhere is refused."""
    from dataclasses import replace

    spec = METHODS["ila_pp"]
    assert spec.reduction_refusal(8, (3, 7)) is None
    assert "patch grid up to its last block" in replace(spec, grid_for="every_block").reduction_refusal(8, (3, 7))
    assert spec.reduction_refusal(7, (3, 7)) is not None  # the ILA after block 7 reads block 7's reduced output


# ---- ILA++ then a reduction, on a tiny ViT ---------------------------------------------------

@pytest.mark.parametrize("kind", ["evit", "tome"])
def test_ila_pp_then_a_reduction_runs_and_its_geometry_is_what_runs(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, method="ila_pp", token_reduction=kind, keep_rate=0.5, reduction_locs=(8, 10))
    model = build_model(cfg, 5).eval()
    info = model.feature_info
    # 128 px: 8x8 patches, 6x6 after the ILA after block 3, 4x4 after the one after block 7, then no grid.
    assert [b.grid for b in info[:9]] == [(8, 8)] * 4 + [(6, 6)] * 4 + [(4, 4)]
    assert info[7].out_grid == (4, 4) and info[8].out_grid is None and info[9].grid is None
    assert model.reduction.patches_entering(model) == 16
    x, y = torch.randn(2, 3, 128, 128), torch.tensor([0, 3])
    with torch.no_grad(), model.reduction.recording() as did:
        _, outs = model.encode(x, frozenset(range(12)))
    assert [o.shape[1] for o in outs] == model.tokens_per_block
    if kind == "evit":  # ⌈0.5 · 16⌉ kept + 1 fused; then ⌈0.5 · 9⌉ + 1
        assert model.tokens_per_block[8] == 1 + 8 + 1 and model.tokens_per_block[10] == 1 + 5 + 1
    else:  # ToMe's targets from the 16 patches entering the first reduction: 8, then 4
        assert [d["requested"] for d in did] == [8, 4] and model.tokens_per_block[8] == 1 + 8
    model.train()
    step = model(x, y, nn.CrossEntropyLoss())
    step.loss.backward()
    assert math.isfinite(float(step.loss.detach()))
    for i in ("3", "7"):  # the ILAs before the reductions learn through them
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ila[i].parameters())


# ---- the recipes, and their cost at 448 px ---------------------------------------------------

def _gmacs(recipe: str, **model) -> float:
    cfg = load_recipe(recipe, {"model": {"image_size": 448, **model}}, env=False).model
    return count_flops(meta_model(cfg, 10), 448) / 2e9


def test_the_combination_recipes_and_their_gmacs_at_448():
    r = load_recipe("ila_pp_evit", env=False).model
    assert (r.method, r.ila_ds_locs, r.token_reduction, r.keep_rate, r.reduction_locs) == \
        ("ila_pp", (3, 7), "evit", 0.07, (8, 9, 10))
    # ila_pp_evit costs what clca_keep07 costs (reference/CLCA.md §6: 50.847), not clca's 25.165: ILA++'s blocks
    # 0-7 alone cost more than that. The EViT-alone recipes cost what CLCA.md gives for EViT at keep 0.1.
    combined, clca07 = _gmacs("ila_pp_evit"), _gmacs("clca_keep07")
    assert combined == pytest.approx(clca07, rel=2e-3) and clca07 == pytest.approx(50.847, rel=1e-4)
    assert _gmacs("ila_pp_evit", reduction_locs=[8], keep_rate=0.01) > 25.165 * 1.9
    assert _gmacs("linear_evit") == pytest.approx(24.789, rel=1e-3)
    assert _gmacs("linear_evit") < _gmacs("adapter_evit") < _gmacs("linear_evit") * 1.01
    assert _gmacs("ila_pp_evit") < _gmacs("ila_pp") == pytest.approx(67.06, rel=1e-3)
