"""SimTrans (FGIR.md §8): the reference's checkpoint reproduces through `load_upstream_checkpoint`, every
stored intermediate of both injections and of the part layer within the fixture README's tolerance, on
the deterministic path and, with the stored masks passed explicitly, on the eval-time dropout path;
what ufgir decides differently (pretrained weights, only used parameters, deterministic evaluation)
and the counts and MACs of both; training, resume, export, crops and the paper's row.
"""

from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch
from resume_check import trains_and_resumes_bit_exactly
from upstream_check import load_with_notices, max_abs_diff

from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import CheckpointError, RecipeError, RecipeNotice
from ufgir_cli.model import build_model, load_upstream_checkpoint
from ufgir_cli.model.methods.simtrans import UNUSED, part_structure
from ufgir_cli.recipe import load_recipe

NAME = "simtrans_t16_112"


def _counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


@pytest.fixture(scope="module")
def upstream(fixture_dir):
    model, recipe, notices = load_with_notices(fixture_dir / f"{NAME}.upstream.pth")
    expected = torch.load(fixture_dir / f"{NAME}.expected.pt", weights_only=True)
    with torch.no_grad():
        traced = model.method.trace(model, expected["input"])
    return model, recipe, expected, traced, notices


# ---- the reference's checkpoint ---------------------------------------------------------------


def test_import_maps_the_keys_drops_the_unused_groups_with_a_notice(upstream):
    model, recipe, ex, _, notices = upstream
    m = recipe.model
    assert (m.method, m.backbone, m.image_size, m.num_classes) == ("simtrans", "vit_tiny_patch16_224", 112, 10)
    assert m.layer_norm_eps == 1e-6 and m.depth is None and not m.simtrans_eval_dropout  # whatever the config said
    assert all(mod.eps == 1e-6 for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm))
    # ours: only what the forward uses; the reference: the same plus five groups no gradient reaches
    unused = ex["checks"]["unused_params"]
    assert (ex["trainable_params"], ex["total_params"], unused) == (10_863_002, 10_863_002, 4_663_184)
    assert _counts(model) == (6_199_818, 6_199_818) == (ex["total_params"] - unused,) * 2
    assert len(notices) == 1 and "4,663,184 parameters" in notices[0]
    assert all(group.rstrip(".") in notices[0] for group in UNUSED)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"vit", "head", "structure"}


def test_an_unknown_key_is_still_an_error(fixture_dir, tmp_path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(fixture_dir / f"{NAME}.upstream.pth", weights_only=True)
    ck["model"]["transformer.encoder.part_structure.mystery.weight"] = torch.zeros(3)
    torch.save(ck, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match="mystery"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        load_upstream_checkpoint(tmp_path / "edited.pth")


def test_deterministic_path_reproduces_every_stored_value(upstream):
    model, _, ex, tr, _ = upstream
    with torch.no_grad():
        logits = model(ex["input"])
    assert max_abs_diff(logits, ex["logits"]) <= 1e-4 and max_abs_diff(tr["logits"], logits) <= 1e-6
    assert [torch.equal(tr[k], ex[e]) for k, e in (("mask", "part_mask"), ("anchor", "anchor_index"))] == [True, True]
    assert torch.equal(tr["anchor_rc"], ex["anchor_rc"])
    for ours, theirs, tol in (("cls_rows", "part_select_maps", 1e-6), ("head_sum", "head_sum", 1e-6),
                              ("threshold", "threshold", 1e-6), ("weight", "masked_head_mean", 1e-6),
                              ("anchor_value", "anchor_value", 1e-6), ("coords", "relative_coords", 1e-6),
                              ("adjacency", "adjacency", 1e-8), ("gcn_gc1_output", "gcn_gc1_output", 1e-5),
                              ("gcn_output", "gcn_output", 1e-4), ("structure_feature", "structure_feature", 1e-4),
                              ("cls_before", "cls_before_injection", 1e-4), ("cls_after", "cls_after_injection", 1e-4),
                              ("part_norm_cls", "part_norm_cls", 1e-4), ("head_input", "head_input", 1e-4)):
        assert max_abs_diff(tr[ours], ex[theirs]) <= tol, ours
    for ours, theirs in zip(tr["head_stages"], ex["head_stages"], strict=True):
        assert max_abs_diff(ours, theirs) <= 1e-4
    rows = torch.stack([a[:, :, 0] for a in tr["attention"]])                 # (12, B, heads, T)
    assert max_abs_diff(rows, ex["attention_cls_rows"]) <= 1e-6
    out = tr["outputs"]
    for i, theirs in enumerate(ex["block_outputs"]):  # stored before any injection: the patch tokens are unchanged
        assert max_abs_diff(out[i][:, 1:], theirs[:, 1:]) <= 1e-4
        if i not in (9, 10):
            assert max_abs_diff(out[i][:, 0], theirs[:, 0]) <= 1e-4
    assert max_abs_diff(out[10][:, 0], ex["part_layer_input"][:, 0]) <= 1e-4
    assert max_abs_diff(out[11][:, 1:], ex["part_layer_output"][:, 1:]) <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"]) and list(ex["injection_after_blocks"]) == [9, 10, 11]
    assert sorted(model.method.stream_edits(model)) == [9, 10, 11]


def test_the_sign_of_zero_in_the_angle(upstream):
    """Patches straight above the anchor: +0.0 column difference, angle exactly 1.0 (the reference's), 7
    of them here; the difference formed the other way round and negated gives -0.0 and an angle of 0."""
    _, _, ex, tr, _ = upstream
    ones = tr["coords"][..., 1] == 1.0
    assert int(ones.sum()) == ex["checks"]["angle_exactly_one_count"] == 7
    assert torch.equal(ones, ex["relative_coords"][..., 1] == 1.0)
    rows, cols = torch.arange(7).repeat_interleave(7).float(), torch.arange(7).repeat(7).float()
    rc = ex["anchor_rc"]                                                      # (3, B, 2)
    negated = -((rc[..., 1, None] - cols) / 7)                               # the mistake: -0.0 above the anchor
    above = (cols == rc[..., 1, None]) & (rows < rc[..., 0, None]) & ex["part_mask"]
    wrong = (torch.atan2(negated, (rows - rc[..., 0, None]) / 7) / math.pi + 1) / 2
    assert torch.equal(above, ones) and bool((wrong[above] == 0).all())
    # the anchor's column, spelled out for the exported graph, is what torch's atan2 gives in eager
    rel = torch.stack([rows - rc[..., 0, None], cols - rc[..., 1, None]], dim=-1) / 7
    plain = (torch.atan2(rel[..., 1], rel[..., 0]) / math.pi + 1) / 2 * ex["part_mask"]
    assert torch.equal(tr["coords"][..., 1], plain)


def test_part_structure_from_the_stored_maps(upstream):
    """The selection, coordinates and adjacency from the stored CLS rows alone."""
    _, _, ex, _, _ = upstream
    for j in range(3):
        got = part_structure(ex["part_select_maps"][j], (7, 7))
        assert torch.equal(got["mask"], ex["part_mask"][j]) and torch.equal(got["anchor"], ex["anchor_index"][j])
        assert max_abs_diff(got["coords"], ex["relative_coords"][j]) <= 1e-6
        assert max_abs_diff(got["adjacency"], ex["adjacency"][j]) <= 1e-8


def test_eval_dropout_path_with_the_stored_masks(upstream):
    model, _, ex, _, _ = upstream
    noise = ex["dropout_keep_mask"].float() * ex["dropout_scale"]            # (3, B, N, 512)
    with torch.no_grad():
        tr = model.method.trace(model, ex["input"], noise=noise)
    assert max_abs_diff(tr["logits"], ex["logits_dropout_active"]) <= 1e-4
    assert torch.equal(tr["anchor"], ex["anchor_index_dropout_active"]) and torch.equal(tr["mask"], ex["part_mask_dropout_active"])
    for ours, theirs in (("gcn_output", "gcn_output_dropout_active"), ("cls_after", "cls_after_injection_dropout_active"),
                         ("head_input", "head_input_dropout_active")):
        assert max_abs_diff(tr[ours], ex[theirs]) <= 1e-4, ours
    assert max_abs_diff(tr["logits"], ex["logits"]) > 1e-3  # the dropout does move them (1.6e-2)


def test_evaluation_is_deterministic_unless_the_recipe_asks(upstream):
    model, _, ex, _, _ = upstream
    x = ex["input"]
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.method.eval_dropout = True  # what model.simtrans_eval_dropout = true sets
        try:
            torch.manual_seed(0)
            a, b = model(x), model(x)
            torch.manual_seed(0)
            assert torch.equal(a, model(x)) and not torch.equal(a, b)
        finally:
            model.method.eval_dropout = False


def test_layer_norm_eps_matters(upstream):
    """Why import-upstream uses 1e-6 whatever the config says: 1e-12 moves the logits past the tolerance."""
    model, _, ex, _, _ = upstream
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        for m in norms:
            m.eps = 1e-12
        with torch.no_grad():
            assert max_abs_diff(model(ex["input"]), ex["logits"]) > 1e-4
    finally:
        for m in norms:
            m.eps = 1e-6


# ---- what ufgir decides: weights, dropout sites, depth, batches -------------------------------


def test_counts_and_macs_of_vit_b16():
    """Ours: 88,559,872 + 1,025 C at 224 (89,011,456 at 448); the reference's 98,744,016 / 99,195,600
    hold 10,184,144 more that it never uses. MACs as the reference counts them (FGIR.md §8)."""
    C = 200
    for size, total, gmacs in ((224, 88_559_872, 17.949), (448, 89_011_456, 81.804)):
        recipe = load_recipe("simtrans", {"model": {"weights": "none", "image_size": size}})
        with torch.device("meta"):
            model = build_model(recipe.model, C)
        assert _counts(model) == (total + 1_025 * C,) * 2
        assert total + 10_184_144 == {224: 98_744_016, 448: 99_195_600}[size]
        assert count_flops(model, size) / 2e9 == pytest.approx(gmacs, rel=5e-3)


def test_pretrained_weights_and_the_reference_dropout_sites(tmp_path):
    """The backbone takes the recipe's weights like every other method's; dropout sits on the
    embeddings, after the MLP's GELU and after its fc2, none on the attention output."""
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    r = load_recipe("simtrans", {"model": {"backbone": "vit_tiny_patch16_224", "weights": str(tmp_path / "w.safetensors"),
                                           "image_size": 64}})
    model = build_model(r.model, 4)
    assert torch.equal(model.vit.blocks[11].attn.qkv.weight, src.blocks[11].attn.qkv.weight)
    assert torch.equal(model.vit.norm.weight, src.norm.weight)  # the part norm: the backbone's final norm
    assert model.drop.p == 0.0 and model.vit.pos_drop.p == 0.1
    assert {(b.mlp.drop1.p, b.mlp.drop2.p) for b in model.vit.blocks} == {(0.1, 0.1)}
    assert model.structure.gc1.weight.shape == (2, 512) and model.structure.gc2.weight.shape == (512, 192)


def test_injections_follow_the_depth():
    r = load_recipe("simtrans", {"model": {"backbone": "ufgir_vit_micro_patch8_64", "weights": "none", "image_size": 64}})
    with torch.device("meta"):
        model = build_model(r.model, 4)
    assert sorted(model.method.stream_edits(model)) == [3, 4, 5]
    assert model.method.block_notes(model) == {3: "structure injection", 4: "structure injection",
                                               5: "structure injection (part layer)"}
    with torch.device("meta"), pytest.raises(RecipeError, match="last 3 blocks; the backbone has 2"):
        build_model(r.model.model_copy(update={"depth": 2}), 4)


def _recipe(root, epochs: int, **train):
    """The micro ViT (pretrained on synthetic leaves) with SimTrans, on tiny synthetic data."""
    return load_recipe("quickstart", {
        "model": {"method": "simtrans", "ila_ds_locs": [], "ila_locs": [], "drop": 0.1},
        "data": {"root": str(root), "num_workers": 0},
        "train": {"epochs": epochs, "batch_size": 8, "precision": "fp32", **train},
        "eval": {"every": 0}, "optim": {"lr": 0.05}, "schedule": {"warmup_steps": 2}, "logging": {"log_every": 1},
    })


@pytest.mark.parametrize(("batch", "match"), [(1, "train.batch_size is 1"),
                                               (23, r"last batch of each epoch would hold 1 \(24 training images")])
def test_a_training_batch_of_one_is_refused(small_synthetic, tmp_path, batch, match):
    with pytest.raises(RecipeError, match=match) as e:
        fit(_recipe(small_synthetic, 1, batch_size=batch), tmp_path / "run")
    assert "\n" not in str(e.value) and "BatchNorm" in str(e.value) and not (tmp_path / "run").exists()


def test_trains_and_resumes_bit_exactly(small_synthetic, tmp_path, one_thread):
    ref = trains_and_resumes_bit_exactly(_recipe(small_synthetic, epochs=3), tmp_path)
    assert ref["head.norm_in.num_batches_tracked"] == 9  # 3 epochs of 3 steps: the BatchNorm statistics resume too


# ---- the other tools ---------------------------------------------------------------------------


def test_import_export_and_analysis(fixture_dir, tmp_path):
    from ufgir_cli.analysis.features import forward_collect
    from ufgir_cli.ship import export_model, import_upstream

    run = tmp_path / "simtrans"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeNotice)
        model, _ = import_upstream(fixture_dir / f"{NAME}.upstream.pth", run)
    for fmt in ("onnx", "pt2", "safetensors"):  # the selection has static shapes: it traces
        assert export_model(run, fmt).max_abs_diff <= 1e-4, fmt
    ex = torch.load(fixture_dir / f"{NAME}.expected.pt", weights_only=True)
    with torch.no_grad():
        got = forward_collect(model, ex["input"])
    assert max_abs_diff(got.logits, ex["logits"]) <= 1e-4  # forward_head over the intermediates: the injected stream
    assert [t.shape[1] for t in got.tokens] == model.tokens_per_block
    assert [a.shape[-1] for a in got.attention] == [b.tokens_attended for b in model.feature_info]


def test_visualize_crops_shows_parts_and_anchor(small_synthetic, tmp_path, one_thread):
    from typer.testing import CliRunner

    from ufgir_cli.analysis.report import ANCHOR_COLOUR, selections
    from ufgir_cli.cli import app

    run = tmp_path / "simtrans"
    fit(_recipe(small_synthetic, epochs=1), run)
    res = CliRunner().invoke(app, ["visualize", "crops", str(run), "-b", "4", "--dpi", "60"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert (run / "analysis" / "visualize" / "crops_test" / "grid.png").is_file()
    sel = selections(run, count=4)
    assert [label.split(":")[0] for label, _, _ in sel.panels] == ["block 3", "block 4", "block 5 (part layer)"]
    for _, _, rects in sel.panels:  # per image: its parts, and one anchor drawn in its own colour among them
        for per_image in rects:
            anchors = [r for r in per_image if r[4:] == (ANCHOR_COLOUR,)]
            assert len(anchors) == 1 and anchors[0][:4] in [r[:4] for r in per_image if len(r) == 4]


def test_inspect_names_the_injections():
    from typer.testing import CliRunner

    from ufgir_cli.cli import app

    res = CliRunner().invoke(app, ["inspect", "--recipe", "simtrans", "--num-classes", "200"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert res.output.count("structure injection") == 3 and "part layer" in res.output
    assert f"total {88_559_872 + 1_025 * 200:,}" in res.output and "17.95 GMACs" in res.output


def test_paper_row_and_default_reproduce_row():
    from ufgir_cli.analysis.paper import PAPER_ROWS, paper_top1
    from ufgir_cli.reproduce import PAPER_METHODS
    from ufgir_cli.reproduce.table import row_title

    assert PAPER_ROWS["simtrans"].title == "SIMT* (full fine-tuning)"
    assert [paper_top1("simtrans", d) for d in ("cotton80", "soyageing", "soygene", "soyglobal", "soylocal")] == \
        [54.58, 34.76, 15.46, 70.69, 25.00]
    assert "simtrans" in PAPER_METHODS and row_title("simtrans") == "SIMT* (full fine-tuning)"
    assert row_title("transfg") == "TransFG"
    r = load_recipe("simtrans")
    assert r.optim.lr == 0.01 and r.sweep.lrs == (0.03, 0.01, 0.003, 0.001) and r.model.layer_norm_eps == 1e-6
    assert not r.model.simtrans_eval_dropout
