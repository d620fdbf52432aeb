"""The drone-hover task on Genesis: N Crazyflies stepped as one batch (the rollout stage).

    policy.act(obs) -> [env.step(actions): one 100 Hz control step of all N drones] -> storage -> PPO -> Adam

    step(actions [N, 4] float32 in [-1, 1]) -> obs [N, 17], reward [N], done [N] bool, info (see step)
    obs = clip((target - pos) / 3) (3) | quaternion w,x,y,z (4) | clip(body linear velocity / 3) (3)
          | clip(body angular velocity / 25 rad/s) (3) | actions applied this step (4)

Genesis's examples/drone/hover_env.py, with its scene, action map, rewards and terminations; the differences are
noted where they occur. `step` resets finished drones through boolean masks: it never reads a tensor back to the
host. genesis is imported when the first env is built. A variant overrides HoverEnv's hooks (_motor_rpm, _push,
_sense, _start_episodes), as examples/crazyflie/ does.
"""
import os
from dataclasses import dataclass, field

import torch


def setting(default, help, **rule):  # a task setting: its default, its flag's help, the rule config.py checks
    return field(default=default, metadata={"help": help, **rule})


@dataclass
class HoverConfig:
    """The task's constants, each a flag of train.py; Genesis's hover example's but the angular velocity's scale."""

    dt: float = setting(0.01, "control and physics step [s] (100 Hz), split into substeps solver substeps", above=0)
    substeps: int = setting(2, "solver substeps per step", low=1)
    episode_length_s: float = setting(15.0, "time-out (truncation) after this long [s]: 1500 steps", above=0)
    hover_rpm: float = setting(14468.429183500699, "RPM at which the propellers' thrust holds the drone", above=0)
    rpm_gain: float = setting(0.8, "rpm = (1 + rpm_gain * action) * hover_rpm, action in [-1, 1]", above=0, high=1)
    init_pos: tuple = setting((0.0, 0.0, 1.0), "every episode starts hovering here [m], level and at rest")
    init_quat: tuple = setting((1.0, 0.0, 0.0, 0.0), "the start attitude, w x y z")
    target_low: tuple = setting((-1.0, -1.0, 1.0), "targets are uniform in [low, high] per axis [m]")
    target_high: tuple = setting((1.0, 1.0, 1.0), "(z fixed at 1 m by default)")
    at_target_dist: float = setting(0.1, "closer than this to the target [m]: count it and draw a new one", above=0)
    crash_rel_pos: tuple = setting((3.0, 3.0, 2.0), "a crash: |target - position| above this on an axis [m]", above=0)
    crash_min_height: float = setting(0.1, "... or the drone lower than this [m]", low=0)
    obs_rel_pos_scale: float = setting(1 / 3.0, "observed target offset: times this, clipped to [-1, 1]", above=0)
    obs_lin_vel_scale: float = setting(1 / 3.0, "observed linear velocity: times this, clipped", above=0)
    # The example's 1/pi clips the rates trained drones fly (EXPERIMENTS.md, "The observation and the actor's start").
    obs_ang_vel_scale: float = setting(1 / 25.0, "observed angular velocity: times this (example: 1/pi)", above=0)
    # Reward weights, one per term of `step` (TERMS; each term is also multiplied by dt, as in the example).
    reward_target: float = setting(10.0, "progress toward the target: |p_prev - target|^2 - |p - target|^2 [m^2]")
    progress_per_metre: bool = setting(False, "progress in metres: |p_prev - target| - |p - target| (per m/s: the same "
                                              "anywhere)")
    progress_speed_cap: float = setting(0.0, "[m/s] progress pays at most as for flying this fast (0: no cap)", low=0)
    reward_smooth: float = setting(-1e-4, "change of action: |a - a_prev|^2")
    reward_yaw: float = setting(0.01, "heading held: exp(yaw_lambda * |yaw|), yaw in radians")
    yaw_lambda: float = setting(-10.0, "see reward_yaw")
    reward_angular: float = setting(-2e-4 / 3.14159, "spin: |body angular velocity| [rad/s] (the example's -2e-4 / pi)")
    reward_crash: float = setting(-10.0, "1 on the step the drone crashes")
    crash_multiple: float = setting(1.0, "the crash penalty grows to this many reward_crash over crash_ramp", above=0)
    crash_ramp: tuple = setting((100, 200), "the training iterations FROM TO of that growth", low=0, ordered=True)
    camera_pos: tuple = setting((3.5, 0.0, 2.5), "the viewer's and the video's camera [m]")
    camera_lookat: tuple = setting((0.0, 0.0, 0.5), "where it looks [m]")
    camera_fov: float = setting(30.0, "its field of view [deg]", above=0, below=180)

    def conflicts(self):  # what is wrong between settings (config.py checks each field's own rule first)
        if not 1 <= self.episode_length_s / self.dt < 2 ** 31:
            yield f"--episode-length-s must be 1 to 2^31 steps (--dt {self.dt}), got {self.episode_length_s}"
        if any(lo > hi for lo, hi in zip(self.target_low, self.target_high)):
            yield f"--target-low must be <= --target-high on every axis, got {self.target_low} and {self.target_high}"
        if self.init_pos[2] <= self.crash_min_height:
            yield f"--init-pos must start above --crash-min-height {self.crash_min_height}, got {self.init_pos}"
        if not any(self.init_quat):
            yield "--init-quat must be a rotation (not all zeros)"


# train.py's settings: TRAIN, hover_train.py's; CPU_PRESET without CUDA, each for a reason in EXPERIMENTS.md.
TRAIN = dict(num_envs=8192, num_steps=100, max_iterations=301, hidden=(128, 128), activation="tanh",
             learning_rate=3e-4, entropy_coef=0.004)
CPU_PRESET = dict(num_envs=1024, num_steps=50, workers=2, threads_update=1, normalize_obs=True, init_std=0.3,
                  min_std=0.3, progress_speed_cap=2.0, crash_multiple=10.0, crash_ramp=(60, 160), hidden=(64, 64),
                  num_epochs=3, num_minibatches=16, lr_max=0.005, max_iterations=200)
TERMS = ("target", "smooth", "yaw", "angular", "crash")  # the reward terms, one weight each in HoverConfig


class HoverEnv:
    num_obs = 17
    num_actions = 4
    unit = "drone"  # train.py and eval.py report the `rates` (per-episode counts) per drone-minute
    rates = ("targets", "crashes")

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0, cfg: HoverConfig = None,
                 show_viewer: bool = False, record_camera: bool = False, check_actions: bool = True):
        cfg = cfg or HoverConfig()
        gs = init_genesis(torch.device(device))
        self.num_envs, self.cfg, self.dt, self.device = num_envs, cfg, cfg.dt, gs.device
        self.check_actions = check_actions  # NaN/inf in the actions: one bool read back (train.py: off)
        self.max_episode_length = round(cfg.episode_length_s / cfg.dt)  # 1500 (ceil would give 1501 in floats)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # targets and episode starts

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
        seen = show_viewer or record_camera  # (target markers cost physics time: only where someone looks)
        self.target_marker = self.scene.add_entity(
            gs.morphs.Mesh(file="meshes/sphere.obj", scale=0.05, fixed=True, collision=False),
            surface=gs.surfaces.Rough(diffuse_texture=gs.textures.ColorTexture(color=(1, 0.5, 0.5)))) if seen else None
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
        self._start_obs = torch.zeros(self.num_obs, device=dev)  # level, at rest, no action; its target slot: to fill
        self._start_obs[3:7] = torch.tensor(cfg.init_quat, device=dev)
        self.base_pos = self._init_qpos[:, :3].clone()  # [N, 3] current drone positions
        self.target_pos = torch.zeros(N, 3, device=dev)  # [N, 3] current targets
        self.last_actions = torch.zeros(N, 4, device=dev)  # [N, 4] actions applied at the previous step
        self.episode_length = torch.zeros(N, dtype=torch.int32, device=dev)  # [N] steps into the episode
        self._sums = torch.zeros((), device=dev)  # running per-episode sums, [N, terms + 2] after a step
        # Each reward term's weight times dt, in TERMS's order: one multiply weighs them all (set_iteration: the last)
        self._reward_weights = torch.tensor([cfg.dt * getattr(cfg, f"reward_{t}") for t in TERMS], device=dev)
        self.reward_crash = cfg.reward_crash

    # ------------------------------------------------------------------- hooks: what a variant of the drone changes
    def _motor_rpm(self, a):  # actions [N, 4] in [-1, 1] -> the propellers' RPM [N, 4]
        return a.mul(self.cfg.rpm_gain * self.cfg.hover_rpm).add_(self.cfg.hover_rpm)

    def _push(self):  # an external force on the drones before the physics step: none
        pass

    def _sense(self, obs):  # obs [N, 17] as the policy sees it: exact
        return obs

    def _start_episodes(self, envs):  # envs [N] bool: these drones start an episode (per-episode draws: none)
        pass

    def _show_targets(self):
        if self.target_marker is not None:
            self.target_marker.set_pos(self.target_pos, zero_velocity=False)

    def _draw_targets(self) -> torch.Tensor:  # [N, 3]
        u = torch.rand(self.num_envs, 3, device=self.device, generator=self.generator)
        return torch.addcmul(self._target_low, self._target_span, u)

    def _observe_target(self, obs: torch.Tensor):  # the target slot of obs [N, 17], rewritten
        obs[:, :3] = (self.target_pos - self.base_pos).mul_(self.cfg.obs_rel_pos_scale).clamp_(-1.0, 1.0)

    def set_iteration(self, iteration: int):
        """The curriculum (train.py calls it before each iteration 1, 2, ... and the first reset): the crash penalty."""
        self.reward_crash = self.cfg.reward_crash * (1.0 + (self.cfg.crash_multiple - 1.0)
                                                     * ramp(iteration, self.cfg.crash_ramp))
        self._reward_weights[-1] = self.cfg.dt * self.reward_crash  # (a host-to-device copy, no sync)

    def reset(self, random_episode_start: bool = False) -> torch.Tensor:
        """Reset all envs; returns obs [N, 17]. random_episode_start: counters in [0, 1500), time-outs spread out."""
        N, dev = self.num_envs, self.device
        self.drone.set_qpos(self._init_qpos, zero_velocity=True)
        self._start_episodes(torch.ones(N, dtype=torch.bool, device=dev))
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
        return self._sense(obs)

    def step(self, actions: torch.Tensor):
        """Advance all envs by dt; reset the finished ones. Returns obs [N, 17], reward [N], done [N] bool, info:
        time_outs [N] bool   truncated at max_episode_length (the trainer bootstraps these from final_obs)
        final_obs [N, 17]    observation before the reset (equals obs where not done)
        nonfinite [N] bool   physics went NaN/inf: ends the episode, not as a crash, with zero reward
        episode              [N] per-episode sums: return, length, targets, crashes, reward_<term> (whole where done)"""
        validate_actions(self, actions)
        cfg = self.cfg
        a = actions.clamp(-1.0, 1.0)  # [N, 4]
        self.drone.set_propellers_rpm(self._motor_rpm(a))
        self._push()
        self.scene.step()

        # Free-joint state: qpos = world position + quaternion, dof velocity = world linear + *body* angular velocity.
        qpos, dof_vel = self.drone.get_qpos(), self.drone.get_dofs_velocity()  # [N, 7], [N, 6] (fresh copies)
        # A blown-up env must not spread NaN: zero its state, reset it below (s - s != 0: 2 ops where ~isfinite takes 5)
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
        weighted = terms.mul_(self._reward_weights).masked_fill_(nonfinite[:, None], 0.0)  # [N, terms]
        reward = weighted.sum(1)  # [N]

        terminated = crashed | nonfinite  # no bootstrapping past these
        time_outs = (self.episode_length >= self.max_episode_length) & ~terminated
        done = terminated | time_outs

        # Per-episode sums of the terms, steps and targets; finished rows are handed out, then restart from zero.
        sums = self._sums + torch.cat((weighted, self._ones, at_target.float()[:, None]), 1)  # [N, terms + 2]
        self._sums = sums.masked_fill(done[:, None], 0.0)
        episode = {f"reward_{name}": sums[:, i] for i, name in enumerate(TERMS)}
        episode.update(length=sums[:, -2], targets=sums[:, -1], crashes=crashes, **{"return": sums[:, :-2].sum(1)})

        # Observation before any reset (bootstrapping target for time-outs). The action slot holds the action
        # applied in this step; the Genesis example stores the one before it (one step staler).
        new_targets = self._draw_targets()  # [N, 3] used by envs that reached their target or finished
        self.target_pos = torch.where(at_target[:, None], new_targets, self.target_pos)
        final_obs = torch.cat((self.target_pos - pos, quat, lin_vel_b, ang_vel_b, a), 1)  # [N, 17]
        final_obs.mul_(self._obs_scale).clamp_(-1.0, 1.0)  # (quat and actions already lie in [-1, 1])

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
        self._start_episodes(done)

        info = {"time_outs": time_outs, "final_obs": final_obs, "episode": episode, "nonfinite": nonfinite}
        return self._sense(obs), reward, done, info

    STATE = ("base_pos", "target_pos", "last_actions", "episode_length", "_sums")  # with the drones' qpos, velocity

    def state_dict(self) -> dict:  # what a resumed run needs to step on as this one would (train.py saves it)
        return {"qpos": self.drone.get_qpos(), "dofs_vel": self.drone.get_dofs_velocity(),
                **{k: getattr(self, k).clone() for k in self.STATE}}

    def load_state_dict(self, state: dict):
        self.drone.set_qpos(state["qpos"].to(self.device), zero_velocity=False)
        self.drone.set_dofs_velocity(state["dofs_vel"].to(self.device))
        for k in self.STATE:
            setattr(self, k, state[k].to(self.device))

    def measure(self) -> dict:  # what eval.py records after every step and plots, [N] each
        return {"distance_m": torch.linalg.vector_norm(self.target_pos - self.base_pos, dim=1)}


# The task contract's names, for train.py, eval.py and export.py.
Config, Env = HoverConfig, HoverEnv


# ------------------------------------------------------------------------------------------------------------ helpers
def init_genesis(device: torch.device):
    """Genesis runs one backend per process: start it on `device`, or check that it runs there.
    GS_PERFORMANCE_MODE=0 turns off its kernels compiled per number of envs, as the tests do (EXPERIMENTS.md)."""
    import genesis as gs
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:K]', got '{device}'")
    if not gs._initialized:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device.index)  # Genesis runs on the current CUDA device
        # No `seed=`: gs.init would reseed the global torch/numpy/random RNGs under the trainer's feet.
        gs.init(backend=gs.cpu if device.type == "cpu" else gs.gpu, precision="32", logging_level="error",
                performance_mode=os.environ.get("GS_PERFORMANCE_MODE", "1") != "0")
    if device.type != gs.device.type or device.index not in (None, gs.device.index):
        raise RuntimeError(f"Genesis is already initialised on '{gs.device}' in this process; "
                           f"cannot create an env on '{device}' (one backend per process)")
    return gs


def validate_actions(env, actions):
    """actions must be a float32 [num_envs, num_actions] tensor on the env's device, and finite if env.check_actions."""
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
    w, x, y, z = q.unbind(1)  # atan2(2(wz + xy), 1 - 2(y^2 + z^2)), both arguments halved: two ops fewer
    return torch.atan2(torch.addcmul(w * z, x, y), 0.5 - torch.addcmul(y * y, z, z))


def progress(prev_rel_pos, dist2, speed_cap: float, dt: float, per_metre: bool = False) -> torch.Tensor:
    """The progress term [N]: |p_prev - target|^2 - |p - target|^2 from prev_rel_pos [N, 3] and dist2 [N], or,
    per_metre, |p_prev - target| - |p - target|. Closing in at speed v pays about 2 |p_prev - target| v dt (per
    metre: v dt), so a cap on v caps the term: racing at the edge of control stops paying."""
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
    return 1.0 if iteration >= end else 0.0 if iteration <= start else (iteration - start) / (end - start)


def describe(cfg: HoverConfig) -> dict:
    """export.py's policy.json: the observation layout and the action map."""
    def obs(start, names, frame, unit, scale):
        return [{"index": start + i, "name": name, "frame": frame, "unit": unit, "scale": scale, "clip": [-1, 1]}
                for i, name in enumerate(names)]
    return {"control_rate_hz": round(1 / cfg.dt), "trained_against": "none: the simulator's nominal drone",
            "observation": (obs(0, [f"target_{a} - {a}" for a in "xyz"], "world", "m", cfg.obs_rel_pos_scale)
                            + obs(3, [f"quaternion_{c}" for c in "wxyz"], "body to world, w first", "", 1)
                            + obs(7, [f"velocity_{a}" for a in "xyz"], "body", "m/s", cfg.obs_lin_vel_scale)
                            + obs(10, [f"angular_velocity_{a}" for a in "xyz"], "body", "rad/s", cfg.obs_ang_vel_scale)
                            + obs(13, [f"previous_action_{i}" for i in range(4)], "", "", 1)),
            "observation_note": "each value: the quantity times scale, clipped; previous_action: zeros at the start",
            "action": {"size": 4, "range": [-1.0, 1.0], "rpm": "hover_rpm * (1 + rpm_gain * action[i]) for propeller i",
                       "hover_rpm": cfg.hover_rpm, "rpm_gain": cfg.rpm_gain}}
