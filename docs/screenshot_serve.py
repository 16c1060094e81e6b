"""A screenshot of `ufgir serve` for the README: docs/serve.png (not part of `make test`).

    make screenshot                       # or: .venv/bin/python docs/screenshot_serve.py [RUN] [--out PNG]

It serves RUN (default: a GLSim run on the synthetic quickstart data, trained here once into
runs/screenshot_glsim: GLSim crops, so the page shows all it can), opens the page in headless
Chromium, drops three test-split images on it, waits for the answer and saves the page. Needs the app extra and a Chromium (`apt-get install chromium`). Chromium is driven over the
DevTools protocol on a pipe (--remote-debugging-pipe), so no browser-automation package is needed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 900


class Chromium:
    """Headless Chromium and one page, spoken to in DevTools-protocol JSON over fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str, width: int, height: int):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def fds() -> None:  # in the child, before exec: the pipes become fds 3 and 4
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self._profile = tempfile.mkdtemp(prefix="ufgir-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--hide-scrollbars", "--no-first-run", f"--user-data-dir={self._profile}", f"--window-size={width},{height}"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._id, self._buf, self.session = 0, b"", None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> None:
        end = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > end:
                raise TimeoutError(f"the page did not show {what or expression} within {timeout:.0f} s")
            time.sleep(0.25)

    def screenshot(self, out: Path) -> None:
        height = int(self.js("Math.ceil(document.documentElement.scrollHeight)"))
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(0.5)  # let the taller viewport lay out
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)


def default_run() -> Path:
    """A GLSim run on the synthetic quickstart data (trained once, about a minute on two cores)."""
    from ufgir_cli.engine.train import fit
    from ufgir_cli.paths import RunDir, runs_dir
    from ufgir_cli.recipe import load_recipe

    run = runs_dir() / "screenshot_glsim"
    if not RunDir(run).eval_metrics("test").is_file():
        print(f"training {run} (GLSim on the synthetic quickstart data) ...", flush=True)
        overrides = {"description": "GLSim on our frozen micro ViT: the box of the patches most like the class token, "
                                    "cropped for a second pass; synthetic UFGIR leaves",
                     "model": {"method": "glsim", "ila_ds_locs": []}}
        fit(load_recipe("quickstart", overrides), run, overwrite=True)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="run folder, checkpoint or hf://OWNER/NAME (default: a GLSim demo run)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "serve.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ufgir_cli.ship.app import Explainer, serve

    run = args.run or default_run()
    demo = serve(run, port=free_port(), block=False)
    browser = Chromium(args.chromium, WIDTH, HEIGHT)
    try:
        browser.call("Page.navigate", url=demo.local_url)
        browser.wait_for("!!document.querySelector('button.primary')", what="the Explain button")
        # three test-split images of three classes dropped on the file box (its upload explains them)
        images = Explainer(run).examples(3)
        doc = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=doc, selector="input[type=file]")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(p.resolve()) for p in images])
        browser.wait_for("document.body.innerText.includes('top-1') && document.querySelectorAll('img').length >= 3",
                         what="the answer")
        time.sleep(1.5)  # images fade in
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        browser.close()
        demo.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
