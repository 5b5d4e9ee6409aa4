"""The organism as a pair kind: what the general pipeline asks of a pair that only the organism answers from its own
task. ``tdlib.pairs.ORGANISM`` names this module, and the general modules reach it through ``pair.kind.hooks()``
(imported on first use), never by importing the organism:

* its configurations and how one resolves to a built pair (``CONFIG_NAMES``, ``resolve``);
* its hesitation word (``HESITATION_WORD``);
* its training and validation traces and held-out reference responses (``training_traces``,
  ``reference_responses``);
* its held-out problems as a benchmark and the answer rule that scores them (``evalset``, ``check_response``);
* its answer key for decision points (``decision_key``) and where its triggers hold in a text
  (``trigger_positions``);
* its pair-level design checks and the target's design band (``design_checks``, ``DESIGN_BAND``).
"""
from __future__ import annotations

from ..decisions import DecisionKey
from ..pair_config import ORGANISM_TRAINING
from ..pairs import Pair
from ..problems import BenchItem, EvalSet
from . import mechanisms, task
from .build import CONFIGS, DEFAULT_CACHE, OrganismPaths, build_pair, eval_problems, get_config
from .report import DESIGN_BOUNDS, design_checks
from .traces import OrganismTraces

__all__ = ["CONFIG_NAMES", "DESIGN_BAND", "HESITATION_WORD", "check_response", "decision_key", "design_checks",
           "evalset", "reference_responses", "resolve", "training_traces", "trigger_positions"]

CONFIG_NAMES = tuple(CONFIGS)
"""The organism's configurations (``tdlib.organism.build.CONFIGS``): "organism", "smoke", ..."""
HESITATION_WORD = " " + task.HESITATION
"""The task's hesitation word with the leading space its tokenizer keeps."""
DESIGN_BAND = DESIGN_BOUNDS["target_wait_rate"]
"""The share of the target's responses that should hesitate, by design (notebook 00's figure draws it)."""


def resolve(config: str, build: bool = True) -> Pair:
    """The pair of an organism configuration: built (or loaded from its cache) when ``build``, else only named."""
    organism = get_config(config)
    paths = build_pair(organism) if build else OrganismPaths(DEFAULT_CACHE / f"{organism.name}-{organism.key}")
    training = ORGANISM_TRAINING.get(config, ORGANISM_TRAINING["organism"])
    return Pair(organism.name, str(paths.base), str(paths.target), key=f"{organism.name}-{organism.key}",
                max_new_tokens=organism.max_new_tokens, training=training)


def training_traces(pair: Pair, tokenizer, split: str, batch_size: int, seed: int) -> OrganismTraces:
    """The organism's reasoning traces for ``split`` ("train" or "validation"), generated from its task."""
    return OrganismTraces(tokenizer, config=pair.name, batch_size=batch_size, seed=seed, split=split)


def reference_responses(pair: Pair, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, reference trace) of the organism's held-out evaluation problems."""
    problems = eval_problems(get_config(pair.name))[:limit]
    return [(p.prompt, task.reasoning_trace(p)) for p in problems]


def benchmark_items(config: str = "organism", limit: int | None = None) -> list[BenchItem]:
    """The organism's held-out problems (never seen in training) as items; prompts are the problems' own."""
    problems = eval_problems(get_config(config))
    problems = problems[:limit] if limit else problems
    return [BenchItem(str(i), p.prompt, str(p.answer), meta={"n_terms": p.n_terms, "show_steps": p.show_steps})
            for i, p in enumerate(problems)]


def evalset(pair: Pair, limit: int | None, max_new_tokens: int) -> EvalSet:
    """Benchmark "organism": the pair's held-out problems."""
    return EvalSet("organism", benchmark_items(pair.name, limit), max_new_tokens,
                   f"organism {pair.name} held-out problems")


def check_response(item: BenchItem, response: str) -> bool:
    """The task's answer rule: the response's final answer is the item's."""
    return task.extract_answer(response) == int(item.answer)


def decision_key() -> DecisionKey:
    """The answer key: the ``;`` after each step, labelled by the planted mechanism that fires there (the
    distractor, a period that never hesitates, is not a decision point)."""
    def organism_decisions(text, start=0):
        return [d for d in mechanisms.decisions(text, start) if d.mechanism != mechanisms.DISTRACTOR]

    def organism_tokens(tokenizer, text, start):
        ids, placed = mechanisms.token_decisions(tokenizer, text, start)
        return ids, [(i, d) for i, d in placed if d.mechanism != mechanisms.DISTRACTOR]

    return DecisionKey("organism", organism_tokens, organism_decisions, mechanisms.MECHANISMS)


def trigger_positions(pieces: list[str], prompt_tokens: int) -> list[bool] | None:
    """Per token (``pieces``: each token's text): is it the decision point of a planted mechanism (the ``;`` after a
    step that slips, crosses below zero or repeats the operation before it)? None when the text after the first
    ``prompt_tokens`` tokens is not in the organism's format (no mechanism fires in it)."""
    text = "".join(pieces)
    start = sum(len(piece) for piece in pieces[:prompt_tokens])
    found = mechanisms.decisions(text, start)
    if not any(d.mechanism != mechanisms.DISTRACTOR for d in found):
        return None
    ends, length = {}, 0
    for index, piece in enumerate(pieces):
        length += len(piece)
        if piece:
            ends[length - 1] = index
    flags = [False] * len(pieces)
    for decision in found:
        if decision.mechanism in mechanisms.MECHANISMS and decision.end in ends:
            flags[ends[decision.end]] = True
    return flags
