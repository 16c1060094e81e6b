"""LoRA through ufgir against a plain timm + peft loop, and a merged export against plain timm.

`python -m benchmarks.peft` (part of `make bench`). Timed in alternation in one process, as in
`benchmarks.paired`: every round times each configuration once, back to back, starting at a different
one each round, and a ratio is the median over rounds of the within-round ratio.

- ``ufgir train``: one step the way `engine.train.train_one_epoch` takes it: ``model(x, y, criterion)``
  under the run's autocast (frozen weights cast once, `frozen_weights_cast`), backward, the gradient-norm
  clip, the optimiser from the recipe (`build_optimizer`), ``zero_grad``; branch dropout 0, as in the
  plain loop.
- ``peft train``: the loop a peft user writes: ``get_peft_model(timm model, LoraConfig(..., modules_to_save=
  ["head"]))``, cross-entropy, backward, the same optimiser settings, ``zero_grad``; timm's dropouts 0.
- ``ufgir train (default dropout)``: ufgir with the lora recipe's own ``model.drop`` (0.1 on every block's
  branch outputs), the second number the issue asks for: what the recipe's dropout costs.
- ``merged infer`` / ``timm infer``: `Method.export_model` of the LoRA model (what ``ufgir export --merge``
  writes) against a plain timm ViT with the same weights, an inference batch each.

Both LoRA models are rank 8 on every block's qkv, LoRA dropout 0, the same weights, batch and precision.
Results go to ``benchmarks/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from benchmarks.run import _machine, _torch_version, measured, output_options, write_results

#: The issue's targets: ufgir's step at most 5 % slower than plain peft; merged inference as fast as timm.
TRAIN_TARGET, INFER_TARGET = 1.05, 1.0


def _models(backbone: str, size: int):
    """(ufgir LoRA with drop 0, the same with the recipe's dropout, the timm + peft model, the merged
    export, plain timm), every backbone tensor and every LoRA/head tensor the same."""
    import timm
    import torch
    from peft import LoraConfig, get_peft_model

    from ufgir_cli.model import build_model
    from ufgir_cli.recipe import load_recipe

    torch.manual_seed(0)
    model = {"weights": "none", "image_size": size, "backbone": backbone}
    default = load_recipe("lora", {"model": model})
    ours = build_model(load_recipe("lora", {"model": {**model, "drop": 0.0}}).model, 200)
    ours_drop = build_model(default.model, 200)
    ours_drop.load_state_dict(ours.state_dict())
    with torch.no_grad():  # LoRA's B starts at zero; a non-zero one makes the merge do something
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    name = backbone.split(".")[0]
    plain = timm.create_model(name, pretrained=False, num_classes=200, img_size=size)
    plain.load_state_dict(ours.backbone_state_dict() | {"head." + k: v for k, v in ours.vit.head.state_dict().items()})
    plain.eval()
    peft_base = timm.create_model(name, pretrained=False, num_classes=200, img_size=size)
    peft_base.load_state_dict(plain.state_dict())
    method = ours.method
    config = LoraConfig(r=method.rank, lora_alpha=method.alpha, lora_dropout=0.0, target_modules=method.targets,
                        modules_to_save=["head"])
    theirs = get_peft_model(peft_base, config)
    with torch.no_grad():  # the same LoRA tensors (peft's layers in both: the same parameter names)
        for name, layer in ours.vit.named_modules():
            if hasattr(layer, "lora_A"):
                for k, p in layer.named_parameters():
                    theirs.base_model.model.get_submodule(name).get_parameter(k).copy_(p)
    merged = method.export_model(ours).eval()
    return default, ours, ours_drop, theirs, merged, plain


def measure(backbone: str, size: int, batch: int, rounds: int, precisions: list[str]) -> dict:
    import torch

    from ufgir_cli.engine.optim import build_optimizer
    from ufgir_cli.model.precision import autocast, frozen_weights_cast

    recipe, ours, ours_drop, theirs, merged, plain = _models(backbone, size)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 200, (batch,))
    criterion = torch.nn.CrossEntropyLoss()
    opts = {id(m): build_optimizer(m, recipe.optim) for m in (ours, ours_drop)}
    o = recipe.optim  # the same settings for the plain loop, over what peft left trainable
    opts[id(theirs)] = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=o.lr,
                                       momentum=o.momentum, nesterov=o.nesterov)

    def ufgir_step(model, precision: str) -> None:
        model.train()
        with autocast("cpu", precision):
            loss = model(x, y, criterion).loss
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, o.clip_grad or float("inf"))
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)

    def peft_step(model, precision: str) -> None:
        model.train()
        with autocast("cpu", precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)

    def infer(model, precision: str) -> None:
        with torch.no_grad(), autocast("cpu", precision):
            model(x)

    times: dict[tuple, list[float]] = {}
    configs: list[tuple] = []
    for p in precisions:  # one block per precision: ufgir's engine holds frozen weights in its dtype
        block = [("ufgir", "train", p, ours, ufgir_step), ("peft", "train", p, theirs, peft_step),
                 ("ufgir (default dropout)", "train", p, ours_drop, ufgir_step),
                 ("ufgir merged", "infer", p, merged, infer), ("timm", "infer", p, plain, infer)]
        configs += block
        with contextlib.ExitStack() as stack:
            if p != "fp32":
                for m in (ours, ours_drop):  # not the merged model: it runs as plain timm does
                    stack.enter_context(frozen_weights_cast(m, p))
            _rounds(block, rounds, times)
    base = {"train": "peft", "infer": "timm"}
    rows = []
    for name, mode, p, _, _ in configs:
        t = times[(name, mode, p)]
        row = {"model": name, "mode": mode, "precision": p, "size": size, "batch": batch,
               "s_per_batch_median": statistics.median(t), "s_per_batch_min": min(t), "times": t}
        if name != base[mode]:
            ref = times[(base[mode], mode, p)]
            row["ratio_vs_" + base[mode]] = statistics.median(a / b for a, b in zip(t, ref, strict=True))
            row["target"] = TRAIN_TARGET if mode == "train" and "default" not in name else \
                INFER_TARGET if mode == "infer" else None
        rows.append(row)
    return {"machine": _machine(), "torch": _torch_version(), "peft": _peft_version(), "date": time.strftime("%Y-%m-%d"),
            "backbone": backbone, "rounds": rounds, "lora": {"rank": ours.method.rank, "targets": ours.method.targets},
            "default_drop": recipe.model.drop, "rows": rows}


def _rounds(block: list[tuple], rounds: int, times: dict[tuple, list[float]]) -> None:
    """Time every configuration of ``block`` once per round, each round starting at another one."""
    for _, _, p, model, fn in block:  # warm-up
        fn(model, p)
    for c in block:
        times[c[:3]] = []
    for r in range(rounds):
        for name, mode, p, model, fn in block[r % len(block):] + block[:r % len(block)]:
            t0 = time.perf_counter()
            fn(model, p)
            times[(name, mode, p)].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{c[0]} {c[1]} {c[2]} {times[c[:3]][-1]:.3f} s" for c in block),
              flush=True)


def _peft_version() -> str:
    import peft

    return peft.__version__


def _spread(doc: dict) -> dict[tuple, tuple[float, float]]:
    """(first, third quartile) of the per-round ratios of every row that has a baseline: how far one
    round's ratio strays on this machine."""
    base = {"train": "peft", "infer": "timm"}
    times = {(r["model"], r["mode"], r["precision"]): r["times"] for r in doc["rows"]}
    out = {}
    for (name, mode, p), t in times.items():
        if name != base[mode]:
            ratios = [a / b for a, b in zip(t, times[(base[mode], mode, p)], strict=True)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            out[(name, mode, p)] = (q[0], q[2])
    return out


def _met(row: dict, spread: tuple[float, float] | None) -> str:
    """Training: the median ratio at most the target. Inference, equal within noise: the middle half of
    the per-round ratios holds 1 (as a model timed against itself would)."""
    x, target = next((v for k, v in row.items() if k.startswith("ratio_vs_")), None), row.get("target")
    if x is None or target is None or spread is None:
        return "-"
    if row["mode"] == "train":
        return "yes" if x <= target else "no"
    return "yes" if spread[0] <= target <= spread[1] or x <= target else "no"


def markdown(doc: dict) -> str:
    lines = [f"# LoRA through ufgir vs plain timm + peft, paired: {doc['machine']}", "",
             f"torch {doc['torch']}, peft {doc['peft']}, {doc['date']}, `{doc['backbone']}`, random weights, "
             f"LoRA rank {doc['lora']['rank']} on `{doc['lora']['targets']}`, {doc['rounds']} rounds. A ratio is the "
             "median over rounds of this row's time / the baseline's (`peft` for training, `timm` for inference), "
             "timed back to back: below 1 is faster; beside it the first and third quartile of the per-round "
             "ratios (this shared VM's noise). Targets: training at most 1.05 (branch dropout 0 in both); merged "
             "inference equal to plain timm within noise (the quartiles hold 1, or faster). `ufgir (default "
             f"dropout)` is the lora recipe's own `model.drop` = {doc['default_drop']:g}, for information.", "",
             "| model | mode | precision | px | batch | median s/batch | min s/batch | ratio (quartiles) | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    spread = _spread(doc)
    for r in doc["rows"]:
        key = (r["model"], r["mode"], r["precision"])
        x = next((v for k, v in r.items() if k.startswith("ratio_vs_")), None)
        ratio = f"{x:.3f} ({spread[key][0]:.2f}-{spread[key][1]:.2f})" if x is not None else "-"
        target = f"{r['target']:g}" if r.get("target") is not None else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | {r['size']} | {r['batch']} | "
                     f"{r['s_per_batch_median']:.3f} | {r['s_per_batch_min']:.3f} | {ratio} | {target} | "
                     f"{_met(r, spread.get(key))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # ViT-S/16: a rank-8 LoRA weighs more against a width of 384 than of 768 (a stricter test of the 5 %
    # target), and 14 rounds of both precisions fit in minutes on a 2-core VM.
    p.add_argument("--backbone", default="vit_small_patch16_224.augreg_in21k")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=14)
    p.add_argument("--precisions", default="fp32,bf16")
    output_options(p, "peft")
    args = p.parse_args()
    write_results(args.name, measured(args, lambda: measure(args.backbone, args.size, args.batch, args.rounds, args.precisions.split(","))), markdown)


if __name__ == "__main__":
    main()
