"""`ufgir datasets` (the catalog, which datasets are on disk, where each comes from) and
`ufgir datasets verify NAME`: can a downloaded dataset still be trusted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ._common import PlainCommand, PlainGroup, console, err_console
from .download import DataDirOpt, _Bars

app = typer.Typer(cls=PlainGroup, invoke_without_command=True)


@app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context, data_dir: DataDirOpt = None) -> None:
    """The catalog: classes, images per split, whether each dataset is on disk, and where it comes from.

    `ufgir datasets verify NAME` checks a downloaded one; `ufgir datasets add NAME --from-folder DIR` adds your own.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..data.catalog import CATALOG, get_spec, user_datasets
    from ..data.download import dataset_status
    from ..data.folder import read_info
    from ..paths import dataset_dir

    styles = {"ready": "green", "incomplete": "yellow", "missing": "dim"}
    table = Table(title="datasets", title_justify="left")
    table.add_column("name", style="bold cyan")
    for col in ("classes", "train_val", "test"):
        table.add_column(col, justify="right")
    table.add_column("status")
    table.add_column("path")
    own = [get_spec(name, data_dir) for name in user_datasets(data_dir)]  # `ufgir datasets add`
    for spec in [*CATALOG.values(), *own]:
        root = dataset_dir(spec.name, data_dir)
        status = dataset_status(spec, root)
        sizes = (spec.num_classes, spec.train_val, spec.test)
        if spec.kind in ("generated", "user"):  # its size is whatever the generator or the user's folder made
            info = read_info(root) if status == "ready" else {}
            counts = info.get("counts", {})
            sizes = (info.get("num_classes"), counts.get("train_val"), counts.get("test"))
        cells = [spec.kind if n is None else f"{n:,}" for n in sizes]
        table.add_row(spec.name, *cells, f"[{styles[status]}]{status}[/]", str(root))
    console.print(table)
    console.print("\nsources, in the order `ufgir download` tries them (by hand: get the file, then --archive):")
    about: dict[str, str] = {}
    for spec in CATALOG.values():
        for src in spec.sources:
            how = "by hand" if src.fetch == "manual" else "fetched"
            console.print(f"  {spec.name:<13} {src.origin:<8} {how:<7} {escape(src.where)}", soft_wrap=True, highlight=False)
            about[src.provenance] = src.terms
    console.print("\nwhere they are published, and their terms:")
    for provenance, terms in about.items():
        console.print(f"  {escape(provenance)}; terms: {escape(terms)}", soft_wrap=True, highlight=False)


@app.command("verify", cls=PlainCommand)
def verify(
    name: Annotated[str, typer.Argument(help="Dataset name (see `ufgir datasets`).", show_default=False)],
    data_dir: DataDirOpt = None,
    record: Annotated[bool, typer.Option(
        "--record", help="Hash a dataset downloaded before content checks now (hashes.csv, dataset.json).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as one JSON line on stdout.")] = False,
) -> None:
    """Check a downloaded dataset: counts, classes, every image decoded, duplicates and test/train_val
    overlap by content, and its files against the hashes recorded at download. Exit 1 when something is wrong."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from ..data.catalog import get_spec
    from ..data.verify import verify_dataset
    from ..paths import dataset_dir

    spec = get_spec(name, data_dir)
    root: Path = dataset_dir(spec.name, data_dir)
    columns = (TextColumn("{task.description:>9}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[amount]}"))
    with Progress(*columns, console=err_console, transient=True) as bars:
        result = verify_dataset(spec.name, root, record=record, progress=_Bars(bars))
    if as_json:
        print(json.dumps(result))
    else:
        _print(result)
    if not result["ok"]:
        raise typer.Exit(1)


def _print(r: dict) -> None:
    """The report for a person: one line per check, problems last."""
    def say(line: str) -> None:
        console.print(escape(line), soft_wrap=True, highlight=False)

    c = r["counts"]
    say(f"{r['name']}: {r['classes']} classes, {c['train_val']} train_val ({c['train']} train + {c['val']} val) / "
        f"{c['test']} test images at {r['path']}")
    say(f"decoded: {r['images'] - len(r['unreadable'])} of {r['images']} images")
    dups = r["duplicates"]
    say(f"duplicates by content: {dups['train_val']['images']} in train_val, {dups['test']['images']} in test")
    ov = r["overlap"]["test_images"]
    allowed = " (allowed with --allow-overlap at download)" if ov and r["allow_overlap"] else ""
    say(f"test images also in train_val: {ov}{allowed}" + (f", e.g. {r['overlap']['examples'][0]}" if ov else ""))
    for line in r["notes"]:
        say(line)
    if r.get("recorded"):
        say("recorded: hashes.csv and dataset.json now hold this folder's hashes")
    if r["ok"]:
        say("ok")
    for line in r["problems"]:
        err_console.print(f"[bold red]problem:[/] {escape(line)}", soft_wrap=True, highlight=False)


@app.command("add", cls=PlainCommand)
def add(
    name: Annotated[str, typer.Argument(help="A name of your own for it (letters, digits, _ . -).", show_default=False)],
    from_folder: Annotated[Path | None, typer.Option(
        "--from-folder", help="DIR/<class>/<images>, or DIR/train/<class>/... and DIR/test/<class>/... "
        "(left untouched; images are hard-linked or copied).", show_default=False)] = None,
    from_csv: Annotated[Path | None, typer.Option(
        "--from-csv", help="A CSV with the header path,label or path,label,split (paths relative to the CSV).",
        show_default=False)] = None,
    test_fraction: Annotated[float, typer.Option(
        "--test-fraction", min=0.0, max=1.0, help="Without a test split: the share of each class held out for test, "
        "spread evenly through its images in name order (see the README).")] = 0.5,
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild it even when it is complete.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Fail on any image that cannot be decoded.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line (name, status, path, counts) on stdout.")] = False,
) -> None:
    """Add a dataset of your own: class folders or a CSV, checked like a download (content hashes, duplicates,
    test images also in train_val), then `ufgir train --dataset NAME` uses it like a catalog one."""
    from ..data.download import add_dataset
    from ..errors import DatasetError
    from .download import report_result

    given = [s for s in (from_folder, from_csv) if s is not None]
    if len(given) != 1:
        raise DatasetError("pass exactly one of --from-folder DIR and --from-csv FILE")
    run = lambda progress, notify: add_dataset(name, given[0], data_dir, test_fraction=test_fraction,  # noqa: E731
                                                force=force, verify=verify, progress=progress, notify=notify)
    report_result(name, run, as_json=as_json, verify=verify)
