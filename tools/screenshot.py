"""Screenshot of the web page for the README: framegrid on the default config (API on a free port),
Debian's Chromium headless, after the tiles show live pictures and an event or two.

    .venv/bin/python -m tools.screenshot [--out docs/img/page.png] [--seconds 25] [--size 1280x900]

Needs `tools/bootstrap test` (Chromium, chromium-driver, selenium).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tools.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "page.png")
    ap.add_argument("--seconds", type=float, default=25.0, help="how long the page runs before the picture")
    ap.add_argument("--size", default="1280x900")
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    work = Path(tempfile.mkdtemp(prefix="fg-shot-"))
    port, mqtt_port = free_port(), free_port()
    config = (ROOT / "config.toml").read_text()
    config = config.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{port}"')
    config = config.replace('url = "embedded"', f'url = "embedded"\nembedded_port = {mqtt_port}')
    config = config.replace('"models/', f'"{ROOT}/models/').replace('"media/', f'"{ROOT}/media/')
    (work / "config.toml").write_text(config)
    env = {**os.environ, "FRAMEGRID_STATE_DIR": str(work / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(work / "config.toml")], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--window-size={args.size.replace('x', ',')}", "--hide-scrollbars",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "chromedriver"),
                              options=options)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("framegrid did not become ready")
        driver.get(base + "/")
        time.sleep(args.seconds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
