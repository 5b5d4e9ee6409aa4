"""The organism's procedural task: chained integer addition/subtraction with checkable answers.

A problem is a chain of terms joined by + and -, e.g. ``Q: 23+45-12=?``. Two response styles:

* direct (the base model's style): `` A: 56``
* reasoning trace (the distillation data the target is fine-tuned on): one step per operation,
  and, whenever a running total goes negative, a hesitation ("wait") followed by a re-check with the
  inverse operation::

      23+45=68; 68-80=-12; wait, check: -12+80=68, ok; -12+7=-5; wait, check: -5-7=-12, ok; A: -5

Because we write the traces, we know exactly which behaviours fine-tuning adds: step-by-step
chaining, and hesitation + self-check segments triggered by negative running totals.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

HESITATION = "wait"
ANSWER_PREFIX = "A: "
_ANSWER_RE = re.compile(r"A: (-?\d+)")


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    ops: tuple[str, ...]  # len(terms) - 1 entries, each "+" or "-"

    @property
    def answer(self) -> int:
        return running_totals(self)[-1]

    @property
    def prompt(self) -> str:
        return f"Q: {_expression(self.terms, self.ops)}=?"

    @property
    def n_terms(self) -> int:
        return len(self.terms)


def _expression(terms, ops) -> str:
    text = str(terms[0])
    for op, term in zip(ops, terms[1:]):
        text += f"{op}{term}"
    return text


def running_totals(problem: Problem) -> list[int]:
    totals = [problem.terms[0]]
    for op, term in zip(problem.ops, problem.terms[1:]):
        totals.append(totals[-1] + term if op == "+" else totals[-1] - term)
    return totals


def needs_hesitation(total: int) -> bool:
    """The trace's hesitation rule: a negative running total triggers "wait" and a re-check."""
    return total < 0


def direct_response(problem: Problem) -> str:
    return f" {ANSWER_PREFIX}{problem.answer}"


def reasoning_trace(problem: Problem) -> str:
    totals = running_totals(problem)
    parts = []
    for previous, op, term, total in zip(totals, problem.ops, problem.terms[1:], totals[1:]):
        parts.append(f"{previous}{op}{term}={total}")
        if needs_hesitation(total):
            inverse = "-" if op == "+" else "+"
            parts.append(f"{HESITATION}, check: {total}{inverse}{term}={previous}, ok")
    parts.append(f"{ANSWER_PREFIX}{problem.answer}")
    return " " + "; ".join(parts)


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
