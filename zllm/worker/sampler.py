"""From logits to tokens, for the whole batch at once.

Order (as in vLLM): raw log-probabilities for `logprobs`; logit bias; penalties; min_tokens
masking; the structured-output bitmask; then greedy rows take the argmax, and the others are
scaled by temperature, filtered by top-k, top-p and min-p, and sampled with the Gumbel-max trick. The Gumbel noise is a hash of (request seed,
output position, token id), not a stateful generator: a request draws the same tokens whatever
else is in the batch, on every tensor-parallel rank, after preemption, with no per-request loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from zllm.protocol import Logprobs

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


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, Optional[Logprobs]]:
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
    tokens = logits.argmax(dim=-1)
    if not meta.all_greedy:
        greedy = meta.temperature == 0
        temperature = torch.where(greedy, torch.ones_like(meta.temperature), meta.temperature)
        scaled = filter_logits(logits / temperature[:, None], meta)
        noise = gumbel_noise(meta.seeds, meta.output_positions, logits.shape[-1])
        sampled = (scaled + noise).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, sampled)
    return tokens, _gather_logprobs(logprobs, tokens, meta.num_logprobs)


def set_logit_bias(meta: SamplingMetadata, biases: list[Optional[dict[int, float]]],
                   device: torch.device) -> None:
    """The rows' logit_bias (token id -> bias, or None) as (row, token, bias) tensors."""
    triples = [(row, t, b) for row, bias in enumerate(biases) if bias for t, b in bias.items()]
    if triples:
        rows, tokens, values = zip(*triples)
        meta.bias_rows = torch.tensor(rows, dtype=torch.long, device=device)
        meta.bias_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
        meta.bias_values = torch.tensor(values, dtype=torch.float32, device=device)


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


def _gather_logprobs(logprobs: Optional[torch.Tensor], tokens: torch.Tensor,
                     num: Optional[int]) -> Optional[Logprobs]:
    if logprobs is None:
        return None
    sampled = logprobs.gather(-1, tokens[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(num, dim=-1) if num else (logprobs[:, :0], tokens[:, None][:, :0])
    return Logprobs(sampled.tolist(), top_ids.tolist(), top_values.tolist())
