"""Token reduction as a backbone option (model/reduction.py): EViT's and ToMe's rules on hand-built inputs,
the counts the CLCA fixtures README gives for ToMe (tokens per block, merges applied of those asked, GAP
pool lengths, MACs), the geometry past a reduction, timm's exactness where nothing is reduced
(LayerScale, registers), and the recipe keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.errors import RecipeError
from ufgir_cli.methods import TABLE
from ufgir_cli.model import build_model
from ufgir_cli.model.reduction import TokenReduction, attend, evit_reduce, tome_merge, tome_requested
from ufgir_cli.recipe import ModelConfig, load_recipe
from ufgir_cli.recipe_sections import default_reduction_locs

TINY = dict(backbone="vit_tiny_patch16_224", weights="none", num_classes=10, layer_norm_eps=1e-6, drop=0.0)


def _tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **kw}), 10).eval()


# ---- the recipe keys -----------------------------------------------------------------------


def test_default_locations_follow_the_depth():
    assert default_reduction_locs(12) == (3, 6, 9)
    assert default_reduction_locs(24) == (6, 12, 18)
    assert default_reduction_locs(6) == (1, 3, 4)
    r = load_recipe(None, {"model": {"method": "full", "token_reduction": "tome", "keep_rate": 0.5}}, env=False)
    assert r.model.reduction_locs == (3, 6, 9)
    r = load_recipe(None, {"model": {"method": "full", "token_reduction": "evit", "keep_rate": 0.5, "depth": 8}}, env=False)
    assert r.model.reduction_locs == (2, 4, 6)


@pytest.mark.parametrize(("model", "says"), [
    ({"method": "full", "token_reduction": "evit"}, "needs model.keep_rate"),
    ({"method": "full", "keep_rate": 0.5}, "without model.token_reduction"),
    ({"method": "full", "token_reduction": "evit", "keep_rate": 0.5, "reduction_locs": [3, 12]}, "outside the 12-block"),
    ({"method": "full", "token_reduction": "evit", "keep_rate": 0.5, "reduction_locs": [6, 3]}, "ascending"),
    ({"method": "full", "token_reduction": "evit", "keep_rate": 1.5}, "keep_rate"),
    ({"method": "convpass", "token_reduction": "evit", "keep_rate": 0.5}, "patch grid"),
    ({"method": "ila_pp", "token_reduction": "tome", "keep_rate": 0.5}, "patch grid"),
    ({"method": "vpt_deep", "token_reduction": "tome", "keep_rate": 0.5}, "per-block prompts"),
    ({"method": "clca", "keep_rate": 0.5}, "caches around a token reduction"),
])
def test_bad_reduction_settings_are_one_line(model, says):
    with pytest.raises(RecipeError, match=says):
        load_recipe(None, {"model": model}, env=False)


# ---- EViT on a hand-built input ------------------------------------------------------------


def test_evit_keeps_by_descending_score_fuses_the_rest_unnormalised_and_protects_the_prefix():
    B, D = 1, 3
    x = torch.arange(8 * D, dtype=torch.float32).reshape(B, 8, D)
    # Two prefix tokens (CLS, a register), six candidates; head-mean scores 0.05 .. 0.3 in a known order.
    row = torch.tensor([0.0, 0.9, 0.10, 0.30, 0.05, 0.20, 0.15, 0.25])
    cls_row = torch.stack([row * 0.5, row * 1.5])[None]                     # (B, 2 heads, 8): mean = row
    out, did = evit_reduce(x, cls_row, prefix=2, keep_rate=0.5)             # k = ceil(0.5 * 6) = 3
    assert did["kept"].tolist() == [[1, 5, 3]]                              # 0.30, 0.25, 0.20: candidate positions
    assert did["dropped"].tolist() == [[0, 2, 4]]                           # ascending
    fused = 0.10 * x[0, 2] + 0.05 * x[0, 4] + 0.15 * x[0, 6]                # weights not renormalised
    assert torch.equal(out[0, :2], x[0, :2])                                # the prefix, never scored (0.9 ignored)
    assert torch.equal(out[0, 2:5], x[0, [3, 7, 5]])
    assert torch.allclose(out[0, 5], fused) and out.shape == (1, 6, D)
    same, none = evit_reduce(x, cls_row, prefix=2, keep_rate=1.0)           # k = n: nothing happens
    assert same is x and none is None


def test_evit_keep_count_is_ceil_in_double_precision():
    x = torch.randn(1, 198, 4)
    for rate, k in ((0.1, 20), (0.7, 138), (0.25, 50)):
        assert evit_reduce(x, torch.rand(1, 2, 198), 1, rate)[0].shape[1] == 1 + k + 1 == 2 + math.ceil(rate * 197)


# ---- ToMe on a hand-built input ------------------------------------------------------------


def _unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_tome_matching_merges_the_best_pairs_size_weighted_and_protects_the_prefix():
    # Positions 0..6: A = 0, 2, 4, 6 (0 = CLS), B = 1, 3, 5. Token 2 matches 5 best (cos 1), token 4 matches 1
    # (cos 0.9), token 6 matches 3 (cos 0.8). The CLS is identical to token 1 but never merges.
    e = [_unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1)]
    metric = torch.stack([e[1], e[1], e[0], e[2], 0.9 * e[1] + 0.19 ** 0.5 * e[2], e[0],
                          0.8 * e[2] + 0.6 * e[0]])[None]                   # (1, 7, 3)
    x = torch.arange(7, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)  # token i = (i, i)
    sizes = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0])[None, :, None]
    out, new_sizes, did = tome_merge(x, sizes, metric, prefix=1, r=2)
    assert did["r"] == 2 and did["src"].tolist() == [[1, 2]] and did["dst"].tolist() == [[2, 0]]
    assert did["unm"].tolist() == [[0, 3]]                                  # ascending: CLS first
    # [CLS, token 6, B: token 1 + token 4, token 3, token 5 + token 2 (size 3)]
    assert new_sizes[0, :, 0].tolist() == [1, 1, 2, 1, 4]
    assert out[0, :, 0].tolist() == pytest.approx([0, 6, 2.5, 3, (5 + 3 * 2) / 4])
    # r is capped at half the unprotected tokens; a register at position 1 (B) is never a destination.
    assert tome_merge(x, None, metric, prefix=1, r=10)[2]["r"] == 3
    out2, _, did2 = tome_merge(x, None, metric, prefix=2, r=2)
    assert 0 not in did2["dst"][0].tolist() and torch.equal(out2[0, :2], x[0, :2])


def test_tome_merge_counts():
    assert tome_requested(0.1, 196, 3) == [177, 18, 1]                      # FGIR_README: r asked at 224
    assert tome_requested(0.1, 784, 3) == [706, 71, 7]                      # CLCA.md §4.1 at 448


def test_the_size_bias_is_an_additive_mask_in_the_fused_attention():
    torch.manual_seed(0)
    attn = build_model(ModelConfig(**TINY, method="full"), 10).vit.blocks[0].attn.eval()
    h = torch.randn(2, 9, 192)
    bias = torch.rand(2, 9).mul(3).exp().log()                              # log sizes
    fused, ex = attend(attn, h, bias, want_cls=True, want_metric=True)
    maps: list[torch.Tensor] = []
    explicit, ex2 = attend(attn, h, bias, maps=maps)
    assert torch.allclose(fused, explicit, atol=1e-6) and torch.allclose(ex["cls"], ex2["cls"], atol=1e-6)
    qkv = attn.qkv(h).reshape(2, 9, 3, 3, 64).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] @ qkv[1].transpose(-1, -2)) * attn.scale + bias[:, None, None, :]
    assert torch.allclose(maps[0], logits.softmax(-1), atol=1e-6)           # proportional attention
    assert torch.allclose(ex["metric"], qkv[1].mean(1))                      # keys averaged over heads


def test_cpu_bf16_training_takes_the_explicit_path_with_the_size_bias(monkeypatch):
    """As elsewhere in the model, bf16 training on a CPU skips SDPA (its backward is the slower one there);
    the output and the CLS row are SDPA's within bf16 rounding, and the gradient flows."""
    torch.manual_seed(0)
    attn = build_model(ModelConfig(**TINY, method="full"), 10).vit.blocks[0].attn.eval()
    h = torch.randn(2, 9, 192)
    bias = torch.rand(2, 9).mul(3).exp().log()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, ex = attend(attn, h, bias, want_cls=True)                    # no grad: SDPA
    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called in CPU bf16 training")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    hr = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit, ex2 = attend(attn, hr, bias, want_cls=True)
    assert torch.allclose(fused.float(), explicit.float(), atol=3e-2)
    assert torch.allclose(ex["cls"].float(), ex2["cls"].float(), atol=1e-2)
    explicit.float().sum().backward()
    assert hr.grad is not None and torch.isfinite(hr.grad).all()


# ---- the model: counts, geometry, timm's numerics -----------------------------------------------


def test_tome_with_clca_gives_the_fixture_readme_counts():
    model = _tiny(method="clca", token_reduction="tome", keep_rate=0.1)
    assert model.tokens_per_block == [198, 198, 198, 106, 106, 106, 94, 94, 94, 99, 101, 101]
    with torch.no_grad(), model.reduction.recording() as merges, model.method.recording() as cache:
        model(torch.randn(2, 3, 224, 224))
    assert [m["r"] for m in merges] == [98, 18, 1] and [m["requested"] for m in merges] == [177, 18, 1]
    assert [c["pool_len"] for c in cache if c["pool_len"] is not None] == [196] * 3 + [99] * 3 + [87] * 3 + [92]
    assert count_flops(model, 224) // 2 == 790_621_376                       # the fixture's flop_counter MACs


def test_geometry_past_a_reduction_counts_tokens_and_refuses_a_grid():
    model = _tiny(method="full", token_reduction="evit", keep_rate=0.25)
    info = model.feature_info
    assert [b.tokens_attended for b in info] == [197] * 4 + [51] * 3 + [15] * 3 + [6] * 2
    assert [b.grid for b in info[:4]] == [(14, 14)] * 4 and info[3].out_grid is None
    assert all(b.grid is None and b.out_grid is None for b in info[4:])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = model.attention_maps(x)
        assert [tuple(a.shape) for a in maps] == [(2, 3, n, n) for n in (b.tokens_attended for b in info)]
        nlc = model.forward_intermediates(x, indices=[2, 5], intermediates_only=True)
        assert [t.shape[1] for t in nlc] == [196, 50]
        assert model.forward_intermediates(x, indices=[2], output_fmt="NCHW", intermediates_only=True)[0].shape == (2, 192, 14, 14)
        with pytest.raises(ValueError, match="no patch grid"):
            model.forward_intermediates(x, indices=[3], output_fmt="NCHW")
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize(("backbone", "size", "prefix"), [("vit_small_patch14_reg4_dinov2", 70, 5),
                                                       ("deit3_small_patch16_224", 64, 1)])
@pytest.mark.parametrize("kind", ["evit", "tome"])
def test_nothing_reduced_is_timm_exactly_with_layerscale_and_registers(kind, backbone, size, prefix):
    """A keep rate that reduces nothing runs the reduction blocks through the reduction's own path: it must
    give timm's tokens (LayerScale, fused attention; DINOv2's four registers in front, DeiT 3's positions
    without the class token)."""
    cfg = ModelConfig(backbone=backbone, weights="none", image_size=size, depth=4, num_classes=5,
                      method="full", drop=0.0, token_reduction=kind, keep_rate=1.0, reduction_locs=(1, 2))
    torch.manual_seed(0)
    model = build_model(cfg, 5).eval()
    for blk in model.vit.blocks:
        blk.ls1.gamma.data.uniform_(0.5, 1.5)
        blk.ls2.gamma.data.uniform_(0.5, 1.5)
    assert model.num_prefix_tokens == prefix
    x = torch.randn(2, 3, size, size)
    patches = (size // model.vit.patch_embed.patch_size[0]) ** 2
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), model.vit.forward_features(x), atol=1e-5)
        model.reduction.keep_rate = 0.5
        out = model.forward_features(x)
    assert out.shape[1] == [b.tokens_out for b in model.feature_info][-1] < prefix + patches


def test_registers_stay_in_front_through_a_reduction():
    cfg = ModelConfig(backbone="vit_small_patch14_reg4_dinov2", weights="none", image_size=70, depth=4, num_classes=5,
                      method="full", drop=0.0, token_reduction="evit", keep_rate=0.5, reduction_locs=(1,))
    torch.manual_seed(0)
    model = build_model(cfg, 5).eval()
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad(), model.reduction.recording() as did:
        _, (after,) = model.encode(x, frozenset({1}))
        _, (before,) = model.encode(x, frozenset({0}))
    assert after.shape[1] == 5 + math.ceil(0.5 * 25) + 1 and did[0]["kept"].shape == (2, 13)
    blk = model.vit.blocks[1]
    y = before + blk.ls1(blk.attn(blk.norm1(before)))
    y = y[:, :5] + blk.ls2(blk.mlp(blk.norm2(y[:, :5])))                      # token-wise: the prefix alone
    assert torch.allclose(after[:, :5], y, atol=1e-5)


@pytest.mark.parametrize(("size", "rate", "gmacs"), [(224, 0.1, 11.197), (224, 0.7, 12.191), (448, 0.1, 46.256),
                                                     (448, 0.7, 50.853)])
def test_tome_with_clca_macs_of_vit_b16_clip(size, rate, gmacs):
    """CLCA.md §6: ToMe + CLCA on CLIP ViT-B/16 (flop_counter), within 0.1 %."""
    from ufgir_cli.model import meta_model

    r = load_recipe("clca", {"model": {"token_reduction": "tome", "keep_rate": rate, "image_size": size}})
    assert count_flops(meta_model(r.model, 10), size) / 2e9 == pytest.approx(gmacs, rel=1e-3)


def test_shallow_prompts_are_protected_prefix_tokens():
    model = _tiny(method="vpt_shallow", prompt_len=4, token_reduction="evit", keep_rate=0.1, drop=0.0)
    assert model.num_prefix_tokens == 5
    assert model.tokens_per_block[3] == 5 + math.ceil(0.1 * 196) + 1
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _, (before, after) = model.encode(x, frozenset({2, 3}))
        blk = model.vit.blocks[3]
        y = before + blk.ls1(blk.attn(blk.norm1(before)))
        y = y[:, :5] + blk.ls2(blk.mlp(blk.norm2(y[:, :5])))
    assert torch.allclose(after[:, :5], y, atol=1e-5)                       # the prompts pass unscored, in front


@pytest.mark.parametrize("method", [m.name for m in TABLE if m.takes_reduction and not m.has_ila])
def test_every_method_that_takes_a_reduction_runs_with_one(method):
    """Every method without a patch grid, ILA, per-block prompts or a token selection into a block of its own
    (ILA methods, whose reductions must follow their ILAs: tests/test_combinations.py):
    with EViT and with ToMe, logits in eval, a loss with a gradient in training, the maps of every block as long
    as the tokens it attends over."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "num_classes": 5}, image_size=64, method=method, token_reduction="evit",
                                    keep_rate=0.5), 5)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    for kind in ("evit", "tome"):
        model.reduction = TokenReduction(kind, 0.5, model.reduction.locs)
        model.zero_grad()
        step = model.train()(x, y, nn.CrossEntropyLoss())
        step.loss.backward()
        assert math.isfinite(float(step.loss.detach())) and any(p.grad is not None for p in model.parameters())
        with torch.no_grad(), model.reduction.recording() as did:
            assert model.eval()(x).shape == (2, 5)
        assert len(did) == 3 and all(d.get("r", 1) > 0 and "dropped" in d or "src" in d for d in did), kind
        with torch.no_grad():
            maps = model.attention_maps(x)
        assert [a.shape[-1] for a in maps] == [b.tokens_attended for b in model.feature_info], kind
