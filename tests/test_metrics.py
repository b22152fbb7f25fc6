"""Every metric convention pinned to the worked example of REFERENCES.md, plus batching and shape checks."""

import numpy as np
import pytest

from nestlearn import metrics

# The worked example of REFERENCES.md, "Continual learning".
R_EX = np.array(
    [
        [0.95, 0.12, 0.10, 0.11],
        [0.80, 0.70, 0.15, 0.09],
        [0.99, 0.75, 0.96, 0.13],
        [0.60, 0.80, 0.65, 0.98],
    ]
)
B_EX = np.array([0.10, 0.11, 0.09, 0.10])

# The numbers REFERENCES.md gives, to 4 decimals.
REFERENCE = {
    "average_accuracy": 0.7575,
    "backward_transfer": -0.1867,
    "forward_transfer": 0.0333,
    "forgetting": 0.2167,
    "forgetting_avalanche": 0.1867,
    "forgetting_mammoth": 0.2333,
    "backward_transfer_continuum": -0.1033,
}

# The same numbers by hand, T = 4:
# ACC  = mean of the last row = (0.60 + 0.80 + 0.65 + 0.98) / 4 = 3.03 / 4 = 0.7575
# LA   = mean of the diagonal = (0.95 + 0.70 + 0.96 + 0.98) / 4 = 3.59 / 4 = 0.8975
# BWT  = mean_{j<3} R[3, j] - R[j, j] = ((0.60 - 0.95) + (0.80 - 0.70) + (0.65 - 0.96)) / 3
#      = (-0.35 + 0.10 - 0.31) / 3 = -0.56 / 3 = -0.18667
# FWT  = mean_{j>=1} R[j-1, j] - b[j] = ((0.12 - 0.11) + (0.15 - 0.09) + (0.13 - 0.10)) / 3
#      = (0.01 + 0.06 + 0.03) / 3 = 0.10 / 3 = 0.03333
# Chaudhry, max over l in [j, 2]:
#   j=0: max(0.95, 0.80, 0.99) - 0.60 = 0.39
#   j=1: max(0.70, 0.75) - 0.80 = -0.05   (a negative term: task 1 improved at the end)
#   j=2: max(0.96) - 0.65 = 0.31
#   F = (0.39 - 0.05 + 0.31) / 3 = 0.65 / 3 = 0.21667
# Avalanche, R[j, j] - R[3, j]: 0.35, -0.10, 0.31 -> 0.56 / 3 = 0.18667 (= -BWT)
# Mammoth, max over l in [j, 3]:
#   j=0: max(0.95, 0.80, 0.99, 0.60) - 0.60 = 0.39
#   j=1: max(0.70, 0.75, 0.80) - 0.80 = 0.00
#   j=2: max(0.96, 0.65) - 0.65 = 0.31
#   F = 0.70 / 3 = 0.23333
# Continuum, every pair i > j of R[i, j] - R[j, j]:
#   (1,0) 0.80-0.95 = -0.15   (2,0) 0.99-0.95 = 0.04   (2,1) 0.75-0.70 = 0.05
#   (3,0) 0.60-0.95 = -0.35   (3,1) 0.80-0.70 = 0.10   (3,2) 0.65-0.96 = -0.31
#   sum = -0.62, over 6 pairs -> -0.10333
HAND = {
    "average_accuracy": 3.03 / 4,
    "learning_accuracy": 3.59 / 4,
    "backward_transfer": -0.56 / 3,
    "forward_transfer": 0.10 / 3,
    "forgetting": 0.65 / 3,
    "forgetting_avalanche": 0.56 / 3,
    "forgetting_mammoth": 0.70 / 3,
    "backward_transfer_continuum": -0.62 / 6,
}

# Float rounding only: the sums above and numpy's reductions add the same terms in other orders.
EXACT = dict(rtol=0, atol=1e-12)


def _call(name, R, b=B_EX):
    fn = getattr(metrics, name)
    return fn(R, b) if name == "forward_transfer" else fn(R)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_matches_reference_to_four_decimals(name):
    value = _call(name, R_EX)
    assert round(float(value), 4) == REFERENCE[name]


@pytest.mark.parametrize("name", sorted(HAND))
def test_matches_hand_computation(name):
    value = _call(name, R_EX)
    assert isinstance(value, np.ndarray) and value.shape == ()
    assert value.dtype == np.float64
    np.testing.assert_allclose(value, HAND[name], **EXACT)


def test_learning_accuracy_value():
    assert round(float(metrics.learning_accuracy(R_EX)), 4) == 0.8975


def test_summary_has_every_metric():
    out = metrics.summary(R_EX, B_EX)
    assert set(out) == set(HAND)
    for name, value in out.items():
        np.testing.assert_allclose(value, HAND[name], **EXACT)
    assert "forward_transfer" not in metrics.summary(R_EX)


def test_accepts_lists():
    np.testing.assert_allclose(metrics.average_accuracy(R_EX.tolist()), HAND["average_accuracy"], **EXACT)
    np.testing.assert_allclose(
        metrics.forward_transfer(R_EX.tolist(), B_EX.tolist()), HAND["forward_transfer"], **EXACT
    )


def _stack():
    """The example, a copy with tasks reordered, and a copy with one entry changed: ``[3, 4, 4]``."""
    perm = np.array([2, 0, 3, 1])
    permuted = R_EX[perm][:, perm]
    modified = R_EX.copy()
    modified[3, 0] = 0.99  # no forgetting of task 0 any more
    return np.stack([R_EX, permuted, modified])


@pytest.mark.parametrize("name", sorted(HAND))
def test_batches_over_leading_seed_axis(name):
    Rs = _stack()
    bs = np.stack([B_EX, B_EX[::-1], B_EX + 0.01])
    batched = _call(name, Rs, bs)
    assert batched.shape == (3,)
    for s in range(3):
        np.testing.assert_allclose(batched[s], _call(name, Rs[s], bs[s]), **EXACT)
    np.testing.assert_allclose(batched[0], HAND[name], **EXACT)
    if name != "learning_accuracy":  # the edit leaves the diagonal alone; every other metric sees it
        assert not np.allclose(batched[0], batched[2])


def test_modified_copy_hand_values():
    # R[3, 0] raised from 0.60 to 0.99: ACC = (0.99 + 0.80 + 0.65 + 0.98) / 4 = 3.42 / 4
    # Chaudhry j=0 term: max(0.95, 0.80, 0.99) - 0.99 = 0 -> F = (0 - 0.05 + 0.31) / 3 = 0.26 / 3
    modified = _stack()[2]
    np.testing.assert_allclose(metrics.average_accuracy(modified), 3.42 / 4, **EXACT)
    np.testing.assert_allclose(metrics.forgetting(modified), 0.26 / 3, **EXACT)


def test_two_leading_axes_and_shared_b():
    Rs = _stack()
    grid = np.stack([Rs, Rs[::-1]])  # [2, 3, 4, 4]
    out = metrics.forward_transfer(grid, B_EX)  # b broadcasts over both leading axes
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[0], metrics.forward_transfer(Rs, B_EX), **EXACT)
    np.testing.assert_allclose(out[1], metrics.forward_transfer(Rs[::-1], B_EX), **EXACT)
    for name, value in metrics.summary(grid, B_EX).items():
        assert value.shape == (2, 3), name


def test_chaudhry_forgetting_can_be_negative_mammoth_cannot():
    # Task 0 improves after task 1: 0.5 -> 0.9.
    # Chaudhry: max over l in [0, 0] = 0.5, minus 0.9 = -0.4. Mammoth: max(0.5, 0.9) - 0.9 = 0.
    R = np.array([[0.5, 0.1], [0.9, 0.8]])
    np.testing.assert_allclose(metrics.forgetting(R), -0.4, **EXACT)
    np.testing.assert_allclose(metrics.forgetting_avalanche(R), -0.4, **EXACT)
    np.testing.assert_allclose(metrics.forgetting_mammoth(R), 0.0, **EXACT)
    # The worked example has a negative Chaudhry term (j=1: -0.05) that Mammoth clips to 0.


def test_mammoth_terms_nonnegative_on_random_matrices():
    rng = np.random.default_rng(0)
    # With T = 2 each value is a single term, so this checks the terms themselves.
    two = rng.uniform(size=(1000, 2, 2))
    assert (metrics.forgetting_mammoth(two) >= 0).all()
    assert (metrics.forgetting(two) < 0).any()
    many = rng.uniform(size=(200, 6, 6))
    assert (metrics.forgetting_mammoth(many) >= 0).all()


def test_identities_on_random_matrices():
    rng = np.random.default_rng(1)
    T = 5
    R = rng.uniform(size=(50, T, T))
    bwt = metrics.backward_transfer(R)
    np.testing.assert_allclose(metrics.forgetting_avalanche(R), -bwt, atol=1e-12)
    np.testing.assert_allclose(
        metrics.average_accuracy(R), metrics.learning_accuracy(R) + (T - 1) / T * bwt, atol=1e-12
    )
    # max over l in [j, T-2] includes l = j, and max over [j, T-1] includes more rows.
    assert (metrics.forgetting(R) >= metrics.forgetting_avalanche(R) - 1e-12).all()
    assert (metrics.forgetting_mammoth(R) >= metrics.forgetting(R) - 1e-12).all()


def test_mammoth_and_chaudhry_ignore_upper_triangle():
    # Accuracies before a task is trained (above the diagonal) never enter the max.
    R = R_EX.copy()
    R[np.triu_indices(4, k=1)] = 1.0
    np.testing.assert_allclose(metrics.forgetting_mammoth(R), HAND["forgetting_mammoth"], **EXACT)
    np.testing.assert_allclose(metrics.forgetting(R), HAND["forgetting"], **EXACT)


def test_nan_propagates():
    R = R_EX.copy()
    R[3, 1] = np.nan
    assert np.isnan(metrics.average_accuracy(R))
    assert np.isnan(metrics.forgetting(R))


@pytest.mark.parametrize("name", sorted(HAND))
def test_non_square_raises_with_shape(name):
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        _call(name, np.zeros((3, 4)), np.zeros(4))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        _call(name, np.zeros((2, 3, 4)), np.zeros(4))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        _call(name, np.zeros(4), np.zeros(4))


@pytest.mark.parametrize(
    "name",
    [
        "backward_transfer",
        "forward_transfer",
        "forgetting",
        "forgetting_avalanche",
        "forgetting_mammoth",
        "backward_transfer_continuum",
    ],
)
def test_single_task_raises_where_t_ge_2_is_needed(name):
    with pytest.raises(ValueError, match=r"T >= 2.*\(5, 1, 1\)"):
        _call(name, np.zeros((5, 1, 1)), np.zeros((5, 1)))


def test_single_task_fine_for_acc_and_la():
    R = np.array([[[0.9]], [[0.7]]])
    np.testing.assert_allclose(metrics.average_accuracy(R), [0.9, 0.7], **EXACT)
    np.testing.assert_allclose(metrics.learning_accuracy(R), [0.9, 0.7], **EXACT)
    with pytest.raises(ValueError, match=r"T >= 1.*\(0, 0\)"):
        metrics.average_accuracy(np.zeros((0, 0)))


def test_summary_single_task_raises():
    with pytest.raises(ValueError, match=r"T >= 2"):
        metrics.summary(np.ones((1, 1)))


def test_forward_transfer_b_shape_checked():
    with pytest.raises(ValueError, match=r"b must be.*T = 4.*\(3,\)"):
        metrics.forward_transfer(R_EX, np.zeros(3))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        metrics.summary(R_EX, np.zeros(3))
