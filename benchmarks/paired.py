"""Our ILA++ against the reference's way of running it, timed in alternation in one process.

`python -m benchmarks.paired` (part of `make bench`). This VM's speed drifts by about 2x within
minutes, so two timings taken a minute apart cannot be divided. Here every round times each
configuration once, back to back, starting at a different configuration each round, and a
speed-up is the median over rounds of (reference time / our time) within the round.
Results go to ``benchmarks/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

from benchmarks.run import CPU_TARGETS, _machine, _torch_version, bench_step, write_results

#: (model, mode, precision): the reference runs only in float32, as it does on a CPU.
CONFIGS = [("reference", "train", "fp32"), ("reference", "infer", "fp32"),
           ("ila_pp", "train", "fp32"), ("ila_pp", "train", "bf16"),
           ("ila_pp", "infer", "fp32"), ("ila_pp", "infer", "bf16")]


def measure(size: int, batch: int, rounds: int, backbone: str, device: str = "cpu", compile_: bool = False) -> dict:
    """Time every configuration once per round; ``compile_`` adds bf16 inference through
    `compiled_for_inference` (what `ufgir eval --compile` runs), compiled during the warm-up."""
    import torch

    from benchmarks.reference_style import ReferenceStyle
    from ufgir_cli.engine.evaluate import compiled_for_inference
    from ufgir_cli.model import build_model
    from ufgir_cli.model.precision import frozen_weights_cast
    from ufgir_cli.recipe import load_recipe

    torch.manual_seed(0)
    overrides = {"model": {"weights": "none", "image_size": size, "backbone": backbone}}
    ours = build_model(load_recipe("ila_pp", overrides).model, 200).to(device)
    models = {("reference", "fp32"): ReferenceStyle(ours), ("ila_pp", "fp32"): ours,
              ("ila_pp", "bf16"): copy.deepcopy(ours)}
    configs = CONFIGS + ([("ila_pp+compile", "infer", "bf16")] if compile_ else [])
    if compile_:
        models[("ila_pp+compile", "bf16")] = copy.deepcopy(ours)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 200, (batch,), device=device)

    def step(name: str, mode: str, precision: str) -> float:
        model = models[(name, precision)]
        t0 = time.perf_counter()
        bench_step(model, compiled.get(name, model), x, y, mode, precision, device)
        return time.perf_counter() - t0

    compiled = {"ila_pp+compile": compiled_for_inference(models[("ila_pp+compile", "bf16")])} if compile_ else {}
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    with contextlib.ExitStack() as stack:  # our engine keeps frozen weights in bf16 for a bf16 run
        for (name, precision), model in models.items():
            if name != "reference":
                stack.enter_context(frozen_weights_cast(model, precision))
        for c in configs:  # warm-up (and the compile)
            t0 = time.perf_counter()
            step(*c)
            if c[0] in compiled:
                print(f"compiled {c[0]} in {time.perf_counter() - t0:.0f} s", flush=True)
        for r in range(rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for c in order:
                times[c].append(step(*c))
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{c[0]} {c[1]} {c[2]} {times[c][-1]:.2f} s" for c in configs),
                  flush=True)
    rows = []
    for name, mode, precision in configs:
        t = times[(name, mode, precision)]
        row = {"method": name, "mode": mode, "precision": precision, "size": size, "batch": batch,
               "s_per_batch_median": statistics.median(t), "s_per_batch_min": min(t), "times": t}
        if name != "reference":
            ref = times[("reference", mode, "fp32")]
            row["speedup_vs_reference"] = statistics.median(a / b for a, b in zip(ref, t, strict=True))
            row["target"] = CPU_TARGETS[(mode, precision)]
        rows.append(row)
    return {"machine": _machine(), "torch": _torch_version(), "date": time.strftime("%Y-%m-%d"),
            "backbone": backbone, "rounds": rounds, "rows": rows}


def markdown(doc: dict) -> str:
    lines = [f"# ILA++ vs the reference, paired: {doc['machine']}", "",
             f"torch {doc['torch']}, {doc['date']}, `{doc['backbone']}`, random weights, {doc['rounds']} rounds. "
             "`reference` is the same network run the reference's way (benchmarks/reference_style.py: separate "
             "q/k/v projections, explicit attention, Bernoulli dropout, float32). A speed-up is the median over "
             "rounds of reference time / our time measured back to back.", "",
             "| model | px | batch | mode | precision | median s/batch | min s/batch | speed-up | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        x = r.get("speedup_vs_reference")
        tail = (f"{x:.2f}x | {r['target']:g}x | {'yes' if round(x, 2) >= r['target'] else 'no'}" if x is not None
                else "- | - | -")
        lines.append(f"| {r['method']} | {r['size']} | {r['batch']} | {r['mode']} | {r['precision']} | "
                     f"{r['s_per_batch_median']:.3f} | {r['s_per_batch_min']:.3f} | {tail} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--backbone", default="vit_base_patch16_224.orig_in21k")
    p.add_argument("--name", default="cpu_paired")
    p.add_argument("--no-compile", action="store_true", help="leave out bf16 inference through torch.compile")
    args = p.parse_args()
    doc = measure(args.size, args.batch, args.rounds, args.backbone, compile_=not args.no_compile)
    write_results(args.name, doc, markdown)


if __name__ == "__main__":
    main()
