"""The paper's headline top-1 accuracies (Rios et al., Table 1; reference/ILA.md section 7 and
reference/FGIR.md section 9) as data, keyed by the packaged recipe that trains what each row measured.

All numbers are ViT-B/16 (ImageNet-21k) at **448 px** on the test split, trained on train_val; ours
are usually at 224 px, so they are shown beside ours, never instead. Left out: the row that is none
of our recipes (the best fully fine-tuned model CSD) and ``ila`` (down-sampling only) and ``vqt``,
whose accuracies the table does not give.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_IMAGE_SIZE = 448
TABLE1 = "Rios et al. 2024 (arXiv 2409.11051), Table 1, ViT-B/16 at 448 px"

_DATASETS = ("cotton80", "soyageing", "soygene", "soyglobal", "soylocal")


@dataclass(frozen=True)
class PaperRow:
    recipe: str  # the packaged recipe that trains what the row measured
    title: str  # the row as the paper names it
    top1: tuple[float, ...]  # per dataset of ``_DATASETS``
    source: str = TABLE1


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
)
PAPER_ROWS: dict[str, PaperRow] = {r.recipe: r for r in ROWS}

#: (recipe, dataset) -> the paper's top-1 % at 448 px. A method's own recipe has the method's name.
PAPER_TOP1: dict[tuple[str, str], float] = {
    (row.recipe, dataset): top1 for row in ROWS for dataset, top1 in zip(_DATASETS, row.top1, strict=True)
}


def paper_top1(recipe: str, dataset: str) -> float | None:
    """The paper's top-1 % for the row this recipe (or method) trains on this dataset, or None where
    Table 1 has no such cell."""
    return PAPER_TOP1.get((recipe, dataset))


__all__ = ["PAPER_IMAGE_SIZE", "PAPER_ROWS", "PAPER_TOP1", "ROWS", "TABLE1", "PaperRow", "paper_top1"]
