"""Tests for jaxmm.evaluation.calibration: hand-computed metrics, temperature recovery, the
calibration file."""

import json

import numpy as np
import pytest

from jaxmm.evaluation import calibration

# Five two-class examples; confidences 0.9, 0.95, 0.58, 0.7, 0.88, of which 1, 3, 4 are right.
HAND_PROBS = np.array([[0.9, 0.1], [0.95, 0.05], [0.58, 0.42], [0.3, 0.7], [0.88, 0.12]])
HAND_LABELS = np.array([0, 1, 0, 1, 1])


def test_ece_of_hand_made_set():
    # 15 bins of width 1/15: 0.88 and 0.9 share (13/15, 14/15] (accuracy 1/2, confidence 0.89),
    # 0.95 is alone in the last bin (wrong), 0.58 and 0.7 are alone in theirs (right).
    expected = 2 / 5 * abs(0.5 - 0.89) + 1 / 5 * (0.95 + (1 - 0.58) + (1 - 0.7))
    assert expected == pytest.approx(0.49)
    assert calibration.expected_calibration_error(HAND_PROBS, HAND_LABELS) == pytest.approx(
        expected, abs=1e-12)
    bins = calibration.calibration_bins(HAND_PROBS, HAND_LABELS)
    assert bins["count"].sum() == 5 and bins["count"][13] == 2 and bins["count"][14] == 1


def test_nll_and_brier_of_hand_made_set():
    p_true = [0.9, 0.05, 0.58, 0.7, 0.12]
    assert calibration.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(
        -np.mean(np.log(p_true)), abs=1e-12)
    # Two classes: each example contributes 2 * (1 - p_true)^2.
    assert calibration.brier(HAND_PROBS, HAND_LABELS) == pytest.approx(
        np.mean([2 * (1 - p) ** 2 for p in p_true]), abs=1e-12)


def test_perfectly_calibrated_bin_has_zero_ece():
    probs = np.array([[0.75, 0.25]] * 4)
    assert calibration.expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.0)
    assert calibration.expected_calibration_error(probs, [0, 0, 1, 1]) == pytest.approx(0.25)


def calibrated_logits(n=100_000, k=4, seed=0):
    """Logits and labels drawn from them: softmax(logits) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, k))
    p = calibration.softmax(logits)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, labels


def test_fit_recovers_known_temperature():
    # 100k examples: the fit's standard error at T = 2.5 is about 0.012, a quarter of the bound.
    logits, labels = calibrated_logits()
    assert calibration.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
    overconfident = 2.5 * logits
    temperature = calibration.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.5, abs=0.05)
    before = calibration.calibration_metrics(calibration.softmax(overconfident), labels)
    after = calibration.calibration_metrics(calibration.softmax(overconfident, temperature),
                                            labels)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert after["brier"] < before["brier"]


def test_fit_on_log_probabilities_equals_fit_on_logits():
    logits, labels = calibrated_logits(n=3000, seed=1)
    logits = 0.4 * logits + 3.0  # under-confident and shifted
    log_p = calibration.log_probs_as_logits(calibration.softmax(logits))
    assert calibration.fit_temperature(log_p, labels) == pytest.approx(
        calibration.fit_temperature(logits, labels), rel=1e-4)


@pytest.mark.parametrize("temperature", [0.1, 0.7, 2.5, 40.0])
def test_temperature_never_changes_predictions(temperature):
    logits, _ = calibrated_logits(n=2000, seed=2)
    np.testing.assert_array_equal(calibration.softmax(logits, temperature).argmax(1),
                                  logits.argmax(1))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="temperature"):
        calibration.softmax(np.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match="labels"):
        calibration.nll(HAND_PROBS, [0, 1, 2, 0, 0])
    with pytest.raises(ValueError, match="shapes"):
        calibration.brier(HAND_PROBS, [0, 1])
    with pytest.raises(ValueError, match="non-finite"):
        calibration.fit_temperature(np.array([[np.inf, 0.0]]), [0])


def test_record_roundtrip_and_bad_file(tmp_path):
    logits, labels = calibrated_logits(n=500, seed=3)
    record = calibration.calibration_record(2.0 * logits, labels, 2.0)
    assert set(record["before"]) == set(record["after"]) == {"ece", "nll", "brier"}
    from jaxmm.errors import WorkdirError
    from jaxmm.trained.workdir import Workdir

    wd = Workdir(str(tmp_path))
    path = wd.write_calibration(record)
    assert json.loads(open(path).read())["num_examples"] == 500
    assert wd.temperature() == 2.0
    assert Workdir(str(tmp_path / "missing")).temperature() is None
    for bad in ('{"temperature": -1}', '{"temp": 2}', '{"temperature": true}',
                '{"temperature": NaN}', '{"temperature": Infinity}', '{"temperature": "2"}',
                '{"temperature": [2]}', '{"temperature": 0}', '{"temperature": 1e308}'):
        (tmp_path / "calibration.json").write_text(bad)
        with pytest.raises(WorkdirError, match=r"calibration\.json: calibration\.temperature "
                                               r"must be a finite positive number in"):
            wd.temperature()
    (tmp_path / "calibration.json").write_text("not json")
    with pytest.raises(WorkdirError, match=r"calibration\.json: not readable"):
        wd.temperature()


def test_reliability_diagram_draws_the_hand_made_bins(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: (drawn.append(self), savefig(self, *a, **k))[1])
    path = calibration.reliability_diagram(HAND_PROBS, HAND_LABELS, str(tmp_path / "r.png"),
                                           title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    top, bottom = drawn[0].axes
    assert top.get_title() == "test: ECE 0.490"
    # Filled bins in confidence order: 0.58 (right), 0.7 (right), {0.88 wrong, 0.9 right},
    # 0.95 (wrong).
    assert [bar.get_height() for bar in top.containers[0]] == pytest.approx([1, 1, 0.5, 0])
    assert [b.get_height() for b in bottom.containers[0] if b.get_height()] == [1, 1, 2, 1]


def _record(logits, labels, policy="trusted"):
    t = calibration.fit_temperature(logits, labels)
    return calibration.calibration_record(logits, labels, t, policy=policy)


def test_trust_criterion_applies_a_temperature_that_helps_unseen_data():
    logits, labels = calibrated_logits(n=400, seed=4)
    record = _record(2.5 * logits, labels)  # overconfident: T near 2.5 helps both halves
    assert record["applied"] and record["reason"] == "all criteria hold"
    assert record["criterion"]["held_out_nll_gain"] > 0.01


@pytest.mark.parametrize("case", ["one example", "all right", "few examples", "no signal",
                                  "no held-out gain"])
def test_trust_criterion_refuses_a_temperature_it_cannot_trust(case):
    logits, labels = calibrated_logits(n=400, seed=5)
    if case == "one example":  # the fit runs to the lower bound: NLL 1.36 -> 26 on test
        logits, labels, reason = logits[:1] * 0 + [[3.0, 0, 0, 0]], [0], "fewer than 50"
    elif case == "all right":  # a split the model gets entirely right: T at the lower bound
        labels = logits.argmax(axis=1)
        reason = "search bound"
    elif case == "few examples":
        logits, labels, reason = 2.5 * logits[:40], labels[:40], "40 examples, fewer than 50"
    elif case == "no signal":  # logits unrelated to the labels: T runs to the upper bound
        labels = np.random.default_rng(1).integers(0, 4, len(labels))
        reason = "search bound"
    else:  # calibrated already: a T fitted on one half does not help the other
        logits, labels = calibrated_logits(n=60, seed=11)
        reason = "no held-out NLL gain"
    record = _record(logits, labels)
    assert not record["applied"] and reason in record["reason"], record
    forced = _record(logits, labels, policy="always")
    assert forced["applied"] and "config.calibration='always'" in forced["reason"]


def test_a_temperature_that_is_not_applied_is_not_used(tmp_path):
    from jaxmm.errors import WorkdirError
    from jaxmm.trained.workdir import Workdir

    wd = Workdir(str(tmp_path))
    logits, labels = calibrated_logits(n=400, seed=5)
    record = _record(logits, logits.argmax(axis=1))
    wd.write_calibration(record)
    assert not record["applied"] and wd.temperature() is None
    assert wd.calibration()["temperature"] == record["temperature"]  # kept, for the record
    (tmp_path / "calibration.json").write_text('{"temperature": 2, "applied": "yes"}')
    with pytest.raises(WorkdirError, match=r"calibration\.json: applied must be true or false"):
        wd.temperature()
