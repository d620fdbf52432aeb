"""The Crazyflie as a real one flies: the hover task with what the simulator leaves out, drawn per drone.

    policy.act(obs) -> [env.step(actions): the motors' delay, lag and full thrust, mass and thrust errors, pushes;
                        noisy sensors] -> storage -> PPO -> Adam

    python train.py --task crazyflie          trains against all of it (the defaults of CrazyflieConfig)
    python eval.py CKPT --perturbations       flies a drone checkpoint through each gap, then all at once
    python eval.py HOVER_CKPT --task crazyflie --perturbations     the same for a policy trained without them
    python examples/crazyflie/preflight.py CKPT   its C controller in MuJoCo, under them: PASS or FAIL (README.md)

The drone, its observations, actions and rewards are env.py's: CrazyflieEnv is HoverEnv with its hooks overridden
(the motor command, the push, the sensed observation, each episode's draws), so env.py knows nothing of this file.
Every range (low, high) is drawn per drone at every episode's start, from a generator of its own, so that a
flight under any perturbation meets the same targets as without. README.md in this folder has what the gaps are, how
they were measured and what is still left to a real flight.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

import env as hover
from env import setting

# train.py's settings: the hover task's TRAIN; without CUDA, the CPU preset this task's ranges were measured with
# (the hover task's before it trained a smaller network faster, EXPERIMENTS.md "The Crazyflie task")
TRAIN = hover.TRAIN
CPU_PRESET = dict(num_envs=1024, num_steps=50, workers=2, threads_update=1, normalize_obs=True, init_std=0.3,
                  min_std=0.3, progress_speed_cap=2.5, crash_multiple=10.0, max_iterations=250)

NOISE = (0.01, 0.05, 1.0, 0.1)  # sigmas: position [m], linear velocity [m/s], attitude [deg], angular velocity [rad/s]
PUSH = dict(push_force=0.05, push_torque=5e-4)  # 5 % of the weight per axis; torque: that force at 4 cm, an arm's


@dataclass
class CrazyflieConfig(hover.HoverConfig):
    """The hover task's settings, and the gaps to a real Crazyflie. The defaults are what `--task crazyflie` trains
    against, each for a reason measured in EXPERIMENTS.md ("The Crazyflie task"): the motors' ranges stop short of
    the worst conditions flown, grow from the nominal drone over iterations 50-150, and a tenth of the episodes fly
    the nominal drone; progress is paid per metre, so that drones do not dawdle near a target. Like Genesis's drone,
    the motors have no full thrust unless thrust_to_weight sets one (preflight.py flies with cf2x.urdf's)."""

    motor_lag_s: tuple = setting((0.015, 0.08), "time constant of each propeller's first-order RPM response [s]",
                                 low=0, ordered=True)
    thrust_to_weight: float = setting(0.0, "the motors' full thrust over the weight (cf2x.urdf's thrust2weight): "
                                            "each propeller's RPM is capped at hover_rpm * sqrt(this); 0: no cap",
                                      low=0)
    action_delay: tuple = setting((0, 1), "control steps an action takes to reach the motors", low=0, high=50,
                                  ordered=True)
    mass_scale: tuple = setting((0.9, 1.2), "the drone's mass and inertia times this", above=0, ordered=True)
    thrust_scale: tuple = setting((0.85, 1.15), "the propellers' thrust and drag-torque coefficients times this",
                                  above=0, ordered=True)
    obs_noise: tuple = setting(NOISE, "Gaussian noise of the observed position [m], velocity [m/s], attitude [deg] "
                                      "and angular velocity [rad/s]: sigmas", low=0)
    push_force: float = setting(PUSH["push_force"], "a random external force: sigma per axis, a fraction of the "
                                                    "drone's weight", low=0)
    push_torque: float = setting(PUSH["push_torque"], "a random external torque: sigma per axis [N m]", low=0)
    push_interval_s: tuple = setting((1.0, 2.0), "each push lasts an interval drawn in this range [s]", above=0,
                                     ordered=True)
    nominal_share: float = setting(0.1, "the share of episodes a drone flies with the nominal motors, mass and "
                                        "thrust (no lag, delay, mass or thrust error; the noise and pushes apply)",
                                   low=0, below=1)
    perturb_ramp: tuple = setting((50, 150), "a curriculum: in training, the ranges above grow from none (the "
                                             "nominal drone) to whole over the iterations FROM TO (eval.py flies "
                                             "them whole)", low=0, ordered=True)
    progress_per_metre: bool = setting(True, "progress in metres: |p_prev - target| - |p - target| [m], the same "
                                             "pay per m/s near the target as far from it")
    reward_target: float = setting(20.0, "progress toward the target (per metre: the squared distances' pay at 1 m)")

    def conflicts(self):
        yield from super().conflicts()
        if 0 < self.thrust_to_weight <= 1:
            yield f"--thrust-to-weight must be above 1 (to hover) or 0 (no cap), got {self.thrust_to_weight}"


# eval.py --perturbations: each gap alone, then all at once ("realistic"). Each sets every perturbation setting, so
# nothing of the training ranges is left in a flight. The reference that flew a real Crazyflie from simulation
# (RLtools, "Learning to Fly in Seconds") trained against a 0.15 s motor time constant, noise and pushes of ~5 %.
UNPERTURBED = dict(motor_lag_s=(0.0, 0.0), action_delay=(0, 0), mass_scale=(1.0, 1.0), thrust_scale=(1.0, 1.0),
                   obs_noise=(0.0, 0.0, 0.0, 0.0), push_force=0.0, push_torque=0.0, nominal_share=0.0,
                   thrust_to_weight=0.0)
CAP = dict(thrust_to_weight=2.25)  # the motors of cf2x.urdf, which Genesis's drone does not limit
PERTURBATIONS = {name: {**UNPERTURBED, **change} for name, change in {
    "none": {},
    "motor lag 0.03 s": dict(motor_lag_s=(0.03, 0.03)),
    "motor lag 0.08 s": dict(motor_lag_s=(0.08, 0.08)),
    "motor lag 0.15 s": dict(motor_lag_s=(0.15, 0.15)),
    "thrust capped at 2.25 x weight": CAP,
    "delay 1 step (10 ms)": dict(action_delay=(1, 1)),
    "delay 2 steps (20 ms)": dict(action_delay=(2, 2)),
    "mass +20 %": dict(mass_scale=(1.2, 1.2)),
    "mass -10 %": dict(mass_scale=(0.9, 0.9)),
    "thrust +-15 %": dict(thrust_scale=(0.85, 1.15)),
    "observation noise": dict(obs_noise=NOISE),
    "pushes": PUSH,
    "realistic (all at once)": dict(motor_lag_s=(0.05, 0.05), action_delay=(1, 1), mass_scale=(1.1, 1.1),
                                    thrust_scale=(0.9, 0.9), obs_noise=NOISE, **PUSH),
}.items()}
SETTINGS = (*UNPERTURBED, "push_interval_s", "perturb_ramp")  # what perturb() may change between flights


def perturbed(cfg) -> bool:
    """Is any of what the simulator leaves out switched on in cfg?"""
    return (cfg.motor_lag_s[1] > 0 or cfg.action_delay[1] > 0 or tuple(cfg.mass_scale) != (1.0, 1.0)
            or tuple(cfg.thrust_scale) != (1.0, 1.0) or any(cfg.obs_noise) or cfg.push_force > 0 or cfg.push_torque > 0
            or cfg.thrust_to_weight > 0)


def quat_mul(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hamilton products p q [N, 4] of quaternions (w, x, y, z) [N, 4]: the rotation q, then p."""
    pw, pv, qw, qv = p[:, :1], p[:, 1:], q[:, :1], q[:, 1:]
    return torch.cat((pw * qw - (pv * qv).sum(1, keepdim=True), pw * qv + qw * pv + torch.linalg.cross(pv, qv)), 1)


class Perturbations:
    """What the simulator leaves out, for N drones. reset() draws each drone's own at its episode's start; motors(),
    push() and observe() apply them every step.

    A drone m times heavier, inertia included (as Genesis's set_mass scales it), flies as the nominal one with every
    propeller force and torque, and every push, divided by m: mass_scale is applied that way, through the RPM (thrust
    grows with RPM^2). Genesis's own per-env masses need per-env link storage (RigidOptions.batch_links_info), which
    recompiles and slows down every kernel."""

    STATE = ("rpm_scale", "mass_scale", "lag", "rpm", "delay", "actions", "steps_taken", "wrench", "push_left")

    def __init__(self, cfg, num_envs, device, generator, weight, obs_scale, strength=1.0):
        N, self.cfg, self.generator = num_envs, cfg, generator
        pos, vel, att_deg, ang = cfg.obs_noise  # the sigmas, as they show in the observation
        self.whole_noise = torch.tensor([pos] * 3 + [0.0] * 4 + [vel] * 3 + [ang] * 3 + [0.0] * 4,
                                        device=device) * obs_scale
        self.whole_turn = math.radians(att_deg) / 2  # a small rotation by the angle r is the quaternion (1, r / 2)
        self.whole_push = torch.tensor([cfg.push_force * weight, cfg.push_torque], device=device)[:, None]  # [2, 1]
        self.set_strength(strength)
        self.rpm_scale = torch.ones(N, 1, device=device)  # sqrt(thrust_scale / mass_scale)
        self.mass_scale = torch.ones(N, 1, device=device)
        self.lag = torch.ones(N, 1, device=device)  # the RPM's step toward its command: 1 - exp(-dt / tau)
        self.max_rpm = cfg.hover_rpm * math.sqrt(cfg.thrust_to_weight) if cfg.thrust_to_weight else math.inf
        self.rpm = torch.full((N, 4), cfg.hover_rpm, device=device)  # the propellers' RPM now
        self.delay = torch.zeros(N, dtype=torch.long, device=device)  # in control steps
        self.actions = torch.zeros(cfg.action_delay[1] + 1, N, 4, device=device)  # the last few actions, a ring
        self.steps_taken = 0  # where the ring's newest action goes
        self.wrench = torch.zeros(N, 2, 3, device=device)  # the push now: force [N], torque [N m], world frame
        self.push_left = torch.zeros(N, dtype=torch.int32, device=device)  # steps until the next one is drawn
        self.arange = torch.arange(N, device=device)

    def set_strength(self, strength):
        """strength in [0, 1] (a Python float: no sync): every range shrunk toward the nominal drone, 0 for none,
        1 for the ranges of cfg (perturb_ramp's curriculum). The draws per episode (mass, thrust, lag, delay) take it
        at the episodes that start after; the noise and the pushes, drawn every step, at once."""
        self.strength = strength
        self.noise = self.whole_noise * strength
        self.turn = self.whole_turn * strength
        self.push_sigma = self.whole_push * strength

    def _uniform(self, low_high, shape, nominal=None):  # nominal: what the range shrinks toward (None: it does not)
        low, high = low_high
        if self.strength < 1 and nominal is not None:
            low, high = (nominal + self.strength * (x - nominal) for x in low_high)
        return low + (high - low) * torch.rand(shape, device=self.rpm.device, generator=self.generator)

    def reset(self, envs):  # envs [N] bool: the drones whose episode starts; no host sync
        cfg, N, mask = self.cfg, envs.shape[0], envs[:, None]
        mass = self._uniform(cfg.mass_scale, (N, 1), 1.0)
        thrust = self._uniform(cfg.thrust_scale, (N, 1), 1.0)
        tau = self._uniform(cfg.motor_lag_s, (N, 1), 0.0)
        low, high = cfg.action_delay
        delay = torch.randint(low, high + 1, (N,), device=self.rpm.device, generator=self.generator)
        if cfg.nominal_share > 0:  # these drones' episodes: the nominal drone's motors, mass and thrust
            nominal = torch.rand((N, 1), device=self.rpm.device, generator=self.generator) < cfg.nominal_share
            mass, thrust = mass.masked_fill(nominal, 1.0), thrust.masked_fill(nominal, 1.0)
            tau, delay = tau.masked_fill(nominal, 0.0), delay.masked_fill(nominal[:, 0], 0)
        self.mass_scale = torch.where(mask, mass, self.mass_scale)
        self.rpm_scale = torch.where(mask, (thrust / mass).sqrt(), self.rpm_scale)
        self.lag = torch.where(mask, -torch.expm1(-cfg.dt / tau.clamp(min=1e-9)), self.lag)  # tau 0: instant
        self.rpm.masked_fill_(mask, cfg.hover_rpm)  # a new episode starts hovering
        if self.strength < 1:
            delay = delay.mul(self.strength).round_().long()
        self.delay = torch.where(envs, delay, self.delay)
        self.actions.masked_fill_(envs[None, :, None], 0.0)  # what came before the start: hover
        self.push_left.masked_fill_(envs, 0)  # a new push at the next step

    def motors(self, actions):
        """actions [N, 4] this step -> the RPM the propellers turn at [N, 4]: each drone's action `delay` steps
        old, mapped to RPM, capped at the motors' full thrust, followed with the motors' lag, scaled for thrust and
        mass."""
        cfg = self.cfg
        if cfg.action_delay[1] > 0:
            self.steps_taken += 1
            ring = self.actions.shape[0]
            self.actions[self.steps_taken % ring] = actions
            actions = self.actions[(self.steps_taken - self.delay) % ring, self.arange]  # [N, 4]
        command = actions.mul(cfg.rpm_gain * cfg.hover_rpm).add_(cfg.hover_rpm).clamp_(max=self.max_rpm)
        if cfg.motor_lag_s[1] > 0:
            command = self.rpm.add_(self.lag * (command - self.rpm))
        return command * self.rpm_scale

    def push(self, drone):
        """The external wrench of this step, a new one drawn where the last one ran out."""
        cfg, N = self.cfg, self.rpm.shape[0]
        if not (cfg.push_force or cfg.push_torque):
            return
        self.push_left -= 1
        new = self.push_left <= 0
        draw = torch.randn(N, 2, 3, device=self.rpm.device, generator=self.generator).mul_(self.push_sigma)
        self.wrench = torch.where(new[:, None, None], draw / self.mass_scale[:, :, None], self.wrench)
        steps = self._uniform(cfg.push_interval_s, (N,)).div_(cfg.dt).round_().int()
        self.push_left = torch.where(new, steps, self.push_left)
        drone.apply_links_external_wrench(force=self.wrench[:, None, 0], torque=self.wrench[:, None, 1],
                                          links_idx_local=[0])

    def observe(self, obs):
        """obs [N, 17] as noisy sensors give it: Gaussian noise on position and velocities, and a small random
        rotation of the attitude, each at its sigma (scaled as the observation is), then clipped again."""
        if not any(self.cfg.obs_noise):
            return obs
        noise = torch.randn(obs.shape, device=obs.device, generator=self.generator)  # [N, 17]
        noisy = noise.mul(self.noise).add_(obs)
        turn = noise[:, 3:7].mul_(self.turn)  # (the quaternion slots' own draws: unused above)
        turn[:, 0] = 1.0
        quat = quat_mul(obs[:, 3:7], turn)
        noisy[:, 3:7] = quat / torch.linalg.vector_norm(quat, dim=1, keepdim=True)
        return noisy.clamp_(-1.0, 1.0)


class CrazyflieEnv(hover.HoverEnv):
    """HoverEnv, with the Perturbations of its config applied through the hooks; with none on (UNPERTURBED), it
    flies the same bits as HoverEnv, and nothing of this runs."""

    def __init__(self, num_envs, device="cpu", seed=0, cfg=None, **kwargs):
        super().__init__(num_envs, device, seed, cfg or CrazyflieConfig(), **kwargs)
        # The gaps' own draws: a flight under any of them meets the targets it meets without (eval.py's table).
        self.perturb_generator = torch.Generator(device=self.device).manual_seed(seed + (1 << 32))
        self._weight_n = float(self.drone.get_mass().reshape(-1)[0]) * 9.81  # mass * g [N] (read once)
        self.perturb = None  # built by reset() from the config, when any perturbation is on
        self._perturb_strength = 1.0  # whole, but in training under cfg.perturb_ramp (set_iteration)

    def perturb_with(self, settings: dict):
        """Fly the next episodes (from the next reset) with these perturbation settings (eval.py's conditions).
        Any other setting is refused: the rest of the task was built into the scene and tensors at __init__."""
        other = set(settings) - set(SETTINGS)
        if other:
            raise ValueError(f"only the perturbation settings change between flights, not {', '.join(sorted(other))}")
        self.cfg = dataclasses.replace(self.cfg, **settings)

    def set_iteration(self, iteration: int):
        super().set_iteration(iteration)
        self._perturb_strength = hover.ramp(iteration, self.cfg.perturb_ramp)
        if self.perturb is not None:
            self.perturb.set_strength(self._perturb_strength)

    def reset_perturbations(self):  # from the config, as they are (eval.py's flights may change it)
        self.perturb = Perturbations(self.cfg, self.num_envs, self.device, self.perturb_generator, self._weight_n,
                                     self._obs_scale, self._perturb_strength) if perturbed(self.cfg) else None

    def reset(self, random_episode_start: bool = False):
        self.reset_perturbations()
        return super().reset(random_episode_start)

    def _motor_rpm(self, a):
        return super()._motor_rpm(a) if self.perturb is None else self.perturb.motors(a)

    def _push(self):
        if self.perturb is not None:
            self.perturb.push(self.drone)

    def _sense(self, obs):
        return obs if self.perturb is None else self.perturb.observe(obs)

    def _start_episodes(self, envs):
        if self.perturb is not None:
            self.perturb.reset(envs)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.perturb is not None:
            state["perturb"] = {k: getattr(self.perturb, k) for k in Perturbations.STATE}
        return state

    def load_state_dict(self, state: dict):
        """The drones fly on with the gaps their episodes drew. Settings changed on resume reach the episodes that
        start after; a ring of delayed actions of another length starts anew (hover), its delays with it."""
        super().load_state_dict(state)
        self.reset_perturbations()
        saved = state.get("perturb", {}) if self.perturb is not None else {}
        if saved and saved["actions"].shape != self.perturb.actions.shape:
            saved = {k: v for k, v in saved.items() if k not in ("actions", "delay", "steps_taken")}
        for k, v in saved.items():
            setattr(self.perturb, k, v.to(self.device) if torch.is_tensor(v) else v)


# The task contract's names, for train.py, eval.py and export.py.
Config, Env = CrazyflieConfig, CrazyflieEnv


def describe(cfg: CrazyflieConfig) -> dict:
    """export.py's policy.json: the hover task's description, the motors as cf2x.urdf places them (x ahead, y left),
    the microcontroller and what the policy was trained against."""
    described = hover.describe(cfg)
    described["action"]["motors"] = [{"index": i, "position_m": [x, y], "spin": spin} for i, (x, y, spin) in enumerate(
        [(0.028, -0.028, "CCW"), (-0.028, -0.028, "CW"), (-0.028, 0.028, "CCW"), (0.028, 0.028, "CW")])]
    gaps = {k: getattr(cfg, k) for k in SETTINGS}
    return {**described, "microcontroller": {"name": "STM32F405 (Crazyflie 2.1)", "flash_bytes": 1024 * 1024,
                                             "ram_bytes": 192 * 1024, "mhz": 168},
            "trained_against": gaps if perturbed(cfg) else "none: the simulator's nominal drone"}
