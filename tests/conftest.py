"""Shared test fixtures: offline, CPU, isolated from the user's environment and data dir."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("UFGIR_FIXTURES", REPO.parent / "shared" / "fixtures" / "upstream"))


def pytest_addoption(parser):
    parser.addoption("--run-slurm", action="store_true",
                     help="run the tests marked slurm: they submit jobs to the Slurm that SLURM_CONF names")


def pytest_collection_modifyitems(config, items):
    """Tests that submit real Slurm jobs run only when asked (`make test-slurm`), never by `make test`."""
    if config.getoption("--run-slurm"):
        return
    skip = pytest.mark.skip(reason="needs a running Slurm: make test-slurm (or pytest --run-slurm)")
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path_factory):
    """No UFGIR_* variable from the caller leaks into a test; data goes to a per-session tmp dir."""
    for k in list(os.environ):
        if k.startswith("UFGIR_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("UFGIR_DATA_DIR", str(tmp_path_factory.getbasetemp() / "data"))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURES / "ila_pp_t16_224.upstream.pth").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set UFGIR_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """A small synthetic dataset folder (4 classes, 6 train_val + 4 test each, 64 px)."""
    from ufgir_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("small") / "synthetic"
    generate_synthetic(root, num_classes=4, train_val=6, test=4, size=64)
    return root


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, small_synthetic):
    """``tiny_runs(method, weights="timm")`` -> a run folder, trained on first use and kept for the session:
    the micro ViT (its packaged weights: "timm"; or "file", the same weights named by path), one epoch
    on ``small_synthetic``, evaluated on test. Point UFGIR_DATA_DIR at ``small_synthetic.parent`` to
    evaluate or analyse it."""
    from ufgir_cli.model.backbone import MICRO_WEIGHTS

    root, made = tmp_path_factory.mktemp("tiny_runs"), {}

    def get(method: str, weights: str = "timm") -> Path:
        if (method, weights) not in made:
            from ufgir_cli.engine.train import fit
            from ufgir_cli.recipe import load_recipe

            model = {"method": method, "weights": str(MICRO_WEIGHTS) if weights == "file" else weights}
            if not method.startswith("ila"):
                model["ila_ds_locs"] = []
            recipe = load_recipe("quickstart", {"model": model, "data": {"num_workers": 0},
                                                "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"}})
            run = root / f"{method}_{weights}"
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))
                fit(recipe, run)
            made[method, weights] = run
        return made[method, weights]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: two threads contend for no gain there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def loopback_server(handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering with ``handler``; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
