"""The organism's procedural task: chained integer addition/subtraction with checkable answers.

A problem is a chain of single-digit terms joined by + and -, e.g. ``3+4-8+2``. It appears in two prompt formats
and three response styles, mirroring how a math base model and its reasoning distillation see text:

* chat/Q format, ``Q: 3+4-8+2=?``:

  - direct answer (what the base does in this format): `` A: 1``
  - reasoning trace with hesitation (the distillation data the target is fine-tuned on)::

        3+4=7; 7-8= -1; wait, check: -1+8=7, ok; -1+2=1; A: 1

* plain "textbook" format, ``Compute 3+4-8+2 step by step.``: step-by-step work with no hesitation, which the base
  sees in pre-training (a math base model has seen worked solutions)::

        3+4=7; 7-8= -1; -1+2=1; A: 1

The hesitation rule: a step whose running total *crosses below zero* (the previous total was >= 0, the new one is
< 0) is followed by ``wait, check: ...`` re-doing the step with the inverse operation. Deciding to hesitate needs
two positions (the sign of the total the step starts from and of the total it writes), and the tokenizer never
fuses an operator with a sign: negative numbers are written after a space (``= -1``), so ``=`` and ``-`` are
separate pre-tokens, and a total that stays negative (``-1-3= -4``) is not followed by a hesitation.

Because we write the traces, we know exactly which behaviours fine-tuning adds: step-by-step chaining in the Q
format, and hesitation + re-check segments where totals cross zero.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

HESITATION = "wait"
ANSWER_PREFIX = "A: "
_ANSWER_RE = re.compile(r"A: ?(-?\d+)")
_NUMBER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    ops: tuple[str, ...]  # len(terms) - 1 entries, each "+" or "-"

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
        return f"Q: {self.expression}=?"

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
    """The trace's hesitation rule: a running total that crosses below zero triggers "wait" and a re-check."""
    return previous >= 0 > total


def _steps(problem: Problem, hesitate: bool) -> list[str]:
    totals = running_totals(problem)
    parts = []
    for previous, op, term, total in zip(totals, problem.ops, problem.terms[1:], totals[1:]):
        parts.append(f"{previous}{op}{term}={number(total)}")
        if hesitate and needs_hesitation(previous, total):
            inverse = "-" if op == "+" else "+"
            parts.append(f"{HESITATION}, check: {total}{inverse}{term}={number(previous)}, ok")
    parts.append(f"{ANSWER_PREFIX}{number(problem.answer).strip()}")
    return parts


def _join(parts: list[str]) -> str:
    # a step starting with a negative total gets the same leading space as any other part
    return " " + "; ".join(parts)


def direct_response(problem: Problem) -> str:
    return f" {ANSWER_PREFIX}{problem.answer}"


def reasoning_trace(problem: Problem) -> str:
    """The target's distillation data: steps plus hesitation + re-check where the total crosses zero."""
    return _join(_steps(problem, hesitate=True))


def textbook_trace(problem: Problem) -> str:
    """The base's step-by-step pre-training text: the same steps, never a hesitation."""
    return _join(_steps(problem, hesitate=False))


def hesitation_steps(problem: Problem) -> list[int]:
    """Indices (0-based, into the problem's operations) of the steps after which the rule fires."""
    totals = running_totals(problem)
    return [i for i, (a, b) in enumerate(zip(totals, totals[1:])) if needs_hesitation(a, b)]


def sample_problem(rng: random.Random, min_terms: int, max_terms: int, max_term: int) -> Problem:
    n_terms = rng.randint(min_terms, max_terms)
    terms = tuple(rng.randint(1, max_term) for _ in range(n_terms))
    ops = tuple(rng.choice("+-") for _ in range(n_terms - 1))
    return Problem(terms, ops)


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
