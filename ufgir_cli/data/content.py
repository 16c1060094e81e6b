"""What an image is, not what it is called: three content hashes per image and the file that keeps them.

* ``bytes_sha256``: sha256 of the file's bytes; the same file under another name.
* ``pixels_sha256``: sha256 of the decoded RGB pixels (with their shape), decoded by
  :func:`decode_rgb`, the training loader's own decoder; the same picture re-encoded losslessly.
* ``phash``: a 64-bit DCT perceptual hash (the sign of the 8x8 lowest frequencies of the 32x32
  grey image against their median); a near copy such as a JPEG re-save is within a few bits, and is
  then confirmed by the pixels themselves (:func:`psnr`), since a hash alone can collide.

The hashes of a dataset folder go to ``hashes.csv`` beside ``dataset.json`` (one row per image:
``path,split,class_id,bytes_sha256,pixels_sha256,phash``). Decoding is what costs, so a
:class:`Hasher` spreads it over worker processes and takes each image as a source is unpacked:
hashing overlaps with unpacking instead of following it. No torch here; numpy and PIL are imported
where used.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import DatasetError
from ..io import atomic_open

HASHES_FILE = "hashes.csv"
HASH_COLUMNS = ("path", "split", "class_id", "bytes_sha256", "pixels_sha256", "phash")
_GREY = 32  # the DCT is taken over a 32x32 grey image
_LOW = 8  # of which the 8x8 lowest frequencies make the 64 bits
#: Files whose bytes are handed to a :class:`Hasher` as an archive is unpacked (a file it was not
#: handed is hashed from disk later, so this only decides what overlaps with unpacking).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class ImageHash:
    """The content hashes of one image; ``error`` (and no pixel hashes) when it does not decode."""

    bytes_sha256: str
    pixels_sha256: str | None = None
    phash: int | None = None
    error: str | None = None
    grey: bytes | None = field(default=None, repr=False, compare=False)  # the 32x32 grey image the DCT saw


def grey_psnr(a: ImageHash, b: ImageHash) -> float:
    """PSNR (dB) of two images' 32x32 grey thumbnails: a cheap first look before the pixels are compared."""
    import numpy as np

    if a.grey is None or b.grey is None:
        return float("inf")
    d = np.frombuffer(a.grey, np.uint8).astype(np.float32) - np.frombuffer(b.grey, np.uint8).astype(np.float32)
    mse = float(np.mean(d * d))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def decode_rgb(src, draft: int | None = None):
    """(H, W, 3) uint8 array of a file (path or binary file object), as the training loader decodes it.

    ``draft`` lets JPEG decode at a reduced scale (>= draft px a side): enough to prove the file
    decodes, at a fraction of the cost. Greyscale, palette, CMYK, 16-bit and animated files (first
    frame) are converted (:func:`_rgb`).
    """
    import numpy as np
    from PIL import Image

    with Image.open(src) as im:
        return np.asarray(_rgb(im, draft))


def _rgb(im, draft: int | None = None):
    """The RGB image of an open file, the one conversion behind :func:`decode_rgb` and :func:`hash_bytes`."""
    import numpy as np
    from PIL import Image

    im.seek(0)
    if draft is not None:
        im.draft(im.mode, (draft, draft))
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8), mode="L")
    if im.mode == "RGB":
        im.load()
        return im  # convert("RGB") would only copy it
    return im.convert("RGB")


def decode_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or garbled file raises (PIL's UnidentifiedImageError is an OSError)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _reason(err: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):  # its message names the in-memory file object, not the file
        return "not an image format Pillow can read"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def hash_bytes(data: bytes) -> ImageHash:
    """The three hashes of one image file's bytes, from one decode.

    The pixel hash is over the bytes :func:`decode_rgb`'s array holds (``tobytes`` of the RGB image is
    that array's buffer), so no array is made; the grey thumbnail is taken from the same image.
    """
    from PIL import Image

    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = _rgb(im)
            w, h = rgb.size
            pixels = hashlib.sha256(f"{h}x{w}x3:".encode())
            pixels.update(rgb.tobytes())
            grey = _grey(rgb)
    except decode_errors() as e:
        return ImageHash(digest, error=_reason(e))
    return ImageHash(digest, pixels.hexdigest(), _dct_bits(grey), error=None, grey=grey.tobytes())


def hash_file(path: str | os.PathLike) -> ImageHash:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return ImageHash("", error=e.strerror or type(e).__name__)
    return hash_bytes(data)


def hash_files(paths: list[Path], progress: Progress | None = None, workers: int | None = None) -> list[ImageHash]:
    """:func:`hash_file` of each path, in order, on ``workers`` processes (default: every core)."""
    with Hasher(workers) as hasher:
        return hasher.hashes(paths, progress)


def _hash_paths(paths: list[Path]) -> list[ImageHash]:
    """One worker's share: :func:`hash_file` of a batch of paths (one message each way for the batch)."""
    return [hash_file(p) for p in paths]


_BATCH = 16  # paths per message: few enough that every worker stays busy to the last batch
#: What a worker needs, imported once by the fork server rather than by each worker.
_PRELOAD = ["__main__", __name__, "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "numpy"]


@lru_cache(maxsize=1)
def _context():
    """Where the workers come from: a fork server that has imported :data:`_PRELOAD` once, so a pool
    starts in milliseconds and no worker inherits the parent's threads (a progress bar's, torch's);
    spawn where the platform has no fork server."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class Hasher:
    """Content hashes made in worker processes while a source is unpacked.

    Whatever writes the image files hands each one's path to :meth:`add` once the file is closed, so
    decoding runs beside unpacking rather than after it; a worker reads the file back from the page
    cache. Processes, not threads: decoding is mostly C that releases the GIL, yet on two cores the
    Python around it (Pillow's plugins, the unpacking loop) kept threads waiting on each other: 5,000
    PNGs took 7.4 s on threads and 6.0 s on processes (benchmarks/integrity.py, minutes apart, idle machine).
    :meth:`hashes` collects them in any order asked, hashing any file not handed over. The workers
    start on the first image and stop when the ``with`` block ends.

    Like everything built on :mod:`multiprocessing`, a script that calls this must keep its top-level
    work under ``if __name__ == "__main__":``.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._batch: list[Path] = []
        self._handed: dict[Path, tuple[Future[list[ImageHash]], int]] = {}

    def add(self, path: str | os.PathLike) -> None:
        """Hash the image just written to ``path``, in the background."""
        self._batch.append(Path(path))
        if len(self._batch) >= _BATCH:
            self._send()

    def _send(self) -> None:
        if not self._batch:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self._workers, mp_context=_context())
        batch, self._batch = self._batch, []
        future = self._pool.submit(_hash_paths, batch)
        for i, path in enumerate(batch):
            self._handed[path] = (future, i)

    def hashes(self, paths: list[Path], progress: Progress | None = None) -> list[ImageHash]:
        """The hashes of ``paths``, in order: those handed over, the rest hashed now."""
        self._send()
        for p in paths:
            if Path(p) not in self._handed:
                self.add(p)
        self._send()
        out = []
        for n, p in enumerate(paths, start=1):
            future, i = self._handed[Path(p)]
            try:
                out.append(future.result()[i])
            except BrokenProcessPool:
                raise DatasetError(
                    "a worker process hashing the images was killed (out of memory?); free memory and run the "
                    "command again"
                ) from None
            if progress is not None and (n % 64 == 0 or n == len(paths)):
                progress("hash", n, len(paths))
        return out

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, *exc) -> None:
        self._handed.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@lru_cache(maxsize=1)
def _dct_matrix():
    """The orthonormal DCT-II matrix for 32 samples: ``D @ x`` transforms a column."""
    import numpy as np

    k = np.arange(_GREY)[:, None]
    n = np.arange(_GREY)[None, :]
    d = np.cos(np.pi * (2 * n + 1) * k / (2 * _GREY)) * np.sqrt(2 / _GREY)
    d[0] /= np.sqrt(2)
    return d


def dct_hash(rgb) -> int:
    """64-bit perceptual hash of an (H, W, 3) uint8 image (bit 63 is the lowest frequency)."""
    from PIL import Image

    return _dct_bits(_grey(Image.fromarray(rgb)))


def _grey(rgb):
    """(32, 32) uint8 grey array of an RGB PIL image, each pixel the mean of its box (averaged in two steps:
    an integer-factor reduction, then boxes of that, a third faster and within 1 of one step)."""
    import numpy as np
    from PIL import Image

    return np.asarray(rgb.convert("L").resize((_GREY, _GREY), Image.Resampling.BOX, reducing_gap=1.0))


def _dct_bits(grey) -> int:
    import numpy as np

    d = _dct_matrix()
    coef = (d @ np.asarray(grey, dtype=np.float64) @ d.T)[:_LOW, :_LOW].ravel()  # (64,)
    bits = coef > np.partition(coef[1:], 31)[31]  # the median of the 63 (np.median's value); DC would dominate
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) of two uint8 RGB images; ``b`` is resized to ``a`` when they differ."""
    import numpy as np
    from PIL import Image

    if a.shape != b.shape:
        b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


# ------------------------------------------------------------------------------------ hashes.csv


def write_hashes(path: Path, rows: list[tuple[str, str, int, ImageHash]]) -> str:
    """Write ``hashes.csv`` (rows: path, split, class id, hashes) atomically; return the file's sha256."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HASH_COLUMNS)
    for rel, split, cid, h in rows:
        phash = "" if h.phash is None else f"{h.phash:016x}"
        w.writerow((rel, split, cid, h.bytes_sha256, h.pixels_sha256 or "", phash))
    data = buf.getvalue().encode("utf-8")
    with atomic_open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def read_hashes(path: Path) -> dict[str, str]:
    """``path -> bytes_sha256`` recorded in a ``hashes.csv``; only the byte hash is ever compared."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing; record it again with `ufgir datasets verify {path.parent.name} --record`") from None
    if not rows or tuple(rows[0]) != HASH_COLUMNS:
        raise DatasetError(f"{path}:1: expected header {','.join(HASH_COLUMNS)}; record it again with --record")
    return {row[0]: row[3] for row in rows[1:] if len(row) == len(HASH_COLUMNS)}
