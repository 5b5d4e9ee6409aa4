"""Speed of one training step of the full objective against a plain training step of the target, in one run.

    python scripts/bench_train.py --shape organism --threads 1            # the organism's shape, random weights
    python scripts/bench_train.py --config smoke                          # a built pair (organism, smoke, smollm2)
    python scripts/bench_train.py --shape smollm2 --batch-size 1 --seq-len 216 --threads 1   # SmolLM2-135M's shape
    python scripts/bench_train.py --shape 7b --device cuda --dtype bfloat16

The two sides, on the same batch (random token ids; speed does not depend on which tokens):

* plain unit: a separate copy of the target, in train mode with every weight trainable: forward (no KV cache) +
  next-token cross-entropy over every position + backward over all weights. What one step of ordinary training of
  the target costs.
* full objective step: ``tdlib.train.objective`` + backward on the spliced target (base MLP + adapter in every
  layer, adapters trainable): the target's pass (no grad), the adapter pass, the two bridges from cut k (layers
  above k only), NMSE over L+1 hidden states and the decoder-norm-weighted L1. Its cost depends on k, so each
  cycle runs every cut of an evenly spread set over min_cut..L (all of them for L <= 8) once.

Timing: a cycle is (plain, full at cut k) for each k of the set, interleaved; the full step's time is its mean over
a cycle (the expectation under uniform cuts), the plain unit's its mean over the same cycle; reported are medians
over cycles, in wall time and, on a CPU, the thread's CPU time (``bench_common``). The warm-up cycle counts matmul
FLOPs (``torch.utils.flop_counter``): their ratio is what the arithmetic allows, and the report says how far the
measured ratio is from it. The project's bar: full step <= 2.0x the plain unit.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from bench_common import SHAPES, Timer, pair_or_exit, random_model, set_threads


def cut_set(n_layers: int, min_cut: int, n: int | None) -> list[int]:
    """``n`` cuts spread evenly over min_cut..n_layers (symmetric, so their mean is the uniform mean); all of them
    when ``n`` is None and there are at most 8."""
    every = list(range(min_cut, n_layers + 1))
    if n is None:
        n = len(every) if len(every) <= 8 else 6
    if n >= len(every):
        return every
    return sorted({round(min_cut + i * (n_layers - min_cut) / (n - 1)) for i in range(n)})


def load_models(args, dtype, device):
    """(base, target, plain copy of the target, description)."""
    if args.shape:
        base, target = random_model(args.shape, 0, dtype, device), random_model(args.shape, 1, dtype, device)
        return base, target, copy.deepcopy(target), f"{args.shape} shape, random weights"
    from tdlib.models import load_hf

    pair = pair_or_exit(args.config)
    base, target = load_hf(pair.base, args.dtype, args.device)[0], load_hf(pair.target, args.dtype, args.device)[0]
    return base, target, copy.deepcopy(target), f"{pair.name} pair"


def matmul_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    from tdlib.adapter import AdapterSet
    from tdlib.splice import splice
    from tdlib.train import TrainConfig, objective, trainable_parameters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="organism", help="a built pair: organism, smoke, smollm2, a pair file")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of a pair")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=512, help="adapter features per layer")
    parser.add_argument("--min-cut", type=int, default=1, choices=[0, 1], help="TrainConfig.min_cut")
    parser.add_argument("--cuts", type=int, default=None, help="cuts per cycle (default: all when L <= 8, else 6)")
    parser.add_argument("--cycles", type=int, default=3, help="timed cycles (after one warm-up cycle)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-flops", action="store_true", help="skip counting FLOPs in the warm-up cycle")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    base, target, plain, what = load_models(args, dtype, device)
    ids = torch.randint(0, target.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = ids.numel()

    plain.train()
    for p in plain.parameters():
        p.requires_grad_(True)

    def plain_step():
        plain.zero_grad(set_to_none=True)
        logits = plain(**batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()

    adapters = AdapterSet.for_model(target, args.n_features)
    generator = torch.Generator().manual_seed(0)
    for adapter in adapters.adapters.values():  # a trained-looking decoder, so the step does real work
        torch.nn.init.normal_(adapter.W_dec, std=0.01, generator=generator)
    model = splice(target, base, adapters.to(device=device, dtype=dtype))
    del base
    config = TrainConfig(n_features=args.n_features, l1_weight=1e-3, min_cut=args.min_cut)
    parameters = trainable_parameters(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    model.train()
    n_layers = model.config.num_hidden_layers
    cuts = cut_set(n_layers, args.min_cut, args.cuts)

    def full_step(cut):
        for p in parameters:
            p.grad = None
        objective(model, batch, config, cut=cut).loss.backward()

    flops_plain, flops_full = [], []
    for cut in cuts:  # warm-up cycle
        if args.no_flops:
            plain_step(), full_step(cut)
        else:
            flops_plain.append(matmul_flops(plain_step))
            flops_full.append(matmul_flops(lambda: full_step(cut)))
    timer = Timer()
    cycles = {"plain": {"wall": [], "cpu": []}, "full": {"wall": [], "cpu": []}}
    for _ in range(args.cycles):
        start = {label: len(timer.wall.get(label, [])) for label in ("plain", "full")}
        for cut in cuts:
            timer.run("plain", plain_step, device)
            timer.run("full", lambda: full_step(cut), device)
        for label in ("plain", "full"):
            for clock in ("wall", "cpu"):
                cycles[label][clock].append(statistics.mean(getattr(timer, clock)[label][start[label]:]))
    result = {label: {clock: statistics.median(values) for clock, values in clocks.items()}
              for label, clocks in cycles.items()}
    result.update(tokens=tokens, threads=threads, cuts=cuts, what=what,
                  ratio_wall=result["full"]["wall"] / result["plain"]["wall"],
                  ratio_cpu=result["full"]["cpu"] / result["plain"]["cpu"])
    if flops_plain:
        result["flops_plain"], result["flops_full"] = statistics.mean(flops_plain), statistics.mean(flops_full)
        result["ratio_flops"] = result["flops_full"] / result["flops_plain"]
    report(args, result, n_layers, device)
    return result


def report(args, result: dict, n_layers: int, device) -> None:
    cpu = device.type == "cpu"
    print(f"{result['what']}, {args.device} {args.dtype}, batch {args.batch_size} x {args.seq_len} = "
          f"{result['tokens']} tokens, {args.n_features} features/layer x {n_layers} layers, torch threads "
          f"{result['threads']}")
    print(f"cuts per cycle {result['cuts']} (min_cut {args.min_cut}), {args.cycles} timed cycles after a warm-up, "
          "plain and full interleaved")
    print("plain unit: a separate copy of the target, train mode, every weight trainable: forward (no KV cache) + "
          "next-token cross-entropy + backward over all weights")
    header = f"{'':24s}{'wall ms/step':>14s}{'tokens/s':>11s}" + (f"{'cpu ms/step':>13s}" if cpu else "")
    print(header + (f"{'matmul GFLOP':>14s}" if "flops_plain" in result else ""))
    for label, name in (("plain", "plain unit"), ("full", "full objective step")):
        row = f"{name:24s}{result[label]['wall'] * 1e3:14.1f}{result['tokens'] / result[label]['wall']:11.0f}"
        row += f"{result[label]['cpu'] * 1e3:13.1f}" if cpu else ""
        row += f"{result['flops_' + label] / 1e9:14.2f}" if "flops_plain" in result else ""
        print(row)
    line = f"ratio full / plain: wall {result['ratio_wall']:.2f}x"
    line += f", cpu {result['ratio_cpu']:.2f}x" if cpu else ""
    if "ratio_flops" in result:
        line += (f"; the arithmetic (matmul FLOPs) allows {result['ratio_flops']:.2f}x, so the step runs at "
                 f"{result['ratio_flops'] / (result['ratio_cpu'] if cpu else result['ratio_wall']):.0%} of the plain "
                 "unit's FLOP rate")
    print(line + f" (bar <= 2.0x: {'met' if (result['ratio_cpu'] if cpu else result['ratio_wall']) <= 2.0 else 'MISSED'})")


if __name__ == "__main__":
    main()
