"""Continuous batching: requests joining and leaving between steps decode exactly as they would alone."""

import pytest
import torch

from ola_model import InputError, LimitError, SamplingParams
from ola_model.engine import LLMEngine
from ola_model.generation import generate_ids


def _prompt(model, seed, length):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.embed_tokens(torch.randint(10, 900, (length,), generator=g))


def _run(engine, arrivals):
    """arrivals: {step: [(id, prompt, params)]}. Returns {id: tokens}, {id: finish reason}."""
    tokens, reasons = {}, {}
    step = 0
    while engine.has_work() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.pop(step, []):
            engine.add(rid, prompt, params)
            tokens[rid] = []
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        step += 1
    return tokens, reasons


@pytest.mark.parametrize("fast_decode", [True, False], ids=["decode-step", "transformers"])
def test_requests_joining_at_different_steps_match_one_by_one(tiny_model, fast_decode):
    greedy = SamplingParams.greedy(max_new_tokens=10)
    sampled = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=7, seed=11)
    specs = {"a": (1, 5, greedy), "b": (2, 17, greedy), "c": (3, 9, sampled), "d": (4, 30, greedy), "e": (5, 3, greedy)}
    arrivals = {0: ["a", "b"], 3: ["c"], 4: ["d"], 12: ["e"]}
    prompts = {k: _prompt(tiny_model, seed, n) for k, (seed, n, _) in specs.items()}
    engine = LLMEngine(tiny_model, stop_ids=[], max_batch=8, fast_decode=fast_decode)
    assert (engine._fast is not None) == fast_decode
    got, reasons = _run(engine, {s: [(k, prompts[k], specs[k][2]) for k in ks] for s, ks in arrivals.items()})
    for k, (_, _, params) in specs.items():
        assert got[k] == generate_ids(tiny_model, [prompts[k]], params, stop_ids=[])[0], k
        assert reasons[k] == "length"
    assert max(engine.batch_sizes) >= 3  # they really ran together
    assert engine.num_running == 0 and engine.cache_tokens() == 0  # everything freed


def test_max_batch_queues_the_rest(tiny_model):
    params = SamplingParams.greedy(max_new_tokens=4)
    engine = LLMEngine(tiny_model, stop_ids=[], max_batch=2)
    prompts = {f"r{i}": _prompt(tiny_model, i, 4 + i) for i in range(5)}
    got, _ = _run(engine, {0: [(k, p, params) for k, p in prompts.items()]})
    assert max(engine.batch_sizes) == 2
    for k, p in prompts.items():
        assert got[k] == generate_ids(tiny_model, [p], params, stop_ids=[])[0]


def test_abort_frees_the_row_at_once_and_others_continue(tiny_model):
    params = SamplingParams.greedy(max_new_tokens=12)
    engine = LLMEngine(tiny_model, stop_ids=[])
    pa, pb = _prompt(tiny_model, 1, 40), _prompt(tiny_model, 2, 6)
    engine.add("long", pa, params)
    engine.add("short", pb, params)
    engine.step()
    engine.step()
    before = engine.cache_tokens()
    engine.abort("long")
    outs = engine.step()
    assert any(o.request_id == "long" and o.finish_reason == "abort" for o in outs)
    assert engine.num_running == 1
    assert engine.cache_tokens() < before / 3  # the 40-token row and its padding columns are gone
    rest = []
    while engine.has_work():
        rest += [o.token_id for o in engine.step() if o.request_id == "short" and o.token_id is not None]
    expected = generate_ids(tiny_model, [pb], params, stop_ids=[])[0]
    assert rest == expected[3:]
    engine.add("w", pb, params)
    engine.abort("w")
    assert [o.finish_reason for o in engine.step()] == ["abort"]  # a waiting request never starts


def test_stop_ids_and_limits(tiny_model):
    prompt = _prompt(tiny_model, 1, 7)
    free = generate_ids(tiny_model, [prompt], SamplingParams.greedy(max_new_tokens=6), stop_ids=[])[0]
    engine = LLMEngine(tiny_model, stop_ids=[free[2]])
    got, reasons = _run(engine, {0: [("x", prompt, SamplingParams.greedy(max_new_tokens=6))]})
    assert got["x"] == free[: free.index(free[2])] and reasons["x"] == "stop"
    with pytest.raises(LimitError):
        engine.add("big", prompt, SamplingParams.greedy(max_new_tokens=20000))
    engine.add("dup", prompt)
    with pytest.raises(InputError, match="already"):
        engine.add("dup", prompt)
