"""Screenshot of the serving page mid-refinement and at the end, for the README.

Starts `ovqvae serve` on a SavedModel, opens the page in headless Chromium (Debian's
chromium and chromedriver), samples with a deadline, and saves the page once the samples
are final.

  .venv/bin/python bench/page_screenshot.py --saved_model=workdir/digits/saved_model \\
      --output=docs/serve_page.png
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved_model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--deadline_ms", type=int, default=0, help="0: stop at k = K instead.")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve",
                               f"--saved_model={args.saved_model}", "--port=0", "--max_chunk=2"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONPATH": REPO})
    url = None
    for line in server.stdout:
        found = re.search(r"on (http://[\d.]+:\d+)/", line)
        if found:
            url = found.group(1)
            break
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--window-size=980,700", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url + "/")
        if args.deadline_ms:
            driver.find_element(By.CSS_SELECTOR, "input[value=deadline]").click()
            field = driver.find_element(By.ID, "deadline")
            field.clear()
            field.send_keys(str(args.deadline_ms))
        driver.find_element(By.ID, "sample").click()
        give_up = time.monotonic() + 60
        while not driver.execute_script("return window.ovqvae.done || window.ovqvae.error"):
            if time.monotonic() > give_up:
                raise TimeoutError("the page did not finish sampling")
            time.sleep(0.1)
        driver.save_screenshot(args.output)
        print(f"wrote {args.output}; k per event: {driver.execute_script('return window.ovqvae.ks')}")
    finally:
        driver.quit()
        server.send_signal(signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    main()
