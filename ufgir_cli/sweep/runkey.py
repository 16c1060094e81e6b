"""Run keys: the short hash that names a sweep run's folder, from a canonical form of its recipe.

The canonical form is the resolved recipe with every key at its baseline left out, as JSON with
sorted keys and no spaces. A key's baseline is its default in ``KEYS_V1`` (the recipe as it was
when run keys became canonical) or, for a key added since, its field default. So:

- a new recipe key whose default keeps the old behaviour changes no key: at its default it is
  left out, exactly as if it did not exist;
- changing a default later changes only the keys of runs whose recipe now resolves differently
  (a run that sets the old default, or resolves to it, keeps its key, since it trains the same);
- ``description`` is prose and stays out of the key: rewording a packaged recipe trains nothing;
  so does the ``[sweep]`` section (what a sweep tries, not how one run trains);
- what depends on the machine a run starts on (data-loader workers, threads, device) stays out too,
  so a sweep planned on a login node continues on a compute node without training again. Runs
  keyed before that are found by :func:`machine_run_key`;
- ``model.numerics`` only chooses where the unset numeric keys come from (the backbone's pretrained
  config or the reference's); the values it resolves to are in the key, so it stays out: the paper's
  recipes ask for the reference's numerics by name and keep the keys they had when those were defaults.

Values are written plainly: tuples as lists, ``-0.0`` as ``0``, a float that is a whole number as
an integer (``1.0`` and ``1`` are one value). A key that the recipe fills from other keys (the
method's ILA positions) is always present, resolved; a key added later that is filled the same
way must resolve to its field default whenever it keeps the old behaviour, or it changes keys.

Runs made before canonical keys are named by the *legacy key*: the first 12 hex digits of the
sha256 of the resolved recipe TOML that ``dump_resolved`` wrote then (every key of ``KEYS_V1``,
in its order, with None left out). :func:`legacy_run_key` rebuilds that text over ``KEYS_V1``'s
keys alone, so it keeps finding those runs after keys are added or removed; a recipe that sets a
key ``KEYS_V1`` lacks away from its default has no legacy key (no run made then can match it). A
key renamed later is recognised at its default only; a rename map would have to be applied here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from ..io import to_toml
from ..recipe_sections import MACHINE_KEYS

KEY_DIGITS = 12  # hex digits of a run key, legacy or canonical
#: Keys left out of the run key: prose, the sweep's own settings, the machine's, and the choice of
#: numerics whose resolved values are in it (see above).
NOT_IN_KEY = frozenset({"description", "sweep", "model.numerics", *MACHINE_KEYS})
#: What an unset machine key resolved to before it could be unset (data.num_workers defaulted to 4).
_THEN = {("data", "num_workers"): 4}

#: Every recipe key and its default when run keys became canonical (package 0.1.0), in the order
#: the recipe declares them (the legacy TOML's order). Data, not code: never change an entry.
KEYS_V1: dict[str, Any] = {
    "description": "",
    "data": {"dataset": "soyageing", "root": None, "num_workers": 4, "resize_ratio": 1.34, "hflip": True,
             "interpolation": "bicubic", "skip_corrupt": False, "augment": "weak"},
    "model": {
        "backbone": "vit_base_patch16_224.orig_in21k", "weights": "timm", "image_size": 224, "num_classes": None,
        "method": "ila_pp", "train_backbone": False, "depth": None, "adapter_dim": 8, "adapter_scale": 1.0,
        "adapter_kernel": 3, "adapter_init": "xavier", "ila_dim": 8, "ila_locs": None, "ila_ds_locs": None,
        "ila_kernel": 3, "ila_norm": "bn", "ila_cls_conv": True, "ila_residual_init": "near_ones", "ila_dws_mult": 1,
        "prompt_len": 100, "prompt_dropout": 0.1, "cov_dim": 64, "maws_tokens": 12, "row0_chain": False,
        "crop_tokens": None, "sim_metric": "cos", "cal_maps": 32, "cal_single_crop": False, "drop": 0.1,
        "drop_path": 0.0, "drop_path_schedule": "linear", "layer_norm_eps": 1e-12,
        "pos_embed_resize": "bilinear_corners", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    },
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "betas": (0.9, 0.999),
              "eps": 1e-08, "clip_grad": 1.0, "label_smoothing": 0.0},
    "schedule": {"name": "cosine", "warmup_steps": 500, "warmup_lr": 1e-06, "min_lr": 1e-05},
    "train": {"epochs": 50, "batch_size": 8, "split": "train_val", "precision": "auto", "seed": 1, "grad_accum": 1,
              "deterministic": False, "device": "auto", "threads": None, "compile": None, "grad_checkpointing": False,
              "channels_last": False, "sync_bn": False, "checkpoint_every": 0, "skip_nonfinite": None},
    "eval": {"split": "test", "every": 10, "batch_size": None},
    "logging": {"tensorboard": True, "log_every": 20},
}

_MISSING = object()


def _plain(value: Any) -> Any:
    """One spelling per value: lists for sequences, whole floats as ints, no negative zero."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        value += 0.0  # -0.0 -> 0.0
        return int(value) if value.is_integer() else value
    return value


def _changed(section: BaseModel, baseline: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``section`` away from their baseline, sub-sections (if any) recursively."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            sub = baseline.get(name)
            inner = _changed(value, sub if isinstance(sub, dict) else {})
            if inner:
                out[name] = inner
            continue
        base = baseline.get(name, _MISSING)
        if base is _MISSING:
            base = field.get_default(call_default_factory=True)
        if _plain(value) != _plain(base):
            out[name] = _plain(value)
    return out


def canonical_recipe(recipe: BaseModel, omit: frozenset[str] = NOT_IN_KEY) -> dict[str, Any]:
    """The recipe as its key sees it: nested ``{section: {key: value}}`` of the keys away from
    their baseline, less those in ``omit`` (whole sections, or ``section.key``)."""
    out = _changed(recipe, KEYS_V1)
    for dotted in omit:
        section, _, key = dotted.partition(".")
        if not key:
            out.pop(section, None)
        elif isinstance(out.get(section), dict):
            out[section].pop(key, None)
            if not out[section]:
                del out[section]
    return out


def canonical_json(recipe: BaseModel, omit: frozenset[str] = NOT_IN_KEY) -> str:
    return json.dumps(canonical_recipe(recipe, omit), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_DIGITS]


def run_key(recipe: BaseModel) -> str:
    """The run key: the first 12 hex digits of the sha256 of :func:`canonical_json`."""
    return _hash(canonical_json(recipe))


def _as_then(recipe: BaseModel) -> BaseModel:
    """The recipe with its unset machine keys at the values they resolved to before they could be unset."""
    update = {}
    for (section, key), value in _THEN.items():
        part = getattr(recipe, section)
        if getattr(part, key) is None:
            update[section] = part.model_copy(update={key: value})
    return recipe.model_copy(update=update) if update else recipe


def machine_run_key(recipe: BaseModel) -> str:
    """The key a run of this recipe had while machine keys were part of it (canonical keys, 0.1)."""
    return _hash(canonical_json(_as_then(recipe), frozenset({"description", "sweep", "model.numerics"})))


def added_keys(recipe: BaseModel) -> list[str]:
    """Dotted names of the keys this recipe sets away from their default that ``KEYS_V1`` lacks."""
    out = []
    for name, value in canonical_recipe(recipe).items():
        if name not in KEYS_V1:
            out += [f"{name}.{k}" for k in value] if isinstance(value, dict) else [name]
        elif isinstance(value, dict):
            out += [f"{name}.{k}" for k in value if k not in KEYS_V1[name]]
    return out


def legacy_run_key(recipe: BaseModel) -> str | None:
    """The key a run of this recipe had before canonical keys: ``sha256(dump_resolved(recipe))``
    as it was then, rebuilt over ``KEYS_V1``'s keys (one removed since counts at its default).
    None when the recipe sets a key made since away from its default: no run made then matches."""
    if added_keys(recipe):
        return None
    dumped = _as_then(recipe).model_dump(mode="python")
    then: dict[str, Any] = {}
    for name, keys in KEYS_V1.items():
        if isinstance(keys, dict):
            section = dumped.get(name) or {}
            then[name] = {k: section.get(k, default) for k, default in keys.items()}
        else:
            then[name] = dumped.get(name, keys)
    return hashlib.sha256(to_toml(then).encode()).hexdigest()[:KEY_DIGITS]
