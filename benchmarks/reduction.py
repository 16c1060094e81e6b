"""Down-sampling or token reduction, on the clock: images/s of inference of the plain ViT, ILA++, CLCA at keep 0.1
and ``ila_pp_evit`` at 448 px on the CPU.

`python -m benchmarks.reduction` (part of `make bench`). The GMACs say CLCA at keep 0.1 costs about a third of
the plain ViT (25.17 against 78.49) and ``ila_pp_evit`` about two thirds (50.88); this says what the clock says.
Timed in alternation in one process, as in `benchmarks.paired`: every round times each model once, back to
back, starting at another one each round; a ratio is the median over rounds of the within-round ratio to the
plain ViT. Every model is ViT-B/16 (``vit_base_patch16_224.orig_in21k``, random weights, the same backbone for
all so that only the method differs), fp32, eval mode, ``torch.no_grad``. Results go to
``benchmarks/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.run import _machine, _torch_version, measured, output_options, write_results

#: (row, packaged recipe): the plain ViT is the linear probe's model (nothing added).
MODELS = (("ViT", "linear"), ("ILA++", "ila_pp"), ("CLCA keep 0.1", "clca"), ("ILA++ then EViT", "ila_pp_evit"))
BACKBONE = "vit_base_patch16_224.orig_in21k"


def _models(size: int) -> list[tuple[str, str, object, float]]:
    """(row, recipe, model in eval mode, GMACs per image) for every row of `MODELS`."""
    import torch

    from ufgir_cli.analysis.cost import count_flops
    from ufgir_cli.model import build_model
    from ufgir_cli.recipe import load_recipe

    out = []
    for row, recipe in MODELS:
        torch.manual_seed(0)
        cfg = load_recipe(recipe, {"model": {"backbone": BACKBONE, "weights": "none", "image_size": size}}, env=False).model
        model = build_model(cfg, 10).eval()
        out.append((row, recipe, model, count_flops(model, size) / 2e9))
    return out


def measure(size: int, batch: int, rounds: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    models = _models(size)
    x = torch.randn(batch, 3, size, size)
    times: dict[str, list[float]] = {row: [] for row, *_ in models}
    with torch.no_grad():
        for _, _, model, _ in models:  # warm-up
            model(x)
        for r in range(rounds):
            order = models[r % len(models):] + models[:r % len(models)]
            for row, _, model, _ in order:
                t0 = time.perf_counter()
                model(x)
                times[row].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{row} {times[row][-1]:.3f} s" for row, *_ in models), flush=True)
    base = times[models[0][0]]
    rows = [{"model": row, "recipe": recipe, "gmacs": gmacs, "s_per_batch_median": statistics.median(times[row]),
             "images_per_s": batch / statistics.median(times[row]),
             "speedup_vs_vit": statistics.median(b / a for a, b in zip(times[row], base, strict=True)),
             "gmacs_ratio_vs_vit": models[0][3] / gmacs, "times": times[row]} for row, recipe, _, gmacs in models]
    return {"machine": _machine(), "torch": _torch_version(), "date": time.strftime("%Y-%m-%d"), "backbone": BACKBONE,
            "size": size, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(), "rows": rows}


def markdown(doc: dict) -> str:
    lines = [f"# Down-sampling or token reduction, inference on the CPU: {doc['machine']}", "",
             f"torch {doc['torch']}, {doc['date']}, `{doc['backbone']}` (random weights) at {doc['size']} px, batch "
             f"{doc['batch']}, fp32, {doc['threads']} threads, {doc['rounds']} rounds timed in alternation. Speed-up: the "
             "median over rounds of the plain ViT's time / this model's in the same round; beside it what the GMACs "
             "predict.", "",
             "| model | recipe | GMACs | images/s | median s/batch | speed-up vs ViT | GMACs predict |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | `{r['recipe']}` | {r['gmacs']:.2f} | {r['images_per_s']:.2f} | "
                     f"{r['s_per_batch_median']:.3f} | {r['speedup_vs_vit']:.2f}x | {r['gmacs_ratio_vs_vit']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    output_options(p, "reduction")
    args = p.parse_args()
    write_results(args.name, measured(args, lambda: measure(args.size, args.batch, args.rounds, args.threads)), markdown)


if __name__ == "__main__":
    main()
