"""Pair files (``make figures CONFIG=path/to/pair.json``): reading one into a ``HubPairConfig`` and the checks that
need the target's tokenizer, run before any notebook (docs/real_models.md)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .data import check_prompt_format, count_traces
from .models import load_tokenizer
from .pair_config import CPU_MAX_NEW_TOKENS, CPU_N_VALIDATION, CPU_NOTEBOOKS, HubPairConfig, TrainingDefaults


def validate_pair(hub: HubPairConfig) -> None:
    """Checks that need the target's tokenizer, run by ``tdlib.pipeline`` before any notebook (so a bad pair file
    fails in seconds, not in notebook 05 after 00-04 have run): local trace files exist, read as conversations and
    (without ``validation_data``) hold more traces than ``n_validation``, ``prompt_format`` "chat" has
    a chat template to render with, and the hesitation word is one token, since notebook 05 attributes that token's
    logit and 06 ablates the features behind it. Loads only the tokenizer (a hub id is fetched once, like every later notebook does)."""
    for role in ("train_data", "validation_data"):
        source = getattr(hub, role)
        if not source or not source.endswith((".jsonl", ".json")):
            continue  # a hub dataset id
        if not Path(source).exists():
            raise FileNotFoundError(f"{hub.name}: {role} {source!r} does not exist; point {role} in the pair file at "
                                    "a JSONL of reasoning traces (the OpenThoughts3 schema, docs/real_models.md)")
        try:
            n = count_traces(source)
        except ValueError as error:
            raise ValueError(f"{hub.name}: {role}: {error}") from None
        if role == "train_data" and not hub.validation_data and n <= hub.n_validation:
            raise ValueError(f"{hub.name}: train_data {source!r} has {n} traces, but its last n_validation="
                             f"{hub.n_validation} are held out for validation; set n_validation in the pair file "
                             f"(e.g. {max(1, n // 10)}) or point validation_data at a separate file")
    tokenizer = load_tokenizer(hub.target)
    try:
        check_prompt_format(tokenizer, hub.prompt_format)
    except ValueError as error:
        raise ValueError(f"{hub.name}: prompt_format {hub.prompt_format!r}: {error}") from None
    check_hesitation_word(tokenizer, hub.hesitation_word, hub.name)


def check_hesitation_word(tokenizer, word: str, pair_name: str = "the pair") -> int:
    """The hesitation word's token id; a ``ValueError`` naming the word, its tokens and the fix if it is not one
    token for ``tokenizer``."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    pieces = [tokenizer.decode([i]) for i in ids]
    candidates = [w for w in {word.strip(), " " + word.strip(), word.strip().capitalize(),
                              " " + word.strip().capitalize(), word.strip().lower(), " " + word.strip().lower()}
                  if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    hint = f"single-token spellings for this tokenizer: {sorted(candidates)}" if candidates else \
        "pick a word the tokenizer keeps whole (check with tokenizer(word)['input_ids'])"
    raise ValueError(f"{pair_name}: hesitation_word {word!r} is {len(ids)} tokens for the target's tokenizer "
                     f"({pieces}, ids {ids}); notebooks 05 and 06 need one token. Set hesitation_word in the pair "
                     f"file to a single-token spelling ({hint})")


def load_pair_file(path: str | Path) -> HubPairConfig:
    """A ``HubPairConfig`` from a JSON pair file: its fields as keys, ``training`` as a nested object of flat
    training settings (``TrainingDefaults.settings()``: a run's settings and the sweep's). Paths in ``base``, ``target``, ``train_data``, ``validation_data`` and
    ``benchmark_files`` are relative to the file's folder unless absolute (hub ids are left alone)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pair file at {path}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    known = {f.name for f in fields(HubPairConfig)} - {"origin"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown pair fields {unknown}; known: {sorted(known)}")
    training_known = TrainingDefaults.settings()
    training = values.pop("training", {})
    unknown = sorted(set(training) - set(training_known))
    if unknown:
        raise ValueError(f"{path}: unknown training fields {unknown}; known: {sorted(training_known)}")

    def local(value):
        candidate = path.parent / value
        return str(candidate) if value and not Path(value).is_absolute() and candidate.exists() else value

    for role in ("base", "target", "train_data", "validation_data"):
        if values.get(role):
            values[role] = local(values[role])
    values["benchmark_files"] = {k: local(v) for k, v in values.get("benchmark_files", {}).items()}
    values.setdefault("name", path.stem)
    if values.get("device") == "cpu":  # a CPU pair: CPU-sized work and float32 unless the file says otherwise
        values.setdefault("dtype", "float32")
        values.setdefault("max_new_tokens", CPU_MAX_NEW_TOKENS)
        values.setdefault("n_validation", CPU_N_VALIDATION)
        own = values.get("notebooks", {})
        if isinstance(own, dict):
            values["notebooks"] = {scope: {**CPU_NOTEBOOKS.get(scope, {}), **own.get(scope, {})}
                                   for scope in {**CPU_NOTEBOOKS, **own}}
        defaults = TrainingDefaults.for_cpu(model_shape(values.get("target", "")).get("hidden_size", 576), **training)
    else:
        defaults = TrainingDefaults.of(**training)
    return HubPairConfig(**values, training=defaults, origin=str(path.parent.resolve()))


def model_shape(model: str) -> dict:
    """``hidden_size``, ``num_hidden_layers``, ``intermediate_size`` and ``vocab_size`` of a local model folder (its
    config.json; Gemma 3's nested ``text_config`` too); {} for a hub id or an unreadable folder (nothing is
    downloaded)."""
    path = Path(model) / "config.json" if model else None
    if path is None or not path.exists():
        return {}
    config = json.loads(path.read_text())
    config = {**config.get("text_config", {}), **{k: v for k, v in config.items() if k != "text_config"}}
    return {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
            if isinstance(config.get(k), int)}


def is_pair_file(config: str) -> bool:
    return config.endswith(".json")
