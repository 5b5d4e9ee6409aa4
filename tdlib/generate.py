"""Batched greedy generation with left padding, at plain ``generate`` speed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt (or prompt + response) text, the one way every path renders it (training, generation,
    faithfulness, attribution, ablation): the tokenizer's usual special tokens (e.g. Gemma's ``<bos>`` for a plain
    prompt), except that a text that already starts with the BOS token (a chat template that writes it) does not
    get a second one."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def left_padded(tokenizer, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """``encode_prompt`` of each prompt, left-padded into one batch (every prompt ends at the same column)."""
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@dataclass
class Generation:
    prompts: list[str]
    responses: list[str]
    response_tokens: list[int]  # generated tokens per response, end-of-sequence excluded


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64,
    progress: bool = True, desc: str = "generate", banned_tokens: list[int] | None = None,
) -> Generation:
    """Greedy continuations of ``prompts``; batches are left-padded so every prompt ends at the same column.
    ``banned_tokens`` are never generated (e.g. the hesitation word, to measure what hesitating changes)."""
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    responses, lengths = [], []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = left_padded(tokenizer, prompts[start:start + batch_size], device)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **({"bad_words_ids": [[t] for t in banned_tokens]} if banned_tokens else {}),
        )
        for text, length in decode_responses(tokenizer, output, batch["input_ids"].shape[1]):
            responses.append(text)
            lengths.append(length)
    return Generation(list(prompts), responses, lengths)


def decode_responses(tokenizer, output: torch.Tensor, prompt_width: int) -> list[tuple[str, int]]:
    """(text, token count) of each generated row, cut at end-of-sequence, padding dropped."""
    decoded = []
    for row in output[:, prompt_width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        row = [t for t in row if t != tokenizer.pad_token_id]
        decoded.append((tokenizer.decode(row), len(row)))
    return decoded
