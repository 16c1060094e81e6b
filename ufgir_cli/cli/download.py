"""`ufgir download` and `ufgir datasets`: get a catalog dataset, and see which ones are on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import filesize
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from ._common import console, err_console

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Folder that holds the datasets (default: UFGIR_DATA_DIR or the user data dir)."
    ),
]


class _Bars:
    """One rich bar per stage of the library's ``progress(stage, done, total)`` callback."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, amount="")
        fmt = str if stage == "verify" else filesize.decimal  # "verify" counts images, the rest bytes
        amount = fmt(done) + (f"/{fmt(total)}" if total else "")
        self.progress.update(self.tasks[stage], completed=done, total=total, amount=amount)


def download(
    name: Annotated[str, typer.Argument(help="Dataset name (see `ufgir datasets`).", show_default=False)],
    url: Annotated[
        str | None, typer.Option(help="Fetch the archive from this URL instead of the catalog's.")
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(help="Use this local copy of the archive (zip or tar) instead of fetching it."),
    ] = None,
    from_folder: Annotated[
        Path | None,
        typer.Option("--from-folder", help="Use this already-extracted copy (it is left untouched)."),
    ] = None,
    data_dir: DataDirOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Fetch the archive again and rebuild even a complete dataset.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Decode every image and fail on unreadable ones.")
    ] = False,
) -> None:
    """Download, check and unpack a dataset into <data-dir>/<name>/ (images, splits, classes, dataset.json)."""
    from ..data.download import download_dataset

    columns = (
        TextColumn("{task.description:>9}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bars:
        result = download_dataset(
            name,
            data_dir,
            url=url,
            archive=archive,
            from_folder=from_folder,
            force=force,
            verify=verify,
            progress=_Bars(bars),
        )
    counts = result.info.get("counts", {})
    if result.status == "present":
        console.print(f"{name} is already complete at {result.path}; --force rebuilds it", soft_wrap=True)
    else:
        console.print(
            f"{name}: {result.info.get('num_classes')} classes, "
            f"{counts.get('train_val')} train_val ({counts.get('train')} train + {counts.get('val')} val) / "
            f"{counts.get('test')} test images -> {result.path}",
            soft_wrap=True,
        )
        sha = result.info.get("archive_sha256")
        if sha and not result.info.get("archive_sha256_verified"):
            console.print(
                f"archive sha256 {sha} (no published hash to check against; recorded in dataset.json)",
                soft_wrap=True,
            )
        if result.archive:
            console.print(
                f"archive kept at {result.archive} for entries that share it; delete it to free space",
                soft_wrap=True,
            )
    if verify:
        console.print(f"verified: all {counts.get('train_val', 0) + counts.get('test', 0)} images decode")


def datasets(data_dir: DataDirOpt = None) -> None:
    """The catalog: classes, images per split, and whether each dataset is on disk."""
    from ..data.catalog import CATALOG
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
    for spec in CATALOG.values():
        root = dataset_dir(spec.name, data_dir)
        status = dataset_status(spec, root)
        sizes = (spec.num_classes, spec.train_val, spec.test)
        if spec.kind == "generated":  # its size is whatever the generator made
            info = read_info(root) if status == "ready" else {}
            counts = info.get("counts", {})
            sizes = (info.get("num_classes"), counts.get("train_val"), counts.get("test"))
        cells = ["generated" if n is None else f"{n:,}" for n in sizes]
        table.add_row(spec.name, *cells, f"[{styles[status]}]{status}[/]", str(root))
    console.print(table)
