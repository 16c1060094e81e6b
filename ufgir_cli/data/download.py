"""`ufgir download`: fetch, check and unpack a catalog dataset into the dataset folder format.

A dataset comes from the first of its catalog sources that a program can fetch (a plain URL, or a
file on the Hugging Face Hub through ``huggingface_hub``); one that fails is reported in one line
and the next is tried, and when none is left the error says how to get the official copy by hand.
``--url``, ``--archive`` and ``--from-folder`` name the one source to use instead.

Every source ends the same way: the published files are found in a scratch folder inside the data
dir (an archive unpacked, a parquet copy written out as image files), each image hashed by content
as it is written (``content.Hasher``, in worker processes beside the unpacking), labels and splits
are read by the layout the copy has, a split that copies another is dropped (``integrity.py``),
counts are checked against the catalog and train_val / test overlap against the source's origin,
the images are moved under ``images/``, the split files and ``hashes.csv`` written, and only then
is the folder renamed into place. An error or an interruption
leaves what was there before (nothing, or the old dataset) plus at most a resumable
``downloads/<archive>.part``. (Unpacking, the published layouts and the content checks live in
``archive.py``, ``layouts.py`` and ``integrity.py``; this module is the one sequence from source to
folder.)

Stdlib only at import (PIL, huggingface_hub and pyarrow are imported where used): `ufgir datasets`
stays instant.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import DatasetError
from ..io import file_sha256
from ..paths import data_dir as default_data_dir
from .archive import OnImage, extract_archive
from .catalog import USER_KIND, DatasetSpec, Source, catalog_name, get_spec, rebuild_command, user_spec
from .content import HASHES_FILE, Hasher, write_hashes
from .fetch import Unreachable, check_host, fetch, part_file
from .folder import SPLITS, read_info, write_dataset_folder
from .integrity import OverlapError, settle
from .layouts import Groups, link_or_copy, place, read_labels
from .own import read_user
from .verify import check_images

#: ``progress(stage, done, total)``; stages "download", "checksum" and "extract" count bytes,
#: "convert", "hash" and "verify" count images; ``total`` is None when unknown.
Progress = Callable[[str, int, int | None], None]
#: ``notify(line)``: a one-line note for the user (a source that failed, a mirror being used).
Notify = Callable[[str], None]
Status = Literal["missing", "ready", "incomplete"]

DOWNLOADS = "downloads"  # <data_dir>/downloads/: archives (kept: entries share them) and .part files


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_dataset` did: ``created`` the folder, or found it ``present`` and left it."""

    name: str
    path: Path
    status: Literal["created", "present"]
    info: dict
    archive: Path | None = None  # the cached download, kept because several entries share one archive


@dataclass
class _Copy:
    """A source made ready in the scratch folder: its rows, how to move them, what to record."""

    groups: Groups  # rows by the copy's own split names
    names: list[str]
    top: Path  # every image lies under it
    transfer: Callable[[Path, Path], object]
    meta: dict = field(default_factory=dict)
    archive: Path | None = None
    by_counts: bool = False  # split values mapped onto train_val / test by the catalog's counts (parquet)


@dataclass(frozen=True)
class _Checks:
    """What `_build` checks besides counts: decoding (``verify``), content hashes, leakage."""

    verify: bool = False
    hashing: bool = True
    allow_overlap: bool = False


def _no_progress(stage: str, done: int, total: int | None) -> None:
    """The default progress callback."""


def _no_notes(line: str) -> None:
    """The default notify callback."""


def _base(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def dataset_status(spec: DatasetSpec, root: Path) -> Status:
    """``ready`` when every file of the format is there and the recorded counts are the catalog's."""
    if not root.exists():
        return "missing"
    try:
        info = read_info(root)
    except DatasetError:
        return "incomplete"
    files = [root / "classes.csv", *(root / "splits" / f"{s}.csv" for s in SPLITS)]
    if not info or not all(f.is_file() for f in files):
        return "incomplete"
    counts = info.get("counts", {})
    found = (info.get("num_classes"), counts.get("train_val"), counts.get("test"))
    expected = (spec.num_classes, spec.train_val, spec.test)
    if any(e is not None and e != f for e, f in zip(expected, found, strict=True)):
        return "incomplete"
    return "ready"


def download_dataset(
    spec: DatasetSpec | str,
    data_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    archive: str | os.PathLike | None = None,
    from_folder: str | os.PathLike | None = None,
    source: Literal["official", "mirror"] | None = None,
    force: bool = False,
    verify: bool = False,
    allow_overlap: bool = False,
    hash_images: bool = True,
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> DownloadResult:
    """Make ``<data_dir>/<name>/`` a complete dataset folder; a no-op (``present``) when it already is.

    Without ``url`` / ``archive`` / ``from_folder`` the catalog's sources are tried in order,
    ``source`` keeping only the official ones or only the mirrors. ``url`` is an archive URL of your
    own, ``archive`` a local copy of the archive, ``from_folder`` an already-extracted copy (left
    untouched). ``force`` fetches and rebuilds even a complete folder; ``verify`` fails on any image
    that cannot be decoded. Every image is hashed by content (``hash_images=False`` skips it: the
    folder is then like one made before content checks, as the benchmark's baseline); a mirror whose
    test images are also in its train_val is refused unless ``allow_overlap``.
    """
    spec = get_spec(spec, data_dir) if isinstance(spec, str) else spec
    progress = progress or _no_progress
    notify = notify or _no_notes
    given = [opt for opt, v in (("--url", url), ("--archive", archive), ("--from-folder", from_folder)) if v]
    if len(given) > 1:
        raise DatasetError(f"{' and '.join(given)} name two sources for {spec.name}; pass only one")
    if spec.kind == "generated" and (given or source):
        raise DatasetError(
            f"{spec.name} is generated on this machine, not downloaded; drop {given[0] if given else '--source'}"
        )
    if given and source:
        raise DatasetError(f"--source picks among the catalog's sources, {given[0]} names your own; pass one")
    base = _base(data_dir)
    root = base / spec.name
    state = dataset_status(spec, root)
    if state == "ready" and not force:
        if verify:
            check_images(spec.name, root, progress)
        return DownloadResult(spec.name, root, "present", read_info(root))
    if spec.kind == USER_KIND and from_folder is None:
        raise DatasetError(f"{spec.name} is a dataset of your own, it has no source to fetch; re-create it with "
                           f"`{rebuild_command(spec.name, _old_info(root, spec))}`")
    if state == "incomplete" and not force:
        again = rebuild_command(spec.name, {**_old_info(root, spec), "source": str(from_folder or "") or None}
                                if spec.kind == USER_KIND else {})
        raise DatasetError(f"{root} exists but is not a complete {spec.name} dataset; re-create it with `{again}`")
    if spec.kind == "generated":
        result = _generate(spec, root)
        if verify:
            check_images(spec.name, result.path, progress)
        return result
    base.mkdir(parents=True, exist_ok=True)
    checks = _Checks(verify, hash_images, allow_overlap)
    if from_folder is not None:
        folder = Path(from_folder).expanduser()
        obtain = lambda tmp, on_image: _from_folder(spec, folder)  # noqa: E731
    elif archive is not None:
        obtain = lambda tmp, on_image: _from_archive(spec, Path(archive).expanduser(), tmp, progress, on_image)  # noqa: E731
    elif url is not None:
        obtain = lambda tmp, on_image: _from_url(spec, url, base, tmp, force, progress, on_image)  # noqa: E731
    else:
        return _from_catalog(spec, base, root, source, force, checks, progress, notify)
    return _build(spec, base, root, obtain, checks, progress, notify)


def add_dataset(
    name: str,
    source: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    test_fraction: float = 0.5,
    force: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> DownloadResult:
    """`ufgir datasets add`: make ``<data_dir>/<name>/`` from class folders or a CSV of the user's own
    (``own.py`` reads them and holds the split rule), checked like a download: content hashes,
    duplicates, test/train_val leakage (reported and recorded, not refused: the data is the user's).
    Its dataset.json says ``"kind": "user"``, which is how every command finds it by name."""
    if catalog_name(name) is not None:
        raise DatasetError(f"{name!r} is a catalog dataset (`ufgir download {catalog_name(name)}`); "
                           "give your own dataset another name")
    root = _base(data_dir) / name
    try:
        old = read_info(root)
    except DatasetError:
        old = {}
    if old and old.get("kind") != USER_KIND:
        raise DatasetError(f"{root} holds a dataset that `ufgir datasets add` did not make; give another name")
    src = Path(source).expanduser()
    if not src.exists():
        raise DatasetError(f"{src} does not exist; pass a folder of class folders or a .csv of path,label[,split]")
    return download_dataset(user_spec(name, test_fraction=test_fraction), data_dir, from_folder=src, force=force,
                            verify=verify, progress=progress, notify=notify)


def _old_info(root: Path, spec: DatasetSpec) -> dict:
    """What a user dataset's folder records about itself (its source), even when the folder is damaged."""
    try:
        return {"kind": spec.kind, **read_info(root)}
    except DatasetError:
        return {"kind": spec.kind}


def _from_catalog(
    spec: DatasetSpec,
    base: Path,
    root: Path,
    only: str | None,
    force: bool,
    checks: _Checks,
    progress: Progress,
    notify: Notify,
) -> DownloadResult:
    """Try the entry's fetchable sources in order; when all fail, say how to get the official copy
    (or, when a mirror was refused only for its overlap, say that: --allow-overlap accepts it)."""
    official = next((s for s in spec.sources if s.origin == "official"), None)
    tried, overlap = [], None
    for src in spec.sources:
        if src.fetch == "manual" or (only and src.origin != only):
            continue
        obtain = lambda tmp, on_image, src=src: _from_source(spec, src, base, tmp, force, progress, on_image)  # noqa: E731
        try:
            _check_reachable(src)
            if src.origin == "mirror":
                where = f"; the official one is {official.where}" if official else ""
                notify(f"{spec.name}: trying {src.where}, a community copy, not the authors'{where}")
            return _build(spec, base, root, obtain, checks, progress, notify)
        except OverlapError as e:
            overlap = e
            tried.append(src.repo or src.url)
        except Unreachable as e:  # offline: every other source would fail the same way, after its timeouts
            raise DatasetError(_by_hand(spec, only, [], why=str(e))) from None
        except DatasetError as e:
            tried.append(src.repo or src.url)
            notify(f"{spec.name}: {src.where} failed: {e}")
    if overlap is not None:
        raise overlap
    raise DatasetError(_by_hand(spec, only, tried))


def _check_reachable(src: Source) -> None:
    """:class:`Unreachable` at once when the source's host does not resolve (this machine is offline)."""
    if src.fetch == "url":
        check_host(src.url)
    else:
        from .hub import check_hub

        check_hub()


def _by_hand(spec: DatasetSpec, only: str | None, tried: list[str], why: str | None = None) -> str:
    """The one-line error when nothing could be fetched: the official link, the file, the command."""
    if why:
        what = why
    elif tried:
        what = f"could not fetch it from {', '.join(tried)}"
    else:
        what = f"no {only + ' ' if only else ''}source of it can be fetched by a program"
    manual = next((s for s in spec.sources if s.fetch == "manual"), None)
    where = f" from {manual.where}" if manual else ""
    return (
        f"{spec.name}: {what}; get {spec.archive} by hand{where}, then run "
        f"`ufgir download {spec.name} --archive {spec.archive}`, or `--from-folder DIR` with it extracted"
    )


def _generate(spec: DatasetSpec, root: Path) -> DownloadResult:
    """Generated entries come from :func:`ufgir_cli.data.synthetic.ensure_synthetic`, not an archive."""
    from .synthetic import ensure_synthetic

    if root.exists():
        shutil.rmtree(root)
    path = ensure_synthetic(root)
    return DownloadResult(spec.name, path, "created", read_info(path))


def _build(
    spec: DatasetSpec,
    base: Path,
    root: Path,
    obtain: Callable[[Path, OnImage | None], _Copy],
    checks: _Checks,
    progress: Progress,
    notify: Notify,
) -> DownloadResult:
    """Turn what ``obtain`` makes ready in a scratch folder into ``root``, checked, or leave nothing.

    ``obtain`` hands each image it writes to the hasher (``on_image``), so hashing runs while it unpacks.
    """
    with _scratch(base, spec.name) as tmp, (Hasher() if checks.hashing else contextlib.nullcontext()) as hasher:
        copy = obtain(tmp, hasher.add if hasher else None)
        got = settle(spec, copy.groups, copy.names, copy.meta, by_counts=copy.by_counts,
                     allow_overlap=checks.allow_overlap, hasher=hasher, verify=checks.verify,
                     progress=progress, notify=notify)
        ds = tmp / "dataset"
        placed = place(got.train_val + got.test, copy.top, ds, copy.transfer)
        meta = {"name": spec.name, "title": spec.title, **copy.meta, "terms": spec.terms}
        n = len(got.train_val)
        if got.record is not None:
            sides = ["train_val"] * n + ["test"] * len(got.test)
            rows = [(p, side, cid, h) for (cid, p), side, h in zip(placed, sides, got.hashes, strict=True)]
            meta["integrity"] = {**got.record, "hashes_sha256": write_hashes(ds / HASHES_FILE, rows)}
        info = write_dataset_folder(ds, placed[:n], placed[n:], copy.names, meta)
        if checks.verify and not checks.hashing:
            check_images(spec.name, ds, progress)
        if root.exists():  # --force: keep the old folder until the new one is complete
            os.replace(root, tmp / "previous")
        os.replace(ds, root)
    return DownloadResult(spec.name, root, "created", info, copy.archive)


# ---------------------------------------------------------------------------------------- sources


def _meta(source: str, origin: str, sha: str | list[str] | None, verified: bool = False) -> dict:
    return {"source": source, "origin": origin, "archive_sha256": sha, "archive_sha256_verified": verified}


def _from_folder(spec: DatasetSpec, folder: Path) -> _Copy:
    if spec.kind == USER_KIND:  # class folders or a CSV (`ufgir datasets add`)
        groups, names, top, extra = read_user(folder, spec)
        return _Copy(groups, names, top, link_or_copy, {**_meta(str(folder.resolve()), "user", None), **extra})
    if not folder.is_dir():
        raise DatasetError(
            f"--from-folder {folder} is not a folder; pass the folder the {spec.title} archive was extracted into"
        )
    groups, names = read_labels(folder, spec, f"pass a complete extracted copy of the {spec.title} archive")
    return _Copy(groups, names, folder, link_or_copy, _meta(str(folder.resolve()), "user", None))


def _unpacked(
    spec: DatasetSpec, path: Path, tmp: Path, progress: Progress, meta: dict, kept: Path | None, on_image: OnImage | None
) -> _Copy:
    top = tmp / "archive"
    extract_archive(path, top, progress, on_image)
    fetched = kept is not None or meta["origin"] != "user"
    again = "run the same command with --force to fetch it again" if fetched else \
        f"pass the complete published {spec.title} archive"
    groups, names = read_labels(top, spec, again)
    return _Copy(groups, names, top, os.replace, meta, kept)


def _from_archive(spec: DatasetSpec, path: Path, tmp: Path, progress: Progress, on_image: OnImage | None) -> _Copy:
    if not path.is_file():
        raise DatasetError(f"--archive {path} is not a file; pass the {spec.title} archive you downloaded")
    sha = file_sha256(path, lambda done, total: progress("checksum", done, total))
    if spec.sha256 and sha != spec.sha256:
        raise DatasetError(
            f"sha256 of {path} is {sha}, expected {spec.sha256} (the published {spec.title} archive); "
            "pass that archive, or an extracted copy with --from-folder"
        )
    meta = _meta(str(path.resolve()), "user", sha, spec.sha256 is not None)
    return _unpacked(spec, path, tmp, progress, meta, None, on_image)


def _from_url(
    spec: DatasetSpec, url: str, base: Path, tmp: Path, force: bool, progress: Progress, on_image: OnImage | None,
    origin: str = "user",
) -> _Copy:
    """An archive over plain HTTP(S), kept in ``downloads/`` (entries of one archive share it)."""
    dest = base / DOWNLOADS / (spec.archive or spec.name)
    if force:
        dest.unlink(missing_ok=True)
        part_file(dest).unlink(missing_ok=True)
    sha = None
    if dest.is_file():
        sha = file_sha256(dest, lambda done, total: progress("checksum", done, total))
        if spec.sha256 and sha != spec.sha256:
            dest.unlink()  # a damaged cached copy: fetch it again
            sha = None
    if sha is None:
        sha = fetch(url, dest, spec.sha256, progress)
    meta = _meta(url, origin, sha, spec.sha256 is not None)
    return _unpacked(spec, dest, tmp, progress, meta, dest, on_image)


def _from_source(
    spec: DatasetSpec, src: Source, base: Path, tmp: Path, force: bool, progress: Progress, on_image: OnImage | None
) -> _Copy:
    """A catalog source: a plain URL, or Hub files (one archive, or parquet files, one per round)."""
    if src.fetch == "url":
        return _from_url(spec, src.url, base, tmp, force, progress, on_image, src.origin)
    from .hub import hub_file

    got = [hub_file(src.repo, f, src.revision, progress, force) for f in src.files]
    where = ", ".join(f"hf://datasets/{src.repo}/{f}@{c}" for f, (_, c) in zip(src.files, got, strict=True))
    shas = [file_sha256(p, lambda done, total: progress("checksum", done, total)) for p, _ in got]
    meta = _meta(where, src.origin, shas[0] if len(shas) == 1 else shas)
    if src.format == "archive":
        return _unpacked(spec, got[0][0], tmp, progress, meta, None, on_image)
    from .parquet import read_parquet

    top = tmp / "parquet"
    groups, names = read_parquet(_by_round(spec, [path for path, _ in got]), spec, top, progress, on_image)
    return _Copy(groups, names, top, os.replace, meta, by_counts=True)


def _by_round(spec: DatasetSpec, paths: list[Path]) -> list[tuple[str, Path]]:
    """Per-round files with the folder each goes to (``R<r>/``), pooled in the catalog's round order
    (the round is read from the file name: ``..._R<r>_...``); one file without rounds goes to ""."""
    if not spec.rounds:
        return [("", p) for p in paths]
    found = {}
    for p in paths:
        m = re.search(r"(?:^|[^A-Za-z0-9])R(\d+)(?:[^0-9]|$)", p.name)
        if m is None or int(m[1]) not in spec.rounds or int(m[1]) in found:
            raise DatasetError(f"{spec.name}: cannot tell which round {p.name} holds; expected one file per round "
                               f"{', '.join(f'R{r}' for r in spec.rounds)}")
        found[int(m[1])] = p
    missing = [f"R{r}" for r in spec.rounds if r not in found]
    if missing:
        raise DatasetError(f"{spec.name}: no file for round {', '.join(missing)}; the copy is incomplete")
    return [(f"R{r}/", found[r]) for r in spec.rounds]


@contextlib.contextmanager
def _scratch(base: Path, name: str) -> Iterator[Path]:
    """A temporary folder in the data dir (one file system, so the final rename is atomic), always removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
