"""The README's commands work as written: those that need no download, no Hub weights and under a
minute of CPU are run exactly as printed; every option of the others exists in that command's --help."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ufgir_cli.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
#: Commands run as written: they read only packaged recipes and the catalog.
RUNNABLE = {("recipes", "list"), ("recipes", "show"), ("recipes", "keys"), ("inspect",), ("datasets",)}
GROUPS = {"recipes", "visualize", "datasets"}


def readme_commands() -> list[list[str]]:
    """Every ``ufgir ...`` line of the README's bash blocks, comments cut, continuations joined."""
    text = README.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if line.startswith("ufgir "):
                out.append(shlex.split(line)[1:])
    return out


def _subcommand(args: list[str]) -> tuple[str, ...]:
    return tuple(args[:2]) if args[0] in GROUPS else (args[0],)


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    kinds = {_subcommand(a) for a in COMMANDS}
    assert {("train",), ("eval",), ("sweep",), ("download",), ("export",), ("metrics",)} <= kinds
    assert RUNNABLE <= kinds


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command(args, monkeypatch, tmp_path):
    runner = CliRunner()
    sub = _subcommand(args)
    monkeypatch.setenv("COLUMNS", "200")
    if sub in RUNNABLE:
        monkeypatch.chdir(tmp_path)
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        return
    help_text = runner.invoke(app, [*sub, "--help"]).output
    for opt in (a.split("=", 1)[0] for a in args if a.startswith("-")):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text), f"{' '.join(sub)} has no {opt}"


def test_readme_notebook_example_runs(tmp_path, monkeypatch, small_synthetic):
    """The README's "From Python" example, run as written (on a small synthetic set): it writes the
    files the CLI commands write."""
    text = README.read_text(encoding="utf-8")
    code = re.search(r"```python\n# notebook example\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UFGIR_DATA_DIR", str(small_synthetic.parent))  # `synthetic` is the small set
    exec(compile(code, "README.md", "exec"), {})
    run = tmp_path / "runs" / "notebook"
    for f in ("recipe.toml", "checkpoints/last.pt", "eval/test/metrics.json", "analysis/metrics.json",
              "analysis/cka.png", "analysis/features.png"):
        assert (run / f).is_file(), f
    grids = list((run / "analysis" / "visualize").glob("rollout_*/grid.png"))
    assert len(grids) == 1
