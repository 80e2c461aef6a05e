"""Decoding: Ola's sampling, a batched KV-cache decode loop, and a streaming generator of text deltas.

Defaults follow Ola's ``infer.py`` merged with its ``generation_config.json``: temperature 0.2, top-k 20, no top-p,
repetition penalty 1.05 (over generated ids only, since the prompt is embeddings), stop on ``<|im_end|>`` or
``<|endoftext|>``. Logits of ids the tokenizer does not have (the checkpoint has 152064 rows for 151670 tokens) are
never sampled. Batched decoding left-pads prompts, so greedy batched output equals one-by-one output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from ola_model.errors import InputError, LimitError


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. ``temperature == 0`` is greedy."""

    temperature: float = 0.2
    top_k: int = 20
    top_p: float | None = None
    repetition_penalty: float = 1.05
    max_new_tokens: int = 1024
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, repetition_penalty: float = 1.0) -> SamplingParams:
        return cls(temperature=0.0, top_k=0, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)


def process_logits(
    logits: torch.Tensor, generated: Sequence[Sequence[int]], params: SamplingParams, vocab_limit: int
) -> torch.Tensor:
    """Apply vocab masking, repetition penalty, temperature, top-k and top-p to logits (B, V) (float32 copy)."""
    logits = logits.float().clone()
    logits[:, vocab_limit:] = float("-inf")
    if params.repetition_penalty != 1.0:
        for b, ids in enumerate(generated):
            if ids:
                idx = torch.tensor(sorted(set(ids)), device=logits.device)
                vals = logits[b, idx]
                logits[b, idx] = torch.where(
                    vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
                )
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def select_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Processed logits (B, V) -> next ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode(
    model,
    prompts: Sequence[torch.Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    stop_ids: Sequence[int],
    max_context: int | None = None,
) -> Iterator[list[int | None]]:
    """Batched KV-cache decoding over prompt embeddings.

    Args:
        model: an :class:`~ola_model.model.OlaModel`.
        prompts: B prompt embeddings (L_b, C); left-padded into one batch.
        params: one SamplingParams for all, or one per prompt.
        stop_ids: ids that end a sequence (not yielded).
        max_context: prompt + generated positions may not exceed this (``LimitError`` up front).
    Yields:
        per step, a list of B new ids, ``None`` for sequences already finished. Stops when all are finished.
    """
    B = len(prompts)
    if B == 0:
        return
    per = list(params) if not isinstance(params, SamplingParams) else [params] * B
    if len(per) != B:
        raise InputError(f"{len(per)} sampling params for {B} prompts")
    max_new = max(p.max_new_tokens for p in per)
    lengths = [p.shape[0] for p in prompts]
    if max_context is not None and max(lengths) + max_new > max_context:
        raise LimitError("prompt + max_new_tokens", max(lengths) + max_new, max_context, "lower max_new_tokens")
    device, dtype = model.device, model.dtype
    L = max(lengths)
    C = prompts[0].shape[-1]
    embeds = torch.zeros(B, L, C, dtype=dtype, device=device)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        embeds[b, L - p.shape[0] :] = p.to(device=device, dtype=dtype)
        mask[b, L - p.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = []
    for p in per:
        g = None
        if p.seed is not None:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed)
        generators.append(g)
    vocab_limit = model.config.tokenizer_vocab_size
    stop = set(stop_ids)
    generated: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    cache = None
    step_embeds, step_mask, step_pos = embeds, mask, positions
    with torch.inference_mode():
        for _ in range(max_new):
            out = model(
                step_embeds,
                attention_mask=step_mask,
                position_ids=step_pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
            logits = out.logits[:, -1]  # (B, V)
            new: list[int | None] = []
            for b in range(B):
                if done[b]:
                    new.append(None)
                    continue
                processed = process_logits(logits[b : b + 1], [generated[b]], per[b], vocab_limit)
                tok = int(select_tokens(processed, per[b], generators[b])[0])
                if tok in stop:
                    done[b] = True
                    new.append(None)
                    continue
                generated[b].append(tok)
                if len(generated[b]) >= per[b].max_new_tokens:
                    done[b] = True
                new.append(tok)
            yield new
            if all(done):
                return
            next_ids = torch.tensor([t if t is not None else next(iter(stop)) for t in new], device=device)
            step_embeds = model.embed_tokens(next_ids)[:, None]  # (B, 1, C)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            step_mask = mask
            step_pos = positions[:, -1:] + 1
            positions = torch.cat([positions, step_pos], dim=1)


def generate_ids(
    model,
    prompts: Sequence[torch.Tensor],
    params: SamplingParams | Sequence[SamplingParams],
    stop_ids: Sequence[int],
    max_context: int | None = None,
) -> list[list[int]]:
    """Run :func:`decode` to the end: the generated ids of each prompt (stop id excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode(model, prompts, params, stop_ids, max_context):
        for b, tok in enumerate(step):
            if tok is not None:
                out[b].append(tok)
    return out


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas, holding back incomplete UTF-8 sequences.

    Each push decodes only the ids since the last emitted delta plus the ones before it (for context-dependent
    merges), so the cost per token stays constant however long the answer grows.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids up to here are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        text = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing new, or a multi-byte char incomplete
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]


def stream_text(
    model,
    prompt: torch.Tensor,
    tokenizer,
    params: SamplingParams = SamplingParams(),
    stop_ids: Sequence[int] | None = None,
    max_context: int | None = None,
) -> Iterator[str]:
    """Stream the answer to one prompt (L, C) as text deltas."""
    from ola_model.tokenizer import stop_token_ids

    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    detok = IncrementalDetokenizer(tokenizer)
    for step in decode(model, [prompt], params, stops, max_context):
        if step[0] is not None:
            delta = detok.push(step[0])
            if delta:
                yield delta
