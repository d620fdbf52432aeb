"""Tests of every stage, one section per file. Run: python -m pytest test_all.py

The sections of the torch-only files (adam, policy, storage, ppo, logger) come first and import nothing of
Genesis: `python -m pytest test_all.py -k adam` runs in seconds, and a stage copied into another project can
take its section along. The Genesis sections build one scene per task for the whole file, with Genesis's
performance mode off (GS_PERFORMANCE_MODE=0, set here for this process and every one the tests start; see
env.init_genesis): a cached scene then builds in seconds, whatever its number of envs.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from adam import Adam
from policy import ActorCritic, Tanh
from ppo import PPOConfig, adapt_lr, clip_grad_norm_, gaussian_kl, gradient_buffers, ppo_loss, update
from storage import RolloutStorage

os.environ["GS_PERFORMANCE_MODE"] = "0"


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(17, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def regression_loss(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 17, generator=g)
    y = torch.randn(64, 5, generator=g)
    return ((model(x) - y) ** 2).mean()


# ---------------------------------------------------------------- adam.py

@pytest.mark.parametrize("lr, betas", [(1e-3, (0.9, 0.999)), (3e-3, (0.8, 0.99))])
def test_adam_matches_torch_adam(lr, betas):
    ours, ref = small_mlp(), small_mlp()
    opt = Adam(ours.parameters(), lr=lr, betas=betas)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=betas, foreach=False)
    worst = 0.0
    for step in range(250):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            regression_loss(model, step).backward()
            o.step()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters())))
    assert worst <= 1e-6, worst
    # the weights really moved: the comparison is not trivially true
    assert (opt.theta - torch.cat([p.detach().flatten() for p in small_mlp().parameters()])).abs().max() > 1e-2


def test_adam_overwrites_theta_in_place_and_uses_flat_buffers():
    model = small_mlp()
    opt = Adam(model.parameters())
    ptrs = [p.data_ptr() for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    assert opt.theta.numel() == opt.g.numel() == opt.m.numel() == opt.v.numel() == n
    assert sum(opt.nbytes().values()) == 4 * n * 4
    before = opt.theta.clone()
    for step in range(3):
        opt.zero_grad()
        regression_loss(model, step).backward()
        opt.step()
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # same storage: no copy of theta, ever
    assert not torch.equal(before, opt.theta)
    # the parameters ARE the flat buffer: writing into theta changes the model
    opt.theta.zero_()
    assert all((p == 0).all() for p in model.parameters())
    # and backward writes straight into the flat gradient
    opt.zero_grad()
    regression_loss(model, 0).backward()
    assert torch.equal(opt.g, torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert opt.g.abs().sum() > 0


def test_adam_state_dict_round_trip_is_bit_identical():
    a_model = small_mlp()
    a = Adam(a_model.parameters(), lr=1e-3)
    for step in range(20):
        a.zero_grad()
        regression_loss(a_model, step).backward()
        a.step()
    b_model = copy.deepcopy(a_model)
    b = Adam(b_model.parameters(), lr=0.5)  # wrong lr on purpose: the state must restore it
    b.load_state_dict(a.state_dict())
    assert b.t == a.t == 20 and b.param_groups[0]["lr"] == a.param_groups[0]["lr"] == 1e-3
    for step in range(20, 40):
        for model, o in ((a_model, a), (b_model, b)):
            o.zero_grad()
            regression_loss(model, step).backward()
            o.step()
    assert torch.equal(a.theta, b.theta) and torch.equal(a.m, b.m) and torch.equal(a.v, b.v)


def test_adam_rejects_state_of_another_shape():
    opt = Adam(small_mlp().parameters())
    other = Adam(nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match="different network shape"):
        opt.load_state_dict(other.state_dict())


def test_adam_tensor_lr_equals_float_lr():
    m1, m2 = small_mlp(), small_mlp()
    o1, o2 = Adam(m1.parameters(), lr=1e-3), Adam(m2.parameters(), lr=torch.tensor(1e-3))
    for step in range(10):
        for model, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            regression_loss(model, step).backward()
            o.step()
    assert torch.allclose(o1.theta, o2.theta, atol=1e-7)


def test_adam_detects_detached_grads():
    model = small_mlp()
    opt = Adam(model.parameters())
    model.zero_grad()  # torch sets .grad to None: no longer a view into the flat gradient
    regression_loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()


# ---------------------------------------------------------------- policy.py

def test_policy_parameter_count_is_the_seeds():
    policy = ActorCritic(17, 4)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(policy.actor) == 19_332
    assert count(policy.critic) == 18_945
    assert count(policy.actor) + count(policy.critic) == 38_277
    assert count(policy) == 38_281 and policy.std.numel() == 4


def test_policy_widths_and_activation_are_arguments():
    """Another robot's network (the Go2 example's: 512-256-128 ELU, 45 obs, 12 actions) from the same class; the
    default stays the seed's tanh network, built in the same order (so a seeded drone run is unchanged)."""
    torch.manual_seed(0)
    elu = ActorCritic(45, 12, hidden=(512, 256, 128), activation="elu")
    assert [m.out_features for m in elu.actor if isinstance(m, nn.Linear)] == [512, 256, 128, 12]
    assert sum(isinstance(m, nn.ELU) for m in elu.actor) == 3 and sum(isinstance(m, nn.ELU) for m in elu.critic) == 3
    assert sum(p.numel() for p in elu.parameters()) == 189_324 + 187_905 + 12
    linears, h = [m for m in elu.actor if isinstance(m, nn.Linear)], torch.randn(5, 45)
    x = h
    for linear in linears[:-1]:
        h = torch.nn.functional.elu(linear(h))
    assert torch.allclose(elu.act_deterministic(x), linears[-1](h), atol=1e-6)
    torch.manual_seed(0)
    a = ActorCritic(17, 4)
    torch.manual_seed(0)
    b = ActorCritic(17, 4, activation="tanh")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="activation must be one of tanh, elu"):
        ActorCritic(17, 4, activation="relu6")


def test_learner_memory_is_the_seeds_table():
    rows = Adam(ActorCritic(17, 4).parameters()).nbytes()  # read from the real tensors
    assert rows == {"weights (theta)": 38_281 * 4, "gradients (g)": 38_281 * 4,  # 153.1 KB each
                    "Adam m": 38_281 * 4, "Adam v": 38_281 * 4}
    assert sum(rows.values()) == 612_496  # 612.5 KB


def test_policy_tanh_matches_torch_tanh_in_value_and_gradient():
    x = (torch.randn(4096, 64) * 4).requires_grad_()
    y = Tanh()(x)
    ref = torch.tanh(x.detach())
    assert (y - ref).abs().max() < 5e-7
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    assert (grad - g * (1 - ref ** 2)).abs().max() < 5e-6  # |g| up to ~4, y within 5e-7
    x64 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Tanh(), (x64,))


def test_policy_act_and_evaluate_agree():
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, init_std=0.7)
    obs = torch.randn(32, 17)
    act = policy.act(obs)
    assert act.actions.shape == (32, 4) and act.log_prob.shape == (32,) and act.value.shape == (32,)
    assert torch.allclose(act.std, torch.full((32, 4), 0.7))
    out = policy.evaluate(obs, act.actions)
    assert torch.allclose(act.log_prob, out.log_prob) and torch.allclose(act.value, out.value)
    assert torch.equal(act.mean, out.mean) and torch.equal(act.std, out.std)
    dist = torch.distributions.Normal(act.mean, act.std)
    assert torch.allclose(act.log_prob, dist.log_prob(act.actions).sum(-1), atol=1e-5)
    assert torch.allclose(out.entropy, dist.entropy().sum(-1), atol=1e-5)
    assert torch.equal(policy.act_deterministic(obs), act.mean)


def test_untrained_policy_commands_hover():
    """The actor's last layer starts 100x smaller, so every drone starts near action 0 (hover), not with a random
    per-motor bias that flips it; the critic keeps its default scale."""
    torch.manual_seed(0)
    policy, obs = ActorCritic(17, 4), torch.randn(1000, 17) * 3
    assert policy.act_deterministic(obs).abs().max() < 0.02 and torch.equal(policy.actor[-1].bias, torch.zeros(4))
    assert policy.value(obs).std() > 0.05


def test_policy_samples_have_the_learned_std():
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, init_std=0.3)
    act = policy.act(torch.zeros(20000, 17))
    assert (act.actions - act.mean).std(0).sub(0.3).abs().max() < 0.01


def test_policy_std_has_a_floor():
    """Below min_std the actions are drawn with min_std, and no gradient pushes the std further down."""
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, init_std=0.1, min_std=0.2)
    act = policy.act(torch.zeros(20000, 17))
    assert (act.actions - act.mean).std(0).sub(0.2).abs().max() < 0.01
    out = policy.evaluate(torch.zeros(8, 17), act.actions[:8])
    assert torch.allclose(out.std, torch.full((8, 4), 0.2))
    (out.log_prob.sum() + out.entropy.sum()).backward()
    assert torch.equal(policy.std.grad, torch.zeros(4))


def test_policy_observation_normalizer_lives_in_the_module():
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, normalize_obs=True)
    data = torch.randn(4000, 17) * 5 + 3
    for chunk in data.split(1000):
        policy.update_normalizer(chunk)
    assert torch.allclose(policy.obs_norm.mean, data.mean(0), atol=1e-4)
    assert torch.allclose(policy.obs_norm.var, data.var(0, unbiased=False), rtol=1e-4)
    state = policy.state_dict()
    assert "obs_norm.mean" in state and "obs_norm.var" in state  # saved with the policy
    fresh = ActorCritic(17, 4, normalize_obs=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.act_deterministic(data[:5]), policy.act_deterministic(data[:5]))
    assert sum(p.numel() for p in policy.parameters()) == 38_281  # statistics are buffers, not weights


def test_normalizer_merges_the_moments_of_all_workers():
    """Worker a sums its moments with worker b's (all_sum): it ends with the statistics of both halves."""
    from policy import RunningNorm
    torch.manual_seed(0)
    data = torch.randn(3000, 17) * 4 + 2
    data[:, 3] = 1 + 1e-3 * torch.randn(3000)  # like a quaternion's w: a variance 1e-6 of a mean 1
    a, b = data[:1000], data[1000:]
    sent = {}
    RunningNorm(17).update(b, lambda t: sent.setdefault("b", t.clone()))  # what worker b contributes
    norm = RunningNorm(17)
    norm.update(a[:500])  # an earlier iteration, single worker
    norm.update(a[500:], lambda t: t.add_(sent["b"]))
    assert norm.count.item() == 3000
    assert torch.allclose(norm.mean, data.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, data.var(0, unbiased=False), rtol=1e-3)


# ---------------------------------------------------------------- storage.py

def naive_gae(rewards, values, dones, time_outs, final_values, last_values, gamma, lam):
    """Per env, per step, in plain Python floats: the definition, written the slow way."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            if dones[t][n]:
                next_value = final_values[t][n] if time_outs[t][n] else 0.0
                running = 0.0
            else:
                next_value = last_values[n] if t == T - 1 else values[t + 1][n]
            delta = rewards[t][n] + gamma * next_value - values[t][n]
            running = delta + gamma * lam * running
            adv[t][n] = running
    return adv


def fill_random(storage, seed=0, p_done=0.1, p_timeout=0.5):
    g = torch.Generator().manual_seed(seed)
    T, N = storage.num_steps, storage.num_envs
    for _ in range(T):
        dones = torch.rand(N, generator=g) < p_done
        time_outs = dones & (torch.rand(N, generator=g) < p_timeout)
        storage.add(obs=torch.randn(N, storage.obs.shape[-1], generator=g), actions=torch.randn(N, 4, generator=g),
                    rewards=torch.randn(N, generator=g), dones=dones, time_outs=time_outs,
                    final_obs=torch.randn(N, storage.obs.shape[-1], generator=g), values=torch.randn(N, generator=g),
                    log_probs=torch.randn(N, generator=g), mean=torch.randn(N, 4, generator=g),
                    std=torch.rand(N, 4, generator=g) + 0.5)


def test_storage_gae_matches_naive_reference():
    T, N, gamma, lam = 16, 7, 0.99, 0.95
    s = RolloutStorage(T, N, 17, 4, "cpu")
    fill_random(s)
    assert s.dones.sum() > 3 and s.time_outs.sum() > 1 and (s.dones & ~s.time_outs).sum() > 1
    last = torch.randn(N)
    # the time-outs' final observations come out in (t, n) order; their values go back to the same places
    where = [(t, n) for t in range(T) for n in range(N) if s.time_outs[t, n]]
    assert torch.equal(s.timed_out_obs(), torch.stack([s.final_obs[t, n] for t, n in where]))
    timed_out_values = torch.randn(len(where))
    final_values = [[0.0] * N for _ in range(T)]
    for (t, n), v in zip(where, timed_out_values.tolist()):
        final_values[t][n] = v
    s.compute_returns(last, timed_out_values, gamma, lam, normalize_advantages=False)
    ref = torch.tensor(naive_gae(s.rewards.tolist(), s.values.tolist(), s.dones.tolist(), s.time_outs.tolist(),
                                 final_values, last.tolist(), gamma, lam))
    assert torch.allclose(s.advantages, ref, atol=1e-5)
    assert torch.allclose(s.returns, ref + s.values, atol=1e-5)
    s.compute_returns(last, timed_out_values, gamma, lam)  # normalized over the batch
    assert abs(s.advantages.mean()) < 1e-5 and s.advantages.std(unbiased=False) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(s.returns, ref + s.values, atol=1e-5)  # returns are not normalized


def test_storage_minibatches_visit_every_sample_once_per_epoch():
    T, N = 10, 12
    s = RolloutStorage(T, N, 17, 4, "cpu")
    fill_random(s)
    s.compute_returns(torch.zeros(N), torch.zeros(int(s.time_outs.sum())), 0.99, 0.95)
    s.obs[..., 0] = torch.arange(T * N, dtype=torch.float32).view(T, N)  # tag each sample with its index
    seen = []
    for b in s.minibatches(num_epochs=3, num_minibatches=4):
        assert b.obs.shape == (T * N // 4, 17) and b.actions.shape == (T * N // 4, 4)
        seen.append(b.obs[:, 0].long())
    epochs = [torch.cat(seen[i:i + 4]) for i in (0, 4, 8)]
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(T * N))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled
    # fields of a sample stay together
    b = next(s.minibatches(1, 1))
    idx = b.obs[:, 0].long()
    assert torch.equal(b.advantages, s.advantages.flatten()[idx])
    assert torch.equal(b.actions, s.actions.flatten(0, 1)[idx])
    with pytest.raises(ValueError, match="equal minibatches"):
        next(s.minibatches(1, 7))


def test_storage_memory_report_and_overflow():
    s = RolloutStorage(100, 8192, 17, 4, "meta")  # sizes only: the meta device allocates nothing
    total = sum(s.nbytes().values())
    # obs 17 + final obs 17 + actions 4 + mean 4 + std 4 floats, 6 float scalars, 2 bools, per sample
    assert total == 100 * 8192 * ((17 + 17 + 4 + 4 + 4 + 6) * 4 + 2)
    small = RolloutStorage(2, 3, 17, 4, "cpu")
    fill_random(small)
    with pytest.raises(RuntimeError, match="full"):
        fill_random(small)


# ---------------------------------------------------------------- ppo.py

def test_ppo_clips_the_flat_gradient_as_torch_clips_each_tensor():
    """ppo.py finds adam.Adam's flat gradient from the tensors alone (one buffer to average and clip), falls
    back to the tensors of a torch optimizer, and clips both as torch.nn.utils.clip_grad_norm_ does."""
    m1, m2, m3 = small_mlp(), small_mlp(), small_mlp()
    opt = Adam(m1.parameters())
    opt.zero_grad()
    for m in (m1, m2, m3):
        (100 * regression_loss(m, 0)).backward()
    flat = gradient_buffers(list(m1.parameters()))
    assert len(flat) == 1 and flat[0].data_ptr() == opt.g.data_ptr() and flat[0].numel() == opt.g.numel()
    per_tensor = gradient_buffers(list(m2.parameters()))
    assert len(per_tensor) == len(list(m2.parameters()))
    norm, norm2 = clip_grad_norm_(flat, 1.0), clip_grad_norm_(per_tensor, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(m3.parameters(), 1.0)
    assert torch.allclose(norm, ref_norm) and torch.allclose(norm2, ref_norm)
    assert norm > 1.0  # clipping was active
    for m in (m1, m2):
        assert torch.allclose(torch.cat([p.grad.flatten() for p in m.parameters()]),
                              torch.cat([p.grad.flatten() for p in m3.parameters()]), atol=1e-7)
    assert torch.linalg.vector_norm(opt.g) == pytest.approx(1.0, rel=1e-5)


def test_ppo_loss_by_hand():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ratio = torch.tensor([1.5, 0.9, 0.5, 1.1])  # clipped, inside, clipped, inside
    old_lp = torch.zeros(4)
    lp = torch.log(ratio)
    value = torch.tensor([1.0, 0.0, 0.0, 0.0])
    old_value = torch.tensor([0.0, 0.0, 0.0, 0.0])
    returns = torch.tensor([0.0, 1.0, 0.0, 0.0])
    entropy = torch.tensor([2.0, 2.0, 2.0, 2.0])
    loss, surr, vloss, ent, clip_frac = ppo_loss(lp, old_lp, adv, value, old_value, returns, entropy,
                                                 clip=0.2, value_coef=0.5, entropy_coef=0.01)
    # per sample -min(r A, clip(r) A): A>0,r=1.5 -> -1.2; A>0,r=0.9 -> -0.9; A<0,r=0.5 -> 0.8; A<0,r=1.1 -> 1.1
    assert surr.item() == pytest.approx((-1.2 - 0.9 + 0.8 + 1.1) / 4, abs=1e-6)
    # value: sample 0: v=1 (clipped to 0.2), R=0 -> max(1, 0.04) = 1; sample 1: v=0, R=1 -> 1; others 0
    assert vloss.item() == pytest.approx(0.5, abs=1e-6)
    assert ent.item() == pytest.approx(2.0)
    assert clip_frac.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(surr.item() + 0.5 * 0.5 - 0.01 * 2.0, abs=1e-6)
    # value clipping: prediction moved inside the clip range toward a far return -> clipped term dominates
    _, _, vl, _, _ = ppo_loss(old_lp, old_lp, adv, torch.tensor([0.1, 0, 0, 0.]), old_value,
                              torch.tensor([-1.0, 0, 0, 0]), entropy)
    assert vl.item() == pytest.approx(1.1 ** 2 / 4, abs=1e-6)
    _, _, vl, _, _ = ppo_loss(old_lp, old_lp, adv, torch.tensor([0.5, 0, 0, 0.]), old_value,
                              torch.tensor([1.0, 0, 0, 0]), entropy)
    assert vl.item() == pytest.approx(0.8 ** 2 / 4, abs=1e-6)  # max picks the clipped (worse) prediction 0.2
    _, _, vl, _, _ = ppo_loss(old_lp, old_lp, adv, torch.tensor([0.5, 0, 0, 0.]), old_value,
                              torch.tensor([1.0, 0, 0, 0]), entropy, clip_value_loss=False)
    assert vl.item() == pytest.approx(0.5 ** 2 / 4, abs=1e-6)


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m0, m1 = torch.randn(8, 4), torch.randn(8, 4)
    s0, s1 = torch.rand(8, 4) + 0.2, torch.rand(8, 4) + 0.2
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m0, s0), torch.distributions.Normal(m1, s1))
    assert torch.allclose(gaussian_kl(m0, s0, m1, s1), ref.sum(-1), atol=1e-5)
    assert torch.equal(gaussian_kl(m0, s0, m0, s0), torch.zeros(8))


def test_adaptive_lr_moves_the_right_way():
    cfg = PPOConfig()
    lr = torch.tensor(1e-3)
    assert adapt_lr(lr, torch.tensor(0.05), cfg).item() == pytest.approx(1e-3 / 1.5)  # KL too high
    assert adapt_lr(lr, torch.tensor(0.001), cfg).item() == pytest.approx(1.5e-3)  # KL too low
    assert adapt_lr(lr, torch.tensor(0.01), cfg).item() == pytest.approx(1e-3)  # in the band
    assert adapt_lr(lr, torch.tensor(0.0), cfg).item() == pytest.approx(1e-3)  # untouched before any step
    assert adapt_lr(torch.tensor(1e-5), torch.tensor(1.0), cfg).item() == pytest.approx(1e-5)  # floor
    assert adapt_lr(torch.tensor(1e-2), torch.tensor(1e-4), cfg).item() == pytest.approx(1e-2)  # ceiling


def test_ppo_first_minibatch_has_ratio_one_and_kl_zero():
    torch.manual_seed(0)
    policy = ActorCritic(17, 4)
    s = RolloutStorage(8, 16, 17, 4, "cpu")
    with torch.no_grad():
        for _ in range(8):
            obs = torch.randn(16, 17)
            act = policy.act(obs)
            s.add(obs=obs, actions=act.actions, rewards=torch.randn(16), dones=torch.zeros(16, dtype=torch.bool),
                  time_outs=torch.zeros(16, dtype=torch.bool), final_obs=torch.zeros(16, 17), values=act.value,
                  log_probs=act.log_prob, mean=act.mean, std=act.std)
    s.compute_returns(torch.zeros(16), torch.zeros(0), 0.99, 0.95)
    b = next(s.minibatches(1, 4))
    out = policy.evaluate(b.obs, b.actions)
    assert torch.equal(torch.exp(out.log_prob - b.log_probs), torch.ones_like(out.log_prob))
    assert gaussian_kl(b.mean, b.std, out.mean, out.std).abs().max() == 0
    # the update reports the KL, lr and losses as device tensors; the lr grows when the KL stays small
    opt = Adam(policy.parameters(), lr=1e-4)
    stats = update(policy, opt, s.minibatches(2, 4), PPOConfig(learning_rate=1e-4))
    assert all(torch.is_tensor(x) and x.dim() == 0 for x in stats.values())
    assert stats["kl"] > 0 and stats["lr"] > 1e-4


def test_ppo_update_works_with_a_stock_torch_adam():
    """No adapter: update() sets the KL-adapted lr through param_groups, for torch.optim.Adam as for adam.Adam,
    and both take the same steps."""
    torch.manual_seed(0)
    ours, ref = ActorCritic(17, 4), ActorCritic(17, 4)
    ref.load_state_dict(ours.state_dict())
    before = [p.detach().clone() for p in ref.parameters()]
    s = RolloutStorage(4, 64, 17, 4, "cpu")
    fill_random(s)
    s.compute_returns(torch.zeros(64), torch.zeros(int(s.time_outs.sum())), 0.99, 0.95)
    batches = lambda: s.minibatches(3, 2, generator=torch.Generator().manual_seed(0))  # noqa: E731
    stats = update(ours, Adam(ours.parameters(), lr=torch.tensor(1e-3)), batches(), PPOConfig(desired_kl=1e-4))
    torch_adam = torch.optim.Adam(ref.parameters(), lr=1e-3, foreach=False)
    ref_stats = update(ref, torch_adam, batches(), PPOConfig(desired_kl=1e-4))
    assert stats["lr"] < 1e-3 and torch_adam.param_groups[0]["lr"] == pytest.approx(ref_stats["lr"].item())
    assert ref_stats["lr"] == pytest.approx(stats["lr"].item())  # the same schedule
    assert max((a - b).abs().max().item() for a, b in zip(ref.parameters(), before)) > 1e-4  # it learned
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


# A tiny batched task in pure torch: 256 point masses on a plane, each must reach its own target.
class PointMasses:
    def __init__(self, n, seed=0):
        self.n, self.dt, self.max_len = n, 0.1, 50
        self.g = torch.Generator().manual_seed(seed)
        self.pos, self.vel = torch.zeros(n, 2), torch.zeros(n, 2)
        self.target = torch.zeros(n, 2)
        self.t = torch.zeros(n, dtype=torch.long)
        self.reset(torch.ones(n, dtype=torch.bool))

    def reset(self, mask):
        m = mask.unsqueeze(-1)
        self.pos = torch.where(m, torch.zeros_like(self.pos), self.pos)
        self.vel = torch.where(m, torch.zeros_like(self.vel), self.vel)
        self.target = torch.where(m, torch.rand(self.n, 2, generator=self.g) * 2 - 1, self.target)
        self.t = torch.where(mask, torch.zeros_like(self.t), self.t)

    def obs(self):
        return torch.cat([self.target - self.pos, self.vel], -1)

    def step(self, action):
        self.vel = 0.9 * self.vel + self.dt * action.clamp(-1, 1) * 3
        self.pos = self.pos + self.dt * self.vel
        reward = -(self.target - self.pos).norm(dim=-1) * self.dt
        self.t += 1
        time_out = self.t >= self.max_len
        final = self.obs()
        self.reset(time_out)
        return self.obs(), reward, time_out, time_out, final


def mean_return(policy, deterministic):
    env, total = PointMasses(256, seed=123), torch.zeros(())
    obs = env.obs()
    with torch.no_grad():
        for _ in range(env.max_len):
            a = policy.act_deterministic(obs) if deterministic else policy.act(obs).actions
            obs, r, *_ = env.step(a)
            total += r.mean()
    return total.item()


def test_ppo_learns_point_masses():
    torch.manual_seed(0)
    N, T = 256, 50
    policy = ActorCritic(4, 2, hidden=(64, 64))
    cfg = PPOConfig(learning_rate=1e-3, entropy_coef=0.0)
    opt = Adam(policy.parameters(), lr=cfg.learning_rate)
    storage = RolloutStorage(T, N, 4, 2, "cpu")
    env = PointMasses(N)
    random_return = mean_return(policy, deterministic=False)
    obs = env.obs()
    for _ in range(25):
        with torch.no_grad():
            for _ in range(T):
                act = policy.act(obs)
                next_obs, r, done, time_out, final = env.step(act.actions)
                storage.add(obs=obs, actions=act.actions, rewards=r, dones=done, time_outs=time_out, final_obs=final,
                            values=act.value, log_probs=act.log_prob, mean=act.mean, std=act.std)
                obs = next_obs
            storage.compute_returns(policy.value(obs), policy.value(storage.timed_out_obs()), cfg.gamma, cfg.lam)
        update(policy, opt, storage.minibatches(cfg.num_epochs, cfg.num_minibatches), cfg)
        storage.clear()
    trained_return = mean_return(policy, deterministic=True)
    stay_put_return = mean_return(StayPut(), deterministic=True)  # about -3.8; random is about -7.4
    assert random_return < stay_put_return
    # The trained policy must reach the targets: its distance summed over the episode is under a quarter
    # of what staying at the origin gives (measured: -0.37 after 25 iterations, about 4 s).
    assert trained_return > 0.25 * stay_put_return, (trained_return, stay_put_return, random_return)


class StayPut:
    def act_deterministic(self, obs):
        return torch.zeros(obs.shape[0], 2)


# ---------------------------------------------------------------- logger.py
from logger import EpisodeStats, RunLog, tensorboard_name, write_atomically


def test_episode_stats_average_what_ended_and_rate_the_counts_per_env_minute():
    """Two steps of 4 envs: the episodes that ended are averaged per episode, the counts are divided by the minutes
    of the ended episodes; the running ones are not counted until they end."""
    stats = EpisodeStats(rates=("targets", "crashes"), unit="drone", dt=0.01)
    step1 = {"return": torch.tensor([1.0, 2.0, 3.0, 4.0]), "length": torch.tensor([100.0, 200.0, 300.0, 400.0]),
             "targets": torch.tensor([1.0, 0.0, 5.0, 9.0]), "crashes": torch.tensor([0.0, 1.0, 0.0, 0.0])}
    stats.add(torch.tensor([True, True, False, False]), step1)
    stats.add(torch.tensor([False, False, True, False]), {k: v * 2 for k, v in step1.items()})
    row = stats.read()
    minutes = (100 + 200 + 600) * 0.01 / 60
    assert row["episodes"] == 3 and row["episode_length"] == pytest.approx(300.0)
    assert row["episode_return"] == pytest.approx((1 + 2 + 6) / 3) and row["episode_crashes"] == pytest.approx(1 / 3)
    assert row["targets_per_drone_min"] == pytest.approx((1 + 0 + 10) / minutes)
    assert row["crashes_per_drone_min"] == pytest.approx(1 / minutes)
    assert stats.read() == {"episodes": 0}  # read() restarts the sums
    stats.add(torch.tensor([False, False, False, True]), step1)
    doubled = stats.read(all_sum=lambda t: t.mul_(2))  # as if a second worker had seen the same
    assert doubled["episodes"] == 2 and doubled["episode_return"] == pytest.approx(4.0)


def test_tensorboard_names_are_rsl_rls():
    assert [tensorboard_name(k) for k in ("value_loss", "surrogate", "entropy", "lr", "action_std", "steps_per_s",
                                          "collect_s", "learn_s", "episode_return", "episode_length")] == [
        "Loss/value_function", "Loss/surrogate", "Loss/entropy", "Loss/learning_rate", "Policy/mean_std",
        "Perf/total_fps", "Perf/collection time", "Perf/learning_time", "Train/mean_reward",
        "Train/mean_episode_length"]
    assert tensorboard_name("episode_reward_tracking_lin_vel") == "Episode/reward_tracking_lin_vel"
    assert tensorboard_name("crashes_per_drone_min") == "Train/crashes_per_drone_min"


def test_run_log_appends_rows_and_only_the_main_worker_writes(tmp_path, capsys):
    stats = EpisodeStats(rates=("falls",), unit="robot", dt=0.02)
    row = {"iteration": 3, "steps_per_s": 1000.0, "episodes": 2, "episode_return": 1.5, "falls_per_robot_min": 0.25,
           "kl": 0.01, "lr": 1e-3, "action_std": 0.5, "elapsed_s": 61.0, "eta_s": 3600.0}
    for _ in range(2):  # a resumed run appends to the same metrics.jsonl
        log = RunLog(str(tmp_path / "run"), {"seed": 1}, stats, max_iterations=10)
        log.write(row)
        log.close()
    assert capsys.readouterr().out.splitlines()[0] == (
        "iter    3/10    1,000 steps/s  return   1.500  falls/robot-min  0.250  kl 0.0100  lr 1.0e-03  std 0.500  "
        "elapsed 00:01:01  eta 01:00:00")
    assert [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [row] * 2
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"seed": 1}
    quiet = RunLog(str(tmp_path / "other"), {"seed": 1}, stats, max_iterations=10, active=False)
    quiet.write(row)
    quiet.save("ckpt_0003.pt", {"iteration": 3})
    quiet.close()
    assert not (tmp_path / "other").exists() and capsys.readouterr().out == ""


def test_save_interrupted_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    log = RunLog(str(tmp_path), {}, EpisodeStats((), "env", 0.01), max_iterations=10)
    log.save("ckpt.pt", {"iteration": 7})
    real_save = torch.save

    def dies_mid_write(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill during the write

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        log.save("ckpt.pt", {"iteration": 8})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "ckpt.pt")["iteration"] == 7
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "config.json", "metrics.jsonl"]  # no temporary file left
    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(tmp_path / "policy.c"), lambda tmp: dies_mid_write(None, tmp))
    assert not (tmp_path / "policy.c").exists()


# ---------------------------------------------------------------- env.py: the drone task
# One scene of N drones for the whole file (the first build compiles Genesis's kernels, minutes on a CPU; later
# runs hit the kernel cache). Every test starts from env.reset(), so the order does not matter. Some tests set
# env state directly (targets, episode counters, drone pose) to construct situations quickly; each says so.
from torch.overrides import TorchFunctionMode

import env as env_module
from env import HoverConfig, HoverEnv

REWARD_TERMS = ("target", "smooth", "yaw", "angular", "crash")

N = 8
CFG = HoverConfig()
INIT = torch.tensor(CFG.init_pos)
DT = CFG.dt


@pytest.fixture(scope="module")
def env():
    return HoverEnv(num_envs=N, device="cpu", seed=0)


def full(value):
    return torch.full((N, 4), float(value))


def run(env, actions, steps):
    for _ in range(steps):
        out = env.step(actions)
    return out


def expected_reset_obs(env):
    rel = ((env.target_pos - INIT) / 3).clamp(-1, 1)
    return torch.cat((rel, torch.tensor([[1.0, 0, 0, 0]]).expand(N, 4), torch.zeros(N, 10)), dim=1)


def rotation_matrix(q):  # [N, 4] w,x,y,z -> [N, 3, 3], written independently of env.py's helpers
    w, x, y, z = q.unbind(1)
    return torch.stack((1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)), 1).view(-1, 3, 3)


def test_shapes_dtypes_device(env):
    obs = env.reset()
    assert obs.shape == (N, 17) and obs.dtype == torch.float32 and obs.device.type == "cpu"
    assert env.num_obs == 17 and env.num_actions == 4 and env.max_episode_length == 1500 and env.dt == 0.01
    obs, rew, done, info = env.step(torch.zeros(N, 4))
    assert obs.shape == (N, 17) and obs.dtype == torch.float32
    assert rew.shape == (N,) and rew.dtype == torch.float32
    assert done.shape == (N,) and done.dtype == torch.bool
    assert info["time_outs"].shape == (N,) and info["time_outs"].dtype == torch.bool
    assert info["nonfinite"].shape == (N,) and info["nonfinite"].dtype == torch.bool
    assert info["final_obs"].shape == (N, 17)
    keys = {"return", "length", "targets", "crashes", *(f"reward_{t}" for t in REWARD_TERMS)}
    assert set(info["episode"]) == keys
    assert all(v.shape == (N,) and v.device.type == "cpu" for v in info["episode"].values())
    assert env.base_pos.shape == (N, 3) and env.target_pos.shape == (N, 3)


def test_reset_observation_layout(env):
    obs = env.reset()
    assert torch.equal(env.base_pos, INIT.expand(N, 3))
    assert torch.allclose(obs, expected_reset_obs(env), atol=1e-6)
    assert torch.allclose(env.drone.get_pos(), INIT.expand(N, 3), atol=1e-6)
    assert torch.equal(env.episode_length, torch.zeros(N, dtype=torch.int32))


def test_observation_matches_genesis_state(env):
    """Body-frame velocities and quaternion in obs agree with Genesis's own getters after some tumbling."""
    env.reset()
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        actions = torch.rand(N, 4, generator=g) * 0.6 - 0.3
        obs, _, done, _ = env.step(actions)
    assert not done.any()
    quat = env.drone.get_quat()
    R_T = rotation_matrix(quat).transpose(1, 2)
    lin_b = (R_T @ env.drone.get_vel()[:, :, None])[..., 0]
    ang_b = (R_T @ env.drone.get_ang()[:, :, None])[..., 0]
    assert torch.allclose(obs[:, 3:7], quat, atol=1e-6)
    assert torch.allclose(obs[:, 7:10], (lin_b / 3).clamp(-1, 1), atol=1e-5)
    assert torch.allclose(obs[:, 10:13], (ang_b / 25).clamp(-1, 1), atol=1e-5)  # clipped at 25 rad/s, not pi
    assert torch.equal(obs[:, 13:17], actions)  # the action applied in this step
    assert torch.allclose(obs[:, :3], ((env.target_pos - env.drone.get_pos()) / 3).clamp(-1, 1), atol=1e-6)
    assert torch.allclose(env.base_pos, env.drone.get_pos(), atol=1e-6)


def test_zero_action_hovers(env):
    env.reset()
    obs, _, done, info = run(env, torch.zeros(N, 4), 50)  # 0.5 s
    assert not done.any() and torch.equal(info["final_obs"], obs)
    assert (env.base_pos - INIT).norm(dim=1).max() < 0.1
    assert torch.equal(info["episode"]["length"], torch.full((N,), 50.0))  # running sums where not done


def test_full_throttle_climbs(env):
    env.reset()
    obs, _, done, _ = run(env, full(1.0), 30)
    assert not done.any()
    assert (env.base_pos[:, 2] > INIT[2] + 0.2).all()
    assert (obs[:, 9] > 0).all()  # body z velocity (drone stays level) points up
    obs, _, _, _ = env.step(full(3.0))  # out-of-range actions are clipped to [-1, 1] before use
    assert torch.equal(obs[:, 13:17], full(1.0))


def test_min_throttle_crashes_and_resets(env):
    env.reset()
    for step in range(1, 101):
        obs, rew, done, info = env.step(full(-1.0))
        if done.any():
            break
    assert done.all() and 30 < step < 100  # ~0.45 s of near free fall from 1 m
    ep = info["episode"]
    assert (ep["crashes"] == 1).all() and not info["time_outs"].any() and not info["nonfinite"].any()
    assert (info["final_obs"][:, 2] > 0.9 / 3).all()  # pre-reset height below 0.1 m: rel z > 0.9
    assert torch.allclose(ep["reward_crash"], torch.full((N,), -10.0 * DT))
    assert torch.equal(ep["length"], torch.full((N,), float(step)))
    assert torch.equal(env.base_pos, INIT.expand(N, 3))
    assert torch.allclose(obs, expected_reset_obs(env), atol=1e-6)
    assert torch.allclose(env.drone.get_pos(), INIT.expand(N, 3), atol=1e-6)
    assert torch.allclose(env.drone.get_dofs_velocity(), torch.zeros(N, 6))
    obs, _, done, _ = env.step(torch.zeros(N, 4))  # the reset drone really flies from the start pose
    assert not done.any() and (env.base_pos - INIT).norm(dim=1).max() < 0.01


def test_time_out_after_1500_steps(env):
    """The episode counter is set to 1495 directly (instead of hovering 1495 steps); zero action hovers."""
    env.reset()
    env.episode_length.fill_(1495)
    for _ in range(4):
        _, _, done, info = env.step(torch.zeros(N, 4))
        assert not done.any()
    obs, _, done, info = env.step(torch.zeros(N, 4))
    assert done.all() and info["time_outs"].all() and not info["episode"]["crashes"].any()
    assert torch.equal(info["episode"]["length"], torch.full((N,), 5.0))  # steps actually stepped
    assert torch.equal(env.episode_length, torch.zeros(N, dtype=torch.int32))
    assert torch.allclose(obs, expected_reset_obs(env), atol=1e-6)
    assert not torch.allclose(info["final_obs"], obs)  # bootstrapping sees the pre-reset state


def test_crash_on_last_step_counts_as_crash(env):
    """Env 0 is put 5 cm above the ground on the time-out step: it is a crash, not a time-out."""
    env.reset()
    env.episode_length.fill_(1499)
    qpos = env.drone.get_qpos()
    qpos[0, 2] = 0.05
    env.drone.set_qpos(qpos, zero_velocity=True)
    _, _, done, info = env.step(torch.zeros(N, 4))
    assert done.all()
    assert info["episode"]["crashes"].tolist() == [1.0] + [0.0] * (N - 1)
    assert info["time_outs"].tolist() == [False] + [True] * (N - 1)


def last_step_of_episode(env, actions):
    """Step once as the episode's last step (counter set to 1499 directly) so info["episode"] is valid for all."""
    env.episode_length.fill_(1499)
    _, rew, done, info = env.step(actions)
    assert done.all()
    return rew, info


def test_reward_target_sign(env):
    """Targets are set directly: above the drone (climbing toward it pays), then below (climbing away costs)."""
    for target_z, sign in ((2.0, 1.0), (0.5, -1.0)):
        env.reset()
        env.target_pos[:] = torch.tensor([0.0, 0.0, target_z])
        run(env, full(1.0), 5)
        _, info = last_step_of_episode(env, full(1.0))
        assert (sign * info["episode"]["reward_target"] > 0).all()


def test_reward_terms_one_step(env):
    env.reset()
    prev_pos, target = env.base_pos.clone(), env.target_pos.clone()
    rew, info = last_step_of_episode(env, full(0.5))
    ep = info["episode"]  # a one-step episode: its sums are this step's terms
    pos = target - info["final_obs"][:, :3] * 3  # |rel| < 3 here, so the clip is inactive
    expected = 10 * DT * ((prev_pos - target).square().sum(1) - (pos - target).square().sum(1))
    assert torch.allclose(ep["reward_target"], expected, atol=1e-6)
    assert torch.allclose(ep["reward_smooth"], torch.full((N,), -1e-4 * DT * 4 * 0.25))
    assert torch.allclose(ep["reward_yaw"], torch.full((N,), 0.01 * DT), atol=1e-8)  # level start: yaw ~ 0
    ang = info["final_obs"][:, 10:13] * 25
    assert torch.allclose(ep["reward_angular"], -2e-4 * DT * ang.norm(dim=1) / 3.14159, atol=1e-9)
    assert torch.equal(ep["reward_crash"], torch.zeros(N))
    total = sum(ep[f"reward_{t}"] for t in REWARD_TERMS)
    assert torch.allclose(rew, total, atol=1e-9) and torch.allclose(ep["return"], rew)
    assert torch.equal(ep["length"], torch.ones(N))


def test_progress_speed_cap():
    """Without a cap the term is the drop in squared distance; with one, closing in faster than the cap pays as if
    at the cap (2 |p_prev - target| v dt), slower or receding flight is paid as before."""
    prev = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0]])
    now = torch.tensor([[1.9, 0, 0], [1.995, 0, 0], [2.1, 0, 0]])  # 10 m/s, 0.5 m/s toward; 10 m/s away
    dist2 = now.square().sum(1)
    plain = env_module.progress(prev, dist2, 0.0, DT)
    assert torch.allclose(plain, 4 - dist2)
    capped = env_module.progress(prev, dist2, 2.5, DT)
    assert torch.allclose(capped, torch.stack((torch.tensor(2 * 2.0 * 2.5 * DT), plain[1], plain[2])))


def test_progress_per_metre():
    """Per metre, the term is the drop in distance, the same for closing in at a speed 0.15 m or 2 m from the
    target; a cap pays faster closing as if at the cap (v dt), slower or receding flight as before."""
    prev = torch.tensor([[2.0, 0, 0], [0.15, 0, 0], [2.0, 0, 0], [2.0, 0, 0]])
    now = torch.tensor([[1.995, 0, 0], [0.145, 0, 0], [1.9, 0, 0], [2.1, 0, 0]])  # 0.5 m/s toward, twice; 10 in, out
    dist2 = now.square().sum(1)
    metres = env_module.progress(prev, dist2, 0.0, DT, per_metre=True)
    assert torch.allclose(metres, torch.tensor([0.005, 0.005, 0.1, -0.1]), atol=1e-6)
    squared = env_module.progress(prev, dist2, 0.0, DT)
    assert squared[0] > 10 * squared[1]  # squared distances pay the last centimetres little
    capped = env_module.progress(prev, dist2, 2.5, DT, per_metre=True)
    assert torch.allclose(capped, torch.tensor([0.005, 0.005, 2.5 * DT, -0.1]), atol=1e-6)


def climb_one_step(env, cfg):
    """A one-step episode at full throttle toward a target 1 m above, flown under cfg (env.cfg replaced directly,
    then restored; the reward weights stay the 10 per unit of progress the env was built with). Returns the
    distance to the target before [N], after [N], and the progress reward paid [N]."""
    env.reset()
    env.target_pos[:] = torch.tensor([0.0, 0.0, 2.0])
    prev_dist = torch.linalg.vector_norm(env.target_pos - env.base_pos, dim=1)
    env.cfg = cfg
    try:
        _, info = last_step_of_episode(env, full(1.0))
    finally:
        env.cfg = CFG
    return prev_dist, (info["final_obs"][:, :3] * 3).norm(dim=1), info["episode"]["reward_target"]


def test_env_pays_capped_progress(env):
    """With a cap of 0.05 m/s, the climb closes in faster than that, and is paid as if at 0.05 m/s."""
    prev_dist, dist, paid = climb_one_step(env, HoverConfig(progress_speed_cap=0.05))
    capped = 10 * DT * 2 * prev_dist * 0.05 * DT
    assert (10 * DT * (prev_dist.square() - dist.square()) > 1.5 * capped).all()  # uncapped, it would be paid more
    assert torch.allclose(paid, capped, rtol=1e-4)


def test_env_pays_progress_per_metre(env):
    """Paid per metre, the climb earns reward_target * dt * the metres it closed in."""
    prev_dist, dist, paid = climb_one_step(env, HoverConfig(progress_per_metre=True))
    assert (prev_dist > dist).all()
    assert torch.allclose(paid, 10 * DT * (prev_dist - dist), rtol=1e-4)


def test_crash_scale_grows_over_the_ramp_then_holds():
    cfg = HoverConfig(crash_multiple=10.0, crash_ramp=(100, 200))
    scales = [env_module.crash_scale(i, cfg) for i in (1, 100, 150, 200, 250)]
    assert scales == [1.0, 1.0, 5.5, 10.0, 10.0]
    assert env_module.crash_scale(50, HoverConfig(crash_multiple=10.0, crash_ramp=(50, 50))) == 10.0  # a step
    assert {env_module.crash_scale(i, HoverConfig()) for i in range(0, 400, 7)} == {1.0}  # the default: unchanged
    for bad in (dict(crash_multiple=0.0), dict(crash_ramp=(200, 100)), dict(crash_ramp=(100,)),
                dict(progress_speed_cap=-1.0)):
        with pytest.raises(ValueError, match="must be"):
            HoverConfig(**bad)


def test_set_iteration_grows_the_crash_penalty_the_env_pays(env):
    """The curriculum is the task's: train.py only tells the env the iteration. A drone put 5 cm above the ground
    crashes in one step and pays the penalty of that iteration."""
    env.cfg = HoverConfig(crash_multiple=4.0, crash_ramp=(10, 20))
    try:
        for iteration, multiple in ((5, 1.0), (15, 2.5), (30, 4.0)):
            env.set_iteration(iteration)
            env.reset()
            qpos = env.drone.get_qpos()
            qpos[:, 2] = 0.05
            env.drone.set_qpos(qpos, zero_velocity=True)
            _, _, done, info = env.step(torch.zeros(N, 4))
            paid = info["episode"]["reward_crash"]
            assert done.all() and torch.allclose(paid, torch.full((N,), -10.0 * multiple * DT))
    finally:
        env.cfg = CFG
        env.set_iteration(1)
    assert env.reward_crash == CFG.reward_crash


def test_reward_yaw_convention(env):
    """Drones are turned directly to yaws across (-3, 3) rad with a 0.3 rad roll; the yaw term must follow the z-y-x
    yaw read off the rotation matrix (atan2(R10, R00)), not some other Euler convention."""
    env.reset()
    yaw, roll = torch.linspace(-3.0, 3.0, N), torch.full((N,), 0.3)
    cz, sz, cx, sx = (yaw / 2).cos(), (yaw / 2).sin(), (roll / 2).cos(), (roll / 2).sin()
    qpos = env.drone.get_qpos()
    qpos[:, 3:] = torch.stack((cz * cx, cz * sx, sz * sx, sz * cx), 1)  # q_z(yaw) * q_x(roll)
    env.drone.set_qpos(qpos, zero_velocity=True)
    _, info = last_step_of_episode(env, torch.zeros(N, 4))
    R = rotation_matrix(info["final_obs"][:, 3:7])
    expected_yaw = torch.atan2(R[:, 1, 0], R[:, 0, 0])
    assert torch.allclose(expected_yaw, yaw, atol=0.02)  # barely turned in one step
    assert torch.allclose(info["episode"]["reward_yaw"], 0.01 * DT * torch.exp(-10 * expected_yaw.abs()), atol=1e-7)


def test_target_resampled_when_reached(env):
    """Env 0's target is set to the drone's own position, so it is reached on the next step."""
    env.reset()
    env.target_pos[0] = env.base_pos[0]
    old = env.target_pos.clone()
    obs, _, _, _ = env.step(torch.zeros(N, 4))
    assert not torch.equal(env.target_pos[0], old[0]) and torch.equal(env.target_pos[1:], old[1:])
    low, high = torch.tensor(CFG.target_low), torch.tensor(CFG.target_high)
    assert ((env.target_pos[0] >= low) & (env.target_pos[0] <= high)).all()
    assert torch.allclose(obs[0, :3], ((env.target_pos[0] - env.base_pos[0]) / 3).clamp(-1, 1), atol=1e-6)
    _, info = last_step_of_episode(env, torch.zeros(N, 4))  # read the exact per-episode count
    assert info["episode"]["targets"].tolist() == [1.0] + [0.0] * (N - 1)


def test_targets_inside_ranges(env):
    low, high = torch.tensor(CFG.target_low), torch.tensor(CFG.target_high)
    targets = [env._draw_targets() for _ in range(200)]
    for _ in range(5):
        env.reset()
        targets.append(env.target_pos)
    targets = torch.cat(targets)
    assert ((targets >= low) & (targets <= high)).all() and (targets[:, 2] == 1.0).all()
    assert targets[:, :2].min() < -0.95 and targets[:, :2].max() > 0.95  # the whole square is used


def test_random_episode_start(env):
    env.reset(random_episode_start=True)
    lengths = env.episode_length
    assert lengths.min() >= 0 and lengths.max() < 1500 and len(set(lengths.tolist())) > 1
    env.reset()
    assert (env.episode_length == 0).all()


def test_bad_actions_raise(env):
    env.reset()
    bad = [torch.zeros(N, 3), torch.zeros(N - 1, 4), torch.zeros(4), torch.zeros(N, 4, dtype=torch.float64),
           torch.zeros(N, 4, device="meta"), torch.zeros(N, 4).numpy()]
    for actions in bad:
        with pytest.raises((ValueError, TypeError)):
            env.step(actions)
    for value in (float("nan"), float("inf")):
        actions = torch.zeros(N, 4)
        actions[3, 1] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            env.step(actions)
    assert (env.episode_length == 0).all()  # nothing was stepped


def test_seeded_runs_identical(env):
    """A second HoverEnv in one process recompiles every kernel (~70 s on CPU), so two seeded runs of the same env
    are compared instead: re-seed, reset, step 20 fixed actions; obs and rewards must match bit for bit, whatever the
    global torch RNG does in between."""
    def rollout():
        env.generator.manual_seed(0)
        g = torch.Generator().manual_seed(7)
        out = [env.reset()]
        for _ in range(20):
            torch.rand(100)  # global RNG use (e.g. by the trainer) must not change the env
            obs, rew, _, _ = env.step(torch.rand(N, 4, generator=g) * 2 - 1)
            out += [obs, rew]
        return out

    a, b = rollout(), rollout()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    env.generator.manual_seed(1)
    assert not torch.equal(env.reset(), a[0])


def test_episode_statistics_exact(env):
    """Half the envs fall (crash mid-run), the others fly random actions; then everyone's counter is set to hit the
    time-out. Every finished episode's stats must equal sums kept here by hand."""
    env.reset()
    g = torch.Generator().manual_seed(3)
    ret, length, terms_seen = torch.zeros(N), torch.zeros(N), 0
    for step in range(80):
        if step == 79:
            env.episode_length.fill_(1499)
        actions = torch.rand(N, 4, generator=g) * 0.4 - 0.2
        actions[: N // 2] = -1.0
        _, rew, done, info = env.step(actions)
        ret += rew
        length += 1
        ep = info["episode"]
        if done.any():
            d = done
            assert torch.allclose(ep["return"][d], ret[d], atol=1e-5)
            assert torch.equal(ep["length"][d], length[d])
            total = sum(ep[f"reward_{t}"] for t in REWARD_TERMS)
            assert torch.allclose(total[d], ep["return"][d], atol=1e-5)
            terms_seen += int(d.sum())
            ret[d], length[d] = 0.0, 0.0
    assert done.all() and info["time_outs"][N // 2:].all()
    assert terms_seen >= N + N // 2  # the fallers finished twice (crash, then time-out)


def test_nonfinite_state_is_reset(env):
    """Env 1's velocity is set to NaN directly; the env is flagged, reset, and no NaN comes out."""
    env.reset()
    env.step(torch.zeros(N, 4))
    vel = torch.zeros(N, 6)
    vel[1] = float("nan")
    env.drone.set_dofs_velocity(vel, envs_idx=torch.arange(N) == 1)
    obs, rew, done, info = env.step(torch.zeros(N, 4))
    assert info["nonfinite"].tolist() == [False, True] + [False] * (N - 2)
    assert done.tolist() == info["nonfinite"].tolist()
    assert info["episode"]["crashes"][1] == 0 and not info["time_outs"][1] and rew[1] == 0
    for t in (obs, rew, info["final_obs"], env.base_pos):
        assert torch.isfinite(t).all()
    obs, _, done, info = env.step(torch.zeros(N, 4))
    assert not info["nonfinite"].any() and not done.any() and torch.isfinite(env.drone.get_qpos()).all()


class SyncSpy(TorchFunctionMode):
    """Records torch calls that read device data back to the host."""
    SYNCING = {"item", "__bool__", "tolist", "nonzero", "argwhere", "cpu", "numpy", "__int__", "__float__",
               "__index__", "masked_select"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" else ()
        index = index if isinstance(index, tuple) else (index,)
        if (name in self.SYNCING or (name == "where" and len(args) == 1)
                or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_step_has_no_host_sync(env):
    env.reset()
    actions = full(-1.0)  # crashes and resets happen inside the spied steps
    env.check_actions = False
    try:
        with SyncSpy() as spy:
            run(env, actions, 60)
        assert spy.calls == []
    finally:
        env.check_actions = True
    with SyncSpy() as spy:
        env.step(actions)
    assert spy.calls == ["__bool__"]  # the NaN/inf check of the actions, and only it


def test_one_genesis_backend_per_process(env):
    with pytest.raises(RuntimeError, match="already initialised"):
        HoverEnv(num_envs=2, device="cuda")  # rejected before any scene is built
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        HoverEnv(num_envs=2, device="mps")


# What the simulator leaves out (HoverConfig's motor_lag_s ... push_torque). Each test swaps the env's config
# directly, as eval.py --perturbations does, and restores it.
@contextlib.contextmanager
def perturbed_env(env, **change):
    env.cfg = dataclasses.replace(CFG, **change)
    try:
        yield env.reset()
    finally:
        env.cfg = CFG
        env.reset()


def test_perturbations_are_off_by_default_and_cost_nothing(env):
    """Off, nothing of them is built or drawn: switching them all off explicitly flies the same bits as the default
    config, whose episodes draw only targets."""
    assert not env_module.perturbed(CFG) and all(env_module.perturbed(HoverConfig(**c)) for name, c in
                                                env_module.PERTURBATIONS.items() if name != "none")
    def rollout():
        env.generator.manual_seed(3)
        g = torch.Generator().manual_seed(4)
        out = [env.reset()]
        for _ in range(30):
            out += env.step(torch.rand(N, 4, generator=g) * 2 - 1)[:2]
        return out
    plain = rollout()
    assert env.perturb is None
    with perturbed_env(env, **env_module.UNPERTURBED):
        assert env.perturb is None and all(torch.equal(a, b) for a, b in zip(rollout(), plain))


def test_randomize_takes_the_ranges_left_off():
    cfg = HoverConfig(randomize=True, mass_scale=(1.0, 1.05))
    ranges = env_module.RANDOMIZED
    assert (cfg.motor_lag_s, cfg.action_delay, cfg.push_force) == (ranges["motor_lag_s"], ranges["action_delay"],
                                                                    ranges["push_force"])
    assert cfg.mass_scale == (1.0, 1.05)  # set by hand: kept
    assert (cfg.progress_per_metre, cfg.reward_target) == (True, 20.0)  # and its reward, paid per metre
    assert (HoverConfig().progress_per_metre, HoverConfig().reward_target) == (False, 10.0)  # the example's
    assert dataclasses.replace(cfg) == cfg  # a checkpoint's config rebuilds as it was
    for bad in (dict(motor_lag_s=(0.1, 0.05)), dict(mass_scale=(0.0, 1.0)), dict(obs_noise=(0.01,)),
                dict(push_force=-1.0)):
        with pytest.raises(ValueError, match="must be a range|takes 4 sigmas"):
            HoverConfig(**bad)


def test_nominal_share_of_episodes_flies_the_nominal_drone():
    """--nominal-share: that share of the drones starting an episode draw no lag, delay, mass or thrust error (the
    noise and pushes reach them too); the others draw from the ranges, as without it, and only they."""
    cfg, n = HoverConfig(randomize=True), 20000
    assert 0 < cfg.nominal_share == env_module.RANDOMIZED["nominal_share"] and HoverConfig().nominal_share == 0
    with pytest.raises(ValueError, match="--nominal-share"):
        HoverConfig(nominal_share=1.0)
    p = env_module.Perturbations(cfg, n, "cpu", torch.Generator().manual_seed(0), 0.3, torch.ones(17))
    p.reset(torch.ones(n, dtype=torch.bool))
    nominal = ((p.lag == 1) & (p.mass_scale == 1) & (p.rpm_scale == 1))[:, 0] & (p.delay == 0)
    assert abs(nominal.float().mean().item() - cfg.nominal_share) < 0.015  # (sigma of the share: 0.002)
    tau = -DT / torch.log1p(-p.lag[~nominal])  # every other drone's lag within the range
    assert cfg.motor_lag_s[0] - 1e-6 <= tau.min() and tau.max() <= cfg.motor_lag_s[1] + 1e-6
    assert p.noise.any() and p.push_sigma.all()


def test_policy_json_says_what_the_policy_was_trained_against():
    assert env_module.describe(dataclasses.asdict(HoverConfig()))["trained_against"].startswith("none")
    ranges = env_module.describe(dataclasses.asdict(HoverConfig(randomize=True)))["trained_against"]
    assert ranges == {k: v for k, v in env_module.RANDOMIZED.items() if k in env_module.UNPERTURBED}


def test_perturb_ramp_grows_the_ranges_from_the_nominal_drone(env):
    """Under HoverConfig.perturb_ramp, the episodes of an iteration draw from every range shrunk toward the nominal
    drone by the ramp's progress: nothing before FROM, half of each range halfway, the whole ranges from TO on."""
    assert [env_module.ramp(i, (10, 20)) for i in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert env_module.ramp(0, HoverConfig().perturb_ramp) == 1.0  # the default: whole from the start
    assert HoverConfig(randomize=True).perturb_ramp == env_module.RANDOMIZED["perturb_ramp"]
    with pytest.raises(ValueError, match="--perturb-ramp"):
        HoverConfig(perturb_ramp=(20, 10))
    wide = dict(env_module.RANDOMIZED, mass_scale=(0.5, 1.5), action_delay=(0, 2), perturb_ramp=(10, 20))
    with perturbed_env(env, **wide):
        try:
            draws = {}
            for iteration in (5, 15, 25):
                env.set_iteration(iteration)
                env.reset()
                p = env.perturb
                draws[iteration] = p.mass_scale, p.lag, p.delay, p.noise, p.push_sigma
            mass, lag, delay, noise, push = draws[5]
            assert (mass == 1).all() and (lag == 1).all() and (delay == 0).all()  # lag 1: the RPM follows at once
            assert not noise.any() and not push.any()
            mass, lag, delay, noise, push = draws[15]
            assert 0.75 <= mass.min() and mass.max() <= 1.25 and delay.max() <= 1
            half_tau = wide["motor_lag_s"][1] / 2
            assert (lag >= -math.expm1(-DT / half_tau) - 1e-6).all()  # tau at most half of the range's top
            assert torch.allclose(noise, draws[25][3] / 2) and torch.allclose(push, draws[25][4] / 2)
            mass = draws[25][0]
            assert 0.5 <= mass.min() and mass.max() <= 1.5 and (mass - 1).abs().max() > 0.25  # (N drones: some)
        finally:
            env.set_iteration(25)  # whole again
    assert env.perturb is None and env._perturb_strength == 1.0


def test_motor_lag_is_first_order(env):
    """A step of the command from hover to full throttle: the RPM closes 1 - exp(-t / tau) of the gap by t."""
    with perturbed_env(env, motor_lag_s=(0.05, 0.05)):
        hover, full_rpm = CFG.hover_rpm, CFG.hover_rpm * (1 + CFG.rpm_gain)
        for k in range(1, 11):
            env.step(full(1.0))
            expected = full_rpm - (full_rpm - hover) * math.exp(-k * DT / 0.05)
            assert torch.allclose(env.perturb.rpm, torch.full((N, 4), expected), rtol=1e-5), k
        lagged = env.base_pos[:, 2].clone()
    env.reset()
    run(env, full(1.0), 10)
    assert (env.base_pos[:, 2] > lagged + 0.002).all()  # without the lag, the same 0.1 s climbs higher


def test_action_delay_shifts_the_applied_action_by_k_steps(env):
    with perturbed_env(env, action_delay=(2, 2)):
        sent = [torch.full((N, 4), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
        applied = [env.perturb.motors(a) for a in sent]  # the RPM of the action 2 steps old (hover before)
        rpm = lambda a: CFG.hover_rpm * (1 + CFG.rpm_gain * a)  # noqa: E731
        assert torch.allclose(applied[0], torch.full((N, 4), rpm(0.0)))
        assert torch.allclose(applied[1], torch.full((N, 4), rpm(0.0)))
        assert all(torch.allclose(applied[k], rpm(sent[k - 2])) for k in range(2, 5))


def test_a_heavier_drone_needs_more_rpm_to_hover(env):
    """20 % heavier: at the nominal hover RPM it sinks; at sqrt(1.2) times it, it holds its height."""
    with perturbed_env(env, mass_scale=(1.2, 1.2)):
        run(env, torch.zeros(N, 4), 30)
        sank = 1.0 - env.base_pos[:, 2]
        env.reset()
        hover_action = (math.sqrt(1.2) - 1) / CFG.rpm_gain
        run(env, torch.full((N, 4), hover_action), 30)
        held = (1.0 - env.base_pos[:, 2]).abs()
    assert (sank > 0.05).all() and (held < 0.005).all()  # 0.3 s: g / 6 falls 7.4 cm


def test_observation_noise_has_the_asked_sigmas(env):
    """Noisy observations of the same states as clean ones: the differences have the asked sigmas (scaled as the
    observation is), and the attitude is turned by about the asked angle per axis."""
    with perturbed_env(env, obs_noise=(0.01, 0.05, 1.0, 0.1)):
        clean = env._start_obs.expand(N, 17).clone()
        env._observe_target(clean)
        diffs = torch.stack([env.perturb.observe(clean) - clean for _ in range(2000)])  # [2000, N, 17]
        noisy_quats = torch.stack([env.perturb.observe(clean)[:, 3:7] for _ in range(2000)])
    sigma = diffs.flatten(0, 1).std(0)
    assert torch.allclose(sigma[:3], torch.full((3,), 0.01 / 3), rtol=0.05)
    assert torch.allclose(sigma[7:10], torch.full((3,), 0.05 / 3), rtol=0.05)
    assert torch.allclose(sigma[10:13], torch.full((3,), 0.1 / 25), rtol=0.05)
    assert torch.equal(sigma[13:], torch.zeros(4))  # the previous action is known exactly
    turn_deg = 2 * noisy_quats[..., 1:].flatten(0, 1).std(0) * 180 / math.pi  # from the level start: (1, r / 2)
    assert torch.allclose(turn_deg, torch.ones(3), rtol=0.05)
    assert torch.allclose(noisy_quats.norm(dim=-1), torch.ones(1), atol=1e-6)


def test_a_push_moves_the_drone_its_way(env):
    """A strong push (half the weight per axis, no torque) on hovering drones: each drifts along its own force."""
    with perturbed_env(env, push_force=0.5, push_interval_s=(1.0, 1.0)):
        run(env, torch.zeros(N, 4), 15)
        force = env.perturb.wrench[:, 0]  # [N, 3] world frame, drawn at the first step and held for 1 s
        moved = env.base_pos - INIT
        assert (force.norm(dim=1) > 0).all() and (env.perturb.push_left == 100 - 14).all()  # drawn at step 1
    cosine = torch.nn.functional.cosine_similarity(moved, force, dim=1)
    assert (cosine > 0.9).all(), cosine


def test_measure_gives_eval_the_distance_and_drone_0(env):
    env.reset()
    env.step(torch.zeros(N, 4))
    m = env.measure()
    assert torch.allclose(m["distance_m"], (env.target_pos - env.base_pos).norm(dim=1))
    assert torch.equal(m["drone_0"], torch.cat((env.base_pos[0], env.target_pos[0])))


# ---------------------------------------------------------------- examples/go2/go2_env.py: a second robot
# One scene of G Go2 robots for the whole file, like the drones'. The same contract, the same checks.
import examples.go2.go2_env as go2_module
from examples.go2.go2_env import Go2Config, Go2Env

G = 4
GO2_TERMS = ("tracking_lin_vel", "tracking_ang_vel", "lin_vel_z", "base_height", "action_rate", "similar_to_default")


@pytest.fixture(scope="module")
def go2():
    return Go2Env(num_envs=G, device="cpu", seed=0)


def test_go2_keeps_the_task_contract(go2):
    obs = go2.reset()
    assert obs.shape == (G, 45) and obs.dtype == torch.float32 and go2.num_obs == 45 and go2.num_actions == 12
    assert go2.dt == 0.02 and go2.max_episode_length == 1000 and go2.unit == "robot" and go2.rates == ("falls",)
    obs, rew, done, info = go2.step(torch.zeros(G, 12))
    assert obs.shape == (G, 45) and rew.shape == (G,) and rew.dtype == torch.float32
    assert done.shape == (G,) and done.dtype == torch.bool and info["time_outs"].dtype == torch.bool
    assert info["final_obs"].shape == (G, 45) and info["nonfinite"].shape == (G,)
    assert set(info["episode"]) == {"return", "length", "falls", *(f"reward_{t}" for t in GO2_TERMS)}
    assert all(v.shape == (G,) for v in info["episode"].values())
    go2.set_iteration(7)  # the contract's curriculum hook: this task has none


def test_go2_starts_standing_level_with_its_command(go2):
    obs = go2.reset()
    expected = torch.zeros(G, 45)
    expected[:, 5] = -1.0  # gravity straight down the body's z
    expected[:, 6] = 0.5 * 2.0  # the example's command, 0.5 m/s forward, times the observation scale
    assert torch.equal(obs, expected) and torch.equal(go2.commands, torch.tensor([[0.5, 0.0, 0.0]] * G))
    angles = go2.robot.get_dofs_position(go2._motors)
    assert torch.allclose(angles, torch.tensor(Go2Config().default_joint_angles).expand(G, 12), atol=1e-6)
    assert torch.allclose(go2.robot.get_pos(), torch.tensor([0.0, 0.0, 0.42]).expand(G, 3), atol=1e-6)


def test_go2_stands_on_zero_action_and_observes_its_state(go2):
    go2.reset()
    for _ in range(25):  # 0.5 s
        obs, _, done, info = go2.step(torch.zeros(G, 12))
        assert not done.any()
    height = go2.robot.get_pos()[:, 2]
    assert ((height > 0.2) & (height < 0.42)).all()  # it settled onto its legs, in the default pose
    quat = go2.robot.get_quat()
    R_T = rotation_matrix(quat).transpose(1, 2)
    ang_b = (R_T @ go2.robot.get_ang()[:, :, None])[..., 0]
    assert torch.allclose(obs[:, :3], ang_b * 0.25, atol=1e-5)
    assert torch.allclose(obs[:, 3:6], -R_T[:, :, 2], atol=1e-5)  # R^T (0, 0, -1)
    defaults = torch.tensor(Go2Config().default_joint_angles)
    assert torch.allclose(obs[:, 9:21], go2.robot.get_dofs_position(go2._motors) - defaults, atol=1e-5)
    assert torch.allclose(obs[:, 21:33], go2.robot.get_dofs_velocity(go2._motors) * 0.05, atol=1e-5)
    assert torch.equal(obs[:, 33:], torch.zeros(G, 12)) and torch.equal(info["final_obs"], obs)
    vel_b = (R_T @ go2.robot.get_vel()[:, :, None])[..., 0]
    assert torch.allclose(go2.measure()["forward_velocity"], vel_b[:, 0], atol=1e-5)


def test_go2_applies_each_action_one_step_late(go2):
    """Robot 0 commands its FR thigh +1 (0.25 rad above the default), the others 0. With the example's latency the
    joints get the previous step's action: after one step all robots are still alike, after two robot 0's thigh
    has moved. Without the latency, it moves in the first step."""
    actions = torch.zeros(G, 12)
    actions[0, 1] = 1.0
    for latency, differs_after in ((True, 2), (False, 1)):
        go2.cfg = dataclasses.replace(Go2Config(), action_latency=latency)
        try:
            go2.reset()
            for step in (1, 2):
                obs, *_ = go2.step(actions)
                thigh = obs[:, 10]  # FR thigh angle - default
                moved = thigh[0] - thigh[1]
                assert (moved > 0.01) == (step >= differs_after), (latency, step, thigh)
                assert torch.allclose(thigh[1:], thigh[1:2].expand(G - 1), atol=1e-6)
        finally:
            go2.cfg = Go2Config()


def test_go2_tilt_is_genesis_roll_and_pitch():
    from genesis.utils.geom import quat_to_xyz
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1000, 4, generator=g)
    q = q / q.norm(dim=1, keepdim=True)
    down = torch.tensor([[0.0, 0.0, -1.0]]).expand(1000, 3)
    roll, pitch = go2_module.tilt_deg(env_module.quat_rotate_inverse(q, down))
    rpy = quat_to_xyz(q, rpy=True, degrees=True)
    ok = rpy[:, 1].abs() < 85  # away from gimbal lock, where roll is undefined
    assert torch.allclose(roll[ok], rpy[ok, 0], atol=1e-2) and torch.allclose(pitch, rpy[:, 1], atol=1e-2)


def test_go2_falls_past_10_degrees_and_times_out_after_1000_steps(go2):
    """Robots 0 and 1 are put rolled and pitched by 15 degrees directly: a fall, not a time-out; robots 2 and 3 hit
    the time-out (their counters set to 999 directly) on the same step."""
    go2.reset()
    qpos = go2.robot.get_qpos()
    for i, (r, p) in enumerate(((15.0, 0.0), (0.0, -15.0))):
        r, p = math.radians(r) / 2, math.radians(p) / 2
        qpos[i, 3:7] = torch.tensor([math.cos(r) * math.cos(p), math.sin(r) * math.cos(p), math.cos(r) * math.sin(p),
                                     -math.sin(r) * math.sin(p)])  # q_y(pitch) q_x(roll)
    go2.robot.set_qpos(qpos, zero_velocity=True)
    go2.episode_length.fill_(999)
    obs, _, done, info = go2.step(torch.zeros(G, 12))
    assert done.all() and info["episode"]["falls"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert info["time_outs"].tolist() == [False, False, True, True]
    assert torch.equal(info["episode"]["length"], torch.ones(G))
    assert torch.equal(go2.episode_length, torch.zeros(G, dtype=torch.int32))
    assert (info["final_obs"][:2, 3:5].abs().max(1).values > math.sin(math.radians(10))).all()  # tilted gravity
    assert torch.equal(obs[:, 3:6], torch.tensor([[0.0, 0.0, -1.0]] * G))  # reset: level again


def test_go2_rewards_of_one_step(go2):
    """A one-step episode (counters set to 999 directly): its sums are this step's terms, weighted and times dt."""
    go2.reset()
    go2.episode_length.fill_(999)
    actions = torch.full((G, 12), 0.5)
    _, rew, done, info = go2.step(actions)
    ep, final = info["episode"], info["final_obs"]
    dt = 0.02
    assert done.all()
    assert torch.allclose(ep["reward_action_rate"], torch.full((G,), -0.005 * dt * 12 * 0.25))  # from a_prev = 0
    assert torch.allclose(ep["reward_similar_to_default"], -0.1 * dt * final[:, 9:21].abs().sum(1), atol=1e-7)
    yaw_rate = final[:, 2] / 0.25
    assert torch.allclose(ep["reward_tracking_ang_vel"], 0.2 * dt * torch.exp(-yaw_rate.square() / 0.25), atol=1e-7)
    assert (ep["reward_tracking_lin_vel"] > 0).all() and (ep["reward_lin_vel_z"] <= 0).all()
    assert (ep["reward_base_height"] < 0).all()  # it starts at 0.42 m, 0.12 m above the height rewarded
    total = sum(ep[f"reward_{t}"] for t in GO2_TERMS)
    assert torch.allclose(rew, total, atol=1e-7) and torch.allclose(ep["return"], rew)


def test_go2_bad_actions_raise_and_step_has_no_host_sync(go2):
    go2.reset()
    for bad in (torch.zeros(G, 4), torch.zeros(G, 12, dtype=torch.float64), torch.full((G, 12), float("nan"))):
        with pytest.raises(ValueError):
            go2.step(bad)
    g = torch.Generator().manual_seed(0)
    go2.check_actions = False
    try:
        with SyncSpy() as spy:
            for _ in range(40):  # wild actions: robots fall and reset inside the spied steps
                _, _, done, info = go2.step(torch.randn(G, 12, generator=g) * 3)
        assert spy.calls == []
    finally:
        go2.check_actions = True
    assert info["episode"]["length"].min() < 40  # someone fell and restarted


def test_go2_describe_lists_every_observation():
    meta = go2_module.describe(dataclasses.asdict(Go2Config()))
    assert [o["index"] for o in meta["observation"]] == list(range(45)) and meta["control_rate_hz"] == 50
    assert meta["observation"][6]["name"] == "command_forward_m_s" and meta["observation"][6]["scale"] == 2.0
    assert meta["action"]["size"] == 12 and meta["action"]["joints"][0] == "FR_hip_joint"
    assert meta["action"]["range"] == [-100.0, 100.0]


# ---------------------------------------------------------------- train.py
import importlib.util
import io
import shutil
import subprocess
import sys

import eval as evaluation
import train

TINY = ["--device", "cpu", "--workers", "1", "--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2",
        "--num-epochs", "2"]


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "0"], "--num-envs must be > 0"),
    (["--num-envs", "10", "--num-steps", "3", "--num-minibatches", "4"], "does not divide the batch"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["--min-std", "-0.1"], "--init-std must be > 0 and --min-std >= 0, got "),
    (["--progress-speed-cap", "-1"], "--progress-speed-cap must be >= 0 (0: no cap), got -1.0"),
    (["--crash-multiple", "0"], "--crash-multiple must be > 0 and --crash-ramp two iterations FROM TO with 0 <= "
                                "FROM <= TO, got 0.0 and 100 200"),
    (["--crash-ramp", "200", "100"], "--crash-ramp two iterations FROM TO with 0 <= FROM <= TO, got 10.0 and 200 100"),
    (["--crash-ramp", "100"], "--crash-ramp two iterations FROM TO"),
    (["--device", "tpu"], "unknown device"),
    (["--resume", "/nonexistent/ckpt.pt"], "no checkpoint at"),
    (["--normalize-obs", "ture"], "argument --normalize-obs: expected true or false"),
    (["--hidden", "64", "x"], "argument --hidden: invalid int value: 'x'"),
    (["--task", "humanoid"], "argument --task: invalid choice: 'humanoid' (choose from 'hover', 'go2')"),
    (["--activation", "relu6"], "argument --activation: invalid choice: 'relu6' (choose from 'tanh', 'elu')"),
    (["--task", "go2", "--progress-speed-cap", "1"], "unrecognized arguments: --progress-speed-cap 1"),
    (["--task", "go2", "--default-joint-angles", "0", "1"], "--default-joint-angles needs one angle per joint (12)"),
    (["--eval", "runs/x/ckpt_0010.pt"], "unrecognized arguments: --eval"),
])
def test_train_rejects_bad_settings_before_genesis(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_rejects_missing_cuda_from_the_command_line():
    # a real process: exit status 2, one line on stderr, and genesis never imported
    cmd = [sys.executable, "-c", "import sys, train\ntry:\n    train.main(['--device', 'cuda'])\n"
           "finally:\n    print('genesis' in sys.modules)"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert r.returncode == 2
    assert r.stderr.strip() == ("train.py: error: --device cuda asked for, but torch sees no CUDA device: "
                                "use --device cpu")
    assert r.stdout.strip() == "False"


def test_train_rejects_corrupt_and_mismatched_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for program in (train, evaluation):
        with pytest.raises(SystemExit) as e:
            program.main(["--resume", str(bad)] if program is train else [str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is not a checkpoint of this project" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_train_booleans_are_strict(text, value):
    args, task, _ = train.parse_args(["--device", "cpu", "--normalize-obs", text])
    assert train.build_config(args, task)[0].normalize_obs is value


def test_train_settings_come_from_the_declarations(capsys):
    """--help shows each field's own help text, the task's settings among them; each task's own training settings
    (TRAIN) apply, and on a CPU its CPU preset, printed when it applies; flags override both."""
    for task_name, task in (("hover", env_module), ("go2", go2_module)):
        with pytest.raises(SystemExit):
            train.parse_args(["--task", task_name, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        for cls in (train.TrainConfig, PPOConfig):
            for f in dataclasses.fields(cls):
                if f.name != "ppo":
                    assert " ".join(f.metadata["help"].split()) in help_text, f.name
        assert all(f"--{f.name.replace('_', '-')}" in help_text for f in dataclasses.fields(task.Config))
        assert f"the task ({task.__name__}.Config)" in help_text and train.as_flags(task.CPU_PRESET) in help_text
        args, module, _ = train.parse_args(["--task", task_name, "--device", "cpu", "--num-steps", "20"])
        cfg, task_cfg = train.build_config(args, module)
        out = capsys.readouterr().out
        assert module is task and "CPU preset applies" in out and train.as_flags(task.CPU_PRESET) in out
        assert cfg.task == task_name and cfg.num_steps == 20  # a flag overrides the preset
        for k, v in {**task.TRAIN, **task.CPU_PRESET}.items():
            if k != "num_steps":
                assert getattr(cfg, k, getattr(cfg.ppo, k, getattr(task_cfg, k, None))) == v, k
    assert "upper bound of the adaptive learning rate (rsl_rl's) (default 0.01)" in help_text
    args, task, _ = train.parse_args(["--device", "cpu", "--crash-ramp", "5", "9", "--hidden", "64", "32"])
    cfg, task_cfg = train.build_config(args, task)
    assert cfg.task == "hover" and task_cfg.crash_ramp == (5, 9) and cfg.hidden == (64, 32)  # tuples, not lists


TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # optional: pip install tensorboard


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The real loop on 8 drones, asked for 5 iterations; a SIGTERM arrives during the second one. It logs for
    TensorBoard too where the package is installed. Reused by the resume, eval and export tests."""
    import signal
    log_dir = str(tmp_path_factory.mktemp("runs"))
    real_update, calls = train.update, []

    def update_then_sigterm(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a cluster scheduler would
        return real_update(*args)

    train.update = update_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            train.main(TINY + ["--max-iterations", "5", "--save-interval", "1", "--log-dir", log_dir,
                               "--run-name", "smoke", "--tensorboard", str(TENSORBOARD)])
    finally:
        train.update = real_update
    assert signal.getsignal(signal.SIGTERM) is before  # training's handler is gone when training returns
    with open(os.path.join(log_dir, "stdout.txt"), "w") as f:
        f.write(out.getvalue())
    return os.path.join(log_dir, "smoke")


def test_train_smoke_run_writes_config_metrics_and_checkpoints(smoke_run):
    files = set(os.listdir(smoke_run))
    # SIGTERM finished iteration 2, saved it and stopped cleanly
    assert {"config.json", "metrics.jsonl", "ckpt_0001.pt", "ckpt_0002.pt"} <= files and "ckpt_0003.pt" not in files
    assert not any(".tmp" in f for f in files)
    with open(os.path.join(smoke_run, "config.json")) as f:
        assert json.load(f)["num_envs"] == 8
    with open(os.path.join(smoke_run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["total_steps"] == 64 * r["iteration"] for r in rows)
    ckpt = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))[0]
    assert ckpt["iteration"] == 2 and ckpt["optimizer"]["t"] == 2 * 2 * 2  # 2 iterations x 2 epochs x 2 minibatches
    with open(os.path.join(os.path.dirname(smoke_run), "stdout.txt")) as f:
        lines = f.read().splitlines()
    # the seed's figures, printed at start from the real tensors; then one line per iteration
    assert "actor 19,332 + critic 18,945 = 38,277 weights + 4 action std" in lines[4]
    assert [line.split()[-2:] for line in lines[6:11]] == [["153.1", "KB"]] * 4 + [["612.5", "KB"]]
    progress = [line for line in lines if line.startswith("iter ")]
    assert [line.split()[1] for line in progress] == ["1/5", "2/5"] and "targets/drone-min" in progress[0]


def test_train_refuses_to_overwrite_a_run(smoke_run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--log-dir", os.path.dirname(smoke_run), "--run-name", "smoke"])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_train_resume_restores_the_optimizer_exactly(smoke_run, monkeypatch):
    saved = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))[0]
    saved["task"]["obs_ang_vel_scale"] = 1 / 3.14159  # trained with the Genesis example's scale: resumed with it
    ckpt_path = os.path.join(smoke_run, "ckpt_0002_example_scale.pt")
    torch.save(saved, ckpt_path)
    seen, rolled = [], []
    real_update, real_rollout = train.update, train.rollout

    def spy(policy, optimizer, batches, cfg, average):
        if not seen:  # the optimizer as the first update of the resumed run finds it
            seen.append((optimizer.m.clone(), optimizer.v.clone(), optimizer.t, float(optimizer.param_groups[0]["lr"]),
                         {k: v.clone() for k, v in policy.named_parameters()}))
        return real_update(policy, optimizer, batches, cfg, average)

    def rollout_spy(policy, env, *args):
        if not rolled:  # the policy as the first rollout finds it, the observation normalizer's statistics included
            rolled.append({k: v.clone() for k, v in policy.state_dict().items()})
            rolled.append((env.cfg, env.reward_crash))
        return real_rollout(policy, env, *args)

    monkeypatch.setattr(train, "update", spy)
    monkeypatch.setattr(train, "rollout", rollout_spy)
    train.main(["--resume", ckpt_path, "--max-iterations", "3", "--crash-multiple", "4", "--crash-ramp", "1", "3"])
    m, v, t, lr, weights = seen[0]
    assert torch.equal(m, saved["optimizer"]["m"]) and torch.equal(v, saved["optimizer"]["v"])
    assert t == saved["optimizer"]["t"] and lr == float(saved["optimizer"]["lr"])
    assert all(torch.equal(weights[k], saved["policy"][k]) for k in weights)
    assert rolled[0].keys() == saved["policy"].keys()
    assert all(torch.equal(rolled[0][k], saved["policy"][k]) for k in rolled[0])
    # iteration 3 of a crash penalty grown from x1 at iteration 1 to x4 at 3 (the task's curriculum, flags given
    # on resume); the checkpoint keeps the task's own penalty, and the scale it was trained with
    task = HoverConfig(**dict(saved["task"], crash_multiple=4.0, crash_ramp=(1, 3)))
    assert rolled[1] == (task, 4 * task.reward_crash) and task.reward_crash == -10
    assert task.obs_ang_vel_scale == 1 / 3.14159
    with open(os.path.join(smoke_run, "metrics.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3]  # the counter went on
    resumed, _, resumed_task = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0003.pt"))
    assert resumed["iteration"] == 3 and resumed_task == task


def test_train_resume_draws_the_first_episodes_at_the_curriculums_iteration(smoke_run, tmp_path, monkeypatch):
    """Resumed at iteration 3 of a perturbation curriculum grown over iterations 2-4, the first episodes draw from
    half of each range (mass 0.75-1.25 of 0.5-1.5), as the episodes of a run that never stopped would."""
    drawn, real_rollout = [], train.rollout

    def rollout_spy(policy, env, *args):
        if not drawn:
            drawn.append(env.perturb.mass_scale.clone())
        return real_rollout(policy, env, *args)

    monkeypatch.setattr(train, "rollout", rollout_spy)
    train.main(["--resume", os.path.join(smoke_run, "ckpt_0002.pt"), "--max-iterations", "3", "--mass-scale", "0.5",
                "1.5", "--perturb-ramp", "2", "4", "--log-dir", str(tmp_path), "--run-name", "ramp"])
    shift = (drawn[0] - 1).abs()
    assert 0 < shift.max() <= 0.25 + 1e-6, drawn[0].flatten()


def test_train_resume_rejects_another_network_shape(smoke_run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", os.path.join(smoke_run, "ckpt_0002.pt"), "--hidden", "64", "64"])
    assert e.value.code == 2 and "does not match" in capsys.readouterr().err


@pytest.mark.skipif(not TENSORBOARD, reason="the optional tensorboard package is not installed")
def test_tensorboard_scalars_equal_the_metrics(smoke_run):
    """Every figure of metrics.jsonl, at its iteration, under rsl_rl's name where it has one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(smoke_run, size_guidance={"scalars": 0})
    board.Reload()
    with open(os.path.join(smoke_run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][:2]  # the smoke run's own two iterations
    expected = {(tensorboard_name(k), r["iteration"]): v for r in rows for k, v in r.items() if k != "iteration"}
    logged = {(tag, e.step): e.value for tag in board.Tags()["scalars"] for e in board.Scalars(tag) if e.step <= 2}
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9) for key, value in expected.items())
    assert {"Loss/value_function", "Loss/surrogate", "Loss/entropy", "Loss/learning_rate", "Policy/mean_std",
            "Perf/total_fps", "Perf/collection time", "Perf/learning_time", "Train/mean_reward",
            "Train/mean_episode_length", "Episode/reward_target", "Train/targets_per_drone_min",
            "Train/crashes_per_drone_min"} <= {tag for tag, _ in logged}


def test_tensorboard_missing_is_one_line_before_genesis(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--tensorboard", "true"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err == "train.py: error: --tensorboard needs the tensorboard package: pip install tensorboard"


@pytest.fixture(scope="module")
def go2_run(tmp_path_factory):
    """The same loop on 8 Go2 robots, with the example's network (512-256-128 ELU): 2 iterations."""
    log_dir = str(tmp_path_factory.mktemp("runs"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--task", "go2", *TINY, "--max-iterations", "2", "--hidden", "512", "256", "128",
                    "--activation", "elu", "--log-dir", log_dir, "--run-name", "go2"])
    return os.path.join(log_dir, "go2"), out.getvalue()


def test_train_runs_the_go2_task_through_the_same_loop(go2_run):
    run_dir, out = go2_run
    ckpt, cfg, task_cfg = train.load_checkpoint(os.path.join(run_dir, "ckpt_0002.pt"))
    assert cfg.task == "go2" and task_cfg == Go2Config() and ckpt["iteration"] == 2
    assert ckpt["policy"]["actor.0.weight"].shape == (512, 45) and ckpt["policy"]["std"].shape == (12,)
    assert "one network for every robot: actor 189,324 + critic 187,905 = 377,229 weights + 12 action std" in out
    assert "1 worker(s) x 8 robots x 8 steps = 64 samples per iteration" in out
    progress = [line for line in out.splitlines() if line.startswith("iter ")]
    assert len(progress) == 2 and all("falls/robot-min" in line or "no episode ended" in line for line in progress)
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["task_config"]["kp"] == 20.0
    with pytest.raises(SystemExit) as e:  # a checkpoint resumes only as its own task
        train.main(["--task", "hover", "--resume", os.path.join(run_dir, "ckpt_0002.pt")])
    assert e.value.code == 2


def test_nonfinite_weights_stop_training_without_saving(tmp_path, monkeypatch, capsys):
    real_update = train.update

    def poisoned(policy, optimizer, batches, cfg, average):
        stats = real_update(policy, optimizer, batches, cfg, average)
        optimizer.theta[0] = float("nan")
        return stats

    monkeypatch.setattr(train, "update", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--max-iterations", "2", "--log-dir", str(tmp_path), "--run-name", "nan"])
    assert e.value.code == 1
    assert "non-finite loss or weights at iteration 1" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path / "nan") if f.endswith(".pt")]


def test_train_starts_cpu_workers_and_one_sigterm_stops_them_cleanly(tmp_path):
    """--workers 2: train.py runs two data-parallel copies of itself; a SIGTERM to it reaches both once,
    so they finish the iteration, save it and exit 0."""
    import signal
    import time
    log = open(tmp_path / "out.txt", "w+")
    cmd = [sys.executable, "train.py", *TINY, "--workers", "2", "--threads-update", "1", "--max-iterations", "10000",
           "--save-interval", "10000", "--normalize-obs", "true", "--log-dir", str(tmp_path), "--run-name", "two"]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=log, stderr=subprocess.STDOUT)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, "the workers never got going"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    log.seek(0)
    output = log.read()
    assert "2 worker(s) x 8 drones x 8 steps = 128 samples per iteration" in output
    assert "[W " not in output and "WARNING" not in output  # the kernel compiler's warnings stay quiet
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = rows[-1]["iteration"]
    assert 3 <= last < 10000 and all(r["total_steps"] == 128 * r["iteration"] for r in rows)
    assert [f for f in os.listdir(tmp_path / "two") if f.endswith(".pt")] == [f"ckpt_{last:04d}.pt"]
    ckpt = train.load_checkpoint(str(tmp_path / "two" / f"ckpt_{last:04d}.pt"))[0]
    assert ckpt["iteration"] == last
    assert ckpt["policy"]["obs_norm.count"].item() == 128 * last  # the normalizer saw both workers' samples


def test_train_rejects_cpu_workers_on_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        train.check_config(train.TrainConfig(device="cuda", workers=2))
    assert e.value.code == 2 and "torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------- eval.py
def test_eval_reports_on_a_checkpoint(smoke_run):
    ckpt = os.path.join(smoke_run, "ckpt_0002.pt")
    report = evaluation.main([ckpt, "--drones", "8", "--seconds", "2"])
    assert report["drones"] == 8 and report["seconds"] == pytest.approx(2.0) and report["iteration"] == 2
    assert report["drone_minutes"] == pytest.approx(8 * 2 / 60)
    # the untrained policy falls: about one crash per drone every 0.5 s, each counted once
    assert report["crashes_per_drone_min"] == pytest.approx(report["crashes"] / report["drone_minutes"])
    assert 8 <= report["crashes"] <= 40 and report["targets_per_drone_min"] >= 0
    assert 0 < report["mean_distance_m"] <= report["p95_distance_m"] < 5
    assert os.path.isfile(os.path.join(smoke_run, "ckpt_0002_flight.png"))
    assert os.path.isfile(os.path.join(smoke_run, "learning_curve.png"))
    noisy = evaluation.main([ckpt, "--drones", "8", "--seconds", "2", "--noise"])
    assert noisy["policy"] == "with action noise" and noisy["mean_distance_m"] != report["mean_distance_m"]


def test_eval_flies_every_perturbation_on_the_same_targets(smoke_run, capsys):
    report = evaluation.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--drones", "8", "--seconds", "2",
                              "--perturbations"])
    rows = report["perturbations"]
    assert list(rows) == list(env_module.PERTURBATIONS) and rows["none"].keys() == {"targets_per_drone_min",
                                                                                   "crashes_per_drone_min"}
    plain = evaluation.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--drones", "8", "--seconds", "2"])
    assert rows["none"]["crashes_per_drone_min"] == plain["crashes_per_drone_min"]  # the same flight, unperturbed
    assert len({r["crashes_per_drone_min"] for r in rows.values()}) > 1  # the perturbations change the flight
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows)
    chosen = evaluation.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--drones", "8", "--seconds", "2",
                              "--perturbations", "none", "realistic (all at once)"])["perturbations"]
    assert chosen == {name: rows[name] for name in ("none", "realistic (all at once)")}


def test_eval_rejects_an_unknown_perturbation_in_one_line(smoke_run, capsys):
    with pytest.raises(SystemExit) as e:
        evaluation.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--perturbations", "wind"])
    assert e.value.code == 2
    assert "no perturbation named 'wind'; the hover task's: none, motor lag 0.03 s" in capsys.readouterr().err


def test_eval_reports_the_walking_figures_of_a_go2_checkpoint(go2_run):
    run_dir, _ = go2_run
    report = evaluation.main([os.path.join(run_dir, "ckpt_0002.pt"), "--robots", "8", "--seconds", "1"])
    assert report["task"] == "go2" and report["robots"] == 8 and report["robot_minutes"] == pytest.approx(8 / 60)
    assert report["falls_per_robot_min"] == pytest.approx(report["falls"] / report["robot_minutes"])
    assert report["mean_forward_velocity_error"] == pytest.approx(report["mean_forward_velocity"] - 0.5, abs=1e-6)
    assert 0.05 < report["mean_base_height"] < 0.45
    assert os.path.isfile(os.path.join(run_dir, "ckpt_0002_flight.png"))
    with pytest.raises(SystemExit) as e:
        evaluation.main([os.path.join(run_dir, "ckpt_0002.pt"), "--perturbations"])
    assert e.value.code == 2


def test_eval_flies_the_task_the_checkpoint_was_trained_on(smoke_run, tmp_path, monkeypatch):
    ckpt = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))[0]
    ckpt["task"]["obs_ang_vel_scale"] = 1 / 3.14159  # a policy trained with the Genesis example's scale
    torch.save(ckpt, tmp_path / "example_scale.pt")
    built = []

    class Built(Exception):
        pass

    def record_the_task(*args, cfg, **kwargs):  # stands in for HoverEnv: no scene is built
        built.append(cfg)
        raise Built

    monkeypatch.setattr(env_module, "Env", record_the_task)
    with pytest.raises(Built):
        evaluation.main([str(tmp_path / "example_scale.pt")])
    assert built[0].obs_ang_vel_scale == 1 / 3.14159 and built[0].reward_target == HoverConfig().reward_target


@pytest.mark.parametrize("flags, message", [
    (["/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["x.pt", "--drones", "0"], "--envs and --seconds must be > 0"),
    (["x.pt", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_eval_rejects_bad_input_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluation.main(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("eval.py: error: ") and message in err and len(err.splitlines()) == 1



# ---------------------------------------------------------------- workers.py: data-parallel training
import tempfile

import torch.multiprocessing as mp
from storage import Batch
from workers import Workers


def dp_batches(T, N, M, seed, rank, world, average):
    """The same global data on every worker: T steps of world*N envs; worker r owns envs [r*N, (r+1)*N).
    Minibatch k of worker r holds the samples with index % M == k, so that minibatch k of the single
    process (world=1, N*world envs) is exactly the union of the workers' minibatches k."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = ActorCritic(17, 4, hidden=(32, 32))  # the rollout policy, the same on every worker
    s = RolloutStorage(T, N, 17, 4, "cpu")
    cols = slice(rank * N, (rank + 1) * N)
    with torch.no_grad():
        for _ in range(T):
            obs = torch.randn(N * world, 17, generator=g)
            done = torch.rand(N * world, generator=g) < 0.1
            a = torch.randn(N * world, 4, generator=g)
            out = policy.evaluate(obs, a)
            s.add(obs=obs[cols], actions=a[cols], rewards=torch.randn(N * world, generator=g)[cols], dones=done[cols],
                  time_outs=done[cols], final_obs=obs[cols], values=out.value[cols], log_probs=out.log_prob[cols],
                  mean=out.mean[cols], std=out.std[cols])
        s.compute_returns(torch.zeros(N * world)[cols], policy.value(s.timed_out_obs()), 0.99, 0.95, average=average)
    flat = [x.flatten(0, 1) for x in (s.obs, s.actions, s.log_probs, s.values, s.advantages, s.returns, s.mean,
                                      s.std)]
    # sample (t, n) of worker r is global sample (t, r*N + n); order each minibatch by global index
    index = (torch.arange(T)[:, None] * N * world + rank * N + torch.arange(N)[None]).flatten()
    return [Batch(*(x[index % M == k] for x in flat)) for k in range(M)]


def dp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    workers = Workers()
    workers.start(torch.device("cpu"))
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, hidden=(32, 32))
    opt = Adam(policy.parameters(), lr=1e-3)
    if rank == 1:
        opt.theta.add_(1.0)  # a different start: the broadcast must fix it
    workers.broadcast(opt.theta)
    thetas = []
    for it in range(3):  # three updates on fresh data, theta recorded after each
        batches = dp_batches(T=6, N=8, M=2, seed=it, rank=rank, world=world, average=workers.average)
        update(policy, opt, batches * 2, PPOConfig(), workers.average)  # 2 epochs x 2 minibatches
        thetas.append(opt.theta.clone())
    torch.save(thetas, os.path.join(out_dir, f"rank{rank}.pt"))
    workers.close()


def test_data_parallel_update_equals_single_process_on_the_global_batch():
    with tempfile.TemporaryDirectory() as out:
        port = 29500 + os.getpid() % 1000
        mp.spawn(dp_worker, args=(2, port, out), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    # single process, all 2 x 8 envs, the same minibatch partition and the same starting weights
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, hidden=(32, 32))
    opt = Adam(policy.parameters(), lr=1e-3)
    for it in range(3):
        assert torch.equal(r0[it], r1[it])  # the workers' weights are bit-identical after every update
        update(policy, opt, dp_batches(T=6, N=16, M=2, seed=it, rank=0, world=1, average=None) * 2, PPOConfig())
        assert torch.allclose(r0[it], opt.theta, atol=1e-6), (r0[it] - opt.theta).abs().max()
    assert (r0[-1] - torch.cat([p.detach().flatten() for p in ActorCritic(17, 4, hidden=(32, 32)).parameters()])
            ).abs().max() > 1e-3  # the weights really moved


# ---------------------------------------------------------------- bench.py

def test_bench_runs_every_section_at_a_tiny_size(tmp_path, capsys):
    """Every section runs, and every ratio it prints is the ratio of the figures it measured in the same run (the
    figures themselves are timings: they vary, and no test asserts one)."""
    import bench
    out = str(tmp_path / "bench.json")
    results = bench.main(["--num-envs", "8", "--num-steps", "8", "--env-steps", "5", "--iterations", "1",
                          "--out", out])
    printed = capsys.readouterr().out
    r = results["sizes"][8]
    assert r["samples"] == 64 and r["workers"] == 2
    assert r["env_overhead"] == pytest.approx(r["physics_steps_per_s"] / r["env_steps_per_s"] - 1)
    assert r["update_ratio_to_floor"] == pytest.approx(r["update_s"] / r["floor_s"])
    assert r["floor_iteration_s"] == pytest.approx(64 / r["physics_steps_per_s"] + r["floor_s"])
    assert r["train_ratio_to_floor"] == pytest.approx(r["iteration_s"] / r["floor_iteration_s"])
    assert r["train_steps_per_s"] == pytest.approx(64 / r["iteration_s"])
    assert r["workers_ratio_to_floor"] == pytest.approx(r["workers_iteration_s"] / r["floor_iteration_s"])
    assert r["rollout_steps_per_s"] == pytest.approx(64 / r["rollout_s"]) and 0 < r["optimizer_share"] < 1
    assert r["memory"]["host_peak_rss_mb"] > 0  # per size; on CUDA also torch's peak and the process's device memory
    assert set(results["adam"]) == {"this Adam (flat buffers)", "torch Adam foreach", "torch Adam fused",
                                    "torch Adam for-loop"}
    assert results["adam"]["torch Adam fused"]["ratio_to_fused"] == 1.0
    ops = r["ops"]  # operators per rollout step, Genesis's own left out
    assert ops["storage.add"]["by_name"] == {"select": 10, "copy_": 10}  # a view and a copy per field
    assert set(ops) == {"policy.act", "env.step", "storage.add", "EpisodeStats.add"}
    assert all(0 < c["launching"] <= c["ops"] == sum(c["by_name"].values()) for c in ops.values())
    assert f"ratio {r['update_ratio_to_floor']:.2f}" in printed and f"ratio {r['train_ratio_to_floor']:.2f}" in printed
    with open(out) as f:
        assert json.load(f)["sizes"]["8"] == json.loads(json.dumps(r))


# ---------------------------------------------------------------- export.py
import ctypes

import export
import numpy as np


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """The smoke run's last checkpoint exported in every format this machine can write."""
    out = str(tmp_path_factory.mktemp("export"))
    export.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--out", out])
    ckpt, cfg, _ = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
    policy = train.build_policy(cfg, 17, 4)  # as train.py built it
    policy.load_state_dict(ckpt["policy"])
    assert policy.obs_norm.count > 0  # the normalizer is on (CPU preset) and has learned: the export must carry it
    return out, policy


@pytest.fixture(scope="module")
def parity_obs(env, exported):
    """10,000 random observations and 10,000 from a real rollout of the policy (8 drones x 1,250 steps)."""
    _, policy = exported
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(10_000, 17, generator=g) * 3 - 1.5
    obs, seen = env.reset(), []
    with torch.no_grad():
        for _ in range(1250):
            seen.append(obs)
            obs = env.step(policy.act(obs).actions)[0]
    return {"random": rand, "rollout": torch.cat(seen)}


def deterministic_actions(policy, obs):
    with torch.no_grad():
        return policy.act_deterministic(obs).clamp(-1, 1)  # the env clips actions to [-1, 1] too


@pytest.fixture(scope="module")
def c_policy(exported, tmp_path_factory):
    """policy.c compiled with the system's cc, with a batch loop around policy_act for the tests."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine")
    out, _ = exported
    build = tmp_path_factory.mktemp("c")
    (build / "batch.c").write_text('#include "policy.h"\nvoid act_batch(const float *obs, float *act, int n) {\n'
                                   '    for (int k = 0; k < n; k++) policy_act(obs + 17 * k, act + 4 * k);\n}\n')
    lib = build / "libpolicy.so"
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{out}", "-o", str(lib),
                    os.path.join(out, "policy.c"), str(build / "batch.c"), "-lm"], check=True)
    act_batch = ctypes.CDLL(str(lib)).act_batch

    def run(obs):  # obs [B, 17] -> actions [B, 4] from the C code
        x = np.ascontiguousarray(obs.detach().cpu().numpy(), dtype=np.float32)
        y = np.empty((len(x), 4), dtype=np.float32)
        act_batch(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(len(x)))
        return torch.from_numpy(y)
    return run


def test_export_writes_every_artifact(exported):
    out, _ = exported
    onnx = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None
    expected = {"policy.pt2", "policy.h", "policy.c", "policy.json"} | ({"policy.onnx"} if onnx else set())
    assert set(os.listdir(out)) == expected  # and no temporary file left behind
    with open(os.path.join(out, "policy.json")) as f:
        meta = json.load(f)
    assert meta["iteration"] == 2 and meta["control_rate_hz"] == 100 and len(meta["observation"]) == 17
    assert [o["index"] for o in meta["observation"]] == list(range(17))
    assert meta["action"]["hover_rpm"] == pytest.approx(14468.429183500699) and len(meta["action"]["motors"]) == 4
    assert meta["c_footprint"] == {"flash_bytes": 4 * (19_332 + 2 * 17), "stack_bytes": 4 * (17 + 2 * 128),
                                   "multiply_adds": 17 * 128 + 128 * 128 + 128 * 4, "tanhf_calls": 256}


@pytest.mark.parametrize("source", ["random", "rollout"])
def test_exported_torch_program_matches_the_policy(exported, parity_obs, source):
    out, policy = exported
    program = torch.export.load(os.path.join(out, "policy.pt2")).module()  # torch alone: no project code
    obs = parity_obs[source]
    with torch.no_grad():
        err = (program(obs) - deterministic_actions(policy, obs)).abs().max().item()
        assert program(obs[:1]).shape == (1, 4)  # any batch size
    assert err <= 1e-6, err


@pytest.mark.parametrize("source", ["random", "rollout"])
def test_exported_onnx_matches_the_policy(exported, parity_obs, source):
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnx export and check need the optional packages onnx, onnxscript and onnxruntime")
    import onnxruntime
    out, policy = exported
    session = onnxruntime.InferenceSession(os.path.join(out, "policy.onnx"))
    obs = parity_obs[source]
    actions = torch.from_numpy(session.run(None, {"obs": obs.numpy()})[0])
    assert (actions - deterministic_actions(policy, obs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("source", ["random", "rollout"])
def test_exported_c_matches_the_policy(exported, parity_obs, c_policy, source):
    _, policy = exported
    obs = parity_obs[source]
    err = (c_policy(obs) - deterministic_actions(policy, obs)).abs().max().item()
    assert err <= 1e-5, err


def test_exported_c_flies_like_the_policy(env, exported, c_policy):
    """Closed loop: the C policy flies the drones for 20 s as the torch policy does, counted as eval.py counts."""
    _, policy = exported

    class CPolicy:
        def act_deterministic(self, obs):
            return c_policy(obs)

    figures = {}
    for name, p in (("torch", policy), ("c", CPolicy())):
        env.generator.manual_seed(10_001)  # the same targets for both
        figures[name] = evaluation.fly(p, env, 2000, noise=False)[1]  # every step flown
    t, c = figures["torch"], figures["c"]
    assert t["crashes_per_drone_min"] > 0  # the barely trained policy crashes: there is something to compare
    for key in ("targets_per_drone_min", "crashes_per_drone_min"):
        assert c[key] == pytest.approx(t[key], rel=0.05, abs=0.05), (key, t[key], c[key])


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["CKPT", "--formats", "tflite"], "argument --formats: invalid choice: 'tflite'"),
    (["CKPT", "--out", "/proc/no/such/dir"], "cannot write into /proc/no/such/dir"),
])
def test_export_rejects_bad_input_in_one_line(smoke_run, argv, message, capsys):
    argv = [os.path.join(smoke_run, "ckpt_0002.pt") if a == "CKPT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_export_of_a_foreign_file_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        export.main([str(bad), "--out", str(out)])
    assert e.value.code == 2 and "is not a checkpoint of this project" in capsys.readouterr().err
    assert not out.exists()  # checked before anything is written


def test_export_of_the_go2_policy_takes_its_sizes_and_activation_from_the_checkpoint(go2_run, tmp_path):
    """The Go2 policy (45 obs, 512-256-128 ELU, 12 actions in [-100, 100]) in every format; the C and torch programs
    match the policy; policy.json describes the Go2's observations."""
    run_dir, _ = go2_run
    export.main([os.path.join(run_dir, "ckpt_0002.pt"), "--out", str(tmp_path), "--formats", "torch", "c"])
    ckpt, cfg, _ = train.load_checkpoint(os.path.join(run_dir, "ckpt_0002.pt"))
    policy = train.build_policy(cfg, 45, 12)
    policy.load_state_dict(ckpt["policy"])
    obs = torch.randn(2000, 45, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        expected = policy.act_deterministic(obs).clamp(-100, 100)
    program = torch.export.load(str(tmp_path / "policy.pt2")).module()
    assert (program(obs) - expected).abs().max() <= 1e-5
    meta = json.loads((tmp_path / "policy.json").read_text())
    assert meta["task"] == "go2" and meta["observation_size"] == 45 and len(meta["observation"]) == 45
    assert meta["network"] == {"hidden": [512, 256, 128], "activation": "elu"} and meta["control_rate_hz"] == 50
    assert "microcontroller" not in meta and meta["c_footprint"]["expm1f_calls"] == 512 + 256 + 128
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine")
    (tmp_path / "batch.c").write_text('#include "policy.h"\nvoid act_batch(const float *obs, float *act, int n) {\n'
                                      '    for (int k = 0; k < n; k++) policy_act(obs + 45 * k, act + 12 * k);\n}\n')
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{tmp_path}", "-o",
                    str(tmp_path / "libgo2.so"), str(tmp_path / "policy.c"), str(tmp_path / "batch.c"), "-lm"],
                   check=True)
    x = np.ascontiguousarray(obs.numpy())
    y = np.empty((len(x), 12), dtype=np.float32)
    ctypes.CDLL(str(tmp_path / "libgo2.so")).act_batch(x.ctypes.data_as(ctypes.c_void_p),
                                                       y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(len(x)))
    assert np.abs(y - expected.numpy()).max() <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_export_interrupted_leaves_no_partial_file(smoke_run, tmp_path, monkeypatch):
    """A failure while writing policy.c leaves the files already renamed whole, and no half-written one."""
    def broken(model, header):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle
    monkeypatch.setattr(export, "c_source", broken)
    with pytest.raises(KeyboardInterrupt):
        export.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--out", str(tmp_path), "--formats", "torch", "c"])
    assert sorted(os.listdir(tmp_path)) == ["policy.h", "policy.pt2"]


# ---------------------------------------------------------------- each stage alone
STAGE_SCRIPTS = {
    "adam.py": """
import torch, adam
model = torch.nn.Linear(3, 2)
before = model.weight.detach().clone()
opt = adam.Adam(model.parameters(), lr=0.1)
model(torch.ones(1, 3)).sum().backward()
opt.step()
assert not torch.equal(before, model.weight) and sum(opt.nbytes().values()) == 4 * 8 * 4
""",
    "policy.py": """
import torch, policy
p = policy.ActorCritic(6, 2, hidden=(16,), normalize_obs=True)
p.update_normalizer(torch.randn(100, 6))
act = p.act(torch.randn(5, 6))
assert act.actions.shape == (5, 2) and p.evaluate(torch.randn(5, 6), act.actions).entropy.shape == (5,)
""",
    "storage.py": """
import torch, storage
s = storage.RolloutStorage(4, 3, 6, 2, "cpu")
for _ in range(4):
    s.add(obs=torch.randn(3, 6), actions=torch.randn(3, 2), rewards=torch.ones(3), dones=torch.zeros(3, dtype=bool),
          time_outs=torch.zeros(3, dtype=bool), final_obs=torch.randn(3, 6), values=torch.zeros(3),
          log_probs=torch.zeros(3), mean=torch.zeros(3, 2), std=torch.ones(3, 2))
s.compute_returns(torch.zeros(3), torch.zeros(0), 0.99, 0.95, normalize_advantages=False)
assert s.returns[0, 0] > s.returns[-1, 0] > 0 and len(list(s.minibatches(2, 3))) == 6
""",
    "ppo.py": """
import torch, ppo
from types import SimpleNamespace as Fields
class Policy(torch.nn.Module):  # any policy with evaluate() -> named fields, any torch optimizer
    def __init__(self):
        super().__init__()
        self.mu, self.v, self.log_std = torch.nn.Linear(6, 2), torch.nn.Linear(6, 1), torch.nn.Parameter(torch.zeros(2))
    def evaluate(self, obs, actions):
        d = torch.distributions.Normal(self.mu(obs), self.log_std.exp().expand(len(obs), 2))
        return Fields(log_prob=d.log_prob(actions).sum(-1), entropy=d.entropy().sum(-1),
                      value=self.v(obs).squeeze(-1), mean=d.mean, std=d.stddev)
policy = Policy()
obs, actions = torch.randn(32, 6), torch.randn(32, 2)
batch = Fields(obs=obs, actions=actions, log_probs=torch.full((32,), -3.0), values=torch.zeros(32),
               advantages=torch.randn(32), returns=torch.randn(32), mean=torch.zeros(32, 2), std=torch.ones(32, 2))
opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
stats = ppo.update(policy, opt, [batch] * 4, ppo.PPOConfig())
assert torch.isfinite(stats["loss"]) and opt.param_groups[0]["lr"] != 1e-3  # the KL moved the lr
""",
    "logger.py": """
import torch, logger
stats = logger.EpisodeStats(rates=("falls",), unit="robot", dt=0.02)
stats.add(torch.tensor([True, False]), {"return": torch.ones(2), "length": torch.full((2,), 50.0),
                                        "falls": torch.ones(2)})
row = stats.read()  # one episode of 50 steps of 0.02 s that fell: 60 falls per robot-minute
assert row.pop("falls_per_robot_min") - 60 < 1e-9
assert row == {"episodes": 1, "episode_return": 1.0, "episode_length": 50.0, "episode_falls": 1.0}
""",
    "env.py": """
import torch, env
e = env.HoverEnv(4, device="cpu", seed=0)
obs = e.reset()
obs, reward, done, info = e.step(torch.zeros(4, 4))
assert obs.shape == (4, e.num_obs) and reward.shape == (4,) and not done.any()
""",
}


@pytest.mark.parametrize("stage", list(STAGE_SCRIPTS))
def test_each_stage_runs_alone_in_an_empty_folder(stage, tmp_path):
    """A stage file copied alone into another project works there, with torch (and genesis, for env.py) only."""
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), stage), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", STAGE_SCRIPTS[stage] + "\nprint('ok')"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert os.listdir(tmp_path) == [stage] or set(os.listdir(tmp_path)) <= {stage, "__pycache__"}


def test_the_torch_only_sections_import_nothing_of_genesis():
    """Collecting this file imports every project file but starts no Genesis: `-k adam` runs in seconds."""
    code = "import sys, test_all\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('genesis', 'quadrants')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
