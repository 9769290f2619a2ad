"""Structured outputs on a worker: one xgrammar matcher per constrained request.

Each step, for the requests that sample, the matchers fill a token bitmask on the host (one bit
per vocabulary id: may this token come next?), in one call across the batch that xgrammar
spreads over threads. The bitmask travels to the device (from pinned memory on CUDA) and the
sampler sets the logits of forbidden tokens to -inf, so constrained and unconstrained requests
share one batch. When a step's tokens reach the host, each matcher advances by its request's
token.

A grammar is compiled against the model's vocabulary (xgrammar's TokenizerInfo, built once from
the tokenizer files, with the model's vocabulary size and end tokens) in a background thread as
soon as its request arrives, and cached by spec; the step that first samples the request waits
for it, by then usually long done (the prompt's prefill ran meanwhile). The engine core never
compiles anything. The model runner makes its GrammarMatchers with the first constrained request,
so a worker that serves only plain requests runs none of this.

A finished grammar allows only the end tokens, so the request ends with finish_reason "stop".
With ignore_eos, the request goes on after that, unconstrained (as in vLLM). Every
tensor-parallel rank runs its own matchers: the ranks sample the same tokens from the same
logits, so their matchers agree.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import time
from typing import Optional

import numpy as np
import torch

from zllm.protocol import SchedulerOutput
from zllm.structured_outputs import StructuredOutputs, build_grammar

logger = logging.getLogger(__name__)


class _Request:
    """A constrained request's matcher (made when it first samples) and its grammar."""

    def __init__(self, grammar: concurrent.futures.Future, replay: list[int]) -> None:
        self.grammar = grammar
        self.replay = replay  # output tokens from before a preemption, accepted on creation
        self.matcher = None
        self.active = True  # false once the grammar has ended (or a token broke it)


class GrammarMatchers:
    """The matchers of a worker's constrained requests, and the bitmask they fill each step."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int],
                 device: torch.device, max_threads: Optional[int] = None) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        # Threads of the batched bitmask fill and of compilation (xgrammar's own pools).
        self.max_threads = max_threads or min(8, os.cpu_count() or 1)
        self.requests: dict[str, _Request] = {}
        self.compiled: dict[tuple, concurrent.futures.Future] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._compiler: Optional[concurrent.futures.Future] = None
        self._batch = None  # xgrammar.BatchGrammarMatcher
        # Per step with constrained rows: host seconds filling the bitmask, host seconds
        # advancing matchers since the previous fill, constrained rows (for benchmarks).
        self.step_times: collections.deque = collections.deque(maxlen=8192)
        self._accept_s = 0.0

    # -- requests --------------------------------------------------------------------------------

    def add(self, req_id: str, spec: StructuredOutputs, output_token_ids: list[int]) -> None:
        """Start compiling the request's grammar (cached by spec)."""
        key = spec.key()
        if key not in self.compiled:
            if self._compiler is None:  # the vocabulary, once: on the first constrained request
                self._compiler = self.pool.submit(self._make_compiler)
            self.compiled[key] = self.pool.submit(self._compile, spec)
        self.requests[req_id] = _Request(self.compiled[key], list(output_token_ids))

    def update(self, sched: SchedulerOutput) -> None:
        """A step's deltas: forget finished and preempted requests, start compiling the
        grammars of new constrained ones (a resumed one replays its output tokens)."""
        if self.requests:
            for req_id in sched.finished_req_ids + sched.preempted_req_ids:
                self.requests.pop(req_id, None)
        for new in sched.new_requests:
            spec = new.sampling_params.structured_outputs
            if spec is not None:
                self.add(new.req_id, spec, new.output_token_ids.tolist())

    def constrains(self, req_ids: list[str]) -> bool:
        """Whether any of these requests is under a grammar (cheap: no matcher is touched)."""
        return bool(self.requests) and any(r in self.requests for r in req_ids)

    def _make_compiler(self):
        import xgrammar as xgr

        from zllm.tokenizer import load_tokenizer

        info = xgr.TokenizerInfo.from_huggingface(load_tokenizer(self.tokenizer_path),
                                                  vocab_size=self.vocab_size,
                                                  stop_token_ids=self.eos_token_ids or None)
        self._batch = xgr.BatchGrammarMatcher(self.max_threads)
        return xgr.GrammarCompiler(info, max_threads=self.max_threads)

    def _compile(self, spec: StructuredOutputs):
        return self._compiler.result().compile_grammar(build_grammar(spec))

    def _matcher(self, request: _Request):
        if request.matcher is None:
            import xgrammar as xgr

            request.matcher = xgr.GrammarMatcher(request.grammar.result())
            for token in request.replay:
                self._advance(request, token)
            request.replay = []
        return request.matcher

    # -- per step --------------------------------------------------------------------------------

    def bitmask(self, req_ids: list[str], staging) -> Optional[torch.Tensor]:
        """The bitmask [rows, ceil(vocab / 32)] int32 of a step's sampling rows, on the device
        (all ones for unconstrained rows); None if no row is constrained. It is filled in place
        in the step's pinned staging memory (`staging`, a PinnedStaging), so the copy does not
        wait for the device."""
        t0 = time.perf_counter()
        rows, matchers = [], []
        for i, req_id in enumerate(req_ids):
            request = self.requests.get(req_id)
            if request is not None and request.active:
                matcher = self._matcher(request)
                if not matcher.is_terminated():
                    rows.append(i)
                    matchers.append(matcher)
        if not rows:
            return None
        host = staging.alloc((len(req_ids), -(-self.vocab_size // 32)), np.int32)
        if len(rows) < len(req_ids):
            free = np.ones(len(req_ids), dtype=bool)
            free[rows] = False
            host.numpy()[free] = -1  # every bit set: any token
            self._batch.batch_fill_next_token_bitmask(matchers, host, rows)
        else:  # (indices cost xgrammar a little even when they are 0..n-1)
            self._batch.batch_fill_next_token_bitmask(matchers, host)
        bitmask = host.to(self.device, non_blocking=True)
        self.step_times.append((time.perf_counter() - t0, self._accept_s, len(rows)))
        self._accept_s = 0.0
        return bitmask

    def accept(self, req_ids: list[str], tokens: list[int]) -> None:
        """Advance the matchers of these requests by the tokens they sampled (one call into
        xgrammar for the batch)."""
        import xgrammar as xgr

        t0 = time.perf_counter()
        advancing, matchers, taken = [], [], []
        for req_id, token in zip(req_ids, tokens):
            request = self.requests.get(req_id)
            if request is None or not request.active or request.matcher is None:
                continue
            if request.matcher.is_terminated():
                request.active = False  # ended (and with ignore_eos, went on): unconstrained
                continue
            advancing.append(request)
            matchers.append(request.matcher)
            taken.append(token)
        if matchers:
            accepted = xgr.BatchGrammarMatcher.batch_accept_token(matchers, taken)
            for request, ok, token in zip(advancing, accepted, taken):
                if not ok:
                    self._rejected(request, token)
        self._accept_s += time.perf_counter() - t0

    def _advance(self, request: _Request, token: int) -> None:
        if request.matcher.is_terminated():
            request.active = False
        elif not request.matcher.accept_token(token):
            self._rejected(request, token)

    @staticmethod
    def _rejected(request: _Request, token: int) -> None:
        # Only when the grammar's own tokens were all forbidden (min_tokens banning the end
        # token of a finished grammar): the request goes on unconstrained.
        logger.warning("a constrained request sampled token %d outside its grammar; it "
                       "continues unconstrained", token)
        request.active = False

    def take_step_times(self) -> list[tuple[float, float, int]]:
        times = list(self.step_times)
        self.step_times.clear()
        return times

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
