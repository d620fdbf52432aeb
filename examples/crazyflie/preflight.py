"""Before the first real flight: the exported policy flown through the firmware's controller in a second simulator.

    python examples/crazyflie/preflight.py runs/<run>/ckpt_0250.pt              the gate, the grid, PASS or FAIL
    python examples/crazyflie/preflight.py CKPT --no-grid --drones 64          the gate alone, smaller

It exports the checkpoint's C policy (export.py), writes controller_policy_params.h (the action map, the
observation scales, the motors' full thrust from cf2x.urdf, the self-test's stored inputs and actions), compiles
firmware/controller_policy.c with it for this host (the file a Crazyflie app adds to the firmware, flown here by
firmware/sil.c) and flies:
    Genesis, the torch policy          crazyflie_env.py's env, as in training
    MuJoCo, the C controller           mujoco_drone.py: another simulator, 1 kHz, the firmware's units and motor command
each on the nominal drone (its motors' thrust capped at cf2x.urdf's 2.25 x weight in both: the firmware's motor
command ends there) and under "realistic (all at once)" (the gate), then across the grid of motor lag x delay
x thrust-to-weight x noise and pushes (48 cells, each simulator). Figures per drone-minute, as eval.py's.

The gate: in MuJoCo through the controller, the nominal drone meets at least 90 % of its Genesis targets with at
most 0.01 crashes, and under "realistic" at least 70 targets with at most 0.01 crashes. Writes <ckpt>_preflight/
(the build) and <ckpt>_preflight.json (every figure).
"""
import argparse
import ctypes
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]  # the project's files, then this folder's
# Genesis's performance mode compiles its kernels anew for each number of drones (minutes); without it, the kernels
# the tests compiled fly any number of drones (env.init_genesis).
os.environ.setdefault("GS_PERFORMANCE_MODE", "0")

import config  # noqa: E402
import eval as flights  # noqa: E402
import export  # noqa: E402
from logger import write_atomically  # noqa: E402
from mujoco_drone import START, TICK_S, Drones, read_urdf  # noqa: E402

FIRMWARE = os.path.join(HERE, "firmware")
GATE = dict(share_of_genesis_targets=0.9, realistic_targets=70.0, crashes=0.01)
GRID_GOAL = dict(near=(70.0, 0.01), everywhere=(50.0, 0.01))  # (targets, crashes) up to 0.1 s and 1 step; all cells
CONTROL_TICKS = 10  # the policy runs at every 10th tick of the 1 kHz stabilizer loop: 100 Hz
SELFTEST_CASES = 8
HOVER_SECONDS = 10.0  # of each flight that measures the hovering error (a steady state: shorter than the rates')
STM32 = dict(mhz=168, cycles_per_multiply_add=6, cycles_per_activation=200)  # an estimate: see cost()


def parse_args(argv=None):
    p = config.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a ckpt_NNNN.pt of the crazyflie or the hover task")
    p.add_argument("--drones", type=int, default=128, help="drones flown at once in each simulator (default 128)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of flight of the gate's rows (default 60)")
    p.add_argument("--grid-seconds", type=float, default=20.0, help="seconds of flight of each grid cell (default 20)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="fly the 48 cells of the grid in both simulators (default: yes; --no-grid: the gate alone)")
    args = p.parse_args(argv)
    if not 0 < args.drones <= 4096:
        raise config.BadInput(f"--drones must be within 1 and 4096, got {args.drones}")
    for name in ("seconds", "grid_seconds"):
        if not 0.1 <= getattr(args, name) <= 3600:
            raise config.BadInput(f"--{name.replace('_', '-')} must be within 0.1 and 3600, got {getattr(args, name)}")
    return args


def drone_checkpoint(path):
    """The checkpoint, and the crazyflie task's module and Config for it (a hover checkpoint flies in that env)."""
    ckpt = config.load_checkpoint(path)
    task = config.task_module("crazyflie")
    if (ckpt.task.Env.num_obs, ckpt.task.Env.num_actions) != (17, 4) or not hasattr(ckpt.task_cfg, "hover_rpm"):
        raise config.BadInput(f"preflight.py flies drone checkpoints (the hover or crazyflie task), and {path} is "
                              f"of the {ckpt.settings['task']} task")
    return ckpt, task, task.Config(**dataclasses.asdict(ckpt.task_cfg))


def compiler():
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise config.BadInput(f"no C compiler: '{cc}' is not on PATH (install gcc or clang, or set CC)")
    return cc


# ------------------------------------------------------------------------------------------- the controller, built
def params_header(meta, frame, model):
    """controller_policy_params.h: the constants the controller needs, and the self-test's inputs and actions."""
    generator = torch.Generator().manual_seed(0)
    obs = torch.rand(SELFTEST_CASES, 17, generator=generator) * 2 - 1
    obs[:, 3:7] = torch.nn.functional.normalize(obs[:, 3:7], dim=1)
    obs[0] = 0.0
    obs[0, 3] = 1.0  # the start: level, at rest, on the target
    with torch.no_grad():
        actions = model(obs)
    scales = {o["name"]: o["scale"] for o in meta["observation"]}
    rows = lambda t: ",\n  ".join("{" + ", ".join(export.c_float(v) for v in row) + "}" for row in t.tolist())  # noqa
    return f"""/* Generated by preflight.py for {os.path.basename(meta['checkpoint'])}: the policy's action map and
   observation scales (policy.json), the motors' full thrust (cf2x.urdf), the self-test's inputs and actions. */
#define HOVER_RPM {export.c_float(meta['action']['hover_rpm'])}
#define RPM_GAIN {export.c_float(meta['action']['rpm_gain'])}
#define KF {export.c_float(frame.kf)}  /* thrust [N] = KF rpm^2 */
#define MAX_THRUST_N {export.c_float(frame.max_thrust)}  /* one motor at full power: a normalized force of 1 */
#define OBS_REL_POS_SCALE {export.c_float(scales['target_x - x'])}
#define OBS_LIN_VEL_SCALE {export.c_float(scales['velocity_x'])}
#define OBS_ANG_VEL_SCALE {export.c_float(scales['angular_velocity_x'])}
#define SELFTEST_CASES {SELFTEST_CASES}
#define SELFTEST_TOLERANCE 1e-4f
static const float SELFTEST_OBS[SELFTEST_CASES][17] = {{
  {rows(obs)}}};
static const float SELFTEST_ACTION[SELFTEST_CASES][4] = {{
  {rows(actions)}}};
"""


def build(ckpt, path, out, cc):
    """Export the C policy into `out`, write the params header, compile the controller in the loop; the library and
    the deployed torch model (for parity)."""
    os.makedirs(out, exist_ok=True)
    _, meta = export.export(ckpt, path, out, {"c"})
    weights = ckpt.state["policy"]
    policy = config.build_policy(ckpt.settings, 17, 4)
    policy.load_state_dict(weights)
    model = export.DeployedPolicy(policy, ckpt.settings["activation"], 1.0).eval()
    header = params_header(meta, read_urdf(), model)
    write_atomically(os.path.join(out, "controller_policy_params.h"), lambda tmp: open(tmp, "w").write(header))
    library = os.path.join(out, "sil.so")
    command = [cc, "-O2", "-std=c99", "-shared", "-fPIC", "-I", out, "-I", FIRMWARE, os.path.join(FIRMWARE, "sil.c"),
               os.path.join(out, "policy.c"), "-lm", "-o", library]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode:
        raise RuntimeError(f"compiling the controller failed:\n{' '.join(command)}\n{built.stderr}")
    return Controller(library), model, meta


class Controller:
    """firmware/sil.c through ctypes: one controller per drone, stepped at every 1 ms tick."""

    def __init__(self, library):
        self.lib = ctypes.CDLL(library)
        self.lib.sil_state_bytes.restype = ctypes.c_size_t
        self.bytes = self.lib.sil_state_bytes()
        self.buffers = {}  # per number of drones: the float32 arrays handed to C, and their pointers

    def start(self, slots, envs):
        """Init, self-test and arm the controllers of envs [K] bool; the self-test's verdicts [n]."""
        return np.array([self.lib.sil_start(ptr(slots[k])) for k in np.flatnonzero(envs)], dtype=bool)

    def tick(self, slots, tick, target, setpoint_ms, pos, vel, quat_wxyz, gyro_rad):
        """One tick of len(slots) drones, their state in SI units as mujoco_drone.Drones.sense() gives it ->
        normalized forces [K, 4] and whether each drone's policy is flying [K] bool."""
        n = len(slots)
        if n not in self.buffers:
            arrays = [np.zeros((n, k), np.float32) for k in (3, 3, 3, 4, 3, 4)] + [np.zeros(n, np.uint32),
                                                                                  np.zeros(n, np.int32)]
            self.buffers[n] = arrays, [ptr(a) for a in arrays]
        (target32, pos32, vel32, xyzw, gyro_deg, forces, stamp, flying), pointers = self.buffers[n]
        target32[:], pos32[:], vel32[:], stamp[:] = target, pos, vel, setpoint_ms
        xyzw[:, :3], xyzw[:, 3] = quat_wxyz[:, 1:], quat_wxyz[:, 0]
        np.degrees(gyro_rad, out=gyro_deg, casting="unsafe")
        t, p, v, q, g, f, s, fly = pointers
        self.lib.sil_tick(ctypes.c_int(n), ptr(slots), ctypes.c_uint32(tick), t, s, p, v, q, g, f, fly)
        return forces.copy(), flying.astype(bool)

    def act(self, obs):  # the bare C policy: obs [B, 17] -> actions [B, 4]
        out = np.zeros((len(obs), 4), np.float32)
        for row, action in zip(np.ascontiguousarray(obs, dtype=np.float32), out):
            self.lib.policy_act(ptr(row), ptr(action))
        return out

    def slots(self, count):
        return np.zeros((count, self.bytes), np.uint8)


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def cost(meta):
    """FLOPs of one policy call (a multiply-add is 2), and an estimate of its cycles on the Crazyflie 2.1's STM32F405
    (Cortex-M4F at 168 MHz, single-precision FPU): a multiply-add's two loads, its multiply-accumulate and the loop
    about 6 cycles, each activation (tanhf, expm1f from the C library) about 200."""
    size = meta["c_footprint"]
    activations = sum(v for k, v in size.items() if k.endswith("_calls"))
    cycles = size["multiply_adds"] * STM32["cycles_per_multiply_add"] + activations * STM32["cycles_per_activation"]
    seconds = cycles / (STM32["mhz"] * 1e6)
    return {"flops": 2 * size["multiply_adds"], "activations": activations, "stm32_cycles": cycles,
            "stm32_ms": 1e3 * seconds, "share_of_period": seconds * meta["control_rate_hz"]}


# ------------------------------------------------------------------------------------------------------ the flights
def draw_targets(rng, cfg, n):
    return rng.uniform(cfg.target_low, cfg.target_high, (n, 3))


def fly_mujoco(controller, cfg, condition, drones, seconds, seed, hold=False):
    """Fly `drones` MuJoCo drones through their controllers for `seconds` of flight each (the warm-ups, held in
    place, not counted), with the Genesis task's targets, crashes and 15 s episodes checked at every control step.
    hold: the target stays at the start (the hovering error). Returns the rates and the mean distance to target."""
    sim, rng = Drones(drones, condition, seed, CONTROL_TICKS), np.random.default_rng(seed)
    slots, every = controller.slots(drones), np.ones(drones, dtype=bool)
    if not controller.start(slots, every).all():
        raise RuntimeError("the controller's self-test failed on this host")
    target = np.tile(START, (drones, 1)) if hold else draw_targets(rng, cfg, drones)
    crash_box, episode_ticks = np.array(cfg.crash_rel_pos), np.zeros(drones, dtype=int)
    flown = targets = crashes = 0
    distance = 0.0
    tick = 0
    while flown < drones * seconds / TICK_S:
        tick += 1
        forces, flying = controller.tick(slots, tick, target, np.full(drones, tick), *sim.sense())
        sim.step(forces)
        sim.hold(~flying)
        if tick % CONTROL_TICKS:
            continue
        pos = sim.data.qpos.reshape(drones, 7)[:, :3]
        rel = target - pos
        dist = np.linalg.norm(rel, axis=1)
        reached = flying & (dist < cfg.at_target_dist)
        crashed = flying & ((np.abs(rel) > crash_box).any(1) | (pos[:, 2] < cfg.crash_min_height))
        episode_ticks += CONTROL_TICKS * flying
        done = crashed | (episode_ticks >= round(cfg.episode_length_s / TICK_S))
        flown += CONTROL_TICKS * int(flying.sum())
        distance += float(dist[flying].sum()) * CONTROL_TICKS
        targets, crashes = targets + int(reached.sum()), crashes + int(crashed.sum())
        if not hold:
            target[reached | done] = draw_targets(rng, cfg, int((reached | done).sum()))
        if done.any():
            sim.reset(done)
            controller.start(slots, done)
            episode_ticks[done] = 0
    minutes = flown * TICK_S / 60
    return {"targets": targets / minutes, "crashes": crashes / minutes, "distance_m": distance / flown}


def fly_genesis(policy, env, condition, seconds, seed):
    env.perturb_with(condition)
    flights.reseed(env, seed)
    _, flown, means, _ = flights.fly(policy, env, round(seconds / env.dt), noise=False)
    rates = flights.counted(flown, env)
    return {"targets": rates["targets_per_drone_min"], "crashes": rates["crashes_per_drone_min"],
            "distance_m": means["mean_distance_m"]}


def conditions(task, cfg):
    """The gate's two conditions and the grid's 48, each every perturbation setting (crazyflie_env's SETTINGS)."""
    base = {**task.UNPERTURBED, "push_interval_s": cfg.push_interval_s}
    realistic = {**base, **task.PERTURBATIONS["realistic (all at once)"], **task.CAP}
    gate = {"nominal": {**base, **task.CAP}, "realistic": realistic}  # (the firmware caps MuJoCo's motors always)
    grid = {}
    for (mass, thrust), level, lag, delay in itertools.product(((0.9, 1.15), (1.2, 0.85)), (1, 2),
                                                               (0.025, 0.05, 0.1, 0.15), (0, 1, 2)):
        grid[(mass, thrust, level, lag, delay)] = {
            **realistic, "motor_lag_s": (lag, lag), "action_delay": (delay, delay), "mass_scale": (mass, mass),
            "thrust_scale": (thrust, thrust), "obs_noise": tuple(level * s for s in task.NOISE),
            "push_force": level * task.PUSH["push_force"], "push_torque": level * task.PUSH["push_torque"]}
    return gate, grid


# -------------------------------------------------------------------------------------------------------- the report
def gate_verdict(rows):
    failed = []
    nominal, realistic = rows["MuJoCo, C controller, nominal"], rows["MuJoCo, C controller, realistic"]
    wanted = GATE["share_of_genesis_targets"] * rows["Genesis, torch policy, nominal"]["targets"]
    if nominal["targets"] < wanted:
        failed.append(f"MuJoCo nominal: {nominal['targets']:.1f} targets < {wanted:.1f} (90 % of Genesis's)")
    if realistic["targets"] < GATE["realistic_targets"]:
        failed.append(f"MuJoCo realistic: {realistic['targets']:.1f} targets < {GATE['realistic_targets']:.0f}")
    for name, row in (("nominal", nominal), ("realistic", realistic)):
        if row["crashes"] > GATE["crashes"]:
            failed.append(f"MuJoCo {name}: {row['crashes']:.3f} crashes > {GATE['crashes']}")
    return failed


def grid_misses(grid):
    misses = []
    for (mass, thrust, level, lag, delay), row in grid.items():
        targets, crashes = GRID_GOAL["near" if lag <= 0.1 and delay <= 1 else "everywhere"]
        if row["targets"] < targets or row["crashes"] > crashes:
            misses.append(f"lag {lag} s, delay {delay}, mass x{mass} thrust x{thrust}, noise and pushes x{level}: "
                          f"{row['targets']:.1f} / {row['crashes']:.3f} (goal >= {targets:.0f} / <= {crashes})")
    return misses


def print_grid(name, grid):
    print(f"\n{name}: targets / crashes per drone-minute; rows: mass, thrust, noise and pushes, motor lag; "
          f"columns: delay 0, 1, 2 control steps")
    for (mass, thrust, level, lag), group in itertools.groupby(grid.items(), key=lambda item: item[0][:4]):
        cells = "".join(f"{row['targets']:8.1f} /{row['crashes']:6.3f}" for _, row in group)
        print(f"  mass x{mass:<4} thrust x{thrust:<4} noise x{level}  lag {lag:<5} s{cells}")


def main(argv=None):
    with config.refusing("preflight.py"):
        args = parse_args(argv)
        ckpt, task, cfg = drone_checkpoint(args.checkpoint)
        cc = compiler()
        out = os.path.splitext(args.checkpoint)[0] + "_preflight"
        config.check_writable(out)
    controller, model, meta = build(ckpt, args.checkpoint, out, cc)
    obs = torch.rand(4096, 17, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        parity = float(np.abs(controller.act(obs.numpy()) - model(obs).numpy()).max())
    spent = cost(meta)
    print(f"C policy = torch policy within {parity:.1e} over 4096 inputs; per call {spent['flops']:,} FLOPs and "
          f"{spent['activations']} activations, about {spent['stm32_cycles'] / 1e3:.0f} k cycles on the STM32F405: "
          f"{spent['stm32_ms']:.2f} ms, {100 * spent['share_of_period']:.1f} % of the 10 ms control period")

    seed = ckpt.settings["seed"] + 20_000  # draws of their own, not training's or eval.py's
    env = task.Env(args.drones, device="cpu", seed=seed, cfg=cfg)
    holding = task.Env(args.drones, device="cpu", seed=seed, cfg=dataclasses.replace(
        cfg, target_low=cfg.init_pos, target_high=cfg.init_pos))  # a target that stays put: the hovering error
    policy = config.build_policy(ckpt.settings, 17, 4)
    policy.load_state_dict(ckpt.state["policy"])
    gate, grid = conditions(task, cfg)
    rows = {}
    print(f"\n{args.drones} drones x {args.seconds:g} s in each simulator    targets/min  crashes/min  hovering error "
          f"({HOVER_SECONDS:g} s)")
    for name, condition in gate.items():
        for sim in ("Genesis, torch policy", "MuJoCo, C controller"):
            if sim.startswith("Genesis"):
                row = fly_genesis(policy, env, condition, args.seconds, seed)
                row["hover_error_m"] = fly_genesis(policy, holding, condition, HOVER_SECONDS, seed)["distance_m"]
            else:
                row = fly_mujoco(controller, cfg, condition, args.drones, args.seconds, seed)
                row["hover_error_m"] = fly_mujoco(controller, cfg, condition, args.drones, HOVER_SECONDS, seed,
                                                  hold=True)["distance_m"]
            rows[f"{sim}, {name}"] = row
            print(f"  {sim + ', ' + name:<42s}{row['targets']:11.1f}{row['crashes']:13.3f}"
                  f"{100 * row['hover_error_m']:13.1f} cm", flush=True)
    report = {"checkpoint": os.path.abspath(args.checkpoint), "drones": args.drones, "seconds": args.seconds,
              "parity_max_abs": parity, "cost": spent, "gate": rows}
    if args.grid:
        flown = {}
        for sim in ("Genesis", "MuJoCo"):
            flown[sim] = {key: (fly_genesis(policy, env, c, args.grid_seconds, seed) if sim == "Genesis" else
                                fly_mujoco(controller, cfg, c, args.drones, args.grid_seconds, seed))
                          for key, c in grid.items()}
            print_grid(f"{sim} ({args.drones} drones x {args.grid_seconds:g} s a cell)", flown[sim])
        misses = grid_misses(flown["MuJoCo"])
        print(f"\nthe grid's goal (>= 70 targets and <= 0.01 crashes up to 0.1 s and 1 step, >= 50 and <= 0.01 "
              f"everywhere), in MuJoCo: {48 - len(misses)} of 48 cells meet it" + "".join(f"\n  {m}" for m in misses))
        report["grid"] = {sim: [{"mass": k[0], "thrust": k[1], "noise_and_pushes": k[2], "motor_lag_s": k[3],
                                 "delay": k[4], **row} for k, row in cells.items()] for sim, cells in flown.items()}
        report["grid_misses"] = misses
    failed = gate_verdict(rows)
    report["verdict"] = "FAIL" if failed else "PASS"
    write_atomically(os.path.splitext(args.checkpoint)[0] + "_preflight.json",
                     lambda tmp: open(tmp, "w").write(json.dumps(report, indent=2)))
    print("\n" + ("FAIL: " + "; ".join(failed) if failed else "PASS: the gate's bars are met in MuJoCo through the "
                                                              "controller, nominal and realistic"))
    return report


if __name__ == "__main__":
    main()
