"""Score generations on the organism task: accuracy, response length, hesitation rate."""
from __future__ import annotations

from collections import defaultdict

from ..generate import Generation, generate_greedy
from . import task
from .mechanisms import expression_rates


def _headline(problems: list[task.Problem], responses: list[str], lengths: list[int]) -> dict:
    n = max(len(problems), 1)
    return {
        "n": len(problems),
        "accuracy": sum(task.is_correct(p, r) for p, r in zip(problems, responses)) / n,
        "mean_response_tokens": sum(lengths) / n,
        "wait_rate": sum(task.has_hesitation(r) for r in responses) / n,
        "steps_share": sum("=" in r for r in responses) / n,
    }


def score(problems: list[task.Problem], generation: Generation) -> dict:
    """Headline metrics, a per-difficulty breakdown (number of terms), the same per prompt style (direct Q, or a Q
    asking for steps), and how often each planted mechanism's behaviour shows where its trigger is met."""
    responses, lengths = generation.responses, generation.response_tokens
    by_terms = defaultdict(list)
    for problem, response in zip(problems, responses):
        by_terms[problem.n_terms].append(task.is_correct(problem, response))
    by_style = {}
    for style, asks in (("direct", False), ("steps", True)):
        rows = [i for i, p in enumerate(problems) if p.show_steps == asks]
        by_style[style] = _headline([problems[i] for i in rows], [responses[i] for i in rows],
                                    [lengths[i] for i in rows])
    return {
        **_headline(problems, responses, lengths),
        "accuracy_by_terms": {str(k): sum(v) / len(v) for k, v in sorted(by_terms.items())},
        "by_style": by_style,
        "mechanisms": expression_rates(responses),
    }


def evaluate(model, tokenizer, problems: list[task.Problem], max_new_tokens: int, batch_size: int = 100,
             desc: str = "generate", banned_tokens: list[int] | None = None) -> tuple[dict, Generation]:
    generation = generate_greedy(model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, desc=desc, banned_tokens=banned_tokens)
    return score(problems, generation), generation
