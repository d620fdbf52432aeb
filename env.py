"""Crazyflie hover task on the Genesis simulator: N drones stepped as one batch (the rollout stage).

    policy.act(obs) -> [env.step(actions): one 100 Hz control step of all N drones] -> storage -> PPO -> Adam

    step(actions [N, 4] float32 in [-1, 1]) -> obs [N, 17], reward [N], done [N] bool, info (see step)
    obs = clip((target - pos) / 3) (3) | quaternion w,x,y,z (4) | clip(body linear velocity / 3) (3)
          | clip(body angular velocity / 25 rad/s) (3) | actions applied this step (4)

Finished drones are reset inside `step`, so the loop never stops. The task is Genesis's
examples/drone/hover_env.py (same scene, action map, rewards and terminations); the deliberate differences
(the angular velocity's scale among them) are noted where they occur. `step` reads nothing back to the host
(but for one optional check of the actions): resets take a boolean env mask. This file and
examples/go2/go2_env.py keep the task contract of README.md ("Your own robot"); genesis is imported when the
first env is built (init_genesis), so that train.py can read and check a task's settings without it.
"""
import math
import os
from dataclasses import dataclass, field

import torch


def setting(default, help):
    """A task setting: its default, and the help text `train.py --help` shows for its flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class HoverConfig:
    """Every constant of the task. The defaults are Genesis's hover example's, but the angular velocity's scale;
    each field is a flag of train.py (--reward-crash, ...)."""

    dt: float = setting(0.01, "control and physics step [s] (100 Hz), split into substeps solver substeps")
    substeps: int = setting(2, "solver substeps per step")
    episode_length_s: float = setting(15.0, "time-out (truncation) after this long [s]: 1500 steps")
    hover_rpm: float = setting(14468.429183500699, "propeller RPM at which thrust balances the Crazyflie's weight")
    rpm_gain: float = setting(0.8, "rpm = (1 + rpm_gain * action) * hover_rpm, action clipped to [-1, 1]")
    init_pos: tuple = setting((0.0, 0.0, 1.0), "every episode starts hovering here [m], level and at rest")
    init_quat: tuple = setting((1.0, 0.0, 0.0, 0.0), "the start attitude, w x y z")
    target_low: tuple = setting((-1.0, -1.0, 1.0), "targets are uniform in [low, high] per axis [m]")
    target_high: tuple = setting((1.0, 1.0, 1.0), "(z fixed at 1 m by default)")
    at_target_dist: float = setting(0.1, "closer than this to the target [m]: count it and draw a new one")
    crash_rel_pos: tuple = setting((3.0, 3.0, 2.0), "a crash: |target - position| above this on any axis [m] ...")
    crash_min_height: float = setting(0.1, "... or the drone lower than this [m]")
    obs_rel_pos_scale: float = setting(1 / 3.0, "observed target offset: times this, clipped to [-1, 1]")
    obs_lin_vel_scale: float = setting(1 / 3.0, "observed linear velocity: times this, clipped")
    # The example's 1/pi clips the rates trained drones fly (EXPERIMENTS.md, "Angular velocity seen up to 25 rad/s").
    obs_ang_vel_scale: float = setting(1 / 25.0, "observed angular velocity: times this, clipped (example: 1/pi)")
    # Reward weights, one per term of `step` (TERMS; each term is also multiplied by dt, as in the example).
    reward_target: float = setting(10.0, "progress toward the target: |p_prev - target|^2 - |p - target|^2 [m^2]")
    progress_per_metre: bool = setting(False, "progress in metres instead: |p_prev - target| - |p - target| [m], "
                                              "the same pay per m/s near the target as far from it")
    progress_speed_cap: float = setting(0.0, "[m/s] progress pays at most as for flying this fast at the target "
                                             "(0: no cap)")
    reward_smooth: float = setting(-1e-4, "change of action: |a - a_prev|^2")
    reward_yaw: float = setting(0.01, "heading held: exp(yaw_lambda * |yaw|), yaw in radians")
    yaw_lambda: float = setting(-10.0, "see reward_yaw")
    reward_angular: float = setting(-2e-4 / 3.14159, "spin: |body angular velocity| [rad/s] (the example's -2e-4 "
                                                     "per pi rad/s)")
    reward_crash: float = setting(-10.0, "1 on the step the drone crashes")
    crash_multiple: float = setting(1.0, "a curriculum: the crash penalty grows linearly to this multiple of "
                                         "reward_crash over crash_ramp, held after (1: the example's fixed one)")
    crash_ramp: tuple = setting((100, 200), "the training iterations FROM TO of that growth")
    # What the simulator leaves out, off by default: nothing of it runs then. A (low, high) range is drawn per drone
    # at every episode's start (README, "From simulation to a real Crazyflie"; Perturbations below).
    motor_lag_s: tuple = setting((0.0, 0.0), "time constant of each propeller's first-order RPM response [s]")
    action_delay: tuple = setting((0, 0), "control steps an action takes to reach the motors")
    mass_scale: tuple = setting((1.0, 1.0), "the drone's mass and inertia times this")
    thrust_scale: tuple = setting((1.0, 1.0), "the propellers' thrust and drag-torque coefficients times this")
    obs_noise: tuple = setting((0.0, 0.0, 0.0, 0.0), "Gaussian noise of the observed position [m], velocity [m/s], "
                                                     "attitude [deg] and angular velocity [rad/s]: sigmas")
    push_force: float = setting(0.0, "a random external force: sigma per axis, a fraction of the drone's weight")
    push_torque: float = setting(0.0, "a random external torque: sigma per axis [N m]")
    push_interval_s: tuple = setting((1.0, 2.0), "each push lasts an interval drawn in this range [s]")
    nominal_share: float = setting(0.0, "the share of episodes a drone flies with the nominal motors, mass and "
                                        "thrust (no lag, delay, mass or thrust error; the noise and pushes apply)")
    randomize: bool = setting(False, "train against all of them: every setting of RANDOMIZED (the ranges, the "
                                     "nominal share, the ramp, progress per metre) left at its default takes "
                                     "RANDOMIZED's")
    perturb_ramp: tuple = setting((0, 0), "a curriculum: in training, the ranges above grow from none (the nominal "
                                          "drone) to whole over the iterations FROM TO (eval.py flies them whole)")
    camera_pos: tuple = setting((3.5, 0.0, 2.5), "the viewer's and the video's camera [m]")
    camera_lookat: tuple = setting((0.0, 0.0, 0.5), "where it looks [m]")
    camera_fov: float = setting(30.0, "its field of view [deg]")

    def __post_init__(self):  # a bad setting: one line that says what to change (train.py prints it)
        for name, value in RANDOMIZED.items() if self.randomize else ():
            if getattr(self, name) == HoverConfig.__dataclass_fields__[name].default:
                setattr(self, name, value)
        ranges = {k: getattr(self, k) for k in ("motor_lag_s", "action_delay", "mass_scale", "thrust_scale",
                                                "push_interval_s")}
        for name, (low, high) in ranges.items():
            if not 0 <= low <= high or (name.endswith("scale") and low == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a range LOW HIGH with 0 <= LOW <= HIGH"
                                 f"{' and LOW > 0' if name.endswith('scale') else ''}, got {low} {high}")
        if len(self.obs_noise) != 4 or min(self.obs_noise) < 0 or min(self.push_force, self.push_torque) < 0:
            raise ValueError("--obs-noise takes 4 sigmas >= 0, --push-force and --push-torque a sigma >= 0")
        if not 0 <= self.nominal_share < 1:
            raise ValueError(f"--nominal-share must be within [0, 1), got {self.nominal_share}")
        if self.progress_speed_cap < 0:
            raise ValueError(f"--progress-speed-cap must be >= 0 (0: no cap), got {self.progress_speed_cap}")
        ramp = self.crash_ramp
        if not (self.crash_multiple > 0 and len(ramp) == 2 and 0 <= ramp[0] <= ramp[1]):
            raise ValueError(f"--crash-multiple must be > 0 and --crash-ramp two iterations FROM TO with 0 <= FROM <= "
                             f"TO, got {self.crash_multiple} and {' '.join(map(str, self.crash_ramp))}")
        ramp = self.perturb_ramp
        if not (len(ramp) == 2 and 0 <= ramp[0] <= ramp[1]):
            raise ValueError(f"--perturb-ramp takes two iterations FROM TO with 0 <= FROM <= TO, got "
                             f"{' '.join(map(str, ramp))}")


# train.py's settings for this task. TRAIN: the Genesis example's (hover_train.py: 8192 drones x 100 steps, 301
# iterations, actor and critic 128-128 tanh). CPU_PRESET, on top of it without CUDA: on 2 CPU cores, the best of
# everything measured (EXPERIMENTS.md, "Every default and why"). Two workers of 1024 drones x 50 steps (102,400
# samples, an eighth of the GPU batch), each simulator on a core of its own; the normalizer, an action std held at
# 0.3 (start and floor): with a small batch, it learned faster and crashed less on most seeds than a lower floor;
# progress paid up to 2.5 m/s, so that the drones stop racing at the edge of control, where they crashed; and a
# crash penalty grown tenfold over iterations 100-200, once the drones chase targets (from the start, it made them
# timid).
TRAIN = dict(num_envs=8192, num_steps=100, max_iterations=301, hidden=(128, 128), activation="tanh",
             learning_rate=3e-4, entropy_coef=0.004)
CPU_PRESET = dict(num_envs=1024, num_steps=50, workers=2, threads_update=1, normalize_obs=True, init_std=0.3,
                  min_std=0.3, progress_speed_cap=2.5, crash_multiple=10.0, max_iterations=250)

# The gaps between this simulator and a real Crazyflie that eval.py --perturbations flies a policy through, one at a
# time and all at once ("realistic"). The reference that flew a real Crazyflie from simulation (RLtools, "Learning
# to Fly in Seconds") trained against a motor time constant of 0.15 s, observation noise and pushes of about 5 % of
# the weight. RANDOMIZED: what --randomize trains with, the ranges it draws per drone per episode, grown from the
# nominal drone over iterations 50-150, and progress paid per metre. By measurement, the motors' ranges stop short
# of the worst conditions flown (a lag up to 0.08 s, not 0.15; a delay up to 1 step, not 2), and grow: against them
# all whole from the first iteration, or grown to a 0.15 s lag, a policy learned to fly slowly or not at all; paid
# per metre (20 per m: the squared distances' pay at 1 m), the drones stopped dawdling near the targets and the
# realistic drone was flown faster; the lag drawn from 0.015 s, not 0.03, the nominal drone was flown faster, and
# from 0 the realistic one crashed; a tenth of the episodes flown with the nominal motors, mass and thrust, a
# policy no longer flew the nominal drone slower than a lagging one (a fifth: the realistic one crashed)
# (EXPERIMENTS.md, "What the simulator leaves out: the drone under perturbations").
NOISE = (0.01, 0.05, 1.0, 0.1)  # sigmas: position [m], linear velocity [m/s], attitude [deg], angular velocity [rad/s]
PUSH = dict(push_force=0.05, push_torque=5e-4)  # 5 % of the weight per axis; torque: that force at 4 cm, an arm's
UNPERTURBED = dict(motor_lag_s=(0.0, 0.0), action_delay=(0, 0), mass_scale=(1.0, 1.0), thrust_scale=(1.0, 1.0),
                   obs_noise=(0.0, 0.0, 0.0, 0.0), push_force=0.0, push_torque=0.0, nominal_share=0.0,
                   randomize=False)
PERTURBATIONS = {name: {**UNPERTURBED, **change} for name, change in {
    "none": {},
    "motor lag 0.03 s": dict(motor_lag_s=(0.03, 0.03)),
    "motor lag 0.08 s": dict(motor_lag_s=(0.08, 0.08)),
    "motor lag 0.15 s": dict(motor_lag_s=(0.15, 0.15)),
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
RANDOMIZED = dict(motor_lag_s=(0.015, 0.08), action_delay=(0, 1), mass_scale=(0.9, 1.2), thrust_scale=(0.85, 1.15),
                  obs_noise=NOISE, **PUSH, nominal_share=0.1, perturb_ramp=(50, 150), progress_per_metre=True,
                  reward_target=20.0)


def init_genesis(device: torch.device):
    """Genesis runs one backend per process: start it on `device`, or check that it already runs there. Returns
    the genesis module; every task builds its scene after this call.

    Genesis's performance mode compiles its kernels for the number of envs: they step faster (1.7x for 1024 drones
    on a CPU: EXPERIMENTS.md, "Scene builds in the tests"), but each new number of envs compiles anew, and even a
    cached scene takes about a minute to build on a CPU. GS_PERFORMANCE_MODE=0 in the environment turns it off:
    kernels for any size, a cached scene built in seconds. The tests run that way."""
    import genesis as gs
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:K]', got '{device}'")
    if not gs._initialized:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device.index)  # Genesis runs on the current CUDA device
        # No `seed=`: gs.init would reseed the global torch/numpy/random RNGs under the trainer's feet. "error":
        # the kernel compiler's and the asset loader's warnings do not concern this task.
        gs.init(backend=gs.cpu if device.type == "cpu" else gs.gpu, precision="32", logging_level="error",
                performance_mode=os.environ.get("GS_PERFORMANCE_MODE", "1") != "0")
    if device.type != gs.device.type or device.index not in (None, gs.device.index):
        raise RuntimeError(f"Genesis is already initialised on '{gs.device}' in this process; "
                           f"cannot create an env on '{device}' (one backend per process)")
    return gs


def validate_actions(env, actions):
    """What every task's step() checks first: actions is a float32 [num_envs, num_actions] tensor on the env's device,
    and, if env.check_actions, finite (the step's one host sync: train.py turns it off)."""
    expected = (env.num_envs, env.num_actions)
    if not (isinstance(actions, torch.Tensor) and actions.shape == expected and actions.dtype == torch.float32
            and actions.device == env.device):
        got = (f"{tuple(actions.shape)} {actions.dtype} on {actions.device}" if isinstance(actions, torch.Tensor)
               else type(actions).__name__)
        raise ValueError(f"actions must be a float32 tensor of shape {expected} on {env.device}, got {got}")
    if env.check_actions and not torch.isfinite(actions).all():
        raise ValueError("actions contain NaN or inf")


def quat_rotate_inverse(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """World vectors v [N, 3] into the body frame of unit quaternions q [N, 4] (w, x, y, z): R(q)^T v."""
    w, u = q[:, :1], q[:, 1:]  # [N, 1], [N, 3]
    t = torch.linalg.cross(u, v).mul_(2.0)  # rotating by the conjugate (w, -u): v - w t + u x t
    return v - w * t + torch.linalg.cross(u, t)


def quat_yaw(q: torch.Tensor) -> torch.Tensor:
    """Yaw [N] in (-pi, pi] of quaternions q [N, 4] (w, x, y, z): rotation about world z in z-y-x Euler angles."""
    w, x, y, z = q.unbind(1)
    # atan2(2(wz + xy), 1 - 2(y^2 + z^2)), both arguments halved (same angle, two ops fewer)
    return torch.atan2(torch.addcmul(w * z, x, y), 0.5 - torch.addcmul(y * y, z, z))


def progress(prev_rel_pos: torch.Tensor, dist2: torch.Tensor, speed_cap: float, dt: float,
             per_metre: bool = False) -> torch.Tensor:
    """The progress term [N]: |p_prev - target|^2 - |p - target|^2, from prev_rel_pos [N, 3] and dist2 [N], or
    per_metre, |p_prev - target| - |p - target|.

    Closing in at speed v pays about 2 |p_prev - target| v dt (per metre: v dt), so a cap on v caps the term. With
    a cap, flying at the target faster than it earns nothing more, so racing at the edge of control does not pay
    (the CPU preset's cap, and what it did to crashes: EXPERIMENTS.md, "Progress paid only up to 2.5 m/s toward the
    target"). Squared distances pay little for the last centimetres before a target; metres pay them as the first."""
    prev_dist2 = prev_rel_pos.square().sum(1)
    if per_metre:
        closing = prev_dist2.sqrt() - dist2.sqrt()
        return closing.clamp(max=speed_cap * dt) if speed_cap else closing
    if not speed_cap:
        return prev_dist2 - dist2
    return torch.minimum(prev_dist2 - dist2, prev_dist2.sqrt() * (2 * speed_cap * dt))


def ramp(iteration: int, from_to: tuple) -> float:
    """A curriculum's progress in a training iteration: 0 up to FROM, linear to 1 at TO, 1 after."""
    start, end = from_to
    if iteration >= end:
        return 1.0
    return 0.0 if iteration <= start else (iteration - start) / (end - start)


def crash_scale(iteration: int, cfg: HoverConfig) -> float:
    """The crash penalty's multiple in a training iteration: 1, then linear to crash_multiple over crash_ramp, then
    held (the CPU preset's curriculum: EXPERIMENTS.md, "A crash penalty grown tenfold over iterations 100-200")."""
    return 1.0 + (cfg.crash_multiple - 1.0) * ramp(iteration, cfg.crash_ramp)


def quat_mul(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hamilton products p q [N, 4] of quaternions (w, x, y, z) [N, 4]: the rotation q, then p."""
    pw, pv, qw, qv = p[:, :1], p[:, 1:], q[:, :1], q[:, 1:]
    return torch.cat((pw * qw - (pv * qv).sum(1, keepdim=True), pw * qv + qw * pv + torch.linalg.cross(pv, qv)), 1)


def perturbed(cfg) -> bool:
    """Is any of what the simulator leaves out switched on in cfg (a HoverConfig)?"""
    return (cfg.motor_lag_s[1] > 0 or cfg.action_delay[1] > 0 or tuple(cfg.mass_scale) != (1.0, 1.0)
            or tuple(cfg.thrust_scale) != (1.0, 1.0) or any(cfg.obs_noise) or cfg.push_force > 0 or cfg.push_torque > 0)


class Perturbations:
    """What the simulator leaves out, for N drones: HoverConfig's motor_lag_s ... push_interval_s. reset() draws
    each drone's own at its episode's start; motors(), push() and observe() apply them every step. HoverEnv builds
    one only when a perturbation is on, so that nothing of this runs otherwise.

    A drone m times heavier, inertia included (as Genesis's set_mass scales it), flies as the nominal one with every
    propeller force and torque, and every push, divided by m: mass_scale is applied that way, through the RPM (thrust
    grows with RPM^2). Genesis's own per-env masses need per-env link storage (RigidOptions.batch_links_info), which
    recompiles and slows down every kernel."""

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
        self.rpm = torch.full((N, 4), cfg.hover_rpm, device=device)  # the propellers' RPM now
        self.delay = torch.zeros(N, dtype=torch.long, device=device)  # in control steps
        self.actions = torch.zeros(cfg.action_delay[1] + 1, N, 4, device=device)  # the last few actions, a ring
        self.step = 0
        self.wrench = torch.zeros(N, 2, 3, device=device)  # the push now: force [N], torque [N m], world frame
        self.push_left = torch.zeros(N, dtype=torch.int32, device=device)  # steps until the next one is drawn
        self.arange = torch.arange(N, device=device)

    def set_strength(self, strength):
        """strength in [0, 1] (a Python float: no sync): every range shrunk toward the nominal drone, 0 for none,
        1 for the ranges of cfg (HoverConfig.perturb_ramp's curriculum). It holds for the episodes that start after."""
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
        old, mapped to RPM, followed with the motors' lag, scaled for thrust and mass."""
        cfg = self.cfg
        if cfg.action_delay[1] > 0:
            self.step += 1
            ring = self.actions.shape[0]
            self.actions[self.step % ring] = actions
            actions = self.actions[(self.step - self.delay) % ring, self.arange]  # [N, 4]
        command = actions.mul(cfg.rpm_gain * cfg.hover_rpm).add_(cfg.hover_rpm)
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


TERMS = ("target", "smooth", "yaw", "angular", "crash")  # the reward terms, one weight each in HoverConfig


class HoverEnv:
    num_obs = 17
    num_actions = 4
    unit = "drone"  # train.py and eval.py report the `rates` (per-episode counts) per drone-minute
    rates = ("targets", "crashes")

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0, cfg: HoverConfig = HoverConfig(),
                 show_viewer: bool = False, record_camera: bool = False, check_actions: bool = True):
        gs = init_genesis(torch.device(device))
        self.num_envs, self.cfg, self.dt, self.device = num_envs, cfg, cfg.dt, gs.device
        self.max_episode_length = round(cfg.episode_length_s / cfg.dt)  # 1500 (ceil would give 1501 in floats)
        self.check_actions = check_actions  # NaN/inf in the actions: one bool read back, the only sync in step
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # targets/episode starts only

        visual = show_viewer or record_camera
        self.scene = gs.Scene(
            sim_options=gs.options.SimOptions(dt=cfg.dt, substeps=cfg.substeps),  # no RigidOptions(dt=): it would clash
            rigid_options=gs.options.RigidOptions(constraint_solver=gs.constraint_solver.Newton,
                                                  enable_collision=True, enable_joint_limit=True),
            viewer_options=gs.options.ViewerOptions(refresh_rate=60, camera_pos=cfg.camera_pos,
                                                    camera_lookat=cfg.camera_lookat, camera_fov=cfg.camera_fov),
            vis_options=gs.options.VisOptions(rendered_envs_idx=[0]),  # draw env 0 only: N drones would overlap
            show_viewer=show_viewer)
        self.scene.add_entity(gs.morphs.Plane())
        self.drone = self.scene.add_entity(gs.morphs.Drone(file="urdf/drones/cf2x.urdf"))
        # Target markers cost physics time, so they exist only when someone looks.
        self.target_marker = self.scene.add_entity(
            gs.morphs.Mesh(file="meshes/sphere.obj", scale=0.05, fixed=True, collision=False),
            surface=gs.surfaces.Rough(diffuse_texture=gs.textures.ColorTexture(color=(1.0, 0.5, 0.5))),
        ) if visual else None
        self.camera = self.scene.add_camera(res=(640, 480), pos=cfg.camera_pos, lookat=cfg.camera_lookat,
                                            fov=cfg.camera_fov, GUI=False) if record_camera else None
        self.scene.build(n_envs=num_envs)

        N, dev = num_envs, self.device
        self._init_qpos = torch.tensor((*cfg.init_pos, *cfg.init_quat), device=dev).expand(N, 7).contiguous()
        self._target_low = torch.tensor(cfg.target_low, device=dev)  # [3]
        self._target_span = torch.tensor(cfg.target_high, device=dev) - self._target_low  # [3]
        self._crash_rel_pos = torch.tensor(cfg.crash_rel_pos, device=dev)  # [3]
        self._obs_scale = torch.tensor([cfg.obs_rel_pos_scale] * 3 + [1.0] * 4 + [cfg.obs_lin_vel_scale] * 3
                                       + [cfg.obs_ang_vel_scale] * 3 + [1.0] * 4, device=dev)  # [17]
        self._ones = torch.ones(N, 1, device=dev)
        # Observation of the start state with the target slot still to fill: level, at rest, no previous action.
        self._start_obs = torch.zeros(self.num_obs, device=dev)
        self._start_obs[3:7] = torch.tensor(cfg.init_quat, device=dev)

        self.base_pos = self._init_qpos[:, :3].clone()  # [N, 3] current drone positions
        self.target_pos = torch.zeros(N, 3, device=dev)  # [N, 3] current targets
        self.last_actions = torch.zeros(N, 4, device=dev)  # [N, 4] actions applied at the previous step
        self.episode_length = torch.zeros(N, dtype=torch.int32, device=dev)  # [N] steps into the episode
        self._sums = torch.zeros((), device=dev)  # running per-episode sums, [N, terms + 2] after a step
        # Each reward term's weight times dt, in TERMS's order: one multiply weighs them all. set_iteration() grows
        # the crash penalty (crash_scale); reward_crash is its weight now.
        self._weights = torch.tensor([cfg.dt * w for w in (cfg.reward_target, cfg.reward_smooth, cfg.reward_yaw,
                                                           cfg.reward_angular, cfg.reward_crash)], device=dev)
        self.reward_crash = cfg.reward_crash
        self._weight = float(self.drone.get_mass().reshape(-1)[0]) * 9.81  # mass * g [N] (one read, at the build)
        self.perturb = None  # what the simulator leaves out, when cfg switches any of it on: reset() builds it
        self._perturb_strength = 1.0  # whole, but in training under cfg.perturb_ramp (set_iteration)

    # ------------------------------------------------------------------------------------------------------------
    def _draw_targets(self) -> torch.Tensor:
        u = torch.rand(self.num_envs, 3, device=self.device, generator=self.generator)  # [N, 3]
        return torch.addcmul(self._target_low, self._target_span, u)

    def _observe(self, rel_pos, quat, lin_vel_b, ang_vel_b, actions) -> torch.Tensor:
        obs = torch.cat((rel_pos, quat, lin_vel_b, ang_vel_b, actions), dim=1)  # [N, 17]
        return obs.mul_(self._obs_scale).clamp_(-1.0, 1.0)  # quat and actions already lie in [-1, 1]

    def _observe_target(self, obs: torch.Tensor):
        """Rewrite the target slot of obs [N, 17] for the current targets and positions."""
        obs[:, :3] = (self.target_pos - self.base_pos).mul_(self.cfg.obs_rel_pos_scale).clamp_(-1.0, 1.0)

    def set_iteration(self, iteration: int):
        """The task contract's curriculum hook, called by train.py before each training iteration (1, 2, ...) and
        before the first reset (which draws the first episodes' perturbations)."""
        self.reward_crash = self.cfg.reward_crash * crash_scale(iteration, self.cfg)
        self._weights[-1] = self.cfg.dt * self.reward_crash  # (a host-to-device copy, no sync)
        self._perturb_strength = ramp(iteration, self.cfg.perturb_ramp)
        if self.perturb is not None:
            self.perturb.set_strength(self._perturb_strength)

    def _show_targets(self):
        if self.target_marker is not None:
            self.target_marker.set_pos(self.target_pos, zero_velocity=False)

    def reset(self, random_episode_start: bool = False) -> torch.Tensor:
        """Reset all envs; returns obs [N, 17]. random_episode_start: episode counters drawn in [0, 1500), so
        that the first time-outs spread out."""
        N, dev = self.num_envs, self.device
        self.drone.set_qpos(self._init_qpos, zero_velocity=True)
        self.perturb = Perturbations(self.cfg, N, dev, self.generator, self._weight, self._obs_scale,
                                     self._perturb_strength) \
            if perturbed(self.cfg) else None  # (the config's own: eval.py changes it between flights)
        if self.perturb is not None:
            self.perturb.reset(torch.ones(N, dtype=torch.bool, device=dev))
        self.base_pos = self._init_qpos[:, :3].clone()
        self.target_pos = self._draw_targets()
        self.last_actions.zero_()
        self._sums = torch.zeros((), device=dev)
        self.episode_length.zero_()
        if random_episode_start:
            self.episode_length = torch.randint(0, self.max_episode_length, (N,), dtype=torch.int32, device=dev,
                                                generator=self.generator)
        self._show_targets()
        obs = self._start_obs.expand(N, self.num_obs).clone()
        self._observe_target(obs)
        return obs if self.perturb is None else self.perturb.observe(obs)

    def step(self, actions: torch.Tensor):
        """Advance all envs by dt; reset the finished ones. Returns obs [N, 17], reward [N], done [N] bool, info:
        time_outs [N] bool   truncated at max_episode_length (the trainer bootstraps these from final_obs)
        final_obs [N, 17]    observation before the reset (equals obs where not done)
        nonfinite [N] bool   physics went NaN/inf: ends the episode, not as a crash, with zero reward
        episode              [N] sums over the episode: return, length (steps), targets (reached), crashes (0 or
                             1), reward_<term>. Where done, the finished episode's; elsewhere, the running ones."""
        validate_actions(self, actions)
        cfg = self.cfg
        a = actions.clamp(-1.0, 1.0)  # [N, 4]
        if self.perturb is None:
            self.drone.set_propellers_rpm(a.mul(cfg.rpm_gain * cfg.hover_rpm).add_(cfg.hover_rpm))
        else:  # the motors' delay and lag, the drone's mass and thrust; a push
            self.drone.set_propellers_rpm(self.perturb.motors(a))
            self.perturb.push(self.drone)
        self.scene.step()

        # Free-joint state: qpos = world position + quaternion, dof velocity = world linear + *body* angular velocity.
        qpos, dof_vel = self.drone.get_qpos(), self.drone.get_dofs_velocity()  # [N, 7], [N, 6] (fresh copies)
        # A blown-up env must not spread NaN into obs and reward: zero its state here, reset it below. (The row sum
        # of finite, moderate numbers is finite, so the sums check the whole row; s - s is 0 but for NaN or inf:
        # two ops where ~isfinite(s) takes five.)
        row = qpos.sum(1) + dof_vel.sum(1)  # [N]
        nonfinite = (row - row) != 0
        qpos.masked_fill_(nonfinite[:, None], 0.0)
        dof_vel.masked_fill_(nonfinite[:, None], 0.0)
        pos, quat, ang_vel_b = qpos[:, :3], qpos[:, 3:], dof_vel[:, 3:]
        lin_vel_b = quat_rotate_inverse(quat, dof_vel[:, :3])  # [N, 3]
        self.episode_length += 1

        # Reward from the post-physics, pre-reset state, with this step's target for both ends of the progress term.
        # (The Genesis example computes it after resetting, which loses the last step of every finished episode.)
        rel_pos, prev_rel_pos = self.target_pos - pos, self.target_pos - self.base_pos  # [N, 3]
        dist2 = rel_pos.square().sum(1)  # [N]
        finite = ~nonfinite
        crashed = (rel_pos.abs() > self._crash_rel_pos).any(1) | (pos[:, 2] < cfg.crash_min_height)  # [N]
        crashed &= finite
        # The example also ends episodes on |roll| or |pitch| > 180 deg; Euler angles never exceed that: left out.
        at_target = (dist2 < cfg.at_target_dist ** 2) & finite  # [N]
        crashes = crashed.float()
        terms = torch.stack((  # [N, terms]: this step's reward terms (TERMS), then each times its weight and dt
            progress(prev_rel_pos, dist2, cfg.progress_speed_cap, cfg.dt, cfg.progress_per_metre),  # [m^2] or [m]
            (a - self.last_actions).square().sum(1),  # change of action
            torch.exp(cfg.yaw_lambda * quat_yaw(quat).abs()),  # heading held
            ang_vel_b.square().sum(1).sqrt(),  # spin [rad/s]
            crashes), 1)
        weighted = terms.mul_(self._weights).masked_fill_(nonfinite[:, None], 0.0)  # [N, terms]
        reward = weighted.sum(1)  # [N]

        terminated = crashed | nonfinite  # no bootstrapping past these
        time_outs = (self.episode_length >= self.max_episode_length) & ~terminated
        done = terminated | time_outs

        # Per-episode sums of the terms, the steps and the targets reached; finished rows are handed out as they
        # are and restart from zero in a fresh tensor.
        sums = self._sums + torch.cat((weighted, self._ones, at_target.float()[:, None]), 1)  # [N, terms + 2]
        self._sums = sums.masked_fill(done[:, None], 0.0)
        episode = {f"reward_{name}": sums[:, i] for i, name in enumerate(TERMS)}
        episode.update(length=sums[:, -2], targets=sums[:, -1], crashes=crashes, **{"return": sums[:, :-2].sum(1)})

        # Observation before any reset (bootstrapping target for time-outs). The action slot holds the action
        # applied in this step; the Genesis example stores the one before it (one step staler).
        new_targets = self._draw_targets()  # [N, 3] used by envs that reached their target or finished
        self.target_pos = torch.where(at_target[:, None], new_targets, self.target_pos)
        final_obs = self._observe(self.target_pos - pos, quat, lin_vel_b, ang_vel_b, a)  # [N, 17]

        # Reset finished envs without reading `done` back: Genesis setters take the boolean mask as it is.
        self.drone.set_qpos(self._init_qpos, envs_idx=done, zero_velocity=True)
        reset = done[:, None]
        self.target_pos = torch.where(reset, new_targets, self.target_pos)
        self.base_pos = torch.where(reset, self._init_qpos[:, :3], pos)
        self.last_actions = a.masked_fill(reset, 0.0)
        self.episode_length.masked_fill_(done, 0)
        obs = torch.where(reset, self._start_obs, final_obs)
        self._observe_target(obs)
        self._show_targets()
        if self.perturb is not None:  # the next episode's draws; what the policy sees, through noisy sensors
            self.perturb.reset(done)
            obs = self.perturb.observe(obs)

        info = {"time_outs": time_outs, "final_obs": final_obs, "episode": episode, "nonfinite": nonfinite}
        return obs, reward, done, info

    # ------------------------------------------------------------------------------------------------- eval.py
    def measure(self) -> dict:
        """What eval.py records after every step: each drone's distance to its target [N], and drone 0's position
        and target [6] for the picture."""
        return {"distance_m": torch.linalg.vector_norm(self.target_pos - self.base_pos, dim=1),
                "drone_0": torch.cat((self.base_pos[0], self.target_pos[0]))}


# The task contract's names, for train.py, eval.py and export.py.
Config, Env = HoverConfig, HoverEnv


def flight_figures(trace: dict) -> dict:
    """eval.py's figures of a flight; trace holds measure()'s values over the steps, as numpy arrays."""
    import numpy as np
    return {"mean_distance_m": float(trace["distance_m"].mean()),
            "p95_distance_m": float(np.percentile(trace["distance_m"], 95))}


def plot_flight(trace: dict, dt: float, path: str, seconds: float = 10.0):
    """The picture of a flight: drone 0's position and targets, and the distance to target, over the first 10 s."""
    import matplotlib.pyplot as plt
    import numpy as np
    steps = min(len(trace["done"]), round(seconds / dt))  # longer is a tangle
    drone, distance, t = trace["drone_0"][:steps].copy(), trace["distance_m"][:steps], np.arange(steps) * dt
    drone[trace["done"][:steps, 0], :3] = np.nan  # a gap in the line where an episode ended
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i, (axis, color) in enumerate(zip("xyz", ("C0", "C1", "C2"))):
        top.plot(t, drone[:, i], color=color, label=f"drone {axis}")
        top.plot(t, drone[:, 3 + i], color=color, ls="--", lw=1, label=f"target {axis}")
    top.set(ylabel="position (m)", ylim=(-1.4, 1.9), title="drone 0 and its targets (a new one is drawn within 0.1 m)")
    top.legend(ncol=6, fontsize=8, loc="upper center")
    bottom.plot(t, distance[:, 0], label="drone 0")
    bottom.plot(t, np.median(distance, axis=1), color="gray", lw=1, label=f"median of {distance.shape[1]} drones")
    bottom.axhline(0.1, color="k", ls=":", lw=1, label="0.1 m: target reached")
    bottom.set(yscale="log", xlabel="time (s)", ylabel="distance to target (m)")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- export.py
STM32F405 = {"flash": 1024 * 1024, "ram": 192 * 1024, "mhz": 168}  # the Crazyflie 2.1's microcontroller


def describe(cfg: dict) -> dict:
    """export.py's policy.json: the observation layout and action map a deployment needs, from the task's settings
    (cfg: a checkpoint's HoverConfig, as a dict)."""
    rel, vel, ang = cfg["obs_rel_pos_scale"], cfg["obs_lin_vel_scale"], cfg["obs_ang_vel_scale"]
    observation = (
        [{"index": i, "name": f"target_{a} - {a}", "frame": "world", "unit": "m", "scale": rel, "clip": [-1, 1]}
         for i, a in enumerate("xyz")]
        + [{"index": 3 + i, "name": f"quaternion_{c}", "frame": "body to world, w first", "unit": "", "scale": 1}
           for i, c in enumerate("wxyz")]
        + [{"index": 7 + i, "name": f"velocity_{a}", "frame": "body", "unit": "m/s", "scale": vel, "clip": [-1, 1]}
           for i, a in enumerate("xyz")]
        + [{"index": 10 + i, "name": f"angular_velocity_{a}", "frame": "body", "unit": "rad/s", "scale": ang,
            "clip": [-1, 1]} for i, a in enumerate("xyz")]
        + [{"index": 13 + i, "name": f"previous_action_{i}", "frame": "", "unit": "", "scale": 1, "clip": [-1, 1]}
           for i in range(4)])
    motors = [{"index": i, "position_m": [x, y], "spin": spin}  # cf2x.urdf as Genesis loads it; x forward, y left
              for i, (x, y, spin) in enumerate([(0.028, -0.028, "CW"), (-0.028, -0.028, "CCW"),
                                                (-0.028, 0.028, "CW"), (0.028, 0.028, "CCW")])]
    gaps = {k: cfg[k] for k in UNPERTURBED if k != "randomize"}
    trained = gaps if perturbed(HoverConfig(**cfg)) else "none: the simulator's nominal drone"
    return {"control_rate_hz": round(1 / cfg["dt"]), "observation": observation, "trained_against": trained,
            "observation_note": "each value is the physical quantity times scale, then clipped; the policy's "
                                "normalizer is inside every artifact. previous_action is the last action "
                                "output (clipped), zeros at the start of a flight.",
            "action": {"size": 4, "range": [-1.0, 1.0], "rpm": "hover_rpm * (1 + rpm_gain * action[i]) for propeller i",
                       "hover_rpm": cfg["hover_rpm"], "rpm_gain": cfg["rpm_gain"], "motors": motors},
            "microcontroller": {"name": "STM32F405 (Crazyflie 2.1)", "flash_bytes": STM32F405["flash"],
                                "ram_bytes": STM32F405["ram"], "mhz": STM32F405["mhz"]}}
