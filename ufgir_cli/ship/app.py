"""`ufgir serve`: a web page that explains a prediction (Gradio, the optional ``ufgir[app]`` extra).

Drop one or more images: the page shows the top-k classes with their names and probabilities (the same
numbers as `ufgir predict`, which computes them), the attention rollout over each image, and for methods
that crop or select (GLSim, RAMS, CAL, TransFG, FFVT) what they looked at (`Method.select`). Examples
come from the dataset's test split when it is on disk. The model is loaded once, on the CPU.

:class:`Explainer` does the work and knows nothing of Gradio; :func:`build_app` lays out the page
around it. Gradio is imported only inside :func:`build_app`, so the rest of ufgir runs without it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..analysis import report as ar
from ..analysis import rollout as ro
from ..data.datasets import load_image, normalize, preprocess_for
from ..data.loaders import open_split
from ..errors import DatasetError, OptionError, UfgirError
from ..methods import method_spec
from ..model.checkpoint import load_model
from ..model.methods import Method
from ..paths import HubRef
from ..viz.figures import blend
from .predict import IMAGE_EXTS, predict_images, predictor_of

#: Rectangles on the "what it looked at" panels when the method names no colour (a single box, patches).
_RECT_COLOUR = "#ff2a2a"


@dataclass
class Explained:
    """One image explained: its top-k, the rollout blended over it, what the method looked at."""

    path: Path
    top: list[tuple[int, str, float]]  # (class id, name, probability), best first
    rollout: np.ndarray | None  # (S, S, 3) uint8: the image as the model saw it, rollout blended over it
    looked: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (S, S, 3) uint8 panels, captions


@dataclass
class Explanation:
    images: list[Explained]
    skipped: list[tuple[Path, str]]  # files that were not images, and why
    looked_what: str | None  # what the method selects, in words (None: it selects nothing)


def _draw_rects(image: np.ndarray, rects: list[tuple]) -> np.ndarray:
    """``rects`` (top, left, height, width[, colour]) drawn 2 px wide on a copy of a uint8 (S, S, 3) image."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for top, left, h, w, *colour in rects:
        draw.rectangle([left, top, left + w - 1, top + h - 1], outline=colour[0] if colour else _RECT_COLOUR, width=2)
    return np.asarray(pil)


class Explainer:
    """A model loaded once (on the CPU), and what the page shows for a list of image files."""

    def __init__(self, source: str | os.PathLike, topk: int = 5, checkpoint: str = "auto"):
        self.source = str(HubRef.parse(source) or source)
        self.loaded = load_model(source, checkpoint, device="cpu")
        self.model, self.recipe = self.loaded.model, self.loaded.recipe
        self.predictor = predictor_of(self.loaded)
        self.names, self.names_from = self.predictor.class_names()
        self.topk = max(1, min(topk, self.model.num_classes))
        self.transform = preprocess_for(self.recipe, train=False)
        self.selects = type(self.model.method).select is not Method.select  # it crops or selects

    @property
    def title(self) -> str:
        m = self.recipe.model
        return f"{method_spec(m.method).display_name} · {m.backbone} · {self.recipe.data.dataset}"

    def examples(self, count: int = 8) -> list[Path]:
        """Up to ``count`` images of the dataset's test split, one class each, when the split is on disk."""
        try:
            sf = open_split(self.recipe, "test")
        except (DatasetError, OSError):
            return []
        picks = ar.pick_per_class([t for _, t in sf.samples], 1, count)
        return [Path(sf.samples[i][0]) for i in picks]

    @torch.no_grad()
    def explain(self, files: list[str | os.PathLike]) -> Explanation:
        """Top-k, rollout and selection of every image among ``files``; the others are skipped with why."""
        skipped: list[tuple[Path, str]] = []

        def skip(path: Path, why: str) -> None:
            skipped.append((path, why))

        paths = [Path(f) for f in files]
        preds = predict_images(self.predictor, paths, topk=self.topk, on_skip=skip)
        if skipped:  # say what an image is, in the page's words
            exts = ", ".join(sorted(e[1:] for e in IMAGE_EXTS))
            skipped = [(p, f"not an image ({exts})") for p, _ in skipped]
        if not preds:
            return Explanation([], skipped, None)
        x = torch.stack([self.transform(load_image(str(p.path)), None) for p in preds])  # (B, 3, S, S) uint8
        rollouts = self._rollout(x)
        out = [Explained(p.path, p.top, None if rollouts is None else rollouts[i]) for i, p in enumerate(preds)]
        panels = ar.selection_panels(self.model, x) if self.selects else None
        if panels is not None:
            for i, e in enumerate(out):
                e.looked = [(_draw_rects(images[i], rects[i]), label) for label, images, rects in panels.panels]
        return Explanation(out, skipped, panels.what if panels is not None else None)

    def _rollout(self, x: torch.Tensor) -> np.ndarray | None:
        """The attention rollout through every block (across down-sampling ILAs) blended over each image."""
        xn = normalize(x, self.model.data_config())
        try:
            [(_, maps)] = ar.rollout_maps(self.model, self.model.attention_maps(xn), across=True)
        except ValueError:
            return None  # a model whose tokens cannot be followed back to the patches
        heat = ro.upsample(maps, tuple(x.shape[-2:])).numpy()                               # (B, S, S)
        images = x.permute(0, 2, 3, 1).numpy()
        return np.stack([(blend(img, h) * 255).round().astype(np.uint8) for img, h in zip(images, heat, strict=True)])


def page_outputs(explainer: Explainer, files: list[str] | None) -> tuple:
    """What the page shows for ``files``: a message, the top-k of the first image (as ``gr.Label`` takes
    it), a table of every image's top-k, the rollout gallery and the "looked at" gallery. Files that are
    not images are named in the message, never an error."""
    if not files:
        return "Drop one or more images (png, jpg, bmp, tif, webp), or pick an example.", None, [], [], []
    res = explainer.explain(files)
    notes = [f"**{p.name}** skipped: {why}." for p, why in res.skipped]
    if not res.images:
        return "  \n".join([*notes, "Drop image files."]), None, [], [], []
    first = res.images[0]
    label = {name: prob for _, name, prob in first.top}
    rows = [[e.path.name, rank + 1, name, round(prob, 4)] for e in res.images for rank, (_, name, prob) in enumerate(e.top)]
    rollout = [(e.rollout, f"{e.path.stem}: {e.top[0][1]} ({e.top[0][2]:.2f})") for e in res.images if e.rollout is not None]
    looked = [(img, f"{e.path.stem}: {caption}") for e in res.images for img, caption in e.looked]
    n = len(res.images)
    head = f"{n} image{'s' if n > 1 else ''}: top-1 **{first.top[0][1]}** ({first.top[0][2]:.2f}) for {first.path.name}"
    if res.looked_what:
        head += f"; the method looked at {res.looked_what}"
    return "  \n".join([head, *notes]), label, rows, rollout, looked


def _need_gradio() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise UfgirError("ufgir serve needs Gradio, the optional app extra: pip install 'ufgir[app]'")


def build_app(explainer: Explainer):
    """The page (a ``gradio.Blocks``); its ``/explain`` endpoint takes a list of files."""
    _need_gradio()
    import gradio as gr

    m = explainer.recipe.model
    examples = explainer.examples()
    names = {None: "none found: class ids", "the model's repo": "the model's repo"}.get(
        explainer.names_from, "the dataset's classes.csv")
    with gr.Blocks(title=f"ufgir · {explainer.title}", analytics_enabled=False) as demo:
        gr.Markdown(f"# {explainer.title}\n"
                    f"{explainer.recipe.description or ''}\n\n"
                    f"Model: `{explainer.source}` · {explainer.model.num_classes} classes (names from {names}) · "
                    f"{m.image_size} px · CPU. Drop one or more images: the top {explainer.topk} classes, the attention "
                    "rollout over each image (red: what the class token drew on, through every block)"
                    + (", and what the method looked at." if explainer.selects else "."))
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", type="filepath")
                button = gr.Button("Explain", variant="primary")
                if examples:
                    gr.Examples([[[str(p)]] for p in examples], inputs=files, label="Test-split images",
                                example_labels=[p.name for p in examples])
            with gr.Column(scale=1):
                message = gr.Markdown()
                label = gr.Label(num_top_classes=explainer.topk, label="Top classes (first image)")
                table = gr.Dataframe(headers=["image", "rank", "class", "probability"], label="Every image",
                                     interactive=False)
        rollout = gr.Gallery(label="Attention rollout", columns=6, fit_columns=False, height=260)
        looked = gr.Gallery(label="What the method looked at", columns=6, fit_columns=False, height=260,
                            visible=explainer.selects)
        outputs = [message, label, table, rollout, looked]

        def run(paths: list[str] | None):
            return page_outputs(explainer, paths)

        button.click(run, inputs=files, outputs=outputs, api_name="explain")
        files.upload(run, inputs=files, outputs=outputs, api_visibility="private")
    return demo


def serve(source: str | os.PathLike, *, port: int | None = None, host: str = "127.0.0.1", share: bool = False,
          topk: int = 5, checkpoint: str = "auto", block: bool = True):
    """Load the model once, build the page and serve it; ``share`` asks Gradio for a public link (its
    share servers). With ``block=False`` it returns the running app (``.local_url``; ``.close()``)."""
    _need_gradio()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(Explainer(source, topk=topk, checkpoint=checkpoint))
    try:
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                    ssr_mode=False, quiet=not block, show_error=True)
    except OSError as e:  # the port is taken
        raise OptionError(f"--port {port}: cannot serve on {host}:{port} ({e}); pick another port") from None
    return demo


__all__ = ["Explained", "Explainer", "Explanation", "build_app", "page_outputs", "serve"]
