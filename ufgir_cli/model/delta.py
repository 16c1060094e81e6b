"""Reading a ufgir safetensors export: an adapter-only PETL delta or a full model.

This sits in the model layer, not next to the exporter, because loading is what everything else
needs (``ufgir_cli.load_run``, eval, predict) and it only takes the model and the recipe; writing
an export, with its parity check, is ``ufgir_cli.ship``'s job.

The file carries its identity in the header metadata (resolved recipe TOML, backbone name and
sha256, method, classes, format version). A delta re-attaches to the backbone re-created from the
recipe's ``model.weights``, whose sha256 must match the one it was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from ..recipe import Recipe, recipe_from_dict, tomllib
from .build import build_model
from .state import load_strict
from .vit import UfgirViT

SAFETENSORS_FORMAT = "ufgir-safetensors"
FORMAT_VERSION = 1  # of the safetensors metadata and of the ONNX/pt2 sidecars
#: How a full export names its tensors: the model's own names, or timm's (a merged model that is a plain
#: timm ViT, ``ufgir export --merge``: timm loads the file as it is).
LAYOUT_UFGIR, LAYOUT_TIMM = "ufgir", "timm"


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a ufgir safetensors export; anything else is a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-export it") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file without ufgir metadata; load exports written by "
            "`ufgir export --format safetensors`, or use plain backbone weights as model.weights"
        )
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer ufgir (format {meta['format_version']}); upgrade ufgir")
    return meta


def _recipe_from_toml(text: str, source: Path) -> Recipe:
    try:
        return recipe_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise CheckpointError(f"{source}: the stored recipe is not valid TOML ({e}); re-export the model") from None


def load_delta(path: str | os.PathLike, device: str = "cpu", weights: str | None = None) -> tuple[UfgirViT, Recipe]:
    """(model, recipe) from a safetensors export: an adapter-only delta or a full model.

    A delta is attached to the backbone re-created from the stored recipe's ``model.weights`` (or
    ``weights``, e.g. the same file at another path), after checking its sha256. A full export is
    rebuilt without fetching any backbone weights, since every tensor is in the file; a merged one
    (``ufgir export --merge``) into the method's merged structure (`Method.export_model`). Loading is
    strict: missing or unexpected tensors are errors that list them.
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_safetensors_metadata(path)
    recipe = _recipe_from_toml(meta["recipe"], path)
    if weights is not None:
        data = recipe.model_dump(mode="json")
        data["model"]["weights"] = str(weights)
        recipe = recipe_from_dict(data)
    m = recipe.model
    if meta.get("method") != m.method or meta.get("backbone") != m.backbone:
        raise CheckpointError(f"{path}: metadata says {meta.get('method')} on {meta.get('backbone')} but its recipe "
                              f"says {m.method} on {m.backbone}; the file was edited, re-export it")
    num_classes = int(meta["num_classes"])
    adapter_only = meta.get("adapter_only") == "true"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}

    if adapter_only:
        model = build_model(m, num_classes)
        want, have = meta["backbone_sha256"], model.backbone_sha256()
        if want != have:
            raise CheckpointError(
                f"{path} was trained on backbone sha256 {want} but model.weights={m.weights!r} gives sha256 {have}; "
                "attach it to the original backbone weights (load_delta(path, weights=FILE))"
            )
        expected = model.trainable_state_dict().keys()
    else:
        model = build_model(m.model_copy(update={"weights": "none"}), num_classes)
        expected = None
        if meta.get("merged") == "true":
            model = model.method.export_model(model)
    target = model.vit if meta.get("layout") == LAYOUT_TIMM else model
    load_strict(target, state, str(path), expected=expected, hint="re-export it from its run")
    return model.to(device).eval(), recipe
