"""PPO: the clipped-surrogate loss and the update over a rollout's minibatches.

    rollout -> storage -> [PPO loss -> backward -> optimizer step] x epochs x minibatches -> next rollout

`ppo_loss` is a pure function of tensors (test it by hand). `update` runs the
epochs x minibatches loop: forward, KL-adapted learning rate, loss, backward,
global gradient clipping, optimizer step. Every figure it returns stays a tensor
on the device, so the loop never waits for the host; the trainer reads them
once per iteration.

Duck typing keeps this file standalone: `policy` needs `evaluate(obs, actions) ->
(log_prob, entropy, value, mean, std)`, `optimizer` needs `zero_grad()`, `step()`
and a settable `lr`; each minibatch needs the fields of storage.Batch.

Defaults are the Genesis hover example's (rsl_rl PPO): Schulman et al., 2017,
"Proximal Policy Optimization Algorithms", with rsl_rl's clipped value loss and
KL-adaptive learning rate.
"""
from dataclasses import dataclass

import torch


@dataclass
class PPOConfig:
    clip: float = 0.2  # epsilon of the clipped surrogate: ratio kept in [1-clip, 1+clip]
    clip_value_loss: bool = True  # also clip the value prediction to within `clip` of the rollout's value
    value_coef: float = 1.0  # weight of the value loss
    entropy_coef: float = 0.004  # weight of the entropy bonus (keeps exploring)
    num_epochs: int = 5  # passes over the rollout per update
    num_minibatches: int = 4  # minibatches per pass; each is T*N / 4 samples
    learning_rate: float = 3e-4  # initial lr; then adapted to the KL when adaptive_lr
    adaptive_lr: bool = True  # rsl_rl's "adaptive" schedule
    desired_kl: float = 0.01  # target KL(rollout policy || current policy) per minibatch
    lr_min: float = 1e-5  # the adaptive lr stays within [lr_min, lr_max]
    lr_max: float = 1e-2  # (rsl_rl's bounds)
    max_grad_norm: float = 1.0  # global L2 norm of the gradient is clipped to this
    gamma: float = 0.99  # discount: a reward 100 steps (1 s) ahead counts 0.37
    lam: float = 0.95  # GAE lambda: bias/variance trade-off of the advantage


def ppo_loss(log_prob, old_log_prob, advantages, value, old_value, returns, entropy,
             clip=0.2, value_coef=1.0, entropy_coef=0.004, clip_value_loss=True):
    """All inputs [B]. Returns (loss, surrogate loss, value loss, mean entropy, clip fraction), 0-dim tensors.

        ratio     r = pi(a|s) / pi_old(a|s)
        surrogate L = -mean(min(r * A, clip(r, 1-eps, 1+eps) * A))
        value     V = mean(max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2))
        loss        = L + value_coef * V - entropy_coef * mean(entropy)
    """
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    value_loss = (value - returns) ** 2
    if clip_value_loss:
        clipped = old_value + torch.clamp(value - old_value, -clip, clip)
        value_loss = torch.max(value_loss, (clipped - returns) ** 2)
    value_loss = value_loss.mean()
    entropy = entropy.mean()
    loss = surrogate + value_coef * value_loss - entropy_coef * entropy
    clip_fraction = ((ratio - 1).abs() > clip).float().mean()
    return loss, surrogate, value_loss, entropy, clip_fraction


def gaussian_kl(old_mean, old_std, mean, std):
    """KL(N(old_mean, old_std^2) || N(mean, std^2)), independent dims summed. [B, act] each -> [B]."""
    return (torch.log(std / old_std) + (old_std ** 2 + (old_mean - mean) ** 2) / (2 * std ** 2) - 0.5).sum(-1)


def adapt_lr(lr, kl, cfg):
    """rsl_rl's adaptive schedule, on the device (no sync): KL too high -> lr / 1.5, too low -> lr * 1.5.

    A KL of exactly 0 (the first minibatch, before any step) leaves lr unchanged."""
    lower = torch.clamp(lr / 1.5, min=cfg.lr_min)
    higher = torch.clamp(lr * 1.5, max=cfg.lr_max)
    lr = torch.where(kl > 2 * cfg.desired_kl, lower, lr)
    return torch.where((kl < cfg.desired_kl / 2) & (kl > 0), higher, lr)


def update(policy, optimizer, batches, cfg, average=None):
    """One PPO update over an iterable of minibatches. Returns a dict of 0-dim tensors (means over minibatches).

    `average`, for data-parallel training, maps a tensor to its mean over all workers, in place
    (an all-reduce). It is applied to every gradient before clipping, so all workers take the
    same step, and to the KL, so all workers pick the same lr. None on a single process."""
    device = next(policy.parameters()).device
    if not torch.is_tensor(optimizer.lr):
        optimizer.lr = torch.tensor(float(optimizer.lr), device=device)
    clip_grad = getattr(optimizer, "clip_grad_norm_", None)  # a flat-buffer optimizer clips in one op
    if clip_grad is None:
        clip_grad = lambda max_norm: torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    names = ("loss", "surrogate", "value_loss", "entropy", "clip_fraction", "kl", "grad_norm")
    sums = {k: torch.zeros((), device=device) for k in names}
    count = 0
    for b in batches:
        log_prob, entropy, value, mean, std = policy.evaluate(b.obs, b.actions)
        with torch.no_grad():
            kl = gaussian_kl(b.mean, b.std, mean, std).mean()
            if average is not None:
                kl = average(kl)
            if cfg.adaptive_lr:
                optimizer.lr = adapt_lr(optimizer.lr, kl, cfg)
        loss, surrogate, value_loss, entropy, clip_fraction = ppo_loss(
            log_prob, b.log_probs, b.advantages, value, b.values, b.returns, entropy,
            cfg.clip, cfg.value_coef, cfg.entropy_coef, cfg.clip_value_loss)
        optimizer.zero_grad()
        loss.backward()
        if average is not None:
            # A flat-buffer optimizer (adam.Adam) holds the whole gradient in one tensor: one all-reduce.
            for g in [optimizer.g] if hasattr(optimizer, "g") else [p.grad for p in policy.parameters()]:
                average(g)
        grad_norm = clip_grad(cfg.max_grad_norm)
        optimizer.step()
        for k, x in zip(names, (loss, surrogate, value_loss, entropy, clip_fraction, kl, grad_norm)):
            sums[k] += x.detach()
        count += 1
    stats = {k: s / max(count, 1) for k, s in sums.items()}
    stats["lr"] = optimizer.lr.detach().clone()
    return stats
