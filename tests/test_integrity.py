"""Content checks on copies shaped like the real mirrors (issue 28): a parquet whose ``val`` is a copy
of ``test``, a zip whose labels start at 0 or 1, a per-round parquet set, a test image re-saved as a
JPEG at quality 90 under another name in train; `ufgir datasets verify` and the checks before training."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_sources
from PIL import Image
from test_sources import (
    COMMIT,
    HUB_PARQUET,
    HUB_ZIPS,
    PARQUET_PATH,
    ZIP_PATH,
    _cli,
    _png,
    parquet_bytes,
    splits,
    zip_bytes,
)

from ufgir_cli.data.catalog import CATALOG
from ufgir_cli.data.content import Hasher, ImageHash, dct_hash, hash_bytes, hash_file, hash_files, psnr
from ufgir_cli.data.download import download_dataset
from ufgir_cli.data.integrity import PSNR_DB, _close_pairs, check_recorded, dataset_notices
from ufgir_cli.data.verify import verify_dataset
from ufgir_cli.errors import DatasetError

COTTON = replace(CATALOG["cotton80"], num_classes=3, train_val=9, test=6)
hub = test_sources.hub  # the loopback Hub stand-in fixture


def smooth(seed: int, size: int = 48) -> np.ndarray:
    """A smooth picture (gradients and a disc), the kind a JPEG keeps close: PSNR well above 30 dB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(0.2, 1.0, 3)
    disc = ((x - a / 2 - 0.2) ** 2 + (y - b / 2 - 0.2) ** 2 < 0.05).astype(float)
    img = np.stack([a * x + 0.3 * disc, b * y, c * (1 - x) * y + 0.5 * disc], axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def images() -> list[tuple[int, int, str, bytes]]:
    """(label 1-based, index, split, png) for 3 classes x (3 train + 2 test); 2_4_test is a smooth picture."""
    out = []
    for label in (1, 2, 3):
        for k in range(1, 6):
            png = encode(smooth(7), "PNG") if (label, k) == (2, 4) else _png(label * 10 + k)
            out.append((label, k, "train" if k <= 3 else "test", png))
    return out


def anno_zip(base: int = 1, leak: bool = False) -> bytes:
    """The official anno/ layout with labels from ``base``; ``leak``: 1_2_train.jpg is 2_4_test.png as a
    JPEG at quality 90 (and of class 2), in place of 1_2_train.png."""
    files, anno = {}, {"train": [], "test": []}
    for c, k, s, png in images():
        name, data = f"{c}_{k}_{s}.png", png
        if leak and (c, k) == (1, 2):
            name, data, c = "1_2_train.jpg", encode(smooth(7), "JPEG", quality=90), 2
        files[f"Cotton80/images/{name}"] = data
        anno[s].append(f"{name} {c - 1 + base}")
    for s, rows in anno.items():
        files[f"Cotton80/anno/{s}.txt"] = ("\n".join(rows) + "\n").encode()
    return zip_bytes(files)


def leak_rows() -> list[dict]:
    """The parquet rows of ``anno_zip(leak=True)``: 2_4_test.png also in train as 1_2_train.jpg (quality 90)."""
    rows = []
    for c, k, s, png in images():
        name, data, label = f"{c}_{k}_{s}.png", png, c - 1
        if (c, k) == (1, 2):
            name, data, label = "1_2_train.jpg", encode(smooth(7), "JPEG", quality=90), 1
        rows.append({"image": {"bytes": data, "path": name}, "label": label, "class_name": None, "split": s})
    return rows


def parquet_with_val_copy() -> bytes:
    """The parquet mirror's Cotton80 shape: train, val (a copy of test, other names) and test."""
    rows = []
    for c, k, s, png in images():
        row = {"image": {"bytes": png, "path": f"{c}_{k}_{s}.png"}, "label": c - 1, "class_name": f"c{c}", "split": s}
        rows.append(row)
        if s == "test":
            rows.append({**row, "image": {"bytes": png, "path": f"val_{c}_{k}.png"}, "split": "val"})
    return parquet_bytes(rows)


# ------------------------------------------------------------------------------------ the hashes


def test_jpeg_resave_is_near_in_hash_and_pixels_and_a_lossless_one_is_exact():
    pic = smooth(7)
    png, jpg, bmp = encode(pic, "PNG"), encode(pic, "JPEG", quality=90), encode(pic, "BMP")
    h_png, h_jpg, h_bmp = hash_bytes(png), hash_bytes(jpg), hash_bytes(bmp)
    assert h_png.bytes_sha256 != h_bmp.bytes_sha256 and h_png.pixels_sha256 == h_bmp.pixels_sha256
    assert h_png.pixels_sha256 != h_jpg.pixels_sha256
    assert bin(h_png.phash ^ h_jpg.phash).count("1") <= 4
    assert 30 < psnr(pic, np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))) < 60
    other = dct_hash(smooth(8))
    assert bin(h_png.phash ^ other).count("1") > 8
    assert hash_bytes(b"not an image").error and hash_bytes(b"not an image").pixels_sha256 is None


def test_hasher_hashes_handed_files_and_the_rest_in_the_order_asked(tmp_path):
    files = {tmp_path / f"{k}.png": _png(k) for k in range(5)} | {tmp_path / "x.jpg": encode(smooth(3), "JPEG")}
    files[tmp_path / "bad.png"] = b"\x89PNG not really"
    for path, data in files.items():
        path.write_bytes(data)
    handed = list(files)[::2]
    with Hasher(workers=2) as hasher:
        for path in handed:
            hasher.add(path)
        got = hasher.hashes(list(reversed(files)))
    assert got == [hash_file(p) for p in reversed(files)]
    assert [h.grey for h in got] == [hash_file(p).grey for p in reversed(files)]
    assert got[0].error and got[0].pixels_sha256 is None  # bad.png, decoded in a worker, reported, not raised
    assert hash_files([]) == []


@pytest.mark.parametrize("source", ["zip", "parquet"])
def test_unpacking_hands_every_image_to_the_hasher_as_it_is_written(tmp_path, hub, monkeypatch, source):
    handed, asked, before = [], [], []  # paths handed over; asked for at the end; handed by then
    add, hashes = Hasher.add, Hasher.hashes

    def collect(self, paths, progress=None):
        asked.extend(paths)
        before.extend(handed)
        return hashes(self, paths, progress)

    monkeypatch.setattr(Hasher, "add", lambda self, path: handed.append(Path(path)) or add(self, path))
    monkeypatch.setattr(Hasher, "hashes", collect)
    if source == "zip":
        hub.put(HUB_ZIPS, ZIP_PATH, anno_zip(leak=True))
    else:
        hub.put(HUB_PARQUET, PARQUET_PATH, parquet_bytes(leak_rows()))
    root = download_dataset("cotton80", tmp_path / "data", source="mirror", allow_overlap=True).path

    assert len(asked) == 15 and sorted(map(Path, asked)) == sorted(before)  # every image, before any was asked for
    rows = [line.split(",") for line in (root / "hashes.csv").read_text().splitlines()[1:]]
    assert len(rows) == 15
    for path, _split, _cid, sha, pixels, phash in rows:
        h = hash_file(root / path)
        assert (sha, pixels, phash) == (h.bytes_sha256, h.pixels_sha256, f"{h.phash:016x}")


def test_close_pairs_coarse_bound_drops_no_pair_the_thumbnails_keep():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 1024)
    greys = [np.clip(base + rng.integers(-s, s + 1, 1024), 0, 255).astype(np.uint8) for s in range(0, 120, 2)]
    hashes = [ImageHash("", "", 0, grey=g.tobytes()) for g in greys]  # one phash: every pair is hash-close
    max_mse = 255.0**2 / 10 ** (PSNR_DB / 10)
    want = [(a, b) for a in range(len(greys)) for b in range(a + 1, len(greys))
            if ((greys[a].astype(np.float32) - greys[b].astype(np.float32)) ** 2).mean() <= max_mse]
    assert 0 < len(want) < len(greys) * (len(greys) - 1) // 2  # pairs on both sides of the bound
    assert _close_pairs(hashes) == want


# --------------------------------------------------------------------------- mirrors' shapes


def test_parquet_val_copy_of_test_is_dropped_with_a_notice(tmp_path, hub):
    hub.put(HUB_PARQUET, PARQUET_PATH, parquet_with_val_copy())  # 9 + 6 + 6 rows: counts alone refuse it
    notes = []
    result = download_dataset("cotton80", tmp_path / "data", source="mirror", notify=notes.append)

    assert "cotton80: the copy's split 'val' is its split 'test' again (6 images, same pictures and labels); " \
           "dropped 'val'" in notes
    assert result.info["counts"] == {"train": 6, "val": 3, "train_val": 9, "test": 6}
    integ = result.info["integrity"]
    assert integ["dropped"] == [{"split": "val", "copy_of": "test", "images": 6}]
    assert integ["verdict"] == "ok" and integ["overlap"]["test_images"] == 0
    hashes = (result.path / "hashes.csv").read_text().splitlines()
    assert hashes[0] == "path,split,class_id,bytes_sha256,pixels_sha256,phash" and len(hashes) == 16
    assert not any("val_" in line for line in hashes)
    assert verify_dataset("cotton80", result.path)["ok"] is True


@pytest.mark.parametrize("base", [0, 1])
def test_zip_labels_from_zero_or_one_give_the_same_folder(tmp_path, hub, base):
    hub.put(HUB_ZIPS, ZIP_PATH, anno_zip(base=base))
    root = download_dataset("cotton80", tmp_path / "data", source="mirror").path
    ref = download_dataset(COTTON, tmp_path / "ref", archive=_file(tmp_path / "ref.zip", anno_zip(base=1))).path
    assert splits(root) == splits(ref)
    assert (root / "classes.csv").read_text().splitlines() == ["class_id,name", "0,1", "1,2", "2,3"]
    assert splits(root)["test"][1:3] == ["0,images/1_4_test.png", "0,images/1_5_test.png"]


def test_class_folders_that_disagree_name_the_id_and_both_names(tmp_path):
    files = {"C/anno/train.txt": b"a/x.png 1\nb/y.png 1\n", "C/anno/test.txt": b"a/z.png 1\n"}
    for name in ("a/x.png", "b/y.png", "a/z.png"):
        files[f"C/images/{name}"] = _png(len(name))
    with pytest.raises(DatasetError, match=r"class id 0 is named 'a' at anno/train.txt:1 and 'b' at anno/train.txt:2"):
        download_dataset(COTTON, tmp_path / "data", archive=_file(tmp_path / "c.zip", files))


def test_per_round_parquet_files_pool_in_the_catalogs_round_order(tmp_path, hub):
    spec = replace(CATALOG["soyageing"], num_classes=2, train_val=10, test=10)
    src = spec.sources[-1]
    spec = replace(spec, sources=(replace(src, files=tuple(reversed(src.files))),))  # listed R6 first
    for r in spec.rounds:
        rows = [{"image": {"bytes": _png(r * 100 + c * 10 + k), "path": f"yd{c:03d}_{k}_{s}.png"}, "label": c - 1,
                 "class_name": f"yd{c:03d}", "split": s} for c in (1, 2) for k, s in ((1, "train"), (2, "test"))]  # fmt: skip
        hub.put(HUB_PARQUET, f"datasets/ufgvc/soy_ageing_R{r}_dataset.parquet", parquet_bytes(rows))

    root = download_dataset(spec, tmp_path / "data").path

    assert splits(root)["train_val"][1:6] == [f"0,images/R{r}/yd001_1_train.png" for r in (1, 3, 4, 5, 6)]
    assert (root / "classes.csv").read_text().splitlines() == ["class_id,name", "0,yd001", "1,yd002"]
    info = json.loads((root / "dataset.json").read_text())
    assert info["integrity"]["images"] == 20 and info["integrity"]["duplicates"]["test"]["images"] == 0


def test_test_image_resaved_as_jpeg_in_train_refuses_the_mirror_and_keeps_the_old_folder(tmp_path, hub):
    data = tmp_path / "data"
    hub.put(HUB_ZIPS, ZIP_PATH, anno_zip())
    old = download_dataset("cotton80", data, source="mirror").path
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    hub.put(HUB_ZIPS, ZIP_PATH, anno_zip(leak=True))

    del hub.files[HUB_ZIPS, ZIP_PATH]  # the next try finds the zip gone and a parquet copy with the re-save
    hub.put(HUB_PARQUET, PARQUET_PATH, parquet_bytes(leak_rows()))

    with pytest.raises(DatasetError) as err:
        download_dataset("cotton80", data, source="mirror", force=True)

    msg = str(err.value)
    assert msg.startswith(f"cotton80: 1 test images of hf://datasets/{HUB_PARQUET}/{PARQUET_PATH}@{COMMIT} are also "
                          "in train_val by content (e.g. images/2_4_test.png = images/1_2_train.jpg); refusing")
    assert "pass --allow-overlap" in msg and "\n" not in msg
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in data.iterdir()) == ["cotton80"]  # no scratch folder left


def test_allow_overlap_is_recorded_and_told_before_every_run(tmp_path, hub):
    hub.put(HUB_ZIPS, ZIP_PATH, anno_zip(leak=True))
    root = download_dataset("cotton80", tmp_path / "data", source="mirror", allow_overlap=True).path

    integ = json.loads((root / "dataset.json").read_text())["integrity"]
    assert (integ["verdict"], integ["allow_overlap"], integ["overlap"]["test_images"]) == ("overlap", True, 1)
    assert dataset_notices(root) == [
        "cotton80: 1 test images are also in train_val by content (allowed with --allow-overlap; e.g. "
        "images/2_4_test.png = images/1_2_train.jpg); test accuracy on this data overstates"
    ]
    report = verify_dataset("cotton80", root)
    assert report["ok"] is True and report["overlap"]["test_images"] == 1


def test_overlap_in_the_users_own_copy_is_reported_not_refused(tmp_path):
    notes = []
    result = download_dataset(COTTON, tmp_path / "data", archive=_file(tmp_path / "a.zip", anno_zip(leak=True)),
                              notify=notes.append)
    assert result.status == "created" and result.info["integrity"]["verdict"] == "overlap"
    assert notes[-1].endswith("(e.g. images/2_4_test.png = images/1_2_train.jpg); kept, as published and recorded "
                              "in dataset.json")


# --------------------------------------------------------------------------- verify and train


def test_verify_names_changed_and_removed_files_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOG, "cotton80", COTTON)
    data = tmp_path / "data"
    root = download_dataset(COTTON, data, archive=_file(tmp_path / "a.zip", anno_zip())).path
    ok = _cli("datasets", "verify", "cotton80", "--json", "--data-dir", str(data))
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["ok"] is True

    (root / "images" / "1_1_train.png").write_bytes(_png(999))
    (root / "images" / "3_5_test.png").unlink()
    bad = _cli("datasets", "verify", "cotton80", "--json", "--data-dir", str(data))

    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert (report["changed"], report["removed"]) == (["images/1_1_train.png"], ["images/3_5_test.png"])
    assert report["problems"] == ["1 images changed since download: images/1_1_train.png",
                                  "1 images removed since download: images/3_5_test.png"]
    assert report["images"] == 14 and report["counts"]["test"] == 6


def test_folder_from_before_content_checks_says_so_and_record_hashes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOG, "cotton80", COTTON)
    data = tmp_path / "data"
    root = download_dataset(COTTON, data, archive=_file(tmp_path / "a.zip", anno_zip()), hash_images=False).path
    assert not (root / "hashes.csv").exists() and "integrity" not in json.loads((root / "dataset.json").read_text())

    plain = _cli("datasets", "verify", "cotton80", "--data-dir", str(data))
    assert plain.exit_code == 0, plain.output
    assert "cotton80 was downloaded before content checks: its files cannot be compared with the download; " \
           "`ufgir datasets verify cotton80 --record` hashes it now" in plain.stdout

    recorded = _cli("datasets", "verify", "cotton80", "--record", "--data-dir", str(data))
    assert recorded.exit_code == 0, recorded.output
    integ = json.loads((root / "dataset.json").read_text())["integrity"]
    assert (integ["hashed_at"], integ["verdict"], integ["images"]) == ("record", "ok", 15)
    assert len((root / "hashes.csv").read_text().splitlines()) == 16
    assert verify_dataset("cotton80", root)["notes"] == []


def test_training_checks_recorded_counts_and_verdict_first(tmp_path):
    root = download_dataset(COTTON, tmp_path / "data", archive=_file(tmp_path / "a.zip", anno_zip())).path
    info = json.loads((root / "dataset.json").read_text())
    check_recorded(root, info, {"train": 6, "test": 6})  # as recorded: no error
    with pytest.raises(DatasetError, match=r"splits/test.csv lists 7 images but dataset.json records 6; the split "
                                           r"files were changed: check with `ufgir datasets verify cotton80`"):
        check_recorded(root, info, {"train": 6, "test": 7})
    info["integrity"]["verdict"] = "tampered"
    with pytest.raises(DatasetError, match=r"records the verdict 'tampered'; run `ufgir datasets verify cotton80`"):
        check_recorded(root, info, {"train": 6, "test": 6})
    assert dataset_notices(root) == []


def _file(path: Path, body: bytes | dict) -> Path:
    path.write_bytes(zip_bytes(body) if isinstance(body, dict) else body)
    return path
