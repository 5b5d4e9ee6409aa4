"""What a model pair is configured with: ``HubPairConfig`` (models, data, benchmarks, generation, notebooks) and
``TrainingDefaults`` (how its adapters are trained), with the CPU plan every CPU pair file starts from and the
organism's training table. Selecting and resolving pairs: ``tdlib.pairs``; pair files: ``tdlib.pair_files``; their
data: ``tdlib.pair_data``."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .problems import BENCHMARK_NAMES
from .train import TrainConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


PAPER_RUN = TrainConfig(n_features=8192, lr=8e-4, batch_size=1, steps=50_000, warmup=0.05,
                        gradient_checkpointing=True, kl_chunk_tokens=1024, checkpoint_every=200,
                        dead_after_tokens=10_000_000)
"""A run of the paper's 7B recipe: 8192 features per layer (at d_model 3584), lr 8e-4 with 5% warm-up, batch 1,
one epoch of its ~50k traces, a 10M-token dead-feature window; the layers recomputed in the backward pass and the
head and KL computed 1024 tokens at a time, which is what makes a 10k-token 7B step fit 80 GB
(docs/memory_plan.md; memory only: the trained weights are the same). Every other field: ``TrainConfig``'s."""

PAIR_RUN_EXCLUDED = ("kind", "l1_weight", "objective_version")
"""``TrainConfig`` fields a pair does not set: the run kind and its L1 weight are chosen per run by the sweep, and
the objective version is the code's."""


@dataclass(frozen=True)
class TrainingDefaults:
    """How a pair's adapters are trained: the one place notebook 01's sweep (``tdlib.sweep.default_plan``), the
    data-parallel trainer (``tdlib.distributed``) and the data loader (``data_for``) read. Every pair carries one
    (``Pair.training``: ``ORGANISM_TRAINING`` for the organism, a pair file's ``training`` for a hub pair); the
    paper's by default. A run's settings are one ``TrainConfig`` (``run``), so no setting or check is written twice;
    ``TrainingDefaults.of(...)`` takes them flat, as a pair file's ``training`` block does."""

    run: TrainConfig = field(default_factory=lambda: replace(PAPER_RUN), hash=False)
    """Every run's settings (``tdlib.train.TrainConfig``): features, lr, batch, steps, warm-up, memory options,
    checkpoints, placement. Its ``l1_weight`` is not used: each run takes one of ``l1_weights``."""
    l1_weights: tuple[float, ...] = (0.01, 0.003, 0.001, 0.0003, 0.0001)
    """The sparsity sweep (the paper's five)."""
    max_tokens: int | None = 10_000
    """Longest training sequence in tokens (the paper: up to 10k); None: no cap (the organism's traces are short)."""
    n_validation_batches: int = 8
    """Held-out batches (of ``run.batch_size`` sequences) for notebook 01's final metrics (``SweepPlan``)."""

    def __post_init__(self):
        object.__setattr__(self, "l1_weights", tuple(self.l1_weights))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"TrainingDefaults.max_tokens must be None or >= 1, got {self.max_tokens}")
        if self.n_validation_batches < 1:
            raise ValueError(f"TrainingDefaults.n_validation_batches must be >= 1, got {self.n_validation_batches}")
        if not self.l1_weights or any(w < 0 for w in self.l1_weights):
            raise ValueError(f"TrainingDefaults.l1_weights must be non-empty and >= 0, got {self.l1_weights}")

    @classmethod
    def settings(cls) -> list[str]:
        """The names ``of`` (and a pair file's ``training`` block) accepts."""
        run = [f.name for f in fields(TrainConfig) if f.name not in PAIR_RUN_EXCLUDED]
        return run + [f.name for f in fields(cls) if f.name != "run"]

    @classmethod
    def of(cls, base: TrainConfig | None = None, **values) -> "TrainingDefaults":
        """From flat settings (``settings()``): run settings over ``base`` (the paper's run when None), the rest
        this class's; a ``ValueError`` naming an unknown one."""
        unknown = sorted(set(values) - set(cls.settings()))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(cls.settings())}")
        own = {f.name for f in fields(cls)}
        run = replace(base or PAPER_RUN, **{k: v for k, v in values.items() if k not in own})
        return cls(run, **{k: v for k, v in values.items() if k in own})

    @classmethod
    def for_cpu(cls, d_model: int, **overrides) -> "TrainingDefaults":
        """Training sized for two CPU cores, from the SmolLM2-135M plan that ran end to end there (docs/real_models.md,
        "SmolLM2": 256 features at d_model 576, 100 steps of 4 traces cut at 256 tokens, lr 2e-3, L1 0.03 / 0.01,
        a checkpoint every 20 steps, no memory-saving recomputation): the feature count scales with the width
        (the power of two nearest d_model / 2, 64-1024); ``overrides`` (flat settings) win. The lr is 2.5x the
        paper's because 100 steps are few: at 8e-4 the SmolLM2 sweep's best held-out KL was a sixth of the hybrid's,
        at 2e-3 it is below a tenth (``tdlib.smollm2.TRAINING``)."""
        n_features = min(1024, max(64, 2 ** round(math.log2(max(d_model, 2) / 2))))
        values = {"n_features": n_features, "lr": 2e-3, "batch_size": 4, "max_tokens": 256, "steps": 100,
                  "l1_weights": (0.03, 0.01), "gradient_checkpointing": False, "kl_chunk_tokens": None,
                  "checkpoint_every": 20}
        return cls.of(**{**values, **overrides})

    def train_config(self, **overrides) -> TrainConfig:
        """A run with these defaults: ``run`` with ``l1_weight`` the sweep's first (``overrides`` win)."""
        return replace(self.run, **{"l1_weight": self.l1_weights[0], **overrides})


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
    """Benchmark names (keys of ``tdlib.problems.BENCHMARK_NAMES``) this pair is evaluated on; the first is every notebook's default."""
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
        unknown = [b for b in (*self.benchmarks, *self.benchmark_files) if b not in BENCHMARK_NAMES]
        if unknown:
            raise ValueError(f"HubPairConfig names unknown benchmarks {unknown}; known: {sorted(BENCHMARK_NAMES)}")
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


# The organism's training, per organism config. On the organism (hybrid KL ~1.1 nats/token) 250-step trials at lr
# 3e-3 gave held-out L0 0.25 / 3.4 / 8.1 / 19.6 / 37 at l1 1.0 / 0.3 / 0.1 / 0.03 / 0.01; this sweep spans L0 ~0.2
# to ~20 with points inside the paper's range (1-10). Its L1 weights are ~30x the paper's: the organism's features
# are few and its activations small, so the same weight buys much less sparsity. A CPU organism run sees well under
# a million tokens, hence the short dead-feature window. Smoke only exercises every code path in seconds.
ORGANISM_TRAINING = {
    "organism": TrainingDefaults.of(n_features=512, lr=3e-3, batch_size=16, max_tokens=None, steps=1000,
                                    l1_weights=(1.0, 0.5, 0.3, 0.1, 0.03), gradient_checkpointing=False,
                                    kl_chunk_tokens=None, dead_after_tokens=100_000),
    "smoke": TrainingDefaults.of(n_features=64, lr=8e-4, batch_size=8, max_tokens=None, steps=20,
                                 l1_weights=(1e-2, 1e-3), gradient_checkpointing=False, kl_chunk_tokens=None,
                                 dead_after_tokens=2_000, n_validation_batches=2),
}
