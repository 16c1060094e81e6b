"""Duplicates and leakage by content: which images are one picture, which split copies another, and
which test images also sit in train_val.

Two images are one picture when their bytes or decoded pixels are equal, or when their perceptual
hashes are within :data:`PHASH_BITS` bits and the pixels confirm it (PSNR at least :data:`PSNR_DB`):
a hash alone can collide, the pixels cannot lie. Pictures are grouped with a union-find, so a chain
of re-saves is one group. Used at download (:mod:`.download`), by `ufgir datasets verify`
(:mod:`.verify`) and before training (:func:`check_recorded`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import DatasetError
from .catalog import DatasetSpec, rebuild_command
from .content import HASHES_FILE, Hasher, ImageHash, decode_rgb, psnr
from .folder import read_info
from .layouts import Groups, Row, check_counts
from .parquet import SPLIT_NAMES, map_splits

Progress = Callable[[str, int, int | None], None]
Notify = Callable[[str], None]

PHASH_BITS = 8  # a JPEG re-save or a resize moves a 64-bit DCT hash by a few bits
PSNR_DB = 30.0  # a JPEG at quality 90 of a leaf scan is near 40 dB; two different leaves far below 30
SHOWN = 5  # file names shown in a one-line message


@dataclass(frozen=True)
class Item:
    """One image: the file to decode, the name to show, its split and class id, and its hashes."""

    path: Path
    name: str
    split: str
    label: int
    hash: ImageHash


def pictures(items: list[Item]) -> list[int]:
    """A group id per item: items with one id are one picture (exact or confirmed near copies)."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, it in enumerate(items):
        for key in ("b" + it.hash.bytes_sha256, "p" + (it.hash.pixels_sha256 or "")):
            if len(key) > 1:
                parent[find(i)] = find(first.setdefault(key, i))
    reps = [i for i in range(len(items)) if find(i) == i and items[i].hash.phash is not None]
    load = lru_cache(maxsize=32)(lambda p: decode_rgb(p))
    for a, b in _close_pairs([items[r].hash for r in reps]):
        i, j = reps[a], reps[b]
        if find(i) != find(j) and psnr(load(items[i].path), load(items[j].path)) >= PSNR_DB:
            parent[find(j)] = find(i)
    return [find(i) for i in range(len(items))]


def _close_pairs(hashes: list[ImageHash]) -> list[tuple[int, int]]:
    """Index pairs ``(a, b)``, a < b, whose perceptual hashes differ in at most :data:`PHASH_BITS` bits
    and whose 32x32 grey thumbnails are within :data:`PSNR_DB` already (a thumbnail averages away the
    noise a re-save adds, so this drops no true near copy; it spares decoding look-alike leaves).

    Look-alike leaves make hundreds of thousands of hash-close pairs, so their thumbnails are first
    compared as 8x8 sums of 4x4 boxes, in exact integers: a box's mean squared difference is at least
    the square of its mean difference, so a pair too far apart there is too far apart in the
    thumbnails too, and only the rest are compared pixel by pixel.
    """
    import numpy as np

    h = np.array([x.phash for x in hashes], dtype=np.uint64)
    grey = np.stack([np.frombuffer(x.grey, np.uint8) if x.grey else np.zeros(1024, np.uint8) for x in hashes]) \
        if hashes else np.zeros((0, 1024), np.uint8)  # (n, 1024)
    boxes = grey.reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4), dtype=np.int32).reshape(-1, 64)  # (n, 64), each <= 16*255
    max_mse = 255.0**2 / 10 ** (PSNR_DB / 10)
    max_box_ssd = max_mse * 64 * 16**2 * (1 + 1e-5)  # the same bound on squared box sums; the margin covers
    # the float32 rounding of the thumbnail test below, so the coarse test never drops a pair that one keeps
    n, out = len(h), []
    step = max(1, (1 << 22) // max(n, 1))  # rows per block: a few million comparisons at a time
    for start in range(0, n, step):
        block = h[start : start + step, None] ^ h[None, start:]  # (rows, n - start): each pair once
        a, b = np.nonzero(np.bitwise_count(block) <= PHASH_BITS)
        a, b = a + start, b + start
        a, b = a[a < b], b[a < b]
        d = boxes[a] - boxes[b]  # (pairs, 64) int32
        close = np.einsum("ij,ij->i", d, d) <= max_box_ssd
        a, b = a[close], b[close]
        for k in range(0, len(a), 4096):  # thumbnails' mean squared error, pair by pair in chunks
            d = grey[a[k : k + 4096]].astype(np.float32) - grey[b[k : k + 4096]].astype(np.float32)
            near = (d * d).mean(axis=1) <= max_mse
            out += list(zip(a[k : k + 4096][near].tolist(), b[k : k + 4096][near].tolist(), strict=True))
    return out


def split_priority(split: str) -> tuple[int, str]:
    """The order in which splits are kept when one copies another: test never goes, then train."""
    low = split.lower()
    return (0 if low in ("test", "testing") else 1 if low.startswith("train") else 2, low)


def copied_splits(items: list[Item], group: list[int]) -> list[tuple[str, str]]:
    """``(copy, original)`` for each split whose pictures and labels are exactly another split's."""
    sig: dict[str, Counter] = {}
    for it, g in zip(items, group, strict=True):
        sig.setdefault(it.split, Counter())[g, it.label] += 1
    kept: list[str] = []
    copies = []
    for split in sorted(sig, key=split_priority):
        original = next((k for k in kept if sig[k] == sig[split]), None)
        if original is None:
            kept.append(split)
        else:
            copies.append((split, original))
    return copies


def report(items: list[Item], group: list[int], train_val: set[str], test: set[str]) -> dict:
    """Duplicates within each split and test images whose picture is also in train_val.

    ``train_val`` and ``test`` name the item splits that make each side.
    """
    side = {s: "train_val" for s in train_val} | {s: "test" for s in test}
    seen: dict[tuple[str, int], Item] = {}
    dups: dict[str, list[str]] = {"train_val": [], "test": []}
    in_tv: dict[int, Item] = {}
    for it, g in zip(items, group, strict=True):
        s = side.get(it.split)
        if s is None:
            continue
        if (s, g) in seen:
            dups[s].append(f"{it.name} = {seen[s, g].name}")
        else:
            seen[s, g] = it
        if s == "train_val":
            in_tv.setdefault(g, it)
    leaks = [f"{it.name} = {in_tv[g].name}" for it, g in zip(items, group, strict=True)
             if side.get(it.split) == "test" and g in in_tv]  # fmt: skip
    unreadable = [it.name for it in items if it.hash.error and it.split in side]
    return {
        "images": sum(1 for it in items if it.split in side),
        "unreadable": unreadable,
        "duplicates": {s: {"images": len(v), "examples": v[:SHOWN]} for s, v in dups.items()},
        "overlap": {"test_images": len(leaks), "examples": leaks[:SHOWN]},
    }


def shown(names: list[str], total: int) -> str:
    """A few names and how many more, for a one-line message."""
    more = f" and {total - len(names[:SHOWN])} more" if total > len(names[:SHOWN]) else ""
    return ", ".join(names[:SHOWN]) + more


# ------------------------------------------------------------------------------------ at download


class OverlapError(DatasetError):
    """A mirror's test images are also in its train_val; ``--allow-overlap`` accepts it anyway."""


@dataclass
class Settled:
    """A copy's rows once copied splits are dropped and the rest is mapped onto train_val / test."""

    train_val: list[Row]
    test: list[Row]
    hashes: list[ImageHash] = field(default_factory=list)  # train_val rows then test rows; empty unhashed
    record: dict | None = None  # dataset.json's "integrity", less the hashes file's sha256


def settle(
    spec: DatasetSpec,
    groups: Groups,
    names: list[str],
    meta: dict,
    *,
    by_counts: bool,
    allow_overlap: bool,
    hasher: Hasher | None,
    verify: bool,
    progress: Progress,
    notify: Notify,
) -> Settled:
    """Hash every image, drop a split that copies another, map the rest, check counts and leakage.

    ``hasher`` holds the images' hashes (those handed to it as the source was unpacked; it hashes any
    other from disk); None skips the content checks.

    ``by_counts``: the copy's split values are mapped by the catalog's counts (parquet), else by
    their names. Overlap between train_val and test refuses a mirror unless ``allow_overlap``; from
    the official source or the user's own copy it is reported and recorded.
    """
    items: list[Item] = []
    group: list[int] = []
    dropped = []
    if hasher is not None:
        flat = [(split, row) for split, rows in groups.items() for row in rows]
        hashes = hasher.hashes([src for _, (_, src, _) in flat], progress)
        items = [Item(src, f"images/{rel}", split, cid, h) for (split, (cid, src, rel)), h in zip(flat, hashes, strict=True)]
        group = pictures(items)
        for copy, original in copied_splits(items, group):
            n = len(groups[copy])
            notify(f"{spec.name}: the copy's split {copy!r} is its split {original!r} again ({n} images, same "
                   f"pictures and labels); dropped {copy!r}")
            dropped.append({"split": copy, "copy_of": original, "images": n})
        gone = {d["split"] for d in dropped}
        groups = {s: rows for s, rows in groups.items() if s not in gone}
        keep = [i for i, it in enumerate(items) if it.split not in gone]
        items, group = [items[i] for i in keep], [group[i] for i in keep]
    side = _sides(spec, groups, by_counts)
    tv_splits = {s for s, v in side.items() if v == "train_val"}
    test_splits = set(side) - tv_splits
    train_val = [r for s in groups if s in tv_splits for r in groups[s]]
    test = [r for s in groups if s in test_splits for r in groups[s]]
    check_counts(spec, names, train_val, test, meta["source"])
    if hasher is None:
        return Settled(train_val, test)
    rep = report(items, group, tv_splits, test_splits)
    _tell(spec, meta, rep, allow_overlap, verify, notify)
    by_split = {s: [it.hash for it in items if it.split == s] for s in groups}
    ordered = [h for part in (tv_splits, test_splits) for s in groups if s in part for h in by_split[s]]
    verdict = "overlap" if rep["overlap"]["test_images"] else "ok"
    record = {"hashes": HASHES_FILE, "hashed_at": "download", "verdict": verdict,
              "allow_overlap": allow_overlap, "dropped": dropped, **rep}
    return Settled(train_val, test, ordered, record)


def _sides(spec: DatasetSpec, groups: Groups, by_counts: bool) -> dict[str, str]:
    """Each of the copy's splits -> "train_val" or "test"."""
    if by_counts:
        return map_splits(Counter({s: len(rows) for s, rows in groups.items()}), spec)
    side = {}
    for s in groups:
        if s.lower() not in SPLIT_NAMES:
            raise DatasetError(f"{spec.name}: the copy has a split {s!r}, neither train nor test; refusing it")
        side[s] = SPLIT_NAMES[s.lower()]
    return side


def _tell(spec: DatasetSpec, meta: dict, rep: dict, allow_overlap: bool, verify: bool, notify: Notify) -> None:
    """One line per finding; unreadable images (with ``verify``) and a mirror's leakage are errors."""
    bad = rep["unreadable"]
    if bad:
        line = f"{spec.name}: {len(bad)} images cannot be decoded: {shown(bad, len(bad))}"
        if verify:
            again = f"fetch a fresh copy with `ufgir download {spec.name} --force`"
            if spec.kind == "user":
                again = f"fix or remove them in {meta['source']}, then add it again"
            elif meta.get("origin") == "user":
                again = f"{meta['source']} is damaged: pass a complete copy"
            raise DatasetError(f"{line}; {again}")
        notify(f"{line}; training stops at them unless --skip-corrupt")
    for s, d in rep["duplicates"].items():
        if d["images"]:
            notify(f"{spec.name}: {d['images']} {s} images repeat another {s} image by content "
                   f"(e.g. {shown(d['examples'], d['images'])}); kept, as published")
    n = rep["overlap"]["test_images"]
    if not n:
        return
    what = f"{spec.name}: {n} test images of {meta['source']} are also in train_val by content " \
           f"(e.g. {shown(rep['overlap']['examples'], n)})"
    if meta.get("origin") == "mirror" and not allow_overlap:
        raise OverlapError(
            f"{what}; refusing this community copy: pass --allow-overlap to keep it anyway (recorded, and "
            f"printed by every `ufgir train` on it), or get the official copy by hand and pass --archive"
        )
    notify(f"{what}; kept{' (--allow-overlap)' if allow_overlap else ', as published'} and recorded in dataset.json")


# ------------------------------------------------------------------------------- before training


def check_recorded(root: Path, info: dict, found: dict[str, int]) -> None:
    """Before training: the recorded verdict allows training and ``found`` split sizes are the recorded ones."""
    if not info:
        return  # a folder of the user's own, without dataset.json
    counts = info.get("counts") or {}
    for split, n in found.items():
        if split in counts and counts[split] != n:
            raise DatasetError(
                f"{root / 'splits' / f'{split}.csv'} lists {n} images but dataset.json records {counts[split]}; "
                f"the split files were changed: check with `ufgir datasets verify {root.name}`, or re-create "
                f"it with `{rebuild_command(root.name, info)}`"
            )
    verdict = (info.get("integrity") or {}).get("verdict")
    if verdict not in (None, "ok", "overlap"):
        raise DatasetError(
            f"{root / 'dataset.json'} records the verdict {verdict!r}; run `ufgir datasets verify {root.name}` "
            f"and re-create it with `{rebuild_command(root.name, info)}`"
        )


def dataset_notices(root: Path) -> list[str]:
    """Lines `ufgir train` shows at the start of every run on the dataset folder ``root``."""
    line = overlap_notice(root.name, read_info(root))
    return [line] if line else []


def overlap_notice(name: str, info: dict) -> str | None:
    """The line `ufgir train` prints at the start of a run on data whose test images are also in train_val."""
    integ = info.get("integrity") or {}
    ov = integ.get("overlap") or {}
    n = ov.get("test_images", 0)
    if not n:
        return None
    why = "allowed with --allow-overlap" if integ.get("allow_overlap") else f"as published by its {info.get('origin')} source"
    return (
        f"{name}: {n} test images are also in train_val by content ({why}; e.g. {shown(ov.get('examples', []), n)}); "
        "test accuracy on this data overstates"
    )

