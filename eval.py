"""Fly a trained policy on a batch of envs and measure it: what to run after train.py.

    python eval.py runs/<run>/ckpt_0200.pt                    256 envs x 30 s, the deterministic policy
    python eval.py CKPT --envs 1024 --seconds 60              the size of the figures in README.md
    python eval.py CKPT --noise                               flown with the training policy's action noise
    python eval.py CKPT --perturbations [NAME ...]            under each of its task's PERTURBATIONS (crazyflie)
    python eval.py CKPT --task crazyflie --perturbations      a hover policy in the Crazyflie task's env
    python eval.py CKPT --video | --viewer                    an mp4 of env 0 | Genesis's viewer (a display)

The checkpoint names its task and the task's settings; the env is built with them. Prints the task's counts per
env-minute (targets and crashes per drone-minute; falls per robot-minute), counted over every step flown with
training's own episode bookkeeping (logger.EpisodeStats), and the mean of each series the env measures (the
drone's distance to its target; the Go2's velocities and height). Writes <ckpt>_flight.png (those series over the
first 10 s) and the run's learning_curve.png (from its metrics.jsonl), where matplotlib is installed.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import sys

import torch

import config
from logger import EpisodeStats

MAX_SECONDS = 3600  # of simulated flight: 360,000 steps of 100 Hz, many hours on a CPU
PLOT_SECONDS = 10.0  # the picture's span: longer is a tangle


def parse_args(argv=None):
    p = config.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a ckpt_NNNN.pt written by train.py")
    p.add_argument("--envs", "--drones", "--robots", dest="envs", type=int, default=256,
                   help="envs flown at once (default 256)")
    p.add_argument("--seconds", type=float, default=30.0, help=f"simulated seconds of flight (default 30, at most "
                                                               f"{MAX_SECONDS})")
    p.add_argument("--noise", action="store_true", help="sample actions as in training instead of the mean")
    p.add_argument("--task", help="fly in this task's env instead of the checkpoint's (its Config must take the "
                                  "checkpoint's settings: a hover checkpoint flies in the crazyflie task)")
    p.add_argument("--perturbations", nargs="*", metavar="NAME",
                   help="fly each of the task's PERTURBATIONS (the Crazyflie's: motor lag, delay, mass, thrust, "
                        "sensor noise, pushes, then all at once), or only the NAMEd ones, each on the same "
                        "targets; print one table")
    p.add_argument("--video", action="store_true", help="save <ckpt>_flight.mp4 of env 0")
    p.add_argument("--viewer", action="store_true", help="open Genesis's interactive viewer")
    args = p.parse_args(argv)
    if not (0 < args.envs <= 2 ** 20):
        raise config.BadInput(f"--envs must be within 1 and {2 ** 20}, got {args.envs}")
    if not (0 < args.seconds <= MAX_SECONDS):  # (NaN fails this too)
        raise config.BadInput(f"--seconds must be within 0 and {MAX_SECONDS}, got {args.seconds}")
    if args.viewer and sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                               or os.environ.get("WAYLAND_DISPLAY")):
        raise config.BadInput("--viewer needs a display and none was found (DISPLAY is unset): use --video to save "
                              "an mp4 instead")
    return args


def fly_as(ckpt, args):
    """(task module, its Config) to fly: the checkpoint's own, or --task's built from the checkpoint's settings."""
    if args.task is None:
        task, task_cfg = ckpt.task, ckpt.task_cfg
    else:
        task = config.task_module(args.task)
        try:
            task_cfg = task.Config(**dataclasses.asdict(ckpt.task_cfg))
        except TypeError:
            raise config.BadInput(f"the {args.task} task does not take the settings of the checkpoint's task, "
                                  f"{ckpt.settings['task']}") from None
        if (task.Env.num_obs, task.Env.num_actions) != (ckpt.task.Env.num_obs, ckpt.task.Env.num_actions):
            raise config.BadInput(f"the {args.task} task's observations and actions are not the checkpoint's")
        config.check(task_cfg)
    name = args.task or ckpt.settings["task"]
    if args.perturbations is not None and not hasattr(task, "PERTURBATIONS"):
        raise config.BadInput(f"the {name} task names no perturbations (its module has no PERTURBATIONS); a drone "
                              f"checkpoint flies them with --task crazyflie")
    unknown = [n for n in args.perturbations or () if n not in task.PERTURBATIONS]
    if unknown:
        raise config.BadInput(f"no perturbation named {unknown[0]!r}; the {name} task's: "
                              f"{', '.join(task.PERTURBATIONS)}")
    if args.seconds < task_cfg.dt:
        raise config.BadInput(f"--seconds must be at least one control step, {task_cfg.dt} s, got {args.seconds}")
    return task, task_cfg


def reseed(env, seed):
    """Every generator the env holds and torch's (the action noise of --noise): the same draws for every flight."""
    for i, g in enumerate(g for g in vars(env).values() if isinstance(g, torch.Generator)):
        g.manual_seed(seed + i)
    torch.manual_seed(seed)


def fly(policy, env, steps, noise, plot_steps=0):
    """Fly all envs `steps` steps from a reset. Returns the EpisodeStats figures of the episodes that ended and of
    all flight (those still going, counted so far), the mean of each env.measure() series over every step and env,
    and the first plot_steps steps of each series (numpy, [steps, N]). Nothing grows with `steps`."""
    episodes = EpisodeStats(env.rates, env.unit, env.dt)
    sums, head = {}, {}
    obs = env.reset(random_episode_start=False)
    with torch.no_grad():
        for t in range(steps):
            obs, _, done, info = env.step(policy.act(obs).actions if noise else policy.act_deterministic(obs))
            episodes.add(done, info["episode"])
            for key, value in env.measure().items():
                sums[key] = value.double().sum() + sums.get(key, 0.0)  # on the device: no sync per step
                if t < plot_steps:
                    head.setdefault(key, []).append(value.clone())
    everything = copy.deepcopy(episodes)
    everything.add(~done, info["episode"])  # the episodes still going: their sums so far
    means = {f"mean_{key}": float(total) / (steps * env.num_envs) for key, total in sums.items()}
    return episodes.read(), everything.read(), means, {k: torch.stack(v).cpu().numpy() for k, v in head.items()}


def counted(flown, env):
    """The rates per env-minute of a flight, and the counts they come from."""
    unit = env.unit
    return {**{f"{k}_per_{unit}_min": flown.get(f"{k}_per_{unit}_min", 0.0) for k in env.rates},
            **{k: round(flown.get(f"episode_{k}", 0.0) * flown["episodes"]) for k in env.rates}}


def perturbation_table(policy, env, task, names, steps, args, seed):
    """Fly the same flight under each of the task's PERTURBATIONS; print and return the rates of each."""
    unit, rows = env.unit, {}
    print(f"  {args.envs} {unit}s x {steps * env.dt:g} s, the {'training' if args.noise else 'deterministic'} policy:")
    print(f"  {'perturbation':<26s}" + "".join(f"{k + '_per_' + unit + '_min':>24s}" for k in env.rates)
          + f"{env.rates[-1]:>10s}")
    for name in names:
        env.perturb_with(task.PERTURBATIONS[name])
        reseed(env, seed)  # the same targets under every perturbation
        rows[name] = counted(fly(policy, env, steps, args.noise)[1], env)
        print(f"  {name:<26s}" + "".join(f"{rows[name][f'{k}_per_{unit}_min']:24.3f}" for k in env.rates)
              + f"{rows[name][env.rates[-1]]:10d}", flush=True)
    return {"checkpoint": args.checkpoint, f"{unit}s": args.envs, "seconds": steps * env.dt, "perturbations": rows}


def plot_flight(head, dt, path):
    """Each measured series over the first seconds: env 0, the median and the 5-95 % band of all envs."""
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(len(head), 1, figsize=(9, 2.6 * len(head)), sharex=True, squeeze=False)
    for ax, (key, values) in zip(axes[:, 0], head.items()):
        t = np.arange(len(values)) * dt
        ax.fill_between(t, *np.percentile(values, [5, 95], axis=1), color="gray", alpha=0.3, lw=0, label="5-95 %")
        ax.plot(t, np.median(values, axis=1), color="gray", lw=1, label=f"median of {values.shape[1]}")
        ax.plot(t, values[:, 0], label="env 0")
        ax.set(ylabel=key.replace("_", " "))
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set(xlabel="time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_learning_curve(run_dir, unit, rates):
    import matplotlib.pyplot as plt
    by_iteration = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            by_iteration[row["iteration"]] = row  # after a resume, the newest row wins
    rows = [r for _, r in sorted(by_iteration.items()) if r["episodes"]]
    keys = ["episode_return"] + [f"{name}_per_{unit}_min" for name in rates]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["elapsed_s"] / 60 for r in rows], [r[key] for r in rows])
        ax.set(xlabel="minutes of training", title=key.replace("_", " ").replace(f"{unit} min", f"{unit}-minute"))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    with config.refusing("eval.py"):
        args = parse_args(argv)
        ckpt = config.load_checkpoint(args.checkpoint)
        task, task_cfg = fly_as(ckpt, args)
    seed = ckpt.settings["seed"] + 10_000  # draws of their own, not training's
    env = task.Env(args.envs, device="cuda" if torch.cuda.is_available() else "cpu", seed=seed, cfg=task_cfg,
                   show_viewer=args.viewer, record_camera=args.video)
    policy = config.build_policy(ckpt.settings, env.num_obs, env.num_actions)
    policy.load_state_dict(ckpt.state["policy"])
    policy.to(env.device)
    stem, steps = os.path.splitext(args.checkpoint)[0], round(args.seconds / env.dt)
    if args.video:  # the camera renders itself as the scene steps, and streams frames to the file
        env.camera.start_recording(save_to_filename=stem + "_flight.mp4", fps=round(1 / env.dt))
    try:
        if args.perturbations is not None:
            return perturbation_table(policy, env, task, args.perturbations or list(task.PERTURBATIONS), steps, args,
                                      seed)
        reseed(env, seed)
        ended, flown, means, head = fly(policy, env, steps, args.noise, plot_steps=round(PLOT_SECONDS / env.dt))
    finally:
        if args.video:
            env.camera.stop_recording()  # (Genesis writes the mp4 here)
    unit, minutes = env.unit, args.envs * steps * env.dt / 60
    report = {"checkpoint": args.checkpoint, "task": args.task or ckpt.settings["task"],
              "iteration": ckpt.state["iteration"], f"{unit}s": args.envs, "seconds": steps * env.dt,
              "policy": "with action noise" if args.noise else "deterministic", **counted(flown, env),
              f"{unit}_minutes": minutes, **means, "episodes_ended": ended["episodes"],
              "mean_episode_length_s": ended.get("episode_length", math.nan) * env.dt}
    for k, v in report.items():
        print(f"  {k:<28s} {v:.3f}" if isinstance(v, float) else f"  {k:<28s} {v}")
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("  no picture: matplotlib is not installed (pip install matplotlib)")
        return report
    plot_flight(head, env.dt, stem + "_flight.png")
    if os.path.isfile(os.path.join(os.path.dirname(args.checkpoint), "metrics.jsonl")):
        plot_learning_curve(os.path.dirname(args.checkpoint) or ".", unit, env.rates)
    print(f"  wrote {stem}_flight.png and the run's learning_curve.png")
    return report


if __name__ == "__main__":
    main()
