"""Explainer, detection scorer and category judge behind one interface, with two back ends.

Detection is asked about one marked token per context (the context's ``center``): "is the unit active on
this token, given the text around it?". Contexts are windows of ``before`` tokens, the marked token and
``after`` tokens.

* ``OfflineBackend`` needs no LLM. It explains a unit by the token n-grams (ending at the marked token) that
  best separate its activating contexts from its silent ones (greedy: add the n-gram that most raises the
  balanced accuracy of "the text up to the marked token ends with one of the chosen n-grams", at most
  ``max_patterns``), and scores by applying exactly that rule.
  It classifies with the organism's trace structure (``classify_by_segments``); off the organism it leaves units
  unclassified (categories need the LLM back end).
* ``LLMBackend`` talks to any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, OpenRouter, vLLM):
  model, base URL and key from ``LLMConfig`` or the environment (``TDLIB_LLM_MODEL``, ``TDLIB_LLM_BASE_URL``
  or ``OPENAI_BASE_URL``, ``TDLIB_LLM_API_KEY`` or ``OPENAI_API_KEY``); requests run concurrently, transient
  failures (HTTP 429/5xx, timeouts, malformed bodies) are retried with exponential back-off, and every
  successful reply is cached on disk by a hash of the request, so a rerun costs nothing.

Every method takes a list of jobs and returns one answer per job; ``None`` means "no usable answer" (the
scorer counts those as failures rather than guessing).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..results import atomic_write_text

CATEGORIES = ("language", "domain", "reasoning", "uninterpretable")


@dataclass
class Context:
    """A context as token strings; ``center`` indexes the marked token; ``acts`` (the unit's activation per
    token) only in explanation and classification jobs."""

    tokens: list[str]
    center: int
    acts: list[float] | None = None


@dataclass
class ExplainJob:
    unit: str
    positives: list[Context]
    """Max-activating contexts (with activations)."""
    negatives: list[Context] = field(default_factory=list)
    """Contexts where the unit is silent (the offline explainer contrasts against them; the LLM ignores them)."""


@dataclass
class DetectJob:
    unit: str
    explanation: str
    contexts: list[Context]


@dataclass
class ClassifyJob:
    unit: str
    explanation: str
    examples: list[Context]
    detection: float
    """Mean detection score of the unit's explanation (balanced accuracy)."""
    mass_shares: dict[str, float] | None = None
    """Share of the unit's activation mass per organism trace segment (None off the organism)."""
    promoted_tokens: tuple[str, ...] = ()
    """The tokens the unit's output direction promotes most through the unembedding (``page.logit_effects``)."""


@dataclass
class MechanismJob:
    """A reasoning feature to label by mechanism (``FEATURE_ROLES``): its strongest contexts (activating token
    marked), the tokens its decoder promotes most, and how much of its influence on the studied logit is direct."""

    unit: str
    contexts: list[Context]
    promoted_tokens: list[str]
    direct_share: float | None = None
    """Share of its influence on a studied logit that is direct (attribution only; None in autointerp)."""


FEATURE_ROLES = ("output", "input_simple", "input_abstract")
"""The paper's mechanism labels for a reasoning feature: how it acts (on the output, or read from simple or abstract
input). Not the organism's planted mechanisms (``tdlib.organism.mechanisms.MECHANISMS``: where a hesitation is
triggered)."""


# ----------------------------------------------------------------------------------------------- offline


PATTERN_MARK = " | patterns: "


def ends_with(context: Context, pattern: tuple[str, ...]) -> bool:
    """Whether the tokens up to and including the marked one end with ``pattern``."""
    start = context.center - len(pattern) + 1
    return start >= 0 and tuple(context.tokens[start:context.center + 1]) == pattern


def _balanced_accuracy(hits_pos: list[bool], hits_neg: list[bool]) -> float:
    tpr = sum(hits_pos) / len(hits_pos) if hits_pos else 0.0
    tnr = 1 - sum(hits_neg) / len(hits_neg) if hits_neg else 1.0
    return (tpr + tnr) / 2


def render_patterns(patterns: list[tuple[str, ...]]) -> str:
    readable = " or ".join(json.dumps("".join(p)) for p in patterns) or "(nothing)"
    machine = json.dumps([list(p) for p in patterns])
    return f"the text up to the marked token ends with {readable}{PATTERN_MARK}{machine}"


def parse_patterns(explanation: str) -> list[tuple[str, ...]] | None:
    if PATTERN_MARK not in explanation:
        return None
    try:
        return [tuple(p) for p in json.loads(explanation.split(PATTERN_MARK, 1)[1])]
    except (json.JSONDecodeError, TypeError):
        return None


def classify_by_segments(mass_shares: dict[str, float] | None, detection: float, min_detection: float) -> str:
    """The organism's rule. ``uninterpretable`` when the detection score is below ``min_detection``; otherwise
    by the trace segment holding the plurality of the unit's activation mass: ``check`` (hesitation +
    re-check) -> ``reasoning``, ``step`` (arithmetic chain) -> ``domain``, ``prompt``/``answer``/``eos``
    (question and answer format) -> ``language``."""
    if mass_shares is None:
        raise ValueError("segment-based classification needs segment labels (organism traces); use the LLM "
                         "back end for other model pairs")
    if not detection >= min_detection:  # also catches NaN
        return "uninterpretable"
    shares = {k: v for k, v in mass_shares.items() if v == v}
    if not shares:
        return "uninterpretable"
    top = max(shares, key=shares.get)
    return {"check": "reasoning", "step": "domain"}.get(top, "language")


@dataclass
class OfflineBackend:
    """Token-pattern explainer and scorer; no LLM, deterministic."""

    max_patterns: int = 3
    """Most n-grams in one explanation."""
    max_n: int = 3
    """Longest n-gram (ending at an activating token)."""
    min_detection: float = 0.6
    """Below this mean detection score a unit is "uninterpretable"."""
    name: str = "offline"

    def _candidates(self, positives: list[Context]) -> set[tuple[str, ...]]:
        found = set()
        for context in positives:
            for n in range(1, min(self.max_n, context.center + 1) + 1):
                found.add(tuple(context.tokens[context.center - n + 1:context.center + 1]))
        return found

    def explain_one(self, job: ExplainJob) -> str:
        candidates = sorted(self._candidates(job.positives), key=lambda p: (len(p), p))
        pos, neg = job.positives, job.negatives
        hit = {p: ([ends_with(c, p) for c in pos], [ends_with(c, p) for c in neg]) for p in candidates}
        covered_pos, covered_neg = [False] * len(pos), [False] * len(neg)
        chosen: list[tuple[str, ...]] = []
        best_score = _balanced_accuracy(covered_pos, covered_neg)
        for _ in range(self.max_patterns):
            best = None
            for pattern in candidates:
                if pattern in chosen:
                    continue
                hp, hn = hit[pattern]
                score = _balanced_accuracy([a or b for a, b in zip(covered_pos, hp)],
                                           [a or b for a, b in zip(covered_neg, hn)])
                if score > best_score + 1e-9:
                    best, best_score = pattern, score
            if best is None:
                break
            chosen.append(best)
            covered_pos = [a or b for a, b in zip(covered_pos, hit[best][0])]
            covered_neg = [a or b for a, b in zip(covered_neg, hit[best][1])]
        return render_patterns(chosen)

    def explain(self, jobs: list[ExplainJob]) -> list[str | None]:
        return [self.explain_one(job) for job in jobs]

    def detect(self, jobs: list[DetectJob]) -> list[list[bool] | None]:
        out = []
        for job in jobs:
            patterns = parse_patterns(job.explanation)
            out.append(None if patterns is None else
                       [any(ends_with(c, p) for p in patterns) for c in job.contexts])
        return out

    def mechanism(self, jobs: list[MechanismJob]) -> list[str | None]:
        """A rule in place of a judge: "output" when a token the unit's output direction promotes most (top 3) is
        the token that follows its activation in most of its contexts (it writes what comes next);
        "input_simple" when one token carries most of its activations (at least 60% of contexts);
        "input_abstract" otherwise. None without contexts."""
        labels = []
        for job in jobs:
            if not job.contexts:
                labels.append(None)
                continue
            following = [c.tokens[c.center + 1] for c in job.contexts if c.center + 1 < len(c.tokens)]
            at = [c.tokens[c.center] for c in job.contexts]
            top_next = max(set(following), key=following.count) if following else None
            promoted = {t.strip() for t in job.promoted_tokens[:3]}
            if top_next is not None and top_next.strip() in promoted and following.count(top_next) * 2 > len(following):
                labels.append("output")
            elif max(at.count(t) for t in set(at)) >= 0.6 * len(at):
                labels.append("input_simple")
            else:
                labels.append("input_abstract")
        return labels

    def classify(self, jobs: list[ClassifyJob]) -> list[str | None]:
        """Off the organism there are no segment labels to classify by: those units get None (unclassified), and
        notebook 04 says to use the LLM back end for categories."""
        return [None if job.mass_shares is None else classify_by_segments(job.mass_shares, job.detection,
                                                                          self.min_detection) for job in jobs]


# --------------------------------------------------------------------------------------------------- LLM


class LLMError(RuntimeError):
    """A request the server refused for good (bad key, unknown model, bad request): retrying cannot help."""


class _Transient(Exception):
    pass


def _env(*names: str, default=None):
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default


@dataclass
class LLMConfig:
    """Where and how to ask an OpenAI-compatible chat model."""

    model: str | None = None
    """Model name; default ``TDLIB_LLM_MODEL`` or "gpt-4o-mini" (the paper's explainer and scorer)."""
    base_url: str | None = None
    """API root ending in /v1; default ``TDLIB_LLM_BASE_URL``, ``OPENAI_BASE_URL`` or OpenAI's."""
    api_key: str | None = None
    """Bearer key; default ``TDLIB_LLM_API_KEY`` or ``OPENAI_API_KEY`` (a local vLLM needs none)."""
    cache_dir: str | Path | None = None
    """Replies are cached here (one JSON file per request hash); None disables the cache."""
    max_workers: int = 8
    """Concurrent requests."""
    max_retries: int = 4
    """Retries of a transient failure (so at most max_retries + 1 attempts)."""
    backoff: float = 1.0
    """First retry waits this many seconds, doubling each time."""
    timeout: float = 60.0
    """Seconds per HTTP request."""
    temperature: float = 0.0
    max_tokens: int = 256

    def __post_init__(self):
        self.model = self.model or _env("TDLIB_LLM_MODEL", default="gpt-4o-mini")
        self.base_url = (self.base_url or _env("TDLIB_LLM_BASE_URL", "OPENAI_BASE_URL",
                                               default="https://api.openai.com/v1")).rstrip("/")
        self.api_key = self.api_key or _env("TDLIB_LLM_API_KEY", "OPENAI_API_KEY")
        if self.max_workers < 1 or self.max_retries < 0 or self.backoff < 0:
            raise ValueError("LLMConfig needs max_workers >= 1, max_retries >= 0 and backoff >= 0")


def _mark(context: Context) -> str:
    """Tokens with the unit's activation > 0 are wrapped in << >>."""
    acts = context.acts or [0.0] * len(context.tokens)
    return "".join(f"<<{t}>>" if a > 0 else t for t, a in zip(context.tokens, acts))


EXPLAIN_SYSTEM = ("You explain what a unit (a neuron or sparse feature) of a language model responds to. You see "
                  "text excerpts where tokens on which the unit is active are wrapped in <<double brackets>>. "
                  "Reply with one short sentence starting with 'Explanation:' that says which tokens or "
                  "contexts make it fire; be specific.")
DETECT_SYSTEM = ("You predict whether a unit of a language model is active on the token marked [[like this]] in "
                 "each text excerpt, given an explanation of what it responds to. Reply with only a JSON list of "
                 "0/1, one per excerpt, "
                 "in order, e.g. [1, 0, 0, 1].")
CLASSIFY_SYSTEM = ("You classify units of a language model that was fine-tuned to produce reasoning traces. "
                   "Categories: language (syntax, formatting, common words, punctuation), domain (subject-matter "
                   "content such as numbers, arithmetic, code, science), reasoning (reasoning behaviour: "
                   "hesitation, self-checking, verification, backtracking, planning), uninterpretable (no clear "
                   "pattern). You see the unit's explanation, how well it predicted activations, its strongest "
                   "examples (active tokens in << >>) and the tokens its output direction promotes most. "
                   "Firing inside reasoning text is not enough for 'reasoning': the examples must show the unit "
                   "tracking or producing the reasoning behaviour itself, not the words that happen to surround it. "
                   "Think in at most two sentences, then end with a line 'Category: <one of the four>'.")


MECHANISM_SYSTEM = (
    "You label how a reasoning-related feature of a fine-tuned language model works. Labels: output (the feature "
    "acts on what the model says next: its decoder directly promotes specific output tokens, e.g. a hesitation "
    "word), input_simple (it fires on specific input tokens whatever the context), input_abstract (whether it fires "
    "depends on broader context, not on the token itself). A feature that merely co-occurs with a word is not an "
    "output feature: look at the tokens its decoder promotes. Reply with exactly one label: output, input_simple "
    "or input_abstract, on a last line 'Mechanism: <label>'.")


def _query(context: Context) -> str:
    """The context with its marked token wrapped in [[ ]]."""
    return "".join(f"[[{t}]]" if i == context.center else t for i, t in enumerate(context.tokens))


def parse_explanation(content: str | None) -> str | None:
    if not content or not content.strip():
        return None
    match = re.search(r"explanation\s*:\s*(.+)", content, flags=re.IGNORECASE | re.DOTALL)
    text = (match.group(1) if match else content).strip().splitlines()[0].strip()
    return text or None


def parse_detection(content: str | None, n: int) -> list[bool] | None:
    """A JSON list of n zeros/ones (or booleans) anywhere in the reply; None when absent or malformed."""
    if not content:
        return None
    for candidate in re.findall(r"\[[^\[\]]*\]", content):
        try:
            values = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(values, list) and len(values) == n and all(v in (0, 1, True, False) for v in values):
            return [bool(v) for v in values]
    return None


def parse_mechanism(content: str | None) -> str | None:
    """The label after 'Mechanism:' when present, else the first label named in the reply."""
    if not content:
        return None
    text = content.lower()
    tagged = re.findall(r"mechanism\s*:\s*\**\s*(input_simple|input_abstract|output)", text)
    found = tagged or re.findall(r"input_simple|input_abstract|output", text)
    return found[-1] if tagged else (found[0] if found else None)


def parse_category(content: str | None) -> str | None:
    """The category after 'Category:' when present (the last such line), else the first category word."""
    if not content:
        return None
    text = content.lower()
    tagged = re.findall(r"category\s*:\s*\**\s*([a-z]+)", text)
    tagged = [w for w in tagged if w in CATEGORIES]
    if tagged:
        return tagged[-1]
    words = re.findall(r"[a-z]+", text)
    return next((w for w in words if w in CATEGORIES), None)


class LLMBackend:
    """Explain, detect and classify through an OpenAI-compatible chat API (see the module docstring)."""

    name = "llm"

    def __init__(self, config: LLMConfig | None = None):
        self.config = config or LLMConfig()
        self.cache_dir = Path(self.config.cache_dir) if self.config.cache_dir else None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 0}

    # -- transport
    def _key(self, messages: list[dict]) -> str:
        payload = {"model": self.config.model, "messages": messages, "temperature": self.config.temperature,
                   "max_tokens": self.config.max_tokens}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.config.model, "messages": messages,
                           "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(f"{self.config.base_url}/chat/completions", data=body, headers=headers)
        self._count("requests")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            if error.code == 429 or error.code >= 500:
                raise _Transient(f"HTTP {error.code}: {detail}") from None
            raise LLMError(f"{self.config.base_url} refused the request (HTTP {error.code}: {detail}); check the "
                           "model name, the base URL and the API key (TDLIB_LLM_* / OPENAI_* variables)") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise _Transient(f"connection failed: {error}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise _Transient(f"malformed reply: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise _Transient(f"malformed reply (content is {type(content).__name__})")
        return content

    def chat(self, messages: list[dict]) -> str | None:
        """The reply's text, from the cache when present; None after exhausting retries on transient errors."""
        key = self._key(messages)
        path = self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None
        if path is not None and path.exists():
            self._count("cache_hits")
            return json.loads(path.read_text())["content"]
        for attempt in range(self.config.max_retries + 1):
            try:
                content = self._post(messages)
            except _Transient:
                if attempt == self.config.max_retries:
                    self._count("failures")
                    return None
                self._count("retries")
                time.sleep(self.config.backoff * 2 ** attempt)
                continue
            if path is not None:
                atomic_write_text(path, json.dumps({"messages": messages, "content": content}))
            return content
        return None

    def chat_many(self, conversations: list[list[dict]]) -> list[str | None]:
        if not conversations:
            return []
        with concurrent.futures.ThreadPoolExecutor(self.config.max_workers) as pool:
            return list(pool.map(self.chat, conversations))

    # -- tasks
    def explain(self, jobs: list[ExplainJob]) -> list[str | None]:
        conversations = []
        for job in jobs:
            examples = "\n".join(f"{i + 1}. {_mark(c)}" for i, c in enumerate(job.positives))
            conversations.append([{"role": "system", "content": EXPLAIN_SYSTEM},
                                  {"role": "user", "content": f"Excerpts:\n{examples}"}])
        return [parse_explanation(c) for c in self.chat_many(conversations)]

    def detect(self, jobs: list[DetectJob]) -> list[list[bool] | None]:
        conversations = []
        for job in jobs:
            excerpts = "\n".join(f"{i + 1}. {_query(c)}" for i, c in enumerate(job.contexts))
            conversations.append([{"role": "system", "content": DETECT_SYSTEM},
                                  {"role": "user", "content": f"Explanation: {job.explanation}\n\n"
                                                              f"Excerpts:\n{excerpts}"}])
        replies = self.chat_many(conversations)
        return [parse_detection(reply, len(job.contexts)) for reply, job in zip(replies, jobs)]

    def classify(self, jobs: list[ClassifyJob]) -> list[str | None]:
        conversations = []
        for job in jobs:
            examples = "\n".join(f"- {_mark(c)}" for c in job.examples)
            promoted = ", ".join(json.dumps(t) for t in job.promoted_tokens) or "(not given)"
            conversations.append([{"role": "system", "content": CLASSIFY_SYSTEM},
                                  {"role": "user", "content": f"Explanation: {job.explanation}\n"
                                                              f"Detection score: {job.detection:.2f}\n"
                                                              f"Tokens its output direction promotes most: "
                                                              f"{promoted}\n"
                                                              f"Examples:\n{examples}"}])
        return [parse_category(reply) for reply in self.chat_many(conversations)]


    def mechanism(self, jobs: list[MechanismJob]) -> list[str | None]:
        """One mechanism label per job (``FEATURE_ROLES``), None where the reply has none."""
        conversations = []
        for job in jobs:
            examples = "\n".join(f"- {_mark(c)}" for c in job.contexts)
            promoted = ", ".join(json.dumps(t) for t in job.promoted_tokens)
            direct = ("" if job.direct_share is None else
                      f"\nShare of its influence on the studied word that is a direct effect: {job.direct_share:.2f}")
            conversations.append([{"role": "system", "content": MECHANISM_SYSTEM},
                                  {"role": "user", "content": f"Contexts (active tokens in << >>):\n{examples}\n"
                                                              f"Tokens its decoder promotes most: {promoted}"
                                                              + direct}])
        return [parse_mechanism(reply) for reply in self.chat_many(conversations)]


def make_backend(name: str, **options):
    """``"offline"`` or ``"llm"`` (options go to OfflineBackend / LLMConfig)."""
    if name == "offline":
        return OfflineBackend(**options)
    if name == "llm":
        return LLMBackend(LLMConfig(**options))
    raise ValueError(f"unknown autointerp back end {name!r}; use 'offline' or 'llm'")
