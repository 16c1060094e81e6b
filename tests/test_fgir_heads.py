"""The single-pass FGIR heads (IFA, MPN-COV, VQT) against the reference's stored intermediates.

These tests feed each head the very tensors the reference handed its own head (FGIR_README.md), so a
mismatch points at the head itself, not at the backbone around it.
"""

from __future__ import annotations

import argparse
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from ufgir_cli.model.heads import (
    IFAHead,
    MPNCovHead,
    VQTHead,
    isqrt_newton_schulz,
    upper_triangle,
    vqt_prompt_rows,
)


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


def test_vqt_prompt_rows_and_head_reproduce_reference(fixture_dir):
    sd, ex = _fixture(fixture_dir, "vqt_t16_112")
    L, B, P, D = ex["prompt_outputs"].shape
    heads = ex["attention_prompt_rows"].shape[2]
    for i in range(L):
        blk = Block(D, heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-12)).eval()
        p = f"encoder.blocks.{i}."
        blk.load_state_dict({
            "norm1.weight": sd[p + "norm1.weight"], "norm1.bias": sd[p + "norm1.bias"],
            "attn.qkv.weight": torch.cat([sd[p + f"attn.proj_{c}.weight"] for c in "qkv"]),
            "attn.qkv.bias": torch.cat([sd[p + f"attn.proj_{c}.bias"] for c in "qkv"]),
            "attn.proj.weight": sd[p + "proj.weight"], "attn.proj.bias": sd[p + "proj.bias"],
            "norm2.weight": sd[p + "norm2.weight"], "norm2.bias": sd[p + "norm2.bias"],
            "mlp.fc1.weight": sd[p + "pwff.fc1.weight"], "mlp.fc1.bias": sd[p + "pwff.fc1.bias"],
            "mlp.fc2.weight": sd[p + "pwff.fc2.weight"], "mlp.fc2.bias": sd[p + "pwff.fc2.bias"],
        })
        x = ex["block_inputs"][i]
        with torch.no_grad():
            rows = vqt_prompt_rows(blk, sd["encoder.prompt"][i].expand(B, -1, -1), blk.norm1(x))
            stream = blk(x)
        assert (rows - ex["prompt_outputs"][i]).abs().max() <= 1e-5
        want_next = ex["block_inputs"][i + 1] if i + 1 < L else ex["encoder_output"]
        assert (stream - want_next).abs().max() <= 1e-5  # the stream is a plain ViT's
    head = VQTHead(L, P, D, sd["head.head.weight"].shape[0]).eval()
    head.load_state_dict({"fc.weight": sd["head.head.weight"], "fc.bias": sd["head.head.bias"]})
    with torch.no_grad():
        rows = list(ex["prompt_outputs"])
        feats = head(rows, ex["encoder_norm_output"][:, 0], pre_logits=True)
        logits = head(rows, ex["encoder_norm_output"][:, 0])
    assert (feats - ex["head_input"]).abs().max() <= 1e-6
    assert (logits - ex["logits"]).abs().max() <= 1e-4
