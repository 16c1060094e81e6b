"""The model: reference parity, parameter counts and MACs per method, ILA geometry, freezing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.errors import CheckpointError
from ufgir_cli.methods import METHOD_NAMES as METHODS
from ufgir_cli.model import build_model, load_upstream_checkpoint
from ufgir_cli.model.ila import ILA
from ufgir_cli.model.vit import resize_input
from ufgir_cli.recipe import load_recipe

# ViT-B/16, 200 classes: trainable besides head (769*200) and CLS (768), reference/ILA.md section 3.
PETL_PARAMS = {
    "linear": 0, "vpt_shallow": 76_800, "vpt_deep": 921_600, "adapter": 313_536, "convpass": 327_552,
    "ila": 40_496, "ila_plus": 173_856, "ila_pp": 354_032,
}
HEAD_CLS = 769 * 200 + 768


def meta_model(method: str, image_size: int = 224, **model):
    r = load_recipe(method, {"model": {"weights": "none", "image_size": image_size, **model}})
    with torch.device("meta"):
        return build_model(r.model, 200)


def tiny(method: str = "ila_pp", **model):
    cfg = {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 96, "ila_ds_locs": [1, 3]}
    if method not in ("ila", "ila_plus", "ila_pp"):
        cfg.pop("ila_ds_locs")
    cfg.update(model)
    r = load_recipe(method, {"model": cfg})
    torch.manual_seed(0)
    return build_model(r.model, 5)


# ---- reference parity -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(fixture_dir):
    model, recipe = load_upstream_checkpoint(fixture_dir / "ila_pp_t16_224.upstream.pth")
    expected = torch.load(fixture_dir / "ila_pp_t16_224.expected.pt", weights_only=True)
    return model, recipe, expected


def test_upstream_logits_tokens_attention(upstream):
    model, recipe, ex = upstream
    assert recipe.model.method == "ila_pp" and recipe.model.backbone == "vit_tiny_patch16_224"
    assert recipe.model.ila_ds_locs == (3, 7) and recipe.model.layer_norm_eps == 1e-12
    with torch.no_grad():
        logits = model(ex["input"])
        maps = model.attention_maps(ex["input"])
    assert logits.shape == (2, 200)
    assert (logits - ex["logits"]).abs().max().item() <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    assert [m.shape for m in maps] == [a.shape for a in ex["attention"]]
    for ours, theirs in zip(maps, ex["attention"], strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-5


def test_upstream_trainable_count(upstream):
    model, _, ex = upstream
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ex["trainable_params"]
    assert sum(p.numel() for p in model.parameters()) == ex["total_params"]


def test_upstream_refuses_garbage(tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_upstream_checkpoint(bad)


def test_upstream_unmapped_key_is_listed(upstream, fixture_dir, tmp_path):
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(fixture_dir / "ila_pp_t16_224.upstream.pth", weights_only=True)
    ck["model"]["model.encoder.blocks.0.mystery.weight"] = torch.zeros(3)
    del ck["model"]["model.encoder_norm.bias"]
    torch.save(ck, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match="mystery"):
        load_upstream_checkpoint(tmp_path / "edited.pth")


# ---- counts and cost ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(PETL_PARAMS))
def test_vit_b16_trainable_params(method):
    m = meta_model(method)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == PETL_PARAMS[method] + HEAD_CLS


def test_named_totals():
    counts = {m: sum(p.numel() for p in meta_model(m).parameters() if p.requires_grad) for m in ("ila_pp", "adapter", "ila", "linear")}
    assert counts == {"ila_pp": 508_600, "adapter": 468_104, "ila": 195_064, "linear": 154_568}
    full = meta_model("full")
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize(
    ("method", "size", "gmacs"),
    [("linear", 224, 17.56), ("ila_pp", 224, 13.14), ("linear", 448, 78.50), ("ila_pp", 448, 67.06)],
)
def test_vit_b16_macs(method, size, gmacs):
    macs = count_flops(meta_model(method, size), size) / 2 / 1e9
    assert abs(macs - gmacs) / gmacs < 0.005, macs


def test_tokens_per_block_paper():
    assert meta_model("ila_pp").tokens_per_block == [197] * 3 + [145] * 4 + [101] * 5
    assert meta_model("ila_pp", 448).tokens_per_block == [785] * 3 + [677] * 4 + [577] * 5


# ---- every method runs; ILA geometry ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_forward_and_maps(method):
    m = tiny(method).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        y = m(x)
        maps = m.attention_maps(x)
    assert y.shape == (2, 5)
    assert len(maps) == len(m.vit.blocks) == (m.cfg.depth or 12)  # TransFG and FFVT run 11 blocks
    info = m.feature_info
    # A block attends over what the one before it output, plus its deep prompts, minus the query-only
    # (VQT) prompt rows that the previous block passed on; block 0 also over tokens appended after the patches
    # (CLCA's carrier).
    kind = m.plan.prompts
    deep = m.prompt_len if kind and kind.replaced else 0
    dropped = m.prompt_len if kind and kind.query_only else 0
    suffix = m.method.suffix_count(m)
    entering = [m.num_prefix_tokens - dropped + 36 + suffix] + [b.tokens_out - dropped for b in info[:-1]]
    for a, b, n in zip(maps, info, entering, strict=True):
        assert b.tokens_attended == n + deep
        assert a.shape == (2, 3, b.tokens_attended, b.tokens_attended)
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)


def test_vpt_deep_with_downsampling_ila():
    m = tiny("ila", prompt_len=4)  # prompts only with vpt methods; check deep+ILA via plan override
    assert m.tokens_per_block == [37, 17, 17, 5] + [5] * 8
    r = load_recipe("vpt_deep", {"model": {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 96,
                                           "prompt_len": 4}})
    from ufgir_cli.model.vit import UfgirViT, create_backbone

    vit = create_backbone(r.model, 5)
    model = UfgirViT(vit, r.model.model_copy(update={"method": "vpt_deep"}))
    model.plan = dataclasses.replace(model.plan, ila_ds_locs=(1, 3))
    from ufgir_cli.model.ila import ILA as _ILA

    model.ila = torch.nn.ModuleDict({str(i): _ILA(192, 8, downsample=True) for i in (1, 3)})
    model.eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(1, 3, 96, 96))
        y = model(torch.randn(1, 3, 96, 96))
    assert model.tokens_per_block == [37, 17, 17, 5] + [5] * 8
    assert [a.shape[-1] for a in maps] == [41, 41, 21, 21] + [9] * 8  # block input + 4 prompts
    assert y.shape == (1, 5)


def test_ds_ila_prefix_passes_unchanged_and_grid_shrinks():
    torch.manual_seed(0)
    ila = ILA(32, 8, downsample=True, drop=0.0).eval()
    torch.nn.init.zeros_(ila.up.weight)
    torch.nn.init.zeros_(ila.up.bias)  # spatial branch off: output = residual only
    x = torch.randn(2, 3 + 25, 32)  # 3 prefix tokens, 5x5 grid
    y = ila(x, (5, 5), num_prefix=3)
    assert y.shape == (2, 3 + 9, 32)
    assert torch.equal(y[:, :3], x[:, :3])
    patches = x[:, 3:].transpose(1, 2).reshape(2, 32, 5, 5)  # (B, D, H, W)
    ref = F.conv2d(patches, ila.ds_conv.weight, groups=32).flatten(2).transpose(1, 2)
    assert torch.allclose(y[:, 3:], ref, atol=1e-6)
    same = ILA(32, 8, downsample=False).eval()
    assert same(x, (5, 5), 3).shape == x.shape


def test_ds_conv_near_ones_init():
    w = ILA(768, 8, downsample=True).ds_conv.weight
    assert w.shape == (768, 1, 3, 3)
    assert abs(w.mean().item() - 1.0) < 1e-3 and w.std().item() < 2e-3


@pytest.mark.parametrize("method", ["ila_pp", "ila_plus", "convpass", "vpt_deep", "vpt_shallow", "linear"])
def test_gradients_reach_trainable_only(method):
    m = tiny(method).train()
    y = m(torch.randn(2, 3, 96, 96))
    y.logsumexp(1).sum().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable <= {"vit", "adapters", "ila", "prompts"}
    vit_trainable = {n for n, p in m.vit.named_parameters() if p.requires_grad}
    assert vit_trainable == {"cls_token", "head.weight", "head.bias"}


def test_pos_embed_corner_aligned_resize():
    r = load_recipe("linear", {"model": {"backbone": "vit_tiny_patch16_224", "weights": "none"}})
    torch.manual_seed(0)
    m = build_model(r.model, 5)
    old = m.vit.pos_embed.detach().clone()
    resize_input(m.vit, 448, "bilinear_corners")
    new = m.vit.pos_embed.detach()
    assert new.shape == (1, 1 + 28 * 28, 192)
    assert torch.equal(new[:, 0], old[:, 0])
    grid = old[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)  # (1, D, 14, 14)
    ref = F.interpolate(grid, size=(28, 28), mode="bilinear", align_corners=True)
    assert torch.allclose(new[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 192))
    # corners are kept exactly with corner alignment
    assert torch.allclose(new[0, 1], old[0, 1]) and torch.allclose(new[0, -1], old[0, -1])


def test_weights_from_local_files(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    sd = src.state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        r = load_recipe("ila_pp", {"model": {"backbone": "vit_tiny_patch16_224", "weights": str(tmp_path / f),
                                             "layer_norm_eps": None}})
        m = build_model(r.model, 7)
        assert torch.equal(m.vit.blocks[5].mlp.fc1.weight, sd["blocks.5.mlp.fc1.weight"])
        assert m.vit.head.weight.shape == (7, 192)
    r = load_recipe("ila_pp", {"model": {"backbone": "vit_tiny_patch16_224", "weights": str(tmp_path / "none.pth")}})
    from ufgir_cli.errors import ModelError

    with pytest.raises(ModelError, match="does not exist"):
        build_model(r.model, 7)


def test_unknown_backbone_names_the_key():
    from ufgir_cli.errors import RecipeError

    r = load_recipe("ila_pp", {"model": {"backbone": "vit_nonexistent_patch16_224", "weights": "none"}})
    with pytest.raises(RecipeError, match="model.backbone"):
        build_model(r.model, 5)


def _contract_model(method: str):
    extra = {"prompt_len": 4} if method in ("vpt_shallow", "vpt_deep", "vqt") else {}
    return tiny(method, **extra)


@pytest.mark.parametrize("method", METHODS)
def test_timm_contract(method):
    """timm's model contract, for every method of the table (as timm's tests run over list_models())."""
    m = _contract_model(method).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits = m(x)
        feats = m.forward_features(x)
        final, inter = m.forward_intermediates(x, return_prefix_tokens=True)
    assert logits.shape == (2, 5) and feats.shape == (2, m.tokens_per_block[-1], 192)
    assert torch.equal(final, feats) and len(inter) == len(m.vit.blocks)
    assert [p.shape[1] + c.shape[1] for p, c in inter] == m.tokens_per_block
    if m.method.single_pass:  # forward_head(forward_features(x)) is the logits; heads that read every block need them
        tokens = [torch.cat([c, p], dim=1) for p, c in inter]
        with torch.no_grad():
            again = m.forward_head(feats, intermediates=tokens)
            pre = m.forward_head(feats, pre_logits=True, intermediates=tokens)
        assert torch.allclose(again, logits, atol=1e-5) and pre.dim() == 2 and pre.shape[0] == 2
    else:  # the head reads more than this one pass: refused, or (CAL) one pass's logits
        try:
            with torch.no_grad():
                assert m.forward_head(feats).shape == (2, 5)
        except ValueError as e:
            assert "model(x)" in str(e)
    info = m.feature_info
    assert [(b["num_chs"], b["reduction"], b["module"]) for b in info] == \
        [(192, 16, f"vit.blocks.{i}") for i in range(len(info))]
    cfg = m.data_config()
    assert cfg["input_size"] == (3, 96, 96) and len(cfg["mean"]) == len(cfg["std"]) == 3
    m.train()
    step = m(x, torch.tensor([0, 1]), torch.nn.CrossEntropyLoss())
    assert step.loss.dim() == 0 and torch.isfinite(step.loss) and step.logits.shape == (2, 5)
    m.eval()
    m.reset_classifier(11)
    with torch.no_grad():
        assert m(x).shape == (2, 11)
    assert all(p.requires_grad for p in m.get_classifier().parameters())
    assert "vit.pos_embed" in m.no_weight_decay()
    m.set_input_size(img_size=112)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 112, 112)).shape == (1, 11)
    assert m.data_config()["input_size"] == (3, 112, 112)


def test_cpu_dropout_rate_and_scale():
    from ufgir_cli.model.ila import Dropout

    torch.manual_seed(0)
    d = Dropout(0.1).train()
    x = torch.ones(400_000)
    y = d(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert torch.equal(d.eval()(x), x)


def test_cpu_bf16_training_attention_equals_fused():
    """The explicit path taken for CPU bf16 backward computes the same attention as SDPA."""
    from ufgir_cli.model.vit import explicit_attention

    m = tiny("linear").eval()
    attn = m.vit.blocks[0].attn
    x = torch.randn(2, 37, 192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = explicit_attention(attn, x)  # no grad needed: SDPA
        xr = x.clone().requires_grad_(True)
        explicit = explicit_attention(attn, xr)  # grad needed in bf16 on CPU: explicit path
    assert torch.allclose(fused.float(), explicit.float(), atol=3e-2)
    explicit.float().sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("method,cls_only", [("linear", True), ("full", True), ("adapter", True), ("ila", True),
                                             ("ila_pp", True), ("vpt_shallow", True), ("ila_plus", False),
                                             ("convpass", False), ("vpt_deep", False)])
def test_forward_computes_last_block_for_cls_only_where_exact(method, cls_only):
    extra = {"prompt_len": 4} if method.startswith("vpt") else {}
    model = tiny(method, drop=0.0, **extra).train()
    assert model.cls_only_last_block is cls_only
    x = torch.randn(2, 3, 96, 96)
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    fast = model(x)
    g_fast = torch.autograd.grad(fast.square().sum(), trainable)
    torch.manual_seed(1)
    full = model.forward_head(model.forward_features(x))
    g_full = torch.autograd.grad(full.square().sum(), trainable)
    assert fast.shape == (2, 5)
    assert (fast - full).abs().max().item() < 1e-5
    for a, b in zip(g_fast, g_full, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


# ---- geometry, forward_intermediates, set_input_size, timm seam -----------------------------


def test_feature_info_paper_geometry():
    info = meta_model("ila_pp").feature_info
    assert [b.tokens_attended for b in info] == [197] * 4 + [145] * 4 + [101] * 4
    assert [b.grid for b in info] == [(14, 14)] * 4 + [(12, 12)] * 4 + [(10, 10)] * 4
    assert [(b.index, b.ila, b.ila_kernel) for b in info if b.ila] == [(3, "down", 3), (7, "down", 3)]
    assert info[3].out_grid == (12, 12) and info[11].out_grid == (10, 10)
    assert {(b.num_prefix_tokens, b.num_prompts, b.num_chs, b.reduction) for b in info} == {(1, 0, 768, 16)}
    assert [b.module for b in info[:2]] == ["vit.blocks.0", "vit.blocks.1"]
    big = meta_model("ila_pp", 448).feature_info
    assert [b.tokens_out for b in big] == [785] * 3 + [677] * 4 + [577] * 5
    plus = meta_model("ila_plus").feature_info
    assert [b.ila for b in plus] == ["same"] * 3 + ["down"] + ["same"] * 3 + ["down"] + ["same"] * 4
    deep = meta_model("vpt_deep").feature_info
    assert {(b.num_prompts, b.tokens_attended, b.tokens_out) for b in deep} == {(100, 297, 197)}
    shallow = meta_model("vpt_shallow").feature_info
    assert {(b.num_prefix_tokens, b.tokens_attended) for b in shallow} == {(101, 297)}


def test_forward_intermediates_timm_convention():
    m = tiny("ila_pp").eval()  # 96 px, DS-ILA after blocks 1 and 3: grids 6x6 -> 4x4 -> 2x2
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.equal(final, m.forward_features(x))
        assert [t.shape[1] for t in inter] == [t - 1 for t in m.tokens_per_block]  # patch tokens only
        pairs = m.forward_intermediates(x, indices=[0, -1], return_prefix_tokens=True, intermediates_only=True)
        assert [(p.shape, c.shape) for p, c in pairs] == [((2, 36, 192), (2, 1, 192)), ((2, 4, 192), (2, 1, 192))]
        assert torch.equal(pairs[1][0], inter[-1]) and torch.equal(pairs[0][0], inter[0])
        nchw = m.forward_intermediates(x, indices=3, output_fmt="NCHW", intermediates_only=True)
        assert [t.shape for t in nchw] == [(2, 192, 2, 2)] * 3
        assert torch.equal(nchw[0], inter[-3].transpose(1, 2).reshape(2, 192, 2, 2))
        normed = m.forward_intermediates(x, indices=[1], norm=True, stop_early=True, intermediates_only=True)
        assert torch.equal(normed[0], m.vit.norm(inter[1]))  # LayerNorm is token-wise
    with pytest.raises(ValueError, match="outside"):
        m.forward_intermediates(x, indices=[12])


def test_attention_tap_is_an_explicit_argument():
    """Attention maps come through the ``tap`` argument of one pass, never through hidden state."""
    m = tiny("ila").eval()
    x = torch.randn(1, 3, 96, 96)
    before = set(vars(m))
    with torch.no_grad():
        probs: list[torch.Tensor] = []
        final, _ = m.forward_intermediates(x, tap=lambda a, _: probs.append(a))
        assert len(probs) == 12 and probs[-1].shape == (1, 3, 5, 5)
        assert torch.allclose(m.forward_head(final), m(x), atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(probs, m.attention_maps(x), strict=True))
    assert set(vars(m)) == before


def test_set_input_size_in_place():
    m = tiny("ila_pp").eval()
    m.set_input_size(128)  # timm's positional img_size
    assert m.cfg.image_size == 128 and m.data_config()["input_size"] == (3, 128, 128)
    assert m.tokens_per_block == [65, 37, 37, 17] + [17] * 8
    with torch.no_grad():
        assert m(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    from ufgir_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="too small"):
        m.set_input_size(48)
    assert m.cfg.image_size == 128 and m.vit.patch_embed.img_size == (128, 128)  # nothing changed


def test_timm_private_api():
    """The one private timm API ufgir calls (model/backbone.py's embed_tokens). If this fails, timm
    changed VisionTransformer._pos_embed: fix embed_tokens before raising the bound in pyproject.toml."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from ufgir_cli.model.backbone import embed_tokens

    assert callable(getattr(VisionTransformer, "_pos_embed", None)), (
        f"timm {timm.__version__} has no VisionTransformer._pos_embed; update ufgir_cli.model.backbone.embed_tokens")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = embed_tokens(vit, x)
        for blk in vit.blocks:
            ours = blk(ours)
        assert torch.equal(vit.norm(ours), vit.forward_features(x)), (
            f"timm {timm.__version__} embeds tokens differently; update ufgir_cli.model.backbone.embed_tokens")
    from timm.models.eva import Eva

    from ufgir_cli.model.eva import EvaRunner, rope_table

    assert callable(getattr(Eva, "_pos_embed", None)), (
        f"timm {timm.__version__} has no Eva._pos_embed; update ufgir_cli.model.eva.EvaRunner.embed")
    for name in ("eva02_tiny_patch14_224", "vit_small_patch16_dinov3"):
        eva = timm.create_model(name, img_size=64, num_classes=0, depth=2).eval()
        with torch.no_grad():
            ours = EvaRunner(eva).embed(eva, x)
            theirs, table = eva._pos_embed(eva.patch_embed(x))
            assert torch.equal(rope_table(eva, eva.patch_embed.grid_size), table), name
            for blk in eva.blocks:
                ours = blk(ours, rope=table)
            assert torch.equal(eva.norm(ours), eva.forward_features(x)), (
                f"timm {timm.__version__} embeds {name}'s tokens differently; update ufgir_cli.model.eva")
