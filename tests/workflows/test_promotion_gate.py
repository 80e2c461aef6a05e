"""The promotion policy (YAML, validated) and the pure gate decision on evaluation metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from workflows.lifecycle.gate import decide
from workflows.lifecycle.policy import (
    DEFAULT_POLICY,
    GatePolicy,
    PolicyError,
    Probe,
    PromotionPolicy,
    load_policy,
    load_probes,
    probe_accuracy,
)


def _gate(**metrics) -> GatePolicy:
    return GatePolicy.model_validate({"metrics": metrics})


ACC = {"direction": "higher", "tolerance": 0.02}
WER = {"direction": "lower", "tolerance": 0.01}


# ------------------------------------------------------------------------------------------------ the policy file
def test_the_shipped_policy_loads_with_its_probes():
    policy = load_policy()
    assert policy.canary.steps == [5, 25, 50, 100]
    assert set(policy.gate.metrics) == {
        "image_qa_accuracy",
        "ocr_accuracy",
        "video_qa_accuracy",
        "video_audio_qa_accuracy",
        "asr_wer",
        "sound_qa_accuracy",
    }
    assert policy.gate.metrics["asr_wer"].direction == "lower"
    assert not policy.gate.metrics["sound_qa_accuracy"].required
    raw = yaml.safe_load((DEFAULT_POLICY.parent / "probes.yaml").read_text())
    assert [p.id for p in policy.probe_set] == [p["id"] for p in raw["probes"]]
    assert all(p.answers for p in policy.probe_set)


def _write(tmp_path: Path, data: dict, probes: dict | None = None) -> Path:
    if probes is not None:
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(probes))
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"gate": {"metrics": {}}}, "gate.metrics", "at least one metric"),
        ({"gate": {"metrics": {"a": {"direction": "up"}}}}, "gate.metrics.a.direction", "higher"),
        (
            {"gate": {"metrics": {"a": {"direction": "higher", "tolerance": -0.1}}}},
            "gate.metrics.a.tolerance",
            "greater than or equal to 0",
        ),
        ({"gate": {"metrics": {"a": {**ACC, "floor": 0.9, "ceiling": 0.5}}}}, "gate.metrics.a", "over ceiling"),
        ({"gate": {"metrics": {"a": {**ACC, "tolerence": 0.1}}}}, "gate.metrics.a.tolerence", "unknown key"),
        ({"gate": {"metrics": {"a": ACC}}, "canary": {"steps": [5, 5, 100]}}, "canary.steps", "increase"),
        ({"gate": {"metrics": {"a": ACC}}, "canary": {"steps": [5, 50]}}, "canary.steps", "must be 100"),
        ({"gate": {"metrics": {"a": ACC}}, "canary": {"steps": [0, 100]}}, "canary.steps", "(0, 100]"),
        ({"gate": {"metrics": {"a": ACC}}, "canary": {"window_s": 0}}, "canary.window_s", "greater than 0"),
        (
            {"gate": {"metrics": {"a": ACC}}, "canary": {"min_requests": 0}},
            "canary.min_requests",
            "greater than or equal to 1",
        ),
        (
            {"gate": {"metrics": {"a": ACC}}, "canary": {"thresholds": {"min_probe_accuracy": 1.5}}},
            "canary.thresholds.min_probe_accuracy",
            "less than or equal to 1",
        ),
        ({"canary": {}}, "gate", "required"),
    ],
)
def test_bad_policies_name_the_key(tmp_path, data, key, words):
    with pytest.raises(PolicyError) as err:
        PromotionPolicy.from_yaml(_write(tmp_path, data))
    message = str(err.value)
    assert str(tmp_path / "policy.yaml") in message
    assert f"  {key}: " in message and words in message


def test_probes_are_read_relative_to_the_policy_and_checked(tmp_path):
    probes = {"probes": [{"id": "sum", "prompt": "1+1?", "answers": ["2", "two"]}]}
    policy = PromotionPolicy.from_yaml(
        _write(tmp_path, {"gate": {"metrics": {"a": ACC}}, "canary": {"probes": "p.yaml"}}, probes)
    )
    assert [p.id for p in policy.probe_set] == ["sum"] and policy.probe_set[0].match == "contains"
    with pytest.raises(PolicyError, match=r"probes\.0\.answers"):
        load_probes(_write(tmp_path, {}, {"probes": [{"id": "x", "prompt": "q", "answers": []}]}).parent / "p.yaml")
    with pytest.raises(PolicyError, match="appears twice"):
        load_probes(
            _write(tmp_path, {}, {"probes": [{"id": "x", "prompt": "q", "answers": ["a"]}] * 2}).parent / "p.yaml"
        )
    with pytest.raises(PolicyError, match="cannot read"):
        PromotionPolicy.from_yaml(
            _write(tmp_path, {"gate": {"metrics": {"a": ACC}}, "canary": {"probes": "none.yaml"}})
        )
    (tmp_path / "bad.yaml").write_text("gate: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        PromotionPolicy.from_yaml(tmp_path / "bad.yaml")


def test_probe_matching_and_accuracy():
    exact = Probe(id="e", prompt="q", answers=["Paris"], match="exact")
    contains = Probe(id="c", prompt="q", answers=["4", "four"])
    assert exact.accepts("  paris ") and not exact.accepts("It is Paris.")
    assert contains.accepts("The answer is FOUR.") and not contains.accepts("five")
    replies = {"e": "Paris", "c": "five"}
    assert probe_accuracy([exact, contains], lambda p: replies[p.id]) == 0.5

    def failing(p: Probe) -> str:
        raise RuntimeError("backend down")

    assert probe_accuracy([exact, contains], failing) == 0.0


# ------------------------------------------------------------------------------------------------ the gate
def test_higher_is_better_tolerance_edges():
    gate = _gate(acc=ACC)
    assert decide({"acc": 0.78}, {"acc": 0.80}, gate).passed  # exactly at the tolerance
    assert decide({"acc": 0.95}, {"acc": 0.80}, gate).passed
    failed = decide({"acc": 0.7799}, {"acc": 0.80}, gate)
    assert not failed.passed
    assert failed.reasons == [failed.per_metric["acc"].name + ": " + failed.per_metric["acc"].reason]
    assert "below champion 0.8" in failed.reasons[0] and "tolerance 0.02" in failed.reasons[0]
    strict = _gate(acc={"direction": "higher"})  # zero tolerance: equal passes, any drop fails
    assert decide({"acc": 0.8}, {"acc": 0.8}, strict).passed
    assert not decide({"acc": 0.8 - 1e-6}, {"acc": 0.8}, strict).passed


def test_lower_is_better_wer():
    gate = _gate(asr_wer={**WER, "ceiling": 0.3})
    assert decide({"asr_wer": 0.11}, {"asr_wer": 0.10}, gate).passed  # at the edge
    assert decide({"asr_wer": 0.05}, {"asr_wer": 0.10}, gate).passed  # better
    worse = decide({"asr_wer": 0.1101}, {"asr_wer": 0.10}, gate)
    assert not worse.passed and "above champion 0.1" in worse.reasons[0]
    ceiling = decide({"asr_wer": 0.31}, None, gate)
    assert not ceiling.passed and "above the ceiling 0.3" in ceiling.reasons[0]


def test_missing_metrics_required_and_optional():
    gate = _gate(acc=ACC, sound={**ACC, "required": False})
    only_required = decide({"acc": 0.9}, {"acc": 0.9, "sound": 0.5}, gate)
    assert only_required.passed and only_required.per_metric["sound"].outcome == "skipped"
    missing = decide({"sound": 0.9}, {"acc": 0.9, "sound": 0.5}, gate)
    assert not missing.passed and missing.reasons == ["acc: required metric is missing from the candidate"]
    # the champion lacking a metric leaves its absolute bounds only
    no_champ_value = decide({"acc": 0.1}, {"sound": 0.5}, gate)
    assert no_champ_value.passed and "no champion" in no_champ_value.per_metric["acc"].reason
    # metrics outside the policy are ignored
    assert set(decide({"acc": 0.9, "extra": 0.0}, None, gate).per_metric) == {"acc", "sound"}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.9", True])
def test_non_finite_or_non_numeric_values_fail_even_optional_metrics(bad):
    gate = _gate(acc=ACC, sound={**ACC, "required": False})
    decision = decide({"acc": 0.9, "sound": bad}, {"acc": 0.9, "sound": 0.5}, gate)
    assert not decision.passed
    assert decision.reasons == [f"sound: candidate value {bad!r} is not a finite number"]


def test_a_nan_champion_value_is_not_used():
    decision = decide({"acc": 0.1}, {"acc": math.nan}, _gate(acc={**ACC, "floor": 0.05}))
    assert decision.passed and "unusable" in decision.per_metric["acc"].reason


def test_no_champion_judges_floors_and_ceilings_only():
    gate = _gate(acc={**ACC, "floor": 0.3}, wer={**WER, "ceiling": 0.2})
    assert decide({"acc": 0.3, "wer": 0.2}, None, gate).passed  # both exactly at their bound
    low = decide({"acc": 0.29, "wer": 0.21}, None, gate)
    assert not low.passed and len(low.reasons) == 2
    assert low.reasons[0].startswith("acc: 0.29 is below the floor 0.3")
    assert low.reasons[1].startswith("wer: 0.21 is above the ceiling 0.2")
    # floors hold against a champion too: a better-than-champion value below the floor fails
    assert not decide({"acc": 0.29}, {"acc": 0.1}, _gate(acc={**ACC, "floor": 0.3})).passed


def test_every_failure_is_reported_and_the_whole_policy_is_accepted():
    policy = load_policy()
    champion = {
        "image_qa_accuracy": 0.6,
        "ocr_accuracy": 0.5,
        "video_qa_accuracy": 0.55,
        "video_audio_qa_accuracy": 0.5,
        "asr_wer": 0.12,
        "sound_qa_accuracy": 0.4,
    }
    same = decide(champion, champion, policy)
    assert same.passed and all(v.outcome == "pass" for v in same.per_metric.values())
    assert same.summary().startswith("gate passed")
    worse = {**champion, "image_qa_accuracy": 0.5, "asr_wer": 0.2}
    decision = decide(worse, champion, policy)
    assert not decision.passed
    assert [r.split(":")[0] for r in decision.reasons] == ["image_qa_accuracy", "asr_wer"]
    assert decision.per_metric["ocr_accuracy"].passed and not decision.per_metric["asr_wer"].passed
