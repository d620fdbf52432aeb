"""The one actor-critic network that every environment shares.

    [rollout: act on obs of all N envs at once] -> storage -> [PPO loss: evaluate] -> backward -> Adam -> ...

The N environments do not own copies of the network: their observations are one batch [N, obs] and one
forward pass answers all of them. Training updates this one set of weights, in place.

    actor   obs [B, obs] -> 128 -> tanh -> 128 -> tanh -> action mean [B, act]   (widths and activation:
    critic  obs [B, obs] -> 128 -> tanh -> 128 -> tanh -> value       [B]          constructor arguments)
    std     a learnable vector [act] (not its log, as in rsl_rl): a ~ N(mean, std^2), dims independent;
            used clamped to at least min_std (0: no floor)

An optional running normalizer of the observations sits in front; its statistics are saved with the weights.
The actor's last layer starts 100x smaller than PyTorch's default and without bias, so the untrained policy
commands about the same action (0, which a task makes its neutral one) for every observation instead of a fixed
random bias per output.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class ActOutput(NamedTuple):  # policy.act: one rollout step of N envs
    actions: torch.Tensor  # [N, act] sampled from N(mean, std^2)
    log_prob: torch.Tensor  # [N] of those actions
    value: torch.Tensor  # [N] the critic's estimate
    mean: torch.Tensor  # [N, act]
    std: torch.Tensor  # [N, act]


class EvaluateOutput(NamedTuple):  # policy.evaluate: B stored samples scored by the current weights
    log_prob: torch.Tensor  # [B] of the stored actions
    entropy: torch.Tensor  # [B]
    value: torch.Tensor  # [B]
    mean: torch.Tensor  # [B, act]
    std: torch.Tensor  # [B, act]


class ActorCritic(nn.Module):
    def __init__(self, num_obs, num_actions, hidden=(128, 128), init_std=1.0, normalize_obs=False, min_std=0.0,
                 activation="tanh"):
        super().__init__()
        self.actor = mlp([num_obs, *hidden, num_actions], activation)
        self.critic = mlp([num_obs, *hidden, 1], activation)
        self.std = nn.Parameter(init_std * torch.ones(num_actions))
        # A floor keeps a small batch exploring (EXPERIMENTS.md, "The action noise held at 0.3").
        self.min_std = min_std
        # The untrained actor commands about 0 whatever it sees (EXPERIMENTS.md, "The observation and the actor's
        # start").
        with torch.no_grad():
            self.actor[-1].weight.mul_(0.01)
            self.actor[-1].bias.zero_()
        # Off by default, as in Genesis's examples: their observations are already scaled to about [-1, 1].
        self.obs_norm = RunningNorm(num_obs) if normalize_obs else nn.Identity()

    def update_normalizer(self, obs, all_sum=None):  # obs [B, obs]; a no-op when normalization is off
        if isinstance(self.obs_norm, RunningNorm):
            self.obs_norm.update(obs, all_sum)

    def value(self, obs):  # obs [B, obs] -> [B]
        return self.critic(self.obs_norm(obs)).squeeze(-1)

    def act(self, obs):  # rollout: obs [N, obs] -> ActOutput
        x = self.obs_norm(obs)
        mean = self.actor(x)  # [N, act]
        std = self.action_std()  # [act], broadcast over the N envs: its log is taken act times, not N * act
        actions = mean + std * torch.randn_like(mean)
        return ActOutput(actions, gaussian_log_prob(actions, mean, std), self.critic(x).squeeze(-1), mean,
                         std.expand_as(mean))

    def evaluate(self, obs, actions):  # update: obs [B, obs], actions [B, act] -> EvaluateOutput
        x = self.obs_norm(obs)
        mean = self.actor(x)
        std = self.action_std().expand_as(mean)
        entropy = (0.5 + LOG_SQRT_2PI + torch.log(std)).sum(-1)  # entropy of N(mean, std^2), summed over dims
        return EvaluateOutput(gaussian_log_prob(actions, mean, std), entropy, self.critic(x).squeeze(-1), mean, std)

    def action_std(self):  # [act]: the std the actions are drawn with; below the floor it gets no gradient
        return self.std.clamp(min=self.min_std)

    def act_deterministic(self, obs):  # evaluation and export: the action mean [N, act]
        return self.actor(self.obs_norm(obs))


def gaussian_log_prob(actions, mean, std):  # [B, act] each -> [B], independent dims: log-probs add
    return (-0.5 * ((actions - mean) / std) ** 2 - torch.log(std) - LOG_SQRT_2PI).sum(-1)


def mlp(sizes, activation="tanh"):  # Linear, activation, Linear, activation, ..., Linear
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers = [layer for n_in, n_out in zip(sizes, sizes[1:]) for layer in (nn.Linear(n_in, n_out),
                                                                            ACTIVATIONS[activation]())]
    return nn.Sequential(*layers[:-1])


class RunningNorm(nn.Module):
    """Running mean/variance of observations (Chan et al.'s parallel merge), as buffers saved with the policy."""

    def __init__(self, num_obs, eps=1e-8):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_obs))
        self.register_buffer("var", torch.ones(num_obs))
        self.register_buffer("count", torch.tensor(0.0))
        self.eps = eps

    @torch.no_grad()
    def update(self, obs, all_sum=None):
        """Merge the moments of obs [B, obs] into the running ones; all_sum(t) sums t over data-parallel workers, so
        all merge the same global batch. float64: x^2 of a quaternion's w (about 1) must not swamp its variance."""
        x = obs.double()
        moments = torch.cat((x.new_tensor([x.shape[0]]), x.sum(0), x.square().sum(0)))  # [1 + 2 obs]
        if all_sum is not None:
            all_sum(moments)
        d, n = x.shape[1], moments[0]
        batch_mean = moments[1:1 + d] / n
        batch_var = (moments[1 + d:] / n - batch_mean ** 2).clamp_(min=0)
        total = self.count.double() + n
        delta = batch_mean - self.mean
        self.mean += (delta * (n / total)).float()
        self.var.copy_((self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total)
        self.count.copy_(total)

    def forward(self, obs):
        return (obs - self.mean) / torch.sqrt(self.var + self.eps)


class _TanhViaSigmoid(torch.autograd.Function):
    """tanh(x) = 2 sigmoid(2x) - 1, with tanh's own backward, grad * (1 - y^2), from the saved output."""

    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x * 2).mul_(2).sub_(1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class Tanh(nn.Module):
    """nn.Tanh with an optional speed-up for CPUs, where torch.tanh is several times slower than
    torch.sigmoid: there it is computed through the sigmoid (within 2e-7 of torch.tanh; the saving is
    measured in EXPERIMENTS.md, "Speed of each stage"). On a GPU it is torch.tanh. Replace it by nn.Tanh to drop the
    trick."""

    def forward(self, x):
        return _TanhViaSigmoid.apply(x) if x.device.type == "cpu" else torch.tanh(x)


ACTIVATIONS = {"tanh": Tanh, "elu": nn.ELU}
