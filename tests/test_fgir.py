"""The comparison methods (IFA, MPN-COV, VQT, TransFG, FFVT, GLSim, RAMS, CAL): the reference's checkpoints reproduce through
`load_upstream_checkpoint`, every stored intermediate within the fixture README's tolerance, the counts
and MACs of FGIR.md §10 for ViT-B/16, and each head fed the very tensors the reference handed its own.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from resume_check import trains_and_resumes_bit_exactly

from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import ExportError
from ufgir_cli.model import build_model, load_upstream_checkpoint
from ufgir_cli.model.methods.aggregator import maws_scores, psm_scores
from ufgir_cli.model.methods.pooling import IFAHead, MPNCovHead, isqrt_newton_schulz, upper_triangle
from ufgir_cli.model.methods.two_pass import crop_boxes, glsim_scores, rollout_scores
from ufgir_cli.recipe import load_recipe


def _fixture(fixture_dir, name):
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(fixture_dir / f"{name}.upstream.pth", weights_only=True)
    expected = torch.load(fixture_dir / f"{name}.expected.pt", weights_only=True)
    sd = {k.removeprefix("model."): v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    return sd, expected


def test_ifa_head_reproduces_reference(fixture_dir):
    sd, ex = _fixture(fixture_dir, "ifa_t16_224")
    depth, dim = ex["cls_per_block"].shape[1:]
    head = IFAHead(depth, dim, sd["head.ifa_head.4.weight"].shape[0]).eval()
    head.load_state_dict({
        "mix.weight": sd["head.ifa_head.0.weight"], "mix.bias": sd["head.ifa_head.0.bias"],
        "norm.weight": sd["head.ifa_head.3.weight"], "norm.bias": sd["head.ifa_head.3.bias"],
        "fc.weight": sd["head.ifa_head.4.weight"], "fc.bias": sd["head.ifa_head.4.bias"],
    })
    with torch.no_grad():
        pre = head(ex["cls_per_block"], pre_logits=True)
        logits = head(ex["cls_per_block"])
    assert (pre - ex["layer_mix_norm"]).abs().max() <= 1e-5
    assert (logits - ex["logits"]).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def mpncov(fixture_dir):
    sd, ex = _fixture(fixture_dir, "mpncov_t16_160")
    dim = ex["tokens"].shape[-1]
    head = MPNCovHead(dim, sd["head.head.1.weight"].shape[0], proj=ex["class_proj_size"],
                      iterations=ex["iterations"]).eval()
    block = "head.mpncov.conv_dr_block."
    head.load_state_dict({
        "reduce.0.weight": sd[block + "0.weight"],
        **{f"reduce.1.{k}": sd[block + "1." + k] for k in ("weight", "bias", "running_mean", "running_var",
                                                           "num_batches_tracked")},
        "fc.weight": sd["head.head.1.weight"], "fc.bias": sd["head.head.1.bias"],
    })
    return head, ex


def test_mpncov_head_reproduces_reference(mpncov):
    head, ex = mpncov
    g = ex["grid_size"]
    with torch.no_grad():
        reduced = head.reduce(ex["tokens"].transpose(1, 2).reshape(2, -1, g, g))
        pooled = head(ex["tokens"], (g, g), pre_logits=True)
        logits = head(ex["tokens"], (g, g))
    assert (reduced - ex["reduced"]).abs().max() <= 1e-5
    root = isqrt_newton_schulz(ex["covariance"], ex["iterations"])
    assert (root - ex["sqrtm"]).abs().max() <= 1e-5 * ex["sqrtm"].abs().max()
    assert (pooled - ex["cov_pooled"]).abs().max() <= 1e-4 * ex["cov_pooled"].abs().max()
    assert (logits - ex["logits"]).abs().max() <= 1e-3  # README: Newton-Schulz in fp32, atol 1e-3


def test_mpncov_autograd_matches_reference_backward(mpncov):
    """Plain autograd of the pooling equals the reference's hand-written backward (README: 8.2e-7)."""
    head, ex = mpncov
    case = ex["grad_case"]
    reduced = ex["reduced"].clone().requires_grad_(True)
    x = reduced.flatten(2)
    x = x - x.mean(dim=2, keepdim=True)
    cov = x @ x.transpose(1, 2) / x.shape[2]
    pooled = upper_triangle(isqrt_newton_schulz(cov, ex["iterations"]))
    (pooled * case["upstream_grad"]).sum().backward()
    want = case["input_grad"]
    assert (reduced.grad - want).abs().max() <= 1e-3 * want.abs().max()


def _upstream(fixture_dir, name):
    model, recipe = load_upstream_checkpoint(fixture_dir / f"{name}.upstream.pth")
    expected = torch.load(fixture_dir / f"{name}.expected.pt", weights_only=True)
    return model, recipe, expected


def _counts(model):
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def test_ifa_checkpoint_reproduces(fixture_dir):
    model, recipe, ex = _upstream(fixture_dir, "ifa_t16_224")
    assert recipe.model.method == "ifa"
    x = ex["input"]
    with torch.no_grad():
        logits = model(x)
        inter = model.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=True)
        cls = torch.stack([prefix[:, 0] for _, prefix in inter], dim=1)         # (B, depth, D)
        mixed = model.head(cls, pre_logits=True)
    assert (logits - ex["logits"]).abs().max() <= 1e-4
    assert (cls - ex["cls_per_block"]).abs().max() <= 1e-4
    assert (mixed - ex["layer_mix_norm"]).abs().max() <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert _counts(model) == (ex["trainable_params"], ex["total_params"])
    # No final LayerNorm anywhere: scrambling the backbone's norm parameters changes nothing.
    for p in model.vit.norm.parameters():
        p.data.normal_()
    with torch.no_grad():
        assert torch.equal(model(x), logits)


def test_mpncov_checkpoint_reproduces(fixture_dir):
    model, recipe, ex = _upstream(fixture_dir, "mpncov_t16_160")
    assert recipe.model.method == "mpncov" and recipe.model.depth == 4 and model.vit.cls_token is None
    x = ex["input"]
    with torch.no_grad():
        logits = model(x)
        tokens = model.forward_features(x)
        pooled = model.head.pool(tokens, model.feature_info[-1].out_grid)
    assert (tokens - ex["tokens"]).abs().max() <= 1e-4
    assert (pooled - ex["cov_pooled"]).abs().max() <= 1e-4 * ex["cov_pooled"].abs().max()
    assert (logits - ex["logits"]).abs().max() <= 1e-3
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert _counts(model) == (ex["trainable_params"], ex["total_params"])


def test_vqt_checkpoint_reproduces(fixture_dir):
    model, recipe, ex = _upstream(fixture_dir, "vqt_t16_112")
    assert recipe.model.method == "vqt" and recipe.model.prompt_len == ex["prompt_len"] == 5
    x = ex["input"]
    L = ex["prompt_len"]
    with torch.no_grad():
        logits = model(x)
        final, inter = model.forward_intermediates(x, return_prefix_tokens=True)
        outputs = [torch.cat([prefix, patches], dim=1) for patches, prefix in inter]  # (B, L + T, D) each
        head_input = model.forward_head(final, pre_logits=True, intermediates=outputs)
        maps = model.attention_maps(x)
    assert (logits - ex["logits"]).abs().max() <= 1e-4
    for i, out in enumerate(outputs):
        assert (out[:, :L] - ex["prompt_outputs"][i]).abs().max() <= 1e-4
        stream = ex["block_inputs"][i + 1] if i + 1 < len(outputs) else ex["encoder_output"]
        assert (out[:, L:] - stream).abs().max() <= 1e-4  # the stream is exactly a plain ViT's
    assert (final[:, L:] - ex["encoder_norm_output"]).abs().max() <= 1e-4
    assert (head_input - ex["head_input"]).abs().max() <= 1e-5
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert [m.shape[-1] for m in maps] == list(ex["keys_per_block"])  # prompts are never keys
    assert _counts(model) == (ex["trainable_params"], ex["total_params"])


def test_transfg_checkpoint_reproduces(fixture_dir):
    model, recipe, ex = _upstream(fixture_dir, "transfg_t16_224")
    assert recipe.model.method == "transfg" and recipe.model.depth == 11
    x = ex["input"]
    with torch.no_grad():
        logits = model(x)
        tokens, idx = model.method.select_tokens(model, x)
        maps = model.attention_maps(x)
    assert torch.equal(idx, ex["token_indices"])  # one part per head, in head order
    assert (tokens - ex["aggregator_input"]).abs().max() <= 1e-5
    assert (psm_scores(maps) - ex["psm_scores"]).abs().max() <= 1e-6
    assert (logits - ex["logits"]).abs().max() <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert _counts(model) == (ex["trainable_params"], ex["total_params"])
    # The row-0 chain: the same scores, so the same parts, for ~1000x fewer multiply-adds at 448 px.
    assert (psm_scores(maps, row0_chain=True) - ex["psm_scores"]).abs().max() <= 1e-6
    model.method.row0_chain = True
    with torch.no_grad():
        assert torch.equal(model.method.select_tokens(model, x)[1], idx)


def test_ffvt_checkpoint_reproduces(fixture_dir):
    model, recipe, ex = _upstream(fixture_dir, "ffvt_t16_224")
    assert recipe.model.method == "ffvt" and recipe.model.maws_tokens == ex["selector_num_tokens"] == 12
    x = ex["input"]
    with torch.no_grad():
        logits = model(x)
        tokens, idx = model.method.select_tokens(model, x)
    for block in range(idx.shape[0]):  # compared as sets: the order inside the 12 has near-ties
        for b in range(idx.shape[1]):
            assert set(idx[block, b].tolist()) == set(ex["token_indices"][block, b].tolist())
    assert tokens.shape == ex["aggregator_input"].shape
    assert (tokens[:, 0] - ex["aggregator_input"][:, 0]).abs().max() <= 1e-5
    assert (logits - ex["logits"]).abs().max() <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert _counts(model) == (ex["trainable_params"], ex["total_params"])


def test_maws_scores_from_the_stored_maps(fixture_dir):
    _, _, ex = _upstream(fixture_dir, "ffvt_t16_224")
    for block in range(ex["maws_scores"].shape[0]):
        rows = ex["attention_cls_rows"][block]                                 # (B, heads, S): the CLS rows
        got = maws_scores(rows, ex["attention_logits_cls_cols"][block])
        assert (got - ex["maws_scores"][block]).abs().max() <= 1e-6 * ex["maws_scores"][block].abs().max() + 1e-12


@pytest.mark.parametrize("name", ["glsim_t16_224", "rams_t16_112"])
def test_crop_methods_reproduce(fixture_dir, name):
    """GLSim and RAMS: the same patches, boxes and crops as the reference, then both passes and the head."""
    model, recipe, ex = _upstream(fixture_dir, name)
    x = ex["input"]
    with torch.no_grad():
        logits = model(x)
        first = model.method.crop(model, x)
    for ours, theirs in zip(first["indices"].tolist(), ex["indices"].tolist(), strict=True):
        assert set(ours) == set(theirs)
    assert torch.equal(first["boxes"], ex["boxes"])
    assert (first["crops"] - ex["crops"]).abs().max() <= 1e-5
    assert (first["tokens"] - ex["tokens_pass1"]).abs().max() <= 1e-4
    assert (logits - ex["logits"]).abs().max() <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert _counts(model) == (ex["trainable_params"], ex["total_params"])
    if name.startswith("glsim"):
        assert recipe.model.train_backbone  # the reference fixture trains every weight
        sim, largest = glsim_scores(ex["tokens_pass1"])
        assert largest and (sim - ex["similarity"]).abs().max() <= 1e-5
    else:
        maps = [a.unsqueeze(1) for a in ex["attention_pass1_head_mean"]]      # (B, 1, S, S): heads already fused
        assert (rollout_scores(maps) - ex["rollout_scores"]).abs().max() <= 1e-6
        assert (rollout_scores(maps, row0_chain=True) - ex["rollout_scores"]).abs().max() <= 1e-6


def test_glsim_crafted_boxes_and_metrics(fixture_dir):
    """The reference's box edge cases (one row, the last column, a corner block, the four corners)
    and its l1 / l2 selections."""
    _, _, ex = _upstream(fixture_dir, "glsim_t16_224")
    cases = ex["box_cases"]
    sim, _ = glsim_scores(cases["tokens"])
    idx = sim.topk(8, dim=-1).indices
    assert [sorted(i) for i in idx.tolist()] == [sorted(c) for c in cases["chosen"]]
    assert torch.equal(crop_boxes(idx, (14, 14), 16, 224), cases["boxes"])
    for metric in ("l1", "l2"):
        scores, largest = glsim_scores(ex["tokens_pass1"], metric)
        got = scores.topk(8, dim=-1, largest=largest).indices
        for ours, theirs in zip(got.tolist(), ex["indices_by_metric"][metric].tolist(), strict=True):
            assert set(ours) == set(theirs)


def test_glsim_ft_recipe_is_the_readme_command():
    """`ufgir train --recipe glsim_ft --dataset cub200 --set model.image_size=448` resolves to the
    reference README's GLSim command (FGIR.md §1.5)."""
    r = load_recipe("glsim_ft", {"data": {"dataset": "cub200"}, "model": {"image_size": 448}})
    m, o, sch, t = r.model, r.optim, r.schedule, r.train
    assert (m.method, m.train_backbone, m.image_size, m.crop_tokens or 16) == ("glsim", True, 448, 16)
    assert (o.name, o.lr, o.nesterov, o.momentum, o.weight_decay, o.clip_grad) == ("sgd", 0.01, True, 0.9, 0.0, 1.0)
    assert (sch.name, sch.warmup_steps, sch.warmup_lr, sch.min_lr) == ("cosine", 500, 1e-6, 1e-5)
    assert (t.epochs, t.batch_size, t.precision, t.split, r.eval.split) == (50, 8, "fp16", "train_val", "test")
    assert (r.data.augment, o.label_smoothing, m.drop_path, m.drop_path_schedule) == ("medium", 0.1, 0.1, "uniform")
    with torch.device("meta"):
        model = build_model(r.model.model_copy(update={"weights": "none"}), 200)
    assert all(p.requires_grad for p in model.parameters())


# ViT-B/16, 200 classes: trainable counts of the issues' tables and FGIR.md §10's GMACs (224, 448).
B16 = {"ifa": (2_317 + 769 * 200, (17.567, 78.509)), "mpncov": (49_280 + 2_081 * 200, (17.484, 78.434)),
       "vqt": (46_848 + 46_849 * 200, None), "transfg": (7_088_640 + 769 * 200, (17.122, 130.146)),
       "ffvt": (7_090_176 + 769 * 200, (17.081, 72.974)), "glsim": (7_090_944 + 769 * 200, (35.149, 157.036)),
       "rams": (1_536 + 769 * 200, (35.219, 162.350)), "cal": (24_640 + 24_576 * 200, (139.894, 627.504))}


@pytest.mark.parametrize("method", sorted(B16))
def test_vit_b16_counts_and_macs(method):
    trainable, gmacs = B16[method]
    for i, size in enumerate((224, 448)):
        recipe = load_recipe(method, {"model": {"weights": "none", "image_size": size}})
        with torch.device("meta"):
            model = build_model(recipe.model, 200)
        assert _counts(model)[0] == trainable
        if gmacs is not None:
            assert count_flops(model, size) / 2e9 == pytest.approx(gmacs[i], rel=5e-3)
        if method == "cal":  # its single-crop evaluation: 2 passes
            single = count_flops(model, size, mode="2 passes (single crop)") / 2e9
            assert single == pytest.approx((34.973, 156.875)[i], rel=5e-3)


# ---- training: the loss falls, and a run stopped by a signal resumes bit-exactly ------------------


def _recipe(method: str, root, epochs: int):
    """The micro ViT (pretrained on synthetic leaves) with the method's head, on tiny synthetic data."""
    return load_recipe("quickstart", {
        "model": {"method": method, "ila_ds_locs": [], "ila_locs": [], "prompt_len": 5, "cov_dim": 16, "drop": 0.1,
                  "depth": 6, "maws_tokens": 4},
        "data": {"root": str(root), "num_workers": 0},
        "train": {"epochs": epochs, "batch_size": 8, "precision": "fp32"},
        "eval": {"every": 0}, "optim": {"lr": 0.05}, "schedule": {"warmup_steps": 2}, "logging": {"log_every": 1},
    })


@pytest.mark.parametrize("method", sorted(B16))
def test_trains_and_resumes_bit_exactly(method, small_synthetic, tmp_path, one_thread):
    ref = trains_and_resumes_bit_exactly(_recipe(method, small_synthetic, epochs=3), tmp_path)
    if method == "cal":  # its class feature centres are saved, and resume where they were
        assert ref["head.feature_center"].abs().sum() > 0


# ---- the other tools: import-upstream, export with parity, the analysis pass ---------------------


@pytest.mark.parametrize("name", ["ifa_t16_224", "mpncov_t16_160", "vqt_t16_112", "transfg_t16_224", "ffvt_t16_224",
                                  "glsim_t16_224", "rams_t16_112", "cal_t16_160"])
def test_import_export_and_analysis(fixture_dir, tmp_path, name):
    from ufgir_cli.analysis.features import forward_collect
    from ufgir_cli.ship import export_model, import_upstream

    run = tmp_path / name
    import_upstream(fixture_dir / f"{name}.upstream.pth", run)
    if name.startswith("vqt"):  # the one with a changed block; ONNX export takes ~15 s, so once
        assert export_model(run, "onnx").max_abs_diff <= 1e-4
    elif name.startswith(("transfg", "ffvt")):  # selection by argmax / top-k traces
        assert export_model(run, "pt2").max_abs_diff <= 1e-4
    elif name.startswith(("glsim", "rams", "cal")):  # a crop whose size depends on the image does not
        with pytest.raises(ExportError, match="traced graph cannot hold"):
            export_model(run, "pt2")
    assert export_model(run, "safetensors").max_abs_diff <= 1e-4
    model, _, ex = _upstream(fixture_dir, name)
    with torch.no_grad():
        got = forward_collect(model, ex["input"])
        logits = model(ex["input"])
    assert torch.allclose(got.logits, logits, atol=1e-5)
    assert [t.shape[1] for t in got.tokens] == model.tokens_per_block
    assert [a.shape[-1] for a in got.attention] == [b.tokens_attended for b in model.feature_info]


@pytest.mark.parametrize("method", ["glsim", "ffvt", "cal"])
def test_visualize_crops(method, small_synthetic, tmp_path, one_thread):
    from typer.testing import CliRunner

    from ufgir_cli.cli import app

    run = tmp_path / method
    fit(_recipe(method, small_synthetic, epochs=1), run)
    res = CliRunner().invoke(app, ["visualize", "crops", str(run), "-b", "4", "--dpi", "60"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    grid = run / "analysis" / "visualize" / "crops_test" / "grid.png"
    assert grid.is_file() and str(grid) in res.output.replace("\n", "")
    # GLSim: the image with its box, and the crop; CAL: the image with its three boxes, and the crops
    panels = {"glsim": 2, "ffvt": 1, "cal": 4}[method]
    from ufgir_cli.analysis.report import selections

    sel = selections(run, count=4)
    assert len(sel.panels) == panels and len(sel.captions) == 4
    assert all(len(rects) >= 1 for rects in sel.panels[0][2])  # every image has its box or patches drawn


def test_visualize_crops_refuses_a_method_that_selects_nothing(small_synthetic, tmp_path, one_thread):
    from typer.testing import CliRunner

    from ufgir_cli.cli import app

    run = tmp_path / "ifa"
    fit(_recipe("ifa", small_synthetic, epochs=1), run)
    res = CliRunner().invoke(app, ["visualize", "crops", str(run)])
    assert res.exit_code == 2 and "ifa selects nothing" in res.output
