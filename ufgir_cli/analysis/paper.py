"""The papers' headline top-1 accuracies as data, keyed by the packaged recipe that trains what each row
measured: the ILA paper's Table 1 (Rios et al.; reference/ILA.md section 7 and reference/FGIR.md section 9)
and CLCA's Table I (reference/CLCA.md section 7). Each row names its source.

The ILA paper's numbers are ViT-B/16 (ImageNet-21k) at **448 px** on the test split, trained on train_val;
CLCA's are at 448 px too, on three of the five datasets, with a backbone its repository does not state (its
GMACs are ViT-B/16's). Ours are usually at 224 px, so they are shown beside ours, never instead. Left out:
the rows that are none of our recipes (the best fully fine-tuned model CSD; CLCA's ViT, DeiT, CSDNet) and
``ila`` (down-sampling only) and ``vqt``, whose accuracies the table does not give.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_IMAGE_SIZE = 448
TABLE1 = "Rios et al. 2024 (arXiv 2409.11051), Table 1, ViT-B/16 at 448 px"
CLCA_TABLE1 = "CLCA (Rios et al., ICASSP 2025) Table I; backbone not stated in its repository"

_CLCA_CITE = "CLCA, Table I"
_DATASETS = ("cotton80", "soyageing", "soygene", "soyglobal", "soylocal")


@dataclass(frozen=True)
class PaperRow:
    recipe: str  # the packaged recipe that trains what the row measured
    title: str  # the row as the paper names it
    top1: tuple[float, ...]  # per dataset of ``datasets``
    source: str = TABLE1
    datasets: tuple[str, ...] = _DATASETS
    #: A recipe of another method's own row that ``reproduce`` runs by default too (CLCA at keep 0.7).
    extra_row: bool = False
    cite: str = "ILA paper, Table 1"  # the source, short, as a figure's label says it
    backbone_stated: bool = True  # False: the source does not say which backbone its number is of


ROWS: tuple[PaperRow, ...] = (
    PaperRow("linear", "ViT B-16 (linear probe)", (39.03, 48.61, 21.31, 24.97, 28.72)),
    PaperRow("vpt_shallow", "VPT-shallow", (38.19, 49.12, 27.43, 27.37, 28.39)),
    PaperRow("vpt_deep", "VPT-deep", (43.19, 60.76, 38.28, 36.83, 25.28)),
    PaperRow("convpass", "ConvPass", (48.33, 60.18, 53.43, 45.13, 34.22)),
    PaperRow("adapter", "Adapter", (48.19, 73.31, 57.04, 47.27, 36.83)),
    PaperRow("ila_plus", "ILA+", (53.33, 68.79, 52.65, 48.29, 46.56)),
    PaperRow("ila_pp", "ILA++", (55.42, 75.00, 62.19, 58.14, 50.83)),
    # The fine-grained baselines (FGIR.md section 9), frozen backbone.
    PaperRow("mpncov", "MPNC", (43.89, 40.43, 20.22, 25.79, 27.94)),
    PaperRow("ifa", "IFA", (44.58, 56.01, 33.09, 35.82, 29.22)),
    PaperRow("transfg", "TrFG", (51.67, 57.54, 38.79, 45.35, 38.06)),
    PaperRow("ffvt", "FFVT", (51.94, 69.93, 49.97, 47.70, 42.22)),
    PaperRow("glsim", "GLSim", (45.70, 56.58, 33.04, 39.85, 29.95)),
    PaperRow("rams", "RAMS", (38.47, 50.73, 25.83, 25.17, 29.67)),
    PaperRow("cal", "CAL", (44.03, 51.16, 23.03, 34.98, 31.61)),
    # Starred: every backbone weight trained (FGIR.md section 9).
    PaperRow("transfg_ft", "TrFG* (full fine-tuning)", (54.58, 72.16, 22.38, 21.24, 40.67)),
    PaperRow("simtrans", "SIMT* (full fine-tuning)", (54.58, 34.76, 15.46, 70.69, 25.00)),
    # CLCA's Table I (CLCA.md section 7): every weight trained, 448 px; Cotton, SoyAgeing and SoyGlobal only.
    PaperRow("clca", "CLCA (keep 10 %)", (55.6, 87.4, 61.1), CLCA_TABLE1, ("cotton80", "soyageing", "soyglobal"),
             cite=_CLCA_CITE, backbone_stated=False),
    PaperRow("clca_keep07", "CLCA (keep 70 %)", (67.8, 88.3, 58.2), CLCA_TABLE1, ("cotton80", "soyageing", "soyglobal"),
             extra_row=True, cite=_CLCA_CITE, backbone_stated=False),
)
PAPER_ROWS: dict[str, PaperRow] = {r.recipe: r for r in ROWS}

#: (recipe, dataset) -> the paper's top-1 % at 448 px. A method's own recipe has the method's name.
PAPER_TOP1: dict[tuple[str, str], float] = {
    (row.recipe, dataset): top1 for row in ROWS for dataset, top1 in zip(row.datasets, row.top1, strict=True)
}


def paper_top1(recipe: str, dataset: str) -> float | None:
    """The paper's top-1 % for the row this recipe (or method) trains on this dataset, or None where
    Table 1 has no such cell."""
    return PAPER_TOP1.get((recipe, dataset))


def paper_source(recipe: str) -> str | None:
    """Where the paper's numbers of the row this recipe trains come from (None: no row)."""
    row = PAPER_ROWS.get(recipe)
    return None if row is None else row.source


def paper_sources(recipes) -> list[str]:
    """The sources of these recipes' rows, each once, the ILA paper's first (what a table's note cites)."""
    found = {PAPER_ROWS[r].source for r in recipes if r in PAPER_ROWS}
    return [s for s in dict.fromkeys(row.source for row in ROWS) if s in found]


__all__ = ["CLCA_TABLE1", "PAPER_IMAGE_SIZE", "PAPER_ROWS", "PAPER_TOP1", "ROWS", "TABLE1", "PaperRow", "paper_source",
           "paper_sources", "paper_top1"]
