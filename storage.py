"""Rollout storage: T steps of N environments, kept on the device, turned into PPO minibatches.

    rollout -> [storage: add() each step, GAE at the end, minibatches] -> PPO loss -> backward -> Adam -> ...

Every buffer is preallocated once as [T, N, ...] on the policy's device, so a rollout never allocates and
never leaves the device. compute_returns() runs GAE(lambda) backward over T only (all N envs are one vector
operation per step); minibatches() reshuffles the T*N samples every epoch and cuts them into equal parts.

Episode ends. After a termination (a crash, a fall) the bootstrap is cut. A time-out (the episode truncated at
the task's time limit) is not a real end, so its return is bootstrapped with the critic's value of the
observation the episode ended in (the env's pre-reset `final_obs`; Pardo et al., 2018, "Time Limits in
Reinforcement Learning"). rsl_rl uses V(s_t) of the step before instead; this is exact, and cheap: time-outs
are rare, so the trainer runs the critic once per rollout on just their observations, `timed_out_obs()`.
"""
from typing import NamedTuple

import torch


class Batch(NamedTuple):  # one minibatch, B samples; each field [B, ...]
    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor  # log-prob of the action under the rollout policy
    values: torch.Tensor  # critic value at rollout time (for the clipped value loss)
    advantages: torch.Tensor
    returns: torch.Tensor
    mean: torch.Tensor  # rollout policy's action mean and std (for the KL)
    std: torch.Tensor


class RolloutStorage:
    def __init__(self, num_steps, num_envs, num_obs, num_actions, device):
        T, N = num_steps, num_envs
        self.num_steps, self.num_envs = T, N
        z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)
        self.obs = z(T, N, num_obs)
        self.actions = z(T, N, num_actions)
        self.rewards = z(T, N)
        self.dones = z(T, N, dtype=torch.bool)  # episode ended after this step (crash or time-out)
        self.time_outs = z(T, N, dtype=torch.bool)  # ...because of the time limit (truncation)
        self.final_obs = z(T, N, num_obs)  # observation an episode ended in (pre-reset); used where time_outs
        self.final_values = z(T, N)  # its value, filled in by compute_returns where time_outs
        self.values = z(T, N)
        self.log_probs = z(T, N)
        self.mean = z(T, N, num_actions)
        self.std = z(T, N, num_actions)
        self.advantages = z(T, N)
        self.returns = z(T, N)
        self.step = 0

    def add(self, *, obs, actions, rewards, dones, time_outs, final_obs, values, log_probs, mean, std):
        """Write one step of all N envs in place; each field [N] or [N, dim], given by name."""
        if self.step >= self.num_steps:
            raise RuntimeError("rollout storage is full: call clear() after the update")
        fields = dict(obs=obs, actions=actions, rewards=rewards, dones=dones, time_outs=time_outs,
                      final_obs=final_obs, values=values, log_probs=log_probs, mean=mean, std=std)
        for name, x in fields.items():
            getattr(self, name)[self.step].copy_(x)
        self.step += 1

    def clear(self):
        self.step = 0

    def timed_out_obs(self):
        """[K, obs]: the final observations of the K episodes that timed out, in (t, n) order. The boolean
        index reads K back to the host: one sync per rollout, none per step."""
        return self.final_obs[self.time_outs]

    @torch.no_grad()
    def compute_returns(self, last_values, timed_out_values, gamma, lam, normalize_advantages=True, average=None):
        """GAE(lambda) (Schulman et al., 2016, eq. 16). last_values [N]: V of the obs after the last step;
        timed_out_values [K]: V of timed_out_obs().

            delta_t = r_t + gamma * V_next - V(s_t)
                      V_next = V(s_{t+1}) if the episode goes on, V(final obs) after a time-out, 0 after a crash
            A_t     = delta_t + gamma * lam * A_{t+1}   (A_{t+1} = 0 if the episode ended at t)
            R_t     = A_t + V(s_t)                      (the critic's regression target)

        `average` (data-parallel training) maps a tensor to its mean over all workers, so the
        advantages are normalized with the statistics of the global batch."""
        self.final_values.zero_().masked_scatter_(self.time_outs, timed_out_values)  # [T, N]
        gae = torch.zeros_like(last_values)  # [N]
        for t in reversed(range(self.num_steps)):
            next_values = last_values if t == self.num_steps - 1 else self.values[t + 1]
            goes_on = (~self.dones[t]).float()
            bootstrap = goes_on * next_values + self.time_outs[t].float() * self.final_values[t]
            delta = self.rewards[t] + gamma * bootstrap - self.values[t]
            gae = delta + gamma * lam * goes_on * gae
            self.advantages[t] = gae
        torch.add(self.advantages, self.values, out=self.returns)
        if normalize_advantages:  # over the whole batch of T*N samples (of all workers)
            mean = self.advantages.mean()
            mean = average(mean) if average else mean
            var = (self.advantages - mean).square().mean()
            var = average(var) if average else var
            self.advantages.sub_(mean).div_(var.sqrt() + 1e-8)

    def minibatches(self, num_epochs, num_minibatches, generator=None):
        """Yield num_epochs * num_minibatches Batches; each epoch is a fresh permutation of all T*N samples."""
        n = self.num_steps * self.num_envs
        if n % num_minibatches:
            raise ValueError(f"{n} samples do not split into {num_minibatches} equal minibatches")
        size = n // num_minibatches
        flat = [x.flatten(0, 1) for x in (self.obs, self.actions, self.log_probs, self.values,
                                          self.advantages, self.returns, self.mean, self.std)]
        device = self.obs.device
        for _ in range(num_epochs):
            perm = torch.randperm(n, device=device, generator=generator)
            for i in range(num_minibatches):
                idx = perm[i * size:(i + 1) * size]
                yield Batch(*(x[idx] for x in flat))

    def nbytes(self):
        """Bytes of each buffer, read from the real tensors."""
        return {name: t.numel() * t.element_size() for name, t in vars(self).items() if torch.is_tensor(t)}
