"""The CLI shell: light imports, one-line errors, inspect numbers."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from ufgir_cli.cli import app

runner = CliRunner()


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, env={"PATH": "", "HF_HUB_OFFLINE": "1"})
    return set(out.stdout.split())


def test_help_and_recipes_list_do_not_import_torch():
    heavy = {"torch", "timm", "matplotlib", "tensorboard", "torchvision"}
    mods = _loaded_after("from ufgir_cli.cli import app\nfrom typer.testing import CliRunner\n"
                         "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
                         "r = CliRunner().invoke(app, ['recipes', 'list']); assert r.exit_code == 0, r.output")
    assert not heavy & mods, heavy & mods


def test_recipes_list_and_show():
    res = runner.invoke(app, ["recipes", "list"])
    assert res.exit_code == 0
    for name in ("ila_pp", "ila_plus", "vpt_deep", "quickstart"):
        assert name in res.output
    res = runner.invoke(app, ["recipes", "show", "ila_pp", "--set", "train.epochs=3"])
    assert res.exit_code == 0 and "epochs = 3" in res.output and 'method = "ila_pp"' in res.output


def test_inspect_numbers():
    res = runner.invoke(app, ["inspect", "--recipe", "ila_pp", "--num-classes", "200"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "trainable 508,600" in res.output
    assert "13.14 GMACs" in res.output
    assert "DS-ILA" in res.output


def test_errors_are_one_line_exit_2():
    res = runner.invoke(app, ["inspect", "--recipe", "ila", "--set", "model.ila_ds_locs=[3,12]"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.ila_ds_locs" in lines[0]
    res = runner.invoke(app, ["recipes", "show", "missing_recipe"])
    assert res.exit_code == 2 and "not found" in res.output


def test_shared_options_say_one_thing():
    """--checkpoint, --device and --split are one alias each (cli/_common.py): one help text in every command."""
    import typer.main

    helps: dict[str, set[str]] = {}

    def walk(cmd) -> None:
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
        for p in cmd.params:
            for flag in set(getattr(p, "opts", [])) & {"--checkpoint", "--device", "--split"}:
                helps.setdefault(flag, set()).add(p.help)

    walk(typer.main.get_command(app))
    assert set(helps) == {"--checkpoint", "--device", "--split"}
    assert all(len(h) == 1 for h in helps.values()), helps
