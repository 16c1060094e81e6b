"""`ufgir download` / `ufgir datasets`: tiny archives laid out like each published dataset family,
served over a loopback HTTP server or passed as local files."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
import types
import zipfile
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import loopback_server
from PIL import Image
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.data.catalog import CATALOG, DatasetSpec
from ufgir_cli.data.download import dataset_status, download_dataset
from ufgir_cli.data.folder import read_split, write_dataset_folder
from ufgir_cli.errors import DatasetError


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 120, 60)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _image("PNG")
JPEG = _image("JPEG")


def noise_png(seed: int) -> bytes:
    """An 8x8 PNG of random pixels: every seed a different picture (content checks tell them apart)."""
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------- loopback server


@dataclass
class Server:
    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)  # path and lower-cased headers per GET
    cut_next: int | None = None  # send only this many body bytes of the next response, then hang up
    honour_range: bool = True

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.base_url + path


@pytest.fixture
def server():
    state = Server()

    class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: the connection closes after each response
        def do_GET(self):
            state.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            rng = self.headers.get("Range")
            if rng and state.honour_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if state.cut_next is not None:
                payload, state.cut_next = payload[: state.cut_next], None
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    with loopback_server(Handler) as state.base_url:
        yield state


# ------------------------------------------------------------------------- archives and layouts


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_tar(
    path: Path, files: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] = ()
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def cotton_files(classes: int = 3, train: int = 3, test: int = 2) -> dict[str, bytes]:
    """Cotton80's layout: <label>_<index>_<split>.png in cotton_square_new/, plus stray files."""
    files = {"Cotton80/readme.txt": b"notes", "Cotton80/cotton_square_new/Thumbs.db": b"junk"}
    for label in range(1, classes + 1):
        for k in range(1, train + test + 1):
            split = "train" if k <= train else "test"
            files[f"Cotton80/cotton_square_new/{label}_{k}_{split}.png"] = noise_png(label * 100 + k)
    return files


def small(name: str, classes: int, train_val: int, test: int, **kw) -> DatasetSpec:
    return replace(CATALOG[name], num_classes=classes, train_val=train_val, test=test, **kw)


COTTON = small("cotton80", 3, 9, 6)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------- catalog


def test_catalog_matches_the_benchmark():
    sizes = {n: (s.num_classes, s.train_val, s.test) for n, s in CATALOG.items()}
    assert sizes["cotton80"] == (80, 240, 240)
    assert sizes["soylocal"] == (200, 600, 600)
    assert sizes["soyglobal"] == (1938, 5814, 5814)
    assert sizes["soygene"] == (1110, 12763, 11143)
    assert sizes["soyageing"] == (198, 4950, 4950)
    assert sizes["cub200"] == (200, 5994, 5794)
    ufg = ["cotton80", "soylocal", "soyglobal", "soygene", "soyageing"]
    assert sum(CATALOG[n].num_images for n in ufg) == 47114
    assert sum(CATALOG[n].num_classes for n in ufg) == 3526
    pooled = CATALOG["soyageing"]
    assert pooled.rounds == (1, 3, 4, 5, 6)
    for r in pooled.rounds:
        sub = CATALOG[f"soyageing_r{r}"]
        assert (sub.num_classes, sub.train_val, sub.test, sub.rounds) == (198, 990, 990, (r,))
        assert sub.sources[-1].files == (f"datasets/ufgvc/soy_ageing_R{r}_dataset.parquet",)
    assert pooled.sources[-1].files == tuple(f"datasets/ufgvc/soy_ageing_R{r}_dataset.parquet" for r in pooled.rounds)
    assert "soyageing_r2" not in CATALOG
    assert CATALOG["cub200"].labels == "cub" and CATALOG["cub200"].sources[-1].url.startswith(
        "https://data.caltech.edu/records/65de6-vp158"
    )
    synthetic = CATALOG["synthetic"]
    assert (synthetic.kind, synthetic.sources, synthetic.archive) == ("generated", (), None)
    for spec in CATALOG.values():
        if spec.kind != "archive":
            continue
        assert spec.archive and spec.terms
        # the official source comes first, and only published addresses appear (no composed archive URLs)
        assert spec.sources[0].origin == "official" and spec.sources[0].fetch == "manual"
        for src in spec.sources:
            assert src.provenance and src.terms
            assert src.origin == "official" or (src.fetch == "hub" and "community copy" in src.provenance)
            assert "maxwell.ict.griffith.edu.au" not in (src.url or "")
    ufg_official = [s for n in ufg for s in CATALOG[n].sources if s.origin == "official"]
    assert {s.where for s in ufg_official} >= {
        "https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA (access code ICCV)"
    }
    assert [s.files for s in CATALOG["cotton80"].sources if s.fetch == "hub"] == [
        ("Cotton80/Cotton80.zip",),
        ("datasets/ufgvc/cotton80_dataset.parquet",),
    ]


def test_unknown_dataset_lists_the_catalog(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'; choose one of: cotton80, soylocal"):
        download_dataset("nope", tmp_path)


# -------------------------------------------------------------------------- each dataset family


def test_cotton_file_name_layout_over_http(tmp_path, server):
    body = make_zip(tmp_path / "Cotton80.zip", cotton_files()).read_bytes()
    url = server.serve("/ufg/Cotton80.zip", body)
    data = tmp_path / "data"

    result = download_dataset(COTTON, data, url=url)

    root = data / "cotton80"
    assert (result.status, result.path, result.archive) == (
        "created",
        root,
        data / "downloads" / "Cotton80.zip",
    )
    img = "images"  # the older layout's folder is dropped: both layouts give the same paths
    assert lines(root / "splits" / "train.csv") == ["class_id,path"] + [
        f"{c - 1},{img}/{c}_{k}_train.png" for c in (1, 2, 3) for k in (1, 2)
    ]
    assert lines(root / "splits" / "val.csv") == ["class_id,path"] + [
        f"{c - 1},{img}/{c}_3_train.png" for c in (1, 2, 3)
    ]
    assert lines(root / "splits" / "test.csv") == ["class_id,path"] + [
        f"{c - 1},{img}/{c}_{k}_test.png" for c in (1, 2, 3) for k in (4, 5)
    ]
    assert len(lines(root / "splits" / "train_val.csv")) == 1 + 9
    assert lines(root / "classes.csv") == ["class_id,name", "0,1", "1,2", "2,3"]
    info = json.loads((root / "dataset.json").read_text())
    assert info["counts"] == {"train": 6, "val": 3, "train_val": 9, "test": 6}
    assert (info["num_classes"], info["name"], info["source"]) == (3, "cotton80", url)
    assert (info["archive_sha256"], info["archive_sha256_verified"]) == (sha(body), False)
    assert (root / img / "3_5_test.png").read_bytes() == noise_png(305)
    assert not (root / img / "Thumbs.db").exists()  # only labelled images are kept
    assert sorted(p.name for p in data.iterdir()) == ["cotton80", "downloads"]  # no scratch folder left
    assert sorted(p.name for p in (data / "downloads").iterdir()) == ["Cotton80.zip"]
    assert len(read_split(root, "test").samples) == 6
    assert server.requests[0]["user-agent"].startswith("ufgir/")


def test_soygene_anno_layout_tar_gz(tmp_path, server):
    files = {}
    anno = {"train": [], "test": []}
    for label in (1, 2):
        for k in range(1, 6):
            split = "train" if k <= 3 else "test"
            name = f"{100 + label}_{k}_{split}.png"
            files[f"soybean_gene/images/{name}"] = noise_png(label * 100 + k)
            anno[split].append(f"{name} {label}")
    for split, rows in anno.items():
        files[f"soybean_gene/anno/{split}.txt"] = ("\n".join(rows) + "\n\n").encode()
    body = make_tar(tmp_path / "SoyGene.tar.gz", files).read_bytes()
    url = server.serve("/SoyGene.zip", body)

    root = download_dataset(small("soygene", 2, 6, 4), tmp_path / "data", url=url).path

    assert lines(root / "splits" / "train.csv") == [
        "class_id,path",
        "0,images/101_1_train.png",
        "0,images/101_2_train.png",
        "1,images/102_1_train.png",
        "1,images/102_2_train.png",
    ]
    assert lines(root / "splits" / "val.csv")[1:] == ["0,images/101_3_train.png", "1,images/102_3_train.png"]
    assert lines(root / "splits" / "test.csv")[1:] == [
        "0,images/101_4_test.png",
        "0,images/101_5_test.png",
        "1,images/102_4_test.png",
        "1,images/102_5_test.png",
    ]
    assert (root / "images" / "102_5_test.png").is_file()


def soyageing_files(rounds=(1, 3, 4, 5, 6), cultivars=(1, 2)) -> dict[str, bytes]:
    """SoyAgeing: R<r>/images/yd<nnn>_R<r>_<k>_<split>.png with per-round anno files."""
    files = {}
    for r in rounds:
        anno = {"train": [], "test": []}
        for c in cultivars:
            for k, split in ((1, "train"), (2, "test")):
                name = f"yd{c:03d}_R{r}_{k}_{split}.png"
                files[f"SoyAgeing/R{r}/images/{name}"] = noise_png(r * 1000 + c * 10 + k)
                anno[split].append(f"{name} {c}")
        for split, rows in anno.items():
            files[f"SoyAgeing/R{r}/anno/{split}.txt"] = "\n".join(rows).encode()
    return files


def test_soyageing_pooled_and_one_round_share_one_download(tmp_path, server):
    body = make_tar(tmp_path / "SoyAgeing.tar.xz", soyageing_files(), mode="w:xz").read_bytes()
    url = server.serve("/SoyAgeing.zip", body)
    data = tmp_path / "data"

    pooled = download_dataset(small("soyageing", 2, 10, 10), data, url=url).path
    r3 = download_dataset(small("soyageing_r3", 2, 2, 2), data, url=url).path

    assert len(server.requests) == 1  # the round reused the cached archive
    train_val = lines(pooled / "splits" / "train_val.csv")[1:]
    assert train_val[:5] == [f"0,images/R{r}/yd001_R{r}_1_train.png" for r in (1, 3, 4, 5, 6)]
    assert train_val[5:] == [f"1,images/R{r}/yd002_R{r}_1_train.png" for r in (1, 3, 4, 5, 6)]
    assert lines(pooled / "splits" / "val.csv")[1:] == [
        "0,images/R6/yd001_R6_1_train.png",
        "1,images/R6/yd002_R6_1_train.png",
    ]
    assert lines(r3 / "splits" / "test.csv")[1:] == [
        "0,images/R3/yd001_R3_2_test.png",
        "1,images/R3/yd002_R3_2_test.png",
    ]
    assert sorted(p.name for p in (r3 / "images").iterdir()) == ["R3"]
    assert json.loads((r3 / "dataset.json").read_text())["archive_sha256"] == sha(body)


def test_cub_layout_tgz(tmp_path, server):
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    files = {"CUB_200_2011/classes.txt": "".join(f"{i} {n}\n" for i, n in enumerate(names, 1)).encode()}
    images, labels, split = [], [], []
    image_id = 0
    for label, cname in enumerate(names, 1):
        for k in range(1, 5):
            image_id += 1
            rel = f"{cname}/{cname[4:]}_{k:04d}.jpg"
            files[f"CUB_200_2011/images/{rel}"] = JPEG
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label}")
            split.append(f"{image_id} {int(k != 2)}")
    for fname, rows in (("images", images), ("image_class_labels", labels), ("train_test_split", split)):
        files[f"CUB_200_2011/{fname}.txt"] = ("\n".join(rows) + "\n").encode()
    body = make_tar(tmp_path / "CUB_200_2011.tgz", files).read_bytes()
    url = server.serve("/records/CUB_200_2011.tgz?download=1", body)

    root = download_dataset(small("cub200", 3, 9, 3), tmp_path / "data", url=url).path

    assert lines(root / "classes.csv")[1:] == [f"{i},{n}" for i, n in enumerate(names)]
    assert lines(root / "splits" / "test.csv")[1:] == [
        f"{i},images/{n}/{n[4:]}_0002.jpg" for i, n in enumerate(names)
    ]
    assert lines(root / "splits" / "train.csv")[1:3] == [
        "0,images/001.Black_footed_Albatross/Black_footed_Albatross_0001.jpg",
        "0,images/001.Black_footed_Albatross/Black_footed_Albatross_0003.jpg",
    ]
    assert json.loads((root / "dataset.json").read_text())["counts"] == {
        "train": 6,
        "val": 3,
        "train_val": 9,
        "test": 3,
    }
    assert (tmp_path / "data" / "downloads" / "CUB_200_2011.tgz").is_file()


def test_from_folder_leaves_the_source_untouched(tmp_path):
    src = tmp_path / "extracted"
    for name, data in cotton_files().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))

    result = download_dataset(COTTON, tmp_path / "data", from_folder=src)

    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before
    info = json.loads((result.path / "dataset.json").read_text())
    assert (info["source"], info["archive_sha256"], result.archive) == (str(src.resolve()), None, None)
    assert len(lines(result.path / "splits" / "train_val.csv")) == 10
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cotton80"]


# ----------------------------------------------------------------------------- resume and hashes


def test_interrupted_download_resumes_with_a_range_request(tmp_path, server):
    body = make_zip(tmp_path / "Cotton80.zip", cotton_files()).read_bytes()
    url = server.serve("/Cotton80.zip", body)
    spec = COTTON
    data = tmp_path / "data"
    half = len(body) // 2
    server.cut_next = half

    with pytest.raises(
        DatasetError, match=rf"stopped at {half} of {len(body)} bytes; run the same command again"
    ):
        download_dataset(spec, data, url=url)
    assert (data / "downloads" / "Cotton80.zip.part").stat().st_size == half
    assert not (data / "cotton80").exists()

    result = download_dataset(spec, data, url=url)

    assert "range" not in server.requests[0]
    assert server.requests[1]["range"] == f"bytes={half}-"
    assert (data / "downloads" / "Cotton80.zip").read_bytes() == body
    assert not (data / "downloads" / "Cotton80.zip.part").exists()
    assert result.info["archive_sha256"] == sha(body)
    assert result.info["counts"]["test"] == 6


def test_server_that_ignores_range_restarts_cleanly(tmp_path, server):
    body = make_zip(tmp_path / "Cotton80.zip", cotton_files()).read_bytes()
    url = server.serve("/Cotton80.zip", body)
    spec = replace(COTTON, sha256=sha(body))
    server.honour_range = False
    part = tmp_path / "data" / "downloads" / "Cotton80.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage")

    result = download_dataset(spec, tmp_path / "data", url=url)

    assert server.requests[0]["range"] == "bytes=7-"
    assert (part.parent / "Cotton80.zip").read_bytes() == body  # no stale prefix
    assert (result.info["archive_sha256"], result.info["archive_sha256_verified"]) == (sha(body), True)


def test_partial_file_longer_than_the_archive_starts_over(tmp_path, server):
    body = make_zip(tmp_path / "Cotton80.zip", cotton_files()).read_bytes()
    url = server.serve("/Cotton80.zip", body)
    spec = COTTON
    part = tmp_path / "data" / "downloads" / "Cotton80.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body + b"stale tail")

    download_dataset(spec, tmp_path / "data", url=url)

    assert [r.get("range") for r in server.requests] == [f"bytes={len(body) + 10}-", None]  # 416, then all
    assert (part.parent / "Cotton80.zip").read_bytes() == body


def test_http_error_names_the_status_and_the_fix(tmp_path, server):
    url = server.base_url + "/gone.zip"
    spec = COTTON
    with pytest.raises(
        DatasetError,
        match=r"download of http://\S+/gone.zip failed: HTTP 404 .*; check --url or pass --archive FILE",
    ):
        download_dataset(spec, tmp_path / "data", url=url)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["downloads"]


def test_wrong_sha256_deletes_the_download(tmp_path, server):
    body = make_zip(tmp_path / "Cotton80.zip", cotton_files()).read_bytes()
    url = server.serve("/Cotton80.zip", body)
    spec = replace(COTTON, sha256="0" * 64)
    data = tmp_path / "data"

    with pytest.raises(DatasetError) as err:
        download_dataset(spec, data, url=url)

    assert f"is {sha(body)}, expected {'0' * 64}" in str(err.value)
    assert "download was deleted" in str(err.value)
    assert list((data / "downloads").iterdir()) == []
    assert sorted(p.name for p in data.iterdir()) == ["downloads"]


def test_local_archive_with_wrong_sha256_is_kept_and_refused(tmp_path):
    archive = make_zip(tmp_path / "mine.zip", cotton_files())
    with pytest.raises(
        DatasetError, match=rf"sha256 of .*mine.zip is {sha(archive.read_bytes())}, expected f+ "
    ):
        download_dataset(replace(COTTON, sha256="f" * 64), tmp_path / "data", archive=archive)
    assert archive.is_file()  # never delete the user's own file
    assert list((tmp_path / "data").iterdir()) == []


# ---------------------------------------------------------------------- unsafe and broken archives


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


UNSAFE = {
    "dotdot": ("zip", "../../../evil.png", "climbs out of the target"),
    "absolute": ("tar", "{outside}/evil.png", "has an absolute path"),
    "symlink": ("tar", "Cotton80/cotton_square_new/9_1_train.png", "is a link"),
    "hardlink": ("tar", "Cotton80/cotton_square_new/9_2_train.png", "is a link"),
    "fifo": ("tar", "Cotton80/cotton_square_new/fifo", "is a device file or fifo"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_members_are_refused(tmp_path, case):
    fmt, name, why = UNSAFE[case]
    name = name.format(outside=tmp_path / "outside")
    files = cotton_files()
    if fmt == "zip":
        archive = make_zip(tmp_path / "archives" / "a.zip", {**files, name: PNG})
    else:
        kind = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}.get(case)
        if kind is None:
            archive = make_tar(tmp_path / "archives" / "a.tar.gz", {**files, name: PNG})
        else:
            link = "/etc/passwd" if case == "symlink" else "Cotton80/readme.txt"
            archive = make_tar(tmp_path / "archives" / "a.tar.gz", files, extra=[_member(name, kind, link)])
    data = tmp_path / "data"

    with pytest.raises(DatasetError, match=re.escape(f"member {name!r} {why}")):
        download_dataset(COTTON, data, archive=archive)

    assert list(data.iterdir()) == []  # no dataset folder, no scratch folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "data"]  # nothing escaped


@pytest.mark.parametrize("fmt", ["zip", "tar.gz", "tar.bz2"])
def test_truncated_archive_is_a_clear_error(tmp_path, fmt):
    path = tmp_path / f"Cotton80.{fmt}"
    if fmt == "zip":
        make_zip(path, cotton_files())
    else:
        make_tar(path, cotton_files(), mode=f"w:{fmt[4:]}")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    data = tmp_path / "data"

    with pytest.raises(DatasetError) as err:
        download_dataset(COTTON, data, archive=path)

    msg = str(err.value)
    # A zip's index sits at its end, bz2 decompresses whole 900 kB blocks: cut, neither even opens.
    if fmt in ("zip", "tar.bz2"):
        assert msg.startswith(f"{path} is not a zip or tar(.gz/.bz2/.xz) archive, or it is truncated")
    else:
        assert msg.startswith(f"cannot extract {path}: it is truncated or corrupt (")
    assert msg.endswith("; your own file: a complete copy)") and "\n" not in msg
    assert list(data.iterdir()) == []


def test_count_mismatch_names_the_split_and_both_counts(tmp_path):
    archive = make_zip(tmp_path / "Cotton80.zip", cotton_files())
    spec = replace(COTTON, num_classes=4, test=7)

    with pytest.raises(DatasetError) as err:
        download_dataset(spec, tmp_path / "data", archive=archive)

    msg = str(err.value)
    assert "(classes: expected 4, found 3; test: expected 7 images, found 6)" in msg
    assert "train_val" not in msg
    assert list((tmp_path / "data").iterdir()) == []


def test_archive_without_the_layout_is_named(tmp_path):
    archive = make_zip(tmp_path / "other.zip", {"something/else.png": PNG})
    with pytest.raises(
        DatasetError,
        match=r"found no anno/train.txt or cotton_square_new/ in the cotton80 source \(its top level holds: "
        r"something/\); is it the Cotton80",
    ):
        download_dataset(COTTON, tmp_path / "data", archive=archive)


def test_anno_line_pointing_at_a_missing_image(tmp_path):
    files = soyageing_files(rounds=(3,))
    del files["SoyAgeing/R3/images/yd002_R3_2_test.png"]
    archive = make_zip(tmp_path / "SoyAgeing.zip", files)
    with pytest.raises(DatasetError, match=r"R3/anno/test.txt:2: R3/images/yd002_R3_2_test.png is missing"):
        download_dataset(small("soyageing_r3", 2, 2, 2), tmp_path / "data", archive=archive)


# --------------------------------------------------------------------- re-runs, status, verify


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path, server):
    body = make_zip(tmp_path / "Cotton80.zip", cotton_files()).read_bytes()
    url = server.serve("/Cotton80.zip", body)
    spec = COTTON
    data = tmp_path / "data"
    download_dataset(spec, data, url=url)
    (data / "cotton80" / "marker").write_text("old")

    again = download_dataset(spec, data, url=url)
    assert (again.status, len(server.requests)) == ("present", 1)
    assert (data / "cotton80" / "marker").exists()

    forced = download_dataset(spec, data, url=url, force=True)
    assert (forced.status, len(server.requests)) == ("created", 2)
    assert not (data / "cotton80" / "marker").exists()
    assert sorted(p.name for p in data.iterdir()) == ["cotton80", "downloads"]


def test_status_and_incomplete_folder_needs_force(tmp_path):
    archive = make_zip(tmp_path / "Cotton80.zip", cotton_files())
    data = tmp_path / "data"
    assert dataset_status(COTTON, data / "cotton80") == "missing"
    download_dataset(COTTON, data, archive=archive)
    assert dataset_status(COTTON, data / "cotton80") == "ready"
    assert dataset_status(replace(COTTON, test=240), data / "cotton80") == "incomplete"
    (data / "cotton80" / "splits" / "val.csv").unlink()
    assert dataset_status(COTTON, data / "cotton80") == "incomplete"

    with pytest.raises(
        DatasetError,
        match=r"not a complete cotton80 dataset; re-create it with `ufgir download cotton80 --force`",
    ):
        download_dataset(COTTON, data, archive=archive)
    assert download_dataset(COTTON, data, archive=archive, force=True).status == "created"
    assert dataset_status(COTTON, data / "cotton80") == "ready"


def test_verify_lists_unreadable_images(tmp_path):
    files = cotton_files()
    files["Cotton80/cotton_square_new/2_1_train.png"] = b"not an image"
    archive = make_zip(tmp_path / "Cotton80.zip", files)
    data = tmp_path / "data"
    bad = r"cotton80: 1 images cannot be decoded: images/2_1_train.png; .*Cotton80.zip is damaged: pass a complete copy"

    with pytest.raises(DatasetError, match=bad):
        download_dataset(COTTON, data, archive=archive, verify=True)
    assert list(data.iterdir()) == []  # a dataset that fails verification is not installed

    assert download_dataset(COTTON, data, archive=archive).status == "created"
    bad = re.escape(f"cotton80: 1 images cannot be decoded: images/2_1_train.png; re-create it from a complete copy "
                    f"with `ufgir download cotton80 --archive {archive.resolve()} --force`")
    with pytest.raises(DatasetError, match=bad):
        download_dataset(COTTON, data, verify=True)


def test_synthetic_is_generated_not_downloaded(tmp_path, monkeypatch):
    calls = []

    def ensure_synthetic(root: Path) -> Path:
        calls.append(root)
        (root / "images").mkdir(parents=True)
        (root / "images" / "a.png").write_bytes(PNG)
        (root / "images" / "b.png").write_bytes(PNG)
        write_dataset_folder(
            root, [(0, "images/a.png")], [(0, "images/b.png")], ["leaf"], {"name": "synthetic"}
        )
        return root

    monkeypatch.setitem(
        sys.modules, "ufgir_cli.data.synthetic", types.SimpleNamespace(ensure_synthetic=ensure_synthetic)
    )
    data = tmp_path / "data"

    with pytest.raises(
        DatasetError, match=r"synthetic is generated on this machine, not downloaded; drop --url"
    ):
        download_dataset("synthetic", data, url="http://127.0.0.1:9/x.zip")
    result = download_dataset("synthetic", data, verify=True)
    assert (result.status, result.path, calls) == ("created", data / "synthetic", [data / "synthetic"])
    assert download_dataset("synthetic", data).status == "present"


# ------------------------------------------------------------------------------------------ CLI


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "240", "UFGIR_DEBUG": ""})


def test_cli_download_rerun_and_datasets_table(tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOG, "cotton80", COTTON)
    archive = make_zip(tmp_path / "Cotton80.zip", cotton_files())
    data = tmp_path / "data"

    first = _cli("download", "cotton80", "--archive", str(archive), "--data-dir", str(data))
    assert first.exit_code == 0, first.output
    assert (
        f"cotton80: 3 classes, 9 train_val (6 train + 3 val) / 6 test images -> {data / 'cotton80'}"
        in first.stdout
    )
    assert f"archive sha256 {sha(archive.read_bytes())} (no published hash" in first.stdout

    again = _cli("download", "cotton80", "--archive", str(archive), "--data-dir", str(data), "--verify")
    assert again.exit_code == 0, again.output
    assert "cotton80 is already complete at" in again.stdout
    assert "verified: all 15 images decode" in again.stdout

    table = _cli("datasets", "--data-dir", str(data))
    assert table.exit_code == 0, table.output
    rows = {
        line.split()[1]: line
        for line in table.stdout.splitlines()
        if line.startswith("│") and "│" in line[1:]
    }
    assert set(CATALOG) <= set(rows)
    assert re.search(
        r"cotton80\s+│\s+3\s+│\s+9\s+│\s+6\s+│\s+ready\s+│\s+" + re.escape(str(data / "cotton80")),
        rows["cotton80"],
    )
    assert re.search(r"soyglobal\s+│\s+1,938\s+│\s+5,814\s+│\s+5,814\s+│\s+missing", rows["soyglobal"])
    assert re.search(
        r"synthetic\s+│\s+generated\s+│\s+generated\s+│\s+generated\s+│\s+missing", rows["synthetic"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["download", "nope"], "error: unknown dataset 'nope'; choose one of: cotton80"),
        (
            ["download", "cotton80", "--url", "http://x/a.zip", "--archive", "a.zip"],
            "error: --url and --archive name two sources",
        ),
        (["download", "cotton80", "--archive", "missing.zip"], "error: --archive missing.zip is not a file"),
        (
            ["download", "cotton80", "--url", "http://127.0.0.1:9/Cotton80.zip"],
            "error: cannot reach http://127.0.0.1:9/Cotton80.zip",
        ),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = _cli(*args, "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2
    out = result.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(message), result.output


def test_cli_unsafe_archive_exits_2_and_leaves_nothing(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {**cotton_files(), "../../evil.png": PNG})
    result = _cli("download", "cotton80", "--archive", str(archive), "--data-dir", str(tmp_path / "data"))
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: refusing to extract a.zip: member '../../evil.png' climbs out of the target with '..'; use the official archive"
    )
    assert list((tmp_path / "data").iterdir()) == []
