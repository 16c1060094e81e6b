"""`ufgir serve` (issue 38): the Gradio page started in-process on a loopback port and driven with
gradio_client, as a browser's uploads would; the top-1 it shows is `ufgir predict`'s."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app

gradio = pytest.importorskip("gradio", reason="the app extra (pip install 'ufgir[app]') is not installed")
from gradio_client import Client, handle_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_runs, small_synthetic, monkeypatch):
    """GLSim (it crops: the page also shows its box and crop), served on a free loopback port; the model
    is loaded once however many requests come."""
    import ufgir_cli.ship.app as page

    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    loads = []
    real = page.load_model
    monkeypatch.setattr(page, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    run = tiny_runs("glsim")
    demo = page.serve(run, port=free_port(), block=False)
    try:
        yield run, Client(demo.local_url, verbose=False), loads
    finally:
        demo.close()


def test_page_explains_images_like_predict(served, small_synthetic, tmp_path):
    run, client, loads = served
    images = [small_synthetic / "images" / c / f"{c}_001_test.png" for c in ("c01", "c03")]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a leaf")

    message, label, table, rollout, looked = client.predict([handle_file(str(p)) for p in [*images, notes]],
                                                            api_name="/explain")
    want = json.loads(CliRunner().invoke(app, ["predict", str(run), *map(str, images), "--json"]).stdout)
    top1 = [p["top"][0] for p in want["predictions"]]
    assert label["label"] == top1[0]["name"]
    assert label["confidences"][0]["confidence"] == pytest.approx(top1[0]["probability"], abs=1e-6)
    firsts = [row for row in table["data"] if row[1] == 1]
    assert [(r[0], r[2]) for r in firsts] == [(p.name, t["name"]) for p, t in zip(images, top1, strict=True)]
    assert len(table["data"]) == 2 * 4  # every image, its top 4 (of 4 classes)
    assert "notes.txt** skipped: not an image" in message and "2 images" in message
    assert "box" in message  # what GLSim looked at, in words
    assert len(rollout) == 2 and [r["caption"].split(":")[0] for r in rollout] == [p.stem for p in images]
    assert len(looked) == 2 * 2 and "image and box" in looked[0]["caption"]  # image + box, crop; per image

    only_text = client.predict([handle_file(str(notes))], api_name="/explain")
    assert "notes.txt** skipped: not an image" in only_text[0] and "Drop image files" in only_text[0]
    assert len(loads) == 1


def test_explainer_without_a_selection_and_with_examples(tiny_runs, small_synthetic, monkeypatch):
    from ufgir_cli.ship.app import Explainer, page_outputs

    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
    ex = Explainer(tiny_runs("ila_pp"), topk=2)
    examples = ex.examples()
    assert len(examples) == 4 and all(p.parent.parent.name == "images" and "_test" in p.name for p in examples)
    assert not ex.selects
    message, label, rows, rollout, looked = page_outputs(ex, [str(examples[0])])
    assert len(label) == 2 and len(rows) == 2 and len(rollout) == 1 and looked == []
    image, caption = rollout[0]
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8" and caption.startswith(examples[0].stem)
    assert page_outputs(ex, [])[0].startswith("Drop one or more images")
