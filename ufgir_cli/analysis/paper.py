"""The paper's headline top-1 accuracies (Rios et al., Table 1; reference/ILA.md, section 7) as data.

All numbers are ViT-B/16 (ImageNet-21k) at **448 px** on the test split, trained on train_val; ours
are usually at 224 px, so they are shown beside ours, never instead. Keys are our method and dataset
names; the paper's rows that are not one of our methods (SimTrans, fully fine-tuned only) and the fully
fine-tuned rows (starred: a recipe, not a method) are left out, as are ``ila`` (down-sampling only) and ``vqt``, whose accuracies
the table does not give.
"""

from __future__ import annotations

PAPER_IMAGE_SIZE = 448

_DATASETS = ("cotton80", "soyageing", "soygene", "soyglobal", "soylocal")
_ROWS = {
    "linear": (39.03, 48.61, 21.31, 24.97, 28.72),
    "vpt_shallow": (38.19, 49.12, 27.43, 27.37, 28.39),
    "vpt_deep": (43.19, 60.76, 38.28, 36.83, 25.28),
    "convpass": (48.33, 60.18, 53.43, 45.13, 34.22),
    "adapter": (48.19, 73.31, 57.04, 47.27, 36.83),
    "ila_plus": (53.33, 68.79, 52.65, 48.29, 46.56),
    "ila_pp": (55.42, 75.00, 62.19, 58.14, 50.83),
    # The fine-grained baselines (FGIR.md section 9), frozen backbone.
    "mpncov": (43.89, 40.43, 20.22, 25.79, 27.94),
    "ifa": (44.58, 56.01, 33.09, 35.82, 29.22),
    "transfg": (51.67, 57.54, 38.79, 45.35, 38.06),
    "ffvt": (51.94, 69.93, 49.97, 47.70, 42.22),
    "glsim": (45.70, 56.58, 33.04, 39.85, 29.95),
    "rams": (38.47, 50.73, 25.83, 25.17, 29.67),
    "cal": (44.03, 51.16, 23.03, 34.98, 31.61),
}

#: (method, dataset) -> the paper's top-1 % at 448 px.
PAPER_TOP1: dict[tuple[str, str], float] = {
    (method, dataset): top1 for method, row in _ROWS.items() for dataset, top1 in zip(_DATASETS, row, strict=True)
}


def paper_top1(method: str, dataset: str) -> float | None:
    """The paper's top-1 % for this method and dataset, or None where Table 1 has no such cell."""
    return PAPER_TOP1.get((method, dataset))


__all__ = ["PAPER_IMAGE_SIZE", "PAPER_TOP1", "paper_top1"]
