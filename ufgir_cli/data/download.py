"""`ufgir download`: fetch, check and unpack a catalog dataset into the dataset folder format.

A dataset comes from the first of its catalog sources that a program can fetch (a plain URL, or a
file on the Hugging Face Hub through ``huggingface_hub``); one that fails is reported in one line
and the next is tried, and when none is left the error says how to get the official copy by hand.
``--url``, ``--archive`` and ``--from-folder`` name the one source to use instead.

Every source ends the same way: the published files are found in a scratch folder inside the data
dir (an archive unpacked, a parquet copy written out as image files), labels and splits are read by
the layout the copy has, counts are checked against the catalog, the images are moved under
``images/`` and the split files written, and only then is the folder renamed into place. An error
or an interruption leaves what was there before (nothing, or the old dataset) plus at most a
resumable ``downloads/<archive>.part``. (Unpacking and the published layouts live in ``archive.py``
and ``layouts.py``; this module, a little over 450 lines, is the one sequence from source to folder.)

Stdlib only at import (PIL, huggingface_hub and pyarrow are imported where used): `ufgir datasets`
stays instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import __version__
from ..errors import DatasetError
from ..io import file_sha256
from ..paths import data_dir as default_data_dir
from .archive import extract_archive
from .catalog import DatasetSpec, Source, get_spec
from .folder import SPLITS, natural_key, read_info, read_split, write_dataset_folder
from .layouts import Row, check_counts, link_or_copy, place, read_labels

#: ``progress(stage, done, total)``; stages "download", "checksum" and "extract" count bytes,
#: "convert" and "verify" count images; ``total`` is None when unknown.
Progress = Callable[[str, int, int | None], None]
#: ``notify(line)``: a one-line note for the user (a source that failed, a mirror being used).
Notify = Callable[[str], None]
Status = Literal["missing", "ready", "incomplete"]

DOWNLOADS = "downloads"  # <data_dir>/downloads/: archives (kept: entries share them) and .part files
_CHUNK = 1 << 20
_TIMEOUT_S = 60


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

    train_val: list[Row]
    test: list[Row]
    names: list[str]
    top: Path  # every image lies under it
    transfer: Callable[[Path, Path], object]
    meta: dict = field(default_factory=dict)
    archive: Path | None = None


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
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> DownloadResult:
    """Make ``<data_dir>/<name>/`` a complete dataset folder; a no-op (``present``) when it already is.

    Without ``url`` / ``archive`` / ``from_folder`` the catalog's sources are tried in order,
    ``source`` keeping only the official ones or only the mirrors. ``url`` is an archive URL of your
    own, ``archive`` a local copy of the archive, ``from_folder`` an already-extracted copy (left
    untouched). ``force`` fetches and rebuilds even a complete folder; ``verify`` decodes every image
    and fails on any that cannot be read.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
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
            _check_images(spec.name, root, progress)
        return DownloadResult(spec.name, root, "present", read_info(root))
    if state == "incomplete" and not force:
        raise DatasetError(
            f"{root} exists but is not a complete {spec.name} dataset; "
            f"re-create it with `ufgir download {spec.name} --force`"
        )
    if spec.kind == "generated":
        result = _generate(spec, root)
        if verify:
            _check_images(spec.name, result.path, progress)
        return result
    base.mkdir(parents=True, exist_ok=True)
    if from_folder is not None:
        folder = Path(from_folder).expanduser()
        obtain = lambda tmp: _from_folder(spec, folder)  # noqa: E731
    elif archive is not None:
        obtain = lambda tmp: _from_archive(spec, Path(archive).expanduser(), tmp, progress)  # noqa: E731
    elif url is not None:
        obtain = lambda tmp: _from_url(spec, url, base, tmp, force, progress)  # noqa: E731
    else:
        return _from_catalog(spec, base, root, source, force, verify, progress, notify)
    return _build(spec, base, root, obtain, verify, progress)


def _from_catalog(
    spec: DatasetSpec,
    base: Path,
    root: Path,
    only: str | None,
    force: bool,
    verify: bool,
    progress: Progress,
    notify: Notify,
) -> DownloadResult:
    """Try the entry's fetchable sources in order; when all fail, say how to get the official copy."""
    official = next((s for s in spec.sources if s.origin == "official"), None)
    tried = []
    for src in spec.sources:
        if src.fetch == "manual" or (only and src.origin != only):
            continue
        if src.origin == "mirror":
            where = f"; the official one is {official.where}" if official else ""
            notify(f"{spec.name}: trying {src.where}, a community copy, not the authors'{where}")
        obtain = lambda tmp, src=src: _from_source(spec, src, base, tmp, force, progress)  # noqa: E731
        try:
            return _build(spec, base, root, obtain, verify, progress)
        except DatasetError as e:
            tried.append(src.repo or src.url)
            notify(f"{spec.name}: {src.where} failed: {e}")
    raise DatasetError(_by_hand(spec, only, tried))


def _by_hand(spec: DatasetSpec, only: str | None, tried: list[str]) -> str:
    """The one-line error when nothing could be fetched: the official link, the file, the command."""
    if tried:
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
    obtain: Callable[[Path], _Copy],
    verify: bool,
    progress: Progress,
) -> DownloadResult:
    """Turn what ``obtain`` makes ready in a scratch folder into ``root``, checked, or leave nothing."""
    with _scratch(base, spec.name) as tmp:
        copy = obtain(tmp)
        check_counts(spec, copy.names, copy.train_val, copy.test, copy.meta["source"])
        ds = tmp / "dataset"
        placed = place(copy.train_val + copy.test, copy.top, ds, copy.transfer)
        meta = {"name": spec.name, "title": spec.title, **copy.meta, "terms": spec.terms}
        n = len(copy.train_val)
        info = write_dataset_folder(ds, placed[:n], placed[n:], copy.names, meta)
        if verify:
            _check_images(spec.name, ds, progress)
        if root.exists():  # --force: keep the old folder until the new one is complete
            os.replace(root, tmp / "previous")
        os.replace(ds, root)
    return DownloadResult(spec.name, root, "created", info, copy.archive)


# ---------------------------------------------------------------------------------------- sources


def _meta(source: str, origin: str, sha: str | list[str] | None, verified: bool = False) -> dict:
    return {"source": source, "origin": origin, "archive_sha256": sha, "archive_sha256_verified": verified}


def _from_folder(spec: DatasetSpec, folder: Path) -> _Copy:
    if not folder.is_dir():
        raise DatasetError(
            f"--from-folder {folder} is not a folder; pass the folder the {spec.title} archive was extracted into"
        )
    train_val, test, names = read_labels(folder, spec)
    return _Copy(train_val, test, names, folder, link_or_copy, _meta(str(folder.resolve()), "user", None))


def _unpacked(
    spec: DatasetSpec, path: Path, tmp: Path, progress: Progress, meta: dict, kept: Path | None
) -> _Copy:
    top = tmp / "archive"
    extract_archive(path, top, progress)
    train_val, test, names = read_labels(top, spec)
    return _Copy(train_val, test, names, top, os.replace, meta, kept)


def _from_archive(spec: DatasetSpec, path: Path, tmp: Path, progress: Progress) -> _Copy:
    if not path.is_file():
        raise DatasetError(f"--archive {path} is not a file; pass the {spec.title} archive you downloaded")
    sha = file_sha256(path, lambda done, total: progress("checksum", done, total))
    if spec.sha256 and sha != spec.sha256:
        raise DatasetError(
            f"sha256 of {path} is {sha}, expected {spec.sha256} (the published {spec.title} archive); "
            "pass that archive, or an extracted copy with --from-folder"
        )
    meta = _meta(str(path.resolve()), "user", sha, spec.sha256 is not None)
    return _unpacked(spec, path, tmp, progress, meta, None)


def _from_url(
    spec: DatasetSpec, url: str, base: Path, tmp: Path, force: bool, progress: Progress, origin: str = "user"
) -> _Copy:
    """An archive over plain HTTP(S), kept in ``downloads/`` (entries of one archive share it)."""
    dest = base / DOWNLOADS / (spec.archive or spec.name)
    if force:
        dest.unlink(missing_ok=True)
        _part(dest).unlink(missing_ok=True)
    sha = None
    if dest.is_file():
        sha = file_sha256(dest, lambda done, total: progress("checksum", done, total))
        if spec.sha256 and sha != spec.sha256:
            dest.unlink()  # a damaged cached copy: fetch it again
            sha = None
    if sha is None:
        sha = fetch(url, dest, spec.sha256, progress)
    meta = _meta(url, origin, sha, spec.sha256 is not None)
    return _unpacked(spec, dest, tmp, progress, meta, dest)


def _from_source(
    spec: DatasetSpec, src: Source, base: Path, tmp: Path, force: bool, progress: Progress
) -> _Copy:
    """A catalog source: a plain URL, or Hub files (one archive, or parquet files, one per round)."""
    if src.fetch == "url":
        return _from_url(spec, src.url, base, tmp, force, progress, src.origin)
    from .hub import hub_file

    got = [hub_file(src.repo, f, src.revision, progress, force) for f in src.files]
    where = ", ".join(f"hf://datasets/{src.repo}/{f}@{c}" for f, (_, c) in zip(src.files, got, strict=True))
    shas = [file_sha256(p, lambda done, total: progress("checksum", done, total)) for p, _ in got]
    meta = _meta(where, src.origin, shas[0] if len(shas) == 1 else shas)
    if src.format == "archive":
        return _unpacked(spec, got[0][0], tmp, progress, meta, None)
    from .parquet import read_parquet

    prefixes = [f"R{r}/" for r in spec.rounds] if spec.rounds else [""]
    top = tmp / "parquet"
    train_val, test, names = read_parquet(
        [(prefix, path) for prefix, (path, _) in zip(prefixes, got, strict=True)], spec, top, progress
    )
    return _Copy(train_val, test, names, top, os.replace, meta)


@contextlib.contextmanager
def _scratch(base: Path, name: str) -> Iterator[Path]:
    """A temporary folder in the data dir (one file system, so the final rename is atomic), always removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------- fetching


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def fetch(url: str, dest: Path, sha256: str | None = None, progress: Progress | None = None) -> str:
    """Download ``url`` to ``dest`` through ``<dest>.part`` and return the file's sha256.

    The partial file survives an interruption, and the next call asks only for the rest (HTTP
    Range). A server that ignores Range answers 200 with the whole file, which then replaces the
    partial one; a 416 or a 206 for another offset drops the partial file and starts over. With
    ``sha256`` given, a mismatch deletes the download: a corrupt prefix must not be resumed.
    """
    progress = progress or _no_progress
    part = _part(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        have = part.stat().st_size if part.is_file() else 0
        resp = _open(url, have)
        if resp is None:  # the server cannot serve the rest of this partial file
            part.unlink()
            continue
        with resp:
            start = _range_start(resp) if resp.status == 206 else 0
            if start not in (0, have):
                part.unlink()
                continue
            h = hashlib.sha256()
            if start:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            done = start
            with open(part, "ab" if start else "wb") as f:
                try:
                    while chunk := resp.read(_CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        progress("download", done, total)
                except (OSError, http.client.HTTPException) as e:
                    raise DatasetError(
                        f"download of {url} stopped at {done} bytes ({e}); run the same command again to resume"
                    ) from None
            if total is not None and done < total:
                raise DatasetError(
                    f"download of {url} stopped at {done} of {total} bytes; run the same command again to resume"
                )
        break
    else:
        raise DatasetError(
            f"{url} does not serve the file consistently; try again later or pass --archive FILE"
        )
    actual = h.hexdigest()
    if sha256 and actual != sha256:
        part.unlink()
        raise DatasetError(
            f"sha256 of {url} is {actual}, expected {sha256}; the download was deleted: "
            "run again to fetch it anew, or check --url"
        )
    os.replace(part, dest)
    return actual


def _open(url: str, have: int) -> http.client.HTTPResponse | None:
    """GET ``url`` from byte ``have`` on; None when the server answers 416 to that range."""
    headers = {"User-Agent": f"ufgir/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return None
        raise DatasetError(
            f"download of {url} failed: HTTP {e.code} {e.reason}; check --url or pass --archive FILE"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetError(
            f"cannot reach {url} ({reason}); check the network or --url, or pass --archive FILE"
        ) from None


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    """The first byte of a 206 body from ``Content-Range: bytes <start>-<end>/<size>``."""
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


# -------------------------------------------------------------------------------------- verifying


def verify_images(root: Path, progress: Progress | None = None) -> list[str]:
    """Decode every image of the train_val and test splits; return the unreadable ones, relative to ``root``."""
    from PIL import Image

    progress = progress or _no_progress
    files = sorted(
        {
            Path(p)
            for split in ("train_val", "test")
            for p, _ in read_split(root, split, check_files=False).samples
        },
        key=lambda p: natural_key(p.as_posix()),
    )
    bad = []
    for n, path in enumerate(files, start=1):
        try:
            with Image.open(path) as im:
                im.load()
        except Exception:  # any decoder failure (OSError, SyntaxError, ValueError, ...) means unreadable
            bad.append(path.relative_to(root).as_posix())
        progress("verify", n, len(files))
    return bad


def _check_images(name: str, root: Path, progress: Progress) -> None:
    bad = verify_images(root, progress)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DatasetError(
            f"{name}: {len(bad)} images cannot be decoded: {shown}; fetch a fresh copy with `ufgir download {name} --force`"
        )
