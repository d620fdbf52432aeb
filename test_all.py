"""Tests of the four learner stages and the logger, one section per file; torch only, no Genesis, seconds.

    python -m pytest test_all.py        these; a stage copied into another project takes its section along
    python -m pytest                    every test: these, then tests/ (the drone task and the tools) and each
                                        example's own beside it (examples/go2/, examples/crazyflie/)

The Genesis tests share one drone scene for the run and build the others as they train, with Genesis's performance
mode off (conftest.py): a cached scene then builds in seconds.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from adam import Adam
from logger import EpisodeStats, RunLog, tensorboard_name, write_atomically
from policy import ActorCritic, Tanh
from ppo import PPOConfig, adapt_lr, clip_grad_norm_, gaussian_kl, gradient_buffers, ppo_loss, update
from storage import RolloutStorage


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

def test_the_drone_network_has_38277_weights():
    policy = ActorCritic(17, 4)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(policy.actor) == 19_332
    assert count(policy.critic) == 18_945
    assert count(policy.actor) + count(policy.critic) == 38_277
    assert count(policy) == 38_281 and policy.std.numel() == 4


def test_policy_widths_and_activation_are_arguments():
    """Another robot's network (the Go2 example's: 512-256-128 ELU, 45 obs, 12 actions) from the same class; the
    default stays the drone's tanh network, built in the same order (so a seeded drone run is unchanged)."""
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


def test_learner_memory_is_612_kb_for_the_drone_network():
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
                              torch.tensor([-1.0, 0, 0, 0]), entropy, clip=0.2, value_coef=0.5, entropy_coef=0.01)
    assert vl.item() == pytest.approx(1.1 ** 2 / 4, abs=1e-6)
    _, _, vl, _, _ = ppo_loss(old_lp, old_lp, adv, torch.tensor([0.5, 0, 0, 0.]), old_value,
                              torch.tensor([1.0, 0, 0, 0]), entropy, clip=0.2, value_coef=0.5, entropy_coef=0.01)
    assert vl.item() == pytest.approx(0.8 ** 2 / 4, abs=1e-6)  # max picks the clipped (worse) prediction 0.2
    _, _, vl, _, _ = ppo_loss(old_lp, old_lp, adv, torch.tensor([0.5, 0, 0, 0.]), old_value,
                              torch.tensor([1.0, 0, 0, 0]), entropy, clip=0.2, value_coef=0.5, entropy_coef=0.01,
                              clip_value_loss=False)
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
assert abs(row.pop("falls_per_robot_min") - 60) < 1e-9
assert row == {"episodes": 1, "episode_return": 1.0, "episode_length": 50.0, "episode_falls": 1.0}
""",
}


@pytest.mark.parametrize("stage", list(STAGE_SCRIPTS))
def test_each_stage_runs_alone_in_an_empty_folder(stage, tmp_path):
    """A stage file copied alone into another project works there, with torch only."""
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), stage), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", STAGE_SCRIPTS[stage] + "\nprint('ok')"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert os.listdir(tmp_path) == [stage] or set(os.listdir(tmp_path)) <= {stage, "__pycache__"}


def test_this_file_imports_nothing_of_genesis():
    """Collecting this file imports no Genesis: it runs in seconds, and copied beside the stages it runs there."""
    code = "import sys, test_all\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('genesis', 'quadrants')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
