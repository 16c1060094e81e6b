"""Your own method without forking: a method in another installed package, found through the
``ufgir.methods`` entry point group, trains, evaluates, exports and is listed; a broken one is refused
in one line that names its entry point and distribution.

The distribution is written into ``tmp_path`` by the test (a package and its ``*.dist-info`` with
``entry_points.txt``) and put on ``sys.path``; nothing is pip-installed. The method is the README's
example, word for word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.engine.train import fit
from ufgir_cli.errors import RecipeError
from ufgir_cli.methods import refresh_plugins
from ufgir_cli.recipe import load_recipe

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_example(name: str) -> str:
    """The README's plugin example file ``name`` (a ```python block whose first line is ``# name``)."""
    text = README.read_text()
    start = text.index(f"```python\n# {name}\n")
    return text[start + len("```python\n"): text.index("```", start + 10)]


def write_distribution(root: Path, package: str, files: dict[str, str], entry: str) -> None:
    """A minimal installed distribution: the package's files and a dist-info with one entry point."""
    (root / package).mkdir(parents=True)
    for name, body in files.items():
        (root / package / name).write_text(textwrap.dedent(body))
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ufgir.methods]\n{entry}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """The README's mean-patch probe as an installed distribution on ``sys.path``."""
    files = {"__init__.py": "", "spec.py": _readme_example("ufgir_mean_probe/spec.py"),
             "method.py": _readme_example("ufgir_mean_probe/method.py")}
    write_distribution(tmp_path / "site", "ufgir_mean_probe", files, "mean_probe = ufgir_mean_probe.spec:SPEC")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    refresh_plugins()
    yield tmp_path / "site"
    refresh_plugins()
    for mod in [m for m in sys.modules if m.startswith("ufgir_mean_probe")]:
        del sys.modules[mod]


def _recipe(root, **model):
    return load_recipe("quickstart", {
        "model": {"method": "mean_probe", "ila_ds_locs": [], "ila_locs": [], **model},
        "data": {"root": str(root), "num_workers": 0},
        "train": {"epochs": 3, "batch_size": 8, "precision": "fp32"},
        "eval": {"every": 0}, "optim": {"lr": 0.05}, "schedule": {"warmup_steps": 2}, "logging": {"log_every": 1},
    })


def test_plugin_trains_evaluates_and_exports(plugin_path, small_synthetic, tmp_path, one_thread):
    recipe = _recipe(small_synthetic, options={"pool": "max"})
    run = tmp_path / "runs" / "probe"
    fit(recipe, run)
    epochs = [json.loads(line).get("train/loss_epoch") for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [v for v in epochs if v is not None]
    assert len(epochs) == 3 and epochs[-1] < epochs[0]

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and 0 <= metrics["top1"] <= 100
    res = runner.invoke(app, ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "probe.safetensors")])
    assert res.exit_code == 0, res.output

    from ufgir_cli import load_run

    model, saved = load_run(str(run))
    exported, _ = load_run(str(tmp_path / "probe.safetensors"))
    assert saved.model.options == {"pool": "max"} and model.method.options.pool == "max"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), exported.eval()(x))
        tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
        assert torch.allclose(model(x), model.head(tokens.amax(dim=1)), atol=1e-6)  # its own settings, used


def test_plugin_is_listed_and_inspected_without_torch(plugin_path):
    code = ("import sys; from typer.testing import CliRunner; from ufgir_cli.cli import app; "
            "r = CliRunner().invoke(app, ['recipes', 'list']); print(r.output); "
            "assert r.exit_code == 0; assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), *sys.path]), "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mean_probe" in out.stdout and "entry point 'mean_probe'" in out.stdout
    res = CliRunner().invoke(app, ["inspect", "--recipe", "quickstart", "--set", "model.method=mean_probe",
                                   "--set", "model.ila_ds_locs=[]", "--set", "model.num_classes=4"])
    assert res.exit_code == 0, res.output
    assert "mean_probe (petl)" in res.output


def test_plugin_settings_are_validated_by_its_own_model(plugin_path):
    with pytest.raises(RecipeError, match="model.options.pool for method 'mean_probe'"):
        _recipe("unused", options={"pool": "median"})
    with pytest.raises(RecipeError, match="model.options is for a plugin method"):
        load_recipe("linear", {"model": {"options": {"pool": "max"}}})


BROKEN = '''
import torch
from ufgir_cli.model.methods import Method

class WrongShape(Method):
    timm_head = True

    def forward(self, model, x, eval_mode=None):
        return torch.zeros(x.shape[0], 3)
'''


def test_a_broken_plugin_is_refused_in_one_line(tmp_path, monkeypatch, small_synthetic):
    spec = '''
    from ufgir_cli.methods import MethodSpec
    SPEC = MethodSpec("wrong_shape", "petl", "gives three logits whatever the classes", ("head",),
                      impl="broken_method.method:WrongShape")
    '''
    write_distribution(tmp_path, "broken_method", {"__init__.py": "", "spec.py": spec, "method.py": BROKEN},
                       "wrong_shape = broken_method.spec:SPEC")
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_plugins()
    try:
        recipe = load_recipe("quickstart", {"model": {"method": "wrong_shape", "ila_ds_locs": [], "weights": "none",
                                                      "num_classes": 4}})
        from ufgir_cli.model import build_model

        with pytest.raises(RecipeError) as err:
            build_model(recipe.model, 4)
        msg = str(err.value)
        assert "entry point 'wrong_shape'" in msg and "broken-method" in msg and "(2, 4) logits" in msg
        assert "\n" not in msg
    finally:
        refresh_plugins()
        for mod in [m for m in sys.modules if m.startswith("broken_method")]:
            del sys.modules[mod]


def test_an_entry_point_that_is_not_a_spec_names_itself(tmp_path, monkeypatch):
    write_distribution(tmp_path, "not_a_spec", {"__init__.py": "SPEC = 42\n"}, "nothing = not_a_spec:SPEC")
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_plugins()
    try:
        with pytest.raises(RecipeError, match="entry point 'nothing' .* of not-a-spec must name a .*MethodSpec, not a int"):
            load_recipe("linear", {"model": {"method": "nothing"}})
    finally:
        refresh_plugins()
