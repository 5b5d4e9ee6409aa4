"""Generation benchmarks (notebook 03): loaders, answer extraction and checking, accuracy with intervals.

* ``load_benchmark(name, path=None)``: the organism's held-out problems, or a real benchmark (MATH-500, GSM8K,
  AIME 2024, AIME 2025, AMC23, GPQA Diamond) through ``datasets.load_dataset`` from the hub, or from a local
  JSON/JSONL file in the same schema (``path``; what the tests use).
* ``extract_answer`` / ``normalize_answer`` / ``is_equivalent``: the usual rules: the last ``\\boxed{...}``
  (nested braces), else "answer is ...", else the last number; LaTeX fractions, commas in numbers, units,
  percent and degree signs are normalised, and numbers are compared numerically (``\\frac{1}{2}`` == ``0.5``).
* ``evaluate_items``: greedy (or sampled) generation with a token budget, then checking; accuracy with a Wilson
  95% interval, mean response length in tokens and the share of responses saying "wait".
* ``recovered_gain``: (acc_model - acc_base) / (acc_target - acc_base), the paper's headline benchmark number;
  undefined (None, with ``recovered_gain_reason``) unless the target's gain over the base is resolved: the lower
  end of its 95% interval (``accuracy_gain``, Newcombe's method from the two Wilson intervals) is above zero.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .generate import Generation, decode_responses, generate_greedy, left_padded

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_LETTERS = "ABCD"


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and equivalence
# ----------------------------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces; ``\\boxed 5`` also works."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for match in reversed(starts):
        position = match.end()
        if position < len(text) and text[position] == "{":
            depth = 0
            for end in range(position, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    return text[position + 1:end].strip()
            continue  # unbalanced: try an earlier one
        bare = re.match(r"[^\s$]+", text[position:])
        if bare:
            return bare.group(0).strip()
    return None


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def extract_answer(response: str) -> str | None:
    """The final answer in a model response: last ``\\boxed{}``, else "answer is X", else "#### X", else the last
    number; None when there is nothing to extract."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    said = re.findall(r"answer is[:\s]*\$?([^\n$]+?)\$?(?:\.\s|\.?$|\n)", response, flags=re.IGNORECASE)
    if said:
        return said[-1].strip()
    hashes = re.findall(r"####\s*([^\n]+)", response)
    if hashes:
        return hashes[-1].strip()
    numbers = re.findall(_NUMBER, response)
    return numbers[-1] if numbers else None


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: what follows ``####`` in its solution (commas kept; normalisation removes them)."""
    if "####" not in solution:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got {solution[-60:]!r}")
    return solution.split("####")[-1].strip()


_UNITS = ("cm", "m", "km", "mm", "inches", "inch", "in", "feet", "foot", "ft", "yards", "yd", "miles", "mph",
          "meters", "meter", "centimeters", "degrees", "degree", "dollars", "dollar", "cents", "cent", "units",
          "unit", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day", "years", "year",
          "pounds", "lbs", "kg", "g", "grams", "liters", "ml", "sq", "square", "cubic", "students", "people")


def normalize_answer(answer: str | int | float | None) -> str:
    """A canonical string for comparing answers (MATH-style normalisation, plus GSM8K commas and units)."""
    if answer is None:
        return ""
    text = str(answer).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("\n", " ").strip().strip("$").strip()
    text = re.sub(r"\\text\{\s*([^{}]*)\}", r" \1 ", text)  # \text{ cm} -> cm (a unit, dropped below)
    text = re.sub(r"\\(?:mbox|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", text)
    for pattern in (r"\\left", r"\\right", r"\\!", r"\\,", r"\\;", r"\\:", r"\\ ", r"\\displaystyle"):
        text = re.sub(pattern, "", text)
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text)
    text = text.replace("°", "").replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac12 -> \frac{1}{2}
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = text.strip()
    if re.fullmatch(r"[A-Za-z]\s*=.*", text):  # "x = 5" -> "5"
        text = text.split("=", 1)[1]
    unit = re.compile(r"\s+(?:" + "|".join(_UNITS) + r")\.?\s*(?:\^\s*\{?\d\}?)?\s*$", re.IGNORECASE)
    while unit.search(text) and unit.sub("", text).strip():
        text = unit.sub("", text)
    text = "".join(text.split()).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):  # 1,234 -> 1234
        text = text.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*?0+", text):  # 2.50 -> 2.5, 3.0 -> 3
        text = text.rstrip("0").rstrip(".")
    if re.fullmatch(r"\{.*\}", text):
        text = text[1:-1]
    return text


def to_number(text: str) -> Fraction | float | None:
    """The exact value of a normalised numeric answer (integers, decimals, ``a/b``, ``\\frac{a}{b}``, a sign), or
    None when it is not a plain number (e.g. symbolic)."""
    text = text.replace(" ", "")
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:]
    match = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", text) or re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", text)
    try:
        if match:
            denominator = Fraction(match.group(2))
            return None if denominator == 0 else sign * Fraction(match.group(1)) / denominator
        if re.fullmatch(r"\d+(\.\d+)?|\.\d+", text):
            return sign * Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _symbolic(text: str):
    """A sympy expression for simple LaTeX (fractions, roots, pi, powers), or None."""
    expression = text
    for _ in range(3):
        expression = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", expression)
        expression = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", expression)
    expression = re.sub(r"\\sqrt(\d)", r"sqrt(\1)", expression)
    expression = expression.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    expression = expression.replace("^", "**").replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[0-9a-z+\-*/(). ]+", expression) or re.search(r"[a-z]{2,}", expression.replace(
            "sqrt", "").replace("pi", "")):
        return None
    try:
        from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                                standard_transformations)

        return parse_expr(expression, transformations=standard_transformations + (
            implicit_multiplication_application,), evaluate=True)
    except Exception:  # noqa: BLE001 - anything sympy cannot parse is simply not symbolic-equal
        return None


def is_equivalent(prediction: str | None, gold: str | int | float, tolerance: float = 1e-6) -> bool:
    """True when ``prediction`` equals ``gold`` after normalisation, numerically (relative ``tolerance``), or
    symbolically (sympy: ``\\frac{\\sqrt{2}}{2}`` == ``\\frac{1}{\\sqrt{2}}``)."""
    if prediction is None:
        return False
    a, b = normalize_answer(prediction), normalize_answer(gold)
    if not a:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return abs(float(x) - float(y)) <= tolerance * max(1.0, abs(float(y)))
    if x is None and y is None and a.lower() == b.lower():
        return True
    left, right = _symbolic(a), _symbolic(b)
    if left is None or right is None:
        return False
    try:
        import sympy

        return bool(sympy.simplify(left - right) == 0)
    except Exception:  # noqa: BLE001
        return False


def extract_choice(response: str) -> str | None:
    """A multiple-choice letter A-D: boxed, "answer is (X)", "Answer: X", else the last standalone letter."""
    boxed = last_boxed(response)
    if boxed is not None:
        found = re.fullmatch(r"\(?([A-D])\)?", normalize_answer(boxed).replace("\\text", ""))
        if found:
            return found.group(1)
    for pattern in (r"answer is\s*:?\s*\(?([A-D])\)?", r"[Aa]nswer\s*:\s*\(?([A-D])\)?"):
        found = re.findall(pattern, response)
        if found:
            return found[-1]
    found = re.findall(r"\b([A-D])\b", response)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------------

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
    the hub schema) when given. ``limit`` keeps the first items. The organism's problems: ``organism_items``."""
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
    from .data import render_prompt

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


# ----------------------------------------------------------------------------------------------------------------
# The organism as a benchmark
# ----------------------------------------------------------------------------------------------------------------

def organism_items(config: str = "organism", limit: int | None = None) -> list[BenchItem]:
    """The organism's held-out problems (never seen in training) as items; prompts are the problems' own."""
    from .organism.build import eval_problems, get_config

    problems = eval_problems(get_config(config))
    problems = problems[:limit] if limit else problems
    return [BenchItem(str(i), p.prompt, str(p.answer), meta={"n_terms": p.n_terms, "show_steps": p.show_steps}) for i, p in enumerate(problems)]


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
    from .pairs import BENCHMARKS as NAMES

    if name == "organism":
        return name
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(set(NAMES.values()))} or 'organism'")
    return NAMES[name]


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
        return EvalSet(key, organism_items(pair.name, limit), budget, f"organism {pair.name} held-out problems")
    if path is None and not pair.kind.has_ground_truth:
        path = next((f for name, f in pair.hub.benchmark_files.items() if benchmark_key(name) == key), None)
    items = load_benchmark(key, path, limit)
    return EvalSet(key, items, budget, pair.portable(path) if path else BENCHMARKS[key].hub_id,
                   prompt_format=pair.prompt_format)


def check_organism_response(item: BenchItem, response: str) -> bool:
    from .organism import task

    return task.extract_answer(response) == int(item.answer)


# ----------------------------------------------------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    """Sampled decoding (optional; greedy is the default)."""

    temperature: float = 0.6
    """Softmax temperature (the R1-distill recommendation)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    seed: int = 0
    """Seeds ``torch`` before each batch, so a rerun samples the same responses."""
    n_samples: int = 1
    """Responses sampled per problem (sample s seeded with ``seed + s``); accuracy is then pass@1, the mean over
    samples, with a bootstrap interval over problems (``pass_at_1``)."""

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"SamplingConfig.n_samples must be >= 1, got {self.n_samples}")
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


@torch.no_grad()
def generate_sampled(model, tokenizer, prompts: list[str], *, max_new_tokens: int, sampling: SamplingConfig,
                     batch_size: int = 64, progress: bool = True, desc: str = "sample") -> Generation:
    """Like ``generate_greedy`` (left padding, plain ``generate``) but sampled, seeded per batch."""
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    responses, lengths = [], []
    for number, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress,
                                        leave=False)):
        batch = left_padded(tokenizer, prompts[start:start + batch_size], device)
        torch.manual_seed(sampling.seed * 1_000_003 + number)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True,
                                temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for text, length in decode_responses(tokenizer, output, batch["input_ids"].shape[1]):
            responses.append(text)
            lengths.append(length)
    return Generation(list(prompts), responses, lengths)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (sensible at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def count_hesitations(text: str, word: str = "wait") -> int:
    """How often ``word`` occurs as a word, any case ("Wait," and " wait" count; "await" does not)."""
    return len(re.findall(rf"(?<![A-Za-z]){re.escape(word.strip())}(?![A-Za-z])", text, flags=re.IGNORECASE))


def score_responses(correct: list[bool], generation: Generation, hesitation: str = "wait",
                    max_new_tokens: int | None = None) -> dict:
    """Accuracy (Wilson 95% interval), mean response tokens and the share of responses saying ``hesitation``
    (as a word, any case); with ``max_new_tokens``, also the share of responses that ran into that budget (cut
    before they finished: a truncated answer scores as wrong, and a truncated length understates the model's)."""
    n = len(correct)
    if n == 0:
        raise ValueError("no responses to score")
    successes = sum(bool(c) for c in correct)
    scores = {
        "accuracy": successes / n,
        "accuracy_ci": list(wilson_interval(successes, n)),
        "mean_response_tokens": sum(generation.response_tokens) / n,
        "wait_rate": sum(count_hesitations(r, hesitation) > 0 for r in generation.responses) / n,
        "n_correct": successes,
    }
    if max_new_tokens is not None:
        scores["hit_budget_share"] = sum(t >= max_new_tokens for t in generation.response_tokens) / n
    return scores


def pass_at_1(correct_by_sample: list[list[bool]], n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, list]:
    """pass@1 from k samples per problem (``correct_by_sample[s][i]``: sample s of problem i): the mean over
    samples and problems, with a 95% percentile interval from resampling problems (a problem's samples are not
    independent draws of the benchmark, so a Wilson interval over n x k responses would be too narrow)."""
    import numpy as np

    per_problem = np.asarray(correct_by_sample, dtype=float).mean(0)
    if per_problem.size == 0:
        raise ValueError("no problems to score")
    rng = np.random.default_rng(seed)
    means = per_problem[rng.integers(0, per_problem.size, size=(n_bootstrap, per_problem.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(per_problem.mean()), [float(low), float(high)]


def evaluate_items(model, tokenizer, items: list[BenchItem], *, benchmark: str, max_new_tokens: int,
                   batch_size: int = 64, sampling: SamplingConfig | None = None, desc: str = "generate",
                   prompts: list[str] | None = None, prompt_format: str | None = None,
                   hesitation_word: str = "wait") -> tuple[dict, Generation, list[bool]]:
    """Generate for every item (``sampling.n_samples`` times when sampled), check the answers, score (``wait_rate``
    counts the pair's ``hesitation_word``; ``hit_budget_share`` the responses cut at ``max_new_tokens``). The
    returned generation and correctness list hold every sample, sample after sample.
    ``benchmark="organism"`` uses the organism's own prompts and answer rule; other names are formatted with
    ``render_prompts`` and checked with ``check_response``."""
    kind = BENCHMARKS[benchmark].kind if benchmark in BENCHMARKS else "math"
    if prompts is None:
        prompts = benchmark_prompts(tokenizer, items, benchmark, prompt_format)
    if sampling is None:
        generations = [generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, desc=desc)]
    else:
        generations = [generate_sampled(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        sampling=replace(sampling, seed=sampling.seed + s), batch_size=batch_size,
                                        desc=desc if sampling.n_samples == 1 else f"{desc} sample {s + 1}")
                       for s in range(sampling.n_samples)]
    if benchmark == "organism":
        by_sample = [[check_organism_response(i, r) for i, r in zip(items, g.responses)] for g in generations]
    else:
        by_sample = [[check_response(i, r, kind) for i, r in zip(items, g.responses)] for g in generations]
    generation = Generation([p for g in generations for p in g.prompts], [r for g in generations for r in g.responses],
                            [t for g in generations for t in g.response_tokens])
    correct = [c for sample in by_sample for c in sample]
    scores = score_responses(correct, generation, hesitation_word, max_new_tokens)
    if len(by_sample) > 1:  # pass@1 over the samples, its interval over problems
        scores["accuracy"], scores["accuracy_ci"] = pass_at_1(by_sample)
        scores["n_samples"] = len(by_sample)
    return scores, generation, correct


def recovered_gain(accuracy: float, base_accuracy: float, target_accuracy: float) -> float | None:
    """(acc - acc_base) / (acc_target - acc_base); None when the target does not beat the base (undefined).

    The bare formula: whether the gain is large enough to divide by is ``accuracy_gain``'s question, which
    ``recovered_gains`` asks before calling this."""
    gap = target_accuracy - base_accuracy
    if gap <= 0:
        return None
    return (accuracy - base_accuracy) / gap


def accuracy_gain(base: dict, target: dict) -> dict:
    """The target's accuracy gain over the base with its 95% interval, from the two entries' Wilson intervals
    (``accuracy`` and ``accuracy_ci``, as ``score_responses`` writes them) by Newcombe's hybrid score method:

        gain = p_t - p_b
        low  = gain - sqrt((p_t - l_t)^2 + (u_b - p_b)^2)     (l, u: each accuracy's Wilson 95% interval)
        high = gain + sqrt((u_t - p_t)^2 + (p_b - l_b)^2)

    ``resolved`` is True when ``low > 0``, i.e. the gain is larger than the half-width of its own interval below it;
    only then is a recovered gain (a ratio over this gain) reported."""
    p_t, (l_t, u_t) = target["accuracy"], target["accuracy_ci"]
    p_b, (l_b, u_b) = base["accuracy"], base["accuracy_ci"]
    gain = p_t - p_b
    below = math.sqrt((p_t - l_t) ** 2 + (u_b - p_b) ** 2)
    above = math.sqrt((u_t - p_t) ** 2 + (p_b - l_b) ** 2)
    return {"gain": gain, "gain_ci": [gain - below, gain + above], "half_width": below, "resolved": gain - below > 0,
            "interval": "95%, Newcombe's method from the base's and target's Wilson intervals"}


def recovered_gains(results: dict[str, dict]) -> dict:
    """Add ``recovered_gain`` and ``recovered_gain_reason`` to every entry of ``results`` (which must hold "base" and
    "target"): the gain when ``accuracy_gain`` is resolved (reason None), else None with the reason. Returns the
    ``accuracy_gain`` it used."""
    base, target = results["base"], results["target"]
    gain = accuracy_gain(base, target)
    reason = None
    if not gain["resolved"]:
        reason = (f"undefined: the target's gain over the base ({gain['gain']:+.1%}) is not larger than its 95% "
                  f"interval's half-width ({gain['half_width']:.1%}; interval {gain['gain_ci'][0]:+.1%} to "
                  f"{gain['gain_ci'][1]:+.1%}), so a ratio over it would be noise")
    for entry in results.values():
        entry["recovered_gain"] = None if reason else recovered_gain(entry["accuracy"], base["accuracy"],
                                                                     target["accuracy"])
        entry["recovered_gain_reason"] = reason
    return gain


# ----------------------------------------------------------------------------------------------------------------
# Notebook 03: every model on one benchmark
# ----------------------------------------------------------------------------------------------------------------

def benchmark_model_names(train_results: dict, include_local_mse: bool = True) -> list[str]:
    """base, target, hybrid, each adapter of notebook 01 (by sparsity), the MLP fine-tune skyline (and local MSE)."""
    names = ["base", "target", "hybrid"]
    trained = train_results["models"]
    kinds = {n: trained[n].get("kind") for n in trained}
    names += sorted((n for n in trained if kinds[n] == "adapter"), key=lambda n: -trained[n].get("l1_weight", 0))
    names += [n for n in trained if kinds[n] == "mlp_finetune"]
    if include_local_mse:
        names += [n for n in trained if kinds[n] == "local_mse"]
    return list(dict.fromkeys(names))


def run_benchmark(pair, names: list[str], items: list[BenchItem], *, benchmark: str, max_new_tokens: int,
                  batch_size: int = 64, sampling: SamplingConfig | None = None,
                  progress: bool = True) -> tuple[dict[str, dict], dict[str, Generation]]:
    """Evaluate every named model of ``pair`` on ``items``; adds ``recovered_gain`` (and its reason when undefined,
    ``recovered_gains``) against base and target."""
    from .models import load_tokenizer
    from .sweep import load_named

    tokenizer = load_tokenizer(pair.target)
    results, generations = {}, {}
    for name in tqdm(names, desc="models", disable=not progress):
        model = load_named(pair, name)
        results[name], generations[name], _ = evaluate_items(
            model, tokenizer, items, benchmark=benchmark, max_new_tokens=max_new_tokens, batch_size=batch_size,
            sampling=sampling, desc=name, prompt_format=pair.prompt_format,
            hesitation_word=pair.hesitation_word)
        del model
    if "base" in results and "target" in results:
        recovered_gains(results)
    return results, generations


def evaluate_pair(pair, evalset: EvalSet, batch_size: int = 64, progress: bool = True) -> tuple[dict, dict]:
    """Notebook 00 for a hub pair: base, target and hybrid on ``evalset``, in the 00_pair.json layout.

    Loading the hybrid splices the base's MLPs into the target, which checks the pair is compatible (same
    architecture, layers and MLP shapes); the two tokenizers must also share their vocabulary."""
    from .models import IncompatiblePairError, load_tokenizer

    base_tokenizer, target_tokenizer = load_tokenizer(pair.base), load_tokenizer(pair.target)
    if base_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise IncompatiblePairError(f"{pair.base} and {pair.target} have different tokenizer vocabularies "
                                    f"({len(base_tokenizer)} vs {len(target_tokenizer)} tokens); adapters need a "
                                    "fine-tune and the model it was fine-tuned from")
    models, generations = run_benchmark(pair, ["base", "target", "hybrid"], evalset.items,
                                        benchmark=evalset.benchmark, max_new_tokens=evalset.max_new_tokens,
                                        batch_size=batch_size, progress=progress)
    return {**models, "benchmark": evalset.benchmark, "source": evalset.source, "n_problems": len(evalset.items),
            "max_new_tokens": evalset.max_new_tokens, "hesitation_token": pair.hesitation_word,
            "base_model": pair.portable(pair.base), "target_model": pair.portable(pair.target)}, generations


def pair_checks(results: dict, organism: bool) -> dict[str, bool]:
    """What notebook 00 asks of a pair. The organism has pair-level design checks
    (``tdlib.organism.report.design_checks``, docs/method.md); a real pair is only asked to show the difference the
    adapters are meant to explain (the target is better, longer and hesitates more)."""
    if organism:
        from .organism.report import design_checks

        return design_checks(results)
    base, target = results["base"], results["target"]
    return {
        "target is more accurate than base": target["accuracy"] > base["accuracy"],
        "target responses are longer than base's": target["mean_response_tokens"] > base["mean_response_tokens"],
        "target says wait more often than base": target["wait_rate"] > base["wait_rate"],
    }


def benchmark_checks(models: dict[str, dict], train_results: dict) -> dict:
    """The paper's benchmark claims as checks on the organism, with the numbers behind each verdict.

    * the middle-sparsity adapter's mean response length is within 25% of the target's;
    * the lowest-penalty adapter recovers >= 50% of the accuracy gain;
    * the hybrid recovers far less (here: less than half of what the lowest-penalty adapter recovers).
    """
    middle, lowest = train_results.get("analysis_model"), train_results.get("lowest_penalty_model")
    checks: dict = {"analysis_model": middle, "lowest_penalty_model": lowest}
    target_length = models["target"]["mean_response_tokens"]
    if middle in models:
        ratio = models[middle]["mean_response_tokens"] / target_length if target_length else None
        checks["length_ratio_middle"] = ratio
        checks["length_within_25pct_at_middle"] = ratio is not None and abs(ratio - 1) <= 0.25
    if lowest in models:
        gain = models[lowest]["recovered_gain"]
        checks["recovered_gain_lowest"] = gain
        checks["recovered_gain_reason"] = models[lowest].get("recovered_gain_reason")
        checks["recovers_half_at_lowest"] = gain is not None and gain >= 0.5
        hybrid_gain = models.get("hybrid", {}).get("recovered_gain")
        checks["recovered_gain_hybrid"] = hybrid_gain
        checks["hybrid_recovers_far_less"] = (gain is not None and hybrid_gain is not None
                                              and hybrid_gain < 0.5 * gain)
    return checks
