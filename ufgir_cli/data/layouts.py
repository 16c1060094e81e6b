"""The published layouts of the catalog's datasets: labels, classes and splits read from a source folder.

Three schemes: ``anno/{train,test}.txt`` lists (the UFG sets' current layout, per round for
SoyAgeing), the label in the file name (the older layout of cotton80, soylocal and soyglobal,
``<label>_<idx>_<split>.png``) and CUB's index files. Which UFG layout a copy uses is read from its
contents. Each gives rows of (0-based class id, source file, path under ``images/``); a UFG image
lands at the same path in both layouts, so both give identical split files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import DatasetError
from .archive import unsafe_name
from .catalog import DatasetSpec
from .folder import natural_key

_UFG_NAME = re.compile(r"(?P<label>\d+)_\d+_(?P<split>train|test)\.(?:png|jpe?g|bmp)", re.IGNORECASE)

Row = tuple[int, Path, str]  # 0-based class id, source file, path under images/


def read_labels(top: Path, spec: DatasetSpec) -> tuple[list[Row], list[Row], list[str]]:
    """Train_val rows, test rows and class names, by whichever of the entry's layouts ``top`` holds."""
    if spec.labels == "cub":
        markers = {"image_class_labels.txt": _cub_labels}
    else:
        anno = f"R{spec.rounds[0]}/anno/train.txt" if spec.rounds else "anno/train.txt"
        markers = {anno: _anno_labels, **({f"{spec.image_dir}/": _filename_labels} if spec.image_dir else {})}
    base, reader = _find_base(top, spec, markers)
    return reader(base, spec)


def _find_base(top: Path, spec: DatasetSpec, markers: dict[str, Callable]) -> tuple[Path, Callable]:
    """The folder the layout is relative to, and its reader; archives often wrap it in one or two folders."""
    level = [top]
    for _depth in range(4):
        for folder in level:
            for marker, reader in markers.items():
                if (folder / marker).exists():
                    return folder, reader
        level = sorted(c for f in level for c in f.iterdir() if c.is_dir() and c.name != "__MACOSX")
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in top.iterdir() if p.name != "__MACOSX")
    shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "") or "nothing"
    raise DatasetError(
        f"found no {' or '.join(markers)} in the {spec.name} source (its top level holds: {shown}); "
        f"is it the {spec.title} archive or folder?"
    )


def _filename_labels(base: Path, spec: DatasetSpec) -> tuple[list[Row], list[Row], list[str]]:
    """``<image_dir>/<label>_<index>_<train|test>.<ext>``; other files (notes, thumbnails) are ignored."""
    rows: dict[str, list[Row]] = {"train": [], "test": []}
    for f in sorted((base / spec.image_dir).iterdir(), key=lambda p: natural_key(p.name)):
        m = _UFG_NAME.fullmatch(f.name)
        if m and f.is_file():
            where = f"{spec.image_dir}/{f.name}"
            rows[m["split"].lower()].append((_class_id(m["label"], where), f, f.name))
    return rows["train"], rows["test"], _label_names(rows)


def _anno_labels(base: Path, spec: DatasetSpec) -> tuple[list[Row], list[Row], list[str]]:
    """``[R<r>/]anno/{train,test}.txt`` lines ``<file> <label>``, files under ``[R<r>/]images/``.

    Pooled rounds keep the published label, so a cultivar has one class id in every round.
    """
    rows: dict[str, list[Row]] = {"train": [], "test": []}
    for prefix in [f"R{r}/" for r in spec.rounds] or [""]:
        for split, out in rows.items():
            for where, file, label in _pairs(base, f"{prefix}anno/{split}.txt"):
                if why := unsafe_name(file):
                    raise DatasetError(f"{where}: file name {file!r} {why}; the copy is not the published one")
                src = base / prefix / "images" / file
                if not src.is_file():
                    raise DatasetError(
                        f"{where}: {prefix}images/{file} is missing; the copy is incomplete, fetch it again with --force"
                    )
                out.append((_class_id(label, where), src, prefix + file))
    return rows["train"], rows["test"], _label_names(rows)


def _cub_labels(base: Path, spec: DatasetSpec) -> tuple[list[Row], list[Row], list[str]]:
    """CUB-200-2011: image ids joined across images.txt, image_class_labels.txt, train_test_split.txt."""
    classes = sorted((_int(label, where), name) for where, label, name in _pairs(base, "classes.txt"))
    names = [name for _, name in classes]
    if [label for label, _ in classes] != list(range(1, len(names) + 1)):
        raise DatasetError(
            f"classes.txt must number its classes 1..{len(names)} in order; the copy is damaged"
        )
    labels = {i: (where, label) for where, i, label in _pairs(base, "image_class_labels.txt")}
    is_train = {i: flag == "1" for _, i, flag in _pairs(base, "train_test_split.txt")}
    rows: dict[bool, list[Row]] = {True: [], False: []}
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


def _label_names(rows: dict[str, list[Row]]) -> list[str]:
    """Class names are the published labels, "1" for class id 0, up to the largest label seen."""
    top = max((cid for split in rows.values() for cid, _, _ in split), default=-1)
    return [str(cid + 1) for cid in range(top + 1)]


def check_counts(spec: DatasetSpec, names: list[str], train_val: list, test: list, source: str) -> None:
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


def place(
    rows: list[Row], top: Path, ds: Path, transfer: Callable[[Path, Path], object]
) -> list[tuple[int, str]]:
    """Put each image at ``ds/images/<path>``; return ``(class id, path relative to ds)`` rows.

    A source file that is a link, or lies outside ``top`` once links are followed, is refused: a
    link in a folder passed with --from-folder could point anywhere.
    """
    placed, seen, inside = [], set(), top.resolve()
    for cid, src, rel in rows:
        path = f"images/{rel}"
        if path in seen:
            raise DatasetError(f"{rel} is labelled twice (two lines or two splits); the label files disagree")
        if src.is_symlink() or not src.resolve().is_relative_to(inside):
            raise DatasetError(f"{src} is a link; pass a copy that holds the image files themselves")
        seen.add(path)
        target = ds / path
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer(src, target)
        placed.append((cid, path))
    return placed


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on one file system (instant, no extra space), else copy; the source stays as is."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
