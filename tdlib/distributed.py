"""Data-parallel adapter training with ``torch.distributed`` (one process per GPU, launched by ``torchrun``).

Each of W ranks holds the whole spliced model, takes its shard of the step's global batch (rows ``rank::W``),
runs the unchanged objective of ``tdlib.train`` on it, and the gradients of the trained parameters are averaged
across ranks (all-reduce) before clipping and the AdamW step, so every rank applies the same update. The loss of
a step is therefore the mean of the per-shard losses (standard DDP semantics); with the paper's one sequence per
rank that is the mean of per-sequence losses. Batches and bridge cuts are functions of the step, so all ranks
draw the same cut and resuming works as in ``tdlib.train``.

The same averaging runs in one process with ``world_size=W`` and no process group: the W shards are then computed
one after the other (gradient accumulation) -- the reference the distributed run must equal, and a way to train
with a W-times larger batch on one GPU.

Launch on N GPUs::

    torchrun --nproc_per_node=N -m tdlib.distributed --config paper-7b --l1-weight 0.001 --steps 50000

Only rank 0 writes the run folder (checkpoints, log, adapters); other ranks checkpoint into ``.rank<r>/`` inside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .models import anatomy, load_tokenizer
from .pair_data import data_for
from .pairs import resolve_pair
from .runs import run_dir, spliced_target, write_run_info
from .splice import attach_adapters
from .sweep import adapter_run_name, default_plan
from .train import TrainConfig, TrainResult, cut_for_step, local_mse_objective, new_adapters, objective, train


class ShardedBatches:
    """Rows ``rank::world_size`` of another source's step batch (padding columns no row uses are dropped)."""

    def __init__(self, data, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.data, self.rank, self.world_size = data, rank, world_size

    def full_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The whole step batch, every shard: what one-time statistics (the local-MSE transcoder's starting
        ``b_dec``) are computed from, so every rank starts from the same weights."""
        return self.data.batch(step)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        full = self.data.batch(step)
        rows = full["input_ids"].shape[0]
        if rows % self.world_size:
            raise ValueError(f"the step batch has {rows} sequences, not divisible by world_size={self.world_size}; "
                             "set batch_size to a multiple of the number of processes")
        shard = {name: tensor[self.rank::self.world_size] for name, tensor in full.items()}
        width = int(shard["attention_mask"].sum(-1).max())
        return {name: tensor[:, :width] for name, tensor in shard.items()}


def _step_objective(model, batch, config: TrainConfig, step: int):
    if config.kind == "local_mse":
        return local_mse_objective(model, batch, config)
    return objective(model, batch, config, cut_for_step(config, anatomy(model).n_layers, step))


def all_reduce_mean(step: int, parameters) -> None:
    """Average gradients across the process group, in place (no extra copy of the gradients)."""
    world = dist.get_world_size()
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def accumulate_shards(model, data, config: TrainConfig, world_size: int):
    """A hook that adds the gradients of shards 1..W-1 of the step batch to shard 0's, then averages: one process
    doing what W data-parallel ranks do together."""
    shards = [ShardedBatches(data, rank, world_size) for rank in range(world_size)]

    def hook(step: int, parameters) -> None:
        for shard in shards[1:]:
            _step_objective(model, shard.batch(step), config, step).loss.backward()
        for p in parameters:
            if p.grad is not None:
                p.grad.div_(world_size)
    return hook


def train_data_parallel(model, data, config: TrainConfig, run_dir: str | Path, world_size: int | None = None,
                        progress: bool = True) -> TrainResult:
    """``tdlib.train.train`` over W data-parallel shards of each step's batch (``config.batch_size`` is the
    global batch). Inside an initialised process group W is its size; otherwise ``world_size`` shards are
    accumulated in this process."""
    run_dir = Path(run_dir)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if world_size not in (None, world):
            raise ValueError(f"world_size={world_size} but the process group has {world} processes")
        for p in model.parameters():  # identical start on every rank, whatever each process's seed did
            dist.broadcast(p.data, src=0)
        own_dir = run_dir if rank == 0 else run_dir / f".rank{rank}"
        return train(model, ShardedBatches(data, rank, world), config, own_dir, progress=progress and rank == 0,
                     after_backward=all_reduce_mean)
    world = world_size or 1
    if world == 1:
        return train(model, data, config, run_dir, progress=progress)
    return train(model, ShardedBatches(data, 0, world), config, run_dir, progress=progress,
                 after_backward=accumulate_shards(model, data, config, world))


# ----------------------------------------------------------------------------------------------- launcher

def init_from_env() -> tuple[int, int, str]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with one
    GPU per process when CUDA is available, gloo on CPU. Returns (rank, world size, device)."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: launch with "
                           "'torchrun --nproc_per_node=N -m tdlib.distributed ...'")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def run_config(pair, l1_weight: float | None = None, world_size: int = 1, steps: int | None = None,
               batch_size: int | None = None, kl_chunk_tokens: int | None = None,
               gradient_checkpointing: bool | None = None) -> TrainConfig:
    """The ``TrainConfig`` of one data-parallel adapter run: notebook 01's run at ``l1_weight`` for this pair
    (``tdlib.sweep.default_plan``; None: its first), with ``batch_size`` global (default: ``world_size`` x the
    pair's) and each given option in place of the pair's default."""
    plan = default_plan(pair)
    l1_weight = plan.l1_weights[0] if l1_weight is None else l1_weight
    wanted = adapter_run_name(l1_weight)
    spec = next((spec for spec in plan.specs if spec.name == wanted), None)
    config = spec.config if spec else replace(plan.specs[0].config, l1_weight=l1_weight)
    chosen = {"steps": steps, "batch_size": batch_size or world_size * config.batch_size,
              "kl_chunk_tokens": kl_chunk_tokens, "gradient_checkpointing": gradient_checkpointing}
    return replace(config, **{k: v for k, v in chosen.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    """Train one adapter run of a pair data-parallel; rank 0 saves it where ``tdlib.sweep`` finds it."""
    parser = argparse.ArgumentParser(description="data-parallel adapter training (launch with torchrun)")
    parser.add_argument("--config", default="organism", help="pair configuration (tdlib.pairs)")
    parser.add_argument("--l1-weight", type=float, default=None, help="default: the first of the pair's "
                        "sweep; a value of the sweep trains notebook 01's run of that name, any other a new run")
    parser.add_argument("--steps", type=int, default=None, help="default: the pair's training default")
    parser.add_argument("--batch-size", type=int, default=None, help="GLOBAL sequences per step (default: W x the "
                        "pair's per-process default)")
    parser.add_argument("--max-tokens", type=int, default=None, help="truncate training sequences (hub pairs; "
                        "default: the pair's, 10k for paper-7b; see docs/memory_plan.md for what fits)")
    parser.add_argument("--kl-chunk-tokens", type=int, default=None,
                        help="head and KL this many tokens at a time (default: the pair's; 1024 for paper-7b)")
    parser.add_argument("--gradient-checkpointing", type=int, choices=(0, 1), default=None,
                        help="1: recompute layers in the backward pass (default: the pair's; on for paper-7b)")
    parser.add_argument("--root", default=None, help="folder of run folders (default: artifacts/train/<pair key>)")
    args = parser.parse_args(argv)
    rank, world, device = init_from_env()
    pair = resolve_pair(args.config, build=rank == 0)
    dist.barrier()
    pair = dataclasses.replace(resolve_pair(args.config), device=device)
    config = run_config(pair, args.l1_weight, world, steps=args.steps, batch_size=args.batch_size,
                        kl_chunk_tokens=args.kl_chunk_tokens, gradient_checkpointing=None
                        if args.gradient_checkpointing is None else bool(args.gradient_checkpointing))
    model = spliced_target(pair)
    adapters = new_adapters(model, config, meta={"run": adapter_run_name(config.l1_weight),
                                                 "train_config": asdict(config)})
    attach_adapters(model, adapters)
    data = data_for(pair, load_tokenizer(pair.target), "train", batch_size=config.batch_size, seed=config.seed)
    if args.max_tokens:
        if not hasattr(data, "max_tokens"):
            raise ValueError(f"--max-tokens applies to reasoning-trace data, not to {type(data).__name__}")
        data.max_tokens = args.max_tokens
    name = adapter_run_name(config.l1_weight)
    directory = run_dir(pair, name, Path(args.root) if args.root else None)
    started = time.time()
    result = train_data_parallel(model, data, config, directory)
    if rank == 0:
        adapters.save(directory / "adapters")
        write_run_info(directory, pair, name, config, result, time.time() - started, world_size=world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
