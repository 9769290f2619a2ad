"""`priority` in LLM.generate: one for all prompts or one per prompt, checked before anything is
queued; refused under fcfs (as vLLM does), served under `policy: priority`."""

from __future__ import annotations

import pytest

from tests.conftest import PROMPTS
from zllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def test_generate_refuses_priority_under_fcfs_and_bad_values(gqa_model):
    with LLM(gqa_model, device="cpu", engine_process=False) as llm:
        with pytest.raises(ValueError, match=r"Got priority 3 but Priority scheduling is not "
                                             r"enabled \(scheduler policy is 'fcfs'"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, priority=[0, 3])
        assert not llm.engine.has_unfinished_requests()  # nothing half-submitted
        assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, priority=0)[0].outputs[0].token_ids


def test_generate_takes_priorities_under_the_priority_policy(gqa_model, hf):
    with LLM(gqa_model, device="cpu", engine_process=False, policy="priority",
             max_num_seqs=1) as llm:
        outputs = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False, priority=[2, -1, 7])
        for out in outputs:  # outputs keep prompt order, whatever order they were served in
            assert out.outputs[0].token_ids == hf.greedy(gqa_model, out.prompt_token_ids, 4)
        for bad, message in ((True, "priority True must be an integer"),
                             ("1", "priority '1' must be an integer"),
                             (2**63, f"priority {2**63} must be an integer in"),
                             ([1, 2], "got 2 priorities for 3 prompts")):
            with pytest.raises(ValueError, match=message):
                llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False, priority=bad)
        assert not llm.engine.has_unfinished_requests()
