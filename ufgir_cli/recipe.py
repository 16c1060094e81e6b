"""Recipes: one typed, frozen tree that says everything about a run.

Resolution order (later wins): field defaults -> recipe TOML -> ``UFGIR_*`` environment
(``__`` nests: ``UFGIR_TRAIN__EPOCHS=5``) -> ``--set a.b=value``. Unknown keys anywhere, including a
``UFGIR_*`` variable that names no key, are errors: a typo must never silently train the wrong model.

The defaults are the paper's ILA++ recipe (reference/ILA.md sections 3-4) at 224 px, with the
backbone's own numerics (mean/std, LayerNorm eps, resampling, resize: ``model.numerics``); packaged
recipes mostly just pick a method and ask for the reference's numerics. What the backbone decides
(depth-derived positions, numerics) is filled in on load where its name tells it, else at build, and
saved with the run. No torch here, so that ``ufgir recipes`` stays instant. This module is the whole
recipe, its sources, their resolution and its error messages; each section's keys and checks are
``recipe_sections.py``; how a recipe is described to a person (sources, every key, descriptions) is
``recipe_docs.py``.
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .errors import RecipeError, did_you_mean
from .io import to_toml
from .paths import NON_RECIPE_ENV
from .recipe_sections import (
    MEDIUM_PRESET,
    SAVED_RECIPE,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SweepConfig,
    TrainConfig,
    fill_numerics,
)


class _TomlSource(PydanticBaseSettingsSource):
    """The recipe file's contents, injected per load through a context variable."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _TOML_DATA.get() or {}


_TOML_DATA: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("ufgir_toml", default=None)
_USE_ENV: contextvars.ContextVar[bool] = contextvars.ContextVar("ufgir_use_env", default=True)


class Recipe(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UFGIR_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    description: str = Field("", description="What the recipe is for, in one line (`ufgir recipes list`).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    #: What a sweep of this recipe tries (not part of how one run trains: out of the run key).
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Highest priority first: --set overrides, environment, recipe file (defaults are implicit).
        sources = [init_settings, _TomlSource(settings_cls)]
        if _USE_ENV.get():
            sources.insert(1, env_settings)
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _augment_preset(cls, data: Any) -> Any:
        """``data.augment = "medium"`` brings the rest of the reference's medaugs, unless a key is set:
        label smoothing 0.1, and uniform stochastic depth 0.1 in place of the branch dropout."""
        sections = [data.get(k) if isinstance(data, dict) else None for k in ("data", "optim", "model")]
        if not isinstance(sections[0], dict) or sections[0].get("augment") != "medium" \
                or not all(isinstance(s, dict | None) for s in sections[1:]):
            return data  # not the preset, or malformed sections, which field validation reports
        data = {**data, "optim": dict(data.get("optim") or {}), "model": dict(data.get("model") or {})}
        for section, keys in MEDIUM_PRESET.items():
            for key, value in keys.items():
                data[section].setdefault(key, value)
        return data

    @model_validator(mode="before")
    @classmethod
    def _data_numerics(cls, data: Any) -> Any:
        """``data.resize_ratio`` and ``data.interpolation``, where unset, from ``model.numerics`` for the
        model's backbone (as the model section fills its own numerics)."""
        section = data.get("data", {}) if isinstance(data, dict) else None
        model = data.get("model", {}) if isinstance(data, dict) else None
        model = model.model_dump() if isinstance(model, BaseModel) else model
        if not isinstance(section, dict | BaseModel) or not isinstance(model, dict):
            return data  # malformed sections: reported by field validation
        section = section.model_dump() if isinstance(section, BaseModel) else dict(section)
        backbone = model.get("backbone", ModelConfig.model_fields["backbone"].default)
        if isinstance(backbone, str):
            numerics = model.get("numerics", ModelConfig.model_fields["numerics"].default)
            data = {**data, "data": fill_numerics(section, "data", backbone, numerics)}
        return data

    def with_model(self, model: ModelConfig, data_config: dict | None = None) -> Recipe:
        """This recipe with its model section as built (what the build derived from the backbone), and
        ``data.resize_ratio`` / ``data.interpolation`` where unset from the built model's ``data_config()``
        (its pretrained config's crop_pct and interpolation): what the run saves and its data pipeline uses."""
        update: dict[str, Any] = {"model": model}
        dc, fill = data_config or {}, {}
        if self.data.resize_ratio is None and dc.get("crop_pct"):
            fill["resize_ratio"] = 1.0 / float(dc["crop_pct"])
        if self.data.interpolation is None and dc.get("interpolation") in ("bicubic", "bilinear"):
            fill["interpolation"] = dc["interpolation"]
        if fill:
            update["data"] = self.data.model_copy(update=fill)
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _protocol(self) -> Recipe:
        if self.train.split == self.eval.split:
            raise ValueError(
                f"train.split and eval.split are both {self.train.split!r}; evaluate on a held-out split "
                "(train_val -> test for the paper protocol, train -> val for a search)"
            )
        return self


# --------------------------------------------------------------------------------------------
# Loading


def packaged_recipes_dir() -> Path:
    """Packaged recipes: `ufgir_cli/recipes` in a wheel, the repository's `recipes/` when editable."""
    try:
        p = Path(str(resources.files("ufgir_cli.recipes")))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "recipes"


def packaged_recipe_names() -> list[str]:
    return sorted(p.stem for p in packaged_recipes_dir().glob("*.toml"))


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A path as given if it exists, else a packaged recipe by bare name or `name.toml`."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_file():
        return p
    stem = s[:-5] if s.endswith(".toml") else s
    if "/" not in stem and os.sep not in stem:
        q = packaged_recipes_dir() / f"{stem}.toml"
        if q.is_file():
            return q
    known = ", ".join(packaged_recipe_names())
    raise RecipeError(f"recipe {s!r} not found{did_you_mean(stem, packaged_recipe_names())}: give a TOML file path "
                      f"or a packaged recipe ({known})")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"recipe file {path} cannot be read: {e.strerror}") from None
    if not data:  # an empty file would silently train every default
        raise RecipeError(f"recipe file {path} is empty; start from one with `ufgir recipes show quickstart > {path}`")
    return data


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, f in model.model_fields.items():
        out.add(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _field_paths(ann, prefix + name + ".")
    return out


def _is_sequence(ann: Any) -> bool:
    """A list/tuple/dict annotation (possibly optional): pydantic-settings reads those as JSON."""
    if typing.get_origin(ann) in (tuple, list, dict):
        return True
    return any(_is_sequence(a) for a in typing.get_args(ann)) if typing.get_origin(ann) in (typing.Union, types.UnionType) else False


def _check_env() -> None:
    """pydantic-settings ignores UFGIR_* variables that name no key, and names only the section when a
    list value is not JSON; we refuse both, naming the variable and the key."""
    known = {p.replace(".", "__").upper(): p for p in _field_paths(Recipe)}
    for var, value in os.environ.items():
        if not var.startswith("UFGIR_") or var in NON_RECIPE_ENV:
            continue
        key = known.get(var[6:].upper())
        if key is None:
            raise RecipeError(
                f"environment variable {var} names no recipe key; unset it or use "
                "UFGIR_<SECTION>__<KEY> (e.g. UFGIR_TRAIN__EPOCHS=5)"
            )
        section, _, leaf = key.rpartition(".")
        field = (Recipe.model_fields[section].annotation.model_fields if section else Recipe.model_fields)[leaf]
        if _is_sequence(field.annotation):
            try:
                json.loads(value)
            except ValueError:
                raise RecipeError(f"environment variable {var}: recipe key '{key}' takes a JSON list, "
                                  f"e.g. {var}='[1, 2]' (got {value!r})") from None


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) or len(err["loc"]) == 1)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            section = ".".join(str(x) for x in err["loc"][:-1])
            leaf = str(err["loc"][-1])
            parts.append(f"unknown recipe key {loc!r}{did_you_mean(leaf, _keys_of(section))}" + _suggest(section))
        elif "model." in msg or "train.split" in msg:
            parts.append(msg)
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            parts.append(f"recipe key {loc!r}{_env_source(loc, got)}: {msg}{shown}" if loc else msg)
    return "; ".join(parts)


def _keys_of(section: str) -> list[str]:
    """The keys allowed in a recipe section ("" for the top level); none for a path that is no section."""
    model = Recipe
    for part in filter(None, section.split(".")):
        ann = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _suggest(section: str) -> str:
    keys = _keys_of(section)
    if not keys:
        return ""
    return f"; allowed {'in [' + section + '] ' if section else 'at top level '}are: {', '.join(keys)}"


def _env_source(key: str, got: Any) -> str:
    """`` (from UFGIR_TRAIN__EPOCHS)`` when the bad value is the one an environment variable gives the key."""
    var = "UFGIR_" + key.replace(".", "__").upper()
    return f" (from environment variable {var})" if var in os.environ and os.environ[var] == str(got) else ""


def load_recipe(
    name_or_path: str | os.PathLike | None = None, overrides: dict | None = None, *, env: bool = True
) -> Recipe:
    """Validated recipe: defaults -> file -> UFGIR_* environment (when ``env``) -> ``overrides``."""
    data = _read_toml(resolve_recipe_path(name_or_path)) if name_or_path is not None else {}
    if env:
        _check_env()
    t1, t2 = _TOML_DATA.set(data), _USE_ENV.set(env)
    try:
        return Recipe(**(overrides or {}))
    except ValidationError as e:
        where = f" (recipe {name_or_path})" if name_or_path is not None else ""
        raise RecipeError(_format_validation(e) + where) from None
    except ValueError as e:  # pydantic-settings: an environment value that does not parse
        raise RecipeError(f"recipe environment: {e}") from None
    finally:
        _TOML_DATA.reset(t1)
        _USE_ENV.reset(t2)


def load_saved_recipe(path: str | os.PathLike) -> Recipe:
    """A run's `recipe.toml`, exactly as written: no environment layering, nothing derived again."""
    token = SAVED_RECIPE.set(True)
    try:
        return load_recipe(Path(path), env=False)
    finally:
        SAVED_RECIPE.reset(token)


def recipe_from_dict(data: dict) -> Recipe:
    """A recipe stored inside a checkpoint (already resolved): validate without environment."""
    t1, t2, t3 = _TOML_DATA.set({}), _USE_ENV.set(False), SAVED_RECIPE.set(True)
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise RecipeError("stored recipe: " + _format_validation(e)) from None
    finally:
        _TOML_DATA.reset(t1)
        _USE_ENV.reset(t2)
        SAVED_RECIPE.reset(t3)


def parse_overrides(items: list[str]) -> dict:
    """``["train.epochs=5", "model.ila_ds_locs=[3,7]"]`` -> nested dict; values parse as TOML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=5")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {p!r} is set both as a value and as a section")
        node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------
# Writing


def dump_resolved(recipe: Recipe, comments: dict[str, str] | None = None) -> str:
    """The resolved recipe as TOML; loading it back gives an equal recipe. An empty ``model.options``
    (every built-in method) is left out, so recipes saved before that key existed read the same.
    ``comments``: a note per dotted key (`recipe_sources`), written as TOML comments."""
    data = recipe.model_dump(mode="python")
    if not data["model"]["options"]:
        del data["model"]["options"]
    return to_toml(data, comments)
