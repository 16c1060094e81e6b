"""`ufgir visualize tokens`: following each patch through EViT's and ToMe's reductions (checked against what the
reductions do to identifiable tokens), and the command on tiny trained runs."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ufgir_cli.analysis.tokens import follow_evit, follow_tome
from ufgir_cli.cli import app
from ufgir_cli.model.reduction import evit_reduce, tome_merge

runner = CliRunner()
P, N0 = 1, 16


def _one_hot() -> torch.Tensor:
    """(2, P + N0, P + N0): token t is the unit vector e_t, so a fused or merged token shows its members."""
    return torch.eye(P + N0).expand(2, -1, -1).clone()


def test_following_evit_matches_the_kept_and_fused_tokens():
    torch.manual_seed(0)
    x, where = _one_hot(), (P + torch.arange(N0)).expand(2, -1).clone()
    for keep in (0.5, 0.5):
        cls_row = torch.rand(2, 3, x.shape[1]).softmax(-1)
        x_new, did = evit_reduce(x, cls_row, P, keep)
        where = follow_evit(where, did, P)
        for b in range(2):
            for p in range(N0):
                if where[b, p] >= 0:  # held by a kept token: that token is the patch itself
                    assert x_new[b, where[b, p], P + p] == 1.0
                else:  # fused or dropped before: no kept token holds it alone
                    assert all(x_new[b, t, P + p] != 1.0 for t in range(P, x_new.shape[1] - 1))
        x = x_new
    # 16 -> 8 kept; then 5 of the 8 and the fused token: 4 or 5 patches still on their own
    assert set((where >= 0).sum(dim=1).tolist()) <= {4, 5}


def test_following_tome_matches_the_merged_tokens():
    torch.manual_seed(1)
    x, sizes, where = _one_hot(), None, (P + torch.arange(N0)).expand(2, -1).clone()
    for r in (5, 3):
        metric = torch.randn(2, x.shape[1], 4)
        length = x.shape[1]
        x, sizes, did = tome_merge(x, sizes, metric, P, r)
        where = follow_tome(where, did, P, length)
        for b in range(2):
            groups = {}
            for p in range(N0):
                groups.setdefault(int(where[b, p]), []).append(p)
            for t, members in groups.items():  # a token is the size-weighted mean of exactly its members
                support = (x[b, t, P:] > 0).nonzero().flatten().tolist()
                assert support == members and int(sizes[b, t, 0]) == len(members)
    assert len({int(w) for w in where[0]}) == N0 - 8


@pytest.fixture(scope="module")
def reduced_runs(small_synthetic, tmp_path_factory):
    from ufgir_cli.engine.train import fit
    from ufgir_cli.recipe import load_recipe

    base, out = tmp_path_factory.mktemp("token_runs"), {}
    for kind in ("evit", "tome"):
        recipe = load_recipe("quickstart", {
            "model": {"weights": "none", "method": "linear", "ila_ds_locs": [], "token_reduction": kind, "keep_rate": 0.5},
            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
            "data": {"num_workers": 0, "root": str(small_synthetic)}}, env=False)
        fit(recipe, base / kind)
        out[kind] = base / kind
    return out


@pytest.mark.parametrize("kind", ["evit", "tome"])
def test_visualize_tokens_writes_a_panel_per_reduction(reduced_runs, small_synthetic, monkeypatch, kind):
    from ufgir_cli.analysis.tokens import token_selections

    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    sel = token_selections(reduced_runs[kind], count=2, device="cpu")
    assert [label.split(":")[0] for label, *_ in sel.panels][1:] == ["block 1", "block 3", "block 4"]
    image, first = sel.panels[0][1], sel.panels[1][1]
    assert first.shape == image.shape and (first != image).any()
    if kind == "evit":  # dropped patches are dimmed, never brightened
        assert (first.astype(int) <= image.astype(int)).all()
    res = runner.invoke(app, ["visualize", "tokens", str(reduced_runs[kind]), "-b", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (reduced_runs[kind] / "analysis/visualize/tokens_test/grid.png").is_file()


def test_visualize_tokens_refuses_a_run_without_a_reduction(tiny_runs, small_synthetic, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    res = runner.invoke(app, ["visualize", "tokens", str(tiny_runs("linear")), "--device", "cpu"])
    assert res.exit_code != 0 and "has none" in res.output
