"""`ufgir download`: get a catalog dataset into the dataset folder format (`ufgir datasets` lists
and verifies them)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import filesize
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn

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
        fmt = str if stage in ("convert", "hash", "verify") else filesize.decimal  # images there, bytes elsewhere
        amount = fmt(done) + (f"/{fmt(total)}" if total else "")
        self.progress.update(self.tasks[stage], completed=done, total=total, amount=amount)


class Origin(str, Enum):
    official = "official"
    mirror = "mirror"


def download(
    name: Annotated[str, typer.Argument(help="Dataset name (see `ufgir datasets`).", show_default=False)],
    url: Annotated[
        str | None, typer.Option(help="Fetch the archive from this URL of your own instead of the catalog's sources.")
    ] = None,
    source: Annotated[
        Origin | None,
        typer.Option(help="Try only the catalog's official sources, or only its mirrors (community copies)."),
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
    allow_overlap: Annotated[
        bool, typer.Option("--allow-overlap", help="Keep a mirror whose test images are also in its train_val "
                           "(recorded in dataset.json; every `ufgir train` on it says so).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line (name, status, path, source, counts) on stdout.")
    ] = False,
) -> None:
    """Download, check and unpack a dataset into <data-dir>/<name>/ (images, splits, classes, dataset.json)."""
    from ..data.download import download_dataset

    def run(progress, notify):
        return download_dataset(name, data_dir, url=url, archive=archive, from_folder=from_folder,
                                source=source.value if source else None, force=force, verify=verify,
                                allow_overlap=allow_overlap, progress=progress, notify=notify)

    report_result(name, run, as_json=as_json, verify=verify)


def report_result(name: str, run, *, as_json: bool, verify: bool) -> None:
    """Run ``run(progress, notify)`` (a download or `datasets add`) under progress bars and report it:
    for a person, or as one JSON line, on failure too (``"status": "failed"`` and the error)."""
    from ..errors import UfgirError

    columns = (TextColumn("{task.description:>9}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[amount]}"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bars:
        try:
            result = run(_Bars(bars), lambda line: bars.console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True))
        except UfgirError as e:
            if not as_json:
                raise
            print(json.dumps({"name": name, "status": "failed", "error": str(e)}))
            raise typer.Exit(e.exit_code) from None
    counts = result.info.get("counts", {})
    if as_json:
        keys = ("source", "origin", "archive_sha256", "num_classes", "counts", "integrity")
        summary = {"name": result.name, "status": result.status, "path": str(result.path)}
        print(json.dumps({**summary, **{k: result.info.get(k) for k in keys}, "verified": verify}))
        return
    _print_result(result.name, result)
    if verify:
        console.print(f"verified: all {counts.get('train_val', 0) + counts.get('test', 0)} images decode")


def _print_result(name: str, result) -> None:
    """What `download` tells a person about the folder it made (or found complete)."""
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
        console.print(f"from {result.info.get('source')}", soft_wrap=True, highlight=False)
    if result.info.get("split_rule"):
        console.print(f"test split by the rule: {result.info['split_rule']}", soft_wrap=True, highlight=False)
    if result.status == "present":
        return
    integ = result.info.get("integrity")
    if integ:
        dups = sum(d["images"] for d in integ["duplicates"].values())
        console.print(
            f"content: {integ['images']} images hashed ({integ['hashes']}); {dups} repeated within a split; "
            f"{integ['overlap']['test_images']} test images also in train_val", soft_wrap=True, highlight=False)
    sha = result.info.get("archive_sha256")
    if isinstance(sha, str) and not result.info.get("archive_sha256_verified"):
        console.print(
            f"archive sha256 {sha} (no published hash to check against; recorded in dataset.json)",
            soft_wrap=True,
        )
    if result.archive:
        console.print(
            f"archive kept at {result.archive} for entries that share it; delete it to free space",
            soft_wrap=True,
        )
