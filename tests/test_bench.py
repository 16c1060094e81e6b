"""The benchmark's baselines: the reference-style stand-in must be the reference's network."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.reference_style import ReferenceStyle
from benchmarks.run import _one, _speedups
from ufgir_cli.model import build_model, load_upstream_checkpoint
from ufgir_cli.recipe import load_recipe


def test_reference_style_reproduces_fixture_logits(fixture_dir):
    model, _ = load_upstream_checkpoint(fixture_dir / "ila_pp_t16_224.upstream.pth")
    expected = torch.load(fixture_dir / "ila_pp_t16_224.expected.pt", weights_only=True)
    stand_in = ReferenceStyle(model).eval()
    with torch.no_grad():
        out = stand_in(expected["input"])
    assert out.shape == (2, 200)
    assert (out - expected["logits"]).abs().max().item() < 1e-4
    # separate projections, exactly the fused weights split in three
    D = model.embed_dim
    qkv = model.vit.blocks[5].attn.qkv.weight
    assert torch.equal(stand_in.attn[5].proj_k.weight, qkv[D:2 * D])
    assert not any(isinstance(m, type(model.drop)) for m in stand_in.modules())  # plain nn.Dropout only


def test_reference_style_trains_the_same_parameters():
    cfg = {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 96, "ila_ds_locs": [1, 3]}
    torch.manual_seed(0)
    model = build_model(load_recipe("ila_pp", {"model": cfg}).model, 5)
    stand_in = ReferenceStyle(model).train()
    stand_in(torch.randn(2, 3, 96, 96)).sum().backward()
    grads = {n for n, p in stand_in.named_parameters() if p.grad is not None}
    trainable = {"m." + n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable
    assert not any(p.requires_grad for p in stand_in.attn.parameters())


def test_prompts_are_refused():
    cfg = {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 64, "prompt_len": 4}
    model = build_model(load_recipe("vpt_shallow", {"model": cfg}).model, 5)
    with pytest.raises(ValueError, match="prompts"):
        ReferenceStyle(model)


def test_one_configuration_measures_reference(one_thread):
    args = argparse.Namespace(method="reference", backbone="vit_tiny_patch16_224", size=112, batch=2, mode="train",
                              precision="fp32", device="cpu", grad_checkpointing=False, compile=False,
                              warmup=0, iters=1, peak_tflops=0.0)
    row = _one(args)
    assert row["method"] == "reference" and row["s_per_batch"] > 0
    # counted on our ila_pp network: the same multiply-adds as the model it stands in for
    cfg = {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 112}
    from ufgir_cli.analysis.cost import count_flops

    with torch.device("meta"):
        ours = build_model(load_recipe("ila_pp", {"model": cfg}).model, 200)
    assert row["fwd_gflops_per_batch"] == pytest.approx(count_flops(ours, 112, batch=2) / 1e9)


def test_speedup_table_against_same_run_reference():
    rows = [
        {"method": "reference", "size": 224, "mode": "train", "precision": "fp32", "s_per_batch": 3.0, "compile": False},
        {"method": "reference", "size": 224, "mode": "infer", "precision": "fp32", "s_per_batch": 1.2, "compile": False},
        {"method": "ila_pp", "size": 224, "mode": "train", "precision": "fp32", "s_per_batch": 2.0, "compile": False},
        {"method": "ila_pp", "size": 224, "mode": "train", "precision": "bf16", "s_per_batch": 1.6, "compile": False},
        {"method": "ila_pp", "size": 224, "mode": "infer", "precision": "bf16", "s_per_batch": 0.4, "compile": False},
        {"method": "linear", "size": 224, "mode": "infer", "precision": "bf16", "s_per_batch": 0.1, "compile": False},
    ]
    lines = _speedups(rows)
    assert lines[3:] == [
        "| train fp32 | 224 | 1.50x | 1.2x | yes |",
        "| train bf16 | 224 | 1.88x | 2x | no |",
        "| infer bf16 | 224 | 3.00x | 3x | yes |",
    ]
    assert _speedups(rows[2:]) == []  # no reference rows, no table


def test_paired_measurement_divides_within_rounds(one_thread):
    from benchmarks.paired import markdown, measure

    doc = measure(112, 2, 3, "vit_tiny_patch16_224")
    rows = {(r["method"], r["mode"], r["precision"]): r for r in doc["rows"]}
    assert len(rows) == 6 and all(len(r["times"]) == 3 for r in rows.values())
    ref, ours = rows[("reference", "infer", "fp32")], rows[("ila_pp", "infer", "bf16")]
    ratios = sorted(a / b for a, b in zip(ref["times"], ours["times"], strict=True))
    assert ours["speedup_vs_reference"] == pytest.approx(ratios[1])
    assert ours["target"] == 3.0 and "speedup_vs_reference" not in ref
    table = markdown(doc)
    assert table.count("\n| ila_pp |") == 4 and "| reference | 112 | 2 | train | fp32 |" in table


def test_data_path_table_names_the_bottleneck(tmp_path, monkeypatch):
    import json

    import benchmarks.data as data

    monkeypatch.setattr(data, "RESULTS", tmp_path)
    rows = [{"workers": 0, "source_size": 448, "image_size": 224, "images_per_s": 150.0},
            {"workers": 2, "source_size": 448, "image_size": 224, "images_per_s": 120.0}]
    assert "bottleneck" not in data.markdown(rows, 224)  # no model results yet
    (tmp_path / "cpu.json").write_text(json.dumps({"rows": [
        {"method": "ila_pp", "mode": "train", "size": 224, "precision": "bf16", "images_per_s": 9.5},
        {"method": "linear", "mode": "infer", "size": 224, "precision": "bf16", "images_per_s": 400.0}]}))
    table = data.markdown(rows, 224)
    assert "| 0 | 448 | 224 | 150.0 |" in table
    assert "ila_pp bf16, 9.5 images/s; the loader gives 150.0 images/s: the model is the bottleneck." in table
