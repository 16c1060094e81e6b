"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The new content goes to a temporary file beside the target (``.<name>.<random>.tmp``), is flushed
and fsynced, then renamed over the target; the folder is fsynced so the rename survives a power
cut. A process killed mid-write (SIGKILL, OOM killer) can leave only such a temp file behind:
:func:`remove_stale_temps` deletes those when a run is picked up again. Also here: :func:`to_toml`,
the writer for the two-level TOML files ufgir produces (recipes), since ``tomllib`` only reads, and
:func:`plural`, the count and noun of every "1 image" / "2 images" ufgir writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.
    On any error (disk full included) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed writers left in ``folder``; returns what was removed.

    Only for folders that one process writes at a time (a run folder when its run starts), since
    a concurrent writer's temp file looks the same.
    """
    removed = []
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; empty when the file is missing, unreadable, torn or holds no object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> None:
    """Write binary content through ``writer(file)`` atomically (e.g. ``torch.save``)."""
    with atomic_open(path, "wb") as f:
        writer(f)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Folder ``tmp`` becomes ``out``; an earlier ``out`` goes only once the new one is in place (a
    crash in between leaves it as ``.<name>.replaced`` beside, never half of each)."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.parent / f".{out.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def file_sha256(path: str | os.PathLike, on_chunk: Callable[[int, int], None] | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (archives run to gigabytes);
    ``on_chunk(done, total)`` reports progress in bytes."""
    h, done, total = hashlib.sha256(), 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            done += len(chunk)
            if on_chunk is not None:
                on_chunk(done, total)
    return h.hexdigest()


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (a plugin method's [model.options])
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """Write a two-level dict (top-level scalars, then one table per section). None is left out.
    ``comments`` (by dotted key) follow their value as ``# ...``; a None value with a comment is a
    comment line of its own."""
    comments = comments or {}

    def line(key: str, value: Any, dotted: str) -> list[str]:
        note = comments.get(dotted)
        if value is None:
            return [f"# {key}: {note}"] if note else []
        return [f"{key} = {_toml_value(value)}" + (f"  # {note}" if note else "")]

    lines = [x for k, v in data.items() if not isinstance(v, dict) for x in line(k, v, k)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [x for kk, vv in v.items() for x in line(kk, vv, f"{k}.{kk}")]
    return "\n".join(lines) + "\n"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: ``plural(1, "task")`` is "1 task", ``plural(2, "task")`` "2 tasks"
    (``nouns``: an irregular plural)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"
