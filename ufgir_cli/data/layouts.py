"""The published layouts of the catalog's datasets: labels, classes and splits read from a source folder.

Three schemes: ``anno/{train,test}.txt`` lists (the UFG sets' current layout, per round for
SoyAgeing), the label in the file name (the older layout of cotton80, soylocal and soyglobal,
``<label>_<idx>_<split>.png``) and CUB's index files. Which UFG layout a copy uses is read from its
contents. Each gives rows of (0-based class id, source file, path under ``images/``) per split of the
copy (``train``, ``test``, and ``val`` where a copy has one); a UFG image lands at the same path in
both layouts, so both give identical split files. Labels may start at 0 or 1 (:class:`Labels`).
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

_UFG_NAME = re.compile(r"(?P<label>\d+)_\d+_(?P<split>train|val|test)\.(?:png|jpe?g|bmp)", re.IGNORECASE)

Row = tuple[int, Path, str]  # 0-based class id, source file, path under images/
Groups = dict[str, list[Row]]  # the copy's own splits ("train", "val", "test", ...) -> its rows


def read_labels(top: Path, spec: DatasetSpec, again: str) -> tuple[Groups, list[str]]:
    """The copy's splits (rows by its own split names) and class names, by whichever of the entry's
    layouts ``top`` holds. ``again`` ends the message about an incomplete copy: what fixes it depends
    on where the copy came from (a fetch: fetch again; the user's archive or folder: a complete one)."""
    if spec.labels == "cub":
        markers = {"image_class_labels.txt": _cub_labels}
    else:
        anno = f"R{spec.rounds[0]}/anno/train.txt" if spec.rounds else "anno/train.txt"
        markers = {anno: _anno_labels, **({f"{spec.image_dir}/": _filename_labels} if spec.image_dir else {})}
    base, reader = _find_base(top, spec, markers)
    return reader(base, spec, again)


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


class Labels:
    """Rows with their labels as published, made 0-based once all are read: a copy's labels start
    at 0 or at 1 (the official lists use 1, some mirrors 0), whatever its format.

    A row may carry its class's name (a class folder, a ``class_name`` column); one class id with
    two names is an error naming both. Without names a class is called by its 1-based label.
    """

    def __init__(self, dataset: str, folders: bool = False) -> None:
        self.dataset = dataset
        self.folders = folders  # names are folders, which name classes only when no folder holds two
        self.rows: list[tuple[str, int, Path, str, str, str | None]] = []  # split, label, src, rel, where, name

    def add(self, split: str, label: str | int, src: Path, rel: str, where: str, name: str | None = None) -> None:
        n = label if isinstance(label, int) else _int(label, where)
        self.rows.append((split, n, src, rel, where, name))

    def result(self, base: int | None = None, names: list[str] | None = None) -> tuple[Groups, list[str]]:
        """Rows per split with 0-based ids; ``base`` (0 or 1) when the copy states it, else the lowest label."""
        low = min((n for _, n, *_ in self.rows), default=0) if base is None else base
        if low not in (0, 1):
            raise DatasetError(
                f"{self.dataset}: labels start at {low}, neither 0 nor 1; the copy is not the benchmark"
            )
        groups: Groups = {}
        named: dict[int, tuple[str, str]] = {}  # class id -> (name, where first seen)
        ids_of: dict[str, set[int]] = {}
        for _, n, _, _, _, name in self.rows:
            ids_of.setdefault(name, set()).add(n)
        shared = self.folders and any(len(ids) > 1 for name, ids in ids_of.items() if name is not None)
        for split, n, src, rel, where, name in self.rows:
            cid = n - low
            name = None if shared else name  # folders shared by classes (train/, test/) name no class
            if cid < 0 or (names is not None and cid >= len(names)):
                raise DatasetError(f"{where}: label {n} is not a class of this copy")
            if name is not None:
                first, at = named.setdefault(cid, (name, where))
                if first != name:
                    raise DatasetError(
                        f"{self.dataset}: class id {cid} is named {first!r} at {at} and {name!r} at {where}; "
                        "the copy's class names disagree, fix or replace it"
                    )
            groups.setdefault(split, []).append((cid, src, rel))
        if names is not None:
            for cid, (name, where) in named.items():
                if names[cid] != name:
                    raise DatasetError(
                        f"{self.dataset}: class id {cid} is named {names[cid]!r} by the class list and {name!r} "
                        f"by its folder at {where}; the copy's class names disagree, fix or replace it"
                    )
            return groups, names
        top = max((cid for rows in groups.values() for cid, _, _ in rows), default=-1)
        return groups, [named[cid][0] if cid in named else str(cid + 1) for cid in range(top + 1)]


def _filename_labels(base: Path, spec: DatasetSpec, again: str) -> tuple[Groups, list[str]]:
    """``<image_dir>/<label>_<index>_<train|val|test>.<ext>``; other files (notes, thumbnails) are ignored."""
    labels = Labels(spec.name)
    for f in sorted((base / spec.image_dir).iterdir(), key=lambda p: natural_key(p.name)):
        m = _UFG_NAME.fullmatch(f.name)
        if m and f.is_file():
            labels.add(m["split"].lower(), m["label"], f, f.name, f"{spec.image_dir}/{f.name}")
    return labels.result()


def _anno_labels(base: Path, spec: DatasetSpec, again: str) -> tuple[Groups, list[str]]:
    """``[R<r>/]anno/{train,val,test}.txt`` lines ``<file> <label>`` (val optional), files under
    ``[R<r>/]images/``; a file in a folder (``<class>/<file>``) names its class by that folder.

    Pooled rounds keep the published label, so a cultivar has one class id in every round, and are
    read in the catalog's round order.
    """
    labels = Labels(spec.name, folders=True)
    for prefix in [f"R{r}/" for r in spec.rounds] or [""]:
        for split in ("train", "val", "test"):
            if split == "val" and not (base / prefix / "anno" / "val.txt").is_file():
                continue
            for where, file, label in _pairs(base, f"{prefix}anno/{split}.txt", again):
                if why := unsafe_name(file):
                    raise DatasetError(f"{where}: file name {file!r} {why}; the copy is not the published one")
                src = base / prefix / "images" / file
                if not src.is_file():
                    raise DatasetError(
                        f"{where}: {prefix}images/{file} is missing; the copy is incomplete: {again}"
                    )
                folder = file.replace("\\", "/").split("/")
                labels.add(split, label, src, prefix + file, where, folder[0] if len(folder) > 1 else None)
    return labels.result()


def _cub_labels(base: Path, spec: DatasetSpec, again: str) -> tuple[Groups, list[str]]:
    """CUB-200-2011: image ids joined across images.txt, image_class_labels.txt, train_test_split.txt.

    classes.txt numbers the classes (from 1 as published, or from 0) and names them; an image's
    class folder must carry the name of its label.
    """
    classes = sorted((_int(label, where), name) for where, label, name in _pairs(base, "classes.txt", again))
    names = [name for _, name in classes]
    low = classes[0][0] if classes else 1
    if low not in (0, 1) or [label for label, _ in classes] != list(range(low, low + len(names))):
        raise DatasetError(
            f"classes.txt must number its classes 1..{len(names)} (or 0..{len(names) - 1}) in order; the copy is damaged"
        )
    found = {i: (where, label) for where, i, label in _pairs(base, "image_class_labels.txt", again)}
    is_train = {i: flag == "1" for _, i, flag in _pairs(base, "train_test_split.txt", again)}
    labels = Labels(spec.name, folders=True)
    for where, i, rel in _pairs(base, "images.txt", again):
        if i not in found or i not in is_train:
            raise DatasetError(
                f"{where}: image {i} has no line in image_class_labels.txt or train_test_split.txt"
            )
        label_at, label = found[i]
        src = base / "images" / rel
        if not src.is_file():
            raise DatasetError(
                f"{where}: images/{rel} is missing; the copy is incomplete: {again}"
            )
        folder = rel.replace("\\", "/").split("/")
        labels.add("train" if is_train[i] else "test", label, src, rel, label_at, folder[0] if len(folder) > 1 else None)
    return labels.result(low, names)


def _pairs(base: Path, rel: str, again: str) -> Iterator[tuple[str, str, str]]:
    """``(file:line, first, second)`` for each non-blank line of a two-column text file."""
    path = base / rel
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{rel} is missing from the dataset copy: {again}") from None
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
