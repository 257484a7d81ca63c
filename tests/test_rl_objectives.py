"""Advantage estimators and policy losses against hand-computed numbers and independent numpy loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raredx_jax.training import rl_objectives as ro
from raredx_jax.training.rl_objectives import ADVANTAGES, LOSSES, LossConfig

# --------------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------------

# Three prompts x G=4, contiguous groups.
REWARDS = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 1, 0, 0, 0], np.float32)
# By hand:
#  group 1 [1,0,0,1]: mean .5, sample std sqrt(4 * .25 / 3) = 0.5773503  -> +-0.5 / 0.5773503 = +-0.8660254
#  group 2: constant -> 0 everywhere
#  group 3 [1,0,0,0]: mean .25, sample std sqrt((.5625 + 3 * .0625) / 3) = 0.5 -> [1.5, -.5, -.5, -.5]
HAND_ADV = {
    "grpo": [0.8660254, -0.8660254, -0.8660254, 0.8660254, 0, 0, 0, 0, 1.5, -0.5, -0.5, -0.5],
    "dr_grpo": [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0.75, -0.25, -0.25, -0.25],
    "dr_grpo_positive": [0.5, 0, 0, 0.5, 0, 0, 0, 0, 0.75, 0, 0, 0],
    # r_i - mean of the other three: group 1: 1 - 1/3, 0 - 2/3; group 3: 1 - 0, 0 - 1/3
    "rloo": [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, 1.0, -1 / 3, -1 / 3, -1 / 3],
}


@pytest.mark.parametrize("name", sorted(HAND_ADV))
def test_advantages_hand_example(name):
    adv = np.asarray(jax.jit(ADVANTAGES[name], static_argnums=1)(jnp.asarray(REWARDS), 4))
    np.testing.assert_allclose(adv, HAND_ADV[name], atol=1e-5)


def _np_advantages(name, rewards, g, eps=1e-6):
    out = np.zeros_like(rewards, dtype=np.float64)
    for p in range(len(rewards) // g):
        grp = [float(x) for x in rewards[p * g:(p + 1) * g]]
        mean = sum(grp) / g
        for i, r in enumerate(grp):
            if name == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
                out[p * g + i] = (r - mean) / (std + eps)
            elif name == "dr_grpo":
                out[p * g + i] = r - mean
            elif name == "dr_grpo_positive":
                out[p * g + i] = max(r - mean, 0.0)
            else:
                others = [x for j, x in enumerate(grp) if j != i]
                out[p * g + i] = r - sum(others) / (g - 1)
    return out


@pytest.mark.parametrize("name", sorted(HAND_ADV))
def test_advantages_match_numpy_loops(name):
    rng = np.random.default_rng(0)
    r = rng.random(5 * 6).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ADVANTAGES[name](jnp.asarray(r), 6)), _np_advantages(name, r, 6),
                               rtol=1e-5, atol=1e-5)


def test_advantage_group_of_one_and_bad_shape():
    for name in ("grpo", "rloo"):
        np.testing.assert_array_equal(np.asarray(ADVANTAGES[name](jnp.ones(3), 1)), np.zeros(3))
    with pytest.raises(ValueError, match="num_prompts"):
        ADVANTAGES["grpo"](jnp.ones(5), 4)
    with pytest.raises(ValueError, match="unknown"):
        ro.get_advantage("nope")


def test_register_new_advantage_is_one_function():
    @ro.register_advantage("_test_sign")
    def _sign(rewards, group_size, eps=1e-6):
        return jnp.sign(ADVANTAGES["dr_grpo"](rewards, group_size))

    try:
        np.testing.assert_array_equal(np.asarray(ro.compute_advantages("_test_sign", jnp.array([1., 0.]), 2)),
                                      [1, -1])
        with pytest.raises(ValueError, match="already"):
            ro.register_advantage("_test_sign")(_sign)
    finally:
        ADVANTAGES.pop("_test_sign")


# --------------------------------------------------------------------------------------------------------
# losses: one hand-worked example
# --------------------------------------------------------------------------------------------------------

LP = np.array([[-1.0, -2.0, -0.5], [-1.5, -0.3, 0.0]], np.float32)
OLD = np.array([[-1.2, -2.0, -0.1], [-1.0, -0.3, 0.0]], np.float32)
REF = np.array([[-1.1, -1.9, -0.5], [-1.5, -0.5, 0.0]], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
ADV = np.array([1.0, -2.0], np.float32)
# ratios exp(lp - old): row 0: e^.2 = 1.2214028, 1, e^-.4 = 0.6703200 ; row 1: e^-.5 = 0.6065307, 1, (pad)
# symmetric clip [0.8, 1.2]:
#  row 0 (A=+1): -min(1.2214,1.2)=-1.2 (clipped), -1, -min(.6703,.8)=-.6703200   sum -2.8703200, mean -0.9567733
#  row 1 (A=-2): -min(-1.2131,-1.6)=+1.6 (clipped), +2                          sum  3.6,       mean  1.8
#  grpo   = (-0.9567733 + 1.8) / 2                          = 0.4216134
#  dr_grpo= (-2.8703200 + 3.6) / (B=2 * T=3)                = 0.1216133 ; with max_len=4: / 8 = 0.0912100
# dapo clip [0.8, 1.28]: row 0 token 0 is no longer clipped: -1.2214028
#  dapo   = (-1.2214028 - 1 - 0.6703200 + 1.6 + 2) / 5      = 0.1416554
# k3 KL, d = ref - lp: row 0: -.1, .1, 0 ; row 1: 0, -.2 (pad excluded)
#  e^d - d - 1: 0.0048374, 0.0051709, 0, 0, 0.0187308 ; sum 0.0287391 ; token mean 0.0057478
#  beta=0.1: grpo += 0.1 * ((0.0048374 + 0.0051709) / 3 + 0.0187308 / 2) / 2 = 0.0006351 -> 0.4222485
#            dr_grpo += 0.1 * 0.0287391 / 6 = 0.0004790 -> 0.1220923 ; dapo += 0.1 * 0.0287391 / 5 -> 0.1422302
HAND_LOSS = {
    ("grpo", 0.0, 0): 0.4216134,
    ("dr_grpo", 0.0, 0): 0.1216133,
    ("dr_grpo", 0.0, 4): 0.0912100,
    ("dapo", 0.0, 0): 0.1416554,
    ("grpo", 0.1, 0): 0.4222485,
    ("dr_grpo", 0.1, 0): 0.1220923,
    ("dapo", 0.1, 0): 0.1422302,
}
HAND_CLIP_FRACTION = {"grpo": 2 / 5, "dr_grpo": 2 / 5, "dapo": 1 / 5}


@pytest.mark.parametrize("key", sorted(HAND_LOSS))
def test_loss_hand_example(key):
    name, beta, max_len = key
    cfg = LossConfig(clip_eps=0.2, clip_eps_high=0.28, beta=beta, max_len=max_len)
    fn = jax.jit(lambda lp, old, a, m, ref: LOSSES[name](lp, old, a, m, ref, cfg=cfg))
    loss, metrics = fn(LP, OLD, ADV, MASK, REF)
    np.testing.assert_allclose(float(loss), HAND_LOSS[key], atol=2e-6)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), HAND_CLIP_FRACTION[name], atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), 0.0057478 if beta else 0.0, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), (1.2214028 + 1 + 0.67032 + 0.6065307 + 1) / 5,
                               atol=1e-6)
    # approx_kl = mean over tokens of (r - 1) - log r
    r = np.array([1.2214028, 1, 0.67032, 0.6065307, 1])
    np.testing.assert_allclose(float(metrics["approx_kl"]), np.mean(r - 1 - np.log(r)), atol=1e-6)
    assert float(metrics["tokens"]) == 5


def _np_loss(name, lp, old, adv, mask, ref, clip_eps, clip_hi, beta, max_len):
    """Independent reference with plain loops."""
    B, T = lp.shape
    hi = clip_hi if name == "dapo" else clip_eps
    tok = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = math.exp(lp[b, t] - old[b, t])
            c = min(max(ratio, 1 - clip_eps), 1 + hi)
            v = -min(ratio * adv[b], c * adv[b])
            if beta > 0:
                d = ref[b, t] - lp[b, t]
                v += beta * (math.exp(d) - d - 1)
            tok[b, t] = v
    if name == "grpo":
        return sum(tok[b].sum() / max(mask[b].sum(), 1) for b in range(B)) / B
    if name == "dr_grpo":
        return tok.sum() / (B * (max_len or T))
    return tok.sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_numpy_loops_random(name, beta):
    rng = np.random.default_rng(1)
    B, T = 6, 7
    lp = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    old = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    lens = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float32)
    lp_pad = np.where(mask > 0, lp, -1e9).astype(np.float32)  # garbage on padding must not leak
    adv = rng.normal(0, 1, B).astype(np.float32)
    cfg = LossConfig(clip_eps=0.2, clip_eps_high=0.3, beta=beta, max_len=10)
    loss, m = LOSSES[name](jnp.asarray(lp_pad), old, adv, mask, ref, cfg=cfg)
    want = _np_loss(name, lp, old, adv, mask, ref, 0.2, 0.3, beta, 10)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(float(v)) for v in m.values())


# --------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_advantage_group_gives_exactly_zero_gradient(name):
    rng = np.random.default_rng(2)
    G, T = 4, 5
    rewards = jnp.array([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.0, 1.0])  # group 1 constant, group 2 not
    adv = ADVANTAGES["grpo"](rewards, G)
    lp = jnp.asarray(rng.normal(-1, 0.5, (2 * G, T)), jnp.float32)
    old = lp + jnp.asarray(rng.normal(0, 0.3, (2 * G, T)), jnp.float32)
    mask = jnp.ones((2 * G, T))
    cfg = LossConfig(beta=0.0)
    grad = jax.grad(lambda x: LOSSES[name](x, old, adv, mask, None, cfg=cfg)[0])(lp)
    grad = np.asarray(grad)
    assert np.all(grad[:G] == 0.0), grad[:G]  # exactly zero for the constant-reward group
    assert np.any(grad[G:] != 0.0)
    # and a whole batch of zero advantages has zero gradient everywhere
    g0 = jax.grad(lambda x: LOSSES[name](x, old, jnp.zeros(2 * G), mask, None, cfg=cfg)[0])(lp)
    assert np.all(np.asarray(g0) == 0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_clipping_zeroes_gradient_outside_trust_region(name):
    eps, hi = 0.2, 0.28
    eff_hi = hi if name == "dapo" else eps
    # One token per row: (advantage, log ratio)
    cases = [
        (+1.0, math.log(1 + eff_hi) + 0.1),  # A>0, ratio above 1+eps: clipped -> no push further up
        (+1.0, math.log(1 - eps) - 0.1),     # A>0, ratio below 1-eps: NOT clipped -> gradient raises lp
        (-1.0, math.log(1 - eps) - 0.1),     # A<0, ratio below 1-eps: clipped -> no push further down
        (-1.0, math.log(1 + eff_hi) + 0.1),  # A<0, ratio above 1+eps: NOT clipped -> gradient lowers lp
        (+1.0, 0.05),                        # inside the region: gradient
    ]
    adv = jnp.array([a for a, _ in cases])
    old = jnp.full((len(cases), 1), -1.0)
    lp = old + jnp.array([[d] for _, d in cases])
    mask = jnp.ones_like(lp)
    g = np.asarray(jax.grad(lambda x: LOSSES[name](x, old, adv, mask, None, cfg=LossConfig(eps, hi))[0])(lp))[:, 0]
    assert g[0] == 0.0 and g[2] == 0.0
    assert g[1] < 0.0  # descending the loss raises logprob of a good token
    assert g[3] > 0.0  # descending the loss lowers logprob of a bad token
    assert g[4] < 0.0
    # the gradient of the unclipped branch is -ratio * A / normaliser
    ratio1 = math.exp(cases[1][1])
    norm = {"grpo": 1 * len(cases), "dr_grpo": len(cases) * 1, "dapo": len(cases)}[name]
    np.testing.assert_allclose(g[1], -ratio1 / norm, rtol=1e-5)


def test_dapo_upper_clip_is_asymmetric():
    # log ratio between log(1.2) and log(1.28): clipped by grpo, not by dapo
    lp, old = jnp.array([[math.log(1.25)]]), jnp.zeros((1, 1))
    adv, mask = jnp.ones(1), jnp.ones((1, 1))
    cfg = LossConfig(0.2, 0.28)
    g_grpo = jax.grad(lambda x: LOSSES["grpo"](x, old, adv, mask, cfg=cfg)[0])(lp)
    g_dapo = jax.grad(lambda x: LOSSES["dapo"](x, old, adv, mask, cfg=cfg)[0])(lp)
    assert float(g_grpo[0, 0]) == 0.0
    np.testing.assert_allclose(float(g_dapo[0, 0]), -1.25, rtol=1e-5)


def test_kl_gradient_pulls_towards_reference():
    lp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-0.5, -2.5]])
    g = jax.grad(lambda x: LOSSES["dapo"](x, lp, jnp.zeros(1), jnp.ones((1, 2)), ref,
                                          cfg=LossConfig(beta=1.0))[0])(lp)
    g = np.asarray(g)[0]
    # d/dlp [e^(ref-lp) - (ref-lp) - 1] = 1 - e^(ref-lp), token mean over 2 tokens
    np.testing.assert_allclose(g, [(1 - math.exp(0.5)) / 2, (1 - math.exp(-0.5)) / 2], rtol=1e-5)
    assert g[0] < 0 < g[1]


def test_beta_requires_reference_and_shape_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="ref_logprobs"):
        LOSSES["grpo"](x, x, jnp.zeros(2), x, None, cfg=LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="advantages"):
        LOSSES["grpo"](x, x, jnp.zeros(3), x, cfg=LossConfig())
    with pytest.raises(ValueError, match="unknown"):
        ro.get_loss("ppo2")


def test_loss_config_from_config_and_jit_static():
    from ml_collections import config_dict

    g = config_dict.ConfigDict({"clip_eps": 0.1, "clip_eps_high": 0.3, "beta": 0.02, "loss": "dapo"})
    cfg = LossConfig.from_config(g, max_len=64)
    assert cfg == LossConfig(0.1, 0.3, 0.02, 64)
    hash(cfg)
    f = jax.jit(ro.policy_loss, static_argnames=("name", "cfg"))
    loss, _ = f("dapo", jnp.asarray(LP), OLD, ADV, MASK, REF, cfg=LossConfig(0.2, 0.28, 0.1))
    np.testing.assert_allclose(float(loss), HAND_LOSS[("dapo", 0.1, 0)], atol=2e-6)


def test_token_logprobs_and_entropy():
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    lp = ro.token_logprobs(logits, jnp.array([[1, 0]]))
    np.testing.assert_allclose(np.asarray(lp), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)
    ent = ro.token_entropy(logits)
    np.testing.assert_allclose(np.asarray(ent), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)]],
                               rtol=1e-6)
