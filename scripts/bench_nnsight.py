"""What reading activations through nnsight costs against plain PyTorch hooks, on the same model and batch.

    python scripts/bench_nnsight.py                     # the organism's target
    python scripts/bench_nnsight.py --config smoke      # seconds
    python scripts/bench_nnsight.py --config smollm2 --batch-size 8 --threads 1

Three ways to run one forward pass over the same left-padded prompts, timed interleaved in one process (medians of
``--repeats``; wall and thread CPU time, ``bench_common.Timer``):

* ``plain``: the transformers model, no capture (the baseline);
* ``hooks``: the same model with forward hooks keeping every layer's MLP input and output
  (``tdlib.residual.capture_mlp_inputs`` and one output hook per MLP): the notebooks' local path;
* ``nnsight``: ``tdlib.remote.collect(..., remote=False)`` on the model wrapped in nnsight's ``LanguageModel``,
  saving the same values: the path that also runs on NDIF with ``remote=True``.

Both capture paths are checked to return the same tensors (at real tokens, to 1e-4 of the largest value) before
anything is timed.
"""
from __future__ import annotations

import argparse

import torch

from bench_common import Timer, pair_or_exit, set_threads


def capture_with_hooks(model, batch) -> dict[str, torch.Tensor]:
    from tdlib.models import anatomy
    from tdlib.residual import capture_mlp_inputs

    outputs: dict[int, torch.Tensor] = {}
    handles = [anatomy(model).mlp(layer).register_forward_hook(
        lambda module, args, output, layer=layer: outputs.__setitem__(layer, output))
        for layer in range(anatomy(model).n_layers)]
    try:
        with torch.no_grad(), capture_mlp_inputs(model) as inputs:
            logits = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    values = {"logits": logits}
    for layer in inputs:
        values[f"mlp_input.{layer}"], values[f"mlp_output.{layer}"] = inputs[layer], outputs[layer]
    return values


def main(argv: list[str] | None = None) -> dict:
    from tdlib.problems import pair_benchmark
    from tdlib.models import load_hf, load_model
    from tdlib.remote import collect

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="a built pair: organism, smoke, smollm2, a pair file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    pair = pair_or_exit(args.config)
    model, tokenizer = load_hf(pair.target, pair.dtype, pair.device)
    tokenizer.padding_side = "left"
    wrapped = load_model(model, tokenizer=tokenizer)
    prompts = pair_benchmark(pair, limit=args.batch_size).prompts(tokenizer)
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)  # as nnsight tokenises them
    sites = ("mlp_input", "mlp_output")

    def plain():
        with torch.no_grad():
            return model(**batch).logits

    def hooks():
        return capture_with_hooks(model, batch)

    def traced():
        return collect(wrapped, prompts, sites=sites, remote=False)

    reference, nnsight_values = hooks(), traced()
    if set(reference) != set(nnsight_values):
        raise SystemExit(f"the two capture paths read different sites: {sorted(set(reference) ^ set(nnsight_values))}")
    real = batch["attention_mask"].bool()  # padded positions hold no token: what a model computes there is moot
    worst = max(((reference[k] - nnsight_values[k])[real].abs().max() / reference[k][real].abs().max()).item()
                for k in reference)
    if worst > 1e-4:
        raise SystemExit(f"the two capture paths disagree (max difference {worst:.2g} of the largest value): the "
                         "prompts were tokenised differently; nothing timed")
    timer = Timer()
    for label, fn in (("plain", plain), ("hooks", hooks), ("nnsight", traced)):  # warm-up
        fn()
    for _ in range(args.repeats):
        for label, fn in (("plain", plain), ("hooks", hooks), ("nnsight", traced)):
            timer.run(label, fn, model.device)
    result = {"config": pair.name, "batch_size": len(prompts), "tokens": int(batch["attention_mask"].sum()),
              "threads": threads, "max_abs_difference": worst}
    print(f"pair {pair.name}, {len(prompts)} prompts ({result['tokens']} tokens), median of {args.repeats}, "
          f"{threads} threads; hooks and nnsight agree to {worst:.1e} of the largest value")
    for label in ("plain", "hooks", "nnsight"):
        wall, cpu = timer.median(label), timer.median(label, "cpu")
        result[label] = {"wall_ms": 1000 * wall, "cpu_ms": 1000 * cpu}
        print(f"{label:8s}: {1000 * wall:9.1f} ms wall, {1000 * cpu:9.1f} ms CPU, "
              f"{wall / timer.median('plain'):.2f}x plain (wall)")
    result["nnsight_over_hooks_wall"] = timer.median("nnsight") / timer.median("hooks")
    print(f"nnsight / hooks: {result['nnsight_over_hooks_wall']:.2f}x wall")
    return result


if __name__ == "__main__":
    main()
