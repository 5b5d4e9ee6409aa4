"""Write the memory plan for training adapters on a real pair (docs/memory_plan.md), from a dry run on the meta
device: no weights, no download, no GPU, a few seconds on a CPU.

    .venv/bin/python scripts/memory_plan.py                      # the paper's 7B pair, 10k tokens, 80 GB
    .venv/bin/python scripts/memory_plan.py --config paper-1.5b --features 4096 --out docs/memory_plan_1.5b.md
    .venv/bin/python scripts/memory_plan.py --tokens 4096 --gpu-gb 40 --out /tmp/plan.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdlib.memory import SHAPES, MemoryPlanConfig, plan_memory, render_markdown  # noqa: E402
from tdlib.results import atomic_write_text, resolve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(SHAPES), default="paper-7b", help="which real pair's shape")
    parser.add_argument("--features", type=int, default=8192, help="adapter features per layer")
    parser.add_argument("--tokens", type=int, default=10_000, help="tokens in the step's one sequence")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory to fit in (decimal GB)")
    parser.add_argument("--kl-chunk-tokens", type=int, default=1024, help="token chunk of the chunked-KL strategy")
    parser.add_argument("--out", default="docs/memory_plan.md", help="markdown file to write")
    args = parser.parse_args(argv)
    plan = plan_memory(MemoryPlanConfig(shape=SHAPES[args.config], n_features=args.features,
                                        seq_tokens=args.tokens, gpu_gb=args.gpu_gb,
                                        kl_chunk_tokens=args.kl_chunk_tokens))
    text = render_markdown(plan)
    out = resolve(args.out)
    atomic_write_text(out, text)
    print(text)
    print(f"wrote {out}")
    return 0 if plan.fitting() else 1


if __name__ == "__main__":
    raise SystemExit(main())
