"""`ufgir download` from the catalog's sources: a loopback stand-in for the Hugging Face Hub serves a
parquet copy and a zip in the mirrors' shapes; both UFG archive layouts; the manual steps."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_standin import COMMIT, Hub, serve_hub
from PIL import Image
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.data.catalog import CATALOG, HUB_PARQUET, HUB_ZIPS
from ufgir_cli.data.download import download_dataset
from ufgir_cli.errors import DatasetError

COTTON = replace(CATALOG["cotton80"], num_classes=3, train_val=9, test=6)
ZIP_PATH = "Cotton80/Cotton80.zip"
PARQUET_PATH = "datasets/ufgvc/cotton80_dataset.parquet"


def _png(seed: int) -> bytes:
    """An 8x8 PNG of random pixels: every seed a different picture, also to the content checks."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def cotton_images() -> list[tuple[int, int, str, bytes]]:
    """(label 1-based, index, split, png) for 3 classes x (3 train + 2 test), each image distinct."""
    return [
        (label, k, "train" if k <= 3 else "test", _png(label * 10 + k))
        for label in (1, 2, 3)
        for k in range(1, 6)
    ]


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def filename_layout() -> dict[str, bytes]:
    return {f"Cotton80/cotton_square_new/{c}_{k}_{s}.png": png for c, k, s, png in cotton_images()}


def anno_layout() -> dict[str, bytes]:
    files, anno = {}, {"train": [], "test": []}
    for c, k, s, png in cotton_images():
        files[f"Cotton80/images/{c}_{k}_{s}.png"] = png
        anno[s].append(f"{c}_{k}_{s}.png {c}")
    for s, rows in anno.items():
        files[f"Cotton80/anno/{s}.txt"] = ("\n".join(rows) + "\n").encode()
    return files


def parquet_bytes(rows: list[dict]) -> bytes:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image), ("label", pa.int64()), ("class_name", pa.string()), ("split", pa.string())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, row_group_size=4)
    return buf.getvalue()


def cotton_parquet(base: int = 0, carve_val: bool = True, drop: int = 0) -> bytes:
    """The parquet mirror's shape: labels ``base``-based, a val carved out of train, shuffled rows."""
    rows = []
    for c, k, s, png in cotton_images():
        split = "val" if (carve_val and k == 3) else s
        rows.append({"image": {"bytes": png, "path": f"/upload/cotton/{c}_{k}_{s}.png"},
                     "label": c - 1 + base, "class_name": f"cultivar {c}", "split": split})  # fmt: skip
    rows = rows[::-1][drop:]  # the row order is the uploader's, not the official one
    return parquet_bytes(rows)


# ------------------------------------------------------------------------ a loopback Hub stand-in


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub stand-in (``hub_standin``), its dataset files served the way the Hub's file
    endpoint does, huggingface_hub pointed at it with a fresh cache, and cotton80 shrunk to fit."""
    with serve_hub(monkeypatch, tmp_path / "hf-cache") as state:
        monkeypatch.setitem(CATALOG, "cotton80", COTTON)
        yield state


def splits(root: Path) -> dict[str, list[str]]:
    return {s: (root / "splits" / f"{s}.csv").read_text().splitlines() for s in ("train", "val", "train_val", "test")}


def only_file_endpoint(hub: Hub) -> bool:
    return all("/resolve/main/" in path for _, path, _ in hub.requests)


# ---------------------------------------------------------------------------------------- layouts


def test_both_archive_layouts_give_identical_split_files(tmp_path):
    old = tmp_path / "old.zip"
    new = tmp_path / "new.zip"
    old.write_bytes(zip_bytes(filename_layout()))
    new.write_bytes(zip_bytes(anno_layout()))

    a = download_dataset(COTTON, tmp_path / "a", archive=old).path
    b = download_dataset(COTTON, tmp_path / "b", archive=new).path

    assert splits(a) == splits(b)
    assert splits(a)["val"] == ["class_id,path", "0,images/1_3_train.png", "1,images/2_3_train.png", "2,images/3_3_train.png"]
    assert (a / "images" / "2_4_test.png").read_bytes() == (b / "images" / "2_4_test.png").read_bytes()


def test_anno_file_name_that_climbs_out_is_refused(tmp_path):
    files = anno_layout()
    files["Cotton80/anno/test.txt"] += b"../../outside.png 1\n"
    src = tmp_path / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (tmp_path / "outside.png").write_bytes(b"secret")

    with pytest.raises(DatasetError, match=r"anno/test.txt:7: file name '../../outside.png' climbs out"):
        download_dataset(COTTON, tmp_path / "data", from_folder=src)
    assert list((tmp_path / "data").iterdir()) == []


def test_linked_image_in_a_folder_is_refused(tmp_path):
    src = tmp_path / "src"
    for name, data in anno_layout().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    img = src / "Cotton80" / "images" / "1_1_train.png"
    img.unlink()
    img.symlink_to(tmp_path / "elsewhere.png")

    with pytest.raises(DatasetError, match=r"1_1_train.png is a link; pass a copy that holds the image files"):
        download_dataset(COTTON, tmp_path / "data", from_folder=src)
    assert list((tmp_path / "data").iterdir()) == []


# ------------------------------------------------------------------------------------ Hub mirrors


def test_hub_zip_mirror_builds_the_dataset_and_says_it_is_a_community_copy(tmp_path, hub):
    hub.put(HUB_ZIPS, ZIP_PATH, zip_bytes(anno_layout()))
    notes = []

    result = download_dataset("cotton80", tmp_path / "data", notify=notes.append)

    reference = download_dataset(COTTON, tmp_path / "ref", archive=_write(tmp_path / "old.zip", filename_layout()))
    assert splits(result.path) == splits(reference.path)
    assert result.info["source"] == f"hf://datasets/{HUB_ZIPS}/{ZIP_PATH}@{COMMIT}"
    assert result.info["origin"] == "mirror"
    assert notes == [
        f"cotton80: trying hf://datasets/{HUB_ZIPS}/{ZIP_PATH}@main, a community copy, not the authors'; "
        "the official one is https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA (access code ICCV)"
    ]
    assert [m for m, _, _ in hub.requests] == ["HEAD", "GET"] and only_file_endpoint(hub)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cotton80"]


def test_parquet_mirror_builds_the_same_dataset(tmp_path, hub):
    hub.put(HUB_PARQUET, PARQUET_PATH, cotton_parquet(base=0))
    notes = []

    result = download_dataset("cotton80", tmp_path / "data", notify=notes.append)

    reference = download_dataset(COTTON, tmp_path / "ref", archive=_write(tmp_path / "old.zip", filename_layout()))
    assert splits(result.path) == splits(reference.path)
    assert (result.path / "classes.csv").read_text().splitlines() == [
        "class_id,name", "0,cultivar 1", "1,cultivar 2", "2,cultivar 3"
    ]  # fmt: skip
    assert (result.path / "images" / "3_5_test.png").read_bytes() == (reference.path / "images" / "3_5_test.png").read_bytes()
    assert result.info["source"] == f"hf://datasets/{HUB_PARQUET}/{PARQUET_PATH}@{COMMIT}"
    assert notes[1].startswith(f"cotton80: hf://datasets/{HUB_ZIPS}/{ZIP_PATH}@main failed: ")  # 404: next source
    assert len(notes) == 3 and "community copy" in notes[2]
    assert only_file_endpoint(hub)


def test_parquet_mirror_with_one_based_labels(tmp_path, hub):
    hub.put(HUB_PARQUET, PARQUET_PATH, cotton_parquet(base=1, carve_val=False))
    result = download_dataset("cotton80", tmp_path / "data", source="mirror")
    assert result.info["counts"] == {"train": 6, "val": 3, "train_val": 9, "test": 6}
    assert (result.path / "splits" / "test.csv").read_text().splitlines()[1] == "0,images/1_4_test.png"


def test_pooled_rounds_from_one_parquet_file_per_round(tmp_path, hub):
    spec = replace(CATALOG["soyageing"], num_classes=2, train_val=10, test=10)
    for r in spec.rounds:
        rows = [
            {"image": {"bytes": _png(r * 100 + c * 10 + k), "path": f"yd{c:03d}_R{r}_{k}_{s}.png"}, "label": c, "class_name": f"yd{c:03d}", "split": s}
            for c in (1, 2)
            for k, s in ((1, "train"), (2, "test"))
        ]
        hub.put(HUB_PARQUET, f"datasets/ufgvc/soy_ageing_R{r}_dataset.parquet", parquet_bytes(rows))

    root = download_dataset(spec, tmp_path / "data").path

    assert (root / "splits" / "train_val.csv").read_text().splitlines()[1:6] == [
        f"0,images/R{r}/yd001_R{r}_1_train.png" for r in spec.rounds
    ]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"R{r}" for r in spec.rounds]


def test_interrupted_hub_download_resumes(tmp_path, hub, monkeypatch):
    # huggingface_hub keeps what it wrote in whole chunks (10 MB); small ones make a tiny file resumable
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 512)
    body = cotton_parquet()
    hub.put(HUB_PARQUET, PARQUET_PATH, body)
    half = len(body) // 2
    hub.cut_next_get = half

    result = download_dataset("cotton80", tmp_path / "data", source="mirror")

    ranges = [rng for method, path, rng in hub.requests if method == "GET" and "parquet" in path]
    assert len(ranges) == 2 and ranges[0] is None
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[1])[1]) <= half  # the second asked only for the rest
    assert result.info["counts"]["test"] == 6
    assert result.info["archive_sha256"] == hashlib.sha256(body).hexdigest()


def test_mirror_with_wrong_counts_is_refused_with_the_numbers(tmp_path, hub):
    hub.put(HUB_PARQUET, PARQUET_PATH, cotton_parquet(drop=2))  # two test rows short
    data = tmp_path / "data"
    notes = []

    with pytest.raises(DatasetError) as err:
        download_dataset("cotton80", data, notify=notes.append)

    assert "the copy's splits (test 4, train 6, val 3 images) do not make the catalog's train_val 9 / test 6" in notes[-1]
    msg = str(err.value)
    assert msg.startswith(f"cotton80: could not fetch it from {HUB_ZIPS}, {HUB_PARQUET}; get Cotton80.zip by hand from ")
    assert "https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA (access code ICCV)" in msg
    assert "`ufgir download cotton80 --archive Cotton80.zip`, or `--from-folder DIR`" in msg
    assert list(data.iterdir()) == []  # no dataset folder, no scratch folder


def test_unsafe_file_name_in_a_parquet_row_is_refused(tmp_path, hub):
    rows = [{"image": {"bytes": _png(1), "path": ".."}, "label": 0, "class_name": "a", "split": "train"}]
    hub.put(HUB_PARQUET, PARQUET_PATH, parquet_bytes(rows * 9 + [{**rows[0], "split": "test"}] * 6))
    notes = []
    with pytest.raises(DatasetError):
        download_dataset(replace(COTTON, num_classes=1), tmp_path / "data", source="mirror", notify=notes.append)
    assert notes[-1].endswith("failed: cotton80: a row's file name '..' climbs out of the target with '..'; refusing the copy")
    assert list((tmp_path / "data").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf-cache"]


def test_offline_or_official_only_gives_the_manual_steps(tmp_path, hub, monkeypatch):
    with pytest.raises(DatasetError, match=r"^cotton80: no official source of it can be fetched by a program; get "
                       r"Cotton80.zip by hand from https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA \(access code ICCV\)"):
        download_dataset("cotton80", tmp_path / "data", source="official")
    assert hub.requests == []

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.put(HUB_PARQUET, PARQUET_PATH, cotton_parquet())
    with pytest.raises(DatasetError, match=r"^cotton80: could not fetch it from .*--archive Cotton80.zip"):
        download_dataset("cotton80", tmp_path / "data")
    assert hub.requests == []


# ------------------------------------------------------------------------------------------- CLI


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "100", "UFGIR_DEBUG": ""})


def test_cli_json_summary_and_mirror_note(tmp_path, hub):
    hub.put(HUB_PARQUET, PARQUET_PATH, cotton_parquet())
    result = _cli("download", "cotton80", "--source", "mirror", "--json", "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "created" and summary["origin"] == "mirror"
    assert summary["counts"] == {"train": 6, "val": 3, "train_val": 9, "test": 6}
    assert summary["source"] == f"hf://datasets/{HUB_PARQUET}/{PARQUET_PATH}@{COMMIT}"


def test_cli_nothing_fetchable_is_one_line(tmp_path, hub):
    result = _cli("download", "soygene", "--source", "official", "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: soygene: no official source of it can be fetched")
    assert "`ufgir download soygene --archive SoyGene.zip`" in lines[0]


def test_cli_datasets_prints_every_source_whole(tmp_path):
    result = _cli("datasets", "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    out = result.stdout
    long = f"hf://datasets/{HUB_PARQUET}/datasets/ufgvc/soy_ageing_R6_dataset.parquet@main"
    assert long in out  # never cut or wrapped, even at 100 columns
    assert "https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA (access code ICCV)" in out
    assert "community copy on the Hugging Face Hub, not the authors'" in out


def _write(path: Path, files: dict[str, bytes]) -> Path:
    path.write_bytes(zip_bytes(files))
    return path
