"""MODEL_CARD.md: what the model is, what it costs, how well it did, how to run it.

Written beside every export; it lists every export in that folder, so exporting several formats
into one folder keeps them all on the card.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..analysis.cost import count_flops, count_params
from ..model.vit import UfgirViT
from ..paths import RunDir
from ..recipe import Recipe, dump_resolved
from .graph import sidecar_path
from .parity import ExportResult, model_image_size


def _eval_rows(run: RunDir | None) -> list[dict]:
    if run is None:
        return []
    rows = []
    for f in run.eval_metrics_files():
        try:
            rows.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # a half-written or foreign file does not block an export
    return rows


def _export_rows(result: ExportResult) -> list[str]:
    """One table row per export in the card's folder, so exporting several formats into one folder
    keeps them all on the card; earlier ONNX/pt2 parity comes from their sidecars."""
    rows = []
    for f in sorted(result.path.parent.iterdir()):
        if f.suffix not in (".safetensors", ".onnx", ".pt2") or not f.is_file():
            continue
        opset, parity = None, "—"
        if f == result.path:
            opset, parity = result.opset, f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:g})"
        elif sidecar_path(f).is_file():
            try:
                side = json.loads(sidecar_path(f).read_text(encoding="utf-8"))
                opset, parity = side.get("opset"), f"{side['max_abs_diff']:.3g}"
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                pass  # a foreign or damaged sidecar only costs this row its parity figure
        fmt = f.suffix[1:] + (f" (opset {opset})" if opset else "")
        rows.append(f"| `{f.name}` | {fmt} | {human_bytes(f.stat().st_size)} | {parity} |")
    return rows


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def model_card(model: UfgirViT, recipe: Recipe, result: ExportResult, run_dir: RunDir | Path | None,
               backbone_sha256: str) -> str:
    """MODEL_CARD.md text: what the model is, what it costs, how well it did, how to run it."""
    m, d = recipe.model, recipe.data
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    S = model_image_size(model)
    pc = count_params(model)
    macs = count_flops(model, S) // 2
    share = 100 * pc.trainable / pc.total if pc.total else 0.0
    resize = int(d.resize_ratio * S)
    lines = [
        f"# {m.method} · {m.backbone} · {d.dataset}",
        "",
        recipe.description or "A Vision Transformer with a parameter-efficient adapter method, trained with ufgir.",
        "",
        "| | |",
        "|---|---|",
        f"| Method | `{m.method}` |",
        f"| Backbone | `{m.backbone}` (weights `{m.weights}`, sha256 `{backbone_sha256}`) |",
        f"| Dataset | `{d.dataset}` ({model.num_classes} classes) |",
        f"| Image size | {S} px: square resize to {resize} px ({d.interpolation}), centre crop {S}, "
        f"normalise mean {list(mean)} std {list(std)} |",
        f"| Parameters | {pc.trainable:,} trainable of {pc.total:,} total ({share:.2f} %) |",
        f"| MACs | {macs / 1e9:.3f} G per image (FLOPs = 2 × MACs) |",
        "",
        "## Evaluation",
        "",
    ]
    rows = _eval_rows(RunDir(run_dir) if run_dir is not None else None)
    if rows:
        lines += ["| split | checkpoint | top-1 % | top-5 % | per-class mean % | images |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.get('split')} | {r.get('checkpoint')} | {r.get('top1', float('nan')):.2f} | "
                         f"{r.get('top5', float('nan')):.2f} | {r.get('per_class_mean', float('nan')):.2f} | "
                         f"{r.get('num_images')} |")
    else:
        lines.append("No evaluation results yet: run `ufgir eval RUN` and export again.")
    lines += [
        "",
        "## Exports",
        "",
        "| file | format | size | max abs diff vs eager PyTorch |",
        "|---|---|---|---|",
        *_export_rows(result),
        "",
        f"Predict: `ufgir predict {result.path.name} IMAGE_OR_FOLDER... --topk 5`",
        "",
        "## Recipe",
        "",
        "```toml",
        dump_resolved(recipe).rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)

