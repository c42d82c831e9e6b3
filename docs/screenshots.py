"""The screenshots of `pipeline serve` in docs/ (serve-<tab>.png), taken over the outputs `make demo` leaves.

    make demo && .venv/bin/python docs/screenshots.py [--demo demo-output]

Starts the app as the demo's last line prints it, drives Debian's chromium (Playwright) to upload one of the
demo's altered query photos, and saves each tab."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TABS = {"duplicates": "#groups .group", "clusters": "#outliers .tile", "probe": "#probe table",
        "runs": "#runs tr[data-run]"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo-output")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    args = ap.parse_args()
    import uvicorn
    from playwright.sync_api import sync_playwright

    from pipeline.commands.serve import make_app
    from pipeline.config.serve import ServeConfig

    demo = Path(args.demo)
    cfg = ServeConfig(output=str(demo / "analytics" / args.model), probe=str(demo / "digits-probe"),
                      source_map={"s3://demo-photos/photos": str(demo / "photos")})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while not server.started or not json.loads(urllib.request.urlopen(url + "/healthz").read())["ready"]:
        time.sleep(0.2)
    while not json.loads(urllib.request.urlopen(url + "/api/status").read())["upload"]["ready"]:
        time.sleep(0.2)  # the model: the search shown is one a user gets once the page has loaded
    query = sorted((demo / "query").glob("*.jpg"))[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.goto(url + "/#search")
        page.set_input_files("input[type=file]", str(query))
        page.wait_for_selector("#results .tile[data-score]")
        page.wait_for_timeout(1500)  # thumbnails
        page.screenshot(path=str(DOCS / "serve-search.png"))
        for tab, ready in TABS.items():
            page.goto(f"{url}/#{tab}")
            page.wait_for_selector(ready)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(DOCS / f"serve-{tab}.png"))
        browser.close()
    server.should_exit = True
    print("wrote", ", ".join(f"docs/serve-{t}.png" for t in ["search", *TABS]))


if __name__ == "__main__":
    main()
