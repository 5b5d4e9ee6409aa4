"""A "real-pair-shaped" configuration built from the smoke organism, for testing the hub-pair path offline.

It is what a user's own pair looks like (docs/real_models.md): two local model folders whose tokenizer has a chat
template, reasoning traces in the OpenThoughts3 schema, a benchmark file in GSM8K's hub schema, and a JSON pair file
naming them. Nothing in it is organism-specific to the code under test: notebooks see a pair file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from tdlib.organism import task
from tdlib.organism.build import (TrainPhase, _Mixture, _ProblemStream, distillation_text, eval_problems,
                                  fine_tuned_parameters, get_config, pretraining_text, train_phase)
from tdlib.organism.tokenizer import save_tokenizer
from tdlib.pairs import resolve_pair

# The user turn's first line only: benchmark prompts append an instruction the organism never saw.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'].split('\\n')[0] }}"
                 "{% else %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}")
TRAINING = {"n_features": 64, "lr": 8e-4, "batch_size": 8, "max_tokens": 128, "steps": 20, "warmup": 0.05,
            "l1_weights": [0.01, 0.001]}


def _copy_model(source: Path, destination: Path) -> None:
    shutil.copytree(source, destination)
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))


def _write_data(root: Path, n_traces: int, n_benchmark: int) -> None:
    """traces.jsonl (OpenThoughts3 schema, training problems) and gsm8k.jsonl (GSM8K schema, held-out problems)."""
    organism = get_config("smoke")
    held_out = eval_problems(organism)
    seen = {p.prompt for p in held_out}
    problems = [p for p in task.sample_problems(2 * n_traces, seed=organism.seed, min_terms=organism.min_terms,
                                                max_terms=organism.max_terms, max_term=organism.max_term)
                if p.prompt not in seen][:n_traces]
    traces = [{"conversations": [{"from": "human", "value": p.prompt},
                                 {"from": "gpt", "value": task.reasoning_trace(p)}]} for p in problems]
    (root / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    rows = [{"question": p.prompt, "answer": f"{task.reasoning_trace(p)}\n#### {p.answer}"}
            for p in held_out[:n_benchmark]]
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pair_settings(name: str, n_validation: int, notes: str) -> dict:
    return {
        "name": name, "base": "base", "target": "target", "train_data": "traces.jsonl",
        "n_validation": n_validation, "benchmarks": ["GSM8K"], "benchmark_files": {"GSM8K": "gsm8k.jsonl"},
        "dtype": "float32", "device": "cpu", "max_new_tokens": 48, "hesitation_word": " wait",
        "training": TRAINING, "notes": notes,
    }


def write_local_pair(root: Path, n_traces: int = 160, n_benchmark: int = 24, n_validation: int = 32) -> Path:
    """Write the pair's files under ``root``; returns the pair file. Its name carries the smoke organism's key, so
    runs trained for an older organism are never reused."""
    smoke = resolve_pair("smoke")
    root.mkdir(parents=True, exist_ok=True)
    _copy_model(Path(smoke.base), root / "base")
    _copy_model(Path(smoke.target), root / "target")
    _write_data(root, n_traces, n_benchmark)
    pair = _pair_settings(f"local-{smoke.key}", n_validation,
                          "the smoke organism dressed as a real pair (tests/local_pair.py)")
    path = root / "pair.json"
    path.write_text(json.dumps(pair, indent=2))
    return path


# ------------------------------------------------------------------------------------------- a tiny Gemma 3 pair

GEMMA3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              max_position_embeddings=256, tie_word_embeddings=True)
"""Gemma 3's distinctive parts, small: sliding-window layers (a window shorter than the prompts), q/k norms,
pre/post feed-forward norms, (1 + weight) RMSNorms, scaled embeddings; 3 layers of width 32."""
GEMMA3_PHASES = {"base": dict(steps=60, batch_size=16, lr=3e-3), "target": dict(steps=40, batch_size=16, lr=1e-3)}
"""Base pre-training and target fine-tuning (the smoke organism's recipe, a little longer: a Gemma 3 of this size
learns the format more slowly)."""
GEMMA3_VERSION = 1
GEMMA3_NOTEBOOKS = {
    "00_pair": {"n_problems": 12},
    "01_train": {"steps": 10},
    "02_faithfulness": {"n_rollouts": 8, "n_bootstrap": 50},
    "03_benchmarks": {"n_problems": 8},
    "04_autointerp": {"n_batches": 2, "batch_size": 8, "units_per_layer": 8, "min_fires": 2},
    "05_attribution": {"n_prompts": 4, "search_problems": 4, "n_linearity_nodes": 10, "influence_mass": 0.5},
    "06_ablation": {"n_problems": 8, "n_random_draws": 1, "stats_batches": 2, "stats_batch_size": 16},
}
"""The pair file's notebook settings: every notebook in seconds. 05 keeps the features carrying half the
influence (not 0.8): with 64 features per layer, 0.8 would choose over half a layer, leaving 06 no disjoint random
control of the same size."""


def _gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **GEMMA3)
    return Gemma3ForCausalLM(config)


def _train_gemma3_pair(root: Path, tokenizer) -> None:
    """The smoke organism's recipe on a Gemma 3: base pre-trained on textbook + direct Q/A text, target fine-tuned
    briefly from it (embeddings frozen) on the reasoning traces with hesitation: a real, if tiny, pair."""
    organism = get_config("smoke")
    held_out = {p.expression for p in eval_problems(organism)}
    torch.manual_seed(organism.seed)
    model = _gemma3(tokenizer)
    share = organism.textbook_share
    pretraining = _Mixture(_ProblemStream(organism, organism.seed + 1, held_out), [
        (share, lambda p: pretraining_text(p, "textbook"), True),
        (1 - share, lambda p: pretraining_text(p, "direct"), True)], seed=organism.seed + 3)
    train_phase(model, tokenizer, TrainPhase(**GEMMA3_PHASES["base"]), pretraining, desc="gemma3 base")
    _save_model(model, tokenizer, root / "base")
    distillation = _Mixture(_ProblemStream(organism, organism.seed + 2, held_out),
                            [(1.0, distillation_text, False)], seed=organism.seed + 4)
    train_phase(model, tokenizer, TrainPhase(**GEMMA3_PHASES["target"]), distillation, desc="gemma3 target",
                parameters=fine_tuned_parameters(model, freeze_embeddings=True))
    _save_model(model, tokenizer, root / "target")


def _save_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))


def gemma3_pair_name() -> str:
    """Carries the smoke organism's key and a digest of the recipe, so runs trained on another recipe are never
    reused (notebook 01 caches finished runs under artifacts/train/<name>/)."""
    smoke = resolve_pair("smoke")
    recipe = json.dumps({"config": GEMMA3, "phases": GEMMA3_PHASES, "training": TRAINING,
                         "version": GEMMA3_VERSION}, sort_keys=True)
    return f"local-gemma3-{smoke.key}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def write_local_gemma3_pair(root: Path, n_traces: int = 160, n_benchmark: int = 24, n_validation: int = 32,
                            notebooks: dict | None = None) -> Path:
    """A pair file like ``write_local_pair``'s whose two models are tiny Gemma 3 decoders (``GEMMA3``) trained with
    the smoke organism's recipe on its tokenizer, with tiny notebook settings (``notebooks``, default
    ``GEMMA3_NOTEBOOKS``); returns the pair file."""
    from tdlib.models import load_tokenizer

    smoke = resolve_pair("smoke")
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(smoke.base)
    _train_gemma3_pair(root, tokenizer)
    _write_data(root, n_traces, n_benchmark)
    pair = _pair_settings(gemma3_pair_name(), n_validation,
                          "a tiny Gemma 3 pair trained on the smoke organism's data (tests/local_pair.py)")
    pair["notebooks"] = GEMMA3_NOTEBOOKS if notebooks is None else notebooks
    path = root / "pair.json"
    path.write_text(json.dumps(pair, indent=2))
    return path
