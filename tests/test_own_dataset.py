"""Issue 36, parts 1 and 3: a dataset of your own (`ufgir datasets add`), checked like a download and
then used by name like a catalog one; advice that fits how a dataset was made; offline downloads that
end at once in one line (and one JSON object with --json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.data.catalog import get_spec, user_datasets
from ufgir_cli.data.download import add_dataset, download_dataset
from ufgir_cli.data.folder import dataset_counts, read_split
from ufgir_cli.data.loaders import read_splits
from ufgir_cli.errors import DatasetError
from ufgir_cli.recipe import load_recipe

runner = CliRunner()


def _png(path: Path, seed: int) -> None:
    """A 24 px picture, different for every seed (noise: no two are near copies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


def _classes(top: Path, n: int = 5, classes=("leaf_10", "leaf_2", "leaf_1")) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            _png(top / name / f"img_{i}.png", 100 * c + i)
    return top


def _rows(root: Path, split: str) -> list[tuple[int, str]]:
    return [(cid, Path(p).relative_to(root).as_posix()) for p, cid in read_split(root, split).samples]


# ---- 1. class folders, the split rule, dataset.json ----------------------------------------------

def test_class_folders_split_by_the_documented_rule(tmp_path):
    data = tmp_path / "data"
    res = add_dataset("myleaves", _classes(tmp_path / "src"), data)
    root = data / "myleaves"
    assert res.status == "created" and res.path == root
    info = json.loads((root / "dataset.json").read_text())
    assert info["kind"] == "user" and info["source"] == str((tmp_path / "src").resolve())
    assert info["test_fraction"] == 0.5 and "floor((i+1)*0.5) > floor(i*0.5)" in info["split_rule"]
    # class ids follow natural-sort order of the names; 5 images a class: the 2nd and 4th go to test
    assert (root / "classes.csv").read_text().splitlines()[1:] == ["0,leaf_1", "1,leaf_2", "2,leaf_10"]
    assert _rows(root, "test") == [(c, f"images/{n}/img_{i}.png") for c, n in enumerate(("leaf_1", "leaf_2", "leaf_10"))
                                   for i in (1, 3)]
    assert info["counts"] == {"train": 6, "val": 3, "train_val": 9, "test": 6}
    # hashed and checked like a download
    assert info["integrity"]["verdict"] == "ok" and info["integrity"]["images"] == 15
    assert (root / "hashes.csv").read_text().count("\n") == 16
    # the catalog finds it by name, from its own dataset.json
    assert set(user_datasets(data)) == {"myleaves"} and get_spec("myleaves", data).kind == "user"
    # again: present, untouched
    assert add_dataset("myleaves", tmp_path / "src", data).status == "present"


@pytest.mark.parametrize("frac, test_per_class", [(0.2, 1), (0.4, 2), (0.6, 3)])
def test_test_fraction_holds_out_floor_n_f_per_class(tmp_path, frac, test_per_class):
    add_dataset("x", _classes(tmp_path / "src"), tmp_path / "data", test_fraction=frac)
    test = _rows(tmp_path / "data" / "x", "test")
    assert len(test) == 3 * test_per_class
    assert not any(p.endswith("img_0.png") for _, p in test)  # the rule never takes a class's first image


def test_train_and_test_folders_are_kept_as_given(tmp_path):
    src = tmp_path / "src"
    _classes(src / "train", 3, ("a", "b"))
    for c, name in enumerate(("a", "b")):
        _png(src / "test" / name / "t.png", 900 + c)
    add_dataset("tt", src, tmp_path / "data")
    root = tmp_path / "data" / "tt"
    info = json.loads((root / "dataset.json").read_text())
    assert "split_rule" not in info
    assert _rows(root, "test") == [(0, "images/test/a/t.png"), (1, "images/test/b/t.png")]
    assert len(_rows(root, "train_val")) == 6


def test_csv_with_and_without_a_split_column(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _png(src / "pics" / f"p{i}.png", i)
    (src / "with.csv").write_text("path,label,split\npics/p0.png,red,train\npics/p1.png,red,test\n"
                                  "pics/p2.png,blue,train\npics/p3.png,blue,test\n")
    add_dataset("c1", src / "with.csv", tmp_path / "data")
    assert _rows(tmp_path / "data" / "c1", "test") == [(0, "images/pics/p3.png"), (1, "images/pics/p1.png")]
    (src / "without.csv").write_text("path,label\npics/p0.png,red\npics/p1.png,red\npics/p2.png,blue\npics/p3.png,blue\n")
    res = add_dataset("c2", src / "without.csv", tmp_path / "data")
    assert res.info["counts"]["test"] == 2 and res.info["layout"] == "csv"


def test_leakage_between_given_splits_is_found_and_recorded(tmp_path):
    src = tmp_path / "src"
    _classes(src / "train", 3, ("a", "b"))
    _png(src / "test" / "a" / "same.png", 0)  # = train/a/img_0.png by content
    _png(src / "test" / "b" / "t.png", 901)
    notes = []
    res = add_dataset("leaky", src, tmp_path / "data", notify=notes.append)
    integ = res.info["integrity"]
    assert integ["verdict"] == "overlap" and integ["overlap"]["test_images"] == 1
    assert any("1 test images of" in n and "also in train_val by content" in n for n in notes)


@pytest.mark.parametrize("make, message", [
    (lambda d: _classes(d, 1), "class 'leaf_1' has 1 image(s), too few to hold out"),
    (lambda d: _classes(d, 3, ("only",)), "holds one class ('only')"),
    (lambda d: d.mkdir(), "holds no images"),
    (lambda d: (_classes(d / "train", 2), _png(d / "extra" / "x.png", 1)), "mixes split folders (train) with other"),
])
def test_bad_folders_are_one_line_and_write_nothing(tmp_path, make, message):
    make(tmp_path / "src")
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        add_dataset("bad", tmp_path / "src", tmp_path / "data")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "bad").exists()


def test_bad_csv_names_the_line(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\nnope.png,a\n")
    with pytest.raises(DatasetError, match=r"l.csv:2: image nope.png does not exist"):
        add_dataset("bad", tmp_path / "l.csv", tmp_path / "data")


def test_a_catalog_name_or_a_catalog_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="'Cotton80' is a catalog dataset"):
        add_dataset("Cotton80", _classes(tmp_path / "src"), tmp_path / "data")


# ---- 1. used like a catalog dataset; advice that fits --------------------------------------------

def test_train_sweep_and_reproduce_take_it_by_name(tmp_path, monkeypatch):
    data = tmp_path / "data"
    add_dataset("myleaves", _classes(tmp_path / "src"), data)
    monkeypatch.setenv("UFGIR_DATA_DIR", str(data))
    recipe = load_recipe("quickstart", {"data": {"dataset": "myleaves", "num_workers": 0}})
    train, evals, skipped = read_splits(recipe)
    assert (len(train.samples), len(evals.samples), train.num_classes, skipped) == (9, 6, 3, [])  # train_val / test
    c = dataset_counts("myleaves")  # what a sweep plans with
    assert (c.num_classes, c.train_val, c.test, c.source) == (3, 9, 6, "disk")
    from ufgir_cli.reproduce.grid import make_grid

    grid = make_grid(["linear"], ["myleaves"], seeds=(0,), out=tmp_path / "rep")
    assert grid.datasets == ("myleaves",)


def test_cli_add_then_train_two_steps(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UFGIR_DATA_DIR", str(data))
    res = runner.invoke(app, ["datasets", "add", "myleaves", "--from-folder", str(_classes(tmp_path / "src"))])
    assert res.exit_code == 0, res.output
    assert "myleaves: 3 classes, 9 train_val" in res.output and "test split by the rule" in res.output
    listed = runner.invoke(app, ["datasets"])
    assert "myleaves" in listed.output and "ready" in listed.output
    res = runner.invoke(app, ["train", "-r", "quickstart", "--dataset", "myleaves", "--quiet", "--name", "r",
                              "--set", "train.epochs=1", "--set", "data.num_workers=0", "--set", "train.batch_size=4"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "r" / "eval" / "test" / "metrics.json").is_file()


def test_advice_for_an_own_dataset_never_sends_it_to_the_mirrors(tmp_path):
    data = tmp_path / "data"
    src = _classes(tmp_path / "src")
    add_dataset("myleaves", src, data)
    with pytest.raises(DatasetError) as err:  # `ufgir download` of it: there is nothing to fetch
        download_dataset("myleaves", data, force=True)
    assert f"`ufgir datasets add myleaves --from-folder {src.resolve()} --force`" in str(err.value)
    (data / "myleaves" / "splits" / "test.csv").unlink()
    with pytest.raises(DatasetError) as err:
        read_split(data / "myleaves", "test")
    assert "ufgir datasets add myleaves --from-folder" in str(err.value) and "ufgir download" not in str(err.value)
    with pytest.raises(DatasetError) as err:  # a bare folder of class folders: how to make it a dataset
        read_split(src, "test")
    assert f"ufgir datasets add {src.name} --from-folder DIR" in str(err.value) and "--force" not in str(err.value)


def test_names_are_case_insensitive_and_near_misses_suggested(tmp_path):
    assert get_spec("Cotton80").name == "cotton80"
    with pytest.raises(DatasetError, match=r"unknown dataset 'coton80' \(did you mean 'cotton80'\?\)"):
        get_spec("coton80", tmp_path)


# ---- 3. offline: one line, at once --------------------------------------------------------------

@pytest.fixture
def no_dns(monkeypatch):
    """A Hub endpoint whose name does not resolve (``.invalid`` never does), offline mode off."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.ufgir-test.invalid")


def test_offline_download_ends_at_once_in_one_line(tmp_path, no_dns):
    res = runner.invoke(app, ["download", "cotton80", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert lines == errors and len(errors) == 1, res.output  # not even the "trying a community copy" note
    assert "cannot resolve hub.ufgir-test.invalid" in errors[0] and "no source of it" not in errors[0]
    assert "ufgir download cotton80 --archive Cotton80.zip" in errors[0]
    assert not any("Retry" in line for line in lines), res.output  # no client retries (they took 47 s)


def test_offline_download_with_json_prints_one_object(tmp_path, no_dns):
    res = runner.invoke(app, ["download", "cotton80", "--data-dir", str(tmp_path), "--json"])
    assert res.exit_code == 2
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "failed" and out["name"] == "cotton80" and "cannot resolve" in out["error"]


def test_a_url_that_does_not_resolve_is_one_line(tmp_path):
    with pytest.raises(DatasetError, match=r"^cannot reach http://x.ufgir-test.invalid/a.zip") as err:
        download_dataset("cotton80", tmp_path, url="http://x.ufgir-test.invalid/a.zip")
    assert "\n" not in str(err.value)
