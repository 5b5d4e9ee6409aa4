"""The LLM back end against a local mock server speaking the OpenAI chat-completions API over real HTTP:
happy path, retries, malformed replies, refusals, concurrency and the on-disk cache."""
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tdlib.autointerp.backends import (ClassifyJob, Context, DetectJob, ExplainJob, LLMBackend, LLMConfig, LLMError,
                                       parse_category, parse_detection, parse_explanation)


class MockAPI:
    """A chat-completions server on 127.0.0.1; ``script`` is a list of canned replies consumed first (each
    (status, body text)); after it, ``answer(request)`` builds a normal reply."""

    def __init__(self, delay: float = 0.0):
        self.requests, self.script, self.delay = [], [], delay
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.requests.append({"path": self.path, "body": body,
                                         "auth": self.headers.get("Authorization")})
                    api.in_flight += 1
                    api.max_in_flight = max(api.max_in_flight, api.in_flight)
                    canned = api.script.pop(0) if api.script else None
                time.sleep(api.delay)
                status, text = canned if canned else (200, json.dumps(api.reply(api.answer(body))))
                with api.lock:
                    api.in_flight -= 1
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def reply(content: str) -> dict:
        return {"id": "x", "object": "chat.completion", "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}

    @staticmethod
    def answer(body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system.startswith("You explain"):
            return "Explanation: fires on the word wait."
        if system.startswith("You predict"):
            lines = re.findall(r"^\d+\. (.*)$", user.split("Excerpts:")[1], flags=re.MULTILINE)
            return json.dumps([int("[[ wait]]" in line) for line in lines])
        return "reasoning"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = MockAPI()
    yield server
    server.close()


def backend_for(api, tmp_path=None, **options):
    options = {"max_retries": 2, "backoff": 0.01, "timeout": 5, **options}
    return LLMBackend(LLMConfig(model="mock-model", base_url=api.url, api_key="sk-test",
                                cache_dir=tmp_path / "llm_cache" if tmp_path else None, **options))


def contexts():
    tokens = [["2", "=", "-", "4", ";", " wait"], ["2", "=", "5", ";", " A", ":"],
              ["-", "4", ";", " wait", ",", " check"]]
    return [Context(t, center) for t, center in zip(tokens, (5, 5, 3))]


def test_explain_detect_classify_over_real_http(api):
    backend = backend_for(api)
    explain_job = ExplainJob("u", [Context(["x", " wait"], 1, [0.0, 2.0])])
    assert backend.explain([explain_job]) == ["fires on the word wait."]
    assert "<< wait>>" in api.requests[-1]["body"]["messages"][1]["content"]  # activations are marked
    assert backend.detect([DetectJob("u", "fires on wait", contexts())]) == [[True, False, True]]
    job = ClassifyJob("u", "fires on wait", contexts(), detection=0.9)
    assert backend.classify([job]) == ["reasoning"]
    request = api.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "mock-model" and request["body"]["temperature"] == 0.0
    assert backend.stats["requests"] == 3 and backend.stats["failures"] == 0


def test_a_server_error_is_retried(api):
    api.script = [(500, "internal error"), (429, "slow down")]
    backend = backend_for(api)
    assert backend.detect([DetectJob("u", "fires on wait", contexts())]) == [[True, False, True]]
    assert len(api.requests) == 3 and backend.stats["retries"] == 2


def test_malformed_replies_are_retried_then_given_up(api):
    api.script = [(200, "{not json"), (200, json.dumps({"choices": []}))]
    backend = backend_for(api)
    assert backend.explain([ExplainJob("u", contexts())]) == ["fires on the word wait."]  # third try succeeds
    api.script = [(200, "<html>proxy error</html>")] * 3
    assert backend.explain([ExplainJob("u", contexts())]) == [None]
    assert backend.stats["failures"] == 1


def test_unusable_content_counts_as_no_answer(api):
    api.script = [(200, json.dumps(MockAPI.reply("I think the first one, maybe?")))]
    backend = backend_for(api)
    assert backend.detect([DetectJob("u", "fires on wait", contexts())]) == [None]


def test_a_refusal_raises_a_clear_error(api):
    api.script = [(401, '{"error": "invalid api key"}')]
    with pytest.raises(LLMError, match="HTTP 401.*API key"):
        backend_for(api).explain([ExplainJob("u", contexts())])
    assert len(api.requests) == 1  # not retried


def test_cache_makes_a_rerun_free(api, tmp_path):
    jobs = [DetectJob(f"u{i}", f"explanation {i}", contexts()) for i in range(4)]
    first = backend_for(api, tmp_path).detect(jobs)
    n_requests = len(api.requests)
    assert n_requests == 4
    rerun = backend_for(api, tmp_path)
    assert rerun.detect(jobs) == first
    assert len(api.requests) == n_requests and rerun.stats["cache_hits"] == 4 and rerun.stats["requests"] == 0
    other_model = LLMBackend(LLMConfig(model="other", base_url=api.url, cache_dir=tmp_path / "llm_cache"))
    other_model.detect(jobs[:1])
    assert len(api.requests) == n_requests + 1  # the cache key includes the model


def test_failures_are_not_cached(api, tmp_path):
    api.script = [(500, "down")] * 3
    assert backend_for(api, tmp_path).detect([DetectJob("u", "e", contexts())]) == [None]
    assert backend_for(api, tmp_path).detect([DetectJob("u", "e", contexts())]) == [[True, False, True]]


def test_requests_run_concurrently():
    api = MockAPI(delay=0.2)
    try:
        backend = backend_for(api, max_workers=4)
        started = time.time()
        backend.detect([DetectJob(f"u{i}", f"e{i}", contexts()) for i in range(8)])
        assert api.max_in_flight > 1
        assert time.time() - started < 8 * 0.2
    finally:
        api.close()


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("TDLIB_LLM_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    config = LLMConfig()
    assert (config.model, config.base_url, config.api_key) == ("env-model", "http://localhost:8000/v1", "sk-env")
    assert LLMConfig(model="given").model == "given"


def test_parsers():
    assert parse_detection("Sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_detection("[1, 0]", 3) is None and parse_detection("[1, 2, 0]", 3) is None
    assert parse_detection("```json\n[true, false]\n```", 2) == [True, False]
    assert parse_explanation("Thinking...\nExplanation: the token wait\nmore") == "the token wait"
    assert parse_explanation("   ") is None
    assert parse_category("Category: Reasoning.") == "reasoning" and parse_category("no idea") is None


def test_scoring_through_the_llm_backend_on_smoke(api, tmp_path):
    """End to end on the smoke cache: the mock always answers "active" for every context, so every
    detection score is exactly chance (0.5)."""
    from tdlib.autointerp import CacheConfig, ScoringConfig, build_cache, classify_units, score_units, stream_batches
    from tdlib.pair_data import data_for
    from tdlib.models import load_tokenizer
    from tdlib.pairs import resolve_pair
    from tdlib.runs import load_named

    pair = resolve_pair("smoke")
    model, tokenizer = load_named(pair, "adapter_l1_0.001"), load_tokenizer(pair.target)
    config = CacheConfig(n_batches=2, batch_size=8, top_k=6, n_uniform=3, n_negative=6, before=5, after=2)
    data = data_for(pair, tokenizer, "validation", batch_size=config.batch_size, seed=config.seed)
    cache = build_cache(model, tokenizer, stream_batches(data, config.n_batches), config, progress=False)
    def always_active(body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system.startswith("You explain"):
            return "Explanation: digits"
        if system.startswith("You predict"):
            return json.dumps([1] * len(re.findall(r"^\d+\. ", user, flags=re.MULTILINE)))
        return "domain"

    api.answer = always_active
    backend = backend_for(api, tmp_path)
    table = classify_units(score_units(cache, backend, ScoringConfig(units_per_layer=2, n_explain=3, n_test=3, min_fires=2)),
                           cache, backend)
    assert len(table) == 8
    assert (table["detection_top"] == 0.5).all() and (table["detection_uniform"] == 0.5).all()
    assert set(table["category"]) == {"domain"} and set(table["explanation"]) == {"digits"}
    assert not any(math.isnan(v) for v in table["detection"])


def test_two_level_classification_shows_the_promoted_tokens_and_asks_reasoning_units_for_a_mechanism(api, tmp_path):
    from tdlib.autointerp.backends import MechanismJob

    def judge(body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system.startswith("You classify"):
            return "It fires before re-checks.\nCategory: reasoning" if '" wait"' in user else "Category: domain"
        return "It promotes the word directly.\nMechanism: output"

    api.answer = judge
    backend = backend_for(api, tmp_path)
    examples = [Context(["1", "+", "2"], 2, [0, 0, 1.0])]
    jobs = [ClassifyJob("a", "before checks", examples, 0.9, None, (" wait", ",")),
            ClassifyJob("b", "digits", examples, 0.9, None, ("7",))]
    assert backend.classify(jobs) == ["reasoning", "domain"]
    # the backend sends requests concurrently: find job "a"'s by its explanation, not by arrival order
    request = next(r for r in api.requests if "before checks" in r["body"]["messages"][1]["content"])
    user = request["body"]["messages"][1]["content"]
    assert 'Tokens its output direction promotes most: " wait", ","' in user
    system = request["body"]["messages"][0]["content"]
    assert "not enough" in system and "Category:" in system
    assert backend.mechanism([MechanismJob("a", examples, [" wait"])]) == ["output"]
    assert "direct effect" not in api.requests[-1]["body"]["messages"][1]["content"]  # no studied logit here
    assert parse_category("reasoning? no.\nCategory: language") == "language"
