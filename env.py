"""Crazyflie hover task on the Genesis simulator: N drones stepped as one batch (the rollout stage).

    policy.act(obs) -> [env.step(actions): one 100 Hz control step of all N drones] -> storage -> PPO -> Adam

    step(actions [N, 4] float32 in [-1, 1]) -> obs [N, 17], reward [N], done [N] bool, info (see step)
    obs = clip((target - pos) / 3) (3) | quaternion w,x,y,z (4) | clip(body linear velocity / 3) (3)
          | clip(body angular velocity / 25 rad/s) (3) | actions applied this step (4)

Finished drones are reset inside `step`, so the loop never stops. The task is Genesis's
examples/drone/hover_env.py (same scene, action map, observation scales, rewards and terminations); the
deliberate differences are noted where they occur. The only file that imports genesis. `step` reads nothing
back to the host (but for one optional check of the actions): resets take a boolean env mask.
"""
from dataclasses import dataclass

import torch
import genesis as gs


@dataclass
class HoverConfig:
    """Every constant of the task; the defaults are those of Genesis's hover example."""

    dt: float = 0.01  # control and physics step [s] (100 Hz), split into `substeps` solver substeps
    substeps: int = 2
    episode_length_s: float = 15.0  # time-out (truncation) after this long: 1500 steps
    hover_rpm: float = 14468.429183500699  # propeller RPM at which thrust balances the Crazyflie's weight
    rpm_gain: float = 0.8  # rpm = (1 + rpm_gain * action) * hover_rpm, action clipped to [-1, 1]
    init_pos: tuple = (0.0, 0.0, 1.0)  # every episode starts hovering here, level and at rest
    init_quat: tuple = (1.0, 0.0, 0.0, 0.0)
    target_low: tuple = (-1.0, -1.0, 1.0)  # targets are uniform in [low, high] per axis (z fixed at 1 m)
    target_high: tuple = (1.0, 1.0, 1.0)
    at_target_dist: float = 0.1  # closer than this to the target [m]: count it and draw a new one
    crash_rel_pos: tuple = (3.0, 3.0, 2.0)  # crash if |target - pos| exceeds this on any axis [m] ...
    crash_min_height: float = 0.1  # ... or if the drone is lower than this [m]
    obs_rel_pos_scale: float = 1 / 3.0
    obs_lin_vel_scale: float = 1 / 3.0
    obs_ang_vel_scale: float = 1 / 25.0  # the example's 1/pi clips the rates trained drones fly (EXPERIMENTS.md)
    # Reward weights, one per term of `step` (each term is also multiplied by dt, as in the example).
    reward_target: float = 10.0  # progress toward the target: |p_prev - target|^2 - |p - target|^2 [m^2]
    progress_speed_cap: float = 0.0  # m/s: progress pays at most as much as flying this fast at the target (0: no cap)
    reward_smooth: float = -1e-4  # change of action: |a - a_prev|^2
    reward_yaw: float = 0.01  # heading held: exp(yaw_lambda * |yaw|), yaw in radians
    yaw_lambda: float = -10.0
    reward_angular: float = -2e-4 / 3.14159  # spin: |body angular velocity| [rad/s] (the example's -2e-4 per pi rad/s)
    reward_crash: float = -10.0  # 1 on the step the drone crashes
    # Viewer / recording camera (only used when show_viewer or record_camera).
    camera_pos: tuple = (3.5, 0.0, 2.5)
    camera_lookat: tuple = (0.0, 0.0, 0.5)
    camera_fov: float = 30.0


def _init_genesis(device: torch.device) -> torch.device:
    """Genesis runs one backend per process: start it on `device`, or check that it already runs there."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:K]', got '{device}'")
    if not gs._initialized:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device.index)  # Genesis runs on the current CUDA device
        # No `seed=`: gs.init would reseed the global torch/numpy/random RNGs under the trainer's feet. "error":
        # the kernel compiler's and the asset loader's warnings do not concern this task.
        gs.init(backend=gs.cpu if device.type == "cpu" else gs.gpu, precision="32", logging_level="error",
                performance_mode=True)
    if device.type != gs.device.type or device.index not in (None, gs.device.index):
        raise RuntimeError(f"Genesis is already initialised on '{gs.device}' in this process; "
                           f"cannot create a HoverEnv on '{device}' (one backend per process)")
    return gs.device


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


def progress(prev_rel_pos: torch.Tensor, dist2: torch.Tensor, speed_cap: float, dt: float) -> torch.Tensor:
    """The progress term [N]: |p_prev - target|^2 - |p - target|^2, from prev_rel_pos [N, 3] and dist2 [N].

    Closing in at speed v pays about 2 |p_prev - target| v dt, so a cap on v caps the term. With a cap, flying at
    the target faster than it earns nothing more, so racing at the edge of control does not pay (the CPU preset's
    cap, and what it did to crashes: EXPERIMENTS.md)."""
    prev_dist2 = prev_rel_pos.square().sum(1)
    if not speed_cap:
        return prev_dist2 - dist2
    return torch.minimum(prev_dist2 - dist2, prev_dist2.sqrt() * (2 * speed_cap * dt))


class HoverEnv:
    num_obs = 17
    num_actions = 4

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0, cfg: HoverConfig = HoverConfig(),
                 show_viewer: bool = False, record_camera: bool = False, check_actions: bool = True):
        self.num_envs, self.cfg, self.dt = num_envs, cfg, cfg.dt
        self.device = _init_genesis(torch.device(device))
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

    def _show_targets(self):
        if self.target_marker is not None:
            self.target_marker.set_pos(self.target_pos, zero_velocity=False)

    def reset(self, random_episode_start: bool = False) -> torch.Tensor:
        """Reset all envs; returns obs [N, 17]. random_episode_start: episode counters drawn in [0, 1500), so
        that the first time-outs spread out."""
        N, dev = self.num_envs, self.device
        self.drone.set_qpos(self._init_qpos, zero_velocity=True)
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
        return obs

    def _check(self, actions):
        expected = (self.num_envs, self.num_actions)
        if not (isinstance(actions, torch.Tensor) and actions.shape == expected and actions.dtype == torch.float32
                and actions.device == self.device):
            got = (f"{tuple(actions.shape)} {actions.dtype} on {actions.device}" if isinstance(actions, torch.Tensor)
                   else type(actions).__name__)
            raise ValueError(f"actions must be a float32 tensor of shape {expected} on {self.device}, got {got}")
        if self.check_actions and not torch.isfinite(actions).all():  # the one host sync (see __init__)
            raise ValueError("actions contain NaN or inf")

    def step(self, actions: torch.Tensor):
        """Advance all envs by dt; reset the finished ones. Returns obs [N, 17], reward [N], done [N] bool, info:
        time_outs [N] bool   truncated at max_episode_length (the trainer bootstraps these from final_obs)
        final_obs [N, 17]    observation before the reset (equals obs where not done)
        nonfinite [N] bool   physics went NaN/inf: ends the episode, not as a crash, with zero reward
        episode              [N] sums over the episode: return, length (steps), targets (reached), reward_<term>;
                             crashed [N] bool. Where done, the finished episode's; elsewhere, the running ones."""
        self._check(actions)
        cfg = self.cfg
        a = actions.clamp(-1.0, 1.0)  # [N, 4]
        self.drone.set_propellers_rpm(a.mul(cfg.rpm_gain * cfg.hover_rpm).add_(cfg.hover_rpm))
        self.scene.step()

        # Free-joint state: qpos = world position + quaternion, dof velocity = world linear + *body* angular velocity.
        qpos, dof_vel = self.drone.get_qpos(), self.drone.get_dofs_velocity()  # [N, 7], [N, 6] (fresh copies)
        # A blown-up env must not spread NaN into obs and reward: zero its state here, reset it below. (The row sum
        # of finite, moderate numbers is finite, so one isfinite on the sums checks the whole row.)
        nonfinite = ~torch.isfinite(qpos.sum(1) + dof_vel.sum(1))  # [N]
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
        dt = cfg.dt
        terms = {  # [N] each: this step's reward terms, weighted (HoverConfig) and scaled by dt
            "target": dt * cfg.reward_target * progress(prev_rel_pos, dist2, cfg.progress_speed_cap, dt),
            "smooth": dt * cfg.reward_smooth * (a - self.last_actions).square().sum(1),
            "yaw": dt * cfg.reward_yaw * torch.exp(cfg.yaw_lambda * quat_yaw(quat).abs()),
            "angular": dt * cfg.reward_angular * ang_vel_b.square().sum(1).sqrt(),
            "crash": dt * cfg.reward_crash * crashed.float(),
        }
        weighted = torch.stack(tuple(terms.values()), 1).masked_fill_(nonfinite[:, None], 0.0)  # [N, terms]
        reward = weighted.sum(1)  # [N]

        terminated = crashed | nonfinite  # no bootstrapping past these
        time_outs = (self.episode_length >= self.max_episode_length) & ~terminated
        done = terminated | time_outs

        # Per-episode sums of the terms, the steps and the targets reached; finished rows are handed out as they
        # are and restart from zero in a fresh tensor.
        sums = self._sums + torch.cat((weighted, self._ones, at_target.float()[:, None]), 1)  # [N, terms + 2]
        self._sums = sums.masked_fill(done[:, None], 0.0)
        episode = {f"reward_{name}": sums[:, i] for i, name in enumerate(terms)}
        episode.update(length=sums[:, -2], targets=sums[:, -1], crashed=crashed, **{"return": sums[:, :-2].sum(1)})

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

        info = {"time_outs": time_outs, "final_obs": final_obs, "episode": episode, "nonfinite": nonfinite}
        return obs, reward, done, info


class EpisodeStats:
    """Sums over finished episodes, kept on the device (no sync per step); train.py and eval.py count with it."""
    def __init__(self, device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # count, return, length, targets, crashed

    def add(self, done, episode):  # done [N] bool: which episodes to count; episode: env.step's per-episode sums
        d = done.double()
        self.sums += torch.stack([d, episode["return"] * d, episode["length"] * d, episode["targets"] * d,
                                  episode["crashed"] * d]).sum(1)

    def read(self, dt, all_sum=None):
        """Per-episode means and per-drone-minute rates over all workers (one host sync); the sums restart."""
        count, ret, length, targets, crashed = (all_sum(self.sums) if all_sum else self.sums).tolist()
        self.sums.zero_()
        minutes = length * dt / 60
        return {"episodes": int(count)} if count == 0 else {
            "episodes": int(count), "episode_return": ret / count, "episode_length": length / count,
            "targets_per_episode": targets / count, "crashes_per_episode": crashed / count,
            "targets_per_drone_min": targets / minutes, "crashes_per_drone_min": crashed / minutes}
