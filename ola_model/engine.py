"""A continuous-batching decode engine: requests join and leave the running batch between decode steps.

The running batch shares one left-padded KV cache. A new request is prefilled (new arrivals of the same step
together) and merged into the batch by padding the cache on the left; a finished or aborted request's row is dropped at
once, and cache columns that only padding still uses are trimmed. Each request keeps its own sampling parameters and
random generator, and positions are per request, so a request decodes exactly as it would alone (tested against
:func:`ola_model.generation.generate_ids`).

Prefill and the decode step run :class:`ola_model.decode_step.DecodeStep` (transformers' Qwen2 arithmetic over the
same parameters, without its per-call overhead) unless ``fast_decode=False`` or the decoder's configuration is one it
does not reproduce; then both run transformers' forward. The cache is kept as plain ``(keys, values)`` tensors per
layer.

The engine is synchronous and single-threaded: a server drives ``step()`` from one loop and calls ``add`` / ``abort``
from anywhere (they only touch a lock-protected inbox).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ola_model.decode_step import KV, DecodeStep, unsupported_reason
from ola_model.errors import InputError, LimitError
from ola_model.generation import SamplingParams, process_logits, select_tokens

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One request's result of one engine step."""

    request_id: str
    token_id: int | None  # None when the step produced no token (stop id, abort)
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class _Request:
    request_id: str
    prompt: torch.Tensor  # (L, C)
    params: SamplingParams
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token


class LLMEngine:
    """Iteration-level (continuous) batching over an :class:`~ola_model.model.OlaModel`.

    Args:
        model: the model (its LLM part is used).
        stop_ids: ids that end a request (not emitted).
        max_batch: most requests decoding together; more wait in the queue.
        max_context: prompt + max_new_tokens limit per request (checked in ``add``).
        fast_decode: prefill and decode with :class:`~ola_model.decode_step.DecodeStep` where the decoder allows it
            (False: transformers' forward for every step).
    """

    def __init__(
        self,
        model,
        stop_ids: Sequence[int],
        max_batch: int = 16,
        max_context: int | None = None,
        fast_decode: bool = True,
    ) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.stop_ids = set(stop_ids)
        self.max_batch = max_batch
        self.max_context = max_context or model.config.limits.max_context
        self.vocab_limit = model.config.tokenizer_vocab_size
        self._sdpa = getattr(model.llm.config, "_attn_implementation", None) == "sdpa"  # boolean 4-D masks
        reason = unsupported_reason(model.llm) if fast_decode else "fast_decode=False"
        self._fast = DecodeStep(model.llm) if reason is None else None
        if fast_decode and reason:
            log.info("engine decodes with transformers' forward: %s", reason)
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self._aborted: set[str] = set()
        self._running: list[_Request] = []
        self._kv: KV | None = None  # per layer (keys, values), (B, kv_heads, T, D), left-padded
        self._mask: torch.Tensor | None = None  # (B, T) 1 where the cache column is real for that row
        self._next: torch.Tensor | None = None  # (B,) the last sampled token of each running row
        self.steps = 0
        self.batch_sizes: list[int] = []

    # ------------------------------------------------------------------------------------------------ inbox
    def add(self, request_id: str, prompt: torch.Tensor, params: SamplingParams = SamplingParams()) -> None:
        """Queue a request: prompt embeddings (L, C). Raises LimitError if it cannot fit the context."""
        if prompt.dim() != 2 or prompt.shape[0] == 0:
            raise InputError(f"prompt must be (L>0, C) embeddings, got {tuple(prompt.shape)}")
        total = prompt.shape[0] + params.max_new_tokens
        if total > self.max_context:
            raise LimitError("prompt + max_new_tokens", total, self.max_context, "lower max_new_tokens")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(params.seed)
        with self._lock:
            if any(r.request_id == request_id for r in self._waiting + self._running):
                raise InputError(f"request id {request_id!r} is already in the engine")
            self._aborted.discard(request_id)
            self._waiting.append(_Request(request_id, prompt, params, gen))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its cache row is freed at the start of the next step (or it never starts)."""
        with self._lock:
            self._aborted.add(request_id)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting)

    def cache_tokens(self) -> int:
        """Cache columns x rows currently held (0 when idle): what aborting or finishing frees."""
        return 0 if self._mask is None else int(self._mask.numel())

    # ------------------------------------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """Drop aborted requests, admit waiting ones (prefill), decode one token for every running request."""
        outputs: list[StepOutput] = []
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            kept_waiting = []
            for r in self._waiting:
                if r.request_id in aborted:
                    outputs.append(StepOutput(r.request_id, None, True, "abort"))
                else:
                    kept_waiting.append(r)
            self._waiting = kept_waiting
            free = self.max_batch - len(self._running)
            admitted, self._waiting = self._waiting[:free], self._waiting[free:]
        drop = [i for i, r in enumerate(self._running) if r.request_id in aborted]
        outputs += [StepOutput(self._running[i].request_id, None, True, "abort") for i in drop]
        self._remove(drop)
        with torch.inference_mode():
            first_tokens = self._admit(admitted) if admitted else []
            decoded = self._decode_running(skip=len(admitted)) if len(self._running) > len(admitted) else []
        outputs += self._finish(decoded + first_tokens)
        self.steps += 1
        self.batch_sizes.append(len(self._running))
        return outputs

    def _admit(self, new: list[_Request]) -> list[tuple[int, int]]:
        """Prefill ``new`` together, merge their caches into the batch; returns (row, first token) pairs."""
        model = self.model
        device, dtype = model.device, model.dtype
        lengths = [r.prompt.shape[0] for r in new]
        L = max(lengths)
        C = new[0].prompt.shape[-1]
        embeds = torch.zeros(len(new), L, C, dtype=dtype, device=device)
        mask = torch.zeros(len(new), L, dtype=torch.long, device=device)
        for b, r in enumerate(new):
            embeds[b, L - lengths[b] :] = r.prompt.to(device=device, dtype=dtype)
            mask[b, L - lengths[b] :] = 1
            r.position = lengths[b]
        if self._fast is not None:
            logits, new_layers = self._fast.prefill(embeds, mask)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(
                embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=DynamicCache(),
                use_cache=True,
                logits_to_keep=1,
            )
            logits, new_layers = out.logits[:, -1], _layers(out.cache)
        base = len(self._running)
        if self._kv is None:
            self._kv = new_layers
            self._mask = mask
        else:
            T = max(self._mask.shape[1], L)
            self._kv = [
                (torch.cat([_left_pad(k0, T), _left_pad(k1, T)]), torch.cat([_left_pad(v0, T), _left_pad(v1, T)]))
                for (k0, v0), (k1, v1) in zip(self._kv, new_layers, strict=True)
            ]
            self._mask = torch.cat([F.pad(self._mask, (T - self._mask.shape[1], 0)), F.pad(mask, (T - L, 0))])
        self._running += new
        tokens = self._sample_rows(new, logits)  # logits (N, V)
        return [(base + b, tok) for b, tok in enumerate(tokens)]

    def _decode_running(self, skip: int) -> list[tuple[int, int]]:
        """One decode step for the rows that were running before this step's admissions."""
        n = len(self._running) - skip  # the old rows come first in the batch
        model = self.model
        device = model.device
        # Rows admitted this step already have their first token; run the old rows only, on a batch slice.
        kv = [(k[:n], v[:n]) for k, v in self._kv] if skip else self._kv
        mask = torch.cat([self._mask[:n], torch.ones(n, 1, dtype=self._mask.dtype, device=device)], dim=1)
        positions = torch.tensor([r.position for r in self._running[:n]], device=device)
        if self._fast is not None:
            logits, kv = self._fast(self._next[:n], positions, mask.bool(), kv)
        else:
            embeds = model.embed_tokens(self._next[:n])[:, None]  # (n, 1, C)
            # One query per row: the 4-D mask is just the padding mask. Handing it over ready saves transformers
            # from building it each step.
            attn = mask[:, None, None, :].bool() if self._sdpa else mask
            out = model(
                embeds,
                attention_mask=attn,
                position_ids=positions[:, None],
                cache=DynamicCache(ddp_cache_data=kv),
                use_cache=True,
                logits_to_keep=1,
            )
            logits, kv = out.logits[:, -1], _layers(out.cache)
        if skip:
            # Extend the new rows' cache and mask by one padding column so the batch stays rectangular.
            self._kv = [
                (torch.cat([k, F.pad(k_all[n:], (0, 0, 0, 1))]), torch.cat([v, F.pad(v_all[n:], (0, 0, 0, 1))]))
                for (k, v), (k_all, v_all) in zip(kv, self._kv, strict=True)
            ]
            self._mask = torch.cat([mask, F.pad(self._mask[n:], (0, 1))])
        else:
            self._kv = kv
            self._mask = mask
        for r in self._running[:n]:
            r.position += 1
        return list(enumerate(self._sample_rows(self._running[:n], logits)))

    def _sample_rows(self, rows: list[_Request], logits: torch.Tensor) -> list[int]:
        """Next token of each row from its logits (n, V). Plain greedy rows share one batched argmax."""
        tokens: list[int] = [0] * len(rows)
        plain = [i for i, r in enumerate(rows) if r.params.temperature == 0 and r.params.repetition_penalty == 1.0]
        plain_set = set(plain)
        if plain:
            idx = torch.tensor(plain, device=logits.device)
            ids = logits[idx, : self.vocab_limit].argmax(dim=-1).tolist()  # ids >= vocab_limit are never chosen
            for i, tok in zip(plain, ids, strict=True):
                tokens[i] = tok
        for i, r in enumerate(rows):
            if i not in plain_set:
                processed = process_logits(logits[i : i + 1], [r.generated], r.params, self.vocab_limit)
                tokens[i] = int(select_tokens(processed, r.params, r.generator)[0])
        return tokens

    def _finish(self, tokens: list[tuple[int, int]]) -> list[StepOutput]:
        outputs, done = [], []
        next_ids = torch.zeros(len(self._running), dtype=torch.long, device=self.model.device)
        if self._next is not None:
            keep = min(len(self._next), len(self._running))
            next_ids[:keep] = self._next[:keep]
        for row, tok in sorted(tokens):
            r = self._running[row]
            if tok in self.stop_ids:
                outputs.append(StepOutput(r.request_id, None, True, "stop"))
                done.append(row)
                continue
            r.generated.append(tok)
            next_ids[row] = tok
            finished = len(r.generated) >= r.params.max_new_tokens
            outputs.append(StepOutput(r.request_id, tok, finished, "length" if finished else None))
            if finished:
                done.append(row)
        self._next = next_ids
        self._remove(done)
        return outputs

    def _remove(self, rows: list[int]) -> None:
        """Free the cache rows of finished / aborted requests and trim columns only padding uses."""
        if not rows:
            return
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._kv, self._mask, self._next = None, None, None
            return
        idx = torch.tensor(keep, device=self._mask.device)
        used = self._mask[idx].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self._kv = [(k[idx, :, start:], v[idx, :, start:]) for k, v in self._kv]
        self._mask = self._mask[idx, start:]
        if self._next is not None:
            self._next = self._next[idx]


def _layers(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, length, D) with zeros before the existing columns."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0))
