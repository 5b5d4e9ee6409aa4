"""The answer key: where each planted mechanism of the organism decides, read from any response text.

A response is a ``"; "``-separated list of parts (``tdlib.organism.task``). Every *step* (``a+b=c``) and every
*correction* (``wait, no: a+b=c``) closes with a ``;``; the prediction made at that ``;`` is where the target decides
whether to hesitate, a *decision point*. Each decision point gets at most one mechanism label, by priority:

* ``slip``: the part just written is arithmetically wrong (the target then says ``wait, no: ...``);
* ``crossing``: the step takes the running total from >= 0 to < 0;
* ``repeat``: the step applies the same operation (operator and term) as the step before (a correction restates
  the operation it corrects, so it is not a new one);

or ``None`` (no trigger: the target goes on). Whether the response *did* hesitate there is whether the next part
starts with the hesitation word. The distractor's decision point is the answer's last character, where the target
writes its period.

Only the text is read, so the same key scores the reference traces, any model's generations, and the prompts the
attribution study cuts before a "wait".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import task

MECHANISMS = ("crossing", "repeat", "slip")
"""The planted hesitation mechanisms, in the order the scoreboard lists them."""
DISTRACTOR = "period"
"""The planted non-reasoning change: a period after the answer."""

_STEP = re.compile(r"^(-?\d+)([+-])(\d+)= ?(-?\d+)$")
_CORRECTION = re.compile(rf"^{task.HESITATION}, no: (-?\d+)([+-])(\d+)= ?(-?\d+)$")
_ANSWER = re.compile(rf"^{re.escape(task.ANSWER_PREFIX)}-?\d+")


@dataclass(frozen=True)
class Decision:
    """One decision point of a response."""

    end: int
    """Character index (into the text given) of the ``;`` closing the part; for the distractor, of the answer's last
    digit."""
    mechanism: str | None
    """``slip``, ``crossing``, ``repeat``, ``period`` or None (no trigger)."""
    expressed: bool | None
    """The text goes on with the mechanism's behaviour: the hesitation word (or the period); None when the text ends
    at a ``;`` (a prompt cut there; a response that ends after its answer did not write the period: False)."""


def _value(a: str, op: str, b: str) -> int:
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def decisions(text: str, start: int = 0) -> list[Decision]:
    """Every decision point of ``text[start:]`` (a response, or a prompt + response with ``start`` at the response),
    with character indices into ``text``."""
    out: list[Decision] = []
    operations: list[tuple[str, str, str]] = []  # (start, operator, term) of each operation written so far
    position = start
    parts = text[start:].split(";")
    for number, raw in enumerate(parts):
        part = raw.strip()
        if part.startswith(task.WORK_PREFIX):
            part = part[len(task.WORK_PREFIX):]
        end = position + len(raw)  # index of the ';' closing this part (or len(text) for the last part)
        following = parts[number + 1].strip() if number + 1 < len(parts) else None
        correction = _CORRECTION.match(part)
        match = _STEP.match(part) or correction
        if match and number + 1 < len(parts):
            a, op, b, c = match.groups()
            correct = _value(a, op, b)
            if not (correction and operations and operations[-1] == (a, op, b)):
                operations.append((a, op, b))
            if int(c) != correct:
                mechanism = "slip"
            elif int(a) >= 0 > int(c):
                mechanism = "crossing"
            elif len(operations) > 1 and operations[-2][1:] == (op, b):
                mechanism = "repeat"
            else:
                mechanism = None
            expressed = None if following == "" and number + 2 == len(parts) else \
                (following or "").startswith(task.HESITATION)
            out.append(Decision(end, mechanism, expressed))
        answer = _ANSWER.match(part)
        if answer:
            last = position + (len(raw) - len(raw.lstrip())) + answer.end() - 1
            after = text[last + 1:last + 2]
            out.append(Decision(last, DISTRACTOR, after == task.DISTRACTOR))  # a text ending here ended unpunctuated
        position = end + 1
    return out


def expression_rates(texts: list[str]) -> dict[str, dict]:
    """Per mechanism over ``texts`` (responses): decision points, how many expressed the behaviour, and how many
    times the hesitation word came at a point with no trigger."""
    counts = {m: {"points": 0, "expressed": 0} for m in (*MECHANISMS, DISTRACTOR, "none")}
    for text in texts:
        for d in decisions(text):
            if d.expressed is None:
                continue
            entry = counts[d.mechanism or "none"]
            entry["points"] += 1
            entry["expressed"] += int(d.expressed)
    return {m: {**c, "rate": c["expressed"] / c["points"] if c["points"] else None} for m, c in counts.items()}


def hesitations_by_mechanism(text: str) -> dict[str, int]:
    """How many times ``text`` hesitated at each mechanism's decision points (``none``: at a point with no trigger;
    ``hesitation``: all of them; ``period``: the answer's period)."""
    counts = {m: 0 for m in (*MECHANISMS, DISTRACTOR, "none")}
    for d in decisions(text):
        if d.expressed:
            counts[d.mechanism or "none"] += 1
    counts["hesitation"] = sum(counts[m] for m in (*MECHANISMS, "none"))
    return counts


def last_decision(text: str, start: int = 0) -> str | None:
    """The mechanism of the last decision point that closes ``text`` (a prompt cut before a hesitation ends with
    ``;``): what triggered the hesitation that follows."""
    found = decisions(text + " ", start)  # the trailing space makes the closing ';' a decision point
    closing = [d for d in found if d.end == len(text) - 1 and d.mechanism != DISTRACTOR]
    return closing[-1].mechanism if closing else None


def token_ends(tokenizer, text: str) -> tuple[list[int], dict[int, int]]:
    """Tokenise ``text`` (no special tokens added): ``(input_ids, {character index: index of the token ending
    there})``, so an answer key can place a decision on the token whose prediction makes it."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ends = {last - 1: index for index, (first, last) in enumerate(encoded["offset_mapping"]) if last > first}
    return list(encoded["input_ids"]), ends


def token_decisions(tokenizer, text: str, start: int) -> tuple[list[int], list[tuple[int, Decision]]]:
    """Tokenise ``text`` (prompt + response, the response from character ``start``) and place each decision point
    on the token that ends at its character: ``(input_ids, [(token index, decision)])``."""
    input_ids, ends = token_ends(tokenizer, text)
    placed = []
    for decision in decisions(text, start):
        if decision.end not in ends:
            raise ValueError(f"the tokenizer merges the decision character {text[decision.end]!r} at "
                             f"{decision.end} with the next one in {text!r}; the organism's tokenizer must keep "
                             "';' and the answer's last digit as token ends")
        placed.append((ends[decision.end], decision))
    return input_ids, placed
