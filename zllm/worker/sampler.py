"""From logits to tokens, for the whole batch at once.

Order (as in vLLM): raw log-probabilities for `logprobs`; logit bias; penalties; min_tokens
masking; the structured-output bitmask; then greedy rows take the argmax, and the others are
scaled by temperature, filtered by top-k, top-p and min-p, and sampled with the Gumbel-max
trick. The Gumbel noise is a hash of (request seed, output position, token id), not a stateful
generator: a request draws the same tokens whatever else is in the batch, on every
tensor-parallel rank, after preemption, with no per-request loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from zllm.protocol import Logprobs, PromptLogprobs

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingMetadata:
    temperature: Optional[torch.Tensor]  # [B] float32; 0 means greedy (None when all are)
    all_greedy: bool
    top_k: Optional[torch.Tensor]  # [B] int64, vocab size where off; None if no row uses it
    top_p: Optional[torch.Tensor]  # [B] float32; None if no row uses it
    min_p: Optional[torch.Tensor]  # [B] float32; None if no row uses it
    seeds: Optional[torch.Tensor]  # [B] int64 (None when all rows are greedy)
    output_positions: Optional[torch.Tensor]  # [B] int64: tokens generated so far (ditto)
    # Penalties (None if no row has any): per-row factors and token statistics.
    repetition_penalty: Optional[torch.Tensor] = None  # [B]
    presence_penalty: Optional[torch.Tensor] = None  # [B]
    frequency_penalty: Optional[torch.Tensor] = None  # [B]
    seen_tokens: Optional[torch.Tensor] = None  # [B, V] bool: in prompt or output
    output_counts: Optional[torch.Tensor] = None  # [B, V] float32: occurrences in the output
    # (row, token) pairs to forbid: stop tokens of requests below min_tokens.
    banned_rows: Optional[torch.Tensor] = None
    banned_tokens: Optional[torch.Tensor] = None
    num_logprobs: Optional[int] = None  # the largest `logprobs` asked for in the batch
    # logit_bias as (row, token, bias) triples (None if no row has any).
    bias_rows: Optional[torch.Tensor] = None
    bias_tokens: Optional[torch.Tensor] = None
    bias_values: Optional[torch.Tensor] = None
    # Structured outputs: [B, ceil(V / 32)] int32, bit t % 32 of word t // 32 set where token t
    # may come next (xgrammar's layout; all ones for unconstrained rows). None if no row is.
    token_bitmask: Optional[torch.Tensor] = None


# A batch that only samples greedily, with no penalties, bans or log-probabilities.
GREEDY = SamplingMetadata(temperature=None, all_greedy=True, top_k=None, top_p=None, min_p=None,
                          seeds=None, output_positions=None)


@dataclass
class SamplingInputs:
    """A step's sampling settings on the host, one entry per sampled row (None: unused by all).
    `SamplingMetadata.from_inputs` moves them to the device."""

    num_rows: int
    temperature: Optional[np.ndarray] = None  # float32; set when any row samples at random
    top_p: Optional[np.ndarray] = None  # float32
    min_p: Optional[np.ndarray] = None  # float32
    repetition_penalty: Optional[np.ndarray] = None  # float32; the three penalties come together
    presence_penalty: Optional[np.ndarray] = None
    frequency_penalty: Optional[np.ndarray] = None
    top_k: Optional[np.ndarray] = None  # int64
    seeds: Optional[np.ndarray] = None  # int64
    output_positions: Optional[np.ndarray] = None  # int64
    # Penalty statistics as flat (row * vocab + token) indices: every token, output tokens.
    seen_flat: Optional[np.ndarray] = None
    output_flat: Optional[np.ndarray] = None
    banned_rows: Optional[np.ndarray] = None  # int64, with banned_tokens
    banned_tokens: Optional[np.ndarray] = None
    bias_rows: Optional[np.ndarray] = None  # int64; logit_bias as (row, token, bias) triples
    bias_tokens: Optional[np.ndarray] = None  # int64
    bias_values: Optional[np.ndarray] = None  # float32
    num_logprobs: Optional[int] = None


_FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
_INT_COLUMNS = ("top_k", "seeds", "output_positions")


def make_sampling_metadata(inputs: SamplingInputs, vocab_size: int, staging) -> SamplingMetadata:
    """Device tensors for `sample`: the float columns in one copy, the integer ones in another,
    penalty statistics by one scatter each. An all-greedy batch with no extras copies nothing.
    `staging` is the step's PinnedStaging."""
    to_device, to_device_all = staging.to_device, staging.to_device_all
    meta = SamplingMetadata(temperature=None, all_greedy=inputs.temperature is None, top_k=None,
                            top_p=None, min_p=None, seeds=None, output_positions=None,
                            num_logprobs=inputs.num_logprobs)
    for names, dtype in ((_FLOAT_COLUMNS, np.float32), (_INT_COLUMNS, np.int64)):
        present = [n for n in names if getattr(inputs, n) is not None]
        if present:
            columns = to_device_all([getattr(inputs, n) for n in present], dtype)
            for name, column in zip(present, columns):
                setattr(meta, name, column)
    if inputs.seen_flat is not None:
        rows, device = inputs.num_rows, meta.repetition_penalty.device
        seen = torch.zeros(rows * vocab_size, dtype=torch.bool, device=device)
        seen[to_device(inputs.seen_flat)] = True
        counts = torch.zeros(rows * vocab_size, dtype=torch.float32, device=device)
        outputs = to_device(inputs.output_flat)
        counts.index_add_(0, outputs, torch.ones(len(outputs), dtype=torch.float32, device=device))
        meta.seen_tokens = seen.view(rows, vocab_size)
        meta.output_counts = counts.view(rows, vocab_size)
    if inputs.banned_rows is not None and len(inputs.banned_rows):
        banned = to_device(np.stack((inputs.banned_rows, inputs.banned_tokens)))
        meta.banned_rows, meta.banned_tokens = banned[0], banned[1]
    if inputs.bias_rows is not None:
        biased = to_device(np.stack((inputs.bias_rows, inputs.bias_tokens)))
        meta.bias_rows, meta.bias_tokens = biased[0], biased[1]
        meta.bias_values = to_device(inputs.bias_values)
    return meta


def sample(logits: torch.Tensor,
           meta: SamplingMetadata) -> tuple[torch.Tensor, Optional[SampledLogprobs]]:
    """logits [B, V] float32 -> (token ids [B], log-probabilities if any row asked)."""
    logprobs = None
    if meta.num_logprobs is not None:
        logprobs = torch.log_softmax(logits, dim=-1)
    if meta.bias_rows is not None:
        logits = logits.index_put((meta.bias_rows, meta.bias_tokens), meta.bias_values,
                                  accumulate=True)
    if meta.repetition_penalty is not None:
        logits = apply_penalties(logits, meta)
    if meta.banned_rows is not None:
        logits = logits.index_put((meta.banned_rows, meta.banned_tokens),
                                  torch.tensor(float("-inf"), device=logits.device))
    if meta.token_bitmask is not None:
        logits = apply_token_bitmask(logits, meta.token_bitmask)
    tokens = argmax(logits)
    if not meta.all_greedy:
        greedy = meta.temperature == 0
        temperature = torch.where(greedy, torch.ones_like(meta.temperature), meta.temperature)
        scaled = filter_logits(logits / temperature[:, None], meta)
        noise = gumbel_noise(meta.seeds, meta.output_positions, logits.shape[-1])
        sampled = argmax(scaled + noise)
        tokens = torch.where(greedy, tokens, sampled)
    return tokens, _gather_logprobs(logprobs, tokens, meta.num_logprobs)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its maximum: on CUDA in one Triton launch (zllm/worker/argmax.py;
    torch's reduction costs 26 µs a call there), elsewhere torch's."""
    if logits.is_cuda and logits.dtype == torch.float32 and logits.stride(-1) == 1:
        from zllm.worker.argmax import vocab_argmax

        return vocab_argmax(logits)
    return logits.argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    # Repetition (prompt and output tokens): shrink positive logits, grow negative ones.
    rep = meta.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(meta.seen_tokens, penalised, logits)
    # Presence and frequency (output tokens only), as in the OpenAI API.
    counts = meta.output_counts
    logits = logits - meta.frequency_penalty[:, None] * counts
    return logits - meta.presence_penalty[:, None] * (counts > 0).float()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where a token's bit is 0: xgrammar's own kernel on CPU (in place), plain tensor ops
    on a device (nothing compiled at run time)."""
    if logits.device.type == "cpu":
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1])
        return logits
    return masked_by_bitmask(logits, bitmask)


def masked_by_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The int32 words read as little-endian bytes: bit t of a row is bit t % 8 of byte t // 8,
    so unpacking takes a few elementwise kernels."""
    num_rows, vocab = logits.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    bits = (bitmask.view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    allowed = bits.view(num_rows, -1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def filter_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Set to -inf every token outside top-k, the top-p nucleus, or under min-p."""
    neg_inf = float("-inf")
    if meta.top_k is not None or meta.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if meta.top_k is not None:
            ranks = torch.arange(logits.shape[-1], device=logits.device)
            drop |= ranks[None, :] >= meta.top_k[:, None]
        if meta.top_p is not None:
            probs = sorted_logits.masked_fill(drop, neg_inf).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always stays
            drop |= mass_before >= meta.top_p[:, None]
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, neg_inf))
    if meta.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = meta.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the 'lowbias32' finaliser) on int64 tensors holding uint32 values.

    int64 products wrap on overflow, and masking keeps exactly the low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V], a pure function of (seed, position, token id)."""
    key = _mix32((seeds & _MASK32) ^ _mix32((seeds >> 32) ^ _mix32(positions & _MASK32)))
    token_ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix32((key[:, None] + token_ids[None, :] * 0x9E3779B9) & _MASK32)
    return -torch.log(-torch.log(uniform_from_bits(bits)))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1), never 0 or 1, from 32 random bits. 23 bits: (n + 0.5) / 2**23 is
    exact in float32, whereas with 24 bits the largest, 2**24 - 0.5, rounds up to 2**24, so
    the noise of 1 token in 2**24 was +inf and that token won whatever its logit (-inf: NaN)."""
    return ((bits >> 9).float() + 0.5) / float(1 << 23)


@dataclass
class SampledLogprobs:
    """Log-probabilities of a step's sampled tokens, on the device or (`pinned`) in flight to
    the host: read back (`to_host`) with the tokens, after the step, so that sampling never
    waits for the GPU."""

    sampled: torch.Tensor  # [B]
    top_ids: torch.Tensor  # [B, N]
    top_logprobs: torch.Tensor  # [B, N]

    def pinned(self) -> "SampledLogprobs":
        return SampledLogprobs(*map(pinned_copy, (self.sampled, self.top_ids, self.top_logprobs)))

    def to_host(self) -> Logprobs:
        return Logprobs(self.sampled.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist())


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor that a copy queued on the current stream fills (read it once the
    stream has passed this point: reading a device tensor instead would wait for everything
    queued since)."""
    if not tensor.numel():  # (no logprobs but the sampled one's: top-0 columns)
        return torch.empty(tensor.shape, dtype=tensor.dtype)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _gather_logprobs(logprobs: Optional[torch.Tensor], tokens: torch.Tensor,
                     num: Optional[int]) -> Optional[SampledLogprobs]:
    if logprobs is None:
        return None
    sampled = logprobs.gather(-1, tokens[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(num, dim=-1) if num else (logprobs[:, :0], tokens[:, None][:, :0])
    return SampledLogprobs(sampled, top_ids, top_values)


# Prompt positions scored per logits matmul: bounds the float32 [rows, vocab] temporaries.
PROMPT_LOGPROBS_CHUNK = 1024


@dataclass
class DevicePromptLogprobs:
    """A step's prompt log-probabilities, still on the device (read back with its tokens)."""

    request_ids: list[str]
    first_indices: np.ndarray
    counts: np.ndarray
    num_top: np.ndarray  # per request
    logprobs: torch.Tensor  # [rows]
    ranks: torch.Tensor  # [rows]
    top_ids: torch.Tensor  # [rows, max(num_top)]
    top_logprobs: torch.Tensor

    def pinned(self) -> "DevicePromptLogprobs":
        """The same, with its tensors in flight to pinned host memory (see pinned_copy)."""
        return dataclasses.replace(self, logprobs=pinned_copy(self.logprobs),
                                   ranks=pinned_copy(self.ranks), top_ids=pinned_copy(self.top_ids),
                                   top_logprobs=pinned_copy(self.top_logprobs))

    def to_host(self) -> PromptLogprobs:
        k = np.repeat(self.num_top, self.counts)  # each row keeps its request's top-N
        keep = np.arange(self.top_ids.shape[1])[None, :] < k[:, None]
        return PromptLogprobs(self.request_ids, self.first_indices.astype(np.int32),
                              self.counts.astype(np.int32), self.num_top.astype(np.int32),
                              self.logprobs.cpu().numpy().astype(np.float32),
                              self.ranks.cpu().numpy().astype(np.int32),
                              self.top_ids.cpu().numpy()[keep].astype(np.int32),
                              self.top_logprobs.cpu().numpy()[keep].astype(np.float32))


def prompt_logprobs(compute_logits, hidden: torch.Tensor, rows: np.ndarray,
                    targets: np.ndarray, max_top: int) -> tuple[torch.Tensor, ...]:
    """Raw log-probabilities (before any sampling setting, as for `logprobs`) of the `targets`
    after the hidden states at `rows`, their ranks, and the top `max_top`, in chunks of rows."""
    device = hidden.device
    rows_t = torch.as_tensor(rows, device=device)
    targets_t = torch.as_tensor(targets, device=device)
    out = torch.empty(len(rows), dtype=torch.float32, device=device)
    ranks = torch.empty(len(rows), dtype=torch.long, device=device)
    top_values = torch.empty(len(rows), max_top, dtype=torch.float32, device=device)
    top_ids = torch.empty(len(rows), max_top, dtype=torch.long, device=device)
    for s in range(0, len(rows), PROMPT_LOGPROBS_CHUNK):
        part = slice(s, s + PROMPT_LOGPROBS_CHUNK)
        logprobs = torch.log_softmax(compute_logits(hidden[rows_t[part]]).float(), dim=-1)
        target = logprobs.gather(-1, targets_t[part, None])
        out[part] = target[:, 0]
        ranks[part] = (logprobs > target).sum(-1) + 1
        if max_top:
            top_values[part], top_ids[part] = logprobs.topk(max_top, dim=-1)
    return out, ranks, top_ids, top_values
