"""`ufgir recipes list|show|keys`: what recipes ship, what one resolves to, and what every key means."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from ._common import PlainCommand, PlainGroup, SetOpt, console, parse_sets

app = typer.Typer(cls=PlainGroup, no_args_is_help=True)


@app.command("list", cls=PlainCommand)
def list_recipes() -> None:
    """Packaged recipes: name, method, the method's family and a one-line description."""
    from ..methods import method_spec, plugins
    from ..recipe import load_recipe, packaged_recipe_names

    table = Table(title="packaged recipes", title_justify="left")
    table.add_column("name", style="bold cyan")
    table.add_column("method")
    table.add_column("family")
    table.add_column("description")
    for name in packaged_recipe_names():
        r = load_recipe(name, env=False)  # packaged recipes are valid; the environment is not theirs
        spec = method_spec(r.model.method)
        table.add_row(name, spec.name, spec.family, r.description or spec.description)
    for spec in plugins().values():  # no recipe of their own: any recipe with --set model.method=NAME
        table.add_row(f"(--set model.method={spec.name})", spec.name, spec.family,
                      escape(f"{spec.description} (plugin: {spec.origin})"))
    console.print(table)


@app.command("show", cls=PlainCommand)
def show(
    name: str = typer.Argument(..., help="Recipe name or TOML path."),
    sets: SetOpt = None,
) -> None:
    """Print the resolved recipe (defaults, file, UFGIR_* environment and --set applied) as TOML: every
    key, an unset one as a comment that says what it is, a set one with its source as a comment (the
    text loads as a recipe as printed)."""
    from ..recipe_docs import dump_every_key, recipe_sources

    text = dump_every_key(*recipe_sources(name, parse_sets(sets)))
    if console.is_terminal:
        console.print(Syntax(text, "toml", theme="ansi_dark", background_color="default",
                             code_width=max(map(len, text.splitlines()))), soft_wrap=True)
    else:  # redirected: `ufgir recipes show x > my.toml` must be the TOML itself, whatever COLUMNS says
        sys.stdout.write(text)


@app.command("keys", cls=PlainCommand)
def keys(
    prefix: str | None = typer.Argument(None, help="Only keys that start with this, e.g. train or model.ila",
                                        show_default=False),
) -> None:
    """Every recipe key: its type, default and what it does (set one with --set KEY=VALUE or
    UFGIR_SECTION__KEY); one key per line when piped."""
    from ..io import to_toml
    from ..recipe_docs import recipe_keys

    found = [k for k in recipe_keys() if prefix is None or k.key.startswith(prefix)]
    if not found:
        from ..errors import RecipeError

        sections = ", ".join(dict.fromkeys(k.key.split(".")[0] for k in recipe_keys()))
        raise RecipeError(f"no recipe key starts with {prefix!r}; sections: {sections}")
    table = Table(title="recipe keys" + (f" starting with {prefix}" if prefix else ""), title_justify="left")
    for col in ("key", "type", "default", "description"):
        table.add_column(col, style="bold cyan" if col == "key" else None)
    for k in found:
        default = "unset" if k.default is None or k.default == {} else \
            to_toml({"s": {"v": k.default}}).strip().splitlines()[-1].removeprefix("v = ")
        table.add_row(k.key, escape(k.type), escape(default), escape(k.description))
    console.print(table)
