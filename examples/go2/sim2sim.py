"""Fly a Go2 policy in MuJoCo and in Genesis, side by side: the sim-to-sim check before the real robot.

    python examples/go2/sim2sim.py runs/<run>/ckpt_0200.pt             exports it first, into <ckpt>_export/
    python examples/go2/sim2sim.py EXPORT_DIR                           policy.json + policy.pt2 (export.py's)
    python examples/go2/sim2sim.py CKPT --robots 64 --seconds 20 --speeds 0.3 0.5 0.8 --no-genesis

MuJoCo flies from policy.json (the deployment contract) and policy.pt2 alone, as the robot would: each robot its
own MjData (mujoco_go2.py), built from the URDF; its Controller reads the sensors in the Unitree SDK's motor order,
lays out the observation by the contract and sends PD targets, through the StateMachine (state_machine.py): lying
on the floor with the motors off (ZERO_TORQUE, 0.5 s), STAND_UP (1.5 s to the default pose, 0.5 s held), POLICY for
--seconds, DAMPING at a fall (roll or pitch beyond the contract's fall angle) or, after --seconds, at the
operator's stop (1 s more, the robot sinking). Genesis flies the same
policy.pt2 in the task's env (go2_env.py), with the checkpoint's settings, from its usual start (dropped in the
default pose). Each command of --speeds is flown by --robots robots in each simulator, and 0.5 m/s once more
under pushes: a 0.5 m/s kick of the base in a random horizontal direction every 5 s. Printed per condition and
simulator: the mean forward velocity (base frame) and base height over the policy's time, and falls per
robot-minute. Writes sim2sim.png into the export folder: velocity and height over time in both simulators.
"""
import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run as a script from anywhere: the project's files import from the repository root

import config  # noqa: E402
from examples.go2.mujoco_go2 import MujocoGo2, build_model  # noqa: E402
from examples.go2.state_machine import Mode, StateMachine  # noqa: E402

BadInput = config.BadInput
ZERO_TORQUE_S, DAMPING_S, PUSH_EVERY_S, PUSH_SPEED = 0.5, 1.0, 5.0, 0.5  # [s], [s], [s], [m/s]
LYING_HEIGHT = 0.12  # [m] the base is let go here and settles on its belly (the box's half-height is 0.057 m)
LYING_LEG = (0.0, 1.15, -2.7)  # hip, thigh, calf [rad]: the Unitree lying pose, legs folded under the body
LYING_JITTER = 0.02  # [rad] each MuJoCo robot's joints off that pose: 64 runs, 64 different robots (calf limit -2.72)
# What policy.json must hold for the robot to fly from it alone: the top-level fields, each with its keys.
CONTRACT = {"control_rate_hz": (), "observation": (), "safety": ("fall_angle_deg",), "command": ("names",),
            "action": ("joints", "default_angle", "action_scale", "range", "kp", "kd", "torque_limit",
                       "latency_steps", "sdk_motor_order", "sdk_motor_index"),
            "trained_in": ("physics_dt_s", "joint_armature", "friction")}
OBSERVATION_KEYS = ("index", "name", "scale", "clip")


def parse_args(argv=None):
    p = config.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a Go2 checkpoint (ckpt_NNNN.pt), or a folder export.py wrote (policy.json and "
                                  "policy.pt2)")
    p.add_argument("--robots", type=int, default=64, help="robots per condition and simulator (default 64)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of walking per run (default 20)")
    p.add_argument("--speeds", type=float, nargs="+", default=[0.3, 0.5, 0.8],
                   help="forward commands to fly [m/s] (default 0.3 0.5 0.8); 0.5 also under pushes")
    p.add_argument("--no-genesis", action="store_true", help="fly MuJoCo only")
    p.add_argument("--seed", type=int, default=0, help="the pushes' directions (default 0)")
    args = p.parse_args(argv)
    if not (0 < args.robots <= 4096 and 0 < args.seconds <= 600):  # (NaN fails this too)
        raise config.BadInput(f"--robots must be 1 to 4096 and --seconds 0 to 600, got {args.robots} and "
                              f"{args.seconds}")
    if not all(-2.0 <= v <= 2.0 for v in args.speeds):
        raise config.BadInput(f"--speeds must be within -2 and 2 m/s, got {args.speeds}")
    return args


def read_contract(folder) -> dict:
    """policy.json of an export folder, checked to hold every field CONTRACT names; BadInput in one line if not."""
    import json
    path = os.path.join(folder, "policy.json")
    try:
        with open(path) as f:
            contract = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {path} ({type(e).__name__}: {config.first_line(e)})") from None
    if contract.get("task") not in (None, "go2"):
        raise BadInput(f"{path} is the {contract['task']} task's contract, not the Go2's")
    for field, keys in CONTRACT.items():
        if field not in contract:
            raise BadInput(f"{path} lacks the field {field!r}")
        missing = [k for k in keys if k not in contract[field]]
        if missing:
            raise BadInput(f"{path} lacks the field '{field}.{missing[0]}'")
    for entry in contract["observation"]:
        missing = [k for k in OBSERVATION_KEYS if k not in entry]
        if missing:
            raise BadInput(f"{path}: observation {entry.get('index', '?')} lacks the field {missing[0]!r}")
    if not os.path.isfile(os.path.join(folder, "policy.pt2")):
        raise BadInput(f"no policy.pt2 in {folder}: export it with python export.py CKPT --formats torch")
    Controller(contract)  # an unknown observation or a bad motor map fails here, before any flight
    return contract


class Controller:
    """What runs on the robot around the network, read from the contract alone: the joint-order map between the
    policy and the SDK's motors, the observation layout, the action -> PD target map. Batched: [N, ...] arrays."""

    def __init__(self, contract):
        act = contract["action"]
        self.sdk_index = np.array(act["sdk_motor_index"])  # [12] policy joint i is SDK motor sdk_index[i]
        if sorted(self.sdk_index.tolist()) != list(range(len(act["sdk_motor_order"]))):
            raise BadInput(f"action.sdk_motor_index must number each motor once, got {act['sdk_motor_index']}")
        if [act["sdk_motor_order"][k] for k in self.sdk_index] != act["joints"]:
            raise BadInput("action.sdk_motor_index does not map action.joints onto action.sdk_motor_order")
        self.default = np.array(act["default_angle"])  # [12] policy order
        self.scale, self.clip = act["action_scale"], act["range"][1]
        self.latency = act["latency_steps"]
        if self.latency not in (0, 1):
            raise BadInput(f"action.latency_steps must be 0 or 1, got {self.latency}")
        joints = act["joints"]
        # Each observation entry names a quantity: its column in the [N, 45] table that observe() fills.
        names = ([f"angular_velocity_{a}" for a in "xyz"] + [f"gravity_direction_{a}" for a in "xyz"]
                 + [f"command_{c}" for c in contract["command"]["names"]]
                 + [f"{q}_{j}" for q in ("joint_angle_minus_default", "joint_velocity", "previous_action")
                    for j in joints])
        entries = sorted(contract["observation"], key=lambda e: e["index"])
        unknown = [e["name"] for e in entries if e["name"] not in names]
        if unknown or [e["index"] for e in entries] != list(range(len(entries))):
            raise BadInput(f"observation: unknown quantity {unknown[0]!r}" if unknown else
                           "observation: indices must be 0, 1, ... once each")
        self.columns = np.array([names.index(e["name"]) for e in entries])  # [obs]
        self.obs_scale = np.array([e["scale"] for e in entries])
        self.obs_clip = np.array([math.inf if e["clip"] is None else e["clip"] for e in entries])

    def to_policy(self, x_sdk):
        """[..., 12] in SDK motor order -> the policy's joint order."""
        return x_sdk[..., self.sdk_index]

    def to_sdk(self, x_policy):
        """[..., 12] in the policy's joint order -> SDK motor order."""
        out = np.empty_like(x_policy)
        out[..., self.sdk_index] = x_policy
        return out

    def observe(self, gyro, gravity, command, angles, velocities, previous_action):
        """obs [N, 45] float32 from the sensors: gyro, gravity [N, 3] (base frame), command [N, 3], joint angles and
        velocities [N, 12] in SDK order, the previous action [N, 12] (policy order)."""
        table = np.concatenate((gyro, gravity, command, self.to_policy(angles) - self.default,
                                self.to_policy(velocities), previous_action), 1)
        obs = table[:, self.columns] * self.obs_scale
        return np.clip(obs, -self.obs_clip, self.obs_clip).astype(np.float32)

    def targets(self, action):
        """PD targets [N, 12] in SDK order for actions [N, 12]: default + action_scale * clipped action."""
        return self.to_sdk(self.default + self.scale * np.clip(action, -self.clip, self.clip))


# --------------------------------------------------------------------------------------------------- MuJoCo
def mujoco_fleet(contract, n, rng=None):
    """n MuJoCo robots (one model, an MjData each), motors in SDK order, lying on the floor, motors off. With rng,
    each lies its own way: a heading in [0, 2 pi) and every joint within +-LYING_JITTER of the lying pose."""
    act, sim = contract["action"], contract["trained_in"]
    limits = np.empty(12)
    limits[act["sdk_motor_index"]] = act["torque_limit"]
    model = build_model(act["sdk_motor_order"], sim["physics_dt_s"], sim["joint_armature"], sim["friction"])
    robots = [MujocoGo2(model, limits) for _ in range(n)]
    for robot in robots:
        yaw = 0.0 if rng is None else rng.uniform(0, 2 * math.pi)
        jitter = 0.0 if rng is None else rng.uniform(-LYING_JITTER, LYING_JITTER, 12)
        robot.place(LYING_HEIGHT, np.tile(LYING_LEG, 4) + jitter, (math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)))
    return robots


def fly_mujoco(contract, policy, n, speed, seconds, push, seed):
    """n robots from lying through stand-up, `seconds` of the policy on (speed, 0, 0), a stop. Returns figures, the
    series [steps, n] of forward velocity and base height up to the stop (NaN after a fall), the step the policy
    began."""
    control = Controller(contract)
    dt = 1.0 / contract["control_rate_hz"]
    substeps = round(dt / contract["trained_in"]["physics_dt_s"])
    act = contract["action"]
    rng = np.random.default_rng(seed)
    robots = mujoco_fleet(contract, n, rng)
    machines = [StateMachine(act["default_angle"], act["kp"], act["kd"], contract["safety"]["fall_angle_deg"])
                for _ in range(n)]
    standing = machines[0]
    policy_start = round((ZERO_TORQUE_S + standing.stand_up_s + standing.settle_s) / dt)
    policy_end = policy_start + round(seconds / dt)  # then the operator's stop: DAMPING for DAMPING_S
    steps = policy_end + round(DAMPING_S / dt)
    command = np.tile([speed, 0.0, 0.0], (n, 1))
    previous = np.zeros((n, 12))  # [N, 12] the last action, policy order: what the joints get with latency 1
    velocity, height = np.full((steps, n), np.nan), np.full((steps, n), np.nan)  # [steps, N], NaN: not walking
    for k in range(steps):
        now = k * dt
        angles = np.stack([r.motor_angles() for r in robots])  # [N, 12] SDK order
        gravity = np.stack([r.gravity() for r in robots])
        obs = control.observe(np.stack([r.gyro() for r in robots]), gravity, command, angles,
                              np.stack([r.motor_velocities() for r in robots]), previous)
        with torch.no_grad():
            action = policy(torch.from_numpy(obs)).numpy().astype(np.float64)  # [N, 12]
        target = control.targets(previous if control.latency else action)
        kicks = None  # [N, 2] world frame: every PUSH_EVERY_S of walking, a random direction per robot
        if push and policy_start < k < policy_end and (k - policy_start) % round(PUSH_EVERY_S / dt) == 0:
            angle = rng.uniform(0, 2 * math.pi, n)
            kicks = PUSH_SPEED * np.stack((np.cos(angle), np.sin(angle)), 1)
        for i, (robot, sm) in enumerate(zip(robots, machines)):
            if k == round(ZERO_TORQUE_S / dt):
                sm.stand_up(now, angles[i])
            if k == policy_end:
                sm.stop(now)
            sm.command(now)  # the operator's command arrives every step
            kp, kd, tgt = sm.update(now, angles[i], gravity[i], target[i])
            if sm.mode is Mode.POLICY and kicks is not None:
                robot.push(kicks[i])
            robot.step(kp, kd, tgt, substeps)
            previous[i] = action[i] if sm.mode is Mode.POLICY else 0.0  # zero until the policy walks
            if sm.mode is not Mode.DAMPING:
                velocity[k, i], height[k, i] = robot.base_velocity()[0], robot.base_height()
    walking = velocity[policy_start:policy_end]
    falls = sum(sm.reason.startswith("fall") for sm in machines)
    figures = {"forward_velocity": np.nanmean(walking), "base_height": np.nanmean(height[policy_start:policy_end]),
               "falls": falls, "falls_per_robot_min": falls / (np.isfinite(walking).sum() * dt / 60),
               "stood_up": float(np.mean(height[policy_start - 1])),
               "damped": sum(sm.mode is Mode.DAMPING for sm in machines),
               "sunk_to": float(np.mean([r.base_height() for r in robots]))}
    return figures, velocity[:policy_end], height[:policy_end], policy_start


# -------------------------------------------------------------------------------------------------- Genesis
def fly_genesis(ckpt, policy, n, conditions, seconds, seed):
    """Every condition's n robots in one Go2Env of the checkpoint's settings, its command held per robot. Returns
    figures per condition and the series [steps, n] of forward velocity and base height of each."""
    from examples.go2.go2_env import Go2Env
    env = Go2Env(n * len(conditions), device="cpu", seed=seed, cfg=ckpt.task_cfg)
    commands = torch.tensor([[speed, 0.0, 0.0] for speed, _ in conditions for _ in range(n)])
    env.hold_commands(commands)
    pushed = torch.tensor([push for _, push in conditions for _ in range(n)])[:, None]  # [N, 1]
    generator = torch.Generator().manual_seed(seed)
    steps, push_every = round(seconds / env.dt), round(PUSH_EVERY_S / env.dt)
    velocity, height = np.empty((steps, env.num_envs)), np.empty((steps, env.num_envs))
    falls = torch.zeros(env.num_envs)
    obs = env.reset()
    with torch.no_grad():
        for k in range(steps):
            if k > 0 and k % push_every == 0:  # the same kick as MuJoCo's: the base's world velocity, x and y
                angle = torch.rand(env.num_envs, generator=generator) * 2 * math.pi
                vel = env.robot.get_dofs_velocity()
                vel[:, :2] += pushed * PUSH_SPEED * torch.stack((angle.cos(), angle.sin()), 1)
                env.robot.set_dofs_velocity(vel)
            obs, _, done, info = env.step(policy(obs))
            falls += torch.where(done, info["episode"]["falls"], 0.0)
            measured = env.measure()  # where done, the robot is back at its start: no sample (NaN)
            velocity[k] = measured["forward_velocity"].masked_fill(done, math.nan).numpy()
            height[k] = measured["base_height"].masked_fill(done, math.nan).numpy()
    results = []
    for c in range(len(conditions)):
        rows = slice(c * n, (c + 1) * n)
        count = int(falls[rows].sum())
        results.append(({"forward_velocity": np.nanmean(velocity[:, rows]), "base_height": np.nanmean(height[:, rows]),
                         "falls": count, "falls_per_robot_min": count / (n * seconds / 60)},
                        velocity[:, rows], height[:, rows]))
    return results


# ---------------------------------------------------------------------------------------------------- the run
def prepare(source):
    """(export folder, its contract, the checkpoint for Genesis or None): a .pt is checked, then exported."""
    if os.path.isdir(source):
        contract = read_contract(source)
        path = contract.get("checkpoint")
        ckpt = config.load_checkpoint(path) if path and os.path.isfile(path) else None
        return source, contract, ckpt
    ckpt = config.load_checkpoint(source)
    if ckpt.settings["task"] != "go2":
        raise BadInput(f"{source} is a checkpoint of the {ckpt.settings['task']} task, not the Go2's")
    out = os.path.splitext(source)[0] + "_export"
    config.check_writable(out)
    import export
    export.export(ckpt, source, out, {"torch"})
    return out, read_contract(out), ckpt


def plot(series, dt, path):
    """Forward velocity and base height over time, MuJoCo (its stand-up before 0) and Genesis: median, 5-95 %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(series), figsize=(6 * len(series), 6), sharex=True, squeeze=False)
    for col, (title, runs) in enumerate(series.items()):
        for row, key in enumerate(("forward velocity (m/s)", "base height (m)")):
            ax = axes[row, col]
            for sim, (values, start) in runs.items():
                values = values[row]
                t = (np.arange(len(values)) - start) * dt
                with warnings.catch_warnings():  # a step where every robot was reset has no sample: a gap
                    warnings.simplefilter("ignore", RuntimeWarning)
                    lo, mid, hi = np.nanpercentile(values, [5, 50, 95], axis=1)
                ax.fill_between(t, lo, hi, alpha=0.25, lw=0)
                ax.plot(t, mid, lw=1, label=f"{sim}, median and 5-95 %")
            ax.set(ylabel=key, title=title if row == 0 else None)
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=8, loc="lower right")
        axes[1, col].set(xlabel="time since the policy took over (s); MuJoCo's stand-up before 0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    with config.refusing("sim2sim.py"):
        args = parse_args(argv)
        folder, contract, ckpt = prepare(args.source)
        if ckpt is None and not args.no_genesis:
            raise BadInput(f"{folder}/policy.json names no checkpoint that exists, which Genesis needs: give the "
                           f"checkpoint, or --no-genesis")
    policy = torch.export.load(os.path.join(folder, "policy.pt2")).module()
    conditions = [(speed, False) for speed in args.speeds] + [(0.5, True)]
    names = [f"{speed:g} m/s" + (", pushes" if push else "") for speed, push in conditions]
    dt = 1.0 / contract["control_rate_hz"]
    rows, series = {}, {}
    for name, (speed, push) in zip(names, conditions):
        started = time.time()
        figures, velocity, height, start = fly_mujoco(contract, policy, args.robots, speed, args.seconds, push,
                                                      args.seed)
        rows[name] = {"MuJoCo": figures}
        series[name] = {"MuJoCo": ((velocity, height), start)}
        print(f"  MuJoCo {name}: {args.robots} robots x {args.seconds:g} s in {time.time() - started:.0f} s; from "
              f"lying, stood up to {figures['stood_up']:.3f} m; at the stop, {figures['damped']} in DAMPING, sunk to "
              f"{figures['sunk_to']:.3f} m in {DAMPING_S:g} s", flush=True)
    if not args.no_genesis:
        started = time.time()
        for name, (figures, velocity, height) in zip(names, fly_genesis(ckpt, policy, args.robots, conditions,
                                                                        args.seconds, args.seed)):
            rows[name]["Genesis"] = figures
            series[name]["Genesis"] = ((velocity, height), 0)
        print(f"  Genesis: {args.robots * len(conditions)} robots x {args.seconds:g} s in "
              f"{time.time() - started:.0f} s", flush=True)
    low, high = contract["command"].get("low", "?"), contract["command"].get("high", "?")
    print(f"\n  {args.robots} robots x {args.seconds:g} s per condition and simulator, the deterministic policy; "
          f"trained on commands {low} to {high}")
    print(f"  {'condition':<18s}{'simulator':<10s}{'forward m/s':>12s}{'vs command':>12s}{'height m':>10s}"
          f"{'falls/robot-min':>17s}{'falls':>7s}")
    for name, (speed, _) in zip(names, conditions):
        for sim, f in sorted(rows[name].items()):  # Genesis, then MuJoCo
            print(f"  {name:<18s}{sim:<10s}{f['forward_velocity']:12.3f}{f['forward_velocity'] / speed - 1:+12.1%}"
                  f"{f['base_height']:10.3f}{f['falls_per_robot_min']:17.3f}{f['falls']:7d}")
    try:
        plot({n: series[n] for n in names if n in ("0.5 m/s", "0.5 m/s, pushes")} or series, dt,
             os.path.join(folder, "sim2sim.png"))
        print(f"  wrote {os.path.join(folder, 'sim2sim.png')}")
    except ImportError:
        print("  no picture: matplotlib is not installed (pip install matplotlib)")
    return rows


if __name__ == "__main__":
    main()
