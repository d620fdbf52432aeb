"""Adam, written out: the optimizer step of the PPO loop.

    rollout -> storage -> PPO loss -> backward -> [Adam step: theta overwritten in place] -> next rollout

All parameters live in ONE flat buffer `theta` of N floats and their gradients in one flat buffer `g` (every
`p.data` and `p.grad` is a view into them); the moments `m` and `v` are flat buffers of the same size. So the
optimizer's whole memory is four vectors of N floats, and a step is a few vector ops, not a loop over tensors.

    plain gradient descent    theta <- theta - lr * g            one lr for every weight
    Adam                      m <- b1*m + (1-b1)*g               direction: running mean of g
                              v <- b2*v + (1-b2)*g^2             scale: running mean of g^2
                              theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

Dividing by sqrt(v) gives each weight its own step size (large, noisy gradients take small steps); m smooths
the noise of single minibatches. m and v start at 0, so early averages lean toward 0: m_hat = m / (1 - b1^t)
and v_hat = v / (1 - b2^t) remove that bias (Kingma & Ba, 2015). theta is written in place: the policy's
parameters keep their storage, so the next rollout uses the new weights without a copy.
"""
import math

import torch


class Adam:
    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("Adam got no parameters that require grad")
        # torch.optim's layout, so that an lr schedule written for torch optimizers (ppo.py's) sets it here too.
        # The lr is a float, or a 0-dim tensor on the device that a schedule changes without a host sync.
        self.param_groups = [{"params": self.params, "lr": lr}]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0  # number of steps taken; a Python int, so the bias corrections need no sync

        p0 = self.params[0]
        n = sum(p.numel() for p in self.params)
        self.theta = torch.empty(n, dtype=p0.dtype, device=p0.device)  # [N] the weights
        self.g = torch.zeros_like(self.theta)  # [N] the gradient
        self.m = torch.zeros_like(self.theta)  # [N] first moment: running mean of g
        self.v = torch.zeros_like(self.theta)  # [N] second moment: running mean of g^2

        # Make every parameter and its .grad a view into the flat buffers.
        # backward() then accumulates straight into g (autograd adds into an existing .grad in place).
        offset = 0
        for p in self.params:
            k = p.numel()
            self.theta[offset:offset + k].copy_(p.detach().reshape(-1))
            p.data = self.theta[offset:offset + k].view_as(p)
            p.grad = self.g[offset:offset + k].view_as(p)
            offset += k

    def zero_grad(self):
        # Zero in place; never set .grad to None (that would detach it from g).
        self.g.zero_()

    @torch.no_grad()
    def step(self):
        if self.params[0].grad is None or self.params[0].grad.data_ptr() != self.g.data_ptr():
            raise RuntimeError("parameter .grad no longer points into Adam's flat gradient: "
                               "call this optimizer's zero_grad(), not model.zero_grad()")
        self.t += 1
        self.m.lerp_(self.g, 1 - self.beta1)  # m = b1*m + (1-b1)*g
        self.v.mul_(self.beta2).addcmul_(self.g, self.g, value=1 - self.beta2)  # v = b2*v + (1-b2)*g^2

        # Bias correction: m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t).
        bias1 = 1 - self.beta1 ** self.t
        bias2 = 1 - self.beta2 ** self.t
        # theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)
        #        = theta - m / ((sqrt(v) / sqrt(bias2) + eps) * bias1 / lr)
        denom = (self.v.sqrt() / math.sqrt(bias2)).add_(self.eps)  # sqrt(v_hat) + eps
        denom.div_(self.param_groups[0]["lr"] / bias1)  # a float or a 0-dim tensor: no sync either way
        self.theta.addcdiv_(self.m, denom, value=-1.0)  # in place: the policy sees the new theta

    def nbytes(self):
        """Bytes of each flat buffer, read from the real tensors: the learner's whole memory."""
        return {name: t.numel() * t.element_size() for name, t in (("weights (theta)", self.theta),
                ("gradients (g)", self.g), ("Adam m", self.m), ("Adam v", self.v))}

    def state_dict(self):
        return {"lr": self.param_groups[0]["lr"], "betas": (self.beta1, self.beta2), "eps": self.eps, "t": self.t,
                "m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state):
        if state["m"].shape != self.m.shape:
            raise ValueError(f"optimizer state has {state['m'].numel()} values, this network has "
                             f"{self.m.numel()}: the checkpoint is from a different network shape")
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.t = int(state["t"])
        lr = state["lr"]
        self.param_groups[0]["lr"] = lr.to(self.theta.device) if torch.is_tensor(lr) else lr
        self.beta1, self.beta2 = state["betas"]
        self.eps = state["eps"]
