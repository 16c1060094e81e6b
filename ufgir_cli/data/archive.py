"""Unpacking a dataset archive safely: zip or tar, member by member, nothing outside the target.

Archives come from mirrors and users' own copies, so every member name is untrusted input; so are
the file names in label lists and parquet rows, checked by :func:`unsafe_name` too.
"""

from __future__ import annotations

import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from ..errors import DatasetError
from .content import IMAGE_SUFFIXES

#: ``progress(stage, done, total)`` as `download_dataset` takes it; here the stage is "extract".
Progress = Callable[[str, int, int | None], None]
#: ``on_image(path)``: an image file was just written there (a :class:`~.content.Hasher`'s add).
OnImage = Callable[[Path], None]
_CHUNK = 1 << 20


#: How a damaged archive is fixed, whichever way it came: `--force` fetches a download again; a file of
#: the user's own (--archive) has to be got again by hand.
_AGAIN = "get it again (fetched by ufgir: the same command with --force fetches it anew; your own file: a complete copy)"

def extract_archive(archive: Path, dest: Path, progress: Progress, on_image: OnImage | None = None) -> None:
    """Unpack a zip or tar(.gz/.bz2/.xz) into ``dest`` member by member.

    Refuses, before writing it, any member that could land outside ``dest`` or is not a plain file
    or folder: absolute names, ``..`` components, symbolic and hard links, devices and fifos. The
    format is read from the bytes, not the file name, so a renamed or re-packed mirror still works.
    Each member named like an image (``IMAGE_SUFFIXES``) is also handed to ``on_image`` once written.
    """
    size = archive.stat().st_size
    try:
        with open(archive, "rb") as raw:

            def tick() -> None:
                progress("extract", raw.tell(), size)

            if zipfile.is_zipfile(raw):
                raw.seek(0)
                with zipfile.ZipFile(raw) as zf:
                    _unpack(_zip_members(zf), dest, archive, tick, on_image)
                return
            raw.seek(0)
            try:
                tf = tarfile.open(fileobj=raw, mode="r:*")
            except tarfile.ReadError:
                raise DatasetError(
                    f"{archive} is not a zip or tar(.gz/.bz2/.xz) archive, or it is truncated; {_AGAIN}"
                ) from None
            with tf:
                _unpack(_tar_members(tf), dest, archive, tick, on_image)
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
        f"{_AGAIN}"
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


def _unpack(
    members: Iterator[_Member], dest: Path, archive: Path, tick: Callable[[], None], on_image: OnImage | None
) -> None:
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
            if on_image is not None and target.suffix.lower() in IMAGE_SUFFIXES:
                on_image(target)
        tick()


def unsafe_name(name: str) -> str | None:
    """Why a file name from an untrusted list (an archive, ``anno/*.txt``, a parquet row) could land
    outside its folder, or None when it is a plain relative path."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        return "has an absolute path"
    if ".." in norm.split("/"):
        return "climbs out of the target with '..'"
    return None


def _member_path(name: str, kind: str, archive: Path) -> PurePosixPath | None:
    """The member's path inside the target, or a DatasetError for anything unsafe; None for ``./``."""
    why = {"link": "is a link", "special": "is a device file or fifo"}.get(kind) or unsafe_name(name)
    if why:
        raise DatasetError(
            f"refusing to extract {archive.name}: member {name!r} {why}; use the official archive"
        )
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None
