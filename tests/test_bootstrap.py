"""The interval helper: seeded coverage checks on simulated data, and the two-stage resampling's structure."""

import numpy as np
import pytest

from backattn.bootstrap import bootstrap_interval, bootstrap_statistic

REPETITIONS = 400  # coverage is a proportion of 400 simulated studies: its standard error is about 1.1%


def coverage(simulate, truth, seed=0):
    rng = np.random.default_rng(seed)
    hits = 0
    for repetition in range(REPETITIONS):
        values, options = simulate(rng)
        interval = bootstrap_interval(values, **options, n_resamples=500, seed=repetition)
        hits += interval.low <= truth <= interval.high
    return hits / REPETITIONS


def test_plain_interval_covers_a_bernoulli_mean():
    assert 0.93 <= coverage(lambda rng: (rng.random(300) < 0.3, {}), 0.3) <= 0.97


def test_paired_interval_covers_the_difference_of_correlated_outcomes():
    def simulate(rng):
        base = rng.random(300) < 0.5
        # the method agrees with the base 80% of the time, else succeeds with p = 0.7: P = 0.8*0.5 + 0.2*0.7
        method = np.where(rng.random(300) < 0.8, base, rng.random(300) < 0.7)
        return method, {"baseline": base}

    assert 0.93 <= coverage(simulate, 0.8 * 0.5 + 0.2 * 0.7 - 0.5) <= 0.97


def test_by_template_interval_covers_the_mean_over_templates():
    def simulate(rng):
        difficulty = rng.beta(2, 3, 20)  # 20 templates whose success rates vary around 0.4
        values = (rng.random((20, 15)) < difficulty[:, None]).ravel()
        return values, {"groups": np.repeat(np.arange(20), 15)}

    assert 0.93 <= coverage(simulate, 2 / 5) <= 0.97


def test_by_template_resampling_is_wider_than_per_problem_when_templates_differ():
    rng = np.random.default_rng(0)
    values = (rng.random((20, 15)) < rng.beta(1, 1, 20)[:, None]).ravel()
    groups = np.repeat(np.arange(20), 15)
    plain, grouped = bootstrap_interval(values), bootstrap_interval(values, groups=groups)
    assert plain.estimate == grouped.estimate == values.mean()
    assert grouped.high - grouped.low > 1.5 * (plain.high - plain.low)


def test_templates_are_drawn_whole_then_problems_within_them():
    # Template 0 always scores 0, template 1 always 1: any resample mixes whole templates, so its mean is
    # 0 (both draws template 0), 1/2 or 1, and the interval's ends are among those.
    values, groups = [0.0] * 5 + [1.0] * 5, [0] * 5 + [1] * 5
    interval = bootstrap_interval(values, groups=groups, n_resamples=400)
    assert interval.estimate == 0.5 and interval.low == 0.0 and interval.high == 1.0
    assert bootstrap_interval(values, groups=groups, level=0.2).low == 0.5


def test_ratio_statistic_and_paired_estimate_are_exact():
    losses, tokens = [2.0, 6.0, 1.0], [1, 3, 1]
    assert bootstrap_interval(losses, tokens).estimate == pytest.approx(9 / 5)
    paired = bootstrap_interval(losses, tokens, baseline=[1.0, 1.0, 1.0], baseline_denominators=[1, 1, 1])
    assert paired.estimate == pytest.approx(9 / 5 - 1)
    same = bootstrap_interval(losses, tokens, baseline=losses, baseline_denominators=tokens)
    assert same == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "values, options, message",
    [([], {}, "non-empty"), ([1.0, float("nan")], {}, "finite"), ([1.0, 2.0], {"baseline": [1.0]}, "same 2"),
     ([1.0, 2.0], {"groups": [0]}, "one template per problem"), ([1.0], {"level": 1.0}, "level")],
)  # fmt: skip
def test_bad_input_is_refused_clearly(values, options, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(values, **options)


@pytest.mark.parametrize("grouped", [False, True])
def test_any_statistic_draws_the_same_resamples_as_the_mean(grouped):
    rng = np.random.default_rng(3)
    values = rng.random(120)
    groups = np.repeat(np.arange(30), 4) if grouped else None
    mean = bootstrap_interval(values, groups=groups, n_resamples=300, seed=5)
    same = bootstrap_statistic(lambda w: (w @ values) / w.sum(1), 120, groups=groups, n_resamples=300, seed=5)
    assert same == pytest.approx(mean)
    with pytest.raises(ValueError, match="n must be a positive number"):
        bootstrap_statistic(lambda w: w.sum(1), 0)
