"""From the engine core's token ids to what a user reads: text, stop strings, logprobs, outputs.

Per request (the n samples of one prompt) the frontend keeps each sample's tokens and, where it
needs text as it goes (streaming, or stop strings to match), an incremental detokenizer. A stop
string ends the sample here: its text is cut before the match and the frontend aborts it in the
engine core. While a request streams, text that could be the start of a stop string is held
back, so no delta ever carries part of one.

Streaming requests get delta outputs (what is new since the last delivery); the others get one
cumulative output when every sample has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from zllm.outputs import CompletionOutput, RequestOutput
from zllm.protocol import EngineCoreOutputs, PromptLogprobs
from zllm.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """Text deltas as tokens arrive, never splitting a multi-byte character.

    Decodes a short window of tokens twice per step: the tokens already turned into text
    (`prefix_offset:read_offset`) and the same window plus the new ones. The difference is the
    new text, held back while it ends in U+FFFD (a character whose bytes are not all here yet).
    A few prompt tokens seed the window so that tokenizers which drop a leading space of the
    first token (SentencePiece) see the context they would in the full text.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text held back so far (an incomplete character at the end), for a sample that
        has ended: the whole text then equals decoding every token at once."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset],
                        skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


def stop_string_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class _Sample:
    """One of a request's n samples, as the frontend sees it."""

    index: int
    params: SamplingParams
    detokenizer: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, float]]] = None
    text: str = ""  # decoded so far (only with a detokenizer), cut at a matched stop string
    finish_reason: Optional[str] = None
    stop_reason: Optional[str | int] = None
    # How much of it the consumer has had (streaming).
    sent_text: int = 0
    sent_tokens: int = 0

    def add_text(self, new_text: str) -> bool:
        """Append decoded text; True if it completed a stop string (the text is then cut)."""
        old_len = len(self.text)
        self.text += new_text
        for stop in self.params.stop:
            # Only the end can hold a new match: the new text plus a stop string's length.
            idx = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1:
                self.text = self.text[:idx]
                self.stop_reason = stop
                return True
        return False

    def visible_text_len(self) -> int:
        """How much of the text may be streamed now (all of it once finished)."""
        if self.finish_reason is not None or not self.params.stop:
            return len(self.text)
        return len(self.text) - stop_string_holdback(self.text, self.params.stop)


@dataclass
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    stream: bool
    samples: list[_Sample]
    core_ids: list[str]  # the engine core's id of each sample
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None  # as scored so far
    prompt_token_ranks: Optional[list[Optional[int]]] = None
    prompt_logprobs_sent: bool = False  # (streaming)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.samples: dict[str, tuple[RequestState, _Sample]] = {}  # engine core id -> sample

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, core_ids: list[str], stream: bool) -> None:
        text_needed = stream or bool(params.stop)
        samples = [_Sample(i, params, IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                             params.skip_special_tokens)
                           if text_needed else None,
                           logprobs=[] if params.logprobs is not None else None)
                   for i in range(len(core_ids))]
        state = RequestState(request_id, prompt, prompt_token_ids, stream, samples, core_ids,
                             prompt_logprobs=None if params.prompt_logprobs is None else [None],
                             prompt_token_ranks=None if params.prompt_logprobs is None else [None])
        self.requests[request_id] = state
        for core_id, sample in zip(core_ids, samples):
            self.samples[core_id] = (state, sample)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns the engine core ids of its samples still running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        return [cid for cid in state.core_ids if self.samples.pop(cid, None) is not None]

    def process(self, outputs: EngineCoreOutputs) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs; returns the outputs to deliver and the engine core ids of
        samples that a stop string ended (to abort in the core)."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        if outputs.prompt_logprobs is not None:
            self._add_prompt_logprobs(outputs.prompt_logprobs)
        lp = outputs.logprobs
        lp_rows = {int(r): i for i, r in enumerate(lp.rows)} if lp is not None else {}
        starts = _starts(lp.counts) if lp is not None else None
        for i, (core_id, token) in enumerate(zip(outputs.request_ids, outputs.new_token_ids.tolist())):
            entry = self.samples.get(core_id)
            if entry is None:
                continue  # aborted here while its step ran
            state, sample = entry
            if not sample.token_ids:
                state.num_cached_tokens = int(outputs.num_cached_tokens[i])
            sample.token_ids.append(token)
            if i in lp_rows:
                j = lp_rows[i]
                top_ids = outputs.logprobs.top_ids[starts[j]:starts[j + 1]].tolist()
                top_lps = outputs.logprobs.top_logprobs[starts[j]:starts[j + 1]].tolist()
                entry_lp = dict(zip(top_ids, top_lps))
                entry_lp[token] = float(lp.sampled[j])
                sample.logprobs.append(entry_lp)
            if sample.detokenizer is not None and sample.add_text(sample.detokenizer.add(token)):
                sample.finish_reason = "stop"
                to_abort.append(core_id)
                del self.samples[core_id]
            touched[state.request_id] = state
        for finished in outputs.finished:
            entry = self.samples.pop(finished.request_id, None)
            if entry is None:
                continue
            state, sample = entry
            sample.finish_reason = finished.finish_reason
            sample.stop_reason = finished.message or finished.stop_reason
            if sample.detokenizer is not None and sample.add_text(sample.detokenizer.flush()):
                sample.finish_reason = "stop"
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            if state.stream:
                results.append(self._delta(state))
            elif state.finished:
                results.append(self._final(state))
            if state.finished:
                del self.requests[state.request_id]
        return results, to_abort

    def _add_prompt_logprobs(self, prompt: PromptLogprobs) -> None:
        """Append each request's newly scored prompt tokens, in order; tokens it already has
        (scored again when a preempted request was recomputed) are skipped."""
        for core_id, first, rows in prompt.entries():
            entry = self.samples.get(core_id)
            if entry is None or entry[0].prompt_logprobs is None:
                continue
            state = entry[0]
            have, prompt_ids = state.prompt_logprobs, state.prompt_token_ids
            for index, (logprob, rank, top) in enumerate(rows, start=first):
                if index == len(have):
                    top[prompt_ids[index]] = logprob
                    have.append(top)
                    state.prompt_token_ranks.append(rank)

    def _text(self, sample: _Sample) -> str:
        if sample.detokenizer is not None:
            return sample.text
        return self.tokenizer.decode(sample.token_ids,
                                     skip_special_tokens=sample.params.skip_special_tokens)

    def _final(self, state: RequestState) -> RequestOutput:
        completions = [CompletionOutput(s.index, self._text(s), list(s.token_ids), s.finish_reason,
                                        s.stop_reason, s.logprobs) for s in state.samples]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions,
                             num_cached_tokens=state.num_cached_tokens,
                             prompt_logprobs=state.prompt_logprobs,
                             prompt_token_ranks=state.prompt_token_ranks)

    def _delta(self, state: RequestState) -> RequestOutput:
        """What each sample has that the consumer has not had yet."""
        completions = []
        for s in state.samples:
            visible = s.visible_text_len()
            completions.append(CompletionOutput(
                s.index, s.text[s.sent_text:visible], s.token_ids[s.sent_tokens:], s.finish_reason,
                s.stop_reason, s.logprobs[s.sent_tokens:] if s.logprobs is not None else None))
            s.sent_text, s.sent_tokens = max(s.sent_text, visible), len(s.token_ids)
        prompt_logprobs = ranks = None
        if not state.prompt_logprobs_sent:
            prompt_logprobs, ranks = state.prompt_logprobs, state.prompt_token_ranks
            state.prompt_logprobs_sent = True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions,
                             num_cached_tokens=state.num_cached_tokens, delta=True,
                             prompt_logprobs=prompt_logprobs, prompt_token_ranks=ranks)


def _starts(counts) -> list[int]:
    starts = [0]
    for c in counts.tolist():
        starts.append(starts[-1] + c)
    return starts
