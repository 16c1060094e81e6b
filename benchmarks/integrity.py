"""Content-hash benchmark: what hashing every image (bytes, decoded pixels, DCT hash, duplicate and
leakage search) adds to unpacking a dataset archive.

A generated set of synthetic leaves (PNG, the UFG sets' format) is zipped in Cotton80's file-name
layout and unpacked by `download_dataset(archive=...)` twice per round, with ``hash_images`` off and
on, back to back (shared machines drift within minutes: only times from one round are divided). The
issue's target: at most 30 % more than unpacking without hashes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

from .run import RESULTS, _machine


def make_archive(path: Path, images: int, classes: int, size: int) -> None:
    """``images`` distinct leaves, half train and half test per class, in cotton80's file-name layout."""
    import numpy as np
    from PIL import Image

    from ufgir_cli.data.synthetic import demo_codes, render_leaf

    rng = np.random.default_rng(0)
    codes = demo_codes(classes)
    per = images // classes
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for c in range(classes):
            for k in range(1, per + 1):
                buf = io.BytesIO()
                Image.fromarray(render_leaf(codes[c], rng, size=size)).save(buf, format="PNG")
                split = "train" if k <= per // 2 else "test"
                zf.writestr(f"Cotton80/cotton_square_new/{c + 1}_{k}_{split}.png", buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--size", type=int, default=256, help="side of the generated PNGs (px)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="integrity")
    args = p.parse_args()

    from ufgir_cli.data.catalog import CATALOG
    from ufgir_cli.data.download import download_dataset

    n = args.images // args.classes * args.classes
    spec = replace(CATALOG["cotton80"], num_classes=args.classes, train_val=n // 2, test=n // 2, sha256=None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "Cotton80.zip"
        make_archive(archive, n, args.classes, args.size)
        for r in range(args.rounds):
            t = {}
            for hashing in (False, True) if r % 2 == 0 else (True, False):
                data = Path(tmp) / "data"
                t0 = time.perf_counter()
                download_dataset(spec, data, archive=archive, hash_images=hashing)
                t[hashing] = time.perf_counter() - t0
                shutil.rmtree(data)
            rows.append({"round": r, "plain_s": t[False], "hashed_s": t[True],
                         "overhead_pct": 100 * (t[True] / t[False] - 1)})
            print(f"round {r}: unpack {t[False]:.2f} s, with hashes {t[True]:.2f} s "
                  f"(+{rows[-1]['overhead_pct']:.0f} %)")
    summary = {"images": n, "size": args.size, "threads": os.cpu_count(),
               "plain_s": statistics.median(r["plain_s"] for r in rows),
               "hashed_s": statistics.median(r["hashed_s"] for r in rows),
               "overhead_pct": statistics.median(r["overhead_pct"] for r in rows), "target_pct": 30}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": _machine(), "summary": summary, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, rows))
    print(f"median overhead {summary['overhead_pct']:.0f} % (target <= 30 %)")


def markdown(s: dict, rows: list[dict]) -> str:
    lines = [f"# Content hashes at unpacking: {_machine()}", "",
             f"{s['images']} generated {s['size']} px PNG leaves in a zip, `download_dataset(archive=...)` "
             f"without and with content hashes, {s['threads']} hashing threads.", "",
             "| round | unpack (s) | unpack + hashes (s) | overhead |", "|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['plain_s']:.2f} | {r['hashed_s']:.2f} | {r['overhead_pct']:+.0f} % |" for r in rows]
    verdict = "meets" if s["overhead_pct"] <= s["target_pct"] else "misses"
    lines += ["", f"Median: {s['plain_s']:.2f} s -> {s['hashed_s']:.2f} s, {s['overhead_pct']:+.0f} %; "
                  f"{verdict} the target of at most +{s['target_pct']} %."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
