"""The OpenAI surface beyond the basics, through the official openai client: batched prompts,
context overflow, chat content parts and multi-turn tool conversations, echo (with logprobs),
prompt_logprobs, usage details, /tokenize, /detokenize, /version, and the fields zllm refuses
rather than ignores."""

from __future__ import annotations

import openai
import pytest

import zllm

from tests.entrypoints.conftest import MAX_MODEL_LEN, MODEL_NAME

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time", "Tensor parallelism splits"]


def test_a_batch_of_prompts_with_n_returns_choices_in_openai_order(openai_client):
    batch = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPTS, n=2, max_tokens=6,
                                             **GREEDY)
    assert [c.index for c in batch.choices] == list(range(8))
    one_by_one = [openai_client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6,
                                                   **GREEDY).choices[0].text
                  for p in PROMPTS for _ in range(2)]  # the same 8 requests, one at a time
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == one_by_one
    assert batch.usage.completion_tokens == 8 * 6
    # Token-id prompts, streamed: the chunks rebuild the same texts per choice index.
    ids = [openai_client.post("/../tokenize", body={"prompt": p}, cast_to=object)["tokens"]
           for p in PROMPTS]
    texts = [""] * 8
    for chunk in openai_client.completions.create(model=MODEL_NAME, prompt=ids, n=2, max_tokens=6,
                                                  stream=True, **GREEDY):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == one_by_one


def test_context_overflow_gets_vllms_400_and_no_max_tokens_uses_the_rest(openai_client):
    prompt = [5] * (MAX_MODEL_LEN - 10)
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=100)
    message = err.value.body["message"]
    assert message == (f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, "
                       f"you requested {MAX_MODEL_LEN + 90} tokens ({MAX_MODEL_LEN - 10} in the "
                       f"messages, 100 in the completion). Please reduce the length of the "
                       f"messages or completion.")
    assert err.value.body["param"] == "prompt" and err.value.body["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": "Hello " * 200}]
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              max_tokens=MAX_MODEL_LEN - 100)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:  # too long whatever the prompt
        openai_client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                              max_tokens=MAX_MODEL_LEN)
    assert err.value.body["param"] == "max_tokens"
    count = _tokenize(openai_client, messages=messages)["count"]
    out = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    assert out.usage.prompt_tokens == count
    assert out.usage.completion_tokens == MAX_MODEL_LEN - count
    assert out.choices[0].finish_reason == "length"


def test_chat_content_as_text_parts_equals_the_joined_string(openai_client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say hi"},
                                          {"type": "text", "text": "twice"}]}]
    joined = [{"role": "user", "content": "Say hi\ntwice"}]
    a = openai_client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=8, **GREEDY)
    b = openai_client.chat.completions.create(model=MODEL_NAME, messages=joined, max_tokens=8, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=image)
    assert err.value.body["param"] == "messages[0].content[1]" and "text only" in str(err.value)


def test_multi_turn_with_tool_calls_and_results_is_accepted(openai_client):
    messages = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 C."},
        {"role": "user", "content": "Thanks!"},
    ]
    out = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4,
                                                **GREEDY)
    assert out.choices[0].finish_reason == "length"
    rendered = _tokenize(openai_client, messages=messages, return_token_strs=True)
    text = "".join(rendered["token_strs"])
    assert "get_weather" in text and "celsius" in text  # the call and its result are in the prompt
    bad = [*messages[:2], {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=bad)
    assert err.value.body["param"] == "messages[2].tool_calls[0].function.arguments"


def test_continue_final_message_continues_the_assistant_text(openai_client):
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "One, two,"}]
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    out = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, **flags})
    ids = _tokenize(openai_client, messages=messages, **flags)["tokens"]
    assert openai_client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, **GREEDY
                                            ).choices[0].text == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="last message's role is 'user'"):
        openai_client.chat.completions.create(model=MODEL_NAME, messages=messages[:1],
                                              extra_body=flags)


def test_usage_in_streams_every_chunk_and_cached_tokens(openai_client):
    kwargs = dict(model=MODEL_NAME, max_tokens=5, stream=True, **GREEDY)
    chat = [{"role": "user", "content": "Hi"}]
    for chunks in (list(openai_client.completions.create(prompt="Hello", **kwargs,
                                                         stream_options={"include_usage": True})),
                   list(openai_client.chat.completions.create(messages=chat, **kwargs,
                                                              stream_options={"include_usage": True}))):
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert all(c.usage is None for c in chunks[:-1])
    chunks = list(openai_client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=5, stream=True, temperature=0,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "return_token_ids": True}))
    # Every chunk's usage counts the tokens streamed so far (chunks may carry several tokens
    # when the client reads slower than the engine generates).
    streamed = 0
    for chunk in chunks:
        streamed += sum(len(c.model_extra["token_ids"]) for c in chunk.choices)
        assert chunk.usage.completion_tokens == streamed
        assert chunk.usage.prompt_tokens == chunks[0].usage.prompt_tokens
    assert streamed == 5
    shared = "The quick brown fox jumps over the lazy dog. " * 8  # several full KV blocks
    first = openai_client.completions.create(model=MODEL_NAME, prompt=shared, max_tokens=1)
    again = openai_client.completions.create(model=MODEL_NAME, prompt=shared, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.prompt_tokens_details.cached_tokens >= \
        first.usage.prompt_tokens_details.cached_tokens


def test_echo_puts_the_prompt_before_the_completion(openai_client):
    plain = openai_client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=4,
                                             **GREEDY)
    echoed = openai_client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=4,
                                              echo=True, **GREEDY)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    streamed = openai_client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=4,
                                                echo=True, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_echo_with_logprobs_and_prompt_logprobs_score_the_prompt(openai_client):
    prompt = "Once upon a time"
    ids = _tokenize(openai_client, prompt=prompt)["tokens"]
    out = openai_client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, echo=True, logprobs=2, temperature=0,
        extra_body={"prompt_logprobs": 2, **GREEDY["extra_body"]})
    choice = out.choices[0]
    scored = choice.model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    for i, token in enumerate(ids[1:], start=1):
        entry = scored[i][str(token)]  # the prompt's own token comes first, with its rank
        assert next(iter(scored[i])) == str(token) and entry["rank"] >= 1
        assert lp.token_logprobs[i] == pytest.approx(entry["logprob"])
        assert all(e["rank"] <= 2 for t, e in scored[i].items() if t != str(token))
    plain = openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4,
                                             logprobs=2, **GREEDY)
    assert lp.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
    assert "prompt_logprobs" not in plain.choices[0].model_extra
    # Streamed: the first chunk leads with the prompt's tokens; the chunks add up to the whole.
    tokens, logprobs = [], []
    for chunk in openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4,
                                                  echo=True, logprobs=2, stream=True, **GREEDY):
        for c in chunk.choices:
            tokens += c.logprobs.tokens
            logprobs += c.logprobs.token_logprobs
    assert tokens == lp.tokens and logprobs == lp.token_logprobs
    chat = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=2,
        extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_tokenize_detokenize_version_and_models(openai_client):
    tokens = _tokenize(openai_client, prompt="Hello world")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    text = openai_client.post("/../detokenize", body={"tokens": tokens["tokens"]}, cast_to=object)
    assert text["prompt"].endswith("Hello world")
    bare = _tokenize(openai_client, prompt="Hello world", add_special_tokens=False)["tokens"]
    assert tokens["tokens"][-len(bare):] == bare  # (the demo tokenizer adds no BOS itself)
    assert openai_client.get("/../version", cast_to=object)["version"] == zllm.__version__
    assert openai_client.models.list().data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.post("/../detokenize", body={"tokens": [10**6]}, cast_to=object)
    assert err.value.body["param"] == "tokens"


@pytest.mark.parametrize("endpoint, fields, param", [
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"echo": True, "logprobs": 21}, "logprobs"),
    ("completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("completions", {"logit_bias": {"5": 500}}, "logit_bias"),
    ("completions", {"logit_bias": {str(10**6): 1}}, "logit_bias"),
    ("chat", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
])
def test_unsupported_or_bad_fields_get_400_naming_them(openai_client, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "completions":
            openai_client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                             extra_body=fields)
        else:
            openai_client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                extra_body=fields)
    assert err.value.body["param"] == param, err.value.body


def _tokenize(client, **body) -> dict:
    return client.post("/../tokenize", body=body, cast_to=object)
