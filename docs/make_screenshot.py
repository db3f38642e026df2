"""Make docs/screenshot.png: serve the demo's world:clip store, type a query, screenshot the page.

    make demo && .venv/bin/python docs/make_screenshot.py [--store demo_out/store-world-clip]
Needs Debian's chromium (/usr/bin/chromium) and the playwright package (no browser download).
"""
from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(ROOT / "demo_out" / "store-world-clip"))
    ap.add_argument("--query", default="red AND teal background")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from t2c.service.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.store), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#q", args.query)
        page.keyboard.press("Enter")
        page.wait_for_selector("[data-testid=hit]")
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
        page.hover("[data-testid=hit]")
        page.screenshot(path=args.out)
        browser.close()
    server.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
