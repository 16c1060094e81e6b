"""CAL (FGIR.md §4): the reference checkpoint reproduces in both evaluation modes, the crafted box
cases give the reference's boxes, and the training loss and centre update are FGIR.md's formulas.
Training, resume and the other tools run in test_fgir.py with the other comparison methods."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ufgir_cli.methods import METHODS
from ufgir_cli.model import load_upstream_checkpoint
from ufgir_cli.model.methods.cal import (
    CAL,
    CALOutput,
    WSDANHead,
    attention_boxes,
    attention_drop,
    bilinear_pool,
    choose_maps,
)
from ufgir_cli.recipe import load_recipe


@pytest.fixture(scope="module")
def cal(fixture_dir):
    model, recipe = load_upstream_checkpoint(fixture_dir / "cal_t16_160.upstream.pth")
    expected = torch.load(fixture_dir / "cal_t16_160.expected.pt", weights_only=True)
    return model, recipe, expected


def test_cal_checkpoint_reproduces_in_both_modes(cal):
    model, recipe, ex = cal
    assert (recipe.model.method, recipe.model.cal_single_crop, recipe.model.drop) == ("cal", False, 0.1)
    x = ex["input"]
    B = x.shape[0]
    with torch.no_grad():
        logits = model(x)
        first = model.method.attention_crops(model, torch.cat([x, x.flip(3)]))  # the image, then its mirror
        tokens = model.vit.norm(model.encode(x)[0])                             # (B, N, D): no CLS token
        p, aux, bap, maps = model.head(tokens, model.feature_info[-1].out_grid, counterfactual=True)
    assert (logits - ex["logits"]).abs().max() <= 1e-4
    # (K crops, 2B views, 4) -> the fixture's order: the image's three crops, then the mirror's
    boxes = torch.cat([first["boxes"][:, :B], first["boxes"][:, B:]])
    assert torch.equal(boxes, ex["crop_boxes"])
    features = tokens.transpose(1, 2).reshape(ex["features"].shape)           # (B, D, h, w)
    assert (features - ex["features"]).abs().max() <= 1e-4
    assert (maps - ex["attention_maps"]).abs().max() <= 1e-4
    assert (first["maps"][B:] - ex["attention_maps_flip"]).abs().max() <= 1e-4
    assert (first["mean_map"][:B] - ex["mean_attention_map"]).abs().max() <= 1e-4
    assert (bap - ex["bap_features"]).abs().max() <= 1e-6
    assert (aux - ex["aux_logits"]).abs().max() <= 1e-4
    assert (first["logits"][:B] - ex["pass_logits"][0]).abs().max() <= 1e-4
    assert (first["logits"][B:] - ex["pass_logits"][1]).abs().max() <= 1e-4
    assert model.tokens_per_block == list(ex["tokens_per_block"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (trainable, sum(p.numel() for p in model.parameters())) == (ex["trainable_params"], ex["total_params"])

    single = "2 passes (single crop)"
    assert model.method.eval_mode == "8 passes" and model.method.passes(single) == 2
    with torch.no_grad():
        logits1 = model(x, eval_mode=single)
        first1 = model.method.attention_crops(model, x, single)
    assert (logits1 - ex["logits_single_crop"]).abs().max() <= 1e-4
    assert torch.equal(first1["boxes"], ex["crop_boxes_single_crop"])


def test_cal_crafted_boxes(cal):
    """The reference's boxes for crafted maps: one peak, a peak in the corner, two peaks, all zero."""
    _, _, ex = cal
    cases = ex["box_cases"]
    for (theta, pad), expected in zip(cases["settings"], cases["boxes"], strict=True):
        assert torch.equal(attention_boxes(cases["maps"], theta, pad, 160), expected)


def test_cal_drop_zeroes_where_the_map_fires():
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 1, 2] = 1.0                                                       # one peak; the second map is dead
    images = torch.ones(2, 3, 32, 32)
    dropped = attention_drop(images, maps, torch.tensor([0.5, 0.5]))
    up = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=True)
    assert torch.equal(dropped[0, 0] == 0, up[0, 0] >= 0.5)
    assert dropped[1].abs().sum() == 0                                           # an all-zero map drops everything


def test_choose_maps_never_picks_a_dead_map_when_others_fire():
    maps = torch.zeros(3, 4, 2, 2)
    maps[:, 2] = 5.0
    torch.manual_seed(0)
    chosen = choose_maps(maps, 2)
    assert chosen.shape == (3, 2, 2, 2)
    # a dead map weighs sqrt(1e-6) against sqrt(20): picked about once in 4,500 draws
    assert (chosen == 5.0).float().mean() > 0.9


def test_cal_loss_is_the_formula():
    """FGIR.md §4: CE(raw)/3 + CE(crops, drops)*2/3 + CE(counterfactual effects) + sum((F - c_y)^2)/B,
    c_y the class centre normalised before this step's update centre[y] += 0.05 (F - c_y); with a class
    twice in the batch the last sample writes. Label smoothing plays no part."""
    torch.manual_seed(3)
    C, M, D, B = 5, 2, 3, 4
    head = WSDANHead(D, C, maps=M)
    start = torch.randn(C, M * D)
    head.feature_center.copy_(start)
    y = torch.tensor([1, 3, 1, 0])
    out = CALOutput(logits=torch.randn(B, C), raw=torch.randn(B, C), aug=torch.randn(2 * B, C),
                    aux=torch.randn(3 * B, C), features=F.normalize(torch.randn(B, M * D), dim=-1))

    def ce(logits, labels):  # -log softmax of the true class, averaged
        return sum(-(lg[t] - lg.exp().sum().log()) for lg, t in zip(logits, labels, strict=True)) / len(labels)

    centres = [start[t] / start[t].norm() for t in y]
    expected = (ce(out.raw, y) / 3 + ce(out.aug, y.repeat(2)) * 2 / 3 + ce(out.aux, y.repeat(3))
                + sum(((f - c) ** 2).sum() for f, c in zip(out.features, centres, strict=True)) / B)
    loss = head.loss(out, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    head.feature_center.copy_(start)                                             # CAL ignores label smoothing
    method = CAL(METHODS["cal"], load_recipe("cal").model)
    method.train_outputs = lambda model, x: out                                  # the passes are tested below
    step = method.forward_train(SimpleNamespace(head=head), None, y, torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-6) and step.logits is out.logits

    after = start.clone()
    for i in (1, 2, 3):  # class 1 appears at 0 and 2: sample 2 writes
        t = int(y[i])
        after[t] = start[t] + 0.05 * (out.features[i] - start[t] / start[t].norm())
    assert torch.allclose(head.feature_center, after, atol=1e-7)
    assert torch.equal(head.feature_center[[2, 4]], start[[2, 4]])              # classes not in the batch stay


def test_bap_signed_sqrt_keeps_dead_maps_at_zero():
    features = torch.randn(2, 4, 3, 3)
    maps = torch.zeros(2, 2, 3, 3)
    maps[:, 0] = torch.rand(2, 3, 3)
    pooled = bilinear_pool(maps, features)                                       # (B, M*D), map-major
    raw = (maps[:, :1] * features).mean(dim=(2, 3))                              # (B, D): map 0
    signed = raw.sign() * (raw.abs() + 1e-6).sqrt()
    norm = signed.norm(dim=1, keepdim=True)
    assert torch.allclose(pooled[:, :4], signed / norm, atol=1e-6)
    assert torch.equal(pooled[:, 4:], torch.zeros(2, 4))


def test_cal_training_forward_shapes_and_grad_reaches_the_head_only(cal):
    model, _, ex = cal
    model = copy.deepcopy(model).train()                                         # train mode moves BN statistics
    torch.manual_seed(0)
    out = model.method.train_outputs(model, ex["input"])
    loss = model.head.loss(out, torch.tensor([1, 7]))
    loss.backward()
    B, C = 2, 10
    assert [t.shape for t in out] == [(B, C), (B, C), (2 * B, C), (3 * B, C), (B, 32 * 192)]
    assert torch.isfinite(loss)
    assert model.head.feature_center[[1, 7]].abs().sum() > 0 and model.head.feature_center[0].abs().sum() == 0
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in model.vit.parameters())
