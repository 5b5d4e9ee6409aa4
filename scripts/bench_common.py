"""What the benchmark scripts share: the pair (with a clear message when it is not built), random-weight models of a
named shape, thread settings, and interleaved timing.

Timing on a CPU: each script times its baseline and the measured side in the same process, interleaved (A B A B),
and reports medians; on a CPU it reports the calling thread's CPU time beside the wall time (``time.thread_time``:
with one torch thread the compute runs on that thread, and CPU time does not count the time another process held
the core, so it is the steadier number on a shared machine).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

# Random-weight shapes. "organism": tdlib's built-in organism (tdlib/organism/build.py: d 128, 4 layers, 4 heads,
# 2 KV heads, MLP 512; its BPE vocabulary has 384 entries). "smollm2": SmolLM2-135M-Instruct's config (Llama, the base
# of config smollm2). "7b": DeepSeek-R1-Distill-Qwen-7B's config.json. "tiny": seconds, for the tests.
SHAPES = {
    "tiny": ("qwen2", dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
    "organism": ("qwen2", dict(vocab_size=384, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
    "smollm2": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                              rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                         tie_word_embeddings=False)),
}


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (None: leave torch's choice); returns the count in use, for the report."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def random_model(shape: str, seed: int, dtype=torch.float32, device="cpu"):
    """A randomly initialised causal LM of ``SHAPES[shape]`` (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, values = SHAPES[shape]
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(seed)
    with torch.device(device):
        return model_class(config_class(**values)).to(dtype).eval()


def pair_or_exit(config: str):
    """``tdlib.pairs.resolve_pair(config)``; for config smollm2 only once it is built: a benchmark does not start
    its quarter-hour build, it exits naming the command that does (an unknown config exits with the reason)."""
    from tdlib.pairs import resolve_pair

    if config == "smollm2":
        try:
            from tdlib import smollm2
        except ImportError:
            raise SystemExit("config 'smollm2' needs tdlib/smollm2.py (the SmolLM2-135M pair), which this checkout "
                             "does not have; time random weights of its shape with --shape smollm2") from None
        paths = smollm2.PAIR.cached_paths()
        if not paths.manifest.exists():
            raise SystemExit(f"the smollm2 pair is not built ({paths.root} is missing): run `make smollm2` first "
                             "(about 15 minutes on 2 cores), or time random weights of its shape with --shape smollm2")
    try:
        return resolve_pair(config)  # the organism builds itself when missing (minutes), as in `make figures`
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"cannot resolve pair {config!r}: {error}") from None


@dataclass
class Timer:
    """Per-label lists of (wall, cpu) seconds, filled by ``run``."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def run(self, label: str, fn, device: torch.device = torch.device("cpu")):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.thread_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.wall.setdefault(label, []).append(time.perf_counter() - wall)
        self.cpu.setdefault(label, []).append(time.thread_time() - cpu)
        return result

    def median(self, label: str, clock: str = "wall") -> float:
        return statistics.median(getattr(self, clock)[label])

