"""The on-disk dataset folder: one format written by `ufgir download` and the synthetic generator,
read by training, evaluation and analysis.

```
<root>/images/...                     the images (any layout)
<root>/splits/{train,val,train_val,test}.csv   header class_id,path (0-based ids, paths relative to <root>)
<root>/classes.csv                    header class_id,name
<root>/dataset.json                   name, num_classes, per-split counts, source, archive sha256
```
``val`` is carved from ``train_val`` per class by the reference's rule: files in natural-sort name
order, the first floor(0.8 n) are ``train``, the rest ``val`` (3 images -> 2 + 1).
No torch here: `ufgir datasets` stays instant.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from ..io import atomic_write_json, atomic_write_text
from ..paths import dataset_dir
from .catalog import CATALOG, DEMO_CLASSES, DEMO_TEST, DEMO_TRAIN_VAL, USER_KIND, rebuild_command

SPLITS = ("train", "val", "train_val", "test")


def natural_key(s: str) -> list:
    """Sort key that orders 'img_2' before 'img_10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def split_train_val(rows: Iterable[tuple[int, str]], train_frac: float = 0.8) -> tuple[list, list]:
    """Per class, natural-sort by file name; first floor(frac * n) -> train, the rest -> val."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for cid, path in rows:
        by_class[cid].append(path)
    train, val = [], []
    for cid in sorted(by_class):
        paths = sorted(by_class[cid], key=lambda p: natural_key(Path(p).name))
        k = math.floor(train_frac * len(paths))
        train += [(cid, p) for p in paths[:k]]
        val += [(cid, p) for p in paths[k:]]
    return train, val


def _csv_text(header: tuple[str, str], rows: Iterable[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_dataset_folder(
    root: Path,
    train_val: list[tuple[int, str]],
    test: list[tuple[int, str]],
    class_names: list[str],
    meta: dict,
) -> dict:
    """Write splits, classes.csv and dataset.json for images already under ``root``. Returns the json."""
    train, val = split_train_val(train_val)
    key = lambda r: (r[0], natural_key(r[1]))  # noqa: E731
    splits = {"train": train, "val": val, "train_val": sorted(train_val, key=key), "test": sorted(test, key=key)}
    for name, rows in splits.items():
        atomic_write_text(root / "splits" / f"{name}.csv", _csv_text(("class_id", "path"), sorted(rows, key=key)))
    atomic_write_text(root / "classes.csv", _csv_text(("class_id", "name"), enumerate(class_names)))
    info = {"num_classes": len(class_names), "counts": {k: len(v) for k, v in splits.items()}, **meta}
    atomic_write_json(root / "dataset.json", info)
    return info


@dataclass(frozen=True)
class SplitFile:
    """One split: (class id, absolute path) rows, validated."""

    root: Path
    split: str
    samples: list[tuple[str, int]]
    num_classes: int
    class_names: list[str]


def read_classes(root: Path) -> list[str]:
    path = root / "classes.csv"
    if not path.is_file():
        raise DatasetError(f"{path} is missing; {_missing_hint(root)}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["class_id", "name"]:
        raise DatasetError(f"{path}:1: expected header 'class_id,name'")
    names = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].isdigit():
            raise DatasetError(f"{path}:{n}: expected 'class_id,name', got {','.join(row)!r}")
        names[int(row[0])] = row[1]
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{path}: class ids must be 0..{len(names) - 1} without gaps")
    return [names[i] for i in range(len(names))]


def read_split(root: str | Path, split: str, check_files: bool = True) -> SplitFile:
    """Read and validate ``splits/<split>.csv``; every problem names the file and line."""
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = root / "splits" / f"{split}.csv"
    if not path.is_file():
        hint = _missing_hint(root)
        raise DatasetError(f"split file {path} is missing; {hint}")
    classes = read_classes(root)
    C = len(classes)
    samples = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["class_id", "path"]:
            raise DatasetError(f"{path}:1: expected header 'class_id,path', got {header}")
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise DatasetError(f"{path}:{n}: expected 2 columns 'class_id,path', got {len(row)}")
            try:
                cid = int(row[0])
            except ValueError:
                raise DatasetError(f"{path}:{n}: class id {row[0]!r} is not an integer") from None
            if not 0 <= cid < C:
                raise DatasetError(f"{path}:{n}: class id {cid} is out of range 0..{C - 1} (classes.csv has {C})")
            img = root / row[1]
            if check_files and not img.is_file():
                raise DatasetError(f"{path}:{n}: image {row[1]} does not exist under {root}")
            samples.append((str(img), cid))
    if not samples:
        raise DatasetError(f"split file {path} lists no images")
    return SplitFile(root, split, samples, C, classes)


def _missing_hint(root: Path) -> str:
    """What makes a dataset folder whose files are missing: the command that fits how it was made."""
    info = read_info(root) if root.exists() else {}
    if info.get("kind") == USER_KIND or (root.name in CATALOG and root.exists()):
        return f"re-create it with `{rebuild_command(root.name, info)}`"
    if root.name in CATALOG:
        return f"run `ufgir download {root.name}`"
    if root.exists():
        return (f"{root} is not a dataset folder; make it one with `ufgir datasets add {root.name} --from-folder DIR` "
                "(class folders), or point data.root at a dataset folder")
    return (f"{root.name!r} is not in `ufgir datasets`; add your own with `ufgir datasets add {root.name} "
            "--from-folder DIR`, or point data.root at a dataset folder")


def read_info(root: Path) -> dict:
    p = root / "dataset.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        how = f"`ufgir download {root.name} --force`" if root.name in CATALOG else \
            f"`ufgir datasets add {root.name} --from-folder DIR --force` (DIR: where its images came from)"
        raise DatasetError(f"{p} is not valid JSON ({e}); re-create the dataset with {how}") from None


@dataclass(frozen=True)
class DatasetCounts:
    """How big a dataset is, and where the numbers come from ("catalog", "disk" or "generator")."""

    num_classes: int | None
    train_val: int | None
    test: int | None
    source: str | None


def dataset_counts(name: str, root: str | os.PathLike | None = None) -> DatasetCounts:
    """Classes and split sizes of a dataset: the catalog's, else those its folder on disk records
    (``dataset.json``), else, for the generated set not made yet, its generator's."""
    spec = CATALOG.get(name)
    if spec is not None and spec.num_classes and spec.train_val and spec.test:
        return DatasetCounts(spec.num_classes, spec.train_val, spec.test, "catalog")
    info = read_info(dataset_dir(name, root))
    counts = info.get("counts") or {}
    if info.get("num_classes") and counts.get("train_val"):
        return DatasetCounts(info["num_classes"], counts["train_val"], counts.get("test"), "disk")
    if spec is not None and spec.kind == "generated":
        return DatasetCounts(DEMO_CLASSES, DEMO_CLASSES * DEMO_TRAIN_VAL, DEMO_CLASSES * DEMO_TEST, "generator")
    return DatasetCounts(None, None, None, None)
