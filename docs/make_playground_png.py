"""Re-make docs/playground.png: the playground of a local server (random tiny GPT-2 + one random
adapter, so the text is gibberish; the page is what is shown), in headless Chromium.

    python docs/make_playground_png.py        # needs the dev extra, /usr/bin/chromium, ../shared
"""

from __future__ import annotations

import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from lorafit.init_model import init_model, random_adapter
    from lorafit.serve.app import create_app
    from lorafit.serve.models import ModelHost

    tmp = Path(tempfile.mkdtemp())
    base = init_model("tiny", str(REPO.parent / "shared" / "assets" / "gpt2-tokenizer"), tmp / "gpt2-tiny", seed=0)
    adapter = random_adapter(base, tmp / "quotes", seed=1, scale=0.3)
    host = ModelHost([("quotes", str(adapter))], precision="fp32", device=torch.device("cpu"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(host), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1000, "height": 430})
        page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        page.wait_for_function("document.querySelectorAll('#adapter option').length >= 1")
        page.fill("#max_tokens", "40")
        page.click("#go")
        page.wait_for_selector("#adapter_out[data-done]", state="attached")
        page.wait_for_selector("#base_out[data-done]", state="attached")
        png = page.screenshot()
        browser.close()
    server.should_exit = True
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)  # a UI needs few colours: a small file
    out = REPO / "docs" / "playground.png"
    image.save(out, optimize=True)
    print(f"{out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
