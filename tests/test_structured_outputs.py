"""Structured outputs on a random-weight model at temperature 1, where nothing but the grammar's
mask keeps the output valid: 200 generated JSON schemas validate, 50 regexes match in full,
choices are one of the choices; constrained and unconstrained requests share a batch."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from tests.test_default_model import needs_smollm2
from zllm import LLM, SamplingParams
from zllm.frontend.chat_template import render_chat
from zllm.structured_outputs import StructuredOutputs, build_grammar

MAX_TOKENS = 400  # far beyond what the bounded shapes below need


@pytest.fixture(scope="module")
def llm(gqa_model):
    # Async scheduling: constrained requests must wait for their previous token.
    with LLM(gqa_model, device="cpu", async_scheduling=True, max_num_seqs=256) as llm:
        yield llm


def _sample(llm, specs: list[StructuredOutputs], seed: int = 0, max_tokens: int = MAX_TOKENS):
    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=max_tokens,
                             structured_outputs=s) for i, s in enumerate(specs)]
    return [o.outputs[0] for o in llm.generate(["Hello"] * len(specs), params, use_tqdm=False)]


# -- 200 JSON schemas of varied shapes ---------------------------------------------------------------

def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["integer", "number", "boolean", "enum", "string", "pattern", "null"])
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        low = rng.choice([0, -1.5, 2.25, 10])
        return {"type": "number", "minimum": low, "maximum": low + rng.choice([1, 7.5, 100])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", "x\"y", "ünï"], rng.randint(1, 4))}
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice([r"^[a-z]{2,5}$", r"^\d{3}-\d{2}$",
                                                         r"^(yes|no)$", r"^[A-Z][a-z]{0,4}$"])}
    return {"type": kind}


def _schema(rng: random.Random, depth: int = 0) -> dict:
    shape = rng.choice(["object", "object", "array", "leaf"] if depth < 2 else ["leaf"])
    if shape == "leaf":
        return _leaf(rng)
    if shape == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    names = rng.sample(["id", "name", "size", "tags", "owner", "price", "ok", "meta"],
                       rng.randint(1, 4))
    properties = {n: _schema(rng, depth + 1) for n in names}
    return {"type": "object", "properties": properties,
            "required": [n for n in names if rng.random() < 0.7]}


def test_200_generated_schemas_validate_under_response_format_json_schema(llm):
    rng = random.Random(2026)
    schemas = [_schema(rng) for _ in range(200)]
    outputs = _sample(llm, [StructuredOutputs(json=s) for s in schemas])
    for schema, out in zip(schemas, outputs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)  # strict json.loads: no raw controls
    shapes = json.dumps(schemas)
    for feature in ('"minItems"', '"enum"', '"required"', '"minimum"', '"pattern"', '"maxLength"',
                    '"properties": {"'):
        assert feature in shapes


# -- 50 regexes -------------------------------------------------------------------------------------

def _regex(rng: random.Random) -> str:
    atoms = [r"[a-z]", r"[0-9]", r"\d", r"[A-F]", r"(cat|dog|bird)", r"[aeiou]", r"x", r"\.",
             r"[a-z0-9_]", r"(ab|cd)"]
    parts = []
    for _ in range(rng.randint(1, 5)):
        atom = rng.choice(atoms)
        quantifier = rng.choice(["", "?", "{2}", "{1,3}", "{0,4}"])
        parts.append(atom + quantifier)
        if rng.random() < 0.3:
            parts.append(rng.choice(["-", "@", ":", " "]))
    return "".join(parts)


def test_50_regexes_match_in_full(llm):
    rng = random.Random(7)
    regexes = [_regex(rng) for _ in range(50)]
    outputs = _sample(llm, [StructuredOutputs(regex=r) for r in regexes], seed=100)
    for regex, out in zip(regexes, outputs):
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), (regex, out.text)


def test_choice_outputs_are_one_of_the_choices_and_grammars_hold(llm):
    choices = [["yes", "no"], ["Paris", "London", "New York", "東京"], ["a", "ab", "abc"],
               ['say "hi"', "back\\slash"]]
    specs = [StructuredOutputs(choice=c) for c in choices for _ in range(10)]
    outputs = _sample(llm, specs, seed=500)
    for spec, out in zip(specs, outputs):
        assert out.finish_reason == "stop" and out.text in spec.choice, (spec.choice, out.text)
    assert {o.text for o in outputs[10:20]} >= {"Paris", "London"}  # temperature 1 varies
    grammar = 'root ::= item ("," item){0,3}\nitem ::= [a-c]{1,3} | "(" [0-9] ")"'
    for out in _sample(llm, [StructuredOutputs(grammar=grammar)] * 10, seed=900):
        assert re.fullmatch(r"([a-c]{1,3}|\([0-9]\))(,([a-c]{1,3}|\([0-9]\))){0,3}", out.text)


def test_json_object_and_a_structure_cut_by_max_tokens(llm):
    outputs = _sample(llm, [StructuredOutputs(json_object=True)] * 16, seed=1000)
    finished = [o for o in outputs if o.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(o.text), dict) for o in finished)
    assert all(o.text.startswith("{") for o in outputs)
    long_string = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 30}},
                   "required": ["essay"]}
    (cut,) = _sample(llm, [StructuredOutputs(json=long_string)], max_tokens=5)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5
    assert cut.text.startswith('{"essay": "') or '{"essay": "'.startswith(cut.text)


def test_constrained_and_plain_requests_share_a_batch_without_changing_the_plain_ones(llm):
    plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True,
                            logit_bias={10: 5.0, 11: -100})]
    alone = llm.generate(["Once upon a time", "Hello"], plain, use_tqdm=False)
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=50,
                                  structured_outputs=StructuredOutputs(regex=r"[0-9]{4}"))
                   for i in range(6)]
    mixed = llm.generate(["Once upon a time", "Hello"] + ["Hi"] * 6, plain + constrained,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]
    assert all(re.fullmatch("[0-9]{4}", o.outputs[0].text) for o in mixed[2:])
    assert 11 not in alone[1].outputs[0].token_ids


def test_the_engine_core_reports_the_workers_grammar_time_per_constrained_step(llm):
    """What zllm bench structured reads: rank 0's fill and accept time, and constrained rows."""
    llm.engine.call("host_times")  # start afresh
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] + [
        SamplingParams(temperature=1.0, seed=i, max_tokens=8, ignore_eos=True,
                       structured_outputs=StructuredOutputs(regex=r"[a-z]{20}")) for i in range(5)]
    llm.generate(["Hi"] * 6, params, use_tqdm=False)
    times = llm.engine.call("host_times")
    rows = [r for _, _, r in times["grammar"]]
    # The regex outlasts max_tokens: each of the five samples all its 8 tokens under it (in
    # steps of up to five rows: the requests may reach the core a few steps apart).
    assert sum(rows) == 5 * 8 and max(rows) <= 5
    assert all(fill > 0 and accept >= 0 for fill, accept, _ in times["grammar"])
    assert times["worker"] and llm.engine.call("host_times")["grammar"] == []
    # (own seconds, requests, all decodes, seconds waiting for the GPU): none to wait for on CPU.
    assert all(own > 0 and waited == 0.0 for own, _, _, waited in times["worker"])


def test_logit_bias_moves_greedy_choices(llm):
    base = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    forced = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                  logit_bias={77: 100}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [77] * 6
    banned = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                  logit_bias={base[0]: -100}), use_tqdm=False)[0]
    assert banned.outputs[0].token_ids[0] != base[0]
    with pytest.raises(ValueError, match="logit_bias token id 384 is outside the vocabulary"):
        llm.generate("Hi", SamplingParams(logit_bias={384: 1.0}), use_tqdm=False)


def test_greedy_constrained_requests_under_async_scheduling_match_one_step_at_a_time(llm, gqa_model):
    # Greedy rows do not wait for their previous token to prepare the next step's input; a
    # constrained one waits only once the forward is queued, before its grammar fills the mask.
    rng = random.Random(5)
    schemas = [_schema(rng) for _ in range(16)]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                             structured_outputs=StructuredOutputs(json=s)) for s in schemas]
    prompts = [f"Item {i}:" for i in range(16)]
    overlapped = llm.generate(prompts, params, use_tqdm=False)
    with LLM(gqa_model, device="cpu") as one_step:
        expected = one_step.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in overlapped] == [o.outputs[0].token_ids for o in expected]
    for schema, out in zip(schemas, overlapped):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_preempted_constrained_requests_resume_their_grammar(gqa_model):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
              "minItems": 8, "maxItems": 12}
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=80,
                             structured_outputs=StructuredOutputs(json=schema)) for i in range(8)]
    with LLM(gqa_model, device="cpu", block_size=4, num_kv_blocks=24, watermark=0.0,
             max_model_len=96) as tight:
        outputs = tight.generate(["Count with me"] * 8, params, use_tqdm=False)
        assert tight.stats().num_preemptions > 0
    for out in outputs:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.parametrize("spec, message", [
    (dict(json='{"type": "foo"}'), "invalid JSON schema"),
    (dict(json="{not json"), "invalid JSON schema"),
    (dict(regex="[a-"), "invalid regex '[a-'"),
    (dict(grammar="root ::= missing"), 'Rule "missing" is not defined'),
])
def test_invalid_specs_are_refused_where_they_enter(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_grammar(StructuredOutputs(**spec))
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate("Hi", SamplingParams(structured_outputs=StructuredOutputs(**spec)),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputs(regex="a", choice=["a"])


@needs_smollm2
def test_the_default_model_keeps_to_schemas_regexes_and_choices():
    # SmolLM2-135M-Instruct, sampled: a sample of the shapes above in one batch (all 200
    # schemas, 50 regexes and the choices held when run once, as docs/serving.md says).
    rng, regex_rng = random.Random(2026), random.Random(7)
    schemas = [_schema(rng) for _ in range(12)]
    regexes = [_regex(regex_rng) for _ in range(6)]
    choices = [["positive", "negative", "neutral"], ["Paris", "London", "東京"]] * 3
    specs = ([StructuredOutputs(json=s) for s in schemas]
             + [StructuredOutputs(regex=r) for r in regexes]
             + [StructuredOutputs(choice=c) for c in choices])
    with LLM(device="cpu", max_model_len=1024, num_kv_blocks=1024) as smollm2:
        prompt = render_chat(smollm2.tokenizer, [{"role": "user", "content": "Answer briefly."}])
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS,
                                 structured_outputs=s) for i, s in enumerate(specs)]
        outputs = [o.outputs[0] for o in smollm2.generate([prompt] * len(specs), params,
                                                          use_tqdm=False)]
    assert all(o.finish_reason == "stop" for o in outputs), [o.text for o in outputs]
    for schema, out in zip(schemas, outputs):
        jsonschema.validate(json.loads(out.text), schema)
    for regex, out in zip(regexes, outputs[12:]):
        assert re.fullmatch(regex, out.text), (regex, out.text)
    for choice, out in zip(choices, outputs[18:]):
        assert out.text in choice


def test_plain_requests_run_no_grammar_code(gqa_model):
    """The worker makes its grammar matchers with the first constrained request: until then, no
    code of zllm/worker/grammar.py runs in a step."""
    import sys

    import zllm.worker.grammar as grammar_module

    ran = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == grammar_module.__file__:
            ran.append(frame.f_code.co_name)

    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        runner = llm.engine.engine_core.executor.worker.model_runner
        sys.setprofile(profile)
        try:
            llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=4), use_tqdm=False)
        finally:
            sys.setprofile(None)
        assert ran == [] and runner.grammar is None
        out = llm.generate("Hi", SamplingParams(max_tokens=8, structured_outputs=StructuredOutputs(
            regex="[0-9]{4}")), use_tqdm=False)[0].outputs[0]
        assert runner.grammar is not None and re.fullmatch("[0-9]{4}", out.text)
