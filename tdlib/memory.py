"""Memory plan for training adapters on a real pair, checked by a dry run on the META device (no weights, no
download, no GPU): how much GPU memory the frozen weights, the adapters, their gradients and AdamW states, and
the activations of one training step take.

Parameters are counted from the real modules (a ``Qwen2ForCausalLM`` built on ``torch.device("meta")`` from the
config values below, spliced with the base's MLPs and one adapter per layer). Activations are *measured*: the
real training objective (``tdlib.train.objective``: target pass without grad, adapter pass with grad, both
bridges at the worst-case cut) runs on meta tensors while ``torch.autograd.graph.saved_tensors_hooks`` records
the size of every tensor autograd keeps for the backward pass. Attention is modelled as flash attention (it
keeps q, k, v, the output and the log-sum-exp, never the T x T matrix), which is what SDPA uses on a GPU in bf16.

Gradient checkpointing is derived from the same measurement: a checkpointed decoder layer keeps only its input
during the forward pass and re-creates its own saved tensors, one layer at a time, in the backward pass.

The chunked KL (``TrainConfig.kl_chunk_tokens``) is measured by running the objective a second time with chunks:
the real non-reentrant ``torch.utils.checkpoint`` runs on meta tensors, so the hooks see what each checkpointed
chunk keeps (its inputs) and everything saved outside the chunks; each chunk's function is also run once outside
its checkpoint to measure what the backward pass re-creates for one chunk.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch
from torch.utils.checkpoint import checkpoint

from . import train as train_module
from .adapter import AdapterSet
from .models import anatomy
from .splice import splice, spliced_mlps
from .train import TrainConfig, chunked_kl_divergence

GB = 1e9
"""Memory is reported in decimal gigabytes (1e9 bytes), like GPU spec sheets (an 80 GB H100 has 79.6e9 usable)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The config values of a Qwen2-architecture model, written here so the plan needs no download."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    source: str
    """Where the values come from."""

    def qwen2_config(self):
        from transformers import Qwen2Config

        return Qwen2Config(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
                           tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=131072)


DEEPSEEK_R1_DISTILL_QWEN_7B = ModelShape(
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    source="config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-7B on the Hugging Face hub (the same Qwen2 "
           "shape as Qwen/Qwen2.5-Math-7B); the paper's section on the 7B pair (28 layers, d_model 3584)")
DEEPSEEK_R1_DISTILL_QWEN_1_5B = ModelShape(
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False,
    source="config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B on the Hugging Face hub")
SHAPES = {"paper-7b": DEEPSEEK_R1_DISTILL_QWEN_7B, "paper-1.5b": DEEPSEEK_R1_DISTILL_QWEN_1_5B}


@dataclass
class MemoryPlanConfig:
    """What one training step looks like."""

    shape: ModelShape = DEEPSEEK_R1_DISTILL_QWEN_7B
    """The target's architecture (the base shares it)."""
    n_features: int = 8192
    """Adapter features per layer (the paper: 8192 at d_model 3584)."""
    seq_tokens: int = 10_000
    """Tokens in the step's one sequence (the paper: batch 1 x up to 10k tokens)."""
    weight_dtype: str = "bfloat16"
    """Dtype of the frozen weights and of the activations."""
    adapter_dtype: str = "float32"
    """Dtype of the adapters' master weights, their gradients and AdamW states."""
    gpu_gb: float = 80.0
    """GPU memory to fit in, decimal GB."""
    runtime_overhead_gb: float = 3.0
    """CUDA context, cuBLAS workspaces and allocator slack (an allowance, not measured)."""
    kl_chunk_tokens: int = 1024
    """Token chunk for the chunked-vocabulary strategy (``TrainConfig.kl_chunk_tokens``)."""

    def __post_init__(self):
        for name in ("n_features", "seq_tokens", "kl_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"MemoryPlanConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"MemoryPlanConfig.{name} must be one of {sorted(DTYPE_BYTES)}, "
                                 f"got {getattr(self, name)!r}")
        if self.gpu_gb <= 0 or self.runtime_overhead_gb < 0:
            raise ValueError("MemoryPlanConfig.gpu_gb must be > 0 and runtime_overhead_gb >= 0")
        dims = {self.shape.hidden_size, self.shape.intermediate_size, self.shape.vocab_size, self.n_features,
                self.shape.num_attention_heads, self.shape.num_key_value_heads,
                self.shape.hidden_size // self.shape.num_attention_heads}
        if self.seq_tokens in dims:
            raise ValueError(f"seq_tokens={self.seq_tokens} equals a model dimension; pick another length so "
                             "activations can be told from weights by their shape")


# ------------------------------------------------------------------------------------------ meta model

def _meta_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Shapes-only stand-in for flash attention: saves what flash attention saves for its backward."""
    return _FlashSaved.apply(query, key, value), None


class _FlashSaved(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value):
        batch, heads, tokens, head_dim = query.shape
        out = query.new_empty(batch, tokens, heads, head_dim)
        logsumexp = query.new_empty(batch, heads, tokens, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the dry run never calls backward
        raise NotImplementedError("the meta attention only measures memory")


ATTENTION = "tdlib_meta_attention"


def build_meta_spliced(shape: ModelShape, n_features: int, dtype: str = "bfloat16"):
    """The target spliced with the base's MLPs and one adapter per layer, every tensor on the meta device."""
    from transformers import AttentionInterface, Qwen2ForCausalLM

    AttentionInterface.register(ATTENTION, _meta_flash_attention)
    config = shape.qwen2_config()
    config._attn_implementation = ATTENTION
    with torch.device("meta"):
        target = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        base = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        adapters = AdapterSet.for_model(target, n_features)
    model = splice(target, base, adapters)
    del base
    return model.eval()


# ------------------------------------------------------------------------------------------- parameters

@dataclass
class ParameterCounts:
    target: int
    """Every parameter of the target (embeddings, attention, MLPs, norms, head)."""
    base_mlps: int
    """The base's MLP weights spliced in beside the target's."""
    adapters: int
    """W_enc, b_enc, W_dec, b_dec of every layer: the only trained parameters."""


def count_parameters(model) -> ParameterCounts:
    mlps = spliced_mlps(model)
    base = sum(p.numel() for m in mlps for p in m.base_mlp.parameters())
    adapters = sum(p.numel() for m in mlps for p in m.adapter.parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParameterCounts(target=total - base - adapters, base_mlps=base, adapters=adapters)


# ------------------------------------------------------------------------------------------ activations

@dataclass
class SavedActivations:
    """Bytes autograd keeps for the backward pass of one step, by where they were saved."""

    layer_calls: list[int] = field(default_factory=list)
    """Per decoder-layer call made with grad (adapter pass and bridges): bytes saved inside it."""
    layer_input_bytes: int = 0
    """Bytes of one layer's input hidden state (what a checkpointed layer keeps)."""
    logits_and_kl: int = 0
    """Saved tensors with the vocabulary as last dimension (head output, log-softmax, KL terms)."""
    other: int = 0
    """Everything else outside the layers (embeddings, final norm, residuals kept for the NMSE)."""
    kl_chunks: int = 0
    """Chunked KL only: what the chunks keep outside their checkpoints (their input hidden states, per-token KL)."""
    kl_chunk_recompute: int = 0
    """Chunked KL only: the largest chunk's saved tensors, which the backward pass re-creates one chunk at a time."""


@contextmanager
def _layer_tracker(model):
    state = {"layer": None, "calls": []}
    handles = []
    for layer in anatomy(model).layers:
        def enter(module, args, kwargs):
            state["layer"] = len(state["calls"])
            state["calls"].append(0)

        def leave(module, args, output):
            state["layer"] = None
        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def _meta_safe_sparsity(model, features, mask):
    """``tdlib.train.sparsity`` without its ``.cpu()`` copy of L0 (a meta tensor has no values to copy)."""
    l1 = torch.zeros((), device=mask.device)
    tokens = mask.sum()
    for layer, acts in features.items():
        norms = anatomy(model).mlp(layer).adapter.decoder_norms()
        l1 = l1 + ((acts * norms).sum(-1) * mask).sum() / tokens
    return l1, torch.zeros(len(features))


def _meta_token_rows(tensor, mask):
    """``tdlib.train.token_rows`` for a batch without padding (a meta tensor cannot select by its values)."""
    return tensor.flatten(0, 1)


def measure_saved_activations(model, seq_tokens: int, cut: int = 1,
                              kl_chunk_tokens: int | None = None) -> SavedActivations:
    """Run ``tdlib.train.objective`` once on meta inputs and add up what autograd saves, by place.

    ``cut=1`` is the worst case of the paper's cut range 1..L: both bridges run L-1 layers with grad.
    ``kl_chunk_tokens``: run the chunked KL (``TrainConfig.kl_chunk_tokens``) under real checkpointing.
    A tensor saved by two operations is counted twice (an upper bound)."""
    shape_config = model.config
    n_layers = shape_config.num_hidden_layers
    vocab = shape_config.vocab_size
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train_module.trainable_parameters(model, TrainConfig()):
        p.requires_grad_(True)
    ids = torch.zeros(1, seq_tokens, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    saved = SavedActivations(layer_input_bytes=seq_tokens * shape_config.hidden_size *
                             next(model.parameters()).element_size())

    weights = {id(p) for p in model.parameters()}
    in_chunked_kl = [False]

    def activation_bytes(tensor):
        is_weight = id(tensor) in weights or (tensor._base is not None and id(tensor._base) in weights)
        return 0 if is_weight else tensor.numel() * tensor.element_size()

    def chunked_kl_and_measure(*args, **kwargs):
        in_chunked_kl[0] = True
        try:
            return chunked_kl_divergence(*args, **kwargs)
        finally:
            in_chunked_kl[0] = False

    def checkpoint_and_measure(function, *args, **kwargs):
        recomputed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: recomputed.append(activation_bytes(t)) or t,
                                                      lambda t: t):
            function(*args)  # what the backward pass re-creates for this chunk
        saved.kl_chunk_recompute = max(saved.kl_chunk_recompute, sum(recomputed))
        return checkpoint(function, *args, **kwargs)

    with _layer_tracker(model) as where:
        def pack(tensor):
            # the real checkpoint hides what a chunk saves inside it; what it keeps outside is counted here
            if in_chunked_kl[0]:
                saved.kl_chunks += activation_bytes(tensor)
            elif seq_tokens in tensor.shape:  # activations carry the sequence dimension; weights never do
                size = tensor.numel() * tensor.element_size()
                if where["layer"] is not None:
                    where["calls"][where["layer"]] += size
                elif tensor.shape[-1] == vocab:
                    saved.logits_and_kl += size
                else:
                    saved.other += size
            return tensor

        n_features = train_module.spliced_mlps(model)[0].adapter.config.n_features
        config = TrainConfig(n_features=n_features, kl_chunk_tokens=kl_chunk_tokens)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                mock.patch.object(train_module, "sparsity", _meta_safe_sparsity), \
                mock.patch.object(train_module, "token_rows", _meta_token_rows), \
                mock.patch.object(train_module, "checkpoint", checkpoint_and_measure), \
                mock.patch.object(train_module, "chunked_kl_divergence", chunked_kl_and_measure):
            train_module.objective(model, batch, config, cut=cut)
    saved.layer_calls = [size for size in where["calls"] if size > 0]
    expected_calls = n_layers + 2 * (n_layers - cut)
    if len(saved.layer_calls) != expected_calls:
        raise RuntimeError(f"expected {expected_calls} decoder-layer calls with grad (adapter pass + two bridges "
                           f"from cut {cut}), measured {len(saved.layer_calls)}: the objective changed; "
                           "update tdlib.memory")
    return saved


# ------------------------------------------------------------------------------------------------- plan

@dataclass
class Strategy:
    name: str
    activations_gb: float
    total_gb: float
    fits: bool


@dataclass
class MemoryPlan:
    config: dict
    parameters: dict
    """Parameter counts."""
    static_gb: dict
    """Frozen weights, adapter weights, gradients, AdamW states, runtime overhead (GB)."""
    activations_gb: dict
    """Measured saved activations by place (GB), without checkpointing."""
    chunked_kl_gb: dict
    """Measured with the chunked KL: what it keeps outside the decoder layers (GB)."""
    strategies: list[Strategy]
    """Total step memory under each activation strategy and whether it fits ``gpu_gb``."""

    @property
    def static_total_gb(self) -> float:
        return sum(self.static_gb.values())

    def fitting(self) -> list[str]:
        return [s.name for s in self.strategies if s.fits]


def plan_memory(config: MemoryPlanConfig | None = None, cut: int = 1) -> MemoryPlan:
    """Build the model on meta, count parameters, measure activations, and check each strategy fits."""
    config = config or MemoryPlanConfig()
    model = build_meta_spliced(config.shape, config.n_features, config.weight_dtype)
    counts = count_parameters(model)
    weight_bytes, adapter_bytes = DTYPE_BYTES[config.weight_dtype], DTYPE_BYTES[config.adapter_dtype]
    static = {
        "frozen target weights": counts.target * weight_bytes / GB,
        "frozen base MLP weights": counts.base_mlps * weight_bytes / GB,
        "adapter weights": counts.adapters * adapter_bytes / GB,
        "adapter gradients": counts.adapters * adapter_bytes / GB,
        "AdamW states (2 per adapter parameter)": 2 * counts.adapters * adapter_bytes / GB,
        "runtime overhead (allowance)": config.runtime_overhead_gb,
    }
    saved = measure_saved_activations(model, config.seq_tokens, cut=cut)
    layers = sum(saved.layer_calls) / GB
    measured = {"decoder layers (adapter pass + bridges)": layers,
                "logits, log-softmax and KL terms": saved.logits_and_kl / GB,
                "embeddings, residuals for NMSE, final norm": saved.other / GB}
    # The largest transient outside saved tensors: two fp32 vocabulary-wide tensors alive at once in a KL term.
    transient = 2 * config.seq_tokens * config.shape.vocab_size * 4 / GB
    checkpointed_layers = (len(saved.layer_calls) * saved.layer_input_bytes + max(saved.layer_calls)) / GB
    chunked = measure_saved_activations(model, config.seq_tokens, cut=cut, kl_chunk_tokens=config.kl_chunk_tokens)
    chunked_kl = {
        "chunk inputs and per-token KL (kept for the backward pass)": chunked.kl_chunks / GB,
        "one chunk's saved tensors (re-created in the backward pass)": chunked.kl_chunk_recompute / GB,
        "vocabulary-wide tensors saved outside the chunks": chunked.logits_and_kl / GB,
        "embeddings, residuals for NMSE, final norm": chunked.other / GB,
        "largest transient (2 fp32 vocabulary tensors of one chunk)":
            transient * min(config.kl_chunk_tokens, config.seq_tokens) / config.seq_tokens,
    }
    activations = {
        "no checkpointing": layers + measured["logits, log-softmax and KL terms"] + measured[
            "embeddings, residuals for NMSE, final norm"] + transient,
        "layer checkpointing": checkpointed_layers + measured["logits, log-softmax and KL terms"] + measured[
            "embeddings, residuals for NMSE, final norm"] + transient,
        f"layer checkpointing + KL in {config.kl_chunk_tokens}-token chunks":
            checkpointed_layers + sum(chunked_kl.values()),
    }
    static_total = sum(static.values())
    strategies = [Strategy(name, value, static_total + value, static_total + value <= config.gpu_gb)
                  for name, value in activations.items()]
    measured["largest transient (2 fp32 vocabulary tensors)"] = transient
    config_record = {**asdict(config), "shape": asdict(config.shape), "cut": cut}
    return MemoryPlan(config_record, asdict(counts), static, measured, chunked_kl, strategies)


FORECAST = "forecast"
"""The status of every GB row the plan renders: a dry run on the meta device, not a measurement on a GPU (what
``scripts/gpu_acceptance.py`` measures, on the card it names)."""


def render_markdown(plan: MemoryPlan) -> str:
    """The plan as the markdown of ``docs/memory_plan.md`` (every number from ``plan``)."""
    config, shape, counts = plan.config, plan.config["shape"], plan.parameters
    lines = [
        f"# Memory plan: training adapters on {shape['name']} on one {config['gpu_gb']:g} GB GPU",
        "",
        "Generated by `scripts/memory_plan.py` (do not edit by hand). The models are built on the meta device "
        "(no weights, no download); activations are measured by running `tdlib.train.objective` on meta tensors "
        "with `torch.autograd.graph.saved_tensors_hooks` (see `tdlib/memory.py`). Attention is counted as flash "
        "attention. GB = 1e9 bytes.",
        "",
        f"Every GB row below is a {FORECAST}: no GPU has run this step for the project yet. "
        "`scripts/gpu_acceptance.py` runs it on a GPU and reports the measured peak beside this plan's total.",
        "",
        f"Model config: hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
        f"({shape['num_key_value_heads']} KV), vocabulary {shape['vocab_size']}, tied embeddings "
        f"{shape['tie_word_embeddings']}. Source: {shape['source']}.",
        "",
        f"Step: one sequence of {config['seq_tokens']} tokens; {config['n_features']} features per layer; frozen "
        f"weights and activations in {config['weight_dtype']}; adapters, gradients and AdamW states in "
        f"{config['adapter_dtype']}; bridges at cut k={config['cut']} (the worst case: both bridges run "
        f"{shape['num_hidden_layers'] - config['cut']} layers with grad).",
        "",
        "## Parameters",
        "",
        "| part | parameters |",
        "|---|---:|",
        f"| target (all weights) | {counts['target']:,} |",
        f"| base MLPs spliced in | {counts['base_mlps']:,} |",
        f"| adapters (trained) | {counts['adapters']:,} |",
        "",
        "## Static memory",
        "",
        "| part | GB | status |",
        "|---|---:|---|",
        *[f"| {name} | {value:.1f} | {FORECAST} |" for name, value in plan.static_gb.items()],
        f"| **total** | **{plan.static_total_gb:.1f}** | {FORECAST} |",
        "",
        "## Activations of one step (measured on the meta device, no checkpointing)",
        "",
        "| part | GB | status |",
        "|---|---:|---|",
        *[f"| {name} | {value:.1f} | {FORECAST} |" for name, value in plan.activations_gb.items()],
        "",
        "## Chunked KL outside the decoder layers (measured on the meta device, "
        f"{config['kl_chunk_tokens']}-token chunks)",
        "",
        "| part | GB | status |",
        "|---|---:|---|",
        *[f"| {name} | {value:.2f} | {FORECAST} |" for name, value in plan.chunked_kl_gb.items()],
        "",
        "## Does it fit?",
        "",
        "| strategy | activations GB | total GB | fits | status |",
        "|---|---:|---:|---|---|",
        *[f"| {s.name} | {s.activations_gb:.1f} | {s.total_gb:.1f} | {'yes' if s.fits else 'no'} | {FORECAST} |"
          for s in plan.strategies],
        "",
    ]
    fitting = plan.fitting()
    if fitting:
        lines.append(f"Fits {config['gpu_gb']:g} GB with: {', '.join(fitting)}.")
    else:
        lines.append(f"No strategy fits {config['gpu_gb']:g} GB at {config['seq_tokens']} tokens: shorten the "
                     "sequences or shard the adapters' optimizer states.")
    lines += [
        "",
        "Notes:",
        f"- Switch both on with `TrainConfig(gradient_checkpointing=True, kl_chunk_tokens="
        f"{config['kl_chunk_tokens']})`; neither changes the loss or the gradients (tested), and runs differing "
        "only in them count as the same run (`tdlib.train.training_identity`).",
        "- Layer checkpointing (derived from the measurement above) keeps each decoder-layer call's input and "
        "re-creates one layer's saved tensors at a time in the backward pass; `train` turns it on with "
        "`tdlib.splice.enable_gradient_checkpointing`, which pins each layer's MLP choice while it is recomputed "
        "(transformers' own `gradient_checkpointing_enable()` would recompute with the wrong MLP).",
        "- The chunked KL is measured directly: `tdlib.train.objective` runs with `kl_chunk_tokens` set, under "
        "the real non-reentrant `torch.utils.checkpoint`, on meta tensors. The passes stop at the final hidden "
        "state; each chunk keeps only its input hidden states, and one chunk's logits, log-softmax and KL "
        "terms are re-created at a time in the backward pass (measured by running one chunk outside its "
        "checkpoint). The strategy's total adds that chunk and its transient to the layers' peak, an upper bound.",
        "- tdlib's `attach_adapters` casts adapters to the model's dtype (bf16 on GPU); the plan budgets fp32 "
        "master weights, gradients and AdamW states, which is the safe choice for a 1-epoch run at lr 8e-4.",
        "- A tensor that two operations save is counted twice, so measured activations are an upper bound.",
    ]
    return "\n".join(lines) + "\n"


def parameter_bytes_check(plan: MemoryPlan) -> float:
    """Relative gap between the static weight memory and parameters x bytes (0 when consistent)."""
    counts, config = plan.parameters, plan.config
    expected = ((counts["target"] + counts["base_mlps"]) * DTYPE_BYTES[config["weight_dtype"]]
                + 4 * counts["adapters"] * DTYPE_BYTES[config["adapter_dtype"]]) / GB
    got = sum(v for k, v in plan.static_gb.items() if "overhead" not in k)
    return abs(got - expected) / expected if expected else math.inf
