"""Today's backbones under every method, verified against timm (issue 29): the paper's ViT, DeiT 3, CLIP,
DINOv2 (with registers) and SigLIP 2.

Numerics come from the backbone unless a recipe asks for the reference's (the paper's recipes do, and
keep their run keys); a method a family cannot run is refused when the recipe loads; registers are
prefix tokens like the CLS token; a model whose added modules start as the identity gives timm's own
pre-logits; MACs are timm's; weights load from local files for every family.

Values are checked on narrow variants of each family (width 64, 2 heads, 2 or 3 blocks: timm's own
block, norm, LayerScale, pooling and position code at a fraction of the cost); shapes, refusals and
MACs on the meta device at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import ufgir_cli.model.backbone as backbone_module
from ufgir_cli import geometry
from ufgir_cli.analysis.cost import count_flops
from ufgir_cli.cli import app
from ufgir_cli.engine.optim import build_optimizer, set_lr
from ufgir_cli.errors import ModelError, RecipeError
from ufgir_cli.methods import TABLE, support_matrix
from ufgir_cli.model import build_model, meta_model
from ufgir_cli.model.backbone import numerics_of
from ufgir_cli.model.ila import ILA
from ufgir_cli.model.methods.aggregator import maws_scores, psm_scores
from ufgir_cli.model.methods.two_pass import glsim_scores, rollout_scores
from ufgir_cli.recipe import dump_resolved, load_recipe, packaged_recipe_names
from ufgir_cli.recipe_docs import recipe_sources
from ufgir_cli.sweep.runkey import canonical_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parent.parent / "README.md"
#: One pretrained tag per family (the families of `geometry.FAMILIES`).
FAMILY_OF = {f.key: f.example for f in geometry.FAMILIES}
NARROW = {"embed_dim": 64, "num_heads": 2}
CLS_FAMILIES = [f.key for f in geometry.FAMILIES if f.cls_token]


@pytest.fixture
def narrow(monkeypatch):
    """Every backbone built from here on is its family's narrow variant (width 64, 2 heads, depth 2
    unless the recipe says)."""
    real = backbone_module._timm_kwargs

    def kwargs(cfg, num_classes):
        return {**real(cfg, num_classes), **NARROW, "depth": cfg.depth or 2}

    monkeypatch.setattr(backbone_module, "_timm_kwargs", kwargs)


def timm_twin(name: str, size: int, depth: int = 2, **kw) -> nn.Module:
    """timm's own model of the narrow variant, eval mode."""
    return timm.create_model(name, pretrained=False, img_size=size, depth=depth, **NARROW, **kw).eval()


def build(method: str, name: str, size: int = 224, classes: int = 7, **model) -> nn.Module:
    r = load_recipe(method, {"model": {"backbone": name, "weights": "none", "image_size": size, **model}}, env=False)
    torch.manual_seed(0)
    return build_model(r.model, classes).eval()


# ---- 1. the torch-free tables are timm's ---------------------------------------------------------

def test_every_family_is_as_timm_builds_it():
    """Prefix tokens, positions, pooling, LayerNorm eps and depth of each family, from the name alone,
    equal what timm builds (every arch of the depth table that belongs to a family, on the meta device)."""
    import ufgir_cli.model  # noqa: F401 - registers the micro ViT

    seen = set()
    for name, depth in geometry.BACKBONE_DEPTHS.items():
        family = geometry.backbone_family(name)
        if family is None:
            continue
        seen.add(family.key)
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False)
        assert (vit.cls_token is not None, vit.num_prefix_tokens) == (family.cls_token, family.prefix_tokens(name)), name
        with_prefix = family.prefix_tokens(name) if family.pos_embed == "prefix+patches" else 0
        if family.pos_embed == "none":  # rotary positions alone
            assert vit.pos_embed is None and vit.rope is not None, name
        else:
            assert vit.pos_embed.shape[1] == vit.patch_embed.num_patches + with_prefix, name
        assert vit.global_pool == family.pool and len(vit.blocks) == depth == geometry.backbone_depth(name), name
        assert {m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)} == {family.layer_norm_eps}, name
        assert vit.patch_embed.patch_size[0] == geometry.backbone_patch(name), name
    assert seen >= {"vit", "deit3", "clip", "dinov2", "dinov2_reg", "siglip", "eva02", "dinov3"}
    assert geometry.backbone_family("vit_base_patch14_reg4_dinov2.lvd142m").prefix_tokens("vit_base_patch14_reg4_dinov2") == 5
    assert geometry.backbone_family("vit_small_patch16_36x1_224") is None  # no family: the build reads it


def test_pretrained_numerics_are_timms_and_the_build_reads_the_same():
    """Every entry of the pretrained table equals timm's pretrained config, and what the build reads
    from a backbone (`numerics_of`, for names the table lacks) equals what the table gives at load."""
    for name, (mean, std, crop_pct) in geometry.PRETRAINED.items():
        cfg = timm.get_pretrained_cfg(name)
        assert (tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct, cfg.interpolation) == (mean, std, crop_pct, "bicubic"), name
    for name in [*FAMILY_OF.values(), "ufgir_vit_micro_patch8_64", "vit_large_patch14_clip_224.laion2b"]:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False)
        assert numerics_of(vit) == geometry.backbone_numerics(name)[0], name


# ---- 2. numerics: the backbone's, or the reference's by name ----------------------------------------

NUMERIC = {"model": geometry.NUMERIC_KEYS["model"], "data": geometry.NUMERIC_KEYS["data"]}


def numerics(r) -> dict:
    return {k: getattr(getattr(r, s), k) for s, keys in NUMERIC.items() for k in keys}


def test_the_paper_recipes_resolve_as_before_so_their_run_keys_stay():
    """Every packaged recipe of the paper asks for the reference's numerics: on the paper's backbone (and the micro
    ViT) they are the values the defaults were, so no numeric key enters a run key (`KEYS_V1`'s
    baselines) and no run is trained again."""
    for name in packaged_recipe_names():
        if name.startswith("clca"):  # new recipes on CLCA's own CLIP backbone and numerics: no earlier runs to keep
            continue
        r = load_recipe(name, env=False)
        assert r.model.numerics == "reference", name
        canon = canonical_recipe(r)
        assert not {*NUMERIC["model"]} & {*canon.get("model", {})} - {"mean", "std", "layer_norm_eps"}, name
        assert not {*NUMERIC["data"]} & {*canon.get("data", {})}, name
        # quickstart sets the micro ViT's own eps, mean and std, as it always did; simtrans the eps 1e-6
        # of the reference's own ViT copy
        own = {"quickstart": {"mean", "std", "layer_norm_eps"}, "simtrans": {"layer_norm_eps"}}.get(name, set())
        assert {k: v for k, v in numerics(r).items() if k not in own} == \
            {k: v for k, v in geometry.REFERENCE_NUMERICS.items() if k not in own}, name
        if name != "quickstart":
            # ILAs then a reduction at fixed blocks (ila_pp_evit): on 24 blocks the ILAs follow 7 and 15, so the
            # reductions must come after them (at the recipe's own blocks it is refused in one line)
            after = {"reduction_locs": [16, 18, 20]} if r.model.ila_ds_locs and r.model.reduction_locs else {}
            large = load_recipe(name, {"model": {"backbone": "vit_large_patch16_224.orig_in21k", "image_size": 448,
                                                 **after}}, env=False)
            assert {k: v for k, v in numerics(large).items() if k not in own} == \
                {k: v for k, v in geometry.REFERENCE_NUMERICS.items() if k not in own}, name


def test_another_backbone_on_a_paper_recipe_takes_its_own_numerics():
    """--set model.backbone=CLIP on a paper recipe: CLIP's mean, std, eps and resize, not the reference's."""
    r = load_recipe("ila_pp", {"model": {"backbone": "vit_base_patch16_clip_224.openai"}}, env=False)
    assert numerics(r) == {"mean": geometry.CLIP_MEAN, "std": geometry.CLIP_STD, "layer_norm_eps": 1e-5,
                           "pos_embed_resize": "bicubic", "resize_ratio": 1 / 0.9, "interpolation": "bicubic"}
    assert "mean" in canonical_recipe(r)["model"]  # another model: another key
    own = load_recipe(None, {"model": {"backbone": "vit_base_patch16_224.orig_in21k"}}, env=False)  # default: its own
    assert (own.model.numerics, own.model.mean, own.model.layer_norm_eps, own.data.resize_ratio) == \
        ("backbone", (0.5, 0.5, 0.5), 1e-6, 1 / 0.9)
    given = load_recipe("ila_pp", {"model": {"backbone": "vit_base_patch16_clip_224.openai", "layer_norm_eps": 1e-6},
                                   "data": {"resize_ratio": 1.0}}, env=False)
    assert (given.model.layer_norm_eps, given.data.resize_ratio) == (1e-6, 1.0)  # a value set is kept; 1.0 allowed


def test_recipes_show_says_where_each_value_comes_from_and_loads_back(tmp_path):
    res = CliRunner().invoke(app, ["recipes", "show", "ila_pp", "--set", "model.backbone=vit_base_patch16_clip_224.openai"])
    assert res.exit_code == 0, res.output
    own = "# the backbone's own (vit_base_patch16_clip_224.openai; the reference's numerics are for the reference's backbones)"
    assert f"mean = [0.48145466, 0.4578275, 0.40821073]  {own}" in res.output
    assert f"layer_norm_eps = 1e-05  {own}" in res.output and f"resize_ratio = 1.1111111111111112  {own}" in res.output
    assert 'method = "ila_pp"  # recipe file' in res.output and 'backbone = "vit_base_patch16_clip_224.openai"  # --set' in res.output
    assert "ila_ds_locs = [3, 7]  # method 'ila_pp' on a 12-block backbone" in res.output
    assert "epochs = 50  # default" in res.output
    shown = tmp_path / "shown.toml"
    shown.write_text(res.output)
    assert load_recipe(shown, env=False) == load_recipe("ila_pp", {"model": {"backbone": "vit_base_patch16_clip_224.openai"}},
                                                        env=False)
    paper = dump_resolved(*recipe_sources("ila_pp", env=False))
    assert "layer_norm_eps = 1e-12  # the reference's numerics (model.numerics)" in paper


def test_numerics_a_name_does_not_tell_are_read_at_build_and_saved_with_the_run(tmp_path, small_synthetic, monkeypatch):
    """A backbone the tables do not know: the build reads its numerics from timm, and the run's recipe.toml
    holds them as values (the micro ViT's, here, with the tables' entries hidden)."""
    import ufgir_cli.recipe_sections as recipe_sections
    from ufgir_cli.engine.train import fit
    from ufgir_cli.recipe import load_saved_recipe, parse_overrides

    monkeypatch.setattr(recipe_sections, "backbone_numerics", lambda name, numerics="backbone": ({}, "hidden"))
    deep = load_recipe("linear", {"model": {"backbone": "vit_medium_patch16_gap_256"}}, env=False)
    assert deep.model.mean is None and deep.data.resize_ratio is None
    built = meta_model(deep.model, 4)
    assert (built.cfg.mean, built.cfg.layer_norm_eps, built.cfg.pos_embed_resize) == ((0.5,) * 3, 1e-6, "bicubic")
    assert deep.with_model(built.cfg, built.data_config()).data.resize_ratio == 1 / 0.95
    recipe = load_recipe("linear", parse_overrides([
        f"data.root={small_synthetic}", "data.dataset=x", "data.num_workers=0", "model.backbone=ufgir_vit_micro_patch8_64",
        "model.weights=none", "model.image_size=64", "model.numerics=backbone", "train.epochs=1", "train.batch_size=8",
        "train.precision=fp32", "schedule.warmup_steps=2", "logging.tensorboard=false", "eval.every=0"]), env=False)
    assert numerics(recipe) == dict.fromkeys(geometry.REFERENCE_NUMERICS)
    fit(recipe, tmp_path / "run")
    text = (tmp_path / "run" / "recipe.toml").read_text()
    assert "resize_ratio = 1.0\n" in text and "mean = [0.5, 0.5, 0.5]\n" in text and 'pos_embed_resize = "bicubic"\n' in text
    saved = load_saved_recipe(tmp_path / "run" / "recipe.toml")
    assert numerics(saved) == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "layer_norm_eps": 1e-6,
                               "pos_embed_resize": "bicubic", "resize_ratio": 1.0, "interpolation": "bicubic"}


# ---- 3. every method on every family: works, or refused at load in one line ------------------------

def matrix_markdown() -> str:
    """The README's method x family table, from the methods' needs and the family table."""
    cells = {"yes": "✓", "cls_token": "no: reads the CLS token", "patch_grid": "no: needs a patch grid",
             "abs_pos_embed": "no: needs absolute positions", "token_reduction": "no: needs plain ViT blocks"}
    fams = geometry.FAMILIES
    lines = ["| method | " + " | ".join(f.title for f in fams) + " |", "|---|" + "---|" * len(fams),
             "| *the linear probe reads* | " + " | ".join(f.pooled for f in fams) + " |"]
    for name, row in support_matrix().items():
        lines.append(f"| `{name}` | " + " | ".join(cells[row[f.key]] for f in fams) + " |")
    return "\n".join(lines)


def test_the_readme_has_the_method_family_matrix():
    assert matrix_markdown() in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("family", [f.key for f in geometry.FAMILIES])
def test_each_method_builds_on_each_family_or_is_refused_at_load(family):
    """On the meta device at full size: a method the matrix allows builds and answers model(x) with
    (B, C) logits; the others are refused when the recipe loads, in one line naming why."""
    name, allowed = FAMILY_OF[family], support_matrix()
    for spec in TABLE:
        overrides = {"model": {"backbone": name, "weights": "none"}}  # EVA-02 B: LoRA's default targets are its q, v
        if allowed[spec.name][family] != "yes":
            with pytest.raises(RecipeError) as e:
                load_recipe(spec.recipe_name, overrides, env=False)
            why = {"cls_token": "reads the CLS token", "abs_pos_embed": "resamples an absolute position embedding",
                   "token_reduction": "reduces tokens inside plain ViT blocks"}
            assert "\n" not in str(e.value) and f"method {spec.name!r} {why[allowed[spec.name][family]]}" in str(e.value)
            continue
        r = load_recipe(spec.recipe_name, overrides, env=False)
        model = meta_model(r.model, 10)
        with torch.no_grad():
            assert model.eval()(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 10), spec.name


def test_mpncov_and_cal_run_on_siglip(narrow):
    """The patch-token methods on a backbone without a CLS token (MPN-COV used to fail in _drop_class_token)."""
    x = torch.randn(2, 3, 64, 64)
    for method in ("mpncov", "cal"):
        model = build(method, FAMILY_OF["siglip"], size=64).train()
        step = model(x, torch.tensor([0, 1]), nn.CrossEntropyLoss())
        step.loss.backward()
        assert model.eval()(x).shape == (2, 7) and model.num_prefix_tokens == 0


# ---- 4. registers are treated as the CLS token is ---------------------------------------------------

REG = FAMILY_OF["dinov2_reg"]


def test_every_block_keeps_its_five_prefix_tokens(narrow):
    model = build("ila_pp", REG, size=112, depth=3, ila_ds_locs=[0, 1])
    assert model.num_prefix_tokens == 5
    assert model.tokens_per_block == [5 + 36, 5 + 16, 5 + 16]                  # 8x8 -> 6x6 -> 4x4
    with torch.no_grad():
        inter = model.forward_intermediates(torch.randn(2, 3, 112, 112), return_prefix_tokens=True,
                                            intermediates_only=True)
    assert [(tuple(p.shape), tuple(prefix.shape)) for p, prefix in inter] == \
        [((2, n, 64), (2, 5, 64)) for n in (36, 16, 16)]


def test_ila_updates_registers_like_the_cls_token_and_keeps_them_out_of_the_convolution():
    torch.manual_seed(0)
    ila = ILA(64, 8, downsample=True, norm="ln").eval()
    x = torch.randn(2, 5 + 36, 64)
    y = ila(x, (6, 6), 5)
    assert y.shape == (2, 5 + 16, 64)
    assert (y[:, :5] - x[:, :5]).abs().min() > 0  # every prefix token gets its own update
    z = ila(torch.cat([x[:, :5], torch.randn(2, 36, 64)], dim=1), (6, 6), 5)
    torch.testing.assert_close(z[:, :5], y[:, :5], rtol=0, atol=0)  # the patches never reach them


def registers_as_cls(model) -> None:
    """Make the registers what a selection would pick: copies of the CLS token, and attention that
    favours like tokens (query and key projections equal), so without the rule they win."""
    D = model.embed_dim
    with torch.no_grad():
        model.vit.cls_token.copy_(torch.randn_like(model.vit.cls_token) * 3)
        model.vit.reg_token.copy_(model.vit.cls_token.expand_as(model.vit.reg_token))
        for blk in model.vit.blocks:
            blk.attn.qkv.weight[: 2 * D] = torch.eye(D).repeat(2, 1) * 3


def tapped(model, x):
    """The final normed tokens, every block's attention maps and (CLS rows, key-0 logits)."""
    maps, rows = [], []

    def tap(a, key0):
        maps.append(a)
        rows.append((a[:, :, 0], key0))

    last, _ = model.encode(x, tap=tap, tap_key0=True)
    return model.vit.norm(last), maps, rows


def test_no_selection_picks_a_register(narrow):
    """TransFG, FFVT, GLSim and RAMS on DINOv2-reg: the registers would win every selection (checked
    with the prefix-blind scores), and none is ever picked."""
    x = torch.randn(2, 3, 112, 112)
    P, HW = 5, 64
    for method in ("transfg", "ffvt", "glsim", "rams"):
        model = build(method, REG, size=112, depth=3)
        registers_as_cls(model)
        with torch.no_grad():
            tokens, maps, rows = tapped(model, x)
            if method == "transfg":
                assert (psm_scores(maps).argmax(-1) + 1 < P).any()                    # prefix-blind: a register
                idx = model.method.select_tokens(model, x)[1]                        # (B, heads)
                assert (idx >= P).all() and (idx < P + HW).all()
            elif method == "ffvt":
                blind = torch.stack([maws_scores(r, k).topk(12, dim=-1).indices for r, k in rows])
                assert ((blind >= 1) & (blind < P)).any()
                idx = model.method.select_tokens(model, x)[1]                        # (blocks, B, 12)
                assert not ((idx >= 1) & (idx < P)).any()                            # the CLS may be, a register never
            else:
                blind = (glsim_scores(tokens)[0] if method == "glsim" else rollout_scores(maps)).topk(8, dim=-1).indices
                assert (blind < P - 1).any()                                          # columns 0-3: the registers
                patch_scores = glsim_scores(tokens, num_prefix=P)[0] if method == "glsim" else rollout_scores(maps)[:, P - 1:]
                crop = model.method.crop(model, x)
                torch.testing.assert_close(crop["indices"], patch_scores.topk(8, dim=-1).indices)
            assert model(x).shape == (2, 7)


# ---- 5. identity: added modules at their identity give timm's own pre-logits ---------------------------

def identity_models(family: str) -> list[tuple[str, dict]]:
    out = [("linear", {}), ("adapter", {"adapter_init": "zero"}), ("convpass", {"adapter_init": "zero"})]
    return out + ([("vqt", {})] if family in CLS_FAMILIES else [])


def lively(model: nn.Module) -> nn.Module:
    """LayerScale at O(1) and random attention biases (timm starts them at 1e-5 and 0, where a block
    barely changes its input and a wrong attention would still pass), so that every block counts."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.vit.named_parameters():
            if n.endswith(("gamma", "gamma_1", "gamma_2")):
                p.normal_(1.0, 0.2)
            elif n.endswith(("q_bias", "v_bias")):
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("family", [f.key for f in geometry.FAMILIES])
def test_identity_initialised_models_give_timms_pre_logits(family, size, narrow):
    """The same weights and image: ufgir's model with a linear probe, zero-initialised adapters or VQT's
    query-only prompts gives timm's ``forward_head(forward_features(x), pre_logits=True)`` within 1e-5
    (measured: 0 for the pre-logits, below 1e-6 for the logits, on every family at 224 and 448 px)."""
    name = FAMILY_OF[family]
    x = torch.randn(2, 3, size, size)
    for method, extra in identity_models(family):
        ours = lively(build(method, name, size, numerics="backbone", **extra))
        twin = timm_twin(name, size, num_classes=7)
        twin.load_state_dict({k[4:]: v for k, v in ours.state_dict().items() if k.startswith("vit.")}, strict=False)
        with torch.no_grad():
            want = twin.forward_head(twin.forward_features(x), pre_logits=True)
            if method == "vqt":  # its head reads its prompts; the image tokens are timm's
                L = ours.prompt_len
                got, want = ours.forward_features(x)[:, L:], twin.forward_features(x)
            else:
                got = ours.forward_head(ours.forward_features(x), pre_logits=True)
                if method == "linear":
                    torch.testing.assert_close(ours(x), twin(x), rtol=0, atol=1e-5)
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5, (method, family, size)


@pytest.mark.parametrize("family", [f.key for f in geometry.FAMILIES])
def test_down_sampling_methods_shrink_the_token_count_as_the_geometry_says(family):
    name, P = FAMILY_OF[family], geometry.backbone_family(FAMILY_OF[family]).prefix_tokens(FAMILY_OF[family])
    patch = geometry.backbone_patch(name)
    for size in (224, 448):
        model = meta_model(load_recipe("ila_pp", {"model": {"backbone": name, "image_size": size}}, env=False).model, 10)
        g = size // patch
        want = [P + (g - 2 * ((i >= 3) + (i >= 7))) ** 2 for i in range(12)]    # DS-ILA after blocks 3 and 7
        assert model.tokens_per_block == want, (family, size)
        with torch.no_grad():
            assert model.forward_features(torch.empty(1, 3, size, size, device="meta")).shape[1] == want[-1]


@pytest.mark.parametrize("family", [f.key for f in geometry.FAMILIES])
def test_macs_of_the_plain_backbone_are_timms(family):
    """`inspect`'s count for a linear probe equals torch.utils.flop_counter on timm's model with fused
    attention off, at 224 and 448 px (full-size models, on the meta device)."""
    name = FAMILY_OF[family]
    for size in (224, 448):
        ours = count_flops(meta_model(load_recipe("linear", {"model": {"backbone": name, "image_size": size}},
                                                  env=False).model, 200), size)
        with torch.device("meta"):
            twin = timm.create_model(name, pretrained=False, img_size=size, num_classes=200).eval().requires_grad_(False)
        for m in twin.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            twin(torch.empty(1, 3, size, size, device="meta"))
        assert ours == counter.get_total_flops(), (family, size)
        if family == "clip" and size == 448:
            res = CliRunner().invoke(app, ["inspect", "-r", "linear", "--image-size", "448", "--num-classes", "200",
                                           "--set", f"model.backbone={name}"])
            assert res.exit_code == 0 and f"{ours / 2e9:.2f} GMACs" in res.output, res.output


# ---- 6. weights: local files for every family; gated ones in one line --------------------------------

@pytest.mark.parametrize("family", [f.key for f in geometry.FAMILIES])
def test_a_local_weights_file_loads_for_every_family(family, narrow, tmp_path):
    """timm's model saved as safetensors, then built by ufgir at another size: the same tensors, the
    position grid resampled as timm's own ``set_input_size`` does, and timm's pre-logits."""
    from safetensors.torch import save_file

    name = FAMILY_OF[family]
    torch.manual_seed(3)
    source = timm.create_model(name, pretrained=False, depth=2, **NARROW).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    ours = build("linear", name, 112, numerics="backbone", weights=str(path))
    source.set_input_size(img_size=(112, 112))
    theirs = {k: v for k, v in source.state_dict().items() if not k.startswith("head")}
    assert ours.backbone_state_dict().keys() == theirs.keys()
    for k, v in theirs.items():
        torch.testing.assert_close(ours.backbone_state_dict()[k], v, rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got = ours.forward_head(ours.forward_features(x), pre_logits=True)
        want = source.forward_head(source.forward_features(x), pre_logits=True)
    assert (got - want).abs().max() <= 1e-5


def test_gated_weights_fail_in_one_line_naming_the_licence_and_hf_token(monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise GatedRepoError("403 Client Error: access to this model is restricted",
                             response=SimpleNamespace(headers={}, status_code=403, request=None))

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", gated)  # the Hub's answer for a gated repo
    r = load_recipe("linear", {"model": {"backbone": "vit_base_patch16_clip_224.metaclip_2pt5b"}}, env=False)
    with torch.device("meta"), pytest.raises(ModelError) as e:
        build_model(r.model, 10)
    msg = str(e.value)
    assert "\n" not in msg and "gated on the Hugging Face Hub (licence: cc-by-nc-4.0)" in msg and "HF_TOKEN" in msg
    assert "https://huggingface.co/timm/vit_base_patch16_clip_224.metaclip_2pt5b" in msg


def test_pretrained_tags_go_through_timm(monkeypatch):
    """``model.weights = "timm"`` asks timm for the tag, as before (offline here: one line, no traceback)."""
    asked = []
    real = timm.create_model

    def spy(name, pretrained=False, **kw):
        asked.append((name, pretrained))
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(backbone_module.timm, "create_model", spy)
    for tag in ("vit_base_patch16_clip_224.openai", "vit_base_patch14_reg4_dinov2.lvd142m",
                "vit_base_patch16_siglip_224.v2_webli"):
        r = load_recipe("linear", {"model": {"backbone": tag}}, env=False)
        with torch.device("meta"), pytest.raises(ModelError, match="not in timm's cache and cannot be fetched"):
            build_model(r.model, 10)
        assert asked[-1] == (tag, True)


# ---- 7. layer-wise learning-rate decay ----------------------------------------------------------------

def test_layer_decay_scales_each_layer(narrow):
    model = build("full", FAMILY_OF["dinov2_reg"], 56, depth=3)
    r = load_recipe("full", {"optim": {"name": "adamw", "lr": 1e-3, "layer_decay": 0.5, "weight_decay": 0.05}}, env=False)
    opt = build_optimizer(model, r.optim)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["vit.head.weight"])] == scale[id(named["vit.norm.weight"])] == 1.0
    assert [scale[id(named[f"vit.blocks.{i}.attn.qkv.weight"])] for i in range(3)] == [0.125, 0.25, 0.5]
    assert scale[id(named["vit.reg_token"])] == scale[id(named["vit.patch_embed.proj.weight"])] == 0.0625
    assert len(scale) == sum(p.requires_grad for p in model.parameters())
    set_lr(opt, 1e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3 * s for s in (0.0625, 0.125, 0.25, 0.5, 1.0)]
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, 0.05}
    plain = build_optimizer(model, load_recipe("full", env=False).optim)  # unset: two groups, as before
    assert len(plain.param_groups) == 2 and all("lr_scale" not in g for g in plain.param_groups)
    assert "layer_decay" not in canonical_recipe(load_recipe("full", env=False)).get("optim", {})  # no run key moves
