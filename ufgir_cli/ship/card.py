"""Model cards: what the model is, what it costs, how well it did, how to run it.

MODEL_CARD.md is written beside every export; it lists every export in that folder, so exporting
several formats into one folder keeps them all on the card. :func:`hub_card` is a pushed repo's
README.md, with the metadata block the Hub reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def _identity_rows(model: UfgirViT, recipe: Recipe, backbone_sha256: str) -> list[str]:
    """The card's first table: method, backbone, dataset, preprocessing, parameters, MACs."""
    m, d = recipe.model, recipe.data
    data_cfg = model.data_config()
    mean, std = data_cfg["mean"], data_cfg["std"]
    S = model_image_size(model)
    pc = count_params(model)
    macs = count_flops(model, S) // 2
    share = 100 * pc.trainable / pc.total if pc.total else 0.0
    resize = int(d.resize_ratio * S)
    return [
        "| | |",
        "|---|---|",
        f"| Method | `{m.method}` |",
        f"| Backbone | `{m.backbone}` (weights `{m.weights}`, sha256 `{backbone_sha256}`) |",
        f"| Dataset | `{d.dataset}` ({model.num_classes} classes) |",
        f"| Image size | {S} px: square resize to {resize} px ({d.interpolation}), centre crop {S}, "
        f"normalise mean {list(mean)} std {list(std)} |",
        f"| Parameters | {pc.trainable:,} trainable of {pc.total:,} total ({share:.2f} %) |",
        f"| MACs | {macs / 1e9:.3f} G per image (FLOPs = 2 × MACs) |",
    ]


def _eval_table(rows: list[dict], none: str) -> list[str]:
    if not rows:
        return [none]
    lines = ["| split | checkpoint | top-1 % | top-5 % | per-class mean % | images |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('split')} | {r.get('checkpoint')} | {r.get('top1', float('nan')):.2f} | "
                     f"{r.get('top5', float('nan')):.2f} | {r.get('per_class_mean', float('nan')):.2f} | "
                     f"{r.get('num_images')} |")
    return lines


def _recipe_block(recipe: Recipe) -> list[str]:
    return ["## Recipe", "", "```toml", dump_resolved(recipe).rstrip("\n"), "```", ""]


def model_card(model: UfgirViT, recipe: Recipe, result: ExportResult, run_dir: RunDir | Path | None,
               backbone_sha256: str) -> str:
    """MODEL_CARD.md text: what the model is, what it costs, how well it did, how to run it."""
    m, d = recipe.model, recipe.data
    lines = [
        f"# {m.method} · {m.backbone} · {d.dataset}",
        "",
        recipe.description or "A Vision Transformer with a parameter-efficient adapter method, trained with ufgir.",
        "",
        *_identity_rows(model, recipe, backbone_sha256),
        "",
        "## Evaluation",
        "",
        *_eval_table(_eval_rows(RunDir(run_dir) if run_dir is not None else None),
                     "No evaluation results yet: run `ufgir eval RUN` and export again."),
        "",
        "## Exports",
        "",
        "| file | format | size | max abs diff vs eager PyTorch |",
        "|---|---|---|---|",
        *_export_rows(result),
        "",
        f"Predict: `ufgir predict {result.path.name} IMAGE_OR_FOLDER... --topk 5`",
        "",
        *_recipe_block(recipe),
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class HubCardFacts:
    """What the Hub's model card says beyond the model itself: where it lives, what was pushed, whose
    terms apply."""

    repo_id: str
    files: dict[str, int]  # pushed file -> size in bytes (the card and the manifest are written last)
    weights_file: str
    adapter_only: bool
    timm_files: bool  # config.json + model.safetensors for timm.create_model('hf-hub:...')
    backbone_licence: str
    dataset_terms: str
    dataset_title: str
    eval_rows: list[dict]
    notices: list[str]


def hub_metadata(recipe: Recipe, facts: HubCardFacts, licence_id: str | None, base_model: str | None) -> dict:
    """The README's metadata block (the Hub reads it): library, tags, dataset, task, licence and the
    top-1 results with the split each was measured on (``model-index``)."""
    m = recipe.model
    tags = ["ufgir", "image-classification", "vision-transformer", "ultra-fine-grained", m.method,
            "petl" if facts.adapter_only else "full-weights"] + (["timm"] if facts.timm_files else [])
    meta: dict = {"library_name": "ufgir", "tags": tags, "datasets": [recipe.data.dataset],
                  "pipeline_tag": "image-classification", "license": licence_id or "other"}
    if base_model:
        meta["base_model"] = base_model
    results = []
    for r in facts.eval_rows:
        metrics = [{"type": "accuracy", "name": "Top-1 accuracy", "value": round(float(r["top1"]), 4)}]
        if r.get("top5") is not None:
            metrics.append({"type": "top_5_accuracy", "name": "Top-5 accuracy", "value": round(float(r["top5"]), 4)})
        results.append({"task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": facts.dataset_title, "type": recipe.data.dataset, "split": str(r["split"])},
                        "metrics": metrics})
    if results:
        meta["model-index"] = [{"name": facts.repo_id.split("/")[-1], "results": results}]
    return meta


def hub_card(model: UfgirViT, recipe: Recipe, backbone_sha256: str, facts: HubCardFacts, metadata: dict) -> str:
    """The Hub repo's README.md: the metadata block, then what the model is, how it did, the terms that
    apply to it, how to use it, and the recipe."""
    import yaml

    m, d = recipe.model, recipe.data
    ref = f"hf://{facts.repo_id}"
    what = ("the PETL delta only: it re-attaches to the backbone's public timm weights, whose sha256 is checked"
            if facts.adapter_only else "every tensor of the model")
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {m.method} · {m.backbone} · {d.dataset}",
        "",
        recipe.description or "A Vision Transformer with a parameter-efficient adapter method, trained with ufgir.",
        "",
        *_identity_rows(model, recipe, backbone_sha256),
        "",
        "## Evaluation",
        "",
        *_eval_table(facts.eval_rows, "No evaluation results were pushed: run `ufgir eval RUN` and push again."),
        "",
        "## Licences and terms",
        "",
        f"- Backbone weights (`{m.backbone}`, `{m.weights}`): {facts.backbone_licence}.",
        f"- Dataset ({facts.dataset_title}): {facts.dataset_terms}.",
        "- These weights were trained on that data from that backbone: their terms apply to them as well.",
        "",
        "## Use",
        "",
        "```bash",
        f"ufgir predict {ref} IMAGE_OR_FOLDER... --topk 5",
        f"ufgir serve {ref}          # a web page: drop a photo, see the classes and the attention",
        "```",
        "",
        "```python",
        "import ufgir_cli",
        f'model, recipe = ufgir_cli.load_run("{ref}")  # checked against ufgir.json; nothing is unpickled',
        "```",
        "",
    ]
    if facts.timm_files:
        lines += ["The model is a plain timm ViT, so timm loads it without ufgir:", "", "```python", "import timm",
                  f'model = timm.create_model("hf-hub:{facts.repo_id}", pretrained=True)', "```", ""]
    lines += ["## Files", "", "| file | size | what |", "|---|---|---|"]
    described = {facts.weights_file: what, "ufgir.json": "sha256 and size of every file, the backbone's tag and hash",
                 "recipe.toml": "the resolved recipe", "classes.csv": "class id -> name",
                 "config.json": "timm's model config", "model.safetensors": "timm's state dict (every tensor)",
                 "README.md": "this card"}
    sizes = {**facts.files, "README.md": None, "ufgir.json": None}  # the card and the manifest: written after
    for name, size in sorted(sizes.items()):
        what_it_is = described.get(name, "evaluation results" if name.startswith("eval/") else "")
        lines.append(f"| `{name}` | {'—' if size is None else human_bytes(size)} | {what_it_is} |")
    if facts.notices:
        lines += ["", *[f"Note: {n}" for n in facts.notices]]
    lines += ["", *_recipe_block(recipe)]
    return "\n".join(lines)
