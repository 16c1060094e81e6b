"""A parquet copy of a dataset (one row per image: ``image``, ``label``, ``class_name``, ``split``) as
the same rows an archive gives, with the images written out as files.

Such copies are community mirrors whose ``split`` values and label base are not documented, so both
are read from the data: the split values are mapped onto the catalog's train_val / test by their
counts (a ``val`` carved out of ``train`` belongs to train_val; a value named like a split must land
there), labels may start at 0 or 1. A copy that fits no mapping is refused before one image is
written, naming the numbers. Val is carved anew by the official rule, whatever the copy's ``val``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ..errors import DatasetError
from .archive import unsafe_name
from .catalog import DatasetSpec
from .layouts import Row

Progress = Callable[[str, int, int | None], None]

_NAMED = {
    "train": "train_val", "training": "train_val", "val": "train_val", "valid": "train_val",
    "validation": "train_val", "train_val": "train_val", "trainval": "train_val",
    "test": "test", "testing": "test",
}  # fmt: skip
_MAGIC = {b"\x89PNG": ".png", b"\xff\xd8": ".jpg", b"BM": ".bmp", b"RIFF": ".webp", b"GIF8": ".gif"}
_BATCH = 64


def read_parquet(
    files: list[tuple[str, Path]], spec: DatasetSpec, out: Path, progress: Progress
) -> tuple[list[Row], list[Row], list[str]]:
    """Train_val rows, test rows and class names of parquet ``files``, images written under ``out``.

    ``files`` pairs each file with the folder its images go to under ``images/`` ("" or ``R<r>/``).
    """
    import pyarrow.parquet as pq

    tables = [(prefix, path, pq.read_table(path, columns=_columns(path, pq))) for prefix, path in files]
    splits = [str(s) for _, _, t in tables for s in t.column("split").to_pylist()]
    labels = [int(x) for _, _, t in tables for x in t.column("label").to_pylist()]
    to_split = map_splits(Counter(splits), spec)
    low = min(labels, default=0)
    if low not in (0, 1):
        raise DatasetError(f"{spec.name}: labels start at {low}, neither 0 nor 1; the copy is not the benchmark")
    names = _class_names(tables, low, spec)

    rows: dict[str, list[Row]] = {"train_val": [], "test": []}
    k = 0  # row index over all files, into splits and labels
    for prefix, path, _ in tables:
        j = 0  # row index in this file, for the names a copy does not give
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH, columns=["image"]):
            for image in batch.column("image").to_pylist():
                data, stored = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
                if not data:
                    raise DatasetError(f"{path.name}: row {j} holds no image bytes; the copy is damaged")
                rel = prefix + _file_name(stored, data, f"{splits[k]}_{j:06d}", spec)
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(target, "xb") as f:  # x: two rows with one name must not overwrite each other
                        f.write(data)
                except FileExistsError:
                    raise DatasetError(f"{spec.name}: two rows hold the image {rel}; the copy is damaged") from None
                rows[to_split[splits[k]]].append((labels[k] - low, target, rel))
                j, k = j + 1, k + 1
            progress("convert", k, len(labels))
    return rows["train_val"], rows["test"], names


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
    """Each ``split`` value -> "train_val" or "test": the one assignment whose sums are the catalog's."""
    values = sorted(counts)
    fits = []
    for choice in itertools.product(("train_val", "test"), repeat=len(values)):
        pick = dict(zip(values, choice, strict=True))
        sums = {s: sum(counts[v] for v in values if pick[v] == s) for s in ("train_val", "test")}
        named = all(_NAMED.get(v.lower(), pick[v]) == pick[v] for v in values)
        if named and sums == {"train_val": spec.train_val, "test": spec.test}:
            fits.append(pick)
    if len(fits) != 1:
        found = ", ".join(f"{v} {counts[v]}" for v in values) or "no rows"
        raise DatasetError(
            f"{spec.name}: the copy's splits ({found} images) do not make the catalog's "
            f"train_val {spec.train_val} / test {spec.test}; refusing it"
        )
    return fits[0]


def _class_names(tables: list, low: int, spec: DatasetSpec) -> list[str]:
    """Names by class id from ``class_name`` (the published label when the column is absent)."""
    seen: dict[int, str] = {}
    for _, _, t in tables:
        names = t.column("class_name").to_pylist() if "class_name" in t.column_names else [None] * t.num_rows
        for label, name in zip(t.column("label").to_pylist(), names, strict=True):
            cid = int(label) - low
            name = str(cid + 1) if name is None else str(name)
            if seen.setdefault(cid, name) != name:
                raise DatasetError(
                    f"{spec.name}: class {cid} is named both {seen[cid]!r} and {name!r}; the copy is damaged"
                )
    top = max(seen, default=-1)
    return [seen.get(cid, str(cid + 1)) for cid in range(top + 1)]


def _file_name(stored: str | None, data: bytes, fallback: str, spec: DatasetSpec) -> str:
    """The row's own file name (its last path part; the folders are the uploader's), else ``fallback``
    plus the extension the bytes say. A name that could leave the folder is refused, not repaired."""
    name = PurePosixPath(stored.replace("\\", "/")).name if stored else ""
    if not name:
        return fallback + next((ext for magic, ext in _MAGIC.items() if data.startswith(magic)), ".img")
    if why := unsafe_name(name):
        raise DatasetError(f"{spec.name}: a row's file name {stored!r} {why}; refusing the copy")
    return name
