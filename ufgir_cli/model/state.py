"""One strict way to put tensors into a model, for every file format ufgir reads.

Checkpoints, safetensors exports, reference checkpoints and backbone weight files all end here, so
"does this file fit this model" is answered, and reported, the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import CheckpointError


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, *,
                expected: Iterable[str] | None = None, hint: str = "") -> None:
    """Load ``state`` into ``model`` when its keys are exactly ``expected`` (default: every key of
    ``model.state_dict()``) with the model's shapes; otherwise one CheckpointError naming the
    missing, unexpected and mis-shaped keys, then ``hint`` (what the user should do).

    A partial ``expected`` (an adapter-only delta, weights without a head) loads just those keys
    and leaves the rest of the model as it is."""
    own = model.state_dict()
    want = set(own) if expected is None else set(expected)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    bad = sorted(k for k in set(state) & want if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad:
        what = type(model).__name__
        cfg = getattr(model, "cfg", None)
        if cfg is not None and hasattr(cfg, "method"):
            what = f"a {cfg.method} model on {cfg.backbone}"
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in bad[:4]]
        raise CheckpointError(
            f"{source} does not fit {what}: missing {_few(missing)}, unexpected {_few(unexpected)}, "
            f"shape mismatch {shapes}" + (f"; {hint}" if hint else "")
        )
    model.load_state_dict(state, strict=want == set(own))


def _few(keys: list[str], n: int = 5) -> str:
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
