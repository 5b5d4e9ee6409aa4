"""Render the autointerp feature page (or an attribution graph page) in a real headless browser and check that its
content loaded.

    python scripts/check_feature_page.py [PAGE.html] [--png OUT.png]
    python scripts/check_feature_page.py figures/05_wait_graph.html

Without a page, builds a small one from the smoke pair's trained adapter (artifacts/train/smoke-*/) in a
temporary folder. Runs chromium (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH; on Debian:
``apt-get install chromium``) twice: ``--dump-dom`` (the DOM after the page's script ran) must hold every feature
card and ``data-ready`` = their count on <body>, which only the page's script sets; ``--screenshot`` writes a PNG.
Exits non-zero with the reason when anything is missing.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"no headless browser found (looked for {', '.join(BROWSERS)}); install one, e.g. "
                     "`apt-get update && apt-get install -y chromium`")


def run_browser(browser: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="feature-page-chromium-")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def check_page(page: Path, png: Path) -> dict:
    """Dump the DOM and a screenshot of ``page``; raise AssertionError when the content did not load."""
    browser = find_browser()
    expected = int(re.search(r'data-features="(\d+)"', page.read_text()).group(1))
    dom = run_browser(browser, "--dump-dom", page.resolve().as_uri())
    if dom.returncode != 0:
        raise AssertionError(f"{browser} --dump-dom failed ({dom.returncode}): {dom.stderr[-500:]}")
    cards = len(re.findall(r'<div class="feature"', dom.stdout))
    ready = re.search(r'data-ready="(\d+)"', dom.stdout)
    if cards != expected or cards == 0:
        raise AssertionError(f"the rendered page has {cards} feature cards, the file declares {expected}")
    if not ready or int(ready.group(1)) != expected:
        raise AssertionError("the page's script did not run (no data-ready on <body> matching the card count)")
    png.parent.mkdir(parents=True, exist_ok=True)
    shot = run_browser(browser, f"--screenshot={png.resolve()}", "--window-size=1200,1400", page.resolve().as_uri())
    if shot.returncode != 0 or not png.exists() or png.stat().st_size < 5000:
        raise AssertionError(f"{browser} --screenshot wrote no usable PNG: {shot.stderr[-500:]}")
    return {"cards": cards, "png": str(png), "png_bytes": png.stat().st_size}


def check_graph_page(page: Path, png: Path) -> dict:
    """The attribution graph page (``tdlib.attribution.graph_page``): after its script ran, the DOM must record
    drawn nodes and edges on <body> (``data-drawn-nodes`` / ``data-drawn-edges``, set only by the drawing code) and
    hold that many SVG node shapes and edge lines; a screenshot must come out."""
    browser = find_browser()
    dom = run_browser(browser, "--dump-dom", page.resolve().as_uri())
    if dom.returncode != 0:
        raise AssertionError(f"{browser} --dump-dom failed ({dom.returncode}): {dom.stderr[-500:]}")
    nodes = re.search(r'data-drawn-nodes="(\d+)"', dom.stdout)
    edges = re.search(r'data-drawn-edges="(\d+)"', dom.stdout)
    if not nodes or not edges:
        raise AssertionError("the page's script did not draw the graph (no data-drawn-nodes / -edges on <body>)")
    shapes = len(re.findall(r'class="node"', dom.stdout))
    lines = len(re.findall(r'class="edge"', dom.stdout))
    if shapes != int(nodes.group(1)) or lines != int(edges.group(1)) or shapes == 0 or lines == 0:
        raise AssertionError(f"the page reports {nodes.group(1)} nodes and {edges.group(1)} edges but the DOM holds "
                             f"{shapes} node shapes and {lines} edge lines")
    png.parent.mkdir(parents=True, exist_ok=True)
    shot = run_browser(browser, f"--screenshot={png.resolve()}", "--window-size=1400,900", page.resolve().as_uri())
    if shot.returncode != 0 or not png.exists() or png.stat().st_size < 5000:
        raise AssertionError(f"{browser} --screenshot wrote no usable PNG: {shot.stderr[-500:]}")
    return {"nodes": shapes, "edges": lines, "png": str(png), "png_bytes": png.stat().st_size}


def smoke_page(directory: Path) -> Path:
    """A feature page for the smoke pair's adapter_l1_0.001 (trains the smoke runs when missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tdlib.autointerp import (CacheConfig, OfflineBackend, ScoringConfig, build_cache, classify_units,
                                  logit_effects, score_units, stream_batches, write_feature_page)
    from tdlib.models import load_tokenizer
    from tdlib.pair_data import data_for
    from tdlib.pairs import resolve_pair
    from tdlib.runs import load_named

    pair = resolve_pair("smoke")
    model, tokenizer = load_named(pair, "adapter_l1_0.001"), load_tokenizer(pair.target)
    config = CacheConfig(n_batches=2, batch_size=16)
    data = data_for(pair, tokenizer, "validation", batch_size=config.batch_size, seed=config.seed)  # held out
    cache = build_cache(model, tokenizer, stream_batches(data, config.n_batches), config, progress=False)
    backend = OfflineBackend()
    table = classify_units(score_units(cache, backend, ScoringConfig(units_per_layer=5)), cache, backend)
    return write_feature_page(table, cache, directory / "features.html", "smoke feature page",
                              effects=logit_effects(model, table, cache.vocab))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", nargs="?", help="the HTML page (default: build a smoke page)")
    parser.add_argument("--png", help="where to write the screenshot (default: beside the page)")
    args = parser.parse_args(argv)
    page = Path(args.page) if args.page else smoke_page(Path(tempfile.mkdtemp(prefix="feature-page-")))
    if not page.exists():
        raise SystemExit(f"no page at {page}; run notebooks/04_autointerp.ipynb (make figures) first")
    png = Path(args.png) if args.png else page.with_suffix(".png")
    if "graph-data" in page.read_text():
        result = check_graph_page(page, png)
        print(f"[check_feature_page] {page}: {result['nodes']} nodes and {result['edges']} edges drawn; "
              f"screenshot {result['png']}")
        return
    result = check_page(page, png)
    print(f"[check_feature_page] {page}: {result['cards']} feature cards rendered; screenshot {result['png']}")


if __name__ == "__main__":
    main()
