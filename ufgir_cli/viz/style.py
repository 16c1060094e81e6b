"""What every figure shares: the style, sizes in inches, text that fits, and :func:`save`.

Sizes are in inches and fonts in points at the saved size (no text under ``MIN_FONT_PT``), so a figure
looks the same at any ``dpi``: only its pixel count changes. Panels are placed at fixed positions in
inches rather than by tight bounding boxes, so a figure's size depends on what it shows (how many
panels, how many title lines), never on the renderer. PNG is always written; PDF (TrueType fonts, which
publishers ask for) and SVG on request, without time stamps so that equal figures are equal files.
Figures are drawn on a ``Figure`` with an Agg canvas, never through pyplot, so nothing global
(backend, current figure) changes and no display is needed.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..io import atomic_open

DPI = 200
FORMATS = ("png", "pdf", "svg")
MIN_FONT_PT = 8.0
MAX_ASPECT = 3.0             # width / height of any figure

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "legend.title_fontsize": 8, "figure.titlesize": 11,
    "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42,      # TrueType in PDFs: Type 3 fonts are refused by many publishers
    "svg.hashsalt": "ufgir",  # stable element ids, so equal SVGs are equal files
}
_METADATA = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
_CHAR_EM = 0.55              # mean glyph width of the default sans-serif, in ems: for wrapping text


def new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def axes_at(fig: Figure, left: float, bottom: float, width: float, height: float):
    """Axes at a position given in inches from the figure's lower left corner."""
    W, H = fig.get_size_inches()
    return fig.add_axes((left / W, bottom / H, width / W, height / H))


def wrap(text: str, width_in: float, size_pt: float) -> str:
    """``text`` broken into lines that fit ``width_in`` at ``size_pt``: between its " · " parts where it
    can, the later parts kept together (a title's "what · run · split" breaks as "what" / "run · split"),
    else between words."""
    chars = max(12, int(width_in * 72 / (_CHAR_EM * size_pt)))
    out = []
    for line in text.split("\n"):
        lines: list[str] = []
        current = ""
        for part in reversed(line.split(" · ")):  # packed from the end
            if current and len(current) + 3 + len(part) <= chars:
                current = part + " · " + current
                continue
            if current:
                lines.insert(0, current)
            current = part
            if len(part) > chars:  # a part longer than a line: between its words
                lines[:0] = textwrap.wrap(part, chars, break_on_hyphens=False)
                current = ""
        if current or not lines:
            lines.insert(0, current)
        out += lines
    return "\n".join(out)


def fit(text: str, width_in: float, size_pt: float) -> str:
    """``text`` cut with an ellipsis to fit one line of ``width_in``."""
    chars = max(4, int(width_in * 72 / (_CHAR_EM * size_pt)))
    return text if len(text) <= chars else text[: chars - 1] + "…"


#: A title is written on one line up to this width, widening a narrow figure for it.
MAX_TITLE_WIDTH_IN = 6.5
_BOLD_EM = 0.6               # mean glyph width of the bold title font, in ems


def title_width(text: str) -> float:
    """Inches a one-line figure title needs (with the margins `wrap` keeps)."""
    return len(text) * _BOLD_EM * STYLE["figure.titlesize"] / 72 + 0.3


def line_count(text: str) -> int:
    return text.count("\n") + 1 if text else 0


def save(fig: Figure, path: Path, dpi: int = DPI, formats: Sequence[str] = ()) -> Path:
    """Write ``fig`` as PNG at ``dpi`` and, beside it with the same stem, in each of ``formats``
    (``"pdf"``, ``"svg"``); returns the PNG's path."""
    png = Path(path).with_suffix(".png")
    with mpl.rc_context(STYLE):
        for fmt in dict.fromkeys(("png", *formats)):
            if fmt not in FORMATS:
                raise ValueError(f"figure format {fmt!r} is not one of {', '.join(FORMATS)}")
            with atomic_open(png.with_suffix(f".{fmt}"), "wb") as f:
                fig.savefig(f, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
    return png


def styled(draw):
    """Run a ``draw_*`` function under :data:`STYLE` (fonts are fixed when an artist is made)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def colorbar(fig: Figure, cax, norm: Normalize, cmap: str, label: str, **kw) -> None:
    """A colour bar in ``cax``, named like the ones matplotlib places itself (tests find it so)."""
    cax.set_label("<colorbar>")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label=label, **kw)


def suptitle(fig: Figure, text: str, top_in: float) -> None:
    fig.text(0.5, 1 - top_in / fig.get_size_inches()[1], text, ha="center", va="top",
             fontsize=STYLE["figure.titlesize"], fontweight="bold")


def log_ticks(axis, lo: float, hi: float) -> None:
    """Plain numbers on a log axis: every minor tick labelled within a decade, the 2s and 5s within two,
    only the powers of ten beyond."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    digits = "123456789" if hi / lo < 10 else "25" if hi / lo < 100 else ""
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in digits else ""))
