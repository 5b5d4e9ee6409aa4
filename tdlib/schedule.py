"""Learning-rate schedule shared by the organism builder and adapter training, and the supervised fine-tune loop
shared by the two pair builders (the organism's, ``tdlib.organism.build``, and the recipe's, ``tdlib.recipe``)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm


def warmup_cosine(steps: int, warmup: float, floor: float = 0.1):
    """Multiplier for ``LambdaLR``: linear warm-up over ``warmup`` of the steps, then cosine decay to ``floor``."""
    warmup_steps = max(1, int(warmup * steps))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def fine_tune_steps(model, parameters: list, loss_at: Callable[[int], "torch.Tensor"], steps: int, lr: float,
                    warmup: float, *, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), desc: str,
                    progress: bool = True) -> list[float]:
    """``steps`` AdamW steps on ``parameters`` of ``model`` (in train mode, left in eval mode): ``loss_at(step)``
    gives the step's loss, the gradient norm is clipped at 1, the learning rate follows ``warmup_cosine``.
    Returns the loss curve."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress)
    for step in bar:
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
