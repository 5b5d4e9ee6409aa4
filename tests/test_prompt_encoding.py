"""One prompt encoding on every path: training, generation, faithfulness and attribution see the same tokens, for a
tokenizer that adds <bos> (as Gemma's does) in both prompt formats."""
from pathlib import Path

import pytest
from tokenizers import processors

from tdlib.attribution.hesitation import cut_at_token, hesitation_token
from tdlib.data import encode_trace, render_prompt
from tdlib.faithfulness import _prompt_and_response
from tdlib.generate import encode_prompt, left_padded
from tdlib.organism.tokenizer import train_tokenizer

MESSAGES = [{"role": "user", "content": "What is 3 - 8?"}, {"role": "assistant", "content": " 3 - 8 = -5. Wait, yes."}]


@pytest.fixture(scope="module")
def bos_tokenizer():
    tokenizer = train_tokenizer(["What is 3 - 8? 3 - 8 = -5. Wait, yes. user assistant <bos>"] * 4, vocab_size=300)
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    assert tokenizer("hi")["input_ids"][0] == bos  # the tokenizer adds <bos> by default
    return tokenizer


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_every_path_renders_a_prompt_with_exactly_one_bos(bos_tokenizer, prompt_format):
    tokenizer = bos_tokenizer
    bos = tokenizer.bos_token_id
    prompt = render_prompt(tokenizer, MESSAGES[:-1], prompt_format)
    expected = encode_prompt(tokenizer, prompt)
    assert expected[0] == bos and expected.count(bos) == 1
    trained = encode_trace(tokenizer, MESSAGES, prompt_format)
    assert trained[:len(expected)] == expected
    batch = left_padded(tokenizer, [prompt, prompt + " and more"])
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == expected
    ids, n_prompt = _prompt_and_response(tokenizer, prompt, MESSAGES[-1]["content"])
    assert ids[:n_prompt] == expected
    wait = hesitation_token(tokenizer, " Wait")
    cuts = cut_at_token(tokenizer, prompt, MESSAGES[-1]["content"], wait, 0, max_cuts=1)
    assert cuts and cuts[0].input_ids[:cuts[0].prompt_tokens] == expected


def test_a_tokenizer_without_special_tokens_is_left_alone():
    tokenizer = train_tokenizer(["Q: 1+2=? A: 3"] * 4, vocab_size=280)
    assert encode_prompt(tokenizer, "Q: 1+2=?") == tokenizer("Q: 1+2=?", add_special_tokens=False)["input_ids"]


def test_the_pre_flight_names_a_missing_chat_template_and_a_missing_trace_file(tmp_path):
    from tdlib.pair_config import HubPairConfig
    from tdlib.pair_files import validate_pair
    from tdlib.pairs import resolve_pair

    smoke = resolve_pair("smoke")  # its tokenizer has no chat template
    traces = tmp_path / "traces.jsonl"
    traces.write_text((Path(__file__).parent / "fixtures" / "openthoughts3_sample.jsonl").read_text())
    chat = HubPairConfig("mine", base=smoke.base, target=smoke.target, train_data=str(traces), hesitation_word=" wait",
                         n_validation=1)
    with pytest.raises(ValueError, match="prompt_format 'chat'.*no chat template"):
        validate_pair(chat)
    plain = HubPairConfig("mine", base=smoke.base, target=smoke.target, train_data=str(traces),
                          hesitation_word=" wait", prompt_format="plain", n_validation=1)
    validate_pair(plain)  # nothing to refuse
    missing = HubPairConfig("mine", base=smoke.base, target=smoke.target, train_data=str(tmp_path / "nope.jsonl"),
                            hesitation_word=" wait", prompt_format="plain")
    with pytest.raises(FileNotFoundError, match="train_data .*nope.jsonl.* does not exist"):
        validate_pair(missing)
