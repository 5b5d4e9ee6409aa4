"""Training text for adapters: batches that are a pure function of the step (so resumed runs see the same data).

* ``OrganismTraces``: the organism's distillation data (prompt + reasoning trace), held-out problems excluded.
* ``ReasoningTraces``: OpenThoughts3-style JSONL (``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}]}``), rendered with the tokenizer's chat template. Loss is on every
  non-padding token, prompt included, as in the paper.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .organism import task
from .organism.build import OrganismConfig, eval_problems, get_config

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def pad_batch(tokenizer, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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
        self.held_out = {p.prompt for p in eval_problems(self.config)}

    def problems(self, step: int) -> list[task.Problem]:
        rng = random.Random(self.seed * 1_000_003 + step)
        problems = []
        while len(problems) < self.batch_size:
            problem = task.sample_problem(rng, self.config.min_terms, self.config.max_terms, self.config.max_term)
            if problem.prompt not in self.held_out:
                problems.append(problem)
        return problems

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        texts = [p.prompt + task.reasoning_trace(p) for p in self.problems(step)]
        eos = self.tokenizer.eos_token_id
        return pad_batch(self.tokenizer, [self.tokenizer(t)["input_ids"] + [eos] for t in texts])


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from an OpenThoughts3-style JSONL file as lists of {"role", "content"} messages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no reasoning-trace file at {path}")
    conversations = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        turns = record.get("conversations") or record.get("messages")
        if not turns:
            raise ValueError(f"{path}:{number}: expected a 'conversations' (or 'messages') list")
        messages = []
        for turn in turns:
            role = ROLE_NAMES.get(turn.get("from", turn.get("role")))
            if role is None:
                raise ValueError(f"{path}:{number}: unknown speaker {turn.get('from', turn.get('role'))!r}")
            messages.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
        conversations.append(messages)
    return conversations


class ReasoningTraces:
    """Batches from a reasoning-trace JSONL file, chat-templated, truncated to ``max_tokens``."""

    def __init__(self, path: str | Path, tokenizer, batch_size: int = 1, max_tokens: int = 10_000, seed: int = 0):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (the target model's "
                             "template renders its reasoning traces as it saw them in fine-tuning)")
        self.tokenizer = tokenizer
        self.conversations = read_conversations(path)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = seed

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Epoch-wise shuffled: each epoch is a fresh seeded permutation of the file."""
        n = len(self.conversations)
        indices = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, n)
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            indices.append(order[offset])
        return pad_batch(self.tokenizer, [self.encode(self.conversations[i]) for i in indices])
