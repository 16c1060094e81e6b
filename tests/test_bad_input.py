"""Bad input everywhere: each a one-line error naming the thing and what to do, exit code 2, nothing
written. Recipes (hypothesis mutations), dataset folders and images, checkpoints (another model,
truncated, pickled code), a full disk; and odd but valid images, which are converted, not fatal."""

from __future__ import annotations

import argparse
import ast
import copy
import errno
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.data.datasets import find_unreadable, load_image
from ufgir_cli.data.folder import write_dataset_folder
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import CheckpointError, RecipeError
from ufgir_cli.model import build_model
from ufgir_cli.model.checkpoint import (
    checkpoint_payload,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from ufgir_cli.paths import NON_RECIPE_ENV
from ufgir_cli.recipe import Recipe, load_recipe, packaged_recipes_dir, parse_overrides
from ufgir_cli.recipe_sections import LORA_KEYS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

runner = CliRunner()
PKG = Path(__file__).resolve().parent.parent / "ufgir_cli"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line_error(res, code: int = 2, alone: bool = True) -> str:
    """The error line of a failed command; ``alone``: nothing else was printed (it failed up front)."""
    assert res.exit_code == code, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and (len(lines) == 1 or not alone), res.output
    return errors[0]


def tiny_sets(root: Path, **extra) -> list[str]:
    sets = {"model.weights": "none", "data.root": str(root), "data.num_workers": 0, "train.epochs": 1,
            "train.precision": "fp32", "train.batch_size": 8, "eval.every": 0, **extra}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]


# ---- recipes: hypothesis mutations ----------------------------------------------------------------

BASE = tomllib.loads((packaged_recipes_dir() / "quickstart.toml").read_text())
SECTIONS = {name: f.annotation for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
LEAVES = [(sec, key, f) for sec, model in SECTIONS.items() for key, f in model.model_fields.items()]
LEAVES.append((None, "description", Recipe.model_fields["description"]))
#: Leaves where any string is a valid value (a name or a path checked later, when it is used).
STR_LEAVES = {("data", "dataset"), ("data", "root"), ("model", "backbone"), ("model", "weights"), ("train", "device"),
              (None, "description")}
#: Valid values for leaves without cross-field rules: such a mutation must load, value kept.
VALID = {
    ("train", "epochs"): st.integers(1, 10**6), ("train", "batch_size"): st.integers(1, 4096),
    ("train", "seed"): st.integers(-(2**62), 2**62), ("train", "checkpoint_every"): st.integers(0, 10**6),
    ("train", "deterministic"): st.booleans(), ("train", "skip_nonfinite"): st.booleans(),
    ("train", "precision"): st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
    ("optim", "lr"): st.floats(1e-9, 10.0), ("optim", "momentum"): st.floats(0.0, 0.999),
    ("optim", "weight_decay"): st.floats(0.0, 1.0), ("optim", "name"): st.sampled_from(["sgd", "adamw"]),
    ("optim", "label_smoothing"): st.floats(0.0, 0.99), ("schedule", "warmup_steps"): st.integers(0, 10**6),
    ("schedule", "min_lr"): st.floats(0.0, 1.0), ("data", "num_workers"): st.integers(0, 64),
    ("data", "hflip"): st.booleans(), ("data", "skip_corrupt"): st.booleans(),
    ("data", "resize_ratio"): st.floats(1.01, 4.0), ("model", "drop"): st.floats(0.0, 0.99),
    ("eval", "every"): st.integers(0, 1000), ("logging", "log_every"): st.integers(1, 10**6),
    (None, "description"): st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40),
}


def bounds(f) -> list[tuple[str, float]]:
    """The field's numeric bounds as (op, value), e.g. [("Ge", 1)] for ``Field(ge=1)``."""
    ops = ("Ge", "Gt", "Le", "Lt")
    return [(type(m).__name__, getattr(m, type(m).__name__.lower())) for m in f.metadata if type(m).__name__ in ops]


names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=5)
junk = st.recursive(st.integers() | text | st.booleans(),
                    lambda inner: st.dictionaries(names, inner, min_size=1, max_size=2), max_leaves=4)
nested = st.dictionaries(names, junk, min_size=1, max_size=2)  # a table where a value belongs


@st.composite
def invalid_mutation(draw):
    """(section or None, key, value, kind): a change that makes the recipe invalid at that key."""
    kind = draw(st.sampled_from(["unknown_key", "nested", "list_of_tables", "letters", "out_of_range", "section"]))
    if kind == "unknown_key":
        sec = draw(st.sampled_from([None, *SECTIONS]))
        known = set(SECTIONS[sec].model_fields) if sec else set(Recipe.model_fields)
        return sec, draw(names.filter(lambda n: n not in known)), draw(junk), kind
    if kind == "section":
        return None, draw(st.sampled_from(list(SECTIONS))), draw(st.integers() | st.lists(st.integers())), kind
    if kind == "out_of_range":
        sec, key, f = draw(st.sampled_from([leaf for leaf in LEAVES if bounds(leaf[2])]))
        op, b = draw(st.sampled_from(bounds(f)))
        is_int = "int" in str(f.annotation)
        step = draw(st.integers(1, 10**6)) if is_int else draw(st.floats(1e-6, 1e6))
        value = {"Ge": b - step, "Gt": b - (step if is_int else 0), "Le": b + step, "Lt": b}[op]
        return sec, key, int(value) if is_int else float(value), kind
    sec, key, f = draw(st.sampled_from([leaf for leaf in LEAVES if kind != "letters" or leaf[:2] not in STR_LEAVES]))
    value = {"nested": draw(nested), "list_of_tables": [draw(nested)],
             "letters": "zz" + draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True))}[kind]
    return sec, key, value, kind


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, ensure_ascii=False)  # ints, finite floats, strings (JSON escapes are valid TOML)


def dump_toml(d: dict) -> str:
    top = [f"{k} = {toml_value(v)}" for k, v in d.items() if not (k in SECTIONS and isinstance(v, dict))]
    tables = [f"[{k}]\n" + "".join(f"{kk} = {toml_value(vv)}\n" for kk, vv in v.items())
              for k, v in d.items() if k in SECTIONS and isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables)


def load_mutated(sec, key, value, how: str, tmp: Path):
    """Load quickstart with one key changed: through a recipe file, `--set` strings or the environment."""
    if how == "file":
        data = copy.deepcopy(BASE)
        (data.setdefault(sec, {}) if sec else data)[key] = value
        path = tmp / "mutated.toml"
        path.write_text(dump_toml(data), encoding="utf-8")
        return load_recipe(path)
    if how == "set":
        return load_recipe("quickstart", parse_overrides([f"{sec + '.' if sec else ''}{key}={toml_value(value)}"]))
    var = f"UFGIR_{sec.upper() + '__' if sec else ''}{key.upper()}"
    os.environ[var] = value if isinstance(value, str) else json.dumps(value)
    try:
        return load_recipe("quickstart")
    finally:
        del os.environ[var]


HOWS = st.sampled_from(["file", "set", "env"])
MUTATION_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@MUTATION_SETTINGS
@given(mutation=invalid_mutation(), how=HOWS)
def test_invalid_recipe_mutations_name_the_key(mutation, how, tmp_path):
    sec, key, value, kind = mutation
    if how == "env" and (
            kind == "section" or (sec, key) in STR_LEAVES  # the environment holds strings: any is a valid name
            or f"UFGIR_{sec.upper() + '__' if sec else ''}{key.upper()}" in NON_RECIPE_ENV):
        return
    if sec == "model" and key in LORA_KEYS and kind != "unknown_key":
        return  # quickstart's method has no LoRA: its LoRA keys are dropped with a notice, whatever their value
    event(f"{kind} via {how}")
    with pytest.raises(RecipeError) as e:  # never another exception type: that would be a traceback
        load_mutated(sec, key, value, how, tmp_path)
    msg = str(e.value)
    path = f"{sec}.{key}" if sec else key
    assert "\n" not in msg
    if how == "env" and kind == "unknown_key":
        assert f"UFGIR_{sec.upper() + '__' if sec else ''}{key.upper()}" in msg, msg
    else:
        assert f"'{path}'" in msg or f"{path} " in msg, (path, msg)


@MUTATION_SETTINGS
@given(data=st.data(), how=HOWS)
def test_valid_recipe_mutations_load(data, how, tmp_path):
    sec, key = data.draw(st.sampled_from(sorted(VALID, key=str)))
    value = expected = data.draw(VALID[(sec, key)])
    if how == "env" and isinstance(value, bool):
        value = str(value).lower()  # the environment spells a bool; a str leaf keeps "true" as text
    recipe = load_mutated(sec, key, value, how, tmp_path)
    got = getattr(getattr(recipe, sec) if sec else recipe, key)
    assert got == expected


def test_recipe_backbone_of_wrong_type_is_a_recipe_error():
    with pytest.raises(RecipeError, match="model.backbone"):
        load_recipe("quickstart", {"model": {"backbone": 5}})


def test_recipe_nested_list_in_ila_ds_locs_is_a_recipe_error():
    with pytest.raises(RecipeError, match="model.ila_ds_locs"):
        load_recipe("quickstart", {"model": {"ila_ds_locs": [[1]]}})


# ---- dataset folders and images ----------------------------------------------------------------


@pytest.fixture
def broken_data(small_synthetic, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the small dataset with a garbage file, a truncated PNG and a deleted image."""
    root = tmp_path / "data" / "mydata"
    shutil.copytree(small_synthetic, root)
    rows = (root / "splits" / "train_val.csv").read_text().splitlines()[1:]
    bad = [r.split(",", 1)[1] for r in (rows[0], rows[7], rows[13])]
    (root / bad[0]).write_bytes(b"this is not an image")
    png = (root / bad[1]).read_bytes()
    (root / bad[1]).write_bytes(png[: len(png) // 2])
    (root / bad[2]).unlink()
    return root, bad


def test_corrupt_image_is_one_line_and_nothing_is_written(broken_data, tmp_path):
    root, bad = broken_data
    (root / bad[2]).write_bytes(b"")  # present (so the split file checks out), but empty
    res = runner.invoke(app, ["train", "-r", "quickstart", "--dataset", "mydata", *tiny_sets(root),
                              "--out", str(tmp_path / "runs"), "--name", "r"])
    msg = one_line_error(res)
    assert f"image {bad[0]} in {root / 'splits' / 'train_val.csv'} cannot be decoded" in msg
    assert "(3 unreadable images in this split)" in msg and "--skip-corrupt" in msg
    assert not (tmp_path / "runs").exists()


def test_skip_corrupt_leaves_out_and_reports(broken_data, tmp_path):
    root, bad = broken_data
    res = runner.invoke(app, ["train", "-r", "quickstart", "--dataset", "mydata", "--skip-corrupt", "--quiet",
                              *tiny_sets(root), "--out", str(tmp_path / "runs"), "--name", "r"])
    assert res.exit_code == 0, res.output
    assert "skipped 3 unreadable images" in res.output and "21 images" in res.output
    prov = json.loads((tmp_path / "runs" / "r" / "provenance.json").read_text())
    assert sorted(prov["dataset"]["skipped_images"]) == sorted(bad)
    assert 'skip_corrupt = true' in (tmp_path / "runs" / "r" / "recipe.toml").read_text()


def test_missing_dataset_folder_is_one_line(tmp_path):
    res = runner.invoke(app, ["train", "-r", "quickstart", "--dataset", "mydata", *tiny_sets(tmp_path / "nowhere"),
                              "--out", str(tmp_path / "runs")])
    msg = one_line_error(res)
    assert "train_val.csv is missing" in msg and "'mydata' is not in `ufgir datasets`" in msg
    assert not (tmp_path / "runs").exists()


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], -1).astype(np.uint8)


def _odd_images(folder: Path, seed: int) -> dict[str, tuple[int, int]]:
    """One file of each awkward kind; returns {relative path: (height, width)}."""
    rng = np.random.default_rng(seed)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(name, im, **kw):
        im.save(folder / name, **kw)
        made[f"{folder.parent.name}/{folder.name}/{name}"] = (im.height, im.width)

    save("grey.png", rgb(40, 50).convert("L"))
    save("cmyk.jpg", rgb(48, 64).convert("CMYK"))
    save("sixteen.png", Image.fromarray(rng.integers(0, 65536, (30, 70), dtype=np.uint16)))
    frames = [rgb(32, 32).convert("P") for _ in range(3)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    pal = rgb(36, 36).convert("P")
    pal.info["transparency"] = 0
    save("palette.png", pal)
    save("rgba.png", rgb(64, 48).convert("RGBA"))
    save("la.png", rgb(20, 90).convert("LA"))
    save("onebit.png", rgb(33, 33).convert("1"))
    return made


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory) -> tuple[Path, dict]:
    """2 classes of greyscale, CMYK, 16-bit, animated, palette, RGBA, LA, 1-bit images, plus one
    6000x4000 photo-sized JPEG in the training split."""
    root = tmp_path_factory.mktemp("odd") / "odd"
    made = {}
    for c in range(2):
        made |= _odd_images(root / "images" / f"c{c}", seed=c)
        test = root / "images" / f"t{c}"
        made |= {k: v for k, v in _odd_images(test, seed=10 + c).items() if "grey" in k or "cmyk" in k}
    Image.fromarray(_gradient(4000, 6000)).save(root / "images" / "c0" / "huge.jpg", quality=70)
    made["images/c0/huge.jpg"] = (4000, 6000)
    train = [(int(p.split("/")[1][1]), p) for p in made if p.split("/")[1].startswith("c")]
    test = [(int(p.split("/")[1][1]), p) for p in made if p.split("/")[1].startswith("t")
            and ("grey" in p or "cmyk" in p)]
    write_dataset_folder(root, train, test, ["a", "b"], {"name": "odd"})
    return root, made


def test_odd_images_are_converted(odd_dataset):
    root, made = odd_dataset
    assert find_unreadable([str(root / p) for p in made]) == []
    for rel, (h, w) in made.items():
        img = load_image(str(root / rel))
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, h, w), rel
    sixteen = np.asarray(Image.open(root / "images/c0/sixteen.png"), dtype=np.uint32)
    img = load_image(str(root / "images/c0/sixteen.png"))
    assert torch.equal(img[0], torch.from_numpy((sixteen >> 8).astype(np.uint8)))  # high byte kept, grey
    assert torch.equal(img[0], img[2])


def test_training_on_odd_images_runs(odd_dataset, tmp_path):
    root, _ = odd_dataset
    r = load_recipe("quickstart", {"model": {"weights": "none"}, "data": {"dataset": "odd", "root": str(root),
                                   "num_workers": 0}, "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
                                   "eval": {"every": 0}})
    s = fit(r, tmp_path / "r")
    assert s["steps"] == 3 and s["skipped_images"] == 0 and s["final_top1"] is not None  # 17 images, batch 8


# ---- checkpoints ---------------------------------------------------------------------------------


def micro_recipe(**model):
    return load_recipe("quickstart", {"model": {"weights": "none", "num_classes": 4, **model}})


@pytest.fixture(scope="module")
def ckpt_file(tmp_path_factory) -> Path:
    r = micro_recipe()
    path = tmp_path_factory.mktemp("ck") / "model.pt"
    save_checkpoint(path, checkpoint_payload(build_model(r.model, 4), r))
    return path


@pytest.mark.parametrize(("model", "pattern"), [
    ({"method": "adapter", "ila_ds_locs": []}, r"trained as ila_pp on ufgir_vit_micro_patch8_64, but the recipe asks for adapter"),
    ({"backbone": "vit_tiny_patch16_224", "ila_ds_locs": [1], "image_size": 64}, r"asks for ila_pp on vit_tiny_patch16_224"),
    ({"num_classes": 7}, r"has 4 classes but the recipe and dataset have 7"),
])
def test_checkpoint_of_another_model_is_refused(ckpt_file, model, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        model_from_checkpoint(read_checkpoint(ckpt_file), str(ckpt_file), recipe=micro_recipe(**model))
    assert "\n" not in str(e.value)


def test_checkpoint_with_missing_tensor_or_other_backbone_weights_is_refused(ckpt_file, tmp_path):
    ck = read_checkpoint(ckpt_file)
    del ck["state_dict"]["vit.head.weight"]
    with pytest.raises(CheckpointError, match=r"does not fit a ila_pp model .* missing \['vit.head.weight'\]"):
        model_from_checkpoint(ck, "ck")
    from safetensors.torch import save_file

    weights = tmp_path / "backbone.safetensors"
    save_file(build_model(micro_recipe().model, 4).backbone_state_dict(), str(weights))
    r = micro_recipe(weights=str(weights))  # adapters only, tied to that backbone's sha256
    payload = checkpoint_payload(build_model(r.model, 4), r)
    assert payload["full"] is False
    payload["backbone"]["sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match=r"differs from the one it was trained on .*point model.weights"):
        model_from_checkpoint(payload, "ck")


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -22, -1])
def test_truncated_checkpoint_is_one_line(ckpt_file, tmp_path, keep):
    data = ckpt_file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) + keep
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"cannot be read: .+; replace it with a complete copy$") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)
    assert "cannot be read: " in one_line_error(runner.invoke(app, ["eval", str(path)]))


def test_disk_full_on_checkpoint_write(small_synthetic, tmp_path, monkeypatch):
    """ENOSPC after half the bytes (simulated in the writer): one line saying the disk is full, the
    previous checkpoint intact, no temp file left."""
    import ufgir_cli.io as uio
    import ufgir_cli.model.checkpoint as ck

    calls = {"n": 0}

    def full_disk(path, writer):
        calls["n"] += 1
        if calls["n"] == 1:
            return uio.atomic_save(path, writer)

        def half_then_enospc(f):
            buf = io.BytesIO()
            writer(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return uio.atomic_save(path, half_then_enospc)

    monkeypatch.setattr(ck, "atomic_save", full_disk)
    res = runner.invoke(app, ["train", "-r", "quickstart", "--quiet", *tiny_sets(small_synthetic, **{
        "train.checkpoint_every": 1}), "--out", str(tmp_path), "--name", "r"])
    msg = one_line_error(res, alone=False)  # after the "training on ..." line
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    assert f"disk full: cannot write checkpoint {last}" in msg and "the previous last.pt is intact" in msg
    assert f"Free space on that disk; then resume with: ufgir train --resume {tmp_path / 'r'}" in msg
    assert read_checkpoint(last)["train_state"]["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temp file left


# ---- safe files ----------------------------------------------------------------------------------


class Plant:
    """Unpickling this calls open(marker, "w"): a file appears if pickled code ever runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipped", [True, False])
def test_pickled_code_is_refused_without_running(ckpt_file, tmp_path, zipped):
    ck = read_checkpoint(ckpt_file)

    def plant(name: str) -> tuple[Path, Path]:
        marker, path = tmp_path / f"{name}.marker", tmp_path / f"{name}.pt"
        evil = {**ck, "state_dict": {**ck["state_dict"], "evil": Plant(marker)}}
        torch.save(evil, path, _use_new_zipfile_serialization=zipped)
        return marker, path

    control_marker, control = plant("control")
    torch.load(control, weights_only=False)  # what an unsafe loader would do: the side effect is real
    assert control_marker.exists()

    marker, path = plant("evil")
    with pytest.raises(CheckpointError, match=r"carries pickled code \(io\.open\); refused without running it"):
        read_checkpoint(path)
    assert "pickled code" in one_line_error(runner.invoke(app, ["eval", str(path)]))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "checkpoints" / "last.pt")
    (run / "recipe.toml").write_text((PKG.parent / "recipes" / "quickstart.toml").read_text())
    assert "pickled code" in one_line_error(runner.invoke(app, ["train", "--resume", str(run)]))
    assert not marker.exists()


def test_objects_outside_the_allow_list_are_refused_even_if_registered(ckpt_file, tmp_path):
    """Other code may widen torch's global allow-list (convert.py registers argparse.Namespace for
    reference checkpoints); a ufgir checkpoint still holds only tensors and plain values."""
    ck = read_checkpoint(ckpt_file)
    path = tmp_path / "ns.pt"
    torch.save({**ck, "extra": argparse.Namespace(a=1)}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        with pytest.raises(CheckpointError, match=r"holds an object of type argparse\.Namespace; refused"):
            read_checkpoint(path)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{f.relative_to(PKG)}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), calls
