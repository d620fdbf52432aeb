"""PPO: the clipped-surrogate loss and the update over a rollout's minibatches.

    rollout -> storage -> [PPO loss -> backward -> optimizer step] x epochs x minibatches -> next rollout

`ppo_loss` is a pure function of tensors. `update` runs the loop: forward, KL-adapted learning rate, loss,
backward, gradient averaged over data-parallel workers (if any), clipping, optimizer step; its figures stay
on the device (no host sync). Imports only torch and needs of the other stages only these names:
    policy.evaluate(obs, actions)  fields log_prob, entropy, value [B] and mean, std [B, act]
    optimizer                      zero_grad(), step(), param_groups[i]["lr"]: adam.Adam or a torch.optim one
    each minibatch                 the fields of storage.Batch
Defaults are rsl_rl's PPO's (5.5.1: its clipped value loss, adaptive lr, entropy bonus); a task sets what its own
Genesis example changes (train.py: the task's TRAIN).
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


def setting(default, help, **rule):
    """A setting: its default, the help of its flag, the rule its value keeps (train.py's config.py checks it)."""
    return field(default=default, metadata={"help": help, **rule})


@dataclass
class PPOConfig:
    clip: float = setting(0.2, "epsilon of the clipped surrogate: the ratio is kept within [1 - clip, 1 + clip]",
                          above=0, below=1)
    clip_value_loss: bool = setting(True, "also keep the value prediction within clip of the rollout's value")
    value_coef: float = setting(1.0, "weight of the value loss", low=0)
    entropy_coef: float = setting(0.01, "weight of the entropy bonus (keeps the policy exploring)", low=0)
    num_epochs: int = setting(5, "passes over the rollout per update", low=1)
    num_minibatches: int = setting(4, "minibatches per pass; each holds 1/num_minibatches of the rollout", low=1)
    learning_rate: float = setting(1e-3, "initial learning rate; then adapted to the KL when adaptive_lr", above=0)
    adaptive_lr: bool = setting(True, "rsl_rl's schedule: lr / 1.5 when KL > 2 desired_kl, lr * 1.5 when < half")
    desired_kl: float = setting(0.01, "target KL(rollout policy || current policy) per minibatch", above=0)
    lr_min: float = setting(1e-5, "lower bound of the adaptive learning rate (rsl_rl's)", above=0)
    lr_max: float = setting(1e-2, "upper bound of the adaptive learning rate (rsl_rl's)", above=0)
    max_grad_norm: float = setting(1.0, "the gradient's global L2 norm is clipped to this", above=0)
    gamma: float = setting(0.99, "discount per step: a reward k steps ahead counts gamma^k (0.99: 0.37 at 100 steps)",
                           low=0, high=1)
    lam: float = setting(0.95, "GAE lambda: the bias/variance trade-off of the advantage", low=0, high=1)

    def conflicts(self):
        if self.lr_min > self.lr_max:
            yield f"--lr-min must be <= --lr-max, got {self.lr_min} and {self.lr_max}"


class Loss(NamedTuple):  # each a 0-dim tensor
    total: torch.Tensor  # what backward() is called on
    surrogate: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor  # share of samples whose ratio left [1 - clip, 1 + clip]


def ppo_loss(log_prob, old_log_prob, advantages, value, old_value, returns, entropy,
             clip, value_coef, entropy_coef, clip_value_loss=True):
    """All inputs [B]. Returns the Loss terms, means over the batch:

        ratio     r = pi(a|s) / pi_old(a|s)
        surrogate L = -mean(min(r * A, clip(r, 1-eps, 1+eps) * A))
        value     V = mean(max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2))
        total       = L + value_coef * V - entropy_coef * mean(entropy)
    """
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    value_loss = (value - returns) ** 2
    if clip_value_loss:
        clipped = old_value + torch.clamp(value - old_value, -clip, clip)
        value_loss = torch.max(value_loss, (clipped - returns) ** 2)
    value_loss = value_loss.mean()
    entropy = entropy.mean()
    total = surrogate + value_coef * value_loss - entropy_coef * entropy
    clip_fraction = ((ratio - 1).abs() > clip).float().mean()
    return Loss(total, surrogate, value_loss, entropy, clip_fraction)


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


def gradient_buffers(params):
    """The tensors that hold the gradient: one flat buffer when every p.grad is a view into it (adam.Adam
    keeps them so), else each p.grad. Averaging or clipping one buffer is one op, not one per tensor."""
    grads = [p.grad for p in params]
    storage = grads[0].untyped_storage()
    if (all(g.untyped_storage().data_ptr() == storage.data_ptr() for g in grads)
            and storage.nbytes() == sum(g.numel() for g in grads) * grads[0].element_size()):
        return [grads[0].new_empty(0).set_(storage)]
    return grads


def clip_grad_norm_(grads, max_norm):
    """Scale the gradient so that its global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_'s
    formula); returns the norm before clipping, as a device tensor."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm


def update(policy, optimizer, batches, cfg, average=None):
    """One PPO update over an iterable of minibatches. Returns a dict of 0-dim tensors (means over minibatches,
    and the lr at the end).

    `average`, for data-parallel training, maps a tensor to its mean over all workers, in place (an
    all-reduce). It is applied to the gradient before clipping, so all workers take the same step, and
    to the KL, so all workers pick the same lr. None on a single process."""
    params = [p for p in policy.parameters() if p.requires_grad]
    lr = torch.as_tensor(optimizer.param_groups[0]["lr"], dtype=torch.float32, device=params[0].device)
    names = ("loss", "surrogate", "value_loss", "entropy", "clip_fraction", "kl", "grad_norm")
    sums, count = {k: torch.zeros((), device=lr.device) for k in names}, 0
    for b in batches:
        out = policy.evaluate(b.obs, b.actions)
        with torch.no_grad():
            kl = gaussian_kl(b.mean, b.std, out.mean, out.std).mean()
            if average is not None:
                kl = average(kl)
            if cfg.adaptive_lr:
                lr = adapt_lr(lr, kl, cfg)
                for group in optimizer.param_groups:  # an optimizer built with a float lr gets a float: a sync
                    group["lr"] = lr if torch.is_tensor(group["lr"]) else lr.item()
        loss = ppo_loss(out.log_prob, b.log_probs, b.advantages, out.value, b.values, b.returns, out.entropy,
                        cfg.clip, cfg.value_coef, cfg.entropy_coef, cfg.clip_value_loss)
        optimizer.zero_grad()
        loss.total.backward()
        grads = gradient_buffers(params)
        if average is not None:
            for g in grads:
                average(g)
        grad_norm = clip_grad_norm_(grads, cfg.max_grad_norm)
        optimizer.step()
        for k, x in zip(names, (*loss, kl, grad_norm)):
            sums[k] += x.detach()
        count += 1
    return {**{k: s / max(count, 1) for k, s in sums.items()}, "lr": lr.clone()}
