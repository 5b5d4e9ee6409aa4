"""Compact greedy decoding (finished rows leave the batch and its KV cache) and continuous batching (finished rows are
refilled with the next prompt) write exactly what ``generate`` writes: on every architecture family, with rows
finishing at different steps, with banned tokens and under steering hooks."""
import pytest
import torch

from families import FAMILIES, family_model
from tdlib.generate import greedy_compact


def left_padded_ids(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 9, 6]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(1, 96, (length,), generator=generator)
        mask[row, -length:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reference(model, batch, steps, eos, banned=None):
    output = model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                            **({"bad_words_ids": [[t] for t in banned]} if banned else {}))
    rows = []
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def an_eos_that_ends_rows_at_different_steps(model, batch, steps):
    """A token some rows write early and others late or never, so that rows finish at different steps."""
    free = model.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=0)[:, batch["input_ids"].shape[1]:]
    counts = torch.bincount(free[:, 1:steps // 2].flatten(), minlength=96)
    return int(counts.argmax())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compact_decoding_writes_what_generate_writes(family):
    model = family_model(family)
    batch = left_padded_ids()
    eos = an_eos_that_ends_rows_at_different_steps(model, batch, 12)
    expected = reference(model, batch, 12, eos)
    assert len({len(r) for r in expected}) > 1  # rows finish at different steps
    assert greedy_compact(model, batch, max_new_tokens=12, eos_token_id=eos) == expected
    banned = [expected[0][0]]
    assert greedy_compact(model, batch, max_new_tokens=12, eos_token_id=eos, banned_tokens=banned) == \
        reference(model, batch, 12, eos, banned)


def test_compact_decoding_under_steering_hooks_and_on_the_organism():
    from tdlib.generate import generate_greedy
    from tdlib.models import load_tokenizer
    from tdlib.organism.build import eval_problems, get_config
    from tdlib.pairs import resolve_pair
    from tdlib.runs import load_named

    pair = resolve_pair("smoke")
    model, tokenizer = load_named(pair, "adapter_l1_0.001"), load_tokenizer(pair.target)
    prompts = [p.prompt for p in eval_problems(get_config("smoke"))[:12]]
    plain = generate_greedy(model, tokenizer, prompts, max_new_tokens=40, batch_size=12, progress=False)
    for method in ("compact", "continuous"):
        assert generate_greedy(model, tokenizer, prompts, max_new_tokens=40, batch_size=5, progress=False,
                               method=method) == plain, method
    layer = next(iter(model.model.layers)).mlp
    handle = layer.register_forward_hook(lambda module, args, output: output * 1.5)
    try:
        steered = generate_greedy(model, tokenizer, prompts, max_new_tokens=40, batch_size=12, progress=False)
        for method in ("compact", "continuous"):
            assert generate_greedy(model, tokenizer, prompts, max_new_tokens=40, batch_size=12, progress=False,
                                   method=method) == steered, method
    finally:
        handle.remove()


def test_the_environment_switches_every_greedy_generation_to_compact(monkeypatch):
    import tdlib.generate as generate
    from tdlib.organism.build import eval_problems, get_config

    calls = []
    real = generate.greedy_compact
    monkeypatch.setattr(generate, "greedy_compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = family_model("qwen2")
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair

    tokenizer = load_tokenizer(resolve_pair("smoke").target)
    model.resize_token_embeddings(len(tokenizer))
    prompts = [p.prompt for p in eval_problems(get_config("smoke"))[:3]]
    plain = generate.generate_greedy(model, tokenizer, prompts, max_new_tokens=5, progress=False)
    assert calls == []
    monkeypatch.setenv(generate.GENERATION_ENV, "compact")
    assert generate.generate_greedy(model, tokenizer, prompts, max_new_tokens=5, progress=False) == plain
    assert calls == [1]
    monkeypatch.setenv(generate.GENERATION_ENV, "paged")
    with pytest.raises(ValueError, match="TDLIB_GENERATION"):
        generate.generate_greedy(model, tokenizer, prompts, max_new_tokens=5, progress=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_continuous_batching_writes_what_generate_writes(family):
    """More prompts than rows in flight, finishing at different steps: each prompt gets generate's tokens, in
    prompt order, whatever order they finished in."""
    from tdlib.generate import generate_greedy

    class Ids:  # a tokenizer over raw ids: "3 5 7" <-> [3, 5, 7]
        bos_token = None
        pad_token_id = -1  # never generated

        def __init__(self, eos):
            self.eos_token_id = eos

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [int(t) for t in text.split()]}

        def decode(self, ids):
            return " ".join(map(str, ids))

    model = family_model(family)
    batch = left_padded_ids()
    eos = an_eos_that_ends_rows_at_different_steps(model, batch, 12)
    prompts = [" ".join(str(t) for t, m in zip(row, mask) if m)
               for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
    expected = [Ids(eos).decode(row[:-1] if row and row[-1] == eos else row) for row in reference(model, batch, 12, eos)]
    continuous = generate_greedy(model, Ids(eos), prompts, max_new_tokens=12, progress=False, method="continuous")
    assert continuous.responses == expected
