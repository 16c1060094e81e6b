"""`ufgir push`: a run as a model repo on the Hugging Face Hub. Pulling needs no command: every command
that takes a run also takes ``hf://OWNER/NAME[@REVISION]`` (the one loader fetches it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ._common import CheckpointOpt, console, err_console


def push(
    run: Annotated[Path, typer.Argument(help="A run folder, checkpoint, safetensors export or hf://OWNER/NAME.",
                                        show_default=False)],
    repo_id: Annotated[str, typer.Argument(metavar="OWNER/NAME", help="The model repo to create or update.",
                                           show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps "
                                          "its visibility).")] = False,
    revision: Annotated[str | None, typer.Option("--revision", metavar="BRANCH", help="Push to this branch "
                                                 "(created from main when missing; default main).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Every tensor, even where the adapter delta would do.")] = False,
    checkpoint: CheckpointOpt = "auto",
    token: Annotated[str | None, typer.Option("--token", help="A Hub token with write access (default: HF_TOKEN, "
                                              "or the one `hf auth login` stored).", show_default=False)] = None,
) -> None:
    """Push a run to the Hugging Face Hub as a model repo; load it back anywhere as hf://OWNER/NAME.

    The repo holds the model as safetensors (the adapter delta for frozen-backbone methods on timm
    weights, else every tensor), the resolved recipe, classes.csv, the run's evaluation results, a model
    card (README.md) and ufgir.json (every file's sha256 and size, the backbone's tag and hash); for a
    plain timm ViT (linear probe, full fine-tuning) also timm's config.json + model.safetensors."""
    from ..paths import HubRef
    from ..ship import human_bytes
    from ..ship.hub import push_run

    def staged(s) -> None:
        what = "the adapter delta" if s.adapter_only else "every tensor"
        total = sum(s.files.values())
        console.print(f"staged {len(s.files)} files, {human_bytes(total)}: {s.weights_file} ({what})"
                      + (", timm's config.json + model.safetensors" if s.timm_files else ""), soft_wrap=True)
        for note in s.notices:
            err_console.print(f"[yellow]notice:[/] {escape(note)}", soft_wrap=True)

    r = push_run(run, repo_id, private=private, revision=revision, full=full, checkpoint=checkpoint, token=token,
                 on_staged=staged)
    ref = HubRef(*r.repo_id.split("/"), revision)
    console.print(f"pushed to {r.repo_id} ({r.revision}), commit {r.commit[:12]}: {escape(r.url)}", soft_wrap=True)
    console.print(f"use it: ufgir predict {ref} IMAGE...   ·   ufgir serve {ref}", soft_wrap=True, markup=False)
