"""A parquet copy of a dataset (one row per image: ``image``, ``label``, ``class_name``, ``split``) as
the same rows an archive gives, with the images written out as files.

Such copies are community mirrors whose ``split`` values and label base are not documented, so both
are read from the data: the split values are mapped onto the catalog's train_val / test by their
counts (a ``val`` carved out of ``train`` belongs to train_val; a value named like a split must land
there), labels may start at 0 or 1. The mapping is made once the images are hashed and a split that
copies another is dropped (`integrity`); a copy that fits no mapping is refused, naming the numbers,
before anything reaches the data dir. Val is carved anew by the official rule, whatever the copy's
``val``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ..errors import DatasetError
from .archive import OnImage, unsafe_name
from .catalog import DatasetSpec
from .layouts import Groups, Labels

Progress = Callable[[str, int, int | None], None]

SPLIT_NAMES = {
    "train": "train_val", "training": "train_val", "val": "train_val", "valid": "train_val",
    "validation": "train_val", "train_val": "train_val", "trainval": "train_val",
    "test": "test", "testing": "test",
}  # fmt: skip
_MAGIC = {b"\x89PNG": ".png", b"\xff\xd8": ".jpg", b"BM": ".bmp", b"RIFF": ".webp", b"GIF8": ".gif"}
_BATCH = 64


def read_parquet(
    files: list[tuple[str, Path]], spec: DatasetSpec, out: Path, progress: Progress,
    on_image: OnImage | None = None,
) -> tuple[Groups, list[str]]:
    """The copy's splits (rows by its own ``split`` values) and class names, images written under ``out``.

    ``files`` pairs each file with the folder its images go to under ``images/`` ("" or ``R<r>/``),
    in the catalog's round order; each image is handed to ``on_image`` once written (a hasher's add).
    Which values make train_val and which test is decided by the caller, once copied splits are
    dropped (:func:`map_splits`).
    """
    import pyarrow.parquet as pq

    labels = Labels(spec.name)
    total = sum(pq.read_metadata(path).num_rows for _, path in files)
    k = 0  # row index over all files
    for prefix, path in files:
        table = pq.read_table(path, columns=_columns(path, pq))
        splits = [str(v) for v in table.column("split").to_pylist()]
        values = table.column("label").to_pylist()
        names = table.column("class_name").to_pylist() if "class_name" in table.column_names else [None] * len(values)
        j = 0  # row index in this file, for the names a copy does not give
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH, columns=["image"]):
            for image in batch.column("image").to_pylist():
                data, stored = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
                if not data:
                    raise DatasetError(f"{path.name}: row {j} holds no image bytes; the copy is damaged")
                rel = prefix + _file_name(stored, data, f"{splits[j]}_{j:06d}", spec)
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(target, "xb") as f:  # x: two rows with one name must not overwrite each other
                        f.write(data)
                except FileExistsError:
                    raise DatasetError(f"{spec.name}: two rows hold the image {rel}; the copy is damaged") from None
                if on_image is not None:
                    on_image(target)
                name = None if names[j] is None else str(names[j])
                labels.add(splits[j], int(values[j]), target, rel, f"{path.name} row {j}", name)
                j, k = j + 1, k + 1
            progress("convert", k, total)
    return labels.result()


def _columns(path: Path, pq) -> list[str]:
    have = pq.read_schema(path).names
    missing = [c for c in ("label", "split") if c not in have]
    if missing or "image" not in have:
        raise DatasetError(
            f"{path.name} has no {', '.join(missing or ['image'])} column (it has {', '.join(have)}); "
            "expected image, label, class_name, split"
        )
    return ["label", "split"] + (["class_name"] if "class_name" in have else [])


def map_splits(counts: Counter, spec: DatasetSpec) -> dict[str, str]:
    """Each ``split`` value -> "train_val" or "test": the one assignment whose sums are the catalog's.

    Runs after a split that copies another is dropped (``val`` = a copy of ``test`` in a mirror).
    """
    values = sorted(counts)
    fits = []
    for choice in itertools.product(("train_val", "test"), repeat=len(values)):
        pick = dict(zip(values, choice, strict=True))
        sums = {s: sum(counts[v] for v in values if pick[v] == s) for s in ("train_val", "test")}
        named = all(SPLIT_NAMES.get(v.lower(), pick[v]) == pick[v] for v in values)
        if named and sums == {"train_val": spec.train_val, "test": spec.test}:
            fits.append(pick)
    if len(fits) != 1:
        found = ", ".join(f"{v} {counts[v]}" for v in values) or "no rows"
        raise DatasetError(
            f"{spec.name}: the copy's splits ({found} images) do not make the catalog's "
            f"train_val {spec.train_val} / test {spec.test}; refusing it"
        )
    return fits[0]


def _file_name(stored: str | None, data: bytes, fallback: str, spec: DatasetSpec) -> str:
    """The row's own file name (its last path part; the folders are the uploader's), else ``fallback``
    plus the extension the bytes say. A name that could leave the folder is refused, not repaired."""
    name = PurePosixPath(stored.replace("\\", "/")).name if stored else ""
    if not name:
        return fallback + next((ext for magic, ext in _MAGIC.items() if data.startswith(magic)), ".img")
    if why := unsafe_name(name):
        raise DatasetError(f"{spec.name}: a row's file name {stored!r} {why}; refusing the copy")
    return name
