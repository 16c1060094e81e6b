"""`ufgir recipes list|show`: what recipes ship, and what one resolves to."""

from __future__ import annotations

import typer
from rich.syntax import Syntax
from rich.table import Table

from ._common import SetOpt, console, parse_sets

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_recipes() -> None:
    """Packaged recipes: name, method, the method's family and a one-line description."""
    from ..methods import METHODS
    from ..recipe import load_recipe, packaged_recipe_names

    table = Table(title="packaged recipes", title_justify="left")
    table.add_column("name", style="bold cyan")
    table.add_column("method")
    table.add_column("family")
    table.add_column("description")
    for name in packaged_recipe_names():
        r = load_recipe(name, env=False)  # packaged recipes are valid; the environment is not theirs
        spec = METHODS[r.model.method]
        table.add_row(name, spec.name, spec.family, r.description or spec.description)
    console.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Recipe name or TOML path."),
    sets: SetOpt = None,
) -> None:
    """Print the resolved recipe (defaults, file, UFGIR_* environment and --set applied) as TOML."""
    from ..recipe import dump_resolved, load_recipe

    recipe = load_recipe(name, parse_sets(sets))
    console.print(Syntax(dump_resolved(recipe), "toml", theme="ansi_dark", background_color="default"))
