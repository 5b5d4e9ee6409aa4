"""Score generations on the organism task: accuracy, response length, hesitation rate."""
from __future__ import annotations

from collections import defaultdict

from ..generate import Generation, generate_greedy
from . import task


def score(problems: list[task.Problem], generation: Generation) -> dict:
    """Headline metrics plus a per-difficulty breakdown (number of terms)."""
    correct = [task.is_correct(p, r) for p, r in zip(problems, generation.responses)]
    hesitant = [task.has_hesitation(r) for r in generation.responses]
    by_terms = defaultdict(list)
    for problem, ok in zip(problems, correct):
        by_terms[problem.n_terms].append(ok)
    n = len(problems)
    return {
        "accuracy": sum(correct) / n,
        "mean_response_tokens": sum(generation.response_tokens) / n,
        "wait_rate": sum(hesitant) / n,
        "accuracy_by_terms": {str(k): sum(v) / len(v) for k, v in sorted(by_terms.items())},
    }


def evaluate(model, tokenizer, problems: list[task.Problem], max_new_tokens: int, batch_size: int = 100,
             desc: str = "generate") -> tuple[dict, Generation]:
    generation = generate_greedy(model, tokenizer, [p.prompt for p in problems],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    return score(problems, generation), generation
