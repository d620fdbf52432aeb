"""Unitree Go2 walking on the Genesis simulator: N quadrupeds stepped as one batch, a second task on the same stages.

    policy.act(obs) -> [env.step(actions): one 50 Hz control step of all N robots] -> storage -> PPO -> Adam

    step(actions [N, 12] float32) -> obs [N, 45], reward [N], done [N] bool, info (the task contract: README.md)
    obs = base angular velocity * 0.25 (3) | gravity in the body frame (3) | command * (2, 2, 0.25) (3)
          | joint angles - default angles (12) | joint velocities * 0.05 (12) | actions (12)
    action i: joint i's PD controller aims at default angle + 0.25 * action (joints in Go2Config.joint_names order)

The task is Genesis's examples/locomotion/go2_env.py, trained there with rsl_rl (go2_train.py): the same scene,
PD gains, action map, command, observations, rewards and terminations; the deliberate differences are noted where
they occur. Train it with `python train.py --task go2`. The file stands alone, as Genesis's examples do: it imports
torch, and genesis when the first env is built; the few helpers it shares with the drone's env.py (setting,
init_genesis, validate_actions, quat_rotate_inverse) are written here again, so that it can be copied by itself.
"""
import importlib.util
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import torch


def setting(default, help, **rule):
    """A task setting: its default, the help of its flag, and the rule a value must keep (config.py checks it)."""
    return field(default=default, metadata={"help": help, **rule})


JOINTS = ("FR_hip_joint", "FR_thigh_joint", "FR_calf_joint", "FL_hip_joint", "FL_thigh_joint", "FL_calf_joint",
          "RR_hip_joint", "RR_thigh_joint", "RR_calf_joint", "RL_hip_joint", "RL_thigh_joint", "RL_calf_joint")
# The Unitree SDK numbers the Go2's motors in this order (unitree_sdk2, go2 JointIndex: FR 0-2, FL 3-5, RR 6-8, RL
# 9-11): LowCmd.motor_cmd[k] and LowState.motor_state[k] are joint SDK_MOTORS[k]. JOINTS keeps it by default.
SDK_MOTORS = JOINTS
URDF = "urdf/go2/urdf/go2.urdf"  # in Genesis's assets folder
# What Genesis gives the robot that the URDF does not state (genesis-world 1.4.5; policy.json names them, sim2sim.py
# builds its MuJoCo model with them): a rotor inertia on every joint (morphs.URDF.default_armature; the URDF states
# none and this file passes none), and friction 1 on every geom, the plane's too.
GENESIS_ARMATURE = 0.1  # [kg m^2]
GENESIS_FRICTION = 1.0


@dataclass
class Go2Config:
    """Every constant of the task; the defaults are those of Genesis's Go2 example. Each field is a flag of train.py
    (with --task go2)."""

    dt: float = setting(0.02, "control step [s] (50 Hz, the real robot's), split into substeps physics substeps",
                        above=0)
    substeps: int = setting(2, "physics substeps per step", low=1)
    episode_length_s: float = setting(20.0, "time-out after this long [s]: 1000 steps", above=0)
    joint_names: tuple = setting(JOINTS, "the order of the actions and of the joint observations",
                                 choices=JOINTS)
    default_joint_angles: tuple = setting((0.0, 0.8, -1.5, 0.0, 0.8, -1.5, 0.0, 1.0, -1.5, 0.0, 1.0, -1.5),
                                          "the standing pose [rad], in joint_names order")
    kp: float = setting(20.0, "PD gain of every joint [N m / rad]", above=0)
    kd: float = setting(0.5, "PD damping of every joint [N m s / rad]", low=0)
    action_scale: float = setting(0.25, "target angle = default angle + action_scale * action [rad]",
                                   above=0)
    clip_actions: float = setting(100.0, "actions are clipped to [-clip_actions, clip_actions]", above=0)
    action_latency: bool = setting(True, "the joints get the previous step's action (the real robot's latency)")
    init_pos: tuple = setting((0.0, 0.0, 0.42), "every episode starts here [m], in the default pose, at rest")
    init_quat: tuple = setting((1.0, 0.0, 0.0, 0.0), "level: roll and pitch are read from gravity in the body "
                                                    "frame")
    fall_angle_deg: float = setting(10.0, "a fall: |roll| or |pitch| above this ends the episode [deg]",
                                     above=0, high=180)
    command_low: tuple = setting((0.5, 0.0, 0.0), "velocity command (forward, lateral [m/s], yaw [rad/s]), "
                                                  "uniform in [low, high] per component")
    command_high: tuple = setting((0.5, 0.0, 0.0), "(the example's: 0.5 m/s forward)")
    command_resample_s: float = setting(4.0, "a new command this often [s] (and at every reset)",
                                         above=0)
    obs_lin_vel_scale: float = setting(2.0, "observed command velocities: times this", above=0)
    obs_ang_vel_scale: float = setting(0.25, "observed angular velocity and yaw command: times this",
                                       above=0)
    obs_dof_vel_scale: float = setting(0.05, "observed joint velocities: times this", above=0)
    tracking_sigma: float = setting(0.25, "tracking rewards: exp(-error^2 / sigma)", above=0)
    base_height_target: float = setting(0.3, "the base height rewarded [m]", above=0)
    # Reward weights, one per term of `step` (each term is also multiplied by dt, as in the example).
    reward_tracking_lin_vel: float = setting(1.0, "forward and lateral velocity on command")
    reward_tracking_ang_vel: float = setting(0.2, "yaw rate on command")
    reward_lin_vel_z: float = setting(-1.0, "vertical velocity^2")
    reward_base_height: float = setting(-50.0, "(height - base_height_target)^2")
    reward_action_rate: float = setting(-0.005, "|a - a_prev|^2")
    reward_similar_to_default: float = setting(-0.1, "sum |joint angle - default angle|")
    camera_pos: tuple = setting((2.0, 0.0, 2.5), "the viewer's and the video's camera [m]")
    camera_lookat: tuple = setting((0.0, 0.0, 0.5), "where it looks [m]")
    camera_fov: float = setting(40.0, "its field of view [deg]", above=0, below=180)

    def conflicts(self):
        """What is wrong between settings, one line each (config.py checks each field's own rule first)."""
        if len(set(self.joint_names)) != len(self.joint_names):
            yield f"--joint-names must name each joint once, got {' '.join(self.joint_names)}"
        if not all(1 <= t / self.dt < 2 ** 31 for t in (self.episode_length_s, self.command_resample_s)):
            yield (f"--episode-length-s and --command-resample-s must be 1 to 2^31 steps (--dt {self.dt}), got "
                   f"{self.episode_length_s} and {self.command_resample_s}")
        if any(lo > hi for lo, hi in zip(self.command_low, self.command_high)):
            yield f"--command-low must be <= --command-high, got {self.command_low} and {self.command_high}"
        if not any(self.init_quat):
            yield "--init-quat must be a rotation (not all zeros)"


# train.py's settings for this task. TRAIN: the Genesis example's (go2_train.py: rsl_rl, 4096 robots x 24 steps,
# 101 iterations, actor and critic 512-256-128 ELU, lr 1e-3, entropy 0.01). CPU_PRESET, on top of it without CUDA
# (EXPERIMENTS.md, "The Go2 on 2 CPU cores"): 2 workers x 512 robots x 24 steps, the samples per iteration of
# the example at 1024 robots, each simulator on a core of its own; a network 3.5x smaller, 256-128-64 ELU: the
# update of 512-256-128 took twice the rollout's time, and the smaller one learned as fast per iteration.
TRAIN = dict(num_envs=4096, num_steps=24, max_iterations=101, hidden=(512, 256, 128), activation="elu",
             learning_rate=1e-3, entropy_coef=0.01)
CPU_PRESET = dict(num_envs=512, workers=2, threads_update=1, hidden=(256, 128, 64), max_iterations=200)


def tilt_deg(gravity_b: torch.Tensor):
    """(roll, pitch) [N] each, in degrees, of bodies whose gravity direction in the body frame is gravity_b [N, 3]:
    the roll and pitch of z-y-x Euler angles (the example's quat_to_xyz(rpy=True)), read off g_b = R^T (0, 0, -1)."""
    roll = torch.atan2(-gravity_b[:, 1], -gravity_b[:, 2])
    pitch = torch.asin(gravity_b[:, 0].clamp(-1.0, 1.0))
    return roll.rad2deg(), pitch.rad2deg()


class Go2Env:
    num_obs = 45
    num_actions = 12
    unit = "robot"  # train.py and eval.py report the `rates` per robot-minute
    rates = ("falls",)

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0, cfg: Go2Config = None,
                 show_viewer: bool = False, record_camera: bool = False, check_actions: bool = True):
        cfg = cfg or Go2Config()
        gs = init_genesis(torch.device(device))
        self.num_envs, self.cfg, self.dt, self.device = num_envs, cfg, cfg.dt, gs.device
        self.max_episode_length = round(cfg.episode_length_s / cfg.dt)  # 1000 (the example's `>` steps 1001)
        self.check_actions = check_actions  # NaN/inf in the actions: one bool read back, the only sync in step
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # commands and episode starts only

        self.scene = gs.Scene(
            sim_options=gs.options.SimOptions(dt=cfg.dt, substeps=cfg.substeps),
            # At most 20 contact pairs per robot (its feet and a knee or two on the plane): a small buffer.
            rigid_options=gs.options.RigidOptions(enable_self_collision=False, tolerance=1e-5,
                                                  max_collision_pairs=20),
            viewer_options=gs.options.ViewerOptions(refresh_rate=round(1 / cfg.dt), camera_pos=cfg.camera_pos,
                                                    camera_lookat=cfg.camera_lookat, camera_fov=cfg.camera_fov),
            vis_options=gs.options.VisOptions(rendered_envs_idx=[0]),
            show_viewer=show_viewer)
        self.scene.add_entity(gs.morphs.URDF(file="urdf/plane/plane.urdf", fixed=True))
        self.robot = self.scene.add_entity(gs.morphs.URDF(file=URDF, pos=cfg.init_pos,
                                                          quat=cfg.init_quat))
        self.camera = self.scene.add_camera(res=(640, 480), pos=cfg.camera_pos, lookat=cfg.camera_lookat,
                                            fov=cfg.camera_fov, GUI=False) if record_camera else None
        self.scene.build(n_envs=num_envs)

        N, dev = num_envs, self.device
        # The motors' dofs in joint_names order (actions, observations), and the permutation into the robot's order.
        self._motors = [self.robot.get_joint(name).dofs_idx_local[0] for name in cfg.joint_names]
        self._to_robot_order = torch.tensor(sorted(range(12), key=self._motors.__getitem__), device=dev)
        self._motors_sorted = sorted(self._motors)
        self.robot.set_dofs_kp([cfg.kp] * 12, self._motors)
        self.robot.set_dofs_kv([cfg.kd] * 12, self._motors)
        self._default_angles = torch.tensor(cfg.default_joint_angles, device=dev)  # [12]
        angle_of = dict(zip(cfg.joint_names, cfg.default_joint_angles))
        robot_angles = [angle_of[joint.name] for joint in self.robot.joints[1:]]  # the free base joint comes first
        self._init_qpos = torch.tensor((*cfg.init_pos, *cfg.init_quat, *robot_angles), device=dev).expand(N, 19)
        self._gravity = torch.tensor([0.0, 0.0, -1.0], device=dev).expand(N, 3)
        self._command_low = torch.tensor(cfg.command_low, device=dev)  # [3]
        self._command_span = torch.tensor(cfg.command_high, device=dev) - self._command_low
        self._command_scale = torch.tensor([cfg.obs_lin_vel_scale] * 2 + [cfg.obs_ang_vel_scale], device=dev)
        self._resample_steps = round(cfg.command_resample_s / cfg.dt)
        self._ones = torch.ones(N, 1, device=dev)
        # Observation of the start pose (level, default angles, at rest, no action) with the command slot to fill.
        self._start_obs = torch.zeros(self.num_obs, device=dev)
        self._start_obs[3:6] = quat_rotate_inverse(torch.tensor([cfg.init_quat], device=dev),
                                                   torch.tensor([[0.0, 0.0, -1.0]], device=dev))[0]

        self.commands = torch.zeros(N, 3, device=dev)  # [N, 3] forward, lateral [m/s], yaw rate [rad/s]
        self.last_actions = torch.zeros(N, 12, device=dev)  # [N, 12] this step's action, at the next step
        self.episode_length = torch.zeros(N, dtype=torch.int32, device=dev)  # [N] steps into the episode
        self.base_pos = self._init_qpos[:, :3].clone()  # [N, 3] and body-frame linear velocity, read by measure()
        self.lin_vel_b = torch.zeros(N, 3, device=dev)
        self._sums = torch.zeros((), device=dev)  # running per-episode sums, [N, terms + 2] after a step

    # ------------------------------------------------------------------------------------------------------------
    def _draw_commands(self) -> torch.Tensor:
        u = torch.rand(self.num_envs, 3, device=self.device, generator=self.generator)  # [N, 3]
        return torch.addcmul(self._command_low, self._command_span, u)

    def hold_commands(self, commands: torch.Tensor):
        """From the next draw on, robot i's command is commands[i] ([N, 3]: forward, lateral [m/s], yaw rate
        [rad/s]), at every reset and resample (sim2sim.py flies each robot at a command of its own)."""
        self._command_low = commands.to(self.device)
        self._command_span = torch.zeros_like(self._command_low)

    def set_iteration(self, iteration: int):
        """The task contract's curriculum hook (train.py calls it before each iteration and the first reset): this
        task has none."""

    def reset(self, random_episode_start: bool = False) -> torch.Tensor:
        """Reset all envs; returns obs [N, 45]. random_episode_start: episode counters drawn in [0, 1000), so
        that the first time-outs spread out."""
        N, dev = self.num_envs, self.device
        self.robot.set_qpos(self._init_qpos, zero_velocity=True)
        self.base_pos = self._init_qpos[:, :3].clone()
        self.lin_vel_b.zero_()
        self.commands = self._draw_commands()
        self.last_actions.zero_()
        self._sums = torch.zeros((), device=dev)
        self.episode_length.zero_()
        if random_episode_start:
            self.episode_length = torch.randint(0, self.max_episode_length, (N,), dtype=torch.int32, device=dev,
                                                generator=self.generator)
        obs = self._start_obs.expand(N, self.num_obs).clone()
        obs[:, 6:9] = self.commands * self._command_scale
        return obs

    def step(self, actions: torch.Tensor):
        """Advance all envs by dt; reset the finished ones. Returns obs [N, 45], reward [N], done [N] bool, info:
        time_outs [N] bool   truncated at max_episode_length (the trainer bootstraps these from final_obs)
        final_obs [N, 45]    observation before the reset (equals obs where not done)
        nonfinite [N] bool   the solver failed or the state went NaN/inf: ends the episode, not as a fall
        episode              [N] sums over the episode: return, length (steps), falls (0 or 1), reward_<term>.
                             Where done, the finished episode's; elsewhere, the running ones."""
        validate_actions(self, actions)
        cfg = self.cfg
        a = actions.clamp(-cfg.clip_actions, cfg.clip_actions)  # [N, 12]
        applied = self.last_actions if cfg.action_latency else a
        target = applied * cfg.action_scale + self._default_angles  # [N, 12] radians
        self.robot.control_dofs_position(target[:, self._to_robot_order], self._motors_sorted)
        self.scene.step()

        pos, quat = self.robot.get_pos(), self.robot.get_quat()  # [N, 3], [N, 4]
        world_vel = torch.cat((self.robot.get_vel(), self.robot.get_ang()), 1)  # [N, 6]
        joints = torch.cat((self.robot.get_dofs_position(self._motors), self.robot.get_dofs_velocity(self._motors)), 1)
        # A failed solver or a blown-up env must not spread NaN into obs and reward: zero its state, reset it below.
        nonfinite = self.scene.rigid_solver.get_error_envs_mask() | ~torch.isfinite(
            pos.sum(1) + quat.sum(1) + world_vel.sum(1) + joints.sum(1))  # [N]
        for x in (pos, quat, world_vel, joints):
            x.masked_fill_(nonfinite[:, None], 0.0)
        quat[:, 0].masked_fill_(nonfinite, 1.0)  # (a unit quaternion)
        lin_vel_b = quat_rotate_inverse(quat, world_vel[:, :3])  # [N, 3] body frame
        ang_vel_b = quat_rotate_inverse(quat, world_vel[:, 3:])
        gravity_b = quat_rotate_inverse(quat, self._gravity)
        angles, velocities = joints[:, :12] - self._default_angles, joints[:, 12:]  # [N, 12] each
        self.episode_length += 1

        # Reward from the post-physics, pre-reset state (the example's order too).
        dt, sigma = cfg.dt, cfg.tracking_sigma
        terms = {  # [N] each: this step's reward terms, weighted (Go2Config) and scaled by dt
            "tracking_lin_vel": dt * cfg.reward_tracking_lin_vel * torch.exp(
                (self.commands[:, :2] - lin_vel_b[:, :2]).square().sum(1) / -sigma),
            "tracking_ang_vel": dt * cfg.reward_tracking_ang_vel * torch.exp(
                (self.commands[:, 2] - ang_vel_b[:, 2]).square() / -sigma),
            "lin_vel_z": dt * cfg.reward_lin_vel_z * lin_vel_b[:, 2].square(),
            "base_height": dt * cfg.reward_base_height * (pos[:, 2] - cfg.base_height_target).square(),
            "action_rate": dt * cfg.reward_action_rate * (a - self.last_actions).square().sum(1),
            "similar_to_default": dt * cfg.reward_similar_to_default * angles.abs().sum(1),
        }
        weighted = torch.stack(tuple(terms.values()), 1).masked_fill_(nonfinite[:, None], 0.0)  # [N, terms]
        reward = weighted.sum(1)  # [N]

        roll, pitch = tilt_deg(gravity_b)
        fell = ((roll.abs() > cfg.fall_angle_deg) | (pitch.abs() > cfg.fall_angle_deg)) & ~nonfinite  # [N]
        terminated = fell | nonfinite  # no bootstrapping past these
        # The example ends an episode once its counter exceeds 1000 (1001 steps), and calls it a time-out even
        # when the robot fell in that step; here it is 1000 steps, and a fall is a fall.
        time_outs = (self.episode_length >= self.max_episode_length) & ~terminated
        done = terminated | time_outs

        sums = self._sums + torch.cat((weighted, self._ones, fell.float()[:, None]), 1)  # [N, terms + 2]
        self._sums = sums.masked_fill(done[:, None], 0.0)
        episode = {f"reward_{name}": sums[:, i] for i, name in enumerate(terms)}
        episode.update(length=sums[:, -2], falls=sums[:, -1], **{"return": sums[:, :-2].sum(1)})

        # A new command every command_resample_s; the observation carries it, as in the example.
        resample = (self.episode_length % self._resample_steps == 0)[:, None] | done[:, None]
        self.commands = torch.where(resample, self._draw_commands(), self.commands)
        final_obs = torch.cat((ang_vel_b * cfg.obs_ang_vel_scale, gravity_b, self.commands * self._command_scale,
                               angles, velocities * cfg.obs_dof_vel_scale, a), 1)  # [N, 45]

        # Reset finished envs without reading `done` back: Genesis setters take the boolean mask as it is.
        self.robot.set_qpos(self._init_qpos, envs_idx=done, zero_velocity=True)
        reset = done[:, None]
        self.base_pos = torch.where(reset, self._init_qpos[:, :3], pos)
        self.lin_vel_b = lin_vel_b.masked_fill(reset, 0.0)
        self.last_actions = a.masked_fill(reset, 0.0)
        self.episode_length.masked_fill_(done, 0)
        obs = torch.where(reset, self._start_obs, final_obs)
        obs[:, 6:9] = self.commands * self._command_scale

        info = {"time_outs": time_outs, "final_obs": final_obs, "episode": episode, "nonfinite": nonfinite}
        return obs, reward, done, info

    STATE = ("commands", "last_actions", "episode_length", "base_pos", "lin_vel_b", "_sums")  # with qpos, velocity

    def state_dict(self) -> dict:  # what a resumed run needs to step on as this one would (train.py saves it)
        return {"qpos": self.robot.get_qpos(), "dofs_vel": self.robot.get_dofs_velocity(),
                **{k: getattr(self, k).clone() for k in self.STATE}}

    def load_state_dict(self, state: dict):
        self.robot.set_qpos(state["qpos"].to(self.device), zero_velocity=False)
        self.robot.set_dofs_velocity(state["dofs_vel"].to(self.device))
        for k in self.STATE:
            setattr(self, k, state[k].to(self.device))

    def measure(self) -> dict:
        """What eval.py records after every step and plots, [N] each: the walking figures."""
        return {"forward_velocity": self.lin_vel_b[:, 0], "forward_velocity_error": self.lin_vel_b[:, 0] -
                self.commands[:, 0], "lateral_velocity": self.lin_vel_b[:, 1], "base_height": self.base_pos[:, 2]}


# The task contract's names, for train.py, eval.py and export.py.
Config, Env = Go2Config, Go2Env


def describe(cfg: Go2Config) -> dict:
    """export.py's policy.json: the deployment contract, everything a controller on the robot needs besides the
    network (examples/go2/sim2sim.py flies the policy in MuJoCo from it alone). Per-joint lists are in the policy's
    joint order (cfg.joint_names); sdk_motor_index maps joint i to the Unitree SDK's motor number."""
    joints = cfg.joint_names
    base = "base (x forward, y left, z up)"
    groups = [("angular_velocity", "xyz", "rad/s", base, cfg.obs_ang_vel_scale),
              ("gravity_direction", "xyz", "unit vector", base, 1.0),
              ("command", ("forward_m_s", "lateral_m_s", "yaw_rad_s"), ("m/s", "m/s", "rad/s"), "base, horizontal",
               (cfg.obs_lin_vel_scale,) * 2 + (cfg.obs_ang_vel_scale,)),
              ("joint_angle_minus_default", joints, "rad", "joint", 1.0),
              ("joint_velocity", joints, "rad/s", "joint", cfg.obs_dof_vel_scale),
              ("previous_action", joints, "", "policy output", 1.0)]
    observation = []  # obs[index] = scale * quantity, never clipped (clip null): the env clips no observation
    for name, parts, unit, frame, scale in groups:
        scales = scale if isinstance(scale, tuple) else (scale,) * len(parts)
        units = unit if isinstance(unit, tuple) else (unit,) * len(parts)
        observation += [{"index": len(observation) + i, "name": f"{name}_{p}", "unit": u, "frame": frame,
                         "scale": s, "clip": None} for i, (p, u, s) in enumerate(zip(parts, units, scales))]
    efforts = effort_limits(urdf_path())
    return {"robot": "Unitree Go2", "control_rate_hz": round(1 / cfg.dt), "observation": observation,
            "action": {"size": len(joints), "joints": list(joints),
                       "target_angle": "default_angle[i] + action_scale * action[i] (radians), held by a PD "
                                       "controller" + (", applied one step late" if cfg.action_latency else ""),
                       "default_angle": list(cfg.default_joint_angles), "action_scale": cfg.action_scale,
                       "range": [-cfg.clip_actions, cfg.clip_actions], "kp": cfg.kp, "kd": cfg.kd,
                       "torque": "kp * (target - angle) - kd * velocity, clipped to +-torque_limit [N m]",
                       "torque_limit": [efforts[j] for j in joints],
                       "latency_steps": int(cfg.action_latency),  # the joints get the action of this many steps ago
                       "sdk_motor_order": list(SDK_MOTORS),
                       "sdk_motor_index": [SDK_MOTORS.index(j) for j in joints]},
            "command": {"names": ["forward_m_s", "lateral_m_s", "yaw_rad_s"], "frame": "base, horizontal",
                        "low": list(cfg.command_low), "high": list(cfg.command_high)},
            "safety": {"fall_angle_deg": cfg.fall_angle_deg},  # |roll| or |pitch| beyond it ended an episode
            "trained_in": {"simulator": "Genesis", "physics_dt_s": cfg.dt / cfg.substeps,
                           "joint_armature": GENESIS_ARMATURE, "friction": GENESIS_FRICTION,
                           "start": "standing in the default pose, base at init_pos, at rest",
                           "init_pos": list(cfg.init_pos)}}


def urdf_path() -> str:
    """Genesis's go2.urdf, found without importing genesis (which would start nothing, but costs seconds)."""
    root = importlib.util.find_spec("genesis").submodule_search_locations[0]
    return os.path.join(root, "assets", URDF)


def effort_limits(path) -> dict:
    """{joint name: its torque limit [N m]} from a URDF's <limit effort=...>; Genesis clips the PD torque to it."""
    return {j.get("name"): float(j.find("limit").get("effort")) for j in ET.parse(path).getroot().iter("joint")
            if j.find("limit") is not None}


# ----------------------------------------------------------------- the Genesis helpers, as env.py has them too
def init_genesis(device: torch.device):
    """Genesis runs one backend per process: start it on `device`, or check that it already runs there.
    GS_PERFORMANCE_MODE=0 turns its performance mode off: kernels for any number of envs (env.py says more)."""
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
    """actions must be a float32 [num_envs, num_actions] tensor on the env's device, and, if env.check_actions,
    finite (a host sync: train.py turns it off)."""
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
