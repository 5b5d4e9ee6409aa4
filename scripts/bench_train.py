"""Speed of one training step of the full objective, against the plain target forward+backward on the same batch.

    python scripts/bench_train.py                 # the organism, CPU
    python scripts/bench_train.py --config smoke  # seconds
    python scripts/bench_train.py --shape 7b --device cuda --dtype bfloat16   # 7B-shaped, random weights

Both sides run in the same process on the same batch; the script prints tokens/s of each and their ratio
(the project's bar: the full-objective step costs <= 2.5x the plain target forward+backward).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tdlib.adapter import AdapterSet
from tdlib.splice import splice
from tdlib.train import TrainConfig, objective, trainable_parameters

# DeepSeek-R1-Distill-Qwen-7B's shape (its config.json on the hub), for random-weight runs on a GPU.
SHAPES = {"7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                     tie_word_embeddings=False)}


def organism_models(config: str):
    from tdlib.models import load_hf
    from tdlib.pairs import resolve_pair

    pair = resolve_pair(config)
    return load_hf(pair.base)[0], load_hf(pair.target)[0], load_hf(pair.target)[0]


def random_models(shape: str, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape])
    with torch.device(device):
        models = [Qwen2ForCausalLM(config).to(dtype).eval() for _ in range(2)]
    return models[0], models[1], None


def timed(fn, repeats: int, device) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="organism pair to load (organism or smoke)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    if args.shape:
        base, target, plain = random_models(args.shape, dtype, device)
        plain = target  # the plain baseline runs on the target before it is spliced
    else:
        base, target, plain = organism_models(args.config)
    vocab = target.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = ids.numel()

    def plain_step():
        plain.zero_grad(set_to_none=True)
        out = plain(**batch).logits
        torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), ids.flatten()).backward()

    for p in plain.parameters():
        p.requires_grad_(True)
    plain_seconds = timed(plain_step, args.repeats, device)
    peak_plain = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if plain is target:
        plain.zero_grad(set_to_none=True)

    adapters = AdapterSet.for_model(target, args.n_features)
    for adapter in adapters.adapters.values():  # a trained-looking decoder, so the step does real work
        torch.nn.init.normal_(adapter.W_dec, std=0.01, generator=generator)
    model = splice(target, base, adapters.to(device=device, dtype=dtype))
    del base
    config = TrainConfig(n_features=args.n_features, l1_weight=1e-3)
    parameters = trainable_parameters(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    n_layers = model.config.num_hidden_layers
    cuts = iter(range(10 ** 9))

    def full_step():
        for p in parameters:
            p.grad = None
        objective(model, batch, config, cut=1 + next(cuts) % n_layers).loss.backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    full_seconds = timed(full_step, args.repeats, device)
    what = f"{args.shape} random weights" if args.shape else f"{args.config} pair"
    print(f"{what}, {args.device} {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.n_features} features/layer x {n_layers} layers, torch threads {torch.get_num_threads()}")
    print(f"plain target forward+backward : {plain_seconds * 1e3:8.1f} ms/step  {tokens / plain_seconds:10.0f} tokens/s")
    print(f"full adapter objective step   : {full_seconds * 1e3:8.1f} ms/step  {tokens / full_seconds:10.0f} tokens/s")
    print(f"ratio (full / plain)          : {full_seconds / plain_seconds:.2f}x  (target <= 2.5x)")
    if device.type == "cuda":
        print(f"peak memory: plain {peak_plain / 2**30:.1f} GiB, full objective "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
