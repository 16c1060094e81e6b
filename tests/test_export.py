"""`ufgir export`, `ufgir import-upstream`, `ufgir predict` (issue 6).

One tiny run is trained per module (micro ViT, ILA++, 4 synthetic classes, one epoch) on a backbone
saved to a local weights file, so its checkpoint and the adapter-only export hold only the PETL
delta and re-attach to that file. Exports are written once through the CLI; every test then checks
the files and the numbers independently of the exporter's own parity check.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from typer.testing import CliRunner

import ufgir_cli
from ufgir_cli.cli import app
from ufgir_cli.errors import CheckpointError, ExportError
from ufgir_cli.io import file_sha256
from ufgir_cli.model.delta import load_delta
from ufgir_cli.model.vit import MICRO, state_dict_sha256
from ufgir_cli.ship import load_pt2, parity_batch

# The reference fixtures live in the shared folder: inside the checkout, or beside it.
_REPO = Path(__file__).resolve().parents[1]
UPSTREAM = next((p for p in (_REPO / "shared", _REPO.parent / "shared") if (p / "fixtures" / "upstream").is_dir()),
                _REPO / "shared") / "fixtures" / "upstream"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def random_backbone(path: Path, seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in timm.create_model(MICRO, num_classes=0).state_dict().items()}
    save_file(sd, str(path))
    return sd


@dataclass(frozen=True)
class Trained:
    run: Path
    data: Path
    backbone: Path
    export: Path  # <run>/export: adapter.safetensors, model.safetensors, model.onnx (dynamic), model.pt2 (static)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """Train once, export all four artifacts through the CLI (the environment is restored after)."""
    from ufgir_cli.data.synthetic import generate_synthetic
    from ufgir_cli.engine.train import fit
    from ufgir_cli.recipe import load_recipe

    root = tmp_path_factory.mktemp("ship")
    data = root / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UFGIR_DATA_DIR", str(data))
        mp.setenv("HF_HUB_OFFLINE", "1")
        generate_synthetic(data / "synthetic", num_classes=4, train_val=6, test=4, size=64)
        backbone = root / "backbone.safetensors"
        random_backbone(backbone, seed=0)
        recipe = load_recipe("quickstart", {"model": {"weights": str(backbone)},
                                            "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
                                            "data": {"num_workers": 0}})
        run = root / "run"
        fit(recipe, run)
        for args in (["--adapter-only"], [], ["--format", "onnx"], ["--format", "pt2", "--static-batch"]):
            r = invoke("export", run, *args)
            assert r.exit_code == 0, r.output
            assert "max |diff|" in r.stdout
    return Trained(run, data, backbone, run / "export")


@pytest.fixture
def data_env(trained, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(trained.data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


# --------------------------------------------------------------------------------------------
# safetensors


def test_adapter_delta_reattaches_bit_exactly_and_is_a_small_fraction(trained, data_env):
    delta, full = trained.export / "adapter.safetensors", trained.export / "model.safetensors"
    model, recipe = ufgir_cli.load_run(trained.run)
    x = parity_batch(3, recipe.model.image_size)
    want = logits(model, x)

    from_delta, r2 = ufgir_cli.load_run(delta)  # load_run dispatches .safetensors to load_delta
    assert torch.equal(logits(from_delta, x), want)
    assert r2 == recipe
    from_full, _ = load_delta(full)
    assert torch.equal(logits(from_full, x), want)

    with safe_open(str(delta), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(model.trainable_state_dict())
    assert not any(k.startswith("vit.blocks.") for k in keys)  # the frozen backbone stays out
    ckpt = torch.load(trained.run / "checkpoints" / "last.pt", weights_only=True)
    assert meta["backbone_sha256"] == ckpt["backbone"]["sha256"]
    assert (meta["method"], meta["num_classes"], meta["adapter_only"]) == ("ila_pp", "4", "true")

    ratio = delta.stat().st_size / full.stat().st_size
    print(f"adapter {delta.stat().st_size} B, full {full.stat().st_size} B, ratio {ratio:.3f}")
    assert ratio < 0.08  # measured 0.039: 25.7 k of 722 k parameters


def test_delta_on_another_backbone_names_both_hashes(trained, data_env, tmp_path):
    delta = trained.export / "adapter.safetensors"
    other = random_backbone(tmp_path / "other.safetensors", seed=1)
    with safe_open(str(delta), framework="pt") as f:
        want = f.metadata()["backbone_sha256"]
    with pytest.raises(CheckpointError) as e:
        load_delta(delta, weights=str(tmp_path / "other.safetensors"))
    msg = str(e.value)
    assert want in msg and state_dict_sha256(other) in msg
    assert "original backbone weights" in msg and "\n" not in msg
    # The same file at another path is fine: identity is the tensors, not the path.
    shutil.copy(trained.backbone, tmp_path / "moved.safetensors")
    model, recipe = load_delta(delta, weights=str(tmp_path / "moved.safetensors"))
    assert recipe.model.weights == str(tmp_path / "moved.safetensors")


def test_delta_with_missing_or_unexpected_tensors_lists_them(trained, data_env, tmp_path):
    delta = trained.export / "adapter.safetensors"
    with safe_open(str(delta), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["stray.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st_save(state, metadata=meta))
    with pytest.raises(CheckpointError, match=r"missing \[.*" + dropped.replace(".", r"\.") + r".*unexpected \['stray\.weight'\]"):
        load_delta(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="without ufgir metadata"):
        load_delta(plain)


def test_failed_parity_is_an_error_that_leaves_no_file_and_keeps_the_previous(trained, data_env, tmp_path,
                                                                             monkeypatch):
    import ufgir_cli.ship.safetensors as ex

    model, recipe = ufgir_cli.load_run(trained.run)
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(b"an earlier export")
    real_load = ex.load_delta

    def drifted(path, *args, **kwargs):  # the reloaded artifact computes something else
        m, r = real_load(path, *args, **kwargs)
        with torch.no_grad():
            m.vit.head.bias.add_(1e-3)
        return m, r

    monkeypatch.setattr(ex, "load_delta", drifted)
    with pytest.raises(ExportError, match=r"max \|diff\| 0\.001 > tolerance 0\.0001"):
        ex.export_safetensors(model, recipe, out, adapter_only=True)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_adapter_only_refusals_are_one_line_errors(trained, data_env):
    r = invoke("export", trained.run, "--format", "onnx", "--adapter-only")
    assert r.exit_code == 2 and "--adapter-only applies to --format safetensors" in r.stderr
    r = invoke("export", trained.run, "--image-size", "72")
    assert r.exit_code == 2 and "--image-size applies to onnx and pt2" in r.stderr


# --------------------------------------------------------------------------------------------
# ONNX and pt2


def test_onnx_and_pt2_match_eager_within_1e4(trained, data_env):
    import onnxruntime as ort

    model, recipe = ufgir_cli.load_run(trained.run)
    x = parity_batch(5, recipe.model.image_size)  # ONNX was traced at batch 2: batch 5 proves the dynamic axis
    want = logits(model, x)

    session = ort.InferenceSession(str(trained.export / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    got_onnx = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
    pt2 = load_pt2(trained.export / "model.pt2")
    with torch.no_grad():  # the pt2 export is static-batch (1 image per call)
        got_pt2 = torch.cat([pt2(x[i : i + 1]) for i in range(len(x))])
    d_onnx = float((got_onnx - want).abs().max())
    d_pt2 = float((got_pt2 - want).abs().max())
    print(f"max abs diff vs eager: onnx {d_onnx:.3g}, pt2 {d_pt2:.3g}")
    assert got_onnx.shape == got_pt2.shape == (5, 4)
    assert d_onnx <= 1e-4 and d_pt2 <= 1e-4

    for name, batch in (("model.onnx", None), ("model.pt2", 1)):
        side = json.loads((trained.export / f"{name}.json").read_text())
        assert (side["image_size"], side["num_classes"], side["batch_size"]) == (64, 4, batch)
        assert side["recipe"] == recipe.model_dump(mode="json") and side["max_abs_diff"] <= 1e-4
    assert json.loads((trained.export / "model.onnx.json").read_text())["opset"] >= 17

    card = (trained.export / "MODEL_CARD.md").read_text()
    from ufgir_cli.analysis.cost import count_flops, count_params

    pc = count_params(model)
    assert f"{pc.trainable:,} trainable of {pc.total:,} total" in card
    assert f"{count_flops(model, 64) // 2 / 1e9:.3f} G per image" in card
    assert "`ila_pp`" in card and "`synthetic` (4 classes)" in card and "[model]" in card
    for name in ("adapter.safetensors", "model.safetensors", "model.onnx", "model.pt2"):
        assert f"`{name}`" in card


def test_export_at_another_image_size_resizes_a_copy(trained, data_env):
    from ufgir_cli.errors import RecipeError
    from ufgir_cli.ship import at_image_size

    model, recipe = ufgir_cli.load_run(trained.run)
    big, big_recipe = at_image_size(model, recipe, 72)
    assert big_recipe.model.image_size == 72 and big.tokens_per_block[0] == 1 + 9 * 9
    assert logits(big, parity_batch(2, 72)).shape == (2, 4)
    assert model.vit.patch_embed.img_size == (64, 64) and model.tokens_per_block[0] == 1 + 8 * 8
    with pytest.raises(RecipeError, match="too small"):  # ILA down-sampling twice needs a 5x5 grid
        at_image_size(model, recipe, 32)


def test_pt2_with_pickled_payload_is_refused(trained, tmp_path):
    src = trained.export / "model.pt2"
    bad = tmp_path / "bad.pt2"
    buf = io.BytesIO()
    torch.save(argparse.Namespace(payload="code"), buf)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = buf.getvalue() if item.filename.endswith("sample_inputs/model.pt") else zin.read(item)
            zout.writestr(item, data)
    with pytest.raises(CheckpointError, match="pickled objects; refused"):
        load_pt2(bad)


# --------------------------------------------------------------------------------------------
# import-upstream


@pytest.mark.skipif(not (UPSTREAM / "ila_pp_t16_224.upstream.pth").is_file(), reason="shared upstream fixture absent")
def test_import_upstream_reproduces_fixture_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, run = UPSTREAM / "ila_pp_t16_224.upstream.pth", tmp_path / "imported"
    r = invoke("import-upstream", src, "--out", run, "--dataset", "soyageing")
    assert r.exit_code == 0, r.output
    assert (run / "recipe.toml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["imported_from"]["sha256"] == file_sha256(src)

    model, recipe = ufgir_cli.load_run(run)
    expected = torch.load(UPSTREAM / "ila_pp_t16_224.expected.pt", weights_only=True)
    diff = float((logits(model, expected["input"]) - expected["logits"]).abs().max())
    print(f"imported run vs reference logits: max abs diff {diff:.3g}")
    assert diff <= 1e-4
    assert (recipe.model.method, recipe.model.num_classes, recipe.model.weights) == ("ila_pp", 200, "none")
    assert recipe.data.dataset == "soyageing"
    assert model.tokens_per_block == expected["tokens_per_block"]

    r = invoke("import-upstream", src, "--out", run)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    (run / "checkpoints" / "best.pt").write_bytes(b"stale")
    r = invoke("import-upstream", src, "--out", run, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (run / "checkpoints" / "best.pt").exists()  # a stale best.pt would shadow the import
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]  # no temp folders left behind


# --------------------------------------------------------------------------------------------
# predict


def test_predict_matches_eval_for_every_source(trained, data_env, tmp_path):
    import csv

    from ufgir_cli.engine.report import eval_run

    _, out, _ = eval_run(trained.run, "test", device="cpu")
    with open(out / "predictions.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 16

    images = tmp_path / "in"
    for rel in sorted(r["path"] for r in rows.values()):
        dst = images / Path(rel).parent.name / Path(rel).name  # nested: folders are searched recursively
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained.data / "synthetic" / rel, dst)
    (images / "c00" / "broken.png").write_bytes(b"not a png")
    (images / "notes.txt").write_text("ignored: not an image extension")
    names = (trained.data / "synthetic" / "classes.csv").read_text().splitlines()[1:]

    # One source per backend: torch (a run folder; a safetensors delta loads into the same model,
    # bit-exactly, see above), onnxruntime, and torch.export at a static batch of 1.
    for source in (trained.run, trained.export / "model.onnx", trained.export / "model.pt2"):
        r = invoke("predict", source, images, "--json", "--topk", "3", "--batch-size", "5")
        assert r.exit_code == 0, r.output
        assert "broken.png: not a readable image" in r.stderr
        res = json.loads(r.stdout)
        assert [Path(s["path"]).name for s in res["skipped"]] == ["broken.png"]
        preds = {Path(p["path"]).name: p["top"] for p in res["predictions"]}
        assert set(preds) == set(rows)
        for name, top in preds.items():
            assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
            assert top[0]["class_id"] == int(rows[name]["prediction"]), (source, name)
            assert abs(top[0]["probability"] - float(rows[name]["probability"])) < 1e-5, (source, name)
            assert top[0]["name"] == names[top[0]["class_id"]].split(",", 1)[1]


def test_predict_without_dataset_uses_class_ids_and_needs_one_readable_image(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(tmp_path / "empty"))
    img = next((trained.data / "synthetic" / "images" / "c01").glob("*.png"))
    r = invoke("predict", trained.export / "model.onnx", img, "--json", "--topk", "10")
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)["predictions"][0]["top"]
    assert len(top) == 4 and {t["name"] for t in top} == {"0", "1", "2", "3"}
    assert not (tmp_path / "empty").exists()  # predict never generates or downloads a dataset

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    r = invoke("predict", trained.export / "model.onnx", bad, tmp_path / "missing.png")
    assert r.exit_code == 2 and "no readable images" in r.stderr
    assert "missing.png: no such file or folder" in r.stderr
