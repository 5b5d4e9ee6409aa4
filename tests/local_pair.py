"""A "real-pair-shaped" configuration built from the smoke organism, for testing the hub-pair path offline.

It is what a user's own pair looks like (docs/real_models.md): two local model folders whose tokenizer has a chat
template, reasoning traces in the OpenThoughts3 schema, a benchmark file in GSM8K's hub schema, and a JSON pair file
naming them. Nothing in it is organism-specific to the code under test: notebooks see a pair file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tdlib.organism import task
from tdlib.organism.build import eval_problems, get_config
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


def write_local_pair(root: Path, n_traces: int = 160, n_benchmark: int = 24, n_validation: int = 32) -> Path:
    """Write the pair's files under ``root``; returns the pair file. Its name carries the smoke organism's key, so
    runs trained for an older organism are never reused."""
    smoke = resolve_pair("smoke")
    root.mkdir(parents=True, exist_ok=True)
    _copy_model(Path(smoke.base), root / "base")
    _copy_model(Path(smoke.target), root / "target")
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
    pair = {
        "name": f"local-{smoke.key}", "base": "base", "target": "target", "train_data": "traces.jsonl",
        "n_validation": n_validation, "benchmarks": ["GSM8K"], "benchmark_files": {"GSM8K": "gsm8k.jsonl"},
        "dtype": "float32", "device": "cpu", "max_new_tokens": 48, "hesitation_word": " wait",
        "training": TRAINING, "notes": "the smoke organism dressed as a real pair (tests/local_pair.py)",
    }
    path = root / "pair.json"
    path.write_text(json.dumps(pair, indent=2))
    return path
