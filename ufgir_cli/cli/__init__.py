"""The `ufgir` command: this file only composes the command modules and holds the error boundary."""

from __future__ import annotations

import warnings
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import RecipeNotice, UfgirError
from ._common import PlainCommand, PlainGroup, debug_enabled, err_console


def _show_notice(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    if issubclass(category, RecipeNotice):
        err_console.print(f"[yellow]notice:[/] {escape(str(message))}", soft_wrap=True, emoji=False)
    else:
        _default(message, category, filename, lineno, file, line)


class _ErrorBoundary(PlainGroup):
    """Turn a :class:`UfgirError` from any (sub)command into one red line and its exit code, and a
    :class:`RecipeNotice` into one yellow line (each once per command)."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default", RecipeNotice)
                warnings.showwarning = _show_notice
                return super().invoke(ctx)
        except UfgirError as err:
            if debug_enabled():
                raise
            if err.exit_code >= 128:  # stopped by a signal (Ctrl-C, SIGTERM): not an error, the line says how to go on
                err_console.print(str(err), soft_wrap=True, markup=False, emoji=False)
            else:
                err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True, emoji=False)
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    name="ufgir",
    cls=_ErrorBoundary,
    help="Train and study Vision Transformers with parameter-efficient adapters (ILA) for "
    "ultra-fine-grained image recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"ufgir {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")] = None,
) -> None:
    pass  # the app's help is its Typer(help=...); this callback only holds --version


# Command modules hold the command bodies; they import torch only inside those bodies.
from . import backbone as _backbone  # noqa: E402
from . import compare as _compare  # noqa: E402
from . import datasets as _datasets  # noqa: E402
from . import download as _download  # noqa: E402
from . import eval as _eval  # noqa: E402
from . import hub as _hub  # noqa: E402
from . import inspect as _inspect  # noqa: E402
from . import metrics as _metrics  # noqa: E402
from . import recipes as _recipes  # noqa: E402
from . import reproduce as _reproduce  # noqa: E402
from . import serve as _serve  # noqa: E402
from . import ship as _ship  # noqa: E402
from . import sweep as _sweep  # noqa: E402
from . import train as _train  # noqa: E402
from . import visualize as _visualize  # noqa: E402

app.add_typer(_recipes.app, name="recipes", help="List and show the packaged recipes.")
app.command("inspect", cls=PlainCommand)(_inspect.inspect)
app.command("download", cls=PlainCommand)(_download.download)
app.add_typer(_datasets.app, name="datasets", help="The catalog of datasets; `verify NAME` checks a downloaded one.")
app.command("train", cls=PlainCommand)(_train.train)
app.command("eval", cls=PlainCommand)(_eval.eval_cmd)
app.command("sweep", cls=PlainCommand)(_sweep.sweep)
app.add_typer(_reproduce.app, name="reproduce", help="The paper's Table 1: every method x dataset swept, mean ± std over seeds.")
app.command("export", cls=PlainCommand)(_ship.export)
app.command("import-upstream", cls=PlainCommand)(_ship.import_upstream)
app.command("import-peft", cls=PlainCommand)(_ship.import_peft)
app.command("predict", cls=PlainCommand)(_ship.predict)
app.command("push", cls=PlainCommand)(_hub.push)
app.command("serve", cls=PlainCommand)(_serve.serve)
app.command("metrics", cls=PlainCommand)(_metrics.metrics)
app.add_typer(_visualize.app, name="visualize", help="Attention rollout, per-block attention, and what GLSim, RAMS, "
              "CAL, TransFG and FFVT select, drawn over images.")
app.command("compare", cls=PlainCommand)(_compare.compare)
app.command("pretrain-backbone", cls=PlainCommand)(_backbone.pretrain_backbone)


def main() -> None:
    app()
