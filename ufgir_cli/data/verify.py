"""`ufgir datasets verify`: is a dataset folder still what was downloaded, and can it be trusted.

Checked: split and class counts against the catalog and ``dataset.json``; every image decoded
(unreadable ones listed); duplicates and train_val / test leakage by content; each file's bytes
against the sha256 recorded at download (a file changed or removed since is named). Pixel and
perceptual hashes are recomputed for the duplicate checks, never compared with recorded values:
decoders change, and a new Pillow must not make a good folder look tampered with. A folder made
before content checks says so; ``record`` hashes it now.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from ..errors import DatasetError
from ..io import atomic_write_json
from .catalog import CATALOG, rebuild_command
from .content import HASHES_FILE, hash_files, read_hashes, write_hashes
from .folder import SPLITS, natural_key, read_classes, read_info, read_split
from .integrity import Item, pictures, report, shown

Progress = Callable[[str, int, int | None], None]


def verify_images(root: Path, progress: Progress | None = None) -> list[str]:
    """Decode every image of the train_val and test splits; return the unreadable ones, relative to ``root``."""
    from PIL import Image

    files = sorted(
        {Path(p) for split in ("train_val", "test") for p, _ in read_split(root, split, check_files=False).samples},
        key=lambda p: natural_key(p.as_posix()),
    )
    bad = []
    for n, path in enumerate(files, start=1):
        try:
            with Image.open(path) as im:
                im.load()
        except Exception:  # any decoder failure (OSError, SyntaxError, ValueError, ...) means unreadable
            bad.append(path.relative_to(root).as_posix())
        if progress is not None:
            progress("verify", n, len(files))
    return bad


def check_images(name: str, root: Path, progress: Progress | None = None) -> None:
    """A one-line DatasetError naming the images of ``root`` that cannot be decoded."""
    bad = verify_images(root, progress)
    if bad:
        raise DatasetError(
            f"{name}: {len(bad)} images cannot be decoded: {shown(bad, len(bad))}; "
            f"re-create it from a complete copy with `{rebuild_command(name, read_info(root))}`"
        )


def verify_dataset(name: str, root: Path, *, record: bool = False, progress: Progress | None = None) -> dict:
    """Everything `ufgir datasets verify` reports, as a JSON-able dict; ``ok`` is False when something is wrong."""
    if not (root / "dataset.json").is_file():
        how = f"`ufgir download {name}`" if name in CATALOG else f"`ufgir datasets add {name} --from-folder DIR`"
        raise DatasetError(f"{name} is not downloaded ({root} has no dataset.json); make it with {how}")
    info = read_info(root)
    problems: list[str] = []
    classes = read_classes(root)
    splits = {s: read_split(root, s, check_files=False) for s in SPLITS}
    counts = {s: len(sf.samples) for s, sf in splits.items()}
    problems += _count_problems(name, info, len(classes), counts)
    if set(splits["train"].samples) | set(splits["val"].samples) != set(splits["train_val"].samples):
        problems.append("splits/train.csv and splits/val.csv together are not splits/train_val.csv")

    rows = [(Path(p), s, cid) for s in ("train_val", "test") for p, cid in splits[s].samples]
    rel = {p: p.relative_to(root).as_posix() for p, _, _ in rows}
    missing = [rel[p] for p, _, _ in rows if not p.is_file()]
    present = [r for r in rows if r[0].is_file()]
    hashes = hash_files([p for p, _, _ in present], progress)
    items = [Item(p, rel[p], s, cid, h) for (p, s, cid), h in zip(present, hashes, strict=True)]
    found = report(items, pictures(items), {"train_val"}, {"test"})

    integ = info.get("integrity")
    notes, changed, removed = [], [], []
    if integ:
        changed, removed, extra = _against_record(root, integ, {it.name: it.hash.bytes_sha256 for it in items})
        problems += extra
    elif not record:
        notes.append(f"{name} was downloaded before content checks: its files cannot be compared with the "
                     f"download; `ufgir datasets verify {name} --record` hashes it now")
    missing = [m for m in missing if m not in removed]
    if missing:
        problems.append(f"{len(missing)} listed images are missing: {shown(missing, len(missing))}")
    if changed:
        problems.append(f"{len(changed)} images changed since download: {shown(changed, len(changed))}")
    if removed:
        problems.append(f"{len(removed)} images removed since download: {shown(removed, len(removed))}")
    if found["unreadable"]:
        problems.append(f"{len(found['unreadable'])} images cannot be decoded: "
                        f"{shown(found['unreadable'], len(found['unreadable']))}")
    n = found["overlap"]["test_images"]
    accepted = bool((integ or {}).get("allow_overlap")) or info.get("origin") != "mirror"
    if n and not accepted:
        problems.append(f"{n} test images are also in train_val by content (e.g. "
                        f"{shown(found['overlap']['examples'], n)}); re-create it with `{rebuild_command(name, info)}`")
    result = {"name": name, "path": str(root), "ok": not problems, "problems": problems, "notes": notes,
              "classes": len(classes), "counts": counts, "missing": missing, "changed": changed, "removed": removed,
              "origin": info.get("origin"), "allow_overlap": bool((integ or {}).get("allow_overlap")), **found}
    if record:
        _record(name, root, info, items, found, problems)
        result["recorded"] = True
    return result


def _count_problems(name: str, info: dict, num_classes: int, counts: dict[str, int]) -> list[str]:
    """Counts that differ from the catalog's or from those recorded in dataset.json."""
    out = []
    spec = CATALOG.get(name)
    if spec is not None and spec.kind != "generated":
        want = {"classes": spec.num_classes, "train_val": spec.train_val, "test": spec.test}
        have = {"classes": num_classes, "train_val": counts["train_val"], "test": counts["test"]}
        out += [f"{k}: the catalog has {want[k]}, the folder {have[k]}" for k in want if want[k] != have[k]]
    recorded = info.get("counts") or {}
    out += [f"splits/{s}.csv lists {counts[s]} images, dataset.json records {recorded[s]}"
            for s in SPLITS if s in recorded and recorded[s] != counts[s]]
    if info.get("num_classes") not in (None, num_classes):
        out.append(f"classes.csv has {num_classes} classes, dataset.json records {info['num_classes']}")
    return out


def _against_record(root: Path, integ: dict, now: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(changed, removed, other problems) of the files against the byte hashes recorded at download."""
    path = root / integ.get("hashes", HASHES_FILE)
    if not path.is_file():
        return [], [], [f"{path.name} is missing; re-create the record with --record"]
    if hashlib.sha256(path.read_bytes()).hexdigest() != integ.get("hashes_sha256"):
        return [], [], [f"{path.name} is not the file recorded in dataset.json; re-create the record with --record"]
    recorded = read_hashes(path)
    changed = [p for p, sha in recorded.items() if p in now and now[p] != sha]
    removed = [p for p in recorded if not (root / p).is_file()]
    added = [p for p in now if p not in recorded]
    extra = [f"{len(added)} listed images were not there at download: {shown(added, len(added))}"] if added else []
    return changed, removed, extra


def _record(name: str, root: Path, info: dict, items: list[Item], found: dict, problems: list[str]) -> None:
    """Write hashes.csv and dataset.json's "integrity" now; refused while something is wrong."""
    if problems:
        raise DatasetError(f"{name}: not recorded, the folder has problems ({problems[0]}); "
                           f"re-create it with `{rebuild_command(name, info)}`")
    rows = [(it.name, it.split, it.label, it.hash) for it in items]
    sha = write_hashes(root / HASHES_FILE, rows)
    old = info.get("integrity") or {}
    verdict = "overlap" if found["overlap"]["test_images"] else "ok"
    info["integrity"] = {"hashes": HASHES_FILE, "hashed_at": "record", "verdict": verdict,
                         "allow_overlap": bool(old.get("allow_overlap")), "dropped": old.get("dropped", []),
                         **found, "hashes_sha256": sha}
    atomic_write_json(root / "dataset.json", info)
