"""Benchmark problems (notebook 03's items): loaders, prompts and answer checks.

* ``load_benchmark(name, path=None)``: a real benchmark (MATH-500, GSM8K, AIME 2024, AIME 2025, AMC23, GPQA
  Diamond) through ``datasets.load_dataset`` from the hub, or from a local JSON/JSONL file in the same schema
  (``path``; what the tests use); the organism's held-out problems come from its kind (``tdlib.organism.kind``).
* ``pair_benchmark``: the ``EvalSet`` a pair is evaluated on; ``render_prompts``: a problem as the model sees it;
  ``check_response``: whether a response's answer is the gold one (``tdlib.answers``).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .answers import CHOICE_LETTERS, extract_answer, extract_choice, gsm8k_gold, is_equivalent
from .data import render_prompt

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class BenchItem:
    """One benchmark question."""

    id: str
    question: str
    """The problem text (without the instruction or chat template)."""
    answer: str
    """Gold answer: a string for math, the correct letter for multiple choice."""
    choices: tuple[str, ...] = ()
    """Multiple choice only: the options, in the order shown (A, B, C, D)."""
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the hub and how its rows become ``BenchItem`` s."""

    name: str
    hub_id: str
    split: str
    to_item: Callable[[dict, int], BenchItem]
    subset: str | None = None
    kind: str = "math"
    """"math" (free-form answer) or "multiple_choice"."""
    n_problems: int | None = None
    """Rows in the published split (for plans and cost estimates; the loaded file is what counts)."""


def _math_item(question_key: str, answer_key: str, id_key: str | None = None, gold=str):
    def convert(row: dict, index: int) -> BenchItem:
        missing = [k for k in (question_key, answer_key) if k not in row]
        if missing:
            raise KeyError(f"benchmark row {index} lacks {missing}; it has {sorted(row)}")
        identifier = str(row[id_key]) if id_key and id_key in row else str(index)
        meta = {k: v for k, v in row.items() if k in ("subject", "level", "url")}
        return BenchItem(identifier, str(row[question_key]), gold(row[answer_key]), meta=meta)
    return convert


def _number_text(value) -> str:
    """AMC23 stores answers as floats (27.0): write integral values as integers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _gpqa_item(row: dict, index: int) -> BenchItem:
    """GPQA rows hold the correct and three incorrect answers; options are shuffled with a per-question seed."""
    options = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
    options = [str(o).strip() for o in options]
    identifier = str(row.get("Record ID", index))
    order = list(range(4))
    random.Random(identifier).shuffle(order)
    shuffled = tuple(options[i] for i in order)
    return BenchItem(identifier, str(row["Question"]).strip(), CHOICE_LETTERS[order.index(0)], shuffled,
                     meta={"subject": row.get("High-level domain")})


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", _math_item("problem", "answer", "unique_id"),
                              n_problems=500),
    "gsm8k": BenchmarkSpec("gsm8k", "openai/gsm8k", "test", _math_item("question", "answer", gold=gsm8k_gold),
                           subset="main", n_problems=1319),
    "aime2024": BenchmarkSpec("aime2024", "Maxwell-Jia/AIME_2024", "train", _math_item("Problem", "Answer", "ID"),
                              n_problems=30),
    "aime2025": BenchmarkSpec("aime2025", "math-ai/aime25", "test", _math_item("problem", "answer", "id"),
                              n_problems=30),
    "amc23": BenchmarkSpec("amc23", "math-ai/amc23", "test", _math_item("question", "answer", "id", _number_text),
                           n_problems=40),
    "gpqa_diamond": BenchmarkSpec("gpqa_diamond", "Idavidrein/gpqa", "train", _gpqa_item, subset="gpqa_diamond",
                                  kind="multiple_choice", n_problems=198),
}


BENCHMARK_NAMES = {
    "MATH-500": "math500",
    "AIME 2024": "aime2024",
    "GSM8K": "gsm8k",
    "AMC23": "amc23",
    "AIME 2025": "aime2025",
    "GPQA Diamond": "gpqa_diamond",
    **{key: key for key in ("math500", "aime2024", "gsm8k", "amc23", "aime2025", "gpqa_diamond")},
}
"""Benchmark name (as the paper writes it, or the loader's key) -> ``BENCHMARKS`` key, where the hub
id, split and schema of each benchmark live."""


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"no benchmark file at {path}")
    text = path.read_text()
    if path.suffix == ".json":
        rows = json.loads(text)
        return rows if isinstance(rows, list) else rows.get("data", rows.get("rows"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> list[BenchItem]:
    """Items of benchmark ``name`` from the hub (``datasets.load_dataset``), or from ``path`` (JSON/JSONL rows in
    the hub schema) when given. ``limit`` keeps the first items. The organism's problems: ``pair_benchmark`` of
    an organism pair."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)} (or 'organism')")
    spec = BENCHMARKS[name]
    if path is not None:
        rows = _read_rows(Path(path))
    else:
        from datasets import load_dataset

        try:
            rows = list(load_dataset(spec.hub_id, spec.subset, split=spec.split))
        except Exception as error:  # noqa: BLE001 - add the fix to whatever the hub said
            raise RuntimeError(f"could not load {spec.hub_id} ({name}) from the hub: {error}. Without network, "
                               "download it elsewhere and pass path= a JSONL file in the same schema") from error
    items = [spec.to_item(row, i) for i, row in enumerate(rows)]
    return items[:limit] if limit else items


def format_question(item: BenchItem, kind: str = "math") -> str:
    """The user message: the problem plus the usual instruction (boxed answer; a letter for multiple choice)."""
    if kind == "multiple_choice":
        options = "\n".join(f"{letter}) {text}" for letter, text in zip(CHOICE_LETTERS, item.choices))
        return (f"{item.question}\n\n{options}\n\nPlease reason step by step, and put the letter of the correct "
                "option within \\boxed{}.")
    return f"{item.question}\n{MATH_INSTRUCTION}"


def render_prompts(tokenizer, items: list[BenchItem], kind: str = "math", prompt_format: str | None = None) -> list[str]:
    """Prompts rendered as the pair's training traces are (``tdlib.data.render_prompt``): ``prompt_format`` "chat"
    (the chat template, generation prompt appended) or "plain"; None picks "chat" when the tokenizer has a template."""
    if prompt_format is None:
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return [render_prompt(tokenizer, [{"role": "user", "content": format_question(item, kind)}], prompt_format)
            for item in items]


def benchmark_prompts(tokenizer, items: list[BenchItem], benchmark: str, prompt_format: str | None = None) -> list[str]:
    """The prompts a benchmark's items are generated from: the organism's own prompts, else ``render_prompts``."""
    if benchmark == "organism":
        return [item.question for item in items]
    return render_prompts(tokenizer, items, BENCHMARKS[benchmark].kind, prompt_format)


def check_response(item: BenchItem, response: str, kind: str = "math") -> bool:
    if kind == "multiple_choice":
        return extract_choice(response) == item.answer
    return is_equivalent(extract_answer(response), item.answer)


@dataclass(frozen=True)
class EvalSet:
    """What a pair is evaluated on: one benchmark's items and the generation budget."""

    benchmark: str
    """"organism" or a ``BENCHMARKS`` key."""
    items: list[BenchItem]
    max_new_tokens: int
    source: str
    """Where the items came from (the hub id, or the local file as ``Pair.portable`` names it), for the results
    files."""
    prompt_format: str | None = None
    """How prompts are rendered: the pair's ``prompt_format`` ("chat" or "plain"); None: "chat" when the tokenizer
    has a template."""

    def prompts(self, tokenizer) -> list[str]:
        return benchmark_prompts(tokenizer, self.items, self.benchmark, self.prompt_format)


def benchmark_key(name: str) -> str:
    """A benchmark's loader key from the paper's name ("MATH-500") or the key itself ("math500")."""
    if name == "organism":
        return name
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(set(BENCHMARK_NAMES.values()))} or "
                         "'organism'")
    return BENCHMARK_NAMES[name]


def pair_benchmark(pair, benchmark: str | None = None, path: str | Path | None = None, limit: int | None = None,
                   max_new_tokens: int | None = None) -> EvalSet:
    """The items a pair is evaluated on. ``benchmark=None``: the organism's held-out problems for the organism, the
    first of ``pair.benchmarks`` for a hub pair. ``path`` (else the pair's ``benchmark_files`` entry) reads a
    local file instead of the hub. ``max_new_tokens=None``: the pair's budget."""
    budget = max_new_tokens or pair.max_new_tokens
    if benchmark is None:
        if not pair.benchmarks:
            raise ValueError(f"pair {pair.name!r} lists no benchmarks; set its `benchmarks` or pass benchmark=")
        benchmark = pair.benchmarks[0]
    key = benchmark_key(benchmark)
    if key == "organism":
        if not pair.kind.has_ground_truth:
            raise ValueError(f"benchmark 'organism' is the organism's own task; {pair.name!r} is a hub pair: pick "
                             f"one of its benchmarks {list(pair.benchmarks)}")
        return pair.kind.hooks().evalset(pair, limit, budget)
    if path is None and not pair.kind.has_ground_truth:
        path = next((f for name, f in pair.hub.benchmark_files.items() if benchmark_key(name) == key), None)
    items = load_benchmark(key, path, limit)
    return EvalSet(key, items, budget, pair.portable(path) if path else BENCHMARKS[key].hub_id,
                   prompt_format=pair.prompt_format)


def benchmark_names(pair, benchmark: str | list[str] | None) -> list[str]:
    """The benchmarks ``benchmark`` names for ``pair``: None is all the pair lists; a string may list several
    separated by commas (``PARAMS="03.benchmark=AMC23,MATH-500"`` on the command line)."""
    if benchmark is None:
        return list(pair.benchmarks)
    if isinstance(benchmark, str):
        return [name.strip() for name in benchmark.split(",") if name.strip()]
    return list(benchmark)


def pair_benchmarks(pair, benchmark: str | list[str] | None = None, path: str | Path | None = None,
                    limit: int | None = None, max_new_tokens: int | None = None) -> list[EvalSet]:
    """Every benchmark notebook 03 runs for ``pair``: ``benchmark=None`` is all of ``pair.benchmarks`` (the paper's
    figure 4 is four panels), a name is that one, a list (or names separated by commas) is those. ``path`` reads one local file and so goes with
    one benchmark; several read the pair's ``benchmark_files`` (or the hub)."""
    names = benchmark_names(pair, benchmark)
    if not names:
        raise ValueError(f"pair {pair.name!r} lists no benchmarks; set its `benchmarks` or pass benchmark=")
    if path is not None and len(names) > 1:
        raise ValueError(f"benchmark_path reads one file, but {len(names)} benchmarks run ({', '.join(names)}); "
                         "pass benchmark=<one of them>, or list the files in the pair's `benchmark_files`")
    keys = [benchmark_key(name) for name in names]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"benchmark {repeated} is listed twice in {names}")
    return [pair_benchmark(pair, name, path, limit, max_new_tokens) for name in names]
