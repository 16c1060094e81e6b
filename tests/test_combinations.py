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


# ---- the rows: CLCA's Table I beside the ILA paper's ------------------------------------------

def test_clcas_table_i_rows_name_their_source():
    from ufgir_cli.analysis.paper import (
        CLCA_TABLE1,
        PAPER_TOP1,
        TABLE1,
        paper_source,
        paper_sources,
        paper_top1,
    )
    from ufgir_cli.reproduce import PAPER_METHODS

    assert [paper_top1("clca", d) for d in ("cotton80", "soyageing", "soyglobal")] == [55.6, 87.4, 61.1]
    assert [paper_top1("clca_keep07", d) for d in ("cotton80", "soyageing", "soyglobal")] == [67.8, 88.3, 58.2]
    assert paper_top1("clca", "soygene") is None and paper_top1("clca_keep07", "soylocal") is None
    assert paper_source("clca") == CLCA_TABLE1 == "CLCA (Rios et al., ICASSP 2025) Table I; backbone not stated in its repository"
    assert paper_source("ila_pp") == TABLE1 and paper_sources(["clca", "linear", "ila_pp_evit"]) == [TABLE1, CLCA_TABLE1]
    assert len(PAPER_TOP1) == 16 * 5 + 2 * 3
    assert "clca" in PAPER_METHODS and PAPER_METHODS[-1] == "clca_keep07"


def test_reproduce_puts_accuracy_and_gmacs_side_by_side_with_both_sources(tmp_path):
    import json

    from ufgir_cli.analysis.paper import CLCA_TABLE1, TABLE1
    from ufgir_cli.reproduce import make_grid, write_table

    rows = ("ila_pp", "ila_pp_evit", "adapter_evit", "clca")
    grid = make_grid(rows, ["cotton80"], seeds=(1,), lrs=(0.1,), out=tmp_path)
    for row, top1 in zip(rows, (50.0, 45.0, 40.0, 52.0), strict=True):
        sweep = grid.sweep(row, "cotton80")
        (sweep.root / "runs/p2/eval/test").mkdir(parents=True)
        (sweep.root / "runs/p2/eval/test/metrics.json").write_text(json.dumps({"top1": top1, "num_classes": 80}))
        (sweep.root / "plan.json").write_text(json.dumps({"phase2": {"lr": 0.1, "runs": [{"seed": 1, "run": "runs/p2"}]}}))
    md = write_table(grid).read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    # accuracy (ours, the paper's, the difference), then TTP and GMACs at 448 px, on one line per row
    assert lines["ILA++"].endswith("| 50.00 (n=1) (55.42, -5.42) | 0.416 | 67.063 |")
    assert lines["ILA++ (ila_pp_evit)"].endswith("| 45.00 (n=1) | 0.416 | 50.884 |")
    assert "| 40.00 (n=1) |" in lines["Adapter (adapter_evit)"] and "| 24.86" in lines["Adapter (adapter_evit)"]
    assert "| 52.00 (n=1) (55.60, -3.60) |" in lines["CLCA (keep 10 %)"] and lines["CLCA (keep 10 %)"].endswith("| 25.165 |")
    assert f"the paper's numbers: {TABLE1}; {CLCA_TABLE1}." in md
    assert CLCA_TABLE1.replace("_", r"\_") in (grid.root / "table1.tex").read_text()


def test_compare_paper_points_name_clcas_source_and_a_keep07_run_its_row():
    from ufgir_cli.analysis.compare import paper_points, paper_row_of
    from ufgir_cli.analysis.paper import CLCA_TABLE1

    pts = {p["method"]: p for p in paper_points(["cotton80"])}
    assert pts["clca"]["source"] == CLCA_TABLE1 and pts["clca"]["cite"] == "CLCA, Table I"
    assert pts["clca"]["backbone"] is None and pts["ila_pp"]["backbone"] is not None   # not stated: no backbone shape
    assert pts["clca"]["gmacs"] == pytest.approx(25.165, rel=1e-3) and pts["clca_keep07"]["top1"] == 67.8
    assert paper_row_of(load_recipe("clca_keep07", env=False)) == "clca_keep07"
    assert paper_row_of(load_recipe("clca", env=False)) == "clca"
    assert paper_row_of(load_recipe("clca", {"model": {"keep_rate": 0.7}}, env=False)) == "clca_keep07"
    assert paper_row_of(load_recipe("ila_pp_evit", env=False)) == "ila_pp"


def test_the_compare_figure_has_a_legend_entry_per_source():
    from ufgir_cli.viz.compare import draw_compare

    pts = [{"label": "ILA++", "gmacs": 67.1, "top1": 75.0, "trainable": 354_800, "family": "ILA", "paper": True,
            "cite": "ILA paper, Table 1"},
           {"label": "CLCA (keep 10 %) [CLCA, Table I]", "gmacs": 25.2, "top1": 87.4, "trainable": 86_278_666,
            "family": "FGIR", "paper": True, "cite": "CLCA, Table I", "backbone": None},
           {"label": "ILA++ (ila_pp_evit)", "gmacs": 50.9, "top1": 70.0, "trainable": 362_490, "family": "ILA", "paper": False}]
    fig = draw_compare(pts)
    ax = fig.axes[0]
    texts = [t.get_text() for leg in [*ax.artists, ax.get_legend()] if leg is not None for t in leg.get_texts()]
    assert "ILA paper, Table 1\n(448 px)" in texts and "CLCA, Table I\n(448 px)" in texts and "ours" in texts
    assert [a.get_text() for a in ax.texts] == [p["label"] for p in pts]
