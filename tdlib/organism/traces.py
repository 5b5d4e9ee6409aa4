"""The organism's distillation data for adapter training: batches that are a pure function of the step (so
resumed runs see the same data), held-out problems excluded."""
from __future__ import annotations

import random

import torch

from ..data import pad_batch
from . import task
from .segments import batch_segments
from .build import OrganismConfig, eval_problems, get_config


class OrganismTraces:
    """Batches of organism reasoning traces; ``split="validation"`` draws from a separate seed stream."""

    def __init__(self, tokenizer, config: str | OrganismConfig = "organism", batch_size: int = 8, seed: int = 0,
                 split: str = "train"):
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        self.tokenizer = tokenizer
        self.config = get_config(config)
        self.batch_size = batch_size
        self.seed = seed + (0 if split == "train" else 500_000)
        self.held_out = {p.expression for p in eval_problems(self.config)}

    def problems(self, step: int) -> list[task.Problem]:
        rng = random.Random(self.seed * 1_000_003 + step)
        problems = []
        while len(problems) < self.batch_size:
            problem = task.sample_problem(rng, self.config.min_terms, self.config.max_terms, self.config.max_term)
            if problem.expression not in self.held_out:
                show_steps = rng.random() < self.config.show_steps_share
                problems.append(task.Problem(problem.terms, problem.ops, show_steps=show_steps))
        return problems

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        texts = [p.prompt + task.reasoning_trace(p) for p in self.problems(step)]
        eos = self.tokenizer.eos_token_id
        return pad_batch(self.tokenizer, [self.tokenizer(t)["input_ids"] + [eos] for t in texts])

    def segments(self, step: int, width: int) -> torch.Tensor:
        """Segment ids of ``batch(step)``'s tokens ([batch, width], -1 on padding): the autointerp cache's labels
        (``tdlib.organism.segments``)."""
        return batch_segments(self.tokenizer, self.problems(step), width)
