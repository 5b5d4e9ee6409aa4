"""Training text for adapters: batches that are a pure function of the step (so resumed runs see the same data).

* ``ReasoningTraces``: OpenThoughts3-style JSONL (``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}]}``), rendered as the paper's released code does (``render_trace``): the chat
  template for the turns before the response, up to and including the generation prompt, then the response's raw
  text, then EOS. Loss is on every non-padding token, prompt included, as in the paper.

Why not ``apply_chat_template`` on the whole conversation: DeepSeek-R1-Distill's template keeps only what follows
``</think>`` in an assistant turn, so it would delete the reasoning the adapters are meant to learn
(tests/fixtures/ holds that template; the tests check the reasoning survives). A tokenizer without a chat template
needs ``prompt_format="plain"`` (a pair file's ``prompt_format`` field, docs/real_models.md).

The organism's own training text: ``tdlib.organism.traces.OrganismTraces``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .generate import encode_prompt


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


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from an OpenThoughts3-style JSONL file as lists of {"role", "content"} messages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no reasoning-trace file at {path}")
    conversations = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            conversations.append(_messages(_record(line, f"{path}:{number}"), f"{path}:{number}"))
    return conversations


def count_traces(path: str | Path) -> int:
    """The traces in a JSONL file (its non-empty lines), reading the first as a conversation so that a file in
    another schema fails here, naming the line, and not in the middle of training."""
    count = 0
    with open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if not count:
                _messages(_record(line, f"{path}:{number}"), f"{path}:{number}")
            count += 1
    return count


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not a JSON line ({error}); traces are one JSON object per line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'conversations' list, got {type(record).__name__}")
    return record


def _messages(record: dict, where: str) -> list[dict]:
    """One trace's turns as {"role", "content"} messages."""
    turns = record.get("conversations") or record.get("messages")
    if not turns:
        raise ValueError(f"{where}: expected a 'conversations' (or 'messages') list")
    messages = []
    for turn in turns:
        role = ROLE_NAMES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"{where}: unknown speaker {turn.get('from', turn.get('role'))!r}")
        messages.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return messages


PROMPT_FORMATS = ("chat", "plain")
"""How a conversation becomes text: "chat" through the tokenizer's chat template, "plain" without one (each turn's
text followed by a newline before the response, as ``tdlib.problems.render_prompts`` prompts a template-less model)."""


def check_prompt_format(tokenizer, prompt_format: str) -> None:
    """A ``ValueError`` naming the fix when ``prompt_format`` is unknown or needs a chat template the tokenizer lacks."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise ValueError(f"{name} has no chat template, so prompt_format 'chat' cannot render conversations. Either "
                         "set \"prompt_format\": \"plain\" in the pair file (prompt text, a newline, then the "
                         "response; docs/real_models.md) or give the tokenizer the template the target was "
                         "fine-tuned with (tokenizer.chat_template, or chat_template in tokenizer_config.json)")


def render_prompt(tokenizer, messages: list[dict], prompt_format: str = "chat") -> str:
    """The text a response follows: ``messages`` (every turn before the response) through the chat template with
    the generation prompt appended, or for "plain" each turn's text followed by a newline."""
    check_prompt_format(tokenizer, prompt_format)
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in messages)


def render_trace(tokenizer, messages: list[dict], prompt_format: str = "chat") -> tuple[str, str]:
    """(prompt text, response text) of a conversation that ends with the assistant's response: the prompt as
    ``render_prompt`` gives it for ``messages[:-1]``, the response as its raw text, never passed through the
    template (which may rewrite it: R1-Distill's drops everything up to ``</think>``)."""
    if not messages or messages[-1]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise ValueError(f"a training trace must end with the assistant's response; this one's turns are {roles}")
    return render_prompt(tokenizer, messages[:-1], prompt_format), messages[-1]["content"]


def encode_trace(tokenizer, messages: list[dict], prompt_format: str = "chat",
                 max_tokens: int | None = None) -> list[int]:
    """Token ids of a training trace: prompt ids, then response ids, then EOS (the prompt and the response are
    tokenized separately, as the model reads a prompt and then generates; the prompt by ``tdlib.generate.encode_prompt``,
    as every other path renders it), cut to ``max_tokens``."""
    prompt, response = render_trace(tokenizer, messages, prompt_format)
    ids = encode_prompt(tokenizer, prompt)
    ids = ids + tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token (traces end with it)")
    ids = ids + [tokenizer.eos_token_id]
    return ids[:max_tokens] if max_tokens else ids


class ReasoningTraces:
    """Batches from a reasoning-trace JSONL file rendered by ``encode_trace``, truncated to ``max_tokens``."""

    def __init__(self, path: str | Path, tokenizer, batch_size: int = 1, max_tokens: int = 10_000, seed: int = 0,
                 prompt_format: str = "chat"):
        check_prompt_format(tokenizer, prompt_format)
        self.tokenizer = tokenizer
        self.conversations = read_conversations(path)
        for number, messages in enumerate(self.conversations, start=1):
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"{path}: conversation {number} ends with a {messages[-1]['role']!r} turn; training "
                                 "traces end with the assistant's response (drop it or add the response)")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = seed
        self.prompt_format = prompt_format

    def encode(self, messages: list[dict]) -> list[int]:
        return encode_trace(self.tokenizer, messages, self.prompt_format, self.max_tokens)

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
