"""A recipe as a person reads it: where each value comes from (`recipe_sources`), every key with the
unset ones as comments (`dump_every_key`, what `ufgir recipes show` prints and still loads) and every
key's type, default and description (`recipe_keys`, what `ufgir recipes keys` lists). The recipe types
and their resolution are in ``recipe.py``; this module only describes them. No torch.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from .geometry import NUMERIC_KEYS, backbone_depth, backbone_numerics
from .io import to_toml
from .methods import method_spec
from .recipe import MEDIUM_PRESET, Recipe, _field_paths, _read_toml, load_recipe, resolve_recipe_path


def _dotted(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys a recipe dict sets, two levels deep (a section's keys, top-level scalars)."""
    out = set()
    for k, v in data.items():
        if isinstance(v, dict) and not prefix:
            out |= _dotted(v, f"{k}.")
        else:
            out.add(prefix + k)
    return out


_PRESET_KEYS = {f"{section}.{key}" for section, keys in MEDIUM_PRESET.items() for key in keys}


def recipe_sources(name_or_path: str | os.PathLike | None = None, overrides: dict | None = None, *,
                   env: bool = True) -> tuple[Recipe, dict[str, str]]:
    """The recipe `load_recipe` gives, and where each of its values comes from, by dotted key: ``--set``,
    a ``UFGIR_*`` variable, the recipe file, the backbone's pretrained config or the reference's
    numerics (`model.numerics`), the method's default for the backbone's depth, the augment preset, or
    the default."""
    recipe = load_recipe(name_or_path, overrides, env=env)
    given: dict[str, str] = {}
    if name_or_path is not None:
        given |= dict.fromkeys(_dotted(_read_toml(resolve_recipe_path(name_or_path))), "recipe file")
    if env:
        known = {p.replace(".", "__").upper(): p for p in _field_paths(Recipe)}
        given |= {known[v[6:].upper()]: f"environment {v}" for v in os.environ
                  if v.startswith("UFGIR_") and v[6:].upper() in known}
    given |= dict.fromkeys(_dotted(overrides or {}), "--set")
    m = recipe.model
    values, numerics_source = backbone_numerics(m.backbone, m.numerics)
    depth = m.depth or backbone_depth(m.backbone)
    derived = {"model.ila_locs", "model.ila_ds_locs"} | ({"model.depth"} if method_spec(m.method).replaces_blocks else set())
    out: dict[str, str] = {}
    for section, value in recipe.model_dump(mode="python").items():
        keys = [(f"{section}.{k}", k) for k in value] if isinstance(value, dict) else [(section, section)]
        for dotted, leaf in keys:
            if dotted in given:
                out[dotted] = given[dotted]
            elif leaf in NUMERIC_KEYS.get(section, ()):
                out[dotted] = numerics_source if leaf in values else "the backbone's own, read when the model is built"
            elif dotted in derived:
                out[dotted] = (f"method {m.method!r} on a {depth + method_spec(m.method).replaces_blocks}-block backbone"
                               if depth is not None else f"method {m.method!r}, for the depth read when the model is built")
            elif dotted in _PRESET_KEYS and recipe.data.augment == "medium":
                out[dotted] = 'data.augment = "medium"'
            elif (value.get(leaf) if isinstance(value, dict) else value) is not None:
                out[dotted] = "default"  # an unset default (None) is not written, nor its comment
    return recipe, out


def _unset(key: str, value: Any) -> bool:
    """A key with no value of its own: None, or an empty ``model.options``."""
    return value is None or (key == "options" and not value)


def _toml_line(key: str, value: Any) -> str:
    """``key = value`` as `to_toml` writes it inside a section."""
    return to_toml({"s": {key: value}}).strip().splitlines()[-1]


def dump_every_key(recipe: Recipe, comments: dict[str, str] | None = None) -> str:
    """The resolved recipe as TOML with every key, in the order the recipe declares them: an unset
    one (None: "derived" or "the backbone's") as a comment that says what it is, so the text still
    loads, as `dump_resolved`'s does, to an equal recipe. ``comments``: where each set value comes
    from, by dotted key (`recipe_sources`), after its line."""
    docs = {d.key: d for d in recipe_keys()}
    data = recipe.model_dump(mode="python")

    def lines(prefix: str, items: dict) -> list[str]:
        return [f"# {k} (unset): {docs[prefix + k].description}" if _unset(k, v)
                else _toml_line(k, v) + (f"  # {comments[prefix + k]}" if comments and prefix + k in comments else "")
                for k, v in items.items()]

    out = lines("", {k: v for k, v in data.items() if not isinstance(v, dict)})
    for section, items in data.items():
        if isinstance(items, dict):
            out += ["", f"[{section}]", *lines(f"{section}.", items)]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class KeyDoc:
    """One recipe key as `ufgir recipes keys` lists it."""

    key: str          # dotted: "train.epochs"
    type: str         # "int", "bicubic | bilinear", "list of int or unset", ...
    default: Any      # the field's default (None: unset)
    description: str


def _type_name(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or unset" if type(None) in args else "")
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        kinds = list(dict.fromkeys(_type_name(a) for a in inner))
        return f"list of {' or '.join(kinds)}" if Ellipsis in args or origin is list else \
            f"{len(inner)} {' or '.join(kinds)}s"
    if origin is dict:
        return "table"
    return getattr(ann, "__name__", str(ann))


def recipe_keys() -> list[KeyDoc]:
    """Every recipe key, in the order the recipe declares them, with its type, default and description."""
    out = []
    for name, f in Recipe.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for key, g in ann.model_fields.items():
                default = g.get_default(call_default_factory=True)
                out.append(KeyDoc(f"{name}.{key}", _type_name(g.annotation), default, g.description or ""))
        else:
            out.append(KeyDoc(name, _type_name(ann), f.get_default(call_default_factory=True), f.description or ""))
    return out

