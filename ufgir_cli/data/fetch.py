"""Fetching one file over plain HTTP(S), resumable (HTTP Range), for `ufgir download`; and the one
check that ends an offline attempt at once: a host name that does not resolve (:func:`check_host`).

Stdlib only.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..errors import DatasetError
from ..paths import unresolvable

Progress = Callable[[str, int, int | None], None]

_CHUNK = 1 << 20
_TIMEOUT_S = 60


class Unreachable(DatasetError):
    """A source's host name does not resolve: this machine is offline (or its DNS is), so every other
    source of the same attempt fails too; the attempt ends at once with this one line."""


def check_host(url: str) -> None:
    """Raise :class:`Unreachable` when the host of ``url`` does not resolve (a quick local lookup,
    no connection): clients that retry (huggingface_hub backs off for tens of seconds) are not started."""
    why = unresolvable(url)
    if why is not None:
        raise Unreachable(f"{why}: this machine looks offline")


def _no_progress(stage: str, done: int, total: int | None) -> None:
    """The default progress callback."""


def part_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def fetch(url: str, dest: Path, sha256: str | None = None, progress: Progress | None = None) -> str:
    """Download ``url`` to ``dest`` through ``<dest>.part`` and return the file's sha256.

    The partial file survives an interruption, and the next call asks only for the rest (HTTP
    Range). A server that ignores Range answers 200 with the whole file, which then replaces the
    partial one; a 416 or a 206 for another offset drops the partial file and starts over. With
    ``sha256`` given, a mismatch deletes the download: a corrupt prefix must not be resumed.
    """
    progress = progress or _no_progress
    part = part_file(dest)
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
        if isinstance(reason, socket.gaierror):
            raise Unreachable(f"cannot reach {url} ({reason}); check the network or --url, or pass --archive FILE") \
                from None
        raise DatasetError(
            f"cannot reach {url} ({reason}); check the network or --url, or pass --archive FILE"
        ) from None


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    """The first byte of a 206 body from ``Content-Range: bytes <start>-<end>/<size>``."""
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None
