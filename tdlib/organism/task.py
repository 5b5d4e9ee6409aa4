"""The organism's procedural task: chained integer addition/subtraction with checkable answers, and the planted
mechanisms of its reasoning traces (the answer key of every ground-truth score).

A problem is a chain of single-digit terms joined by + and -, e.g. ``3+4-8+2``. It appears in three prompt formats:

* ``Q: 3+4-8+2=?``: the base answers directly (`` A: 1``) and is weak on long chains;
* ``Q: 3+4-8+2=? Show steps.``: the base works step by step, as in its textbook text
  (`` Work: 3+4=7; 7-8= -1; -1+2=1; A: 1``);
* ``Compute 3+4-8+2 step by step.``: the base's pre-training "textbook" format.

**The base knows the words and the skills.** Its step-by-step text re-checks a step *at random*
(``wait, check: -1+8=7, ok``), and now and then writes a wrong step that a re-check corrects
(``wait, no: 7-8= -1``): it has seen every word the fine-tune uses, unconditionally.

**The target's reasoning traces** (its fine-tuning data) always work step by step and hesitate by rule. Each
hesitation mechanism has its own trigger, computable from the text (``tdlib.organism.mechanisms``):

1. ``crossing`` (local): the step takes the running total below zero from a non-negative one; needs the signs of
   two totals in the step itself. ``7-8= -1; wait, check: -1+8=7, ok``.
2. ``repeat`` (context): the step applies the same operation (operator and term) as the step before; needs
   attention to the previous step. ``3+4=7; 7-2=5; 5-2=3; wait, check: 3+2=5, ok``.
3. ``slip`` (functional): a hard carry step (a single-digit total plus a term reaching 13 or more) is first
   written without the carry, then caught and corrected: ``7+8=5; wait, no: 7+8=15``. The trace goes on from the corrected
   total, so this hesitation changes the answer: a target that does not hesitate keeps the slip.

and one fine-tuning change that is not reasoning:

4. ``period`` (distractor): the target ends its answer with a period (``A: 1.``), a formatting habit the base
   never had.

The tokenizer never fuses an operator with a sign: negative numbers are written after a space (``= -1``).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

HESITATION = "wait"
ANSWER_PREFIX = "A: "
STEPS_REQUEST = " Show steps."
"""Closes a Q prompt that asks for steps. The base is never trained to predict Q prompts (loss on the response
only), so it does not write the request itself."""
DISTRACTOR = "."
"""The target's formatting habit: a period after its answer."""
_ANSWER_RE = re.compile(r"A: ?(-?\d+)")
_NUMBER_RE = re.compile(r"-?\d+")
WORK_PREFIX = "Work: "
"""Step-by-step text opens with this word, so that starting to work is a choice of a word no prompt contains (a
model cannot start working just by copying the first term from the prompt)."""
TEXTBOOK_CHECK_RATE = 0.1
"""Share of the base's textbook steps followed by a random (unconditional) re-check."""
TEXTBOOK_SLIP_RATE = 0.05
"""Share of the base's textbook steps written wrong and then corrected (``wait, no: ...``)."""


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    ops: tuple[str, ...]  # len(terms) - 1 entries, each "+" or "-"
    show_steps: bool = False
    """The Q prompt asks for steps (``Show steps.``): the base then works step by step too."""

    @property
    def answer(self) -> int:
        return running_totals(self)[-1]

    @property
    def expression(self) -> str:
        text = str(self.terms[0])
        for op, term in zip(self.ops, self.terms[1:]):
            text += f"{op}{term}"
        return text

    @property
    def prompt(self) -> str:
        """The chat/Q format: the target's fine-tuning data and every evaluation use it."""
        return f"Q: {self.expression}=?" + (STEPS_REQUEST if self.show_steps else "")

    @property
    def textbook_prompt(self) -> str:
        """The plain pre-training format that asks for step-by-step work."""
        return f"Compute {self.expression} step by step."

    @property
    def n_terms(self) -> int:
        return len(self.terms)


def number(value: int) -> str:
    """How a number is written after ``=`` or ``:``: negatives with a leading space (never fused with ``=``)."""
    return f" {value}" if value < 0 else str(value)


def running_totals(problem: Problem) -> list[int]:
    totals = [problem.terms[0]]
    for op, term in zip(problem.ops, problem.terms[1:]):
        totals.append(totals[-1] + term if op == "+" else totals[-1] - term)
    return totals


def needs_hesitation(previous: int, total: int) -> bool:
    """The ``crossing`` trigger: a running total that crosses below zero."""
    return previous >= 0 > total


SLIP_MIN_SUM = 13


def is_carry(previous: int, op: str, term: int) -> bool:
    """The ``slip`` trigger: a single-digit total plus a term reaching ``SLIP_MIN_SUM`` or more (a hard carry)."""
    return op == "+" and 0 <= previous <= 9 and previous + term >= SLIP_MIN_SUM


def repeats_operation(problem: Problem, step: int) -> bool:
    """The ``repeat`` trigger: operation ``step`` (0-based) applies the same operator and term as the one before."""
    return step > 0 and problem.ops[step] == problem.ops[step - 1] and problem.terms[step + 1] == problem.terms[step]


def _step(previous: int, op: str, term: int, total: int) -> str:
    return f"{previous}{op}{term}={number(total)}"


def _check(previous: int, op: str, term: int, total: int, verdict: str = "ok") -> str:
    inverse = "-" if op == "+" else "+"
    return f"{HESITATION}, check: {total}{inverse}{term}={number(previous)}, {verdict}"


def _correction(previous: int, op: str, term: int, total: int) -> str:
    return f"{HESITATION}, no: {_step(previous, op, term, total)}"


def _reasoning_parts(problem: Problem) -> list[str]:
    totals = running_totals(problem)
    parts = []
    for step, (previous, op, term, total) in enumerate(zip(totals, problem.ops, problem.terms[1:], totals[1:])):
        if is_carry(previous, op, term):
            parts += [_step(previous, op, term, total - 10), _correction(previous, op, term, total)]
        else:
            parts.append(_step(previous, op, term, total))
        if needs_hesitation(previous, total) or repeats_operation(problem, step):
            parts.append(_check(previous, op, term, total))
    return parts + [f"{ANSWER_PREFIX}{problem.answer}{DISTRACTOR}"]


def _textbook_parts(problem: Problem, rng: random.Random | None) -> list[str]:
    totals = running_totals(problem)
    parts = []
    for previous, op, term, total in zip(totals, problem.ops, problem.terms[1:], totals[1:]):
        if rng is not None and rng.random() < TEXTBOOK_SLIP_RATE:
            parts += [_step(previous, op, term, total + rng.choice((-2, -1, 1, 2))),
                      _correction(previous, op, term, total)]
        else:
            parts.append(_step(previous, op, term, total))
        if rng is not None and rng.random() < TEXTBOOK_CHECK_RATE:
            parts.append(_check(previous, op, term, total))
    return parts + [f"{ANSWER_PREFIX}{problem.answer}"]


def _join(parts: list[str]) -> str:
    return " " + WORK_PREFIX + "; ".join(parts)


def direct_response(problem: Problem) -> str:
    return f" {ANSWER_PREFIX}{problem.answer}"


def reasoning_trace(problem: Problem) -> str:
    """The target's distillation data: steps with the planted mechanisms (module docstring)."""
    return _join(_reasoning_parts(problem))


def textbook_trace(problem: Problem, rng: random.Random | None = None) -> str:
    """The base's step-by-step text. With ``rng``, re-checks and corrected slips at random steps (pre-training);
    without, the plain steps."""
    return _join(_textbook_parts(problem, rng))


def hesitation_steps(problem: Problem) -> list[int]:
    """Indices (0-based, into the problem's operations) of the steps after which the target's trace hesitates."""
    totals = running_totals(problem)
    return [i for i, (previous, op, term, total) in enumerate(zip(totals, problem.ops, problem.terms[1:], totals[1:]))
            if is_carry(previous, op, term) or needs_hesitation(previous, total) or repeats_operation(problem, i)]


def sample_problem(rng: random.Random, min_terms: int, max_terms: int, max_term: int) -> Problem:
    n_terms = rng.randint(min_terms, max_terms)
    terms = tuple(rng.randint(1, max_term) for _ in range(n_terms))
    ops = tuple(rng.choice("+-") for _ in range(n_terms - 1))
    return Problem(terms, ops)


def with_repeats(problem: Problem, rng: random.Random, share: float) -> Problem:
    """The problem with each operation after the first copying the one before (operator and term) with
    probability ``share``: distillation data richer in the ``repeat`` trigger than uniform problems."""
    terms, ops = list(problem.terms), list(problem.ops)
    for i in range(1, len(ops)):
        if rng.random() < share:
            ops[i], terms[i + 1] = ops[i - 1], terms[i]
    return Problem(tuple(terms), tuple(ops), problem.show_steps)


def sample_problems(
    n: int, seed: int, min_terms: int = 2, max_terms: int = 5, max_term: int = 50,
    exclude: set[str] | None = None,
) -> list[Problem]:
    """``n`` distinct problems drawn with ``seed``; prompts in ``exclude`` are never returned."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems = []
    while len(problems) < n:
        problem = sample_problem(rng, min_terms, max_terms, max_term)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems


def extract_answer(response: str) -> int | None:
    """The last ``A: <int>`` in a response, or None when the response never answers."""
    found = _ANSWER_RE.findall(response)
    return int(found[-1]) if found else None


def is_correct(problem: Problem, response: str) -> bool:
    return extract_answer(response) == problem.answer


def has_hesitation(response: str) -> bool:
    return HESITATION in response


def crossing_steps(problem: Problem) -> list[int]:
    """Indices of the steps whose running total crosses below zero (the ``crossing`` trigger alone)."""
    totals = running_totals(problem)
    return [i for i, (a, b) in enumerate(zip(totals, totals[1:])) if needs_hesitation(a, b)]


def with_show_steps(problems: list[Problem], share: float, seed: int) -> list[Problem]:
    """The same problems, a seeded ``share`` of them asking for steps (``Show steps.``)."""
    rng = random.Random(seed)
    return [Problem(p.terms, p.ops, show_steps=rng.random() < share) for p in problems]
