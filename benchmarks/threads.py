"""How torch's intra-op thread count changes a CPU training step: `python -m benchmarks.threads`.

Times training steps of the quickstart model (ILA++ on the micro ViT, 64 px) at torch's default
thread count, at the count ``train.threads`` picks by default (``ufgir_cli.cores``) and at
one thread, optionally beside ``--busy`` spinning processes (another job on the machine). Results
go to ``benchmarks/results/threads.json`` and ``threads.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def time_steps(threads: int, steps: int, batch_size: int) -> float:
    """Median seconds per training step of the quickstart model with ``threads`` intra-op threads."""
    import torch

    from ufgir_cli.model import build_model
    from ufgir_cli.recipe import load_recipe

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    recipe = load_recipe("quickstart", {"model": {"weights": "none"}}, env=False)
    model = build_model(recipe.model, 10).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    size = recipe.model.image_size
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,))
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="data-loader workers the auto count leaves cores to")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes beside the benchmark")
    args = ap.parse_args()
    import torch

    from ufgir_cli.cores import available_cores, intra_op_threads

    counts = {"torch default": torch.get_num_threads(), "train.threads auto": intra_op_threads(None, args.workers),
              "one thread": 1}
    stop = mp.Event()
    busy = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        rows = [{"setting": k, "threads": n, "s_per_step": time_steps(n, args.steps, args.batch_size)}
                for k, n in counts.items()]
    finally:
        stop.set()
        for p in busy:
            p.join()
    doc = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpus_available": available_cores(),
                       "torch": torch.__version__},
           "busy_processes": args.busy, "batch_size": args.batch_size, "workers": args.workers, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# intra-op threads · {doc['machine']['cpus_available']} CPUs available of {os.cpu_count()} · "
             f"{args.busy} busy process(es) · batch {args.batch_size}", "",
             "| setting | threads | s per step |", "|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r['threads']} | {r['s_per_step']:.4f} |" for r in rows]
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
