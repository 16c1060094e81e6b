"""Analysis library: attention CKA, rollout, feature statistics, cost and figures (no CLI, no training)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ufgir_cli.analysis import rollout as ro
from ufgir_cli.analysis.cka import MinibatchCKA, cka_summary
from ufgir_cli.analysis.features import (
    analyse_batches,
    attention_distance,
    attention_entropy,
    forward_collect,
    output_grids,
    pooled_tokens,
)
from ufgir_cli.analysis.paper import PAPER_TOP1, paper_top1
from ufgir_cli.errors import DatasetError
from ufgir_cli.viz import figures

FIXTURE_GRIDS = [(14, 14)] * 4 + [(12, 12)] * 4 + [(10, 10)] * 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture_attention(fixture_dir) -> list[torch.Tensor]:
    return torch.load(fixture_dir / "ila_pp_t16_224.expected.pt", weights_only=True)["attention"]


@pytest.fixture(scope="module")
def micro_model():
    from ufgir_cli.model import build_model
    from ufgir_cli.recipe import load_recipe

    torch.manual_seed(0)
    r = load_recipe("ila_pp", {"model": {"backbone": "ufgir_vit_micro_patch8_64", "weights": "none",
                                         "image_size": 64, "ila_ds_locs": [1, 3]}})
    return build_model(r.model, 4).eval()


# ---- CKA -------------------------------------------------------------------------------------


def dense_cka(batches: list[list[np.ndarray]]) -> np.ndarray:
    """The formula of reference/ILA.md section 6 written out with explicit matrices and loops."""
    L = len(batches[0])
    hsic = np.zeros((L, L))
    used = 0
    for feats in batches:
        n = feats[0].shape[0]
        if n < 4:
            continue
        used += 1
        grams = []
        for x in feats:
            x = x.reshape(n, -1).astype(np.float64)
            k = x @ x.T
            np.fill_diagonal(k, 0.0)
            grams.append(k)
        one = np.ones(n)
        for i in range(L):
            for j in range(L):
                K, M = grams[i], grams[j]
                h = np.trace(K @ M) + (one @ K @ one) * (one @ M @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ K @ M @ one)
                hsic[i, j] += h / (n * (n - 3))
    hsic /= used
    return hsic / np.sqrt(np.outer(np.diag(hsic), np.diag(hsic)))


def cka_of(batches: list[list[torch.Tensor]]) -> tuple[torch.Tensor, MinibatchCKA]:
    acc = MinibatchCKA()
    for feats in batches:
        acc.update(feats)
    return acc.compute(), acc


def test_cka_hand_computed():
    # n = 4: K pairs images {0,1} and {2,3}, L pairs {0,2} and {1,3}. With 1^T K 1 = 4, K 1 = 1:
    # HSIC(K,K) = (4 + 16/6 - 4) / 4 = 2/3, HSIC(K,L) = (0 + 16/6 - 4) / 4 = -1/3 -> CKA = -1/2.
    x = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    y = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])
    cka, _ = cka_of([[x, y]])
    assert cka[0, 1].item() == pytest.approx(-0.5, abs=1e-12)
    # A second batch (2x, x): HSIC(4K,4K) = 32/3, HSIC(4K,K) = 8/3, HSIC(K,K) = 2/3. Terms averaged first:
    # (7/6) / sqrt(17/3 * 2/3) = 7 / (2 sqrt 34) -- not the mean of the per-batch CKAs, (-1/2 + 1)/2.
    cka, acc = cka_of([[x, y], [2 * x, x]])
    assert cka[0, 1].item() == pytest.approx(7 / (2 * math.sqrt(34)), abs=1e-12)
    assert acc.minibatches == 2 and acc.images == 8


def test_cka_equals_dense_computation_across_block_sizes():
    g = torch.Generator().manual_seed(0)
    # three "blocks" attending over different lengths, minibatches of 6, 5 and 3 (left out)
    shapes = [(2, 5, 5), (2, 5, 5), (2, 3, 3)]
    batches = [[torch.rand(n, *s, generator=g).softmax(-1) for s in shapes] for n in (6, 5, 3)]
    cka, acc = cka_of(batches)
    want = dense_cka([[f.numpy() for f in feats] for feats in batches])
    np.testing.assert_allclose(cka.numpy(), want, atol=1e-10)
    assert acc.skipped == [3] and acc.minibatches == 2


def test_cka_symmetric_unit_diagonal_and_invariant():
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(n, d, generator=g) for d in (6, 10, 4)] for n in (8, 7)]
    cka, _ = cka_of(batches)
    assert cka.dtype == torch.float64
    assert torch.equal(cka, cka.T)
    torch.testing.assert_close(torch.diagonal(cka), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (cka.abs() <= 1 + 1e-12).all()
    # isotropic scaling of one block and an orthogonal transform of another change nothing
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    transformed = [[feats[0].double() * 3.7, feats[1].double() @ q, feats[2]] for feats in batches]
    cka2, _ = cka_of(transformed)
    torch.testing.assert_close(cka2, cka, atol=1e-10, rtol=0)


def test_cka_minibatch_below_four_is_left_out():
    acc = MinibatchCKA()
    assert acc.update([torch.randn(3, 5), torch.randn(3, 5)]) is False
    assert acc.skipped == [3]
    with pytest.raises(ValueError, match="no minibatch"):
        acc.compute()
    with pytest.raises(ValueError, match="same number of images"):
        acc.update([torch.randn(4, 5), torch.randn(5, 5)])


def test_cka_summary_ignores_diagonal():
    cka = torch.tensor([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]], dtype=torch.float64)
    s = cka_summary(cka)
    assert s["mean_offdiag"] == pytest.approx(0.3)
    assert s["mean_offdiag_per_block"] == pytest.approx([0.3, 0.4, 0.2])


# ---- rollout ---------------------------------------------------------------------------------


def dense_factor(a: np.ndarray, fusion: str, discard: float) -> np.ndarray:
    """One image's (heads, S, S) attention -> fused, discarded, + identity, rows renormalised."""
    f = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion].astype(np.float64)
    S = f.shape[0]
    if discard:
        flat = f.flatten()
        order = np.argsort(flat, kind="stable")
        drop = [i for i in order[: int(S * S * discard)] if i != 0]
        flat[drop] = 0.0
        f = flat.reshape(S, S)
    f = f + np.eye(S)
    return f / f.sum(1, keepdims=True)


def dense_mixing(grid: tuple[int, int], k: int, prefix: int) -> np.ndarray:
    H, W = grid
    Ho, Wo = H - k + 1, W - k + 1
    m = np.zeros((prefix + Ho * Wo, prefix + H * W))
    for p in range(prefix):
        m[p, p] = 1.0
    for i in range(Ho):
        for j in range(Wo):
            for di in range(k):
                for dj in range(k):
                    m[prefix + i * Wo + j, prefix + (i + di) * W + (j + dj)] = 1.0 / k**2
    return m


def dense_map(row: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    v = row[len(row) - grid[0] * grid[1]:].reshape(grid)
    return (v - v.min()) / (v.max() - v.min())


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.9)])
def test_rollout_of_fixture_equals_dense(fixture_attention, fusion, discard):
    maps = [a.numpy() for a in fixture_attention]
    for a, b in ro.encoder_groups(FIXTURE_GRIDS):
        got = ro.rollout(fixture_attention[a:b], FIXTURE_GRIDS[a], fusion, discard)
        for img in range(2):
            joint = np.eye(maps[a].shape[-1])
            for blk in range(a, b):
                joint = dense_factor(maps[blk][img], fusion, discard) @ joint
            np.testing.assert_allclose(got[img].numpy(), dense_map(joint[0], FIXTURE_GRIDS[a]), atol=1e-6)


def test_rollout_across_of_fixture_equals_dense(fixture_attention):
    got = ro.rollout_across(fixture_attention, FIXTURE_GRIDS, {3: 3, 7: 3})
    assert got.shape == (2, 14, 14)  # the input grid
    maps = [a.numpy() for a in fixture_attention]
    for img in range(2):
        joint = np.eye(197)
        for blk in range(12):
            if blk in (4, 8):
                joint = dense_mixing(FIXTURE_GRIDS[blk - 1], 3, 1) @ joint
            joint = dense_factor(maps[blk][img], "mean", 0.0) @ joint
        np.testing.assert_allclose(got[img].numpy(), dense_map(joint[0], (14, 14)), atol=1e-6)


def test_attention_l_is_fused_cls_row(fixture_attention):
    got = ro.attention_l(fixture_attention[11], (10, 10), "max")
    row = fixture_attention[11].amax(dim=1)[:, 0, 1:].double()
    want = (row - row.amin(1, keepdim=True)) / (row.amax(1, keepdim=True) - row.amin(1, keepdim=True))
    torch.testing.assert_close(got, want.reshape(2, 10, 10))


def test_identity_attention_gives_uniform_map():
    eye = [torch.eye(S).expand(2, 3, S, S) for S in (17,) * 2 + (10,) * 2]
    grids = [(4, 4)] * 2 + [(3, 3)] * 2
    for m in (ro.rollout(eye[:2], (4, 4)), ro.rollout_across(eye, grids, {1: 2})):
        assert torch.isfinite(m).all() and m.min() == m.max()
    uniform = [torch.full((1, 2, 17, 17), 1 / 17)] * 3
    m = ro.rollout(uniform, (4, 4))
    assert m.min() == m.max()


def test_token_mixing_matrix():
    m = ro.token_mixing_matrix((4, 5), 3, num_prefix=2)
    assert m.shape == (2 + 2 * 3, 2 + 4 * 5)
    torch.testing.assert_close(m.sum(1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(m[:2, :2], torch.eye(2, dtype=torch.float64)) and m[:2, 2:].abs().sum() == 0
    # output patch (1, 2) reads input rows 1-3, columns 2-4
    src = (m[2 + 1 * 3 + 2, 2:] > 0).reshape(4, 5)
    want = torch.zeros(4, 5, dtype=torch.bool)
    want[1:4, 2:5] = True
    assert torch.equal(src, want)
    np.testing.assert_allclose(m.numpy(), dense_mixing((4, 5), 3, 2))


def test_groups_and_group_parsing():
    assert ro.encoder_groups(FIXTURE_GRIDS) == [(0, 4), (4, 8), (8, 12)]
    assert ro.parse_group("4-6", FIXTURE_GRIDS) == (4, 6)
    with pytest.raises(ValueError, match="spans a down-sampling ILA.*0-4, 4-8, 8-12"):
        ro.parse_group("2-6", FIXTURE_GRIDS)
    with pytest.raises(ValueError, match="form a-b"):
        ro.parse_group("first", FIXTURE_GRIDS)
    with pytest.raises(ValueError, match="outside"):
        ro.parse_group("8-13", FIXTURE_GRIDS)


# ---- features --------------------------------------------------------------------------------


def test_attention_distance_and_entropy_by_hand():
    uniform = torch.full((1, 2, 5, 5), 0.2)  # CLS + a 2x2 grid, patch 8 px
    d = attention_distance(uniform, (2, 2), (8, 8))
    # every patch query: distances 0, 8, 8, 8*sqrt(2) to the four patches, equally weighted
    torch.testing.assert_close(d, torch.full((1, 2), 4 + 2 * math.sqrt(2), dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((1, 2), math.log(5), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    peaked = torch.eye(5).expand(1, 2, 5, 5)
    assert attention_distance(peaked, (2, 2), (8, 8)).abs().max() == 0
    assert attention_entropy(peaked).abs().max() == 0


def test_pooled_tokens_grids():
    t = torch.randn(2, 1 + 14 * 14, 8)
    assert pooled_tokens(t, (14, 14), 1).shape == (2, 1 + 49, 8)
    small = torch.randn(2, 1 + 16, 8)
    torch.testing.assert_close(pooled_tokens(small, (4, 4), 1), small)  # smaller than 7: kept as is


def test_forward_collect_and_analyse_on_micro_model(micro_model):
    x = torch.randn(5, 3, 64, 64)
    out = forward_collect(micro_model, x)
    assert [t.shape[1] for t in out.tokens] == micro_model.tokens_per_block == [65, 37, 37, 17, 17, 17]
    assert [a.shape[-1] for a in out.attention] == [65, 65, 37, 37, 17, 17]
    torch.testing.assert_close(out.logits, micro_model(x))
    assert output_grids(micro_model) == [(8, 8), (6, 6), (6, 6), (4, 4), (4, 4), (4, 4)]

    res = analyse_batches(micro_model, [x, x[:2]], max_batches=5)
    cka, feat = res["attention_cka"], res["features"]
    assert cka["skipped_minibatch_sizes"] == [2] and cka["images"] == 5
    assert len(cka["matrix"]) == 6 and all(len(r) == 6 for r in cka["matrix"])
    assert len(feat["feature_norm"]) == 6 and len(feat["attention_distance_px"][0]) == 3  # 3 heads
    assert feat["pooled_grid"] == [[7, 7], [6, 6], [6, 6], [4, 4], [4, 4], [4, 4]]
    # attention over an 8x8 grid of 8 px patches: a distance between 0 and the diagonal
    assert 0 < feat["attention_distance_px_mean"][0] < 8 * 7 * math.sqrt(2)
    with pytest.raises(DatasetError, match="at least 4 images"):
        analyse_batches(micro_model, [x[:3]], features=False)


# ---- cost ------------------------------------------------------------------------------------


def test_cost_equals_inspect_for_vit_b16_ila_pp():
    from ufgir_cli.analysis.report import cost_section
    from ufgir_cli.cli import app
    from ufgir_cli.model import build_model
    from ufgir_cli.recipe import load_recipe

    recipe = load_recipe("ila_pp", {"model": {"weights": "none", "image_size": 224, "num_classes": 200}})
    with torch.device("meta"):
        model = build_model(recipe.model, 200)
    c = cost_section(model, recipe, "cpu", throughput=False)
    assert f"{c['macs'] / 1e9:.2f}" == "13.14" and c["params_trainable"] == 508_600
    res = CliRunner().invoke(app, ["inspect", "--recipe", "ila_pp", "--num-classes", "200"])
    assert res.exit_code == 0, res.output
    gmacs = re.search(r"([\d.]+) GMACs", res.output).group(1)
    trainable = re.search(r"trainable ([\d,]+)", res.output).group(1)
    assert (gmacs, trainable) == (f"{c['macs'] / 1e9:.2f}", f"{c['params_trainable']:,}")


# ---- figures and paper table -----------------------------------------------------------------


def test_blend_is_half_image_half_the_colour_map():
    img = np.full((2, 2, 3), 255, dtype=np.uint8)
    out = figures.blend(img, np.zeros((2, 2)), cmap="jet")
    np.testing.assert_allclose(out[0, 0], 0.5 + 0.5 * np.array([0.0, 0.0, 0.5]), atol=1e-6)  # jet(0) = dark blue


def test_paper_table():
    assert paper_top1("ila_pp", "soyageing") == 75.00
    assert paper_top1("linear", "cotton80") == 39.03
    assert paper_top1("ila", "soyageing") is None and paper_top1("ila_pp", "synthetic") is None
    # 7 PETL/ILA rows + 7 FGIR rows + TrFG* (recipe transfg_ft) + SIMT* (simtrans); CLCA's Table I: 2 rows x 3 datasets
    assert len(PAPER_TOP1) == 16 * 5 + 2 * 3
    assert paper_top1("transfg_ft", "soyageing") == 72.16
    assert paper_top1("ifa", "soyageing") == 56.01 and paper_top1("mpncov", "cotton80") == 43.89
