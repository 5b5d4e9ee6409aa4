"""The GPU acceptance run: what the project so far only forecasts (the 7B memory plan, training and generation
speed, the cost of an attribution graph), measured in one command on one GPU, in under 8 minutes on an H100.

    PYTHONPATH=. python scripts/gpu_acceptance.py --out gpu_acceptance.json     # a fresh GPU machine, < 8 min
    python scripts/gpu_acceptance.py --cpu-tiny --out /tmp/tiny.json             # every section, tiny shapes, CPU
    python scripts/gpu_acceptance.py --sections generate --budget-s 540       # generation alone, up to 4096 tokens

It needs only torch, transformers and safetensors (no nnsight, papermill, pandas, matplotlib or datasets) and no
model hub: every model is built from its config with random weights (bf16 on the GPU), since what is measured is
shape and cost. The base is the target's own config with its MLPs drawn again (``random_adapter_model``).

Sections, in this order (the forecast that matters most first, the one whose length adapts to the time left last).
Each runs in its own try/except (an error is recorded and the run goes on), GPU memory is freed after each, and the
JSON (``--out``) is rewritten atomically after each, so a run cut short keeps what it did:

* ``train/paper-7b``, ``train/paper-1.5b``: training steps of the paper's objective (``tdlib.train.objective``:
  output KL, both bridges, NMSE, L1; then backward, clipping and AdamW, as ``tdlib.train.train`` does) at the pair's
  training defaults (``tdlib.pairs``: 8192 / 4096 features per layer, one sequence of 10k tokens, layer
  checkpointing, the KL in 1024-token chunks), at the cut k=1 the memory plan assumes (the worst case: both
  bridges run L-1 layers). Seconds per step, tokens/s and peak memory beside the plan's forecast for the same step
  (``tdlib.memory.plan_memory``, adapters in the model's dtype as ``tdlib.splice.attach_adapters`` casts them) and
  beside the fp32-adapter forecast of docs/memory_plan.md. On out-of-memory the length is halved and tried again,
  so the record says where a step stops fitting.
* ``attribution/paper-7b``: one graph (``tdlib.attribution.attribute``) of a 512-token prompt in every mode of
  ``tdlib.attribution.MODES``, at notebook 05's caps (``StudyConfig``), adapters set to about 8 active features per
  token and layer: seconds, peak memory, active features.
* ``generate/paper-1.5b`` (and ``generate/paper-7b`` with ``--gen-7b``): greedy decoding of two batches' worth of
  prompts on the adapter model by plain ``generate``, compact decoding and continuous batching
  (``tdlib.generate.generate_greedy(method=...)``). A short run first checks that the three write the same tokens
  (recorded, never fatal); then one run of each at reasoning length: ``--gen-new-tokens`` (4096), or as many as the
  time left (``--gen-seconds``, default: the rest of the budget) affords, judged from the short run. Random weights
  never end a response by themselves, so a stop rule does (``stop_rule``).

``--budget-s`` (default 450) bounds the run: a section (or a training length, or a graph mode) that would start
after the budget is spent is recorded as skipped. Without a GPU the script refuses to start unless ``--cpu-tiny``
is given, which runs every section at tiny shapes in float32 on the CPU in seconds (what tests/test_gpu_acceptance.py
runs). The exit status is 1 when a section failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import Timer  # noqa: E402
from tdlib.adapter import AdapterSet  # noqa: E402
from tdlib.attribution import MODES, StudyConfig, attribute  # noqa: E402
from tdlib.generate import GREEDY_METHODS, generate_greedy  # noqa: E402
from tdlib.memory import GB, SHAPES, MemoryPlanConfig, ModelShape, plan_memory  # noqa: E402
from tdlib.models import unwrap  # noqa: E402
from tdlib.pair_config import TrainingDefaults  # noqa: E402
from tdlib.pairs import HUB_PAIRS  # noqa: E402
from tdlib.residual import capture_mlp_inputs  # noqa: E402
from tdlib.results import atomic_write_text, resolve  # noqa: E402
from tdlib.splice import enable_gradient_checkpointing, set_mlp_choice, splice, spliced_mlps  # noqa: E402
from tdlib.train import objective, trainable_parameters  # noqa: E402

WORST_CUT = 1
"""The bridge cut of every timed training step: the memory plan's worst case (both bridges run L-1 layers)."""
SECTIONS = ("train", "attribution", "generate")


@dataclass(frozen=True)
class Scale:
    """Every size the run uses: the paper's (``PAPER``) or tiny ones for a CPU (``TINY``, ``--cpu-tiny``)."""

    device: str
    dtype: torch.dtype
    shapes: dict[str, ModelShape]
    """Pair name -> the shape its models are built with."""
    training: dict[str, TrainingDefaults]
    """Pair name -> its training defaults (features per layer, sequence length, memory switches)."""
    train_tokens: int | None
    """Length of the training sequence tried first; None: the pair's ``max_tokens`` (10k)."""
    timed_steps: int
    """Training steps timed after the warm-up step."""
    gen_batch: int
    """Batch of plain ``generate`` and compact decoding; twice as many prompts are decoded, so continuous batching
    has rows to refill."""
    gen_prompt_tokens: int
    """Longest generation prompt; prompts run from half this to this (left padding is exercised)."""
    check_new_tokens: int
    """Budget of the short run that checks the three decoding paths write the same tokens."""
    gen_new_tokens: int
    """Budget of the timed run at reasoning length (shortened to what ``gen_seconds`` affords)."""
    gen_seconds: float | None
    """Seconds the timed generation runs of one pair may take together; None: the rest of the run's budget (shared
    equally by the pairs still to generate)."""
    attribution_prompt_tokens: int
    attribution_l0: float
    """Active features per token and layer the adapters are set to (a random encoder activates half of them)."""
    attribution_max_feature_nodes: int | None
    attribution_batch_size: int


PAPER = Scale(
    device="cuda", dtype=torch.bfloat16, shapes=SHAPES,
    training={name: HUB_PAIRS[name].training for name in SHAPES}, train_tokens=None, timed_steps=2,
    gen_batch=32, gen_prompt_tokens=96, check_new_tokens=64, gen_new_tokens=4096, gen_seconds=None,
    attribution_prompt_tokens=512, attribution_l0=8.0,
    attribution_max_feature_nodes=StudyConfig().max_feature_nodes, attribution_batch_size=StudyConfig().batch_size)
TINY_SHAPE = ModelShape("tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                        source="--cpu-tiny: seconds on a CPU")
TINY_TRAINING = TrainingDefaults.of(n_features=32, max_tokens=48, kl_chunk_tokens=16)
TINY = Scale(
    device="cpu", dtype=torch.float32, shapes={name: TINY_SHAPE for name in SHAPES},
    training={name: TINY_TRAINING for name in SHAPES}, train_tokens=None, timed_steps=2,
    gen_batch=4, gen_prompt_tokens=8, check_new_tokens=8, gen_new_tokens=16, gen_seconds=None,
    attribution_prompt_tokens=16, attribution_l0=4.0, attribution_max_feature_nodes=32, attribution_batch_size=16)


@dataclass
class Budget:
    """The run's time budget in seconds, counted from its creation."""

    total_s: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.total_s - self.elapsed()


# ------------------------------------------------------------------------------------------ device helpers

def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak memory torch allocated (and reserved) since the last ``reset_peak``, in GB (1e9 bytes, as the memory
    plan); None on a CPU. Allocated excludes the CUDA context, which the plan's 3 GB runtime allowance covers."""
    if device.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_record(device: torch.device) -> dict:
    import transformers

    record = {"type": device.type, "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        record.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      memory_gb=torch.cuda.get_device_properties(device).total_memory / GB)
    return record


def error_record(error: BaseException) -> dict:
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=-8)}


# ------------------------------------------------------------------------------------------------- models

def random_adapter_model(shape: ModelShape, n_features: int, device: torch.device, dtype: torch.dtype,
                         seed: int = 0):
    """The target of ``shape`` with random weights, spliced (``tdlib.splice``): per layer its MLP, a base MLP and
    an adapter. Only one backbone is built: the target is spliced with itself (``splice`` keeps only the base's MLPs,
    copies) and those copies are drawn again, so the base MLPs are a second random init. That is the model the memory
    plan counts (``tdlib.memory.build_meta_spliced``: target, base MLPs, adapters). Decoders get small random weights
    (as in scripts/bench_train.py) so the adapter branch does a trained adapter's work."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        target = AutoModelForCausalLM.from_config(shape.qwen2_config(), dtype=dtype)
    model = splice(target, target, AdapterSet.for_model(target, n_features, seed=seed))
    generator = torch.Generator(device).manual_seed(seed + 1)
    std = target.config.initializer_range
    with torch.no_grad():
        for mlp in spliced_mlps(model):
            for weight in mlp.base_mlp.parameters():
                weight.normal_(0.0, std, generator=generator)
            mlp.adapter.W_dec.normal_(0.0, 0.01, generator=generator)
    return model.eval()


def random_ids(vocab_size: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """[length] token ids, never 0 or 1 (``NumberTokenizer``'s special ids)."""
    return torch.randint(2, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------------------------- training

def memory_forecast(shape: ModelShape, n_features: int, tokens: int, kl_chunk_tokens: int,
                    weight_dtype: str, adapter_dtype: str) -> dict:
    """The memory plan's total for one step (``tdlib.memory.plan_memory``, a meta-device dry run of the same
    objective) under layer checkpointing + chunked KL, the strategy the pairs' training defaults switch on."""
    try:
        plan = plan_memory(MemoryPlanConfig(shape=shape, n_features=n_features, seq_tokens=tokens,
                                            kl_chunk_tokens=kl_chunk_tokens, weight_dtype=weight_dtype,
                                            adapter_dtype=adapter_dtype))
    except ValueError as error:  # e.g. a length equal to a model dimension, which the plan cannot tell apart
        return {"gb": None, "error": str(error)}
    strategy = plan.strategies[-1]
    return {"gb": strategy.total_gb, "strategy": strategy.name, "static_gb": plan.static_total_gb,
            "runtime_allowance_gb": plan.config["runtime_overhead_gb"]}


def training_attempt(model, config, parameters, optimizer, tokens: int, scale: Scale) -> dict:
    """One warm-up step (it also allocates AdamW's states), then ``scale.timed_steps`` timed steps on one
    ``tokens``-long sequence; ``fits`` False when the GPU runs out of memory."""
    device = torch.device(scale.device)
    ids = random_ids(model.config.vocab_size, tokens, tokens, device)[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    losses, timer = [], Timer()

    def step():
        result = objective(model, batch, config, cut=WORST_CUT)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(result.loss.detach()))

    reset_peak(device)
    try:
        step()
        for _ in range(scale.timed_steps):
            timer.run("step", step, device)
    except torch.OutOfMemoryError as error:
        failure = str(error)[:300]
    else:
        seconds = statistics.median(timer.wall["step"])
        return {"tokens": tokens, "fits": True, "seconds_per_step": seconds, "tokens_per_s": tokens / seconds,
                "loss": losses[-1], **peak_memory(device)}
    # out of the except block: the failed step's tensors went with the exception
    optimizer.zero_grad(set_to_none=True)
    free_memory(device)
    return {"tokens": tokens, "fits": False, "error": failure, **peak_memory(device)}


def halving_attempts(start_tokens: int, attempt, budget: Budget) -> list[dict]:
    """``attempt(tokens)`` from ``start_tokens``, halving the length after each one that does not fit, until one
    fits, the length reaches 0 or the budget is spent."""
    attempts, tokens = [], start_tokens
    while tokens >= 1:
        if budget.left() <= 0:
            attempts.append({"tokens": tokens, "skipped": "the time budget was spent"})
            break
        attempts.append(attempt(tokens))
        if attempts[-1]["fits"]:
            break
        tokens //= 2
    return attempts


def fit_summary(attempts: list[dict]) -> dict:
    """The longest length that fit and the shortest that did not (None when none did / all did)."""
    tried = [a for a in attempts if "fits" in a]
    return {"fits_tokens": max((a["tokens"] for a in tried if a["fits"]), default=None),
            "stops_fitting_tokens": min((a["tokens"] for a in tried if not a["fits"]), default=None)}


def train_section(pair: str, scale: Scale, budget: Budget) -> dict:
    shape, training = scale.shapes[pair], scale.training[pair]
    device, dtype_name = torch.device(scale.device), str(scale.dtype).removeprefix("torch.")
    config = training.train_config()
    model = random_adapter_model(shape, config.n_features, device, scale.dtype)
    # what tdlib.train.train does before its loop
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    parameters = trainable_parameters(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    model.train()
    weights_gb = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None
    forecast = partial(memory_forecast, shape, config.n_features, kl_chunk_tokens=config.kl_chunk_tokens,
                       weight_dtype=dtype_name)

    def attempt(tokens):
        result = training_attempt(model, config, parameters, optimizer, tokens, scale)
        return {**result, "forecast": forecast(tokens, adapter_dtype=dtype_name)}

    start = scale.train_tokens or training.max_tokens
    attempts = halving_attempts(start, attempt, budget)
    return {"shape": shape.name, "features": config.n_features, "dtype": dtype_name,
            "gradient_checkpointing": config.gradient_checkpointing, "kl_chunk_tokens": config.kl_chunk_tokens,
            "cut": WORST_CUT, "weights_gb": weights_gb, "attempts": attempts, **fit_summary(attempts),
            "forecast_fp32_adapters": forecast(start, adapter_dtype="float32")}


# --------------------------------------------------------------------------------------------- generation

class NumberTokenizer:
    """A tokenizer for random-weight models: a text is its token ids written as numbers ("17 4 902"), so
    ``tdlib.generate`` runs on any vocabulary with nothing downloaded. Id 1 ends a sequence and pads."""

    bos_token = None
    eos_token_id = pad_token_id = 1
    padding_side = "left"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(token) for token in text.split()]}

    def decode(self, ids) -> str:
        return " ".join(str(int(token)) for token in ids)


STOP_HASH = 7919


@contextmanager
def stop_rule(model, eos_token_id: int, period: int):
    """End responses at varied lengths below about ``period`` tokens. A random-weight model never writes
    end-of-sequence by itself (greedy decoding falls into a loop of a few tokens), so every row would run to the
    budget and the decoding paths would not differ in what they are for. Here, wherever
    ``(token * STOP_HASH + position) % period == 0``, the final hidden state becomes the head's end-of-sequence row,
    so the next token is end-of-sequence: a looping row ends within ``period`` tokens, at a place its own tokens set.
    The rule reads only a token and its position, which plain ``generate``, compact decoding and continuous batching
    (sequences packed along one axis) give every sequence alike, so the three must still write the same tokens."""
    decoder = unwrap(model).get_decoder()
    eos_row = unwrap(model).get_output_embeddings().weight[eos_token_id].detach()
    current = {}

    def read_ids(module, args, kwargs):
        current["ids"] = kwargs["input_ids"]

    def read_positions(module, args, kwargs):
        current["positions"] = args[1] if len(args) > 1 else kwargs["position_ids"]

    def stop(module, args, output):
        fire = (current["ids"] * STOP_HASH + current["positions"]) % period == 0
        return torch.where(fire[..., None], eos_row.to(output.dtype), output)

    handles = [decoder.register_forward_pre_hook(read_ids, with_kwargs=True),
               decoder.rotary_emb.register_forward_pre_hook(read_positions, with_kwargs=True),
               decoder.norm.register_forward_hook(stop)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decode_each_method(model, prompts: list[str], new_tokens: int, methods, batch_size: int,
                       device: torch.device) -> dict:
    """Per method: seconds, tokens written and each response, or the error it raised; responses end by the stop
    rule at lengths spread up to the budget."""
    tokenizer, runs = NumberTokenizer(), {}
    with stop_rule(model, tokenizer.eos_token_id, period=new_tokens):
        for method in methods:
            timer = Timer()
            reset_peak(device)
            try:
                generation = timer.run(method, lambda: generate_greedy(
                    model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size, progress=False,
                    method=method), device)
            except Exception as error:  # noqa: BLE001 - one path's failure is a result, not the end of the section
                runs[method] = error_record(error)
                continue
            seconds = timer.wall[method][0]
            runs[method] = {"seconds": seconds, "tokens": sum(generation.response_tokens),
                            "tokens_per_s": sum(generation.response_tokens) / seconds,
                            "lengths": generation.response_tokens, "responses": generation.responses,
                            **peak_memory(device)}
    return runs


def first_divergence(response: str, reference: str) -> int | None:
    """The index of the first generated token where two responses differ (None when they are equal)."""
    if response == reference:
        return None
    tokens, expected = response.split(), reference.split()
    return next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))


def token_check(runs: dict) -> dict:
    """Whether compact decoding and continuous batching wrote exactly plain ``generate``'s tokens; where not, how
    many rows differ and the earliest token at which one does (a late one points at a near-tie of two logits)."""
    reference = runs["generate"].get("responses")
    differing, earliest = {}, {}
    for method, run in runs.items():
        if method == "generate" or reference is None or "responses" not in run:
            continue
        where = [i for i in map(first_divergence, run["responses"], reference) if i is not None]
        differing[method], earliest[method] = len(where), min(where, default=None)
    compared = reference is not None and len(differing) == len(runs) - 1
    return {"identical_tokens": compared and not any(differing.values()), "rows_differing": differing,
            "first_divergence": earliest,
            "errors": {method: run["error"] for method, run in runs.items() if "error" in run}}


CONTEXT_MARGIN = 1.5
"""How much slower per token a decoding step may be at reasoning length than in the short check run (a longer KV
cache to read, rows running to the budget): the margin ``affordable_new_tokens`` keeps."""


def affordable_new_tokens(check: dict, check_tokens: int, seconds: float, requested: int) -> int:
    """The longest budget, at most ``requested`` and a multiple of ``check_tokens``, whose runs by every method
    that worked fit in ``seconds``, judged from the check run (a run's time grows with its budget); 0: none."""
    spent = sum(run["seconds"] for run in check.values() if "seconds" in run)
    affordable = int(seconds / (CONTEXT_MARGIN * spent / check_tokens))
    return min(requested, affordable // check_tokens * check_tokens)


def length_summary(lengths: list[int], budget: int) -> dict:
    ordered = sorted(lengths)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1],
            "mean": statistics.mean(ordered), "hit_budget_share": sum(n >= budget for n in ordered) / len(ordered)}


def generation_section(pair: str, scale: Scale, budget: Budget, sharing: int = 1) -> dict:
    """``sharing``: how many generation sections (this one included) share what is left of the budget."""
    shape, training = scale.shapes[pair], scale.training[pair]
    device = torch.device(scale.device)
    model = random_adapter_model(shape, training.run.n_features, device, scale.dtype)
    set_mlp_choice(model, "adapter")
    n_prompts = 2 * scale.gen_batch
    lengths = torch.randint(scale.gen_prompt_tokens // 2, scale.gen_prompt_tokens + 1, (n_prompts,),
                            generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [NumberTokenizer().decode(random_ids(shape.vocab_size, n, i, torch.device("cpu")))
               for i, n in enumerate(lengths)]
    decode = partial(decode_each_method, model, prompts, batch_size=scale.gen_batch, device=device)
    check = decode(scale.check_new_tokens, GREEDY_METHODS)
    record = {"shape": shape.name, "features": training.run.n_features, "prompts": n_prompts, "batch": scale.gen_batch,
              "prompt_tokens": [min(lengths), max(lengths)],
              "check": {"new_tokens": scale.check_new_tokens, **token_check(check)},
              "requested_new_tokens": scale.gen_new_tokens}
    working = [method for method in GREEDY_METHODS if "seconds" in check[method]]
    seconds = min(scale.gen_seconds or budget.left() / sharing, budget.left())
    new_tokens = affordable_new_tokens(check, scale.check_new_tokens, seconds, scale.gen_new_tokens) if working else 0
    if new_tokens < 1:
        return {**record, "timed": {"skipped": f"{seconds:.0f} s do not afford a run of every method"}}
    timed = decode(new_tokens, working)
    timed_check = token_check(timed) if "generate" in timed else None
    reference = timed.get("generate", {}).get("seconds")
    for run in timed.values():
        run.pop("responses", None)
        if "lengths" in run:
            run["lengths"] = length_summary(run["lengths"], new_tokens)
        if reference and "seconds" in run:
            run["vs_generate"] = reference / run["seconds"]
    return {**record, "new_tokens": new_tokens, "seconds_allowed": seconds, "timed": timed,
            "timed_check": timed_check}


# -------------------------------------------------------------------------------------------- attribution

@torch.no_grad()
def set_active_features(model, ids: torch.Tensor, l0: float) -> None:
    """Shift each layer's encoder bias so that about ``l0`` features per token are active on ``ids`` in the adapter
    model, as in a trained adapter (a random encoder activates half of them); layer by layer, since each shift
    changes the inputs above it (scripts/bench_attribution.py does the same)."""
    for layer, mlp in enumerate(spliced_mlps(model)):
        with capture_mlp_inputs(model) as inputs:
            model(input_ids=ids[None])
        adapter = mlp.adapter
        pre = (inputs[layer] @ adapter.W_enc.T + adapter.b_enc).float().flatten()
        shift = torch.quantile(pre[:2 ** 24], 1 - l0 / adapter.config.n_features)  # quantile's size limit
        adapter.b_enc -= shift.to(adapter.b_enc.dtype)


def attribution_section(pair: str, scale: Scale, budget: Budget) -> dict:
    shape, training = scale.shapes[pair], scale.training[pair]
    device = torch.device(scale.device)
    model = random_adapter_model(shape, training.run.n_features, device, scale.dtype)
    set_mlp_choice(model, "adapter")  # the adapter model (mode "target" freezes the target's forward itself)
    ids = random_ids(shape.vocab_size, scale.attribution_prompt_tokens, 0, device)
    set_active_features(model, ids, scale.attribution_l0)
    with torch.no_grad():
        token = int(model(input_ids=ids[None]).logits[0, -1].argmax())
    graphs = {}
    for mode in MODES:  # every mode the package has, new ones included
        longest = max((g["seconds"] for g in graphs.values() if "seconds" in g), default=0.0)
        if budget.left() < longest:
            graphs[mode] = {"skipped": f"{budget.left():.0f} s left, the slowest graph so far took {longest:.0f} s"}
            continue
        reset_peak(device)
        started = time.perf_counter()
        try:
            graph = attribute(model, ids, token, batch_size=scale.attribution_batch_size,
                              max_feature_nodes=scale.attribution_max_feature_nodes, mode=mode)
        except Exception as error:  # noqa: BLE001 - a mode's failure is a result; the other modes still run
            graphs[mode] = error_record(error)
        else:
            graphs[mode] = {"seconds": time.perf_counter() - started, "active_features": graph.n_active_features,
                            "feature_nodes": graph.n_features, "nodes": graph.n_nodes, **peak_memory(device)}
        free_memory(device)
    return {"shape": shape.name, "features": training.run.n_features, "prompt_tokens": scale.attribution_prompt_tokens,
            "l0_target": scale.attribution_l0, "max_feature_nodes": scale.attribution_max_feature_nodes,
            "batch_size": scale.attribution_batch_size, "graphs": graphs}


# ----------------------------------------------------------------------------------------------- the run

def planned_sections(sections, gen_7b: bool, scale: Scale) -> list[tuple[str, Callable[[Budget], dict]]]:
    """Training first (the memory plan is the forecast that matters most), then attribution (a fixed cost), then
    generation, whose length adapts to the time left."""
    plan = []
    if "train" in sections:
        plan += [(f"train/{pair}", partial(train_section, pair, scale)) for pair in ("paper-7b", "paper-1.5b")]
    if "attribution" in sections:
        plan.append(("attribution/paper-7b", partial(attribution_section, "paper-7b", scale)))
    if "generate" in sections:
        pairs = ("paper-1.5b", "paper-7b") if gen_7b else ("paper-1.5b",)
        plan += [(f"generate/{pair}", partial(generation_section, pair, scale, sharing=len(pairs) - i))
                 for i, pair in enumerate(pairs)]
    return plan


def run_section(section, budget: Budget, device: torch.device) -> dict:
    if budget.left() <= 0:
        return {"status": "skipped", "reason": f"the {budget.total_s:g} s budget was spent"}
    started = time.perf_counter()
    try:
        record = {"status": "ok", **section(budget)}
    except Exception as error:  # noqa: BLE001 - a section's failure is recorded; the next sections still run
        record = {"status": "error", **error_record(error)}
    record["seconds"] = time.perf_counter() - started
    free_memory(device)
    return record


def write_report(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def _gb(value) -> str:
    return "-" if value is None else f"{value:.1f} GB"


def summary(name: str, record: dict) -> str:
    """One line of the printed table for a finished section."""
    if record["status"] != "ok":
        return record.get("error") or record.get("reason", "")
    if name.startswith("train/"):
        parts = []
        for a in record["attempts"]:
            if "skipped" in a:
                parts.append(f"{a['tokens']} tokens skipped (budget)")
            elif a["fits"]:
                parts.append(f"{a['tokens']} tokens fit: {a['seconds_per_step']:.2f} s/step, "
                             f"{a['tokens_per_s']:,.0f} tokens/s, peak {_gb(a['peak_allocated_gb'])} "
                             f"(forecast {_gb(a['forecast']['gb'])})")
            else:
                parts.append(f"{a['tokens']} tokens: out of memory (forecast {_gb(a['forecast']['gb'])})")
        return "; ".join(parts) + f"; fp32-adapter forecast {_gb(record['forecast_fp32_adapters']['gb'])}"
    if name.startswith("generate/"):
        def same(check):
            return "yes" if check and check["identical_tokens"] else "NO"

        line = f"identical tokens: {same(record['check'])} (check)"
        if "skipped" in record["timed"]:
            return f"{line}; {record['timed']['skipped']}"
        line += f", {same(record['timed_check'])} (timed); "
        rates = [f"{m} {r['tokens_per_s']:,.0f} tok/s ({r.get('vs_generate', 1):.2f}x)" if "seconds" in r
                 else f"{m} failed" for m, r in record["timed"].items()]
        return line + f"{record['prompts']} prompts, {record['new_tokens']} new tokens: " + ", ".join(rates)
    graphs = [f"{m} {g['seconds']:.1f} s {_gb(g['peak_allocated_gb'])}" if "seconds" in g
              else f"{m} {'skipped' if 'skipped' in g else 'failed'}" for m, g in record["graphs"].items()]
    active = next((g["active_features"] for g in record["graphs"].values() if "seconds" in g), None)
    return ", ".join(graphs) + f"; {active} active features"


def render_table(report: dict) -> str:
    device = report["device"]
    lines = [f"GPU acceptance run on {device.get('name', device['type'])}, torch {device['torch']}, transformers "
             f"{device['transformers']}; random weights{', --cpu-tiny shapes' if report['cpu_tiny'] else ''}; "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:g} s budget",
             f"{'section':22s} {'status':8s} {'seconds':>8s}  result"]
    for name, record in report["sections"].items():
        seconds = f"{record['seconds']:.0f}" if "seconds" in record else "-"
        lines.append(f"{name:22s} {record['status']:8s} {seconds:>8s}  {summary(name, record)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_acceptance.json", help="JSON report (relative: to the repository)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds the whole run may take")
    parser.add_argument("--cpu-tiny", action="store_true", help="every section at tiny shapes, float32, on the CPU")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--gen-7b", action="store_true", help="also time generation on the 7B shape")
    parser.add_argument("--train-tokens", type=int, help="first training length tried (default: the pair's, 10k)")
    parser.add_argument("--gen-batch", type=int, help="generation batch (default 32; twice as many prompts)")
    parser.add_argument("--gen-new-tokens", type=int, help="generation budget at reasoning length (default 4096)")
    parser.add_argument("--gen-seconds", type=float, help="seconds the timed generation of one pair may take "
                        "(default: the rest of the budget); its length is shortened to fit")
    args = parser.parse_args(argv)
    if not args.cpu_tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_acceptance: no CUDA GPU is visible, and this run measures the paper's shapes on one "
                         "(--cpu-tiny runs every section at tiny shapes on the CPU instead)")
    overrides = {"train_tokens": args.train_tokens, "gen_batch": args.gen_batch,
                 "gen_new_tokens": args.gen_new_tokens, "gen_seconds": args.gen_seconds}
    scale = replace(TINY if args.cpu_tiny else PAPER, **{k: v for k, v in overrides.items() if v is not None})
    device = torch.device(scale.device)
    out = resolve(args.out)
    budget = Budget(args.budget_s)
    report = {"what": "scripts/gpu_acceptance.py: random weights, so speed and memory, not model quality",
              "device": device_record(device), "args": vars(args), "cpu_tiny": args.cpu_tiny,
              "budget_s": args.budget_s,
              "modes": list(MODES), "sections": {}, "elapsed_s": 0.0}
    for name, section in planned_sections(args.sections, args.gen_7b, scale):
        print(f"{name} ...", flush=True)
        report["sections"][name] = run_section(section, budget, device)
        report["elapsed_s"] = budget.elapsed()
        write_report(out, report)
        print(f"{name}: {report['sections'][name]['status']}: {summary(name, report['sections'][name])}", flush=True)
    print(render_table(report))
    print(f"wrote {out}")
    return 1 if any(record["status"] == "error" for record in report["sections"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
