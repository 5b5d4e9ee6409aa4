"""Run the numbered notebooks in order with papermill: ``python -m tdlib.pipeline`` (what ``make figures`` calls).

Each notebook ``notebooks/NN_name.ipynb`` is executed with the parameters ``config``, ``results_dir`` and
``figures_dir``; executed copies go to ``runs/<run>/`` (git-ignored). The organism's results and figures are the
committed ``results/`` and ``figures/``; any other pair writes to ``runs/<config>/results`` and ``.../figures``. A failing notebook stops the run with
its name and the path of its executed copy, where the traceback is.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from .results import REPO_ROOT

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def numbered_notebooks(directory: Path = REPO_ROOT / "notebooks") -> list[Path]:
    """The pipeline's notebooks, in order: ``NN_name.ipynb`` files (later issues add more)."""
    found = sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    numbers = [p.name[:2] for p in found]
    duplicates = {n for n in numbers if numbers.count(n) > 1}
    if duplicates:
        raise ValueError(f"two notebooks share a number {sorted(duplicates)} in {directory}; renumber one")
    return found


def config_label(config: str) -> str:
    """A folder-safe name for a configuration (a pair file's stem)."""
    return re.sub(r"[^\w.\-]+", "_", Path(config).stem if config.endswith(".json") else config)


def default_output_dir(config: str) -> Path | None:
    """Where a configuration's results and figures go: the committed ``results/`` and ``figures/`` for the
    organism; ``runs/<config>/`` for any other pair, so a real pair never overwrites the organism's numbers and a
    later ``--only NN`` finds the earlier notebooks' results."""
    return None if config == "organism" else REPO_ROOT / "runs" / config_label(config)


def run_parameters(config: str, smoke: bool, run_dir: Path, output_dir: Path | None = None) -> dict:
    """Smoke runs use the tiny organism and write into the run folder, never over the committed results;
    ``output_dir`` (when given) receives ``results/`` and ``figures/``."""
    if smoke:
        config, output_dir = "smoke", run_dir
    if output_dir is not None:
        return {"config": config, "results_dir": str(Path(output_dir) / "results"),
                "figures_dir": str(Path(output_dir) / "figures")}
    return {"config": config, "results_dir": "results", "figures_dir": "figures"}


def run_pipeline(config: str = "organism", smoke: bool = False, only: list[str] | None = None,
                 run_dir: Path | None = None, output_dir: Path | None = None) -> Path:
    import papermill

    notebooks = numbered_notebooks()
    if only:
        notebooks = [p for p in notebooks if p.name[:2] in only or p.stem in only]
    if not notebooks:
        raise FileNotFoundError("no notebooks to run (expected notebooks/NN_name.ipynb)")
    label = "smoke" if smoke else config_label(config)
    run_dir = run_dir or REPO_ROOT / "runs" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = run_parameters(config, smoke, run_dir, output_dir)
    for notebook in notebooks:
        executed = run_dir / notebook.name
        started = time.time()
        print(f"[pipeline] {notebook.name} -> {executed}", flush=True)
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=parameters,
                                       cwd=str(REPO_ROOT), kernel_name="python3", progress_bar=False)
        except papermill.PapermillExecutionError as error:
            raise SystemExit(f"[pipeline] {notebook.name} failed ({error.ename}: {error.evalue}); "
                             f"see the traceback in {executed}") from None
        print(f"[pipeline] {notebook.name} done in {time.time() - started:.0f} s", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="model configuration passed to every notebook")
    parser.add_argument("--smoke", type=int, default=0, help="1: tiny organism, outputs under runs/ only")
    parser.add_argument("--only", nargs="*", help="run only these notebooks (numbers like 00 or stems)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="folder for results/ and figures/ (default: the repository's for the organism, "
                             "runs/<config>/ for any other pair)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or default_output_dir(args.config)
    run_dir = run_pipeline(args.config, bool(args.smoke), args.only, output_dir=output_dir)
    print(f"[pipeline] all notebooks ran; executed copies in {run_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
