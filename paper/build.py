"""Build paper/README.md from results/*.json, figures/ and paper/paper_values.json (`make paper`).

    python paper/build.py                                    # results/ -> paper/README.md
    python paper/build.py --results results/paper-7b --out paper/README_paper-7b.md --compare

``--compare NAME=FOLDER`` sets another configuration's results beside the main ones (read as ``{{NAME/...}}`` in
the template); the default is ``smollm2=results/smollm2``; ``--compare`` alone sets none.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdlib.paper import COMPARISONS, build  # noqa: E402


def comparison(text: str) -> tuple[str, str]:
    name, equals, folder = text.partition("=")
    if not equals or not name or not folder:
        raise argparse.ArgumentTypeError(f"--compare takes NAME=FOLDER (e.g. smollm2=results/smollm2), got {text!r}")
    return name, folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="folder of NN_name.json results files")
    parser.add_argument("--figures", default="figures", help="folder of the notebooks' figures")
    parser.add_argument("--template", default="paper/template.md")
    parser.add_argument("--paper-values", default="paper/paper_values.json", help="the original paper's numbers")
    parser.add_argument("--out", default="paper/README.md")
    parser.add_argument("--compare", type=comparison, nargs="*", default=None, metavar="NAME=FOLDER",
                        help=f"other configurations' results folders (default: {COMPARISONS}; none: --compare)")
    args = parser.parse_args(argv)
    comparisons = None if args.compare is None else dict(args.compare)
    out = build(args.results, args.out, args.template, args.paper_values, args.figures, comparisons)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
