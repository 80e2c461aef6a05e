"""Decoding: sampling rules, batched greedy == one-by-one, streaming deltas, limits."""

import pytest
import torch

from ola_model import InputError, LimitError, SamplingParams
from ola_model.generation import IncrementalDetokenizer, generate_ids, process_logits, stream_text


def _prompt(model, seed, length):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 900, (length,), generator=g)
    with torch.no_grad():
        return model.embed_tokens(ids)


def test_defaults_are_olas_infer_settings():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.2, 20, None, 1.05)


def test_greedy_batched_equals_one_by_one(tiny_model):
    params = SamplingParams.greedy(max_new_tokens=12)
    prompts = [_prompt(tiny_model, s, n) for s, n in [(1, 7), (2, 19), (3, 3), (4, 11)]]
    alone = [generate_ids(tiny_model, [p], params, stop_ids=[])[0] for p in prompts]
    batched = generate_ids(tiny_model, prompts, params, stop_ids=[])
    assert batched == alone
    assert all(len(x) == 12 for x in alone)
    assert len({tuple(x) for x in alone}) > 1  # different prompts, different answers


def test_greedy_decode_matches_a_full_forward_recomputation(tiny_model):
    """The KV-cache loop gives the same tokens as recomputing the whole sequence each step."""
    prompt = _prompt(tiny_model, 5, 9)
    got = generate_ids(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=8), stop_ids=[])[0]
    seq = prompt
    expected = []
    with torch.no_grad():
        for _ in range(8):
            logits = tiny_model(seq[None]).logits[0, -1]
            logits[tiny_model.config.tokenizer_vocab_size :] = float("-inf")
            tok = int(logits.argmax())
            expected.append(tok)
            seq = torch.cat([seq, tiny_model.embed_tokens(torch.tensor([tok]))])
    assert got == expected


def test_stop_ids_end_a_sequence_and_are_not_returned(tiny_model):
    prompt = _prompt(tiny_model, 1, 7)
    free = generate_ids(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=6), stop_ids=[])[0]
    stopped = generate_ids(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=6), stop_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_ids_beyond_the_tokenizer_are_never_sampled():
    logits = torch.zeros(1, 10)
    logits[0, 8:] = 100.0  # rows the checkpoint has but the tokenizer lacks
    out = process_logits(logits, [[]], SamplingParams(temperature=1.0, top_k=0, repetition_penalty=1.0), 8)
    assert torch.isinf(out[0, 8:]).all() and torch.isfinite(out[0, :8]).all()


def test_repetition_penalty_top_k_and_top_p():
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 3.0]])
    pen = process_logits(logits, [[0, 1]], SamplingParams(temperature=0, top_k=0, repetition_penalty=2.0), 5)
    assert pen[0, 0] == 1.0 and pen[0, 1] == -2.0 and pen[0, 4] == 3.0  # positive / p, negative * p
    topk = process_logits(logits, [[]], SamplingParams(temperature=1.0, top_k=2, repetition_penalty=1.0), 5)
    assert torch.isfinite(topk[0]).tolist() == [True, False, False, False, True]
    topp = process_logits(logits, [[]], SamplingParams(temperature=1.0, top_k=0, top_p=0.6, repetition_penalty=1.0), 5)
    assert torch.isfinite(topp[0]).sum() == 1 and torch.isfinite(topp[0, 4])  # p(3.0) ~ 0.63 >= 0.6
    scaled = process_logits(logits, [[]], SamplingParams(temperature=0.5, top_k=0, repetition_penalty=1.0), 5)
    torch.testing.assert_close(scaled, logits * 2)


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    prompt = _prompt(tiny_model, 9, 5)
    params = SamplingParams(temperature=1.5, top_k=0, max_new_tokens=10, seed=123)
    a = generate_ids(tiny_model, [prompt], params, stop_ids=[])[0]
    b = generate_ids(tiny_model, [prompt], params, stop_ids=[])[0]
    c = generate_ids(tiny_model, [prompt], params.with_(seed=7), stop_ids=[])[0]
    assert a == b and a != c


def test_streamed_deltas_add_up_to_the_decoded_answer(tiny_model, tiny_tok):
    prompt = _prompt(tiny_model, 4, 13)
    params = SamplingParams.greedy(max_new_tokens=20)
    deltas = list(stream_text(tiny_model, prompt, tiny_tok, params, stop_ids=[]))
    ids = generate_ids(tiny_model, [prompt], params, stop_ids=[])[0]
    assert "".join(deltas) == tiny_tok.decode(ids, skip_special_tokens=True)
    assert len(deltas) > 1


def test_incremental_detokenizer_holds_back_partial_utf8(tiny_tok):
    ids = tiny_tok("héllo wörld ✓", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "héllo wörld ✓"
    assert all("\ufffd" not in d for d in deltas)


def test_limits_and_bad_parameters_are_clear_errors(tiny_model):
    prompt = _prompt(tiny_model, 1, 10)
    with pytest.raises(LimitError, match="limit of 16"):
        generate_ids(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=8), [], max_context=16)
    with pytest.raises(InputError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_incremental_detokenizer_matches_a_full_decode_on_long_random_output(tiny_tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tiny_tok), (600,), generator=g).tolist()
    detok = IncrementalDetokenizer(tiny_tok)
    text = "".join(detok.push(i) for i in ids)
    full = tiny_tok.decode(ids, skip_special_tokens=True)
    assert text == full  # seed 0 ends on a complete character; nothing is lost or duplicated
