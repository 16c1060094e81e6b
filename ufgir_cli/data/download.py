"""`ufgir download`: fetch, check and unpack a catalog dataset into the dataset folder format.

Every source (a URL, a local archive, an extracted folder) ends the same way: the published files
are found in a scratch folder inside the data dir, labels and splits are read by the entry's scheme,
counts are checked against the catalog, the images are moved under ``images/`` and the split files
written, and only then is the folder renamed into place. An error or an interruption leaves what was
there before (nothing, or the old dataset) plus at most a resumable ``downloads/<archive>.part``.

Stdlib only (PIL is imported for ``verify`` alone): `ufgir datasets` stays instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from .. import __version__
from ..errors import DatasetError
from ..io import file_sha256
from ..paths import data_dir as default_data_dir
from .catalog import DatasetSpec, get_spec
from .folder import SPLITS, natural_key, read_info, read_split, write_dataset_folder

#: ``progress(stage, done, total)``; stages "download", "checksum" and "extract" count bytes,
#: "verify" counts images; ``total`` is None when unknown.
Progress = Callable[[str, int, int | None], None]
Status = Literal["missing", "ready", "incomplete"]

DOWNLOADS = "downloads"  # <data_dir>/downloads/: archives (kept: entries share them) and .part files
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_UFG_NAME = re.compile(r"(?P<label>\d+)_\d+_(?P<split>train|test)\.(?:png|jpe?g|bmp)", re.IGNORECASE)

_Row = tuple[int, Path, str]  # 0-based class id, source file, path under images/


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_dataset` did: ``created`` the folder, or found it ``present`` and left it."""

    name: str
    path: Path
    status: Literal["created", "present"]
    info: dict
    archive: Path | None = None  # the cached download, kept because several entries share one archive


def _no_progress(stage: str, done: int, total: int | None) -> None:
    """The default progress callback."""


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
    force: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
) -> DownloadResult:
    """Make ``<data_dir>/<name>/`` a complete dataset folder; a no-op (``present``) when it already is.

    ``url`` replaces the catalog's archive URL, ``archive`` is a local copy of the archive,
    ``from_folder`` an already-extracted copy (left untouched). ``force`` fetches and rebuilds even a
    complete folder; ``verify`` decodes every image and fails on any that cannot be read.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    progress = progress or _no_progress
    given = [opt for opt, v in (("--url", url), ("--archive", archive), ("--from-folder", from_folder)) if v]
    if len(given) > 1:
        raise DatasetError(f"{' and '.join(given)} name two sources for {spec.name}; pass only one")
    if spec.kind == "generated" and given:
        raise DatasetError(f"{spec.name} is generated on this machine, not downloaded; drop {given[0]}")
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
    return _build(spec, base, root, url, archive, from_folder, force, verify, progress)


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
    url: str | None,
    archive: str | os.PathLike | None,
    from_folder: str | os.PathLike | None,
    force: bool,
    verify: bool,
    progress: Progress,
) -> DownloadResult:
    base.mkdir(parents=True, exist_ok=True)
    cached: Path | None = None
    sha: str | None = None
    if from_folder is not None:
        folder = Path(from_folder).expanduser()
        if not folder.is_dir():
            raise DatasetError(
                f"--from-folder {folder} is not a folder; pass the folder the {spec.title} archive was extracted into"
            )
        source = str(folder.resolve())
    else:
        path, sha, source, cached = _obtain_archive(spec, base, url, archive, force, progress)
    with _scratch(base, spec.name) as tmp:
        if from_folder is None:
            top, transfer = tmp / "archive", os.replace
            extract_archive(path, top, progress)
        else:
            top, transfer = folder, _link_or_copy
        train_val, test, names = _read_labels(top, spec)
        _check_counts(spec, names, train_val, test, source)
        ds = tmp / "dataset"
        placed = _place(train_val + test, ds, transfer)
        meta = {
            "name": spec.name,
            "title": spec.title,
            "source": source,
            "archive_sha256": sha,
            "archive_sha256_verified": sha is not None and spec.sha256 is not None,
            "terms": spec.terms,
        }
        info = write_dataset_folder(ds, placed[: len(train_val)], placed[len(train_val) :], names, meta)
        if verify:
            _check_images(spec.name, ds, progress)
        if root.exists():  # --force: keep the old folder until the new one is complete
            os.replace(root, tmp / "previous")
        os.replace(ds, root)
    return DownloadResult(spec.name, root, "created", info, cached)


@contextlib.contextmanager
def _scratch(base: Path, name: str) -> Iterator[Path]:
    """A temporary folder in the data dir (one file system, so the final rename is atomic), always removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------- fetching


def _obtain_archive(
    spec: DatasetSpec,
    base: Path,
    url: str | None,
    archive: str | os.PathLike | None,
    force: bool,
    progress: Progress,
) -> tuple[Path, str, str, Path | None]:
    """The archive to unpack, its sha256, where it came from, and the cached copy (None for --archive)."""
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.is_file():
            raise DatasetError(
                f"--archive {path} is not a file; pass the {spec.title} archive you downloaded"
            )
        sha = file_sha256(path, lambda done, total: progress("checksum", done, total))
        if spec.sha256 and sha != spec.sha256:
            raise DatasetError(
                f"sha256 of {path} is {sha}, expected {spec.sha256} (the published {spec.title} archive); "
                "pass that archive, or an extracted copy with --from-folder"
            )
        return path, sha, str(path.resolve()), None
    url = url or spec.url
    if not url:
        raise DatasetError(f"{spec.name} has no download URL; pass --url, --archive or --from-folder")
    dest = base / DOWNLOADS / (spec.archive or spec.name)
    if force:
        dest.unlink(missing_ok=True)
        _part(dest).unlink(missing_ok=True)
    if dest.is_file():
        sha = file_sha256(dest, lambda done, total: progress("checksum", done, total))
        if not spec.sha256 or sha == spec.sha256:
            return dest, sha, url, dest
        dest.unlink()  # a damaged cached copy: fetch it again
    return dest, fetch(url, dest, spec.sha256, progress), url, dest


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


# ------------------------------------------------------------------------------------- extracting


def extract_archive(archive: Path, dest: Path, progress: Progress | None = None) -> None:
    """Unpack a zip or tar(.gz/.bz2/.xz) into ``dest`` member by member.

    Refuses, before writing it, any member that could land outside ``dest`` or is not a plain file
    or folder: absolute names, ``..`` components, symbolic and hard links, devices and fifos. The
    format is read from the bytes, not the file name, so a renamed or re-packed mirror still works.
    """
    progress = progress or _no_progress
    size = archive.stat().st_size
    try:
        with open(archive, "rb") as raw:

            def tick() -> None:
                progress("extract", raw.tell(), size)

            if zipfile.is_zipfile(raw):
                raw.seek(0)
                with zipfile.ZipFile(raw) as zf:
                    _unpack(_zip_members(zf), dest, archive, tick)
                return
            raw.seek(0)
            try:
                tf = tarfile.open(fileobj=raw, mode="r:*")
            except tarfile.ReadError:
                raise DatasetError(
                    f"{archive} is not a zip or tar(.gz/.bz2/.xz) archive, or it is truncated; "
                    "fetch it again with --force"
                ) from None
            with tf:
                _unpack(_tar_members(tf), dest, archive, tick)
    except OSError as e:
        if e.errno is not None:  # the file system, not the archive (gzip and bz2 errors carry no errno)
            raise DatasetError(
                f"cannot extract {archive.name} into {dest}: {e.strerror}; free space or fix permissions there"
            ) from None
        raise _corrupt(archive, e) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as e:
        raise _corrupt(archive, e) from None


def _corrupt(archive: Path, err: Exception) -> DatasetError:
    return DatasetError(
        f"cannot extract {archive}: it is truncated or corrupt ({' '.join(str(err).split()) or type(err).__name__}); "
        "fetch it again with --force"
    )


_Member = tuple[str, Literal["file", "dir", "link", "special"], Callable[[], IO[bytes]]]


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        ftype = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix type
        if ftype == stat.S_IFLNK:
            kind = "link"
        elif info.is_dir():
            kind = "dir"
        elif ftype not in (0, stat.S_IFREG):
            kind = "special"
        else:
            kind = "file"
        yield info.filename, kind, lambda info=info: zf.open(info)


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
    for m in tf:
        if m.issym() or m.islnk():
            kind = "link"
        elif m.isdir():
            kind = "dir"
        elif m.isreg():
            kind = "file"
        else:
            kind = "special"
        yield m.name, kind, lambda m=m: tf.extractfile(m)


def _unpack(members: Iterator[_Member], dest: Path, archive: Path, tick: Callable[[], None]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, kind, open_member in members:
        rel = _member_path(name, kind, archive)
        if rel is None:
            continue
        target = dest.joinpath(*rel.parts)
        if kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        tick()


def _member_path(name: str, kind: str, archive: Path) -> PurePosixPath | None:
    """The member's path inside the target, or a DatasetError for anything unsafe; None for ``./``."""
    why = None
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if kind == "link":
        why = "is a link"
    elif kind == "special":
        why = "is a device file or fifo"
    elif norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        why = "has an absolute path"
    elif ".." in parts:
        why = "climbs out of the target with '..'"
    if why:
        raise DatasetError(
            f"refusing to extract {archive.name}: member {name!r} {why}; use the official archive"
        )
    return PurePosixPath(*parts) if parts else None


# ---------------------------------------------------------------------------- labels and splits


def _read_labels(top: Path, spec: DatasetSpec) -> tuple[list[_Row], list[_Row], list[str]]:
    """Train_val rows, test rows and class names, read by the entry's labelling scheme."""
    reader = {"filename": _filename_labels, "anno": _anno_labels, "cub": _cub_labels}[spec.labels]
    return reader(_find_base(top, spec), spec)


def _find_base(top: Path, spec: DatasetSpec) -> Path:
    """The folder the layout is relative to; archives often wrap it in one or two folders."""
    if spec.labels == "filename":
        marker = spec.image_dir
    elif spec.labels == "anno":
        marker = f"R{spec.rounds[0]}/anno/train.txt" if spec.rounds else "anno/train.txt"
    else:
        marker = "image_class_labels.txt"
    level = [top]
    for _depth in range(4):
        for folder in level:
            if (folder / marker).exists():
                return folder
        level = sorted(c for f in level for c in f.iterdir() if c.is_dir() and c.name != "__MACOSX")
    raise DatasetError(
        f"found no {marker} in the {spec.name} source; is it the {spec.title} archive or folder?"
    )


def _filename_labels(base: Path, spec: DatasetSpec) -> tuple[list[_Row], list[_Row], list[str]]:
    """``<image_dir>/<label>_<index>_<train|test>.<ext>``; other files (notes, thumbnails) are ignored."""
    rows: dict[str, list[_Row]] = {"train": [], "test": []}
    for f in sorted((base / spec.image_dir).iterdir(), key=lambda p: natural_key(p.name)):
        m = _UFG_NAME.fullmatch(f.name)
        if m and f.is_file():
            where = f"{spec.image_dir}/{f.name}"
            rows[m["split"].lower()].append((_class_id(m["label"], where), f, where))
    return rows["train"], rows["test"], _label_names(rows)


def _anno_labels(base: Path, spec: DatasetSpec) -> tuple[list[_Row], list[_Row], list[str]]:
    """``[R<r>/]anno/{train,test}.txt`` lines ``<file> <label>``, files under ``[R<r>/]images/``.

    Pooled rounds keep the published label, so a cultivar has one class id in every round.
    """
    rows: dict[str, list[_Row]] = {"train": [], "test": []}
    for prefix in [f"R{r}/" for r in spec.rounds] or [""]:
        for split, out in rows.items():
            for where, file, label in _pairs(base, f"{prefix}anno/{split}.txt"):
                src = base / prefix / "images" / file
                if not src.is_file():
                    raise DatasetError(
                        f"{where}: {prefix}images/{file} is missing; the copy is incomplete, fetch it again with --force"
                    )
                out.append((_class_id(label, where), src, prefix + file))
    return rows["train"], rows["test"], _label_names(rows)


def _cub_labels(base: Path, spec: DatasetSpec) -> tuple[list[_Row], list[_Row], list[str]]:
    """CUB-200-2011: image ids joined across images.txt, image_class_labels.txt, train_test_split.txt."""
    classes = sorted((_int(label, where), name) for where, label, name in _pairs(base, "classes.txt"))
    names = [name for _, name in classes]
    if [label for label, _ in classes] != list(range(1, len(names) + 1)):
        raise DatasetError(
            f"classes.txt must number its classes 1..{len(names)} in order; the copy is damaged"
        )
    labels = {i: (where, label) for where, i, label in _pairs(base, "image_class_labels.txt")}
    is_train = {i: flag == "1" for _, i, flag in _pairs(base, "train_test_split.txt")}
    rows: dict[bool, list[_Row]] = {True: [], False: []}
    for where, i, rel in _pairs(base, "images.txt"):
        if i not in labels or i not in is_train:
            raise DatasetError(
                f"{where}: image {i} has no line in image_class_labels.txt or train_test_split.txt"
            )
        label_at, label = labels[i]
        cid = _class_id(label, label_at)
        if cid >= len(names):
            raise DatasetError(f"{label_at}: label {cid + 1} is not in classes.txt (1..{len(names)})")
        src = base / "images" / rel
        if not src.is_file():
            raise DatasetError(
                f"{where}: images/{rel} is missing; the copy is incomplete, fetch it again with --force"
            )
        rows[is_train[i]].append((cid, src, rel))
    return rows[True], rows[False], names


def _pairs(base: Path, rel: str) -> Iterator[tuple[str, str, str]]:
    """``(file:line, first, second)`` for each non-blank line of a two-column text file."""
    path = base / rel
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{rel} is missing from the dataset copy; fetch it again with --force") from None
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetError(f"{rel}:{n}: expected two fields, got {line.strip()!r}")
        yield f"{rel}:{n}", fields[0], fields[1]


def _int(text: str, where: str) -> int:
    if not text.isdigit():
        raise DatasetError(f"{where}: {text!r} is not a non-negative integer")
    return int(text)


def _class_id(label: str, where: str) -> int:
    """0-based class id of a published 1-based label."""
    n = _int(label, where)
    if n == 0:
        raise DatasetError(
            f"{where}: label 0, but published labels are 1-based; the copy is not the published one"
        )
    return n - 1


def _label_names(rows: dict[str, list[_Row]]) -> list[str]:
    """Class names are the published labels, "1" for class id 0, up to the largest label seen."""
    top = max((cid for split in rows.values() for cid, _, _ in split), default=-1)
    return [str(cid + 1) for cid in range(top + 1)]


def _check_counts(spec: DatasetSpec, names: list[str], train_val: list, test: list, source: str) -> None:
    found = {"classes": len(names), "train_val": len(train_val), "test": len(test)}
    expected = {"classes": spec.num_classes, "train_val": spec.train_val, "test": spec.test}
    diffs = [
        f"{k}: expected {expected[k]}{'' if k == 'classes' else ' images'}, found {found[k]}"
        for k in found
        if expected[k] is not None and expected[k] != found[k]
    ]
    if diffs:
        raise DatasetError(
            f"{spec.name} from {source} does not match the catalog ({'; '.join(diffs)}); "
            f"pass the complete published {spec.title} archive"
        )


def _place(rows: list[_Row], ds: Path, transfer: Callable[[Path, Path], object]) -> list[tuple[int, str]]:
    """Put each image at ``ds/images/<path>``; return ``(class id, path relative to ds)`` rows."""
    placed, seen = [], set()
    for cid, src, rel in rows:
        path = f"images/{rel}"
        if path in seen:
            raise DatasetError(f"{rel} is labelled twice (two lines or two splits); the label files disagree")
        seen.add(path)
        target = ds / path
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer(src, target)
        placed.append((cid, path))
    return placed


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on one file system (instant, no extra space), else copy; the source stays as is."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
