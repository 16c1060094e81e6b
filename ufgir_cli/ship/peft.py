"""LoRA in and out as Hugging Face peft adapter folders: ``ufgir export --format peft`` and ``ufgir import-peft``.

An adapter folder is what peft itself writes (``save_pretrained``: ``adapter_config.json``,
``adapter_model.safetensors``) for a plain timm ViT with the classifier as a module to save, plus a
README with the exact ``timm.create_model`` call it attaches to. ufgir's LoRA layers are peft's own,
injected into the same timm modules under the same names, so tensors move between the two models
parameter by parameter (peft's raw names, ``qkv.lora_A.default.weight``; the head through peft's
``modules_to_save`` copy). Either way the result is checked: the folder loaded by
``PeftModel.from_pretrained`` on a fresh timm model must give the run's eager logits within
`PEFT_TOLERANCE`, and an imported run must give the logits of the folder it came from.

peft is imported inside the functions (seconds to import; ``ufgir --help`` never loads it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ExportError
from ..geometry import NUMERIC_KEYS
from ..io import atomic_write_text, replace_dir
from ..model.backbone import MICRO, create_timm, default_image_size, timm_call
from ..model.build import build_model
from ..model.methods.lora import settings_from_peft
from ..model.vit import UfgirViT
from ..recipe import Recipe, dump_resolved, load_recipe, tomllib
from .parity import ExportResult, check_parity, eager_logits, model_image_size, parity_batch
from .runs import check_new_run, write_imported_run

#: Max |logit difference| between ufgir and peft on a plain timm ViT, either way.
PEFT_TOLERANCE = 1e-5
CONFIG_FILE, WEIGHTS_FILE, README_FILE = "adapter_config.json", "adapter_model.safetensors", "README.md"
#: What ufgir adds to the folder besides the README: the run's resolved recipe, whose numerics and data
#: section ``import-peft`` takes back (so a round trip computes what the run did); peft ignores it.
RECIPE_FILE = "ufgir_recipe.toml"
#: peft's adapter name in raw parameter names, and where ``modules_to_save`` keeps the trained copy.
ADAPTER = "default"


def _layer_norm_eps(module: nn.Module) -> float | None:
    return next((m.eps for m in module.modules() if isinstance(m, nn.LayerNorm)), None)


def _pairs(ours: nn.Module, theirs: nn.Module, saved: list[str]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(our parameter, peft's) for every trainable parameter of ``ours`` (a timm ViT with peft's layers
    injected) in ``theirs`` (the same timm ViT as ``get_peft_model`` wraps it), by raw name; a module in
    ``saved`` (``modules_to_save``) maps to peft's trained copy of it. Every adapter tensor of ``theirs``
    must be matched: a layout either side lacks is an error naming the tensor."""
    named = dict(theirs.named_parameters())
    out, seen = [], set()
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        module = next((s for s in saved if n.startswith(s + ".")), None)
        key = f"{module}.modules_to_save.{ADAPTER}.{n[len(module) + 1:]}" if module else n
        if key not in named or named[key].shape != p.shape:
            raise ValueError(f"peft's model has no tensor {key} of shape {tuple(p.shape)}")
        out.append((p, named[key]))
        seen.add(key)
    left = [k for k in named if ADAPTER in k.split(".") and k not in seen]
    if left:
        raise ValueError(f"peft's adapter holds {left[0]}, which the ufgir model has no place for")
    return out


def _timm_code(backbone: str, kwargs: dict, folder: str, eps: float | None) -> str:
    """The lines a timm + peft user runs to load the folder; ``eps``: the run's LayerNorm eps where it is
    not timm's (the reference's numerics), set on the timm model before the adapter attaches."""
    args = ", ".join([repr(backbone)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    lines = ["import timm", "from peft import PeftModel", ""]
    if backbone == MICRO:  # ufgir's own backbone is registered with timm by ufgir's model package
        lines = ["import ufgir_cli.model  # registers ufgir's micro ViT with timm", *lines]
    lines.append(f"model = timm.create_model({args})")
    if eps is not None:
        lines += [f"for m in model.modules():  # the run's LayerNorm eps ({eps:g}), not timm's",
                  "    if isinstance(m, torch.nn.LayerNorm):", f"        m.eps = {eps!r}"]
        lines.insert(0, "import torch")
    return "\n".join([*lines, f"model = PeftModel.from_pretrained(model, {folder!r}).eval()"])


def _plain_timm(backbone: str, kwargs: dict, eps: float | None) -> nn.Module:
    """The timm model the README's code builds."""
    vit = create_timm(backbone, kwargs)
    if eps is not None:
        for m in vit.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    return vit


def _readme(model: UfgirViT, recipe: Recipe, code: str, diff: float) -> str:
    m, d = recipe.model, recipe.data
    cfg = model.data_config()
    S = model_image_size(model)
    return "\n".join([
        f"# {model.method.spec.display_name} · {m.backbone} · {d.dataset} (peft adapter)", "",
        f"A peft adapter folder written by `ufgir export --format peft`: {model.method.spec.description}. "
        f"The classifier ({model.num_classes} classes) is a module to save.", "",
        "```python", code, "```", "",
        f"Input: {S} px images, square resize to {int(d.resize_ratio * S)} px ({d.interpolation}), centre crop "
        f"{S}, normalised with mean {list(cfg['mean'])} and std {list(cfg['std'])}. On such an input this folder "
        f"gives the logits of the ufgir run within {diff:.2g} (checked when it was written, tolerance "
        f"{PEFT_TOLERANCE:g}).", "",
        f"`ufgir import-peft FOLDER --backbone {m.backbone}` turns it back into a ufgir run.", ""])


def export_peft(model: UfgirViT, recipe: Recipe, out: str | os.PathLike, *,
                tolerance: float = PEFT_TOLERANCE) -> ExportResult:
    """Write a peft adapter folder for ``model`` at ``out``, checked with peft itself; the method
    refuses in one line when peft holds nothing like it (`Method.peft_export_config`)."""
    from peft import PeftModel, get_peft_model

    out, t0, m = Path(out), time.perf_counter(), recipe.model
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; --format peft writes a folder")
    config = model.method.peft_export_config(model)
    if m.weights == "none":
        raise ExportError("--format peft needs pretrained backbone weights for the adapter to attach to, but this "
                          "run used weights = \"none\" (random init); export --format safetensors instead")
    kwargs = timm_call(m, model.num_classes)
    if "img_size" in kwargs and m.pos_embed_resize != "bicubic":
        raise ExportError(f"--format peft: the run resampled its position embeddings to {m.image_size} px with "
                          f"{m.pos_embed_resize} (model.pos_embed_resize), timm resamples bicubic, so plain timm would "
                          "compute other logits; export --format safetensors, onnx or pt2")
    base = create_timm(m.backbone, kwargs)
    eps = _layer_norm_eps(model.vit)
    eps = eps if eps != _layer_norm_eps(base) else None
    base = _plain_timm(m.backbone, kwargs, eps) if eps is not None else base
    with torch.no_grad():
        base.head.load_state_dict(model.vit.head.state_dict())
        wrapped = get_peft_model(base, config)
        for ours, theirs in _pairs(model.vit, wrapped.base_model.model, config.modules_to_save):
            theirs.copy_(ours)
    tmp = out.parent / f".{out.name}.unverified"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        wrapped.save_pretrained(str(tmp))
        loaded = PeftModel.from_pretrained(_plain_timm(m.backbone, kwargs, eps), str(tmp))
        x = parity_batch(2, model_image_size(model))
        diff = check_parity(eager_logits(loaded, x), eager_logits(model, x), tolerance,
                            f"peft adapter folder {out} (PeftModel.from_pretrained on timm's {m.backbone})")
        code = _timm_code(m.backbone, kwargs, str(out), eps)
        atomic_write_text(tmp / README_FILE, _readme(model, recipe, code, diff))
        atomic_write_text(tmp / RECIPE_FILE, dump_resolved(recipe))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return ExportResult(out, "peft", diff, tolerance, size, time.perf_counter() - t0)


# ---- import ---------------------------------------------------------------------------------------


def _read_config(folder: Path):
    from peft import PeftConfig

    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} is not a peft adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                              "(what peft's save_pretrained writes)")
    try:
        return PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a peft configuration peft can read ({first})") from None


def _num_classes(folder: Path, saved: list[str]) -> int:
    """The classes of the classifier the folder saves (``modules_to_save = ["head"]``)."""
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        head = next((k for k in f.keys() if re.search(r"(^|\.)head\.weight$", k)), None)
        if "head" not in saved or head is None:
            raise CheckpointError(f"{folder} holds no classifier: import-peft needs the adapter of a timm ViT trained "
                                  "with modules_to_save=[\"head\"]")
        return int(f.get_slice(head).get_shape()[0])


def _ufgir_settings(folder: Path) -> dict[str, dict[str, Any]]:
    """The numerics, input size and data section of the run a folder came from, when ufgir wrote it
    (`RECIPE_FILE`); empty for a folder from elsewhere."""
    f = folder / RECIPE_FILE
    if not f.is_file():
        return {"model": {}, "data": {}}
    try:
        saved = tomllib.loads(f.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid TOML ({e}); delete it to import the adapter with timm's numerics") from None
    model, data = saved.get("model", {}), saved.get("data", {})
    return {"model": {k: model[k] for k in (*NUMERIC_KEYS["model"], "image_size") if model.get(k) is not None},
            "data": {k: data[k] for k in ("dataset", *NUMERIC_KEYS["data"]) if data.get(k) is not None}}


def import_peft(folder: str | os.PathLike, out: str | os.PathLike, backbone: str, *, weights: str = "timm",
                image_size: int | None = None, dataset: str | None = None, overwrite: bool = False,
                tolerance: float = PEFT_TOLERANCE) -> tuple[UfgirViT, Recipe]:
    """A run folder from a peft adapter folder trained on timm's ``backbone`` (``weights``: "timm" or a
    local weights file; ``image_size``: timm's default for the backbone when None). The run's model gets
    the folder's tensors and must give the logits that peft gives on the plain timm model."""
    from peft import PeftModel

    folder, out = Path(folder), Path(out)
    check_new_run(out, overwrite)
    config = _read_config(folder)
    settings = settings_from_peft(config, str(folder))  # method and lora keys, or one line on what cannot be
    saved = list(config.modules_to_save or [])
    num_classes = _num_classes(folder, saved)
    # The numerics and input size of the run a ufgir folder came from; else the backbone's own and its
    # default input size, what a peft user's timm model has.
    ours = _ufgir_settings(folder)
    model_keys: dict[str, Any] = {"backbone": backbone, "weights": weights, "numerics": "backbone",
                                  "image_size": default_image_size(backbone), **ours["model"], **settings}
    if image_size is not None:
        model_keys["image_size"] = image_size
    over: dict[str, Any] = {"model": model_keys, "data": {**ours["data"], **({"dataset": dataset} if dataset else {})}}
    recipe = load_recipe(str(settings["method"]), over)
    kwargs = timm_call(recipe.model, num_classes)
    model = build_model(recipe.model, num_classes)
    try:  # the timm model of the folder's README (the run's LayerNorm eps, where ufgir wrote the folder)
        plain = _plain_timm(backbone, kwargs, _layer_norm_eps(model.vit))
        theirs = PeftModel.from_pretrained(plain, str(folder)).eval()
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder} does not attach to timm's {backbone} ({first}); give the --backbone it was "
                              "trained on") from None
    try:
        with torch.no_grad():
            for p, t in _pairs(model.vit, theirs.base_model.model, saved):
                p.copy_(t)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}; import-peft reads LoRA, DoRA and GLoRA adapters of a timm ViT") from None
    x = parity_batch(2, model_image_size(model))
    try:
        check_parity(eager_logits(model, x), eager_logits(theirs, x), tolerance, "the imported run")
    except ExportError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    write_imported_run(out, model, recipe, imported_from=folder / WEIGHTS_FILE, overwrite=overwrite,
                       import_format=f"peft adapter folder ({type(config).__name__}, peft "
                                     f"{getattr(config, 'peft_version', None) or 'of unknown version'})")
    return model, recipe


__all__ = ["PEFT_TOLERANCE", "export_peft", "import_peft"]
