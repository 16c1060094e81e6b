"""Data-path benchmark: decoded, resized and cropped images per second through the training loader.

Compare with the model's training images/s (`benchmarks.run`): when the loader is faster, the model
is the bottleneck. Images are synthetic leaves saved as PNG at the source size (UFGIR leaf scans are
a few hundred pixels on a side).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .run import RESULTS, _machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source-size", type=int, default=448)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--name", default="data")
    args = p.parse_args()

    from ufgir_cli.data.folder import read_split
    from ufgir_cli.data.loaders import make_loader
    from ufgir_cli.data.synthetic import generate_synthetic
    from ufgir_cli.recipe import load_recipe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        per_class = max(1, args.images // 8)
        generate_synthetic(root, num_classes=8, train_val=per_class, test=1, size=args.source_size)
        split = read_split(root, "train_val")
        for w in map(int, args.workers.split(",")):
            r = load_recipe("ila_pp", {"model": {"image_size": args.image_size, "weights": "none"},
                                       "data": {"num_workers": w}})
            loader = make_loader(split, r, train=True, batch_size=args.batch)
            loader.sampler.set_epoch(0)
            next(iter(loader))  # start workers
            t0, n = time.perf_counter(), 0
            for x, _, _ in loader:
                n += len(x)
            dt = time.perf_counter() - t0
            rows.append({"workers": w, "source_size": args.source_size, "image_size": args.image_size,
                         "images_per_s": n / dt})
            print(f"workers {w}: {n / dt:.1f} images/s ({args.source_size}px PNG -> {args.image_size}px)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, args.image_size))


def markdown(rows: list[dict], image_size: int) -> str:
    """The loader's images/s beside the model's fastest training images/s at that size (from cpu.json)."""
    lines = [f"# Data path: {_machine()}", "", "| workers | source px | image px | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['source_size']} | {r['image_size']} | {r['images_per_s']:.1f} |" for r in rows]
    try:
        model = json.loads((RESULTS / "cpu.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        model = []
    train = [r for r in model if r.get("mode") == "train" and r.get("size") == image_size]
    if train and rows:
        fastest = max(train, key=lambda r: r["images_per_s"])
        best = max(r["images_per_s"] for r in rows)
        verdict = "the model is the bottleneck" if best > fastest["images_per_s"] else "the loader is the bottleneck"
        lines += ["", f"Fastest training step in cpu.json at {image_size} px: {fastest['method']} "
                      f"{fastest['precision']}, {fastest['images_per_s']:.1f} images/s; the loader gives {best:.1f} "
                      f"images/s: {verdict}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
