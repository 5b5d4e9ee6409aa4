"""Generation speed with adapters against the plain target, in one run (the project's bar: ratio >= 0.7).

    python scripts/bench_generate.py                    # the organism: target vs its analysis adapter model
    python scripts/bench_generate.py --config smoke     # seconds
    python scripts/bench_generate.py --model adapter_l1_0.001 --batch-size 1
    python scripts/bench_generate.py --config smollm2 --batch-size 8 --new-tokens 64 --threads 1
    python scripts/bench_generate.py --compact --n-prompts 64 --batch-size 16 --new-tokens 200
                                                        # generate vs compact vs continuous batching

Both models run plain ``model.generate`` (greedy, KV cache) on the same held-out prompts; the spliced model's
MLPs are ordinary modules, so there is no per-step Python intervention. Every response is forced to exactly
``--new-tokens`` tokens (``min_new_tokens``), so both sides do the same work. Prints tokens/s of each (median of
``--repeats`` timed runs after a warm-up, interleaved so machine load hits both alike) and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_common import pair_or_exit, set_threads


def tokens_per_second(model, batch, new_tokens: int, pad_token_id: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=pad_token_id)
    if output.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    generated = output.shape[1] - batch["input_ids"].shape[1]
    return output.shape[0] * generated / elapsed


def main(argv: list[str] | None = None) -> dict:
    from tdlib.problems import pair_benchmark
    from tdlib.models import load_tokenizer
    from tdlib.results import read_results
    from tdlib.splice import get_mlp_choice
    from tdlib.runs import load_named, trained_runs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="a built pair: organism, smoke, smollm2, a pair file")
    parser.add_argument("--model", default=None, help="adapter run to time (default: 01's analysis model, else "
                        "the first trained adapter run); with --compact any named model (target, hybrid)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--n-prompts", type=int, default=None, help="with --compact: prompts to generate for "
                        "(default: one batch); more than --batch-size is where continuous batching refills rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compact", action="store_true", help="instead: the adapter model's greedy responses at "
                        "their natural lengths, plain generate against compact decoding (tdlib.generate."
                        "greedy_compact) and continuous batching (greedy_continuous), checked identical")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    pair = pair_or_exit(args.config)
    name = args.model
    if name is None:
        try:
            train = read_results("01_train", args.results_dir)
            name = train["analysis_model"] if train.get("config") == pair.name else None
        except FileNotFoundError:
            pass
        name = name or next((n for n, r in trained_runs(pair).items() if r["kind"] == "adapter"), None)
    if name is None:
        raise SystemExit(f"no trained adapter run for {pair.name!r}; run notebooks/01_train.ipynb first")
    tokenizer = load_tokenizer(pair.target)
    tokenizer.padding_side = "left"
    # as the notebooks render them
    prompts = pair_benchmark(pair, limit=args.n_prompts or args.batch_size).prompts(tokenizer)
    if args.compact:  # any named model, a reference one included: the methods differ in scheduling only
        return compare_methods(load_named(pair, name), tokenizer, prompts, args.new_tokens, args.repeats,
                               args.batch_size)
    target, adapted = load_named(pair, "target"), load_named(pair, name)
    if set(get_mlp_choice(adapted)) != {"adapter"}:
        raise SystemExit(f"{name} is not an all-adapter model (MLP choice {get_mlp_choice(adapted)})")
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(target.parameters()).device)
    speeds = {"target": [], name: []}
    for model in (target, adapted):  # warm-up
        tokens_per_second(model, batch, min(8, args.new_tokens), tokenizer.pad_token_id)
    for _ in range(args.repeats):
        for label, model in (("target", target), (name, adapted)):
            speeds[label].append(tokens_per_second(model, batch, args.new_tokens, tokenizer.pad_token_id))
    target_speed, adapted_speed = statistics.median(speeds["target"]), statistics.median(speeds[name])
    ratio = adapted_speed / target_speed
    print(f"pair {pair.name}, batch {args.batch_size}, {args.new_tokens} new tokens, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"target          : {target_speed:10.1f} tokens/s")
    print(f"{name:16s}: {adapted_speed:10.1f} tokens/s")
    print(f"ratio adapters/target: {ratio:.3f} (bar >= 0.7: {'met' if ratio >= 0.7 else 'MISSED'})")
    return {"target": target_speed, name: adapted_speed, "ratio": ratio}


def compare_methods(model, tokenizer, prompts: list[str], budget: int, repeats: int,
                    batch_size: int | None = None) -> dict:
    """Tokens/s of the same greedy responses (natural lengths, up to ``budget``) from plain ``generate``, compact
    decoding and continuous batching (``tdlib.generate.GREEDY_METHODS``), interleaved, medians; refuses to time
    paths that write different tokens. ``batch_size`` (default: every prompt in one batch) is the batch of the
    two batched paths; continuous batching schedules every prompt itself."""
    from tdlib.generate import GREEDY_METHODS, generate_greedy

    def run(method):
        started = time.perf_counter()
        out = generate_greedy(model, tokenizer, prompts, max_new_tokens=budget,
                              batch_size=batch_size or len(prompts), progress=False, method=method)
        return out, time.perf_counter() - started

    plain, _ = run("generate")
    for method in GREEDY_METHODS[1:]:
        if run(method)[0].responses != plain.responses:
            raise SystemExit(f"{method} decoding wrote different tokens from generate; nothing timed")
    tokens = sum(plain.response_tokens)
    seconds = {m: [] for m in GREEDY_METHODS}
    for _ in range(repeats):
        for method in GREEDY_METHODS:
            seconds[method].append(run(method)[1])
    speeds = {m: tokens / statistics.median(seconds[m]) for m in GREEDY_METHODS}
    lengths = sorted(plain.response_tokens)
    print(f"{len(prompts)} prompts, budget {budget}, batches of {batch_size or len(prompts)}: response lengths "
          f"{lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), identical tokens on every "
          f"path, median of {repeats}, {torch.get_num_threads()} threads")
    for method in GREEDY_METHODS:
        print(f"{method:10s}: {speeds[method]:10.1f} tokens/s  {speeds[method] / speeds['generate']:.2f}x")
    return {**speeds, "speedup": speeds["compact"] / speeds["generate"],
            "speedup_continuous": speeds["continuous"] / speeds["generate"], "tokens": tokens}


if __name__ == "__main__":
    main()
