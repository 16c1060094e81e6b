"""A dataset of the user's own, as `ufgir datasets add NAME` reads it: class folders or a CSV.

Two forms (:func:`read_user`):

``--from-folder DIR``  one folder per class, ``DIR/<class>/**/<image>``; or split folders above them,
                       ``DIR/train/<class>/...`` and ``DIR/test/<class>/...`` (``val/`` too; any name
                       `ufgir download` accepts for a split: train, training, val, validation, test, ...).
``--from-csv FILE``    rows ``path,label`` or ``path,label,split`` under that header; paths relative to
                       the CSV's folder, labels are class names.

Class ids follow the class names in natural-sort order (``leaf_2`` before ``leaf_10``). Images are
the files with an image suffix (``content.IMAGE_SUFFIXES``); hidden files and other files are left out.

Without a test split, the split rule holds out a share ``f`` (``--test-fraction``, default 0.5, as
the UFG benchmarks split each class in halves) of every class, spread evenly through it: the class's
images in natural-sort order of their path, image ``i`` (0-based) goes to test when
``floor((i + 1) * f) > floor(i * f)``. A class of ``n`` images gets ``floor(n * f)`` test images (with
0.5: the 2nd, 4th, ... image), never its first image; the rule depends on the names alone, so the
same folder always splits the same way. Every class needs a train and a test image.

The rows this returns go through the same path as a download (:func:`.download._build`): content
hashes, duplicates and test/train_val leakage are checked and recorded in ``dataset.json``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..errors import DatasetError
from .catalog import DatasetSpec
from .content import IMAGE_SUFFIXES
from .folder import natural_key
from .layouts import Groups, Labels
from .parquet import SPLIT_NAMES

Row = tuple[str, Path, str, str]  # split, source file, path under images/, class name


def read_user(source: Path, spec: DatasetSpec) -> tuple[Groups, list[str], Path, dict]:
    """``(rows per split, class names, the folder every image lies under, what dataset.json records)``."""
    if source.is_file() and source.suffix.lower() == ".csv":
        rows, top = _csv_rows(source), source.parent
        how = "csv"
    elif source.is_dir():
        rows, top, how = _folder_rows(source), source, "folder"
    else:
        raise DatasetError(f"{source} is neither a folder of class folders nor a .csv file of path,label[,split] "
                           "rows; pass one of those")
    if not rows:
        raise DatasetError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders; "
                           "expected DIR/<class>/<image> or DIR/train/<class>/... and DIR/test/<class>/...")
    names = sorted({name for *_, name in rows}, key=natural_key)
    if len(names) < 2:
        raise DatasetError(f"{source} holds one class ({names[0]!r}); a classifier needs at least two class folders")
    meta = {"kind": "user", "layout": how}
    if not any(SPLIT_NAMES.get(split) == "test" for split, *_ in rows):  # no test split given: the rule makes one
        rows = _hold_out(rows, spec.test_fraction, source)
        meta["test_fraction"] = spec.test_fraction
        meta["split_rule"] = (f"per class, natural-sort order of the path; image i to test when "
                              f"floor((i+1)*{spec.test_fraction:g}) > floor(i*{spec.test_fraction:g})")
    labels = Labels(spec.name, folders=False)
    ids = {name: i for i, name in enumerate(names)}
    for split, src, rel, name in rows:
        labels.add(split, ids[name], src, rel, rel, name)
    groups, _ = labels.result(base=0, names=names)
    return groups, names, top, meta


def _images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth), hidden ones left out, in natural-sort order."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def _folder_rows(top: Path) -> list[Row]:
    """Rows of ``top/<class>/...`` (split "") or ``top/<split>/<class>/...``."""
    subs = _subfolders(top)
    split_dirs = [p for p in subs if p.name.lower() in SPLIT_NAMES]
    if split_dirs and len(split_dirs) != len(subs):
        other = [p.name for p in subs if p not in split_dirs]
        raise DatasetError(f"{top} mixes split folders ({', '.join(p.name for p in split_dirs)}) with other folders "
                           f"({', '.join(other[:5])}); put every class folder under a split folder, or none")
    rows: list[Row] = []
    for split_dir in split_dirs or [top]:
        split = split_dir.name.lower() if split_dirs else ""
        for cls in _subfolders(split_dir):
            rows += [(split, p, p.relative_to(top).as_posix(), cls.name) for p in _images(cls)]
    return rows


def _csv_rows(path: Path) -> list[Row]:
    """Rows of a ``path,label[,split]`` CSV; every problem names the file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} cannot be read ({e}); pass a UTF-8 CSV of path,label[,split] rows") from None
    header = [c.strip().lower() for c in table[0]] if table else []
    if header not in (["path", "label"], ["path", "label", "split"]):
        raise DatasetError(f"{path}:1: expected the header 'path,label' or 'path,label,split', got {','.join(header)!r}")
    rows: list[Row] = []
    for n, row in enumerate(table[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DatasetError(f"{path}:{n}: expected {len(header)} columns ({','.join(header)}), got {len(row)}")
        rel, label = row[0].strip(), row[1].strip()
        split = row[2].strip().lower() if len(row) == 3 else ""
        if len(row) == 3 and split not in SPLIT_NAMES:
            raise DatasetError(f"{path}:{n}: split {row[2]!r} is not one of {', '.join(SPLIT_NAMES)}")
        src = path.parent / rel
        if not label:
            raise DatasetError(f"{path}:{n}: the label is empty")
        if not src.is_file():
            raise DatasetError(f"{path}:{n}: image {rel} does not exist under {path.parent}")
        rows.append((split, src, rel, label))
    return rows


def _hold_out(rows: list[Row], frac: float, source: Path) -> list[Row]:
    """The documented split rule (module docstring): rows of every class to "train" or "test"."""
    if not 0 < frac < 1:
        raise DatasetError(f"--test-fraction {frac:g} must lie strictly between 0 and 1")
    by_class: dict[str, list[Row]] = {}
    for row in rows:
        by_class.setdefault(row[3], []).append(row)
    out: list[Row] = []
    for name, members in by_class.items():
        members.sort(key=lambda r: natural_key(r[2]))
        picked = [math.floor((i + 1) * frac) > math.floor(i * frac) for i in range(len(members))]
        if all(picked) or not any(picked):
            raise DatasetError(
                f"{source}: class {name!r} has {len(members)} image(s), too few to hold out a {frac:g} share for test "
                "and keep one for training; add images, change --test-fraction, or give train/ and test/ folders")
        out += [("test" if t else "train", src, rel, nm) for (_, src, rel, nm), t in zip(members, picked, strict=True)]
    return out
