"""Rendering reasoning traces: the thinking text survives the target's chat template, and a tokenizer without a
template is either told the fix or rendered in the documented plain format."""
import json
from pathlib import Path

import pytest

from tdlib.data import ReasoningTraces, encode_trace, read_conversations, render_trace
from tdlib.organism.tokenizer import train_tokenizer
from tdlib.pair_data import data_for
from tdlib.pair_files import load_pair_file
from tdlib.pairs import HUB, HUB_PAIRS, Pair

FIXTURES = Path(__file__).parent / "fixtures"
TRACES = FIXTURES / "openthoughts3_sample.jsonl"
R1_TEMPLATE = (FIXTURES / "r1_distill_qwen_chat_template.jinja").read_text()
# The chat template of every target a shipped pair config names (hub id prefix -> template text). A new pair
# config whose target is not covered here fails test_every_shipped_pair_keeps_the_reasoning: add its template.
TARGET_TEMPLATES = {"deepseek-ai/DeepSeek-R1-Distill-": R1_TEMPLATE}


def tokenizer(template: str | None = R1_TEMPLATE):
    conversations = read_conversations(TRACES)
    result = train_tokenizer([m["content"] for c in conversations for m in c])
    result.chat_template = template
    return result


def thinking(messages) -> str:
    """The reasoning of a trace's response: the text between <think> and </think>."""
    response = messages[-1]["content"]
    return response.split("<think>")[1].split("</think>")[0]


def test_the_r1_template_deletes_the_reasoning_and_the_trace_rendering_keeps_it():
    tok = tokenizer()
    messages = read_conversations(TRACES)[0]
    reasoning = thinking(messages)
    assert len(reasoning) > 40
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert reasoning not in whole  # the bug: the template keeps only what follows </think>

    prompt, response = render_trace(tok, messages)
    assert prompt.endswith("<｜User｜>" + messages[0]["content"] + "<｜Assistant｜><think>\n")
    assert response == messages[-1]["content"]
    ids = encode_trace(tok, messages)
    assert ids[-1] == tok.eos_token_id
    decoded = tok.decode(ids)
    assert reasoning in decoded and decoded.endswith(messages[-1]["content"] + tok.eos_token)


def test_every_shipped_pair_keeps_the_reasoning():
    for name, hub in HUB_PAIRS.items():
        prefixes = [p for p in TARGET_TEMPLATES if hub.target.startswith(p)]
        assert prefixes, f"{name}: no chat template fixture for its target {hub.target}; add one to TARGET_TEMPLATES"
        tok = tokenizer(TARGET_TEMPLATES[prefixes[0]])
        data = ReasoningTraces(TRACES, tok, batch_size=3, max_tokens=hub.training.max_tokens,
                               prompt_format=hub.prompt_format)
        decoded = [tok.decode(row) for row in data.batch(0)["input_ids"]]
        for messages in data.conversations:
            assert any(thinking(messages) in text for text in decoded), f"{name}: reasoning lost"


def test_a_tokenizer_without_a_template_gets_the_fix_or_the_plain_format():
    tok = tokenizer(None)
    with pytest.raises(ValueError, match='prompt_format": "plain"'):
        ReasoningTraces(TRACES, tok)
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        ReasoningTraces(TRACES, tok, prompt_format="markdown")
    data = ReasoningTraces(TRACES, tok, batch_size=1, prompt_format="plain")
    messages = data.conversations[0]
    text = tok.decode(data.encode(messages))
    assert text == messages[0]["content"] + "\n" + messages[1]["content"] + tok.eos_token


def test_a_trace_must_end_with_the_response(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="conversation 1 ends with a 'user' turn"):
        ReasoningTraces(path, tokenizer())


def test_a_pair_file_selects_the_plain_format(tmp_path):
    (tmp_path / "traces.jsonl").write_text(TRACES.read_text())
    values = {"name": "plain-pair", "base": "me/base", "target": "me/target", "train_data": "traces.jsonl",
              "n_validation": 1, "prompt_format": "plain"}
    (tmp_path / "pair.json").write_text(json.dumps(values))
    hub = load_pair_file(tmp_path / "pair.json")
    assert hub.prompt_format == "plain"
    pair = Pair(hub.name, hub.base, hub.target, key=hub.key, kind=HUB, hub=hub)
    data = data_for(pair, tokenizer(None), batch_size=1)
    assert data.prompt_format == "plain" and data.batch(0)["input_ids"].shape[0] == 1
    (tmp_path / "pair.json").write_text(json.dumps({**values, "prompt_format": "jinja"}))
    with pytest.raises(ValueError, match="prompt_format must be 'chat'"):
        load_pair_file(tmp_path / "pair.json")
