"""timm's Eva class (EVA-02, DINOv3) under ufgir's block loop (issue 32): rotary tables after
down-sampling ILAs, the CLS-only last block for each projection layout, the real architectures on the
meta device, and the Eva variants that are refused. The identity check against timm for both families
at 224 and 448 px is `tests/test_backbones.py`'s, which covers every family of `geometry.FAMILIES`.

Values on narrow variants (width 64, 2 heads): timm's own blocks, rotary modules and pooling.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

import ufgir_cli.model.backbone as backbone_module
import ufgir_cli.model.eva as eva_module
from ufgir_cli.errors import RecipeError
from ufgir_cli.model import build_model, meta_model
from ufgir_cli.model.eva import EvaRunner, crop_table, rope_table
from ufgir_cli.model.ila import ILA
from ufgir_cli.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
EVA02, DINOV3 = "eva02_base_patch14_224.mim_in22k", "vit_base_patch16_dinov3.lvd1689m"
NARROW = {"embed_dim": 64, "num_heads": 2}


@pytest.fixture
def narrow(monkeypatch):
    real = backbone_module._timm_kwargs
    monkeypatch.setattr(backbone_module, "_timm_kwargs",
                        lambda cfg, n: {**real(cfg, n), **NARROW, "depth": cfg.depth or 2})


def build(method: str, name: str, size: int, **model) -> nn.Module:
    r = load_recipe(method, {"model": {"backbone": name, "weights": "none", "image_size": size, **model}}, env=False)
    torch.manual_seed(0)
    return build_model(r.model, 7).eval()


def centres_after_valid_convs(grid: tuple[int, int], downsamplings: int) -> torch.Tensor:
    """Which input position each output token of ``downsamplings`` valid 3x3 down-sampling ILAs sits on:
    a grid whose two channels hold the row and column goes through DS-ILAs whose residual is a centre
    tap (and whose spatial branch is off); (h*w, 2) positions come out."""
    H, W = grid
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    x = torch.stack([rows, cols], dim=-1).reshape(1, H * W, 2)                             # (1, HW, 2)
    g = grid
    for _ in range(downsamplings):
        ila = ILA(2, 2, downsample=True, norm="none", drop=0.0).eval()
        with torch.no_grad():
            ila.ds_conv.weight.zero_()[:, :, 1, 1] = 1.0                                     # the centre tap
            ila.up.weight.zero_(), ila.up.bias.zero_()                                       # no spatial branch
        x, g = ila(x, g, 0), ila.out_grid(g)
    return x[0].round().long()                                                               # (h*w, 2)


@pytest.mark.parametrize("name", [EVA02, DINOV3])
def test_rotary_positions_after_down_sampling_ilas_are_the_crop_of_the_original_grid(name, narrow, monkeypatch):
    """Four blocks, DS-ILAs after blocks 0 and 1: blocks 1, 2, 3 use the original table cropped by 1, 2
    and 2 on each side; its rows are those of the positions the valid convolutions centre each token on
    (in the original coordinates: EVA-02's absolute, DINOv3's normalised ones)."""
    size = 8 * int(name.split("patch")[1][:2])
    model = build("ila", name, size, depth=4, ila_ds_locs=[0, 1])
    used: list[tuple[tuple[int, int], torch.Tensor]] = []
    real = eva_module.rope_table

    def spy(vit, grid):
        table = real(vit, grid)
        used.append((tuple(grid), table))
        return table

    monkeypatch.setattr(eva_module, "rope_table", spy)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    full = real(model.vit, (8, 8))                                                           # (64, 2 hd)
    assert [g for g, _ in used] == [(8, 8), (6, 6), (4, 4), (4, 4)]
    for (g, table), k in zip(used, (0, 1, 2, 2), strict=True):
        crop = full.reshape(8, 8, -1)[k:8 - k, k:8 - k].reshape(g[0] * g[1], -1)
        torch.testing.assert_close(table, crop, rtol=0, atol=0)
        at = centres_after_valid_convs((8, 8), k)                                            # (h*w, 2) positions
        torch.testing.assert_close(table, full[at[:, 0] * 8 + at[:, 1]], rtol=0, atol=0)
        assert (at.reshape(*g, 2)[0, 0] == torch.tensor([k, k])).all()
    if name == DINOV3:  # the normalised coordinates themselves: cropped, not renormalised to the smaller grid
        from timm.layers.pos_embed_sincos import make_coords_dinov3

        coords = make_coords_dinov3(8, 8).reshape(8, 8, 2)[2:6, 2:6].reshape(16, 2)
        sin, cos = model.vit.rope._get_pos_embed_from_coords(coords)
        torch.testing.assert_close(used[-1][1], torch.cat([sin, cos], dim=-1), rtol=0, atol=0)
        assert not torch.equal(used[-1][1], model.vit.rope.get_embed(shape=[4, 4]))


def test_crop_table_refuses_a_grid_that_is_no_centred_crop():
    table = torch.randn(36, 8)
    assert torch.equal(crop_table(table, (6, 6), (6, 6)), table)
    with pytest.raises(ValueError, match="not a centred crop"):
        crop_table(table, (6, 6), (3, 3))


@pytest.mark.parametrize("name", [EVA02, DINOV3, "eva02_tiny_patch14_224"])
def test_the_cls_only_last_block_equals_the_full_block_for_every_projection_layout(name, narrow):
    """IFA runs the last block for the CLS row alone: the same row as the full block, for separate q/k/v
    (EVA-02 B), a fused qkv with q/v biases (EVA-02 Ti) and without (DINOv3), and wrapped by peft's LoRA."""
    x = torch.randn(2, 3, 112, 112)
    for method in ("ifa", "ila_lora"):
        extra = {"lora_init_weights": "random"} if method == "ila_lora" else {}  # LoRA's default targets, each layout
        model = build(method, name, 112, depth=3, **({"ila_ds_locs": [0]} if method == "ila_lora" else {}), **extra)
        with torch.no_grad():
            for blk in model.vit.blocks:
                if getattr(blk.attn, "q_bias", None) is not None:
                    blk.attn.q_bias.normal_(), blk.attn.v_bias.normal_()
            full = model.encode(x)[0][:, :1]
            alone = model.encode(x, last_cls_only=True)[0]
        assert isinstance(model.runner, EvaRunner) and alone.shape == (2, 1, 64)
        torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)


def test_a_training_step_with_down_sampling_on_dinov3(narrow):
    model = build("ila_pp", DINOV3, 96, depth=3, ila_ds_locs=[0]).train()
    step = model(torch.randn(2, 3, 96, 96), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    step.loss.backward()
    assert model.tokens_per_block == [5 + 16, 5 + 16, 5 + 16] and model.ila["0"].ds_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.vit.named_parameters() if n.startswith("blocks."))


@pytest.mark.parametrize("name", ["eva02_large_patch14_448", "eva02_base_patch14_448", "vit_large_patch16_dinov3",
                                  "vit_small_plus_patch16_dinov3", "vit_base_patch16_dinov3_qkvb"])
def test_the_real_architectures_at_448_on_the_meta_device(name):
    """Full-size models from their timm names: the linear probe and ILA++ (DS-ILA after the paper's
    positions, scaled to the depth) answer (B, C) logits with the token counts the geometry says."""
    for method in ("linear", "ila_pp"):
        model = meta_model(load_recipe(method, {"model": {"backbone": name, "image_size": 448}}, env=False).model, 200)
        g = 448 // model.vit.patch_embed.patch_size[0]
        P = model.vit.num_prefix_tokens
        ds = model.cfg.ila_ds_locs
        assert model.tokens_per_block == [P + (g - 2 * sum(i >= d for d in ds)) ** 2 for i in range(len(model.vit.blocks))]
        with torch.no_grad():
            assert model(torch.empty(2, 3, 448, 448, device="meta")).shape == (2, 200)


@pytest.mark.parametrize("name,why", [("vit_small_patch16_rope_mixed_224", "differs per block"),
                                      ("vit_pe_core_tiny_patch16_384", "not pre-norm EvaBlock|gated")])
def test_eva_variants_ufgir_does_not_run_are_refused_in_one_line(name, why):
    r = load_recipe("linear", {"model": {"backbone": name, "weights": "none"}}, env=False)
    try:
        meta_model(r.model, 10)
    except RecipeError as e:
        assert "\n" not in str(e) and name in str(e)
        assert re.search(why, str(e)), str(e)
    else:
        pytest.fail(f"{name} was built")


def test_rope_table_is_none_without_rope():
    with torch.device("meta"):
        vit = timm.create_model("eva02_tiny_patch14_224", pretrained=False, use_rot_pos_emb=False)
    assert rope_table(vit, (16, 16)) is None


@pytest.mark.parametrize("name", [EVA02, DINOV3])
def test_a_traced_export_holds_the_rotary_tables(name, narrow, tmp_path):
    """torch.export of ILA++ with a down-sampling ILA: the cropped rotary tables are traced in, and the
    reloaded program gives the eager logits (the export's own parity check, at its tolerance)."""
    from ufgir_cli.ship.graph import export_pt2

    size = 8 * int(name.split("patch")[1][:2])
    r = load_recipe("ila_pp", {"model": {"backbone": name, "weights": "none", "image_size": size, "depth": 2,
                                         "ila_ds_locs": [0]}}, env=False)
    torch.manual_seed(0)
    result = export_pt2(build_model(r.model, 7).eval(), r, tmp_path / "m.pt2")
    assert result.max_abs_diff <= result.tolerance and (tmp_path / "m.pt2").is_file()
