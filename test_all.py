"""Tests of every stage, one section per file. Run: python -m pytest test_all.py"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from adam import Adam
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


# ---------------------------------------------------------------- env.py
# One scene is built for the whole section (the first build compiles Genesis kernels, ~1.5 min on CPU; later
# runs hit the kernel cache). Every test starts from env.reset(), so the order does not matter. Some tests set
# env state directly (targets, episode counters, drone pose) to construct situations quickly; each says so.
from torch.overrides import TorchFunctionMode

import env as env_module
from env import EpisodeStats, HoverConfig, HoverEnv

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
    keys = {"return", "length", "targets", "crashed", *(f"reward_{t}" for t in REWARD_TERMS)}
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
    assert ep["crashed"].all() and not info["time_outs"].any() and not info["nonfinite"].any()
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
    assert done.all() and info["time_outs"].all() and not info["episode"]["crashed"].any()
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
    assert info["episode"]["crashed"].tolist() == [True] + [False] * (N - 1)
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


def test_env_pays_capped_progress(env):
    """The task with a cap of 0.05 m/s (env.cfg replaced directly, then restored): a one-step episode at full
    throttle toward a target 1 m above closes in faster than that, and is paid as if at 0.05 m/s."""
    env.reset()
    env.target_pos[:] = torch.tensor([0.0, 0.0, 2.0])
    prev_dist = torch.linalg.vector_norm(env.target_pos - env.base_pos, dim=1)
    env.cfg = HoverConfig(progress_speed_cap=0.05)
    try:
        _, info = last_step_of_episode(env, full(1.0))
    finally:
        env.cfg = CFG
    dist2 = (info["final_obs"][:, :3] * 3).square().sum(1)
    capped = 10 * DT * 2 * prev_dist * 0.05 * DT
    assert (10 * DT * (prev_dist.square() - dist2) > 1.5 * capped).all()  # uncapped, it would be paid more
    assert torch.allclose(info["episode"]["reward_target"], capped, rtol=1e-4)


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
    assert not info["episode"]["crashed"][1] and not info["time_outs"][1] and rew[1] == 0
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


# ---------------------------------------------------------------- train.py
import json
import os
import subprocess
import sys

import contextlib
import dataclasses
import io
import shutil

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
    (["--eval", "runs/x/ckpt_0010.pt"], "evaluation moved to its own script: python eval.py runs/x/ckpt_0010.pt"),
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
    assert r.stderr.strip() == "train.py: error: --device cuda asked for, but torch sees no CUDA device: use --device cpu"
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
    assert train.build_config(train.parse_args(["--device", "cpu", "--normalize-obs", text])).normalize_obs is value


def test_crash_scale_grows_over_the_ramp_then_holds():
    cfg = train.TrainConfig(crash_multiple=10.0, crash_ramp=(100, 200))
    scales = [train.crash_scale(i, cfg) for i in (1, 100, 150, 200, 250)]
    assert scales == [1.0, 1.0, 5.5, 10.0, 10.0]
    assert train.crash_scale(50, dataclasses.replace(cfg, crash_ramp=(50, 50))) == 10.0  # a step
    assert {train.crash_scale(i, train.TrainConfig()) for i in range(0, 400, 7)} == {1.0}  # the default: unchanged


def test_train_settings_come_from_the_declarations(capsys):
    """--help shows each field's own help text; the CPU preset is a named config, printed when it applies."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for cls in (train.TrainConfig, PPOConfig):
        for f in dataclasses.fields(cls):
            if f.name != "ppo":
                assert " ".join(f.metadata["help"].split()) in help_text, f.name
    assert "upper bound of the adaptive learning rate (rsl_rl's) (default 0.01)" in help_text
    cfg = train.build_config(train.parse_args(["--device", "cpu", "--num-steps", "20"]))
    out = capsys.readouterr().out
    assert "CPU preset applies" in out and train.PRESET_FLAGS in out
    assert cfg.num_steps == 20 and cfg.num_envs == train.CPU_PRESET["num_envs"]  # a flag overrides the preset
    assert all(getattr(cfg, k) == v for k, v in train.CPU_PRESET.items() if k != "num_steps")


def test_save_interrupted_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    policy = ActorCritic(17, 4)
    opt = Adam(policy.parameters())

    cfg = train.TrainConfig(device="cpu")
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, policy, opt, 7, 1.0, cfg, HoverConfig(), torch.Generator())
    real_save = torch.save

    def dies_mid_write(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill during the write

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, policy, opt, 8, 2.0, cfg, HoverConfig(), torch.Generator())
    monkeypatch.setattr(torch, "save", real_save)
    ckpt, loaded_cfg = train.load_checkpoint(path)
    assert ckpt["iteration"] == 7 and loaded_cfg == cfg
    assert torch.equal(ckpt["optimizer"]["m"], opt.m)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The real loop on 8 drones, asked for 5 iterations; a SIGTERM arrives during the second one.
    Reused by the resume and eval tests."""
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
                               "--run-name", "smoke"])
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
    ckpt, _ = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
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
    saved, _ = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
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
            rolled.append(env.cfg)
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
    # iteration 3 of a crash penalty grown from x1 at iteration 1 to x4 at 3; checkpoints keep the task's own
    task = HoverConfig(**saved["task"])
    assert rolled[1] == dataclasses.replace(task, reward_crash=4 * task.reward_crash) and task.reward_crash == -10
    assert rolled[1].obs_ang_vel_scale == 1 / 3.14159
    with open(os.path.join(smoke_run, "metrics.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3]  # the counter went on
    resumed = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0003.pt"))[0]
    assert resumed["iteration"] == 3 and resumed["task"] == saved["task"]


def test_train_resume_rejects_another_network_shape(smoke_run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", os.path.join(smoke_run, "ckpt_0002.pt"), "--hidden", "64", "64"])
    assert e.value.code == 2 and "does not match" in capsys.readouterr().err


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


def test_eval_flies_the_task_the_checkpoint_was_trained_on(smoke_run, tmp_path, monkeypatch):
    ckpt, _ = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
    ckpt["task"]["obs_ang_vel_scale"] = 1 / 3.14159  # a policy trained with the Genesis example's scale
    torch.save(ckpt, tmp_path / "example_scale.pt")
    built = []

    class Built(Exception):
        pass

    def record_the_task(*args, cfg, **kwargs):  # stands in for HoverEnv: no scene is built
        built.append(cfg)
        raise Built

    monkeypatch.setattr(env_module, "HoverEnv", record_the_task)
    with pytest.raises(Built):
        evaluation.main([str(tmp_path / "example_scale.pt")])
    assert built[0].obs_ang_vel_scale == 1 / 3.14159 and built[0].reward_target == HoverConfig().reward_target


@pytest.mark.parametrize("flags, message", [
    (["/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["x.pt", "--drones", "0"], "--drones and --seconds must be > 0"),
    (["x.pt", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_eval_rejects_bad_input_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluation.main(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("eval.py: error: ") and message in err and len(err.splitlines()) == 1


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

def test_bench_runs_every_section_at_a_tiny_size(tmp_path):
    import bench
    out = str(tmp_path / "bench.json")
    results = bench.main(["--num-envs", "16", "--num-steps", "8", "--env-steps", "5", "--iterations", "1",
                          "--out", out])
    r = results["sizes"][16]
    for key in ("physics_steps_per_s", "env_steps_per_s", "rollout_steps_per_s", "update_s", "floor_s",
                "train_steps_per_s", "update_ratio_to_floor", "train_ratio_to_floor", "workers_steps_per_s",
                "workers_ratio_to_floor"):
        assert r[key] > 0, key
    assert r["workers"] == 2
    assert r["memory"]["host_peak_rss_mb"] > 0  # per size; on CUDA also torch's peak and the process's device memory
    assert set(results["adam"]) == {"this Adam (flat buffers)", "torch Adam foreach", "torch Adam fused",
                                    "torch Adam for-loop"}
    with open(out) as f:
        assert json.load(f)["sizes"]["16"]["update_s"] == r["update_s"]


# ---------------------------------------------------------------- export.py
import ctypes
import importlib.util

import export
import numpy as np


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """The smoke run's last checkpoint exported in every format this machine can write."""
    out = str(tmp_path_factory.mktemp("export"))
    export.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--out", out])
    ckpt, cfg = train.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
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


def test_exported_c_flies_like_the_policy(exported, c_policy):
    """Closed loop: the C policy flies 1024 drones for 30 s as the torch policy does, counted as eval.py counts."""
    _, policy = exported

    class CPolicy:
        def act_deterministic(self, obs):
            return c_policy(obs)

    flight = HoverEnv(1024, device="cpu", seed=10_001)
    figures = {}
    for name, p in (("torch", policy), ("c", CPolicy())):
        flight.generator.manual_seed(10_001)  # the same targets for both
        figures[name] = evaluation.fly(p, flight, 3000, noise=False)[1]  # every step flown
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
