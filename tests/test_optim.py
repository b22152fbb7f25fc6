"""Hand-derived trajectories and reference comparisons for nestlearn.optim (the suite is test_optim_suite)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nestlearn import optim


def test_level_clock_table():
    # Periods 1, 2, 4; level l is active when (t + 1) % P == 0.
    #   t:          0 1 2 3 4 5 6 7
    #   P=1 active: 1 1 1 1 1 1 1 1   updates after t: t+1
    #   P=2 active: 0 1 0 1 0 1 0 1   updates: 0 1 1 2 2 3 3 4
    #   P=4 active: 0 0 0 1 0 0 0 1   updates: 0 0 0 1 1 1 1 2
    # next update (first step >= t where active): P=2 -> 1 1 3 3 5 5 7 7; P=4 -> 3 3 3 3 7 7 7 7.
    clock = jax.jit(jax.vmap(lambda t: optim.level_clock(jnp.array([1, 2, 4]), t)))(jnp.arange(8))
    np.testing.assert_array_equal(clock.active[:, 1], [0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(clock.active[:, 2], [0, 0, 0, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(clock.num_updates[:, 0], np.arange(1, 9))
    np.testing.assert_array_equal(clock.num_updates[:, 1], [0, 1, 1, 2, 2, 3, 3, 4])
    np.testing.assert_array_equal(clock.num_updates[:, 2], [0, 0, 0, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(clock.next_update[:, 1], [1, 1, 3, 3, 5, 5, 7, 7])
    np.testing.assert_array_equal(clock.next_update[:, 2], [3, 3, 3, 3, 7, 7, 7, 7])
    np.testing.assert_array_equal(optim.clock_timeline([1, 2, 4], 8).T, clock.active.astype(np.int32))


def test_level_clock_traced_periods_and_errors():
    # Periods may be traced (a vmapped sweep over period choices).
    active = jax.vmap(lambda p: optim.level_clock(p, 5).active)(jnp.array([[2], [3], [4]]))
    np.testing.assert_array_equal(active[:, 0], [True, True, False])  # 6 % 2, 6 % 3, 6 % 4
    with pytest.raises(ValueError, match="periods must be >= 1"):
        optim.level_clock([1, 0], 0)
    with pytest.raises(ValueError, match="num_steps"):
        optim.clock_timeline([1], -1)


@pytest.mark.parametrize("mean", [False, True])
def test_periodic_hand_trajectory(mean):
    # P = 2, inner sgd(0.1, momentum=0.5) (trace t <- g + 0.5 t, u = -0.1 t); gradients 1, 2, 3, 4.
    # Sum:  step0 acc=1 u=0; step1 acc=3 -> t=3, u=-0.3; step2 acc=3 u=0; step3 acc=7 -> t=7+1.5=8.5, u=-0.85.
    # Mean: fed 1.5 -> t=1.5, u=-0.15; fed 3.5 -> t=3.5+0.75=4.25, u=-0.425.
    tx = optim.periodic(optax.sgd(0.1, momentum=0.5), 2, use_grad_mean=mean)
    p = jnp.zeros(1)
    s = tx.init(p)
    got = []
    for g in (1.0, 2.0, 3.0, 4.0):
        u, s = tx.update(jnp.full(1, g), s, p)
        got.append(float(u[0]))
    want = [0, -0.15, 0, -0.425] if mean else [0, -0.3, 0, -0.85]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_period_one_is_the_inner_optimizer_bit_for_bit():
    params = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.3, momentum=0.9, nesterov=True))
    tx = optim.period_schedule({"all": inner}, {"all": 1}, lambda p: jax.tree.map(lambda _: "all", p))
    ps, pi = params, params
    ss, si = tx.init(params), inner.init(params)
    loss = lambda p: jnp.sum(jnp.sin(p["a"]) ** 2) + jnp.sum(p["b"] ** 3)
    for _ in range(5):
        us, ss = tx.update(jax.grad(loss)(ps), ss, ps)
        ui, si = inner.update(jax.grad(loss)(pi), si, pi)
        ps, pi = optax.apply_updates(ps, us), optax.apply_updates(pi, ui)
    for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(pi)):
        np.testing.assert_array_equal(a, b)


def test_period_schedule_groups_by_mask_and_inner_state_waits():
    # Bool mask labels: True -> period 3 with momentum, False -> every step. Gradient 1 every step.
    params = {"slow": jnp.zeros(2), "fast": jnp.zeros(2)}
    mask = {"slow": True, "fast": False}
    tx = optim.period_schedule(
        {True: optax.sgd(1.0, momentum=0.5), False: optax.sgd(1.0)}, {True: 3, False: 1}, mask
    )
    s = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    slow, fast = [], []
    for _ in range(6):
        u, s = jax.jit(tx.update)(ones, s, params)
        slow.append(float(u["slow"][0]))
        fast.append(float(u["fast"][0]))
    # Slow group: steps 2 and 5 apply the sum 3; momentum trace 3, then 3 + 0.5*3 = 4.5 (the trace did not
    # decay on the 2 steps in between: the inner state advances only on update steps).
    np.testing.assert_allclose(slow, [0, 0, -3, 0, 0, -4.5])
    np.testing.assert_allclose(fast, [-1] * 6)
    with pytest.raises(ValueError, match="same labels"):
        optim.period_schedule({True: optax.sgd(1.0)}, {False: 1}, mask)
    with pytest.raises(ValueError, match="period must be >= 1"):
        optim.periodic(optax.sgd(1.0), 0)


def test_consolidate_rule_by_hand():
    # The one rule (optim.consolidate) that consolidation, consolidation_in_state, FastSlow and the levels
    # call. Levels θ = (1, 0, 0), level-0 update u = 1, rates (0.5, 0.5).
    # Both levels sync, with reset: d0 = 1 + 1 - 0 = 2, U1 = 1, U0 = 1 - 0.5 * 2 = 0; then
    #   d1 = 0 + 1 - 0 = 1, U2 = 0.5, U1 = 1 - 0.5 * 1 = 0.5, U0 = 0 - (1 + 0 - 0 - 0.5) = -0.5:
    #   every level lands on 0.5. Without reset: U = (1, 1, 0.5), levels (2, 1, 0.5).
    one, zero = jnp.ones(()), jnp.zeros(())
    on = jnp.asarray(True)
    ups = optim.consolidate((one, zero, zero), one, [on, on], [0.5, 0.5])
    assert [float(u) for u in ups] == [-0.5, 0.5, 0.5]
    ups = optim.consolidate((one, zero, zero), one, [on, on], [0.5, 0.5], reset_faster=False)
    assert [float(u) for u in ups] == [1.0, 1.0, 0.5]
    # Per-group masks: only "a" syncs level 1 (level 2 does not sync): a's fast update is 1 - 0.5 * 2 = 0
    # (it lands on level 1's new value 1), b keeps u = 1 and its level 1 stays.
    p = {"a": one, "b": one}
    mask = {"a": on, "b": jnp.asarray(False)}
    ups = optim.consolidate((p, {"a": zero, "b": zero}, {"a": zero, "b": zero}), p, [mask, False], [0.5, 0.5])
    assert [{k: float(v) for k, v in u.items()} for u in ups] == [
        {"a": 0.0, "b": 1.0},
        {"a": 1.0, "b": 0.0},
        {"a": 0.0, "b": 0.0},
    ]
    # Level 0 already moved (updates=None, as FastSlow calls it): θ = (2, 0), rate 0.25: d = 2, the slow
    # level moves by 0.5 and the fast one by -0.75 * 2 = -1.5, both to 0.5.
    ups = optim.consolidate((2.0 * one, zero), None, [on], [0.25])
    assert [float(u) for u in ups] == [-1.5, 0.5]
    with pytest.raises(ValueError, match="3 levels need 2 sync masks, got 1"):
        optim.consolidate((one, zero, zero), one, [on], [0.5, 0.5])


def _lookahead_vs_consolidation(reset_state, rate):
    key = jax.random.PRNGKey(0)
    p0 = {"w": jax.random.normal(key, (3, 4)), "b": jnp.ones(4)}
    loss = lambda p: jnp.sum(jnp.sin(3 * p["w"]) ** 2) + jnp.sum((p["b"] - 0.3) ** 2)
    inner = optax.sgd(0.1, momentum=0.9)
    la = optax.lookahead(inner, 3, rate, reset_state=reset_state)
    co = optim.consolidation(inner, [3], [rate], reset_state=reset_state)
    lp, cp = optax.LookaheadParams.init_synced(p0), optim.LevelParams.init_synced(p0, 2)
    ls, cs = la.init(lp), co.init(cp)
    for _ in range(10):
        # optax.lookahead multiplies a Python float by a bool array; strict promotion rejects that.
        with jax.numpy_dtype_promotion("standard"):
            u, ls = la.update(jax.grad(loss)(lp.fast), ls, lp)
        lp = optax.apply_updates(lp, u)
        u, cs = co.update(jax.grad(loss)(cp.fastest), cs, cp)
        cp = optax.apply_updates(cp, u)
        yield lp, cp


@pytest.mark.parametrize("reset_state", [False, True])
def test_two_levels_are_lookahead_bit_for_bit(reset_state):
    # α = 0.5 is exact in float32, so lookahead's (1 - α) and ours agree to the bit.
    for lp, cp in _lookahead_vs_consolidation(reset_state, 0.5):
        for a, b in zip(jax.tree.leaves((lp.fast, lp.slow)), jax.tree.leaves(cp.levels)):
            np.testing.assert_array_equal(a, b)


def test_two_levels_are_lookahead_any_rate():
    # α = 0.3: lookahead forms 1 - α in float64 before rounding, we in float32; 1 ulp apart at most.
    for lp, cp in _lookahead_vs_consolidation(False, 0.3):
        for a, b in zip(jax.tree.leaves((lp.fast, lp.slow)), jax.tree.leaves(cp.levels)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reset", [True, False])
def test_three_levels_hand_trajectory(reset):
    # Scalar, inner sgd(1) with gradient 1 (u = -1 each step), sync periods [2, 4], rates [0.5, 0.5].
    # With reset (levels θ0, θ1, θ2 start at 0):
    #   t=0: θ0=-1, no sync                                         -> (-1, 0, 0)
    #   t=1: θ0=-2; s0: θ1 = 0 + .5(-2 - 0) = -1, θ0 <- -1            -> (-1, -1, 0)
    #   t=2: θ0=-2                                                  -> (-2, -1, 0)
    #   t=3: θ0=-3; s0: θ1 = -1 + .5(-3 + 1) = -2, θ0 <- -2;
    #        s1: θ2 = 0 + .5(-2 - 0) = -1, θ0, θ1 <- -1               -> (-1, -1, -1)
    # Without reset:
    #   t=0: (-1, 0, 0); t=1: θ0=-2, θ1=.5(-2)=-1 -> (-2, -1, 0); t=2: (-3, -1, 0);
    #   t=3: θ0=-4, θ1 = -1 + .5(-4 + 1) = -2.5, θ2 = .5(-2.5) = -1.25 -> (-4, -2.5, -1.25)
    want = (
        [(-1, 0, 0), (-1, -1, 0), (-2, -1, 0), (-1, -1, -1)]
        if reset
        else [(-1, 0, 0), (-2, -1, 0), (-3, -1, 0), (-4, -2.5, -1.25)]
    )
    tx = optim.consolidation(optax.sgd(1.0), [2, 4], [0.5, 0.5], reset_faster=reset)
    p = optim.LevelParams.init_synced(jnp.zeros(()), 3)
    s = tx.init(p)
    for w in want:
        u, s = jax.jit(tx.update)(jnp.ones(()), s, p)
        p = optax.apply_updates(p, u)
        np.testing.assert_allclose([float(x) for x in p.levels], w, atol=1e-7)
    assert float(p.slowest) == want[-1][-1]


def test_consolidation_bad_input():
    with pytest.raises(ValueError, match="same length"):
        optim.consolidation(optax.sgd(1.0), [2, 4], [0.5])
    with pytest.raises(ValueError, match="num_levels"):
        optim.LevelParams.init_synced(jnp.zeros(2), 1)
    tx = optim.consolidation(optax.sgd(1.0), [2], [0.5])
    with pytest.raises(ValueError, match="LevelParams with 2 levels"):
        tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.zeros(2))


# -- consolidation_in_state: the slow levels in the optimizer state -----------------------------------


def _in_state_vs_consolidation(num_levels, reset, reset_state, steps=14):
    """Both transforms on the same problem; yields (LevelParams, fast params, SlowLevelsState) per step."""
    key = jax.random.PRNGKey(1)
    p0 = {"w": jax.random.normal(key, (3, 4)), "b": jnp.ones(4)}
    loss = lambda p: jnp.sum(jnp.sin(3 * p["w"]) ** 2) + jnp.sum((p["b"] - 0.3) ** 2)
    periods, rates = ([3], [0.3]) if num_levels == 2 else ([2, 6], [0.5, 0.3])
    inner = optax.sgd(0.1, momentum=0.9)
    kw = dict(reset_faster=reset, reset_state=reset_state)
    co = optim.consolidation(inner, periods, rates, **kw)
    st = optim.consolidation_in_state(inner, periods, rates, **kw)
    cp, fp = optim.LevelParams.init_synced(p0, num_levels), p0
    cs, ss = co.init(cp), st.init(fp)
    co_up, st_up = jax.jit(co.update), jax.jit(st.update)
    for _ in range(steps):
        u, cs = co_up(jax.grad(loss)(cp.fastest), cs, cp)
        cp = optax.apply_updates(cp, u)
        u, ss = st_up(jax.grad(loss)(fp), ss, fp)
        fp = optax.apply_updates(fp, u)
        yield cp, fp, ss


@pytest.mark.parametrize("num_levels", [2, 3])
@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("reset_state", [False, True])
def test_in_state_is_consolidation(num_levels, reset, reset_state):
    # Another implementation: the LevelParams version, every level at every step (14 steps cover syncs of
    # both slow levels, 2 of level 2 with periods [2, 6]). The reset lands on the slow level's value
    # rather than on lookahead's merged update, so the two agree to rounding, not to the bit.
    moved = False
    for cp, fp, ss in _in_state_vs_consolidation(num_levels, reset, reset_state):
        assert len(ss.slow) == num_levels - 1
        for want, got in zip(cp.levels, (fp,) + ss.slow):
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
                np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-6)
        moved = moved or not np.allclose(ss.slowest["w"], cp.levels[0]["w"])
        np.testing.assert_array_equal(optim.consolidated_params(ss)["b"], ss.slow[-1]["b"])
    # The slow levels really lag the fast one somewhere (the comparison is not between copies).
    assert moved


@pytest.mark.parametrize("reset_state", [False, True])
def test_in_state_two_levels_is_lookahead(reset_state):
    # Another library: optax.lookahead(sgd momentum, 3, 0.5), fast params against ours, slow against the state.
    key = jax.random.PRNGKey(2)
    p0 = {"w": jax.random.normal(key, (3, 4)), "b": jnp.ones(4)}
    loss = lambda p: jnp.sum(jnp.sin(3 * p["w"]) ** 2) + jnp.sum((p["b"] - 0.3) ** 2)
    inner = optax.sgd(0.1, momentum=0.9)
    la = optax.lookahead(inner, 3, 0.5, reset_state=reset_state)
    st = optim.consolidation_in_state(inner, [3], [0.5], reset_state=reset_state)
    lp, fp = optax.LookaheadParams.init_synced(p0), p0
    ls, ss = la.init(lp), st.init(fp)
    for _ in range(10):
        with jax.numpy_dtype_promotion("standard"):  # optax.lookahead multiplies a float by a bool array
            u, ls = la.update(jax.grad(loss)(lp.fast), ls, lp)
        lp = optax.apply_updates(lp, u)
        u, ss = st.update(jax.grad(loss)(fp), ss, fp)
        fp = optax.apply_updates(fp, u)
        for a, b in zip(jax.tree.leaves((lp.fast, lp.slow)), jax.tree.leaves((fp, ss.slow[0]))):
            np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("reset", [True, False])
def test_in_state_three_levels_hand_trajectory(reset):
    # The table of test_three_levels_hand_trajectory (sgd(1), gradient 1, periods [2, 4], rates [0.5, 0.5]),
    # read as (params, slow[0], slow[1]). With reset the fast update on a sync is θ_{k+1} - θ0:
    #   t=1: θ̃0 = -2, θ1 = -1, u = -1 - (-1) = 0 -> θ0 = -1;  t=3: θ̃0 = -3, θ1 = -2, θ2 = -1, θ1 <- -1,
    #   u = -1 - (-2) = 1 -> θ0 = -1. All values are exact in float32.
    want = (
        [(-1, 0, 0), (-1, -1, 0), (-2, -1, 0), (-1, -1, -1)]
        if reset
        else [(-1, 0, 0), (-2, -1, 0), (-3, -1, 0), (-4, -2.5, -1.25)]
    )
    tx = optim.consolidation_in_state(optax.sgd(1.0), [2, 4], [0.5, 0.5], reset_faster=reset)
    p = jnp.zeros(())
    s = tx.init(p)
    for w in want:
        u, s = jax.jit(tx.update)(jnp.ones(()), s, p)
        p = optax.apply_updates(p, u)
        assert (float(p), float(s.slow[0]), float(s.slow[1])) == w
    assert int(s.count) == 4
    assert float(optim.consolidated_params(s, level=1)) == want[-1][1]
    assert float(optim.consolidated_params(s)) == want[-1][2]


def test_in_state_traced_periods_and_rates_one_compilation():
    # Periods and rates as arguments of one jitted, vmapped run: each row equals the run with concrete
    # values (another implementation: consolidation with those values), and a new value reuses the program.
    def run(periods, rates, n=9):
        tx = optim.consolidation_in_state(optax.sgd(0.5), periods, rates)
        p = jnp.zeros(2)
        s = tx.init(p)

        def step(carry, _):
            p, s = carry
            u, s = tx.update(p - jnp.asarray([1.0, -2.0]), s, p)  # gradient of ½‖p - (1, -2)‖²
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(step, (p, s), None, length=n)
        return p, s.slow

    periods = jnp.asarray([[2, 4], [3, 6]], jnp.int32)
    rates = jnp.asarray([[0.5, 0.5], [0.3, 0.8]], jnp.float32)
    batched = jax.jit(jax.vmap(run))(periods, rates)
    one = jax.jit(run)
    for i in range(2):
        single = one(periods[i], rates[i])
        tx = optim.consolidation(optax.sgd(0.5), [int(x) for x in periods[i]], [float(x) for x in rates[i]])
        lp = optim.LevelParams.init_synced(jnp.zeros(2), 3)
        ls = tx.init(lp)
        for _ in range(9):
            u, ls = tx.update(lp.fastest - jnp.asarray([1.0, -2.0]), ls, lp)
            lp = optax.apply_updates(lp, u)
        for a, b, c in zip(jax.tree.leaves(batched), jax.tree.leaves(single), jax.tree.leaves(lp.levels)):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-6)
    assert one._cache_size() == 1
    assert not np.allclose(batched[0][0], batched[0][1])  # the two rows really differ


def test_consolidated_params_finds_the_state_inside_wrappers():
    # Inside inject_hyperparams (rates injected) inside a chain: the accessor finds the slow levels.
    # sgd(1), gradient 1, period 1, rate 0.5, no reset: θ0 = -1, -2; θ1 = 0.5 θ̃0 + 0.5 θ1 = -0.5, -1.25.
    inner = optax.inject_hyperparams(optim.consolidation_in_state)(
        inner=optax.sgd(1.0), sync_periods=[1], rates=[0.5], reset_faster=False
    )
    tx = optax.chain(optax.clip(10.0), inner)
    p = jnp.zeros(())
    s = tx.init(p)
    for _ in range(2):
        u, s = tx.update(jnp.ones(()), s, p)
        p = optax.apply_updates(p, u)
    assert float(p) == -2.0
    assert float(optim.consolidated_params(s)) == -1.25
    assert float(optim.consolidated_params(s, level=1)) == -1.25
    with pytest.raises(ValueError, match="exactly one SlowLevelsState, found 0"):
        optim.consolidated_params(optax.sgd(1.0).init(p))
    with pytest.raises(ValueError, match="level must be in 1..1"):
        optim.consolidated_params(s, level=2)


def test_in_state_keeps_bfloat16_slow_levels():
    # The slow levels keep the params' dtype (no silent float32 copy in the state). sgd(0.5), gradient 1,
    # period 2, rate 0.5, reset: θ̃0 = -1 at t=1, slow = -0.5 and params -0.5 (exact in bfloat16).
    tx = optim.consolidation_in_state(optax.sgd(0.5), [2], [0.5])
    p = jnp.zeros(3, jnp.bfloat16)
    s = tx.init(p)
    for _ in range(2):
        u, s = jax.jit(tx.update)(jnp.ones(3, jnp.bfloat16), s, p)
        p = optax.apply_updates(p, u)
    assert p.dtype == s.slow[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(s.slow[0], np.float32), [-0.5] * 3)
    np.testing.assert_array_equal(np.asarray(p, np.float32), [-0.5] * 3)


def test_consolidation_in_state_bad_input():
    with pytest.raises(ValueError, match="same length"):
        optim.consolidation_in_state(optax.sgd(1.0), [2, 4], [0.5])
    with pytest.raises(ValueError, match="sync_periods must be >= 1"):
        optim.consolidation_in_state(optax.sgd(1.0), [0], [0.5])
    tx = optim.consolidation_in_state(optax.sgd(1.0), [2], [0.5])
    with pytest.raises(ValueError, match="for LevelParams use consolidation"):
        tx.init(optim.LevelParams.init_synced(jnp.zeros(2), 2))
    with pytest.raises(ValueError, match="got NoneType"):
        tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)), None)


def test_in_state_in_the_continual_engine_is_fast_slow():
    # The engine trains one parameter pytree, so the transform drops in as its optimizer. Another
    # implementation of two-level consolidation: the FastSlow strategy (slow copy in the strategy state)
    # over plain sgd. Same losses step for step, up to rounding.
    from conftest import make_tiny_stream

    from nestlearn import nn
    from nestlearn.continual import FastSlow, Learner, Naive, TrainConfig

    stream = make_tiny_stream()
    model = lambda rngs: nn.MLP(6, (8,), 3, rngs=rngs)
    cfg = TrainConfig(steps_per_task=8, batch_size=8)
    ours = Learner(model, optim.consolidation_in_state(optax.sgd(0.1), [3], [0.4]), Naive(), cfg)
    ref = Learner(model, optax.sgd(0.1), FastSlow(period=3.0, rate=0.4), cfg)
    a, b = ours.run(stream, seeds=[0, 1]), ref.run(stream, seeds=[0, 1])
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.acc_matrix, b.acc_matrix, atol=1e-6)
    assert not np.allclose(
        a.train_loss, Learner(model, optax.sgd(0.1), Naive(), cfg).run(stream, seeds=[0, 1]).train_loss
    )


def test_delta_momentum_hand_trajectory():
    # η = 0.1, α = 0.9, β = 1, normalised key k = g/‖g‖; m <- α m - β <m,k> k - η g.
    #   g1 = [1, 0]: m1 = -0.1 g1 = [-0.1, 0]
    #   g2 = [1, 1]: k = [1,1]/√2, <m1,k> = -0.1/√2, so -β<m1,k>k = [0.05, 0.05];
    #                m2 = [-0.09, 0] + [0.05, 0.05] - [0.1, 0.1] = [-0.14, -0.05]
    #   g3 = [0, 2]: k = [0, 1], <m2,k> = -0.05; m3 = [-0.126, -0.045] + [0, 0.05] - [0, 0.2] = [-0.126, -0.195]
    # A (2, 1) leaf is flattened: the same numbers.
    for shape in [(2,), (2, 1)]:
        tx = optim.delta_momentum(0.1, 0.9, 1.0)
        p = jnp.zeros(shape)
        s = tx.init(p)
        got = []
        for g in ([1.0, 0.0], [1.0, 1.0], [0.0, 2.0]):
            u, s = tx.update(jnp.asarray(g).reshape(shape), s, p)
            got.append(np.asarray(u).ravel())
        np.testing.assert_allclose(got, [[-0.1, 0], [-0.14, -0.05], [-0.126, -0.195]], rtol=1e-5, atol=1e-7)
    # Unnormalised (the paper's literal g gᵀ): m2 = [-0.09, 0] - (-0.1)[1, 1] - [0.1, 0.1] = [-0.09, 0].
    tx = optim.delta_momentum(0.1, 0.9, 1.0, normalize=False)
    s = tx.init(jnp.zeros(2))
    _, s = tx.update(jnp.array([1.0, 0.0]), s)
    u, _ = tx.update(jnp.array([1.0, 1.0]), s)
    np.testing.assert_allclose(u, [-0.09, 0.0], atol=1e-7)


def test_delta_momentum_beta_zero_is_heavy_ball():
    ref = optax.sgd(0.1, momentum=0.9)
    tx = optim.delta_momentum(0.1, 0.9, 0.0)
    p = jnp.zeros(3)
    sr, st = ref.init(p), tx.init(p)
    for i in range(4):
        g = jnp.array([1.0, -2.0, 0.5]) * (i + 1)
        ur, sr = ref.update(g, sr)
        ut, st = tx.update(g, st)
        np.testing.assert_allclose(ut, ur, rtol=1e-6)


def test_deep_momentum_reconstruct_hand_trajectory():
    # objective="reconstruct", hidden = 1 (a = 1, b = m = 0 at the start), one coordinate, g = 0.5 then 1.0.
    # f(g) = m + b tanh(a g); ℓ = ½ (f(g) - g)², r = f(g) - g; by hand ∂ℓ/∂m = r, ∂ℓ/∂b = r tanh(a g),
    # ∂ℓ/∂a = r b (1 - tanh²(a g)) g. With η_m = 1, α = 1: φ <- φ - ∂ℓ/∂φ; u = -η f_new(g).
    m, a, b, eta = 0.0, 1.0, 0.0, 0.1
    want = []
    for g in (0.5, 1.0):
        th = np.tanh(a * g)
        r = m + b * th - g
        m, a, b = m - r, a - r * b * (1 - th**2) * g, b - r * th
        want.append(-eta * (m + b * np.tanh(a * g)))
    tx = optim.deep_momentum(eta, memory_lr=1.0, decay=1.0, objective="reconstruct", hidden=1)
    s = tx.init(jnp.zeros(1))
    got = []
    for g in (0.5, 1.0):
        u, s = tx.update(jnp.full(1, g), s)
        got.append(float(u[0]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    mem = s[0].memory
    np.testing.assert_allclose(
        [float(mem["m"][0]), float(mem["a"][0, 0]), float(mem["b"][0, 0])], [m, a, b], rtol=1e-5
    )
    with pytest.raises(ValueError, match="hidden"):
        optim.deep_momentum(0.1, hidden=0)


def test_delta_gradient_step_hand_trajectory():
    # din = dout = 1, x = 2, target 1, loss ½(k x - 1)², δ = kx - 1, η = 0.5: η' = 0.5/(1 + 0.5·4) = 1/6.
    #   k0 = 0: δ = -1, k1 = 0 - (1/6)·2·(2·0 - 1) = 1/3
    #   k1:     δ = -1/3, k2 = 1/3 - (1/6)·2·(2/3 - 1/3) = 2/9
    # (the fixed point is k = 1/4, not 1/2: the x xᵀ term is a retention along x.)
    k = jnp.zeros((1, 1))
    got = []
    for _ in range(2):
        delta = 2.0 * k[0] - 1.0
        k = optim.delta_gradient_step(k, jnp.array([2.0]), delta, 0.5)
        got.append(float(k[0, 0]))
    np.testing.assert_allclose(got, [1 / 3, 2 / 9], rtol=1e-6)


def test_delta_gradient_step_matches_paper_layout():
    # Paper: W (dout×din) <- W(I - η' x xᵀ) - η' δ xᵀ, η' = η/(1 + η‖x‖²); ours works on K = Wᵀ.
    rng = np.random.default_rng(0)
    kernel, x, delta, eta = rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=3), 0.3
    w = kernel.T
    eta_p = eta / (1 + eta * x @ x)
    w_new = w @ (np.eye(4) - eta_p * np.outer(x, x)) - eta_p * np.outer(delta, x)
    got = optim.delta_gradient_step(
        jnp.asarray(kernel, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(delta, jnp.float32), eta
    )
    np.testing.assert_allclose(got, w_new.T, rtol=1e-5, atol=1e-6)


def test_delta_gradient_descent_transform_equals_step():
    # The transform gets the mean-loss gradient and the inputs; for a batch it equals delta_gradient_step.
    rng = np.random.default_rng(1)
    kernel = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    loss = lambda k: 0.5 * jnp.mean(jnp.sum((x @ k - t) ** 2, axis=-1))
    tx = optim.delta_gradient_descent(0.3)
    p = {"k": kernel}
    u, _ = tx.update({"k": jax.grad(loss)(kernel)}, tx.init(p), p, inputs={"k": x})
    want = optim.delta_gradient_step(kernel, x, x @ kernel - t, 0.3)
    np.testing.assert_allclose(kernel + u["k"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inputs must be"):
        tx.update({"k": kernel}, tx.init(p), p, inputs={"k": jnp.ones((5, 3))})
    with pytest.raises(ValueError, match="inputs="):
        tx.update({"k": kernel}, tx.init(p), p)


def test_m3_adam_ema_hand_trajectory_vector_leaf():
    # variant="adam_ema" (the earlier rule). 1-D leaf (no Newton–Schulz), b1 = b2 = b3 = 0.5, α = 1, f = 2,
    # ε = 0, η = 0.1; g = 1, then 2.
    #   t=0: m1 = .5, v = .5, acc = 1, no slow update (m2 = 0); m̂1 = .5/.5 = 1, v̂ = 1: u = -0.1
    #   t=1: m1 = .25 + 1 = 1.25, v = .25 + 2 = 2.25, acc = 3; slow: m2 = 0 + .5(3/2 - 0) = .75.
    #        m̂1 = 1.25/.75 = 5/3, v̂ = 2.25/.75 = 3: u = -0.1 (5/3 + .75)/√3
    tx = optim.m3(0.1, b1=0.5, b2=0.5, b3=0.5, alpha=1.0, slow_period=2, eps=0.0, variant="adam_ema")
    s = tx.init(jnp.zeros(1))
    u1, s = tx.update(jnp.ones(1), s)
    u2, s = tx.update(jnp.full(1, 2.0), s)
    np.testing.assert_allclose(
        [float(u1[0]), float(u2[0])], [-0.1, -0.1 * (5 / 3 + 0.75) / np.sqrt(3)], rtol=1e-6
    )
    np.testing.assert_allclose(s[0].mu_slow, [0.75])
    np.testing.assert_allclose(s[0].acc, [0.0])


def test_m3_adam_ema_matrix_leaf_is_orthogonalised():
    # variant="adam_ema": with α = 0 and one step, the update is -η NS(ĝ/√(ĝ²)) = -η NS(sign(g)):
    # Newton–Schulz keeps the singular vectors of its input and maps its singular values into about
    # [0.5, 1.5] (Muon's iteration).
    g = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32)
    tx = optim.m3(1.0, alpha=0.0, slow_period=4, variant="adam_ema")
    u, _ = tx.update(g, tx.init(g))
    a = np.sign(np.asarray(g))
    ua, sa, vta = np.linalg.svd(a, full_matrices=False)
    su = np.linalg.svd(-np.asarray(u), compute_uv=False)
    assert np.all(su > 0.5) and np.all(su < 1.5)
    # -u expressed in a's singular basis is diagonal.
    core = ua.T @ (-np.asarray(u)) @ vta.T
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=1e-3)
    assert sa.shape == su.shape
