"""`ufgir serve`: a web page that explains a prediction (Gradio; `pip install 'ufgir[app]'`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import CheckpointOpt, RunArg, TopkOpt, console, resolve_run


def serve(
    run: RunArg = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="Port (default: Gradio's, 7860 or "
                                             "the next free one).", show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    share: Annotated[bool, typer.Option("--share", help="Also a public link through Gradio's share servers "
                                        "(needs internet; anyone with the link can use the model).")] = False,
    topk: TopkOpt = 5,
    checkpoint: CheckpointOpt = "auto",
) -> None:
    """A web page that explains predictions: drop images, see the top classes and where the model looked.

    The page shows the top-k classes with their names and probabilities, the attention rollout over each
    image and, for GLSim, RAMS, CAL, TransFG and FFVT, the box, crop or patches the method looked at.
    The model is loaded once, on the CPU; examples come from the dataset's test split when it is here."""
    from ..ship.app import serve as run_app

    console.print("loading the model and starting the page (Ctrl+C stops it) ...")
    run_app(resolve_run(run), port=port, host=host, share=share, topk=topk, checkpoint=checkpoint)
