"""No silent no-ops: every backbone module a method adapts must reach the logits.

A method that changes the backbone's own modules (LoRA, DoRA and GLoRA through peft, SSF, BitFit)
names, per adapted module, the parameters through which it adapts it (`PathCheck`). Built, the model
is checked once: with every adapter set away from its start (a non-zero LoRA, a scale away from
one), one forward and one backward of ``model(x)`` in train mode and one in eval mode; a module none
of whose adapter parameters gets a gradient cannot change ``model(x)`` (a change that reached the
logits would have one), so the build is refused in one line that names the module and the modules
that do reach the logits. Why it is needed: a forward that applies a layer's weight itself (our
CLS-only last block once read ``qkv.weight`` directly, and peft's wrapped layer returns its base
weight there) would run without the adapter and never train it.

The check leaves no trace: parameters and buffers (BatchNorm statistics) are restored bit for bit,
the random number generator is forked, the mode restored. Stochastic depth is off while it runs (a
dropped branch would look like one the forward never reaches). A configuration that passed is not
checked again in the same process (the forward's structure does not depend on the weights).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from timm.layers import DropPath
from torch import nn

from ...errors import RecipeError


@dataclass
class PathCheck:
    """What a method adapts inside the backbone, for `check_on_path`.

    ``subject`` names what the user chose, for the refusal ("model.lora_targets '...'");
    ``units``: per adapted module (its timm name), its adapter's parameters; ``candidates``: the
    modules the subject could name, of which the refusal lists those that reach the logits, as
    ``hint_run(x)`` reaches them (default: as the checked forward does); ``key``: the configuration (a
    check that passed is not repeated for it in this process)."""

    subject: str
    units: dict[str, list[nn.Parameter]]
    candidates: dict[str, nn.Module] = field(default_factory=dict)
    hint_run: Callable[[torch.Tensor], torch.Tensor] | None = None
    key: str = ""


_passed: set[str] = set()


def _project(out: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every logit (a fixed random projection: a sum could cancel)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    return (out.float() * w).sum()


def silent_units(run: Callable[[], torch.Tensor], units: dict[str, list[nn.Parameter]],
                 scale: float = 0.02) -> list[str]:
    """The units none of whose parameters gets a gradient from ``run()``, with every unit's
    parameters moved by N(0, scale^2) first (a LoRA's zero B made non-zero); restored after."""
    params = [p for ps in units.values() for p in ps]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * scale)
        grads = torch.autograd.grad(_project(run()), params, allow_unused=True)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    off, i = [], 0
    for name, ps in units.items():
        g = grads[i: i + len(ps)]
        i += len(ps)
        if not any(x is not None and bool(x.ne(0).any()) for x in g):
            off.append(name)
    return off


def reaching(run: Callable[[], torch.Tensor], modules: dict[str, nn.Module]) -> list[str]:
    """The modules whose output reaches ``run()``'s (a zero probe added to each output gets a gradient)."""
    probes: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def add_probe(module, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            z = torch.zeros_like(out, requires_grad=True)
            probes.setdefault(name, []).append(z)
            return out + z
        return add_probe

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    names = list(probes)
    flat = [z for n in names for z in probes[n]]
    if not flat:
        return []
    grads = torch.autograd.grad(_project(out), flat, allow_unused=True)
    hit, i = set(), 0
    for n in names:
        g = grads[i: i + len(probes[n])]
        i += len(probes[n])
        if any(x is not None and bool(x.ne(0).any()) for x in g):
            hit.add(n)
    return [n for n in modules if n in hit]


def collapse(names: Iterable[str]) -> str:
    """Module names, those that differ only in their first index merged: ``blocks.{0-4}.attn.qkv``."""
    groups: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key = n if m is None else n[: m.start()] + ".{}." + n[m.end():]
        groups.setdefault(key, []).extend([] if m is None else [int(m.group(1))])
    out = []
    for key, idx in groups.items():
        if not idx:
            out.append(key)
            continue
        idx = sorted(set(idx))
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None], strict=True):
            if b != a + 1:
                runs.append(str(start) if start == a else f"{start}-{a}")
                start = b
        out.append(key.replace("{}", "{" + ",".join(runs) + "}" if len(idx) > 1 else str(idx[0])))
    return ", ".join(out) or "none"


class _NoStochasticDepth:
    """Stochastic depth off for a while (a dropped branch is not one the forward never reaches)."""

    def __init__(self, model: nn.Module):
        self.saved = [(m, m.drop_prob) for m in model.modules() if isinstance(m, DropPath)]

    def __enter__(self):
        for m, _ in self.saved:
            m.drop_prob = 0.0

    def __exit__(self, *exc):
        for m, p in self.saved:
            m.drop_prob = p


def check_on_path(model: nn.Module, check: PathCheck, x: torch.Tensor,
                  run: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Refuse, in one RecipeError line, a unit of ``check`` that cannot change ``run(model, x)``
    (default ``model(x)``) in train or in eval mode; see the module docstring."""
    if not check.units or check.key and check.key in _passed:
        return
    run = run or (lambda m, t: m(t))
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _NoStochasticDepth(model), torch.enable_grad():
            torch.manual_seed(0)
            for mode in ("train", "eval"):
                model.train(mode == "train")
                off = silent_units(lambda: run(model, x), check.units)
                if off:
                    hint = check.hint_run or (lambda t: run(model, t))
                    works = reaching(partial(hint, x), check.candidates) if check.candidates else []
                    raise RecipeError(
                        f"{check.subject}: a non-zero adapter on {off[0]} does not change model(x) in {mode} mode (the "
                        f"forward never reaches it{f'; nor {len(off) - 1} more' if len(off) > 1 else ''}); modules "
                        f"that do: {collapse(works)}")
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        model.train(was_training)
    if check.key:
        _passed.add(check.key)


__all__ = ["PathCheck", "check_on_path", "collapse", "reaching", "silent_units"]
