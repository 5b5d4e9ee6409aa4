"""Batched generation with left padding: greedy (plain ``generate``, or compact decoding that drops finished rows) and sampled with a seed."""
from __future__ import annotations

import inspect
import os
import time
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


GREEDY_METHODS = ("generate", "compact", "continuous")
"""How ``generate_greedy`` decodes; all three write the same tokens (tests/test_generate.py)."""
GENERATION_ENV = "TDLIB_GENERATION"
"""Environment variable naming the ``GREEDY_METHODS`` entry every greedy generation uses when none is given."""
"""Set to "1" to make compact decoding the default of ``generate_greedy`` (e.g. for a GPU run at long budgets)."""


@dataclass
class Generation:
    prompts: list[str]
    responses: list[str]
    response_tokens: list[int]  # generated tokens per response, end-of-sequence excluded


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64,
    progress: bool = True, desc: str = "generate", banned_tokens: list[int] | None = None,
    method: str | None = None,
) -> Generation:
    """Greedy continuations of ``prompts``; ``banned_tokens`` are never generated (e.g. the hesitation word, to
    measure what hesitating changes). ``method`` (``GREEDY_METHODS``; None: the environment variable
    ``TDLIB_GENERATION``, else "generate", so a whole ``make figures`` run can switch every notebook at once):

    * "generate": plain ``generate`` on left-padded batches of ``batch_size``; every row waits for the longest;
    * "compact": ``greedy_compact``, the same batches, but a finished row leaves the batch and its KV cache;
    * "continuous": ``greedy_continuous``, transformers' continuous batching: a finished row's place is refilled
      with the next prompt at once (paged KV cache), so no compute waits on the longest response of a batch.
      Banned tokens are not among the logits processors it supports, so with ``banned_tokens`` it decodes
      "compact" instead (the same tokens)."""
    method = method or os.environ.get(GENERATION_ENV) or "generate"
    if method not in GREEDY_METHODS:
        raise ValueError(f"greedy generation method {method!r} is not one of {GREEDY_METHODS} (check "
                         f"{GENERATION_ENV} or the method= argument)")
    if method == "continuous" and banned_tokens:
        method = "compact"
    model.eval()
    if method == "continuous":
        rows = greedy_continuous(model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=progress)
        decoded = [_decode_row(tokenizer, row) for row in rows]
        return Generation(list(prompts), [t for t, _ in decoded], [n for _, n in decoded])
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    responses, lengths = [], []
    bar = tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False)
    started = time.perf_counter()
    for start in bar:
        batch = left_padded(tokenizer, prompts[start:start + batch_size], device)
        if method == "compact":
            rows = greedy_compact(model, batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  banned_tokens=banned_tokens)
            decoded = [_decode_row(tokenizer, row) for row in rows]
        else:
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                **({"bad_words_ids": [[t] for t in banned_tokens]} if banned_tokens else {}),
            )
            decoded = decode_responses(tokenizer, output, batch["input_ids"].shape[1])
        for text, length in decoded:
            responses.append(text)
            lengths.append(length)
        bar.set_postfix_str(f"{sum(lengths) / (time.perf_counter() - started):,.0f} tokens/s")
    return Generation(list(prompts), responses, lengths)


@torch.no_grad()
def greedy_continuous(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                      progress: bool = True) -> list[list[int]]:
    """Greedy decoding of every prompt through transformers' continuous batching (``generate_batch``): requests
    are scheduled into a paged KV cache and a finished one is replaced by the next waiting prompt, so the work
    follows the responses' own lengths. Returns each prompt's generated ids, in prompt order (end-of-sequence
    included when written). The model's forward hooks (spliced MLPs, adapters) run as in any forward; sequences
    are packed along the token axis, so only hooks that act token by token behave as under ``generate``."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    inputs = [encode_prompt(tokenizer, p) for p in prompts]
    results = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=progress, warmup=False,
                                   **_paged_cache_for_cpu(model, inputs, max_new_tokens))
    ordered = sorted(results.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[-1]))
    if len(ordered) != len(prompts) or any(r.error for r in ordered):
        errors = sorted({str(r.error) for r in ordered if r.error})
        raise RuntimeError(f"continuous batching returned {len(ordered)} of {len(prompts)} responses"
                           + (f" ({errors})" if errors else "") + "; use method='compact'")
    return [list(r.generated_tokens) for r in ordered]


def _paged_cache_for_cpu(model, inputs: list[list[int]], max_new_tokens: int) -> dict:
    """On a CPU, transformers sizes the paged KV cache of continuous batching to 60% of the machine's RAM, which takes
    tens of seconds to allocate on every call: size it to the run instead (pages for every prompt and its budget).
    A GPU keeps transformers' own sizing."""
    from transformers import ContinuousBatchingConfig

    if model.device.type != "cpu":
        return {}
    page = ContinuousBatchingConfig.page_size
    pages = sum(1 + (len(ids) + max_new_tokens) // page for ids in inputs)
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=pages)}


@torch.no_grad()
def greedy_compact(model, batch: dict[str, torch.Tensor], *, max_new_tokens: int, eos_token_id: int,
                   banned_tokens: list[int] | None = None) -> list[list[int]]:
    """Greedy decoding of one left-padded batch that removes a row from the batch, and from the KV cache
    (``DynamicCache.batch_select_indices``), once it has written end-of-sequence: every step computes only the
    rows still writing, so a batch whose responses differ in length costs what its responses cost, not its
    longest response times its size. Returns each row's generated ids (end-of-sequence included when written).
    Positions and masks are those ``generate`` uses for left padding; the forward hooks of the model (steering,
    ablation) run as in any forward."""
    from transformers import DynamicCache

    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, **keep_last)  # the prompt's last logits only, not [batch, prompt, vocab]
    cache, logits, last = out.past_key_values, out.logits[:, -1], positions[:, -1]
    rows = torch.arange(mask.shape[0], device=mask.device)
    generated: list[list[int]] = [[] for _ in range(mask.shape[0])]
    # as generate's bad_words_ids: the end-of-sequence token is never banned
    banned = torch.tensor([t for t in banned_tokens or [] if t != eos_token_id], dtype=torch.long, device=mask.device)
    for step in range(max_new_tokens):
        if banned.numel():
            logits[:, banned] = -torch.inf
        tokens = logits.argmax(-1)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            generated[row].append(token)
        keep = (tokens != eos_token_id).nonzero().squeeze(-1)
        if step == max_new_tokens - 1 or keep.numel() == 0:
            break
        if keep.numel() < rows.numel():
            cache.batch_select_indices(keep)
            rows, tokens, mask, last = rows[keep], tokens[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        last = last + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return generated


def _decode_row(tokenizer, row: list[int]) -> tuple[str, int]:
    """(text, token count) of one generated row, cut at end-of-sequence, padding dropped."""
    if tokenizer.eos_token_id in row:
        row = row[:row.index(tokenizer.eos_token_id)]
    row = [t for t in row if t != tokenizer.pad_token_id]
    return tokenizer.decode(row), len(row)


def decode_responses(tokenizer, output: torch.Tensor, prompt_width: int) -> list[tuple[str, int]]:
    """(text, token count) of each generated row of ``generate``'s ``output`` (prompt columns dropped)."""
    return [_decode_row(tokenizer, row) for row in output[:, prompt_width:].tolist()]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampled decoding (optional; greedy is the default)."""

    temperature: float = 0.6
    """Softmax temperature (the R1-distill recommendation)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    seed: int = 0
    """Seeds ``torch`` before each batch, so a rerun samples the same responses."""
    n_samples: int = 1
    """Responses sampled per problem (sample s seeded with ``seed + s``); accuracy is then pass@1, the mean over
    samples, with a bootstrap interval over problems (``pass_at_1``)."""

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"SamplingConfig.n_samples must be >= 1, got {self.n_samples}")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


@torch.no_grad()
def generate_sampled(model, tokenizer, prompts: list[str], *, max_new_tokens: int, sampling: SamplingConfig,
                     batch_size: int = 64, progress: bool = True, desc: str = "sample") -> Generation:
    """Like ``generate_greedy`` (left padding, plain ``generate``) but sampled, seeded per batch."""
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    responses, lengths = [], []
    for number, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress,
                                        leave=False)):
        batch = left_padded(tokenizer, prompts[start:start + batch_size], device)
        torch.manual_seed(sampling.seed * 1_000_003 + number)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True,
                                temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for text, length in decode_responses(tokenizer, output, batch["input_ids"].shape[1]):
            responses.append(text)
            lengths.append(length)
    return Generation(list(prompts), responses, lengths)
