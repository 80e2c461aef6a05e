"""The engine's lean decode step against transformers' Qwen2 forward: same logits, same cache, padded rows too."""

import pytest
import torch
from transformers import DynamicCache

from ola_model import OlaConfig, build_model
from ola_model.decode_step import DecodeStep, unsupported_reason


def _model(dtype):
    cfg = OlaConfig.from_name("tiny").with_overrides(
        {"llm": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 3}}
    )
    return build_model(cfg, seed=3).to(dtype).eval()


def _left_padded(model, lengths: list[int], dtype, seed: int):
    """Random prompt embeddings of ``lengths``, left-padded to the longest: embeds (B, L, C), mask and positions
    (B, L) as the engine makes them."""
    g = torch.Generator().manual_seed(seed)
    B, L, C = len(lengths), max(lengths), model.config.llm.hidden_size
    embeds = torch.randn(B, L, C, generator=g).to(dtype)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, L - n :] = 1
    return embeds, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_transformers_forward_on_left_padded_rows(dtype, atol):
    model = _model(dtype)
    lengths = [7, 3, 11]  # rows of different lengths, left-padded to 11
    B = len(lengths)
    embeds, mask, positions = _left_padded(model, lengths, dtype, seed=0)
    step = DecodeStep(model.llm)
    with torch.inference_mode():
        prefill = model(embeds, attention_mask=mask, position_ids=positions, cache=DynamicCache(), use_cache=True)
        kv = [(layer.keys, layer.values) for layer in prefill.cache.layers]
        ref_cache = prefill.cache
        tokens = torch.tensor([5, 17, 300])
        pos = torch.tensor(lengths)
        for _ in range(4):  # several steps: the cache grows and positions move on
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            ref = model(
                model.embed_tokens(tokens)[:, None],
                attention_mask=mask,
                position_ids=pos[:, None],
                cache=ref_cache,
                use_cache=True,
            )
            logits, kv = step(tokens, pos, mask.bool(), kv)
            torch.testing.assert_close(logits, ref.logits[:, -1], atol=atol, rtol=0)
            for (k, v), layer in zip(kv, ref.cache.layers, strict=True):
                torch.testing.assert_close(k, layer.keys, atol=atol, rtol=0)
                torch.testing.assert_close(v, layer.values, atol=atol, rtol=0)
            ref_cache = ref.cache
            tokens = logits.argmax(-1)
            pos = pos + 1
    assert logits.dtype == dtype and logits.shape == (B, model.config.llm.vocab_size)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lengths", [[9, 1, 13, 13], [13], [6, 6]], ids=["padded", "one", "unpadded"])
def test_prefill_matches_transformers_forward_on_left_padded_rows(dtype, atol, lengths):
    """The lean prefill gives transformers' last-position logits and cache on every real column; the padding
    columns stay finite (a NaN there would leak into later steps through zero attention weights). Without padding
    it takes the unmasked causal kernel."""
    model = _model(dtype)
    B = len(lengths)
    embeds, mask, positions = _left_padded(model, lengths, dtype, seed=1)
    step = DecodeStep(model.llm)
    with torch.inference_mode():
        ref = model(
            embeds, attention_mask=mask, position_ids=positions, cache=DynamicCache(), use_cache=True, logits_to_keep=1
        )
        logits, kv = step.prefill(embeds, mask)
        torch.testing.assert_close(logits, ref.logits[:, -1], atol=atol, rtol=0)
        real = mask.bool()[:, None, :, None]  # (B, 1, L, 1) against (B, kv_heads, L, D)
        for (k, v), layer in zip(kv, ref.cache.layers, strict=True):
            assert k.shape == layer.keys.shape and v.shape == layer.values.shape
            assert torch.isfinite(k).all() and torch.isfinite(v).all()
            torch.testing.assert_close(k * real, layer.keys * real, atol=atol, rtol=0)
            torch.testing.assert_close(v * real, layer.values * real, atol=atol, rtol=0)
        # Decoding on from the lean cache gives what decoding on from transformers' cache gives.
        ref_kv = [(layer.keys, layer.values) for layer in ref.cache.layers]
        tokens, pos = torch.tensor([5, 17, 300, 2][:B]), torch.tensor(lengths)
        step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1).bool()
        ours, _ = step(tokens, pos, step_mask, kv)
        theirs, _ = step(tokens, pos, step_mask, ref_kv)
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


def test_reads_the_live_parameters():
    """No copies of the weights: a change to the module shows in the next step."""
    model = _model(torch.float32)
    step = DecodeStep(model.llm)
    with torch.inference_mode():
        prefill = model(torch.randn(1, 4, 96), cache=DynamicCache(), use_cache=True)
        kv = [(layer.keys, layer.values) for layer in prefill.cache.layers]
        args = (torch.tensor([9]), torch.tensor([4]), torch.ones(1, 5, dtype=torch.bool))
        before, _ = step(*args, kv)
        model.llm.lm_head.weight.mul_(2)
        after, _ = step(*args, kv)
    torch.testing.assert_close(after, before * 2)


def test_unsupported_decoders_are_named():
    model = _model(torch.float32)
    assert unsupported_reason(model.llm) is None
    model.llm.model.rotary_emb.rope_type = "yarn"
    assert "RoPE" in unsupported_reason(model.llm)
    with pytest.raises(ValueError, match="RoPE type"):
        DecodeStep(model.llm)
    assert unsupported_reason(torch.nn.Linear(2, 2)) == "not a transformers Qwen2 decoder"
