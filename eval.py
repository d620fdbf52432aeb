"""Fly a trained policy on a batch of envs and measure it: what to run after train.py.

    python eval.py runs/<run>/ckpt_0250.pt                    256 envs x 30 s, the deterministic policy
    python eval.py CKPT --envs 1024 --seconds 60              the size of the figures in README.md
    python eval.py CKPT --noise                               flown with the training policy's action noise
    python eval.py CKPT --perturbations [NAME ...]            the drone under motor lag, delay, noise, ... (env.py)
    python eval.py CKPT --video | --viewer                    an mp4 of env 0 | Genesis's viewer (a display)

The checkpoint names its task (hover, go2) and the task's settings; the env is built with them. Prints the task's
counts per env-minute (targets and crashes per drone-minute; falls per robot-minute), counted over every step
flown with training's own episode bookkeeping (logger.EpisodeStats), and the task's own figures of the flight
(hover: distance to target; go2: forward velocity against the command, base height). Writes <ckpt>_flight.png
(the task's picture of the flight) and the run's learning_curve.png (from its metrics.jsonl), with matplotlib.
"""
import argparse
import copy
import dataclasses
import json
import os
import sys

import torch

from logger import EpisodeStats
from train import TASKS, build_policy, load_checkpoint


def fail(message):
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line and exit status 2, not the usage text
    p.add_argument("checkpoint", help="a ckpt_NNNN.pt written by train.py")
    p.add_argument("--envs", "--drones", "--robots", dest="envs", type=int, default=256,
                   help="envs flown at once (default 256)")
    p.add_argument("--seconds", type=float, default=30.0, help="simulated seconds of flight (default 30)")
    p.add_argument("--noise", action="store_true", help="sample actions as in training instead of the mean")
    p.add_argument("--perturbations", nargs="*", metavar="NAME",
                   help="fly each of the task's perturbations (the drone's: motor lag, delay, mass, thrust, sensor "
                        "noise, pushes, then all at once), or only the NAMEd ones, each on the same targets; print "
                        "one table")
    p.add_argument("--video", action="store_true", help="save <ckpt>_flight.mp4 of env 0")
    p.add_argument("--viewer", action="store_true", help="open Genesis's interactive viewer")
    args = p.parse_args(argv)
    if not (args.envs > 0 and args.seconds > 0):
        fail(f"--envs and --seconds must be > 0, got {args.envs} and {args.seconds}")
    if args.viewer and sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                               or os.environ.get("WAYLAND_DISPLAY")):
        fail("--viewer needs a display and none was found (DISPLAY is unset): use --video to save an mp4 instead")
    return args


def fly(policy, env, steps, noise):
    """Fly all envs `steps` steps from a reset. Returns the EpisodeStats figures of the episodes that ended and of
    all flight, and the trace: env.measure() after every step and `done`, stacked over the steps (numpy)."""
    episodes = EpisodeStats(env.rates, env.unit, env.dt)
    trace = {}
    obs = env.reset(random_episode_start=False)
    with torch.no_grad():
        for _ in range(steps):
            obs, _, done, info = env.step(policy.act(obs).actions if noise else policy.act_deterministic(obs))
            episodes.add(done, info["episode"])
            for key, value in dict(env.measure(), done=done).items():
                trace.setdefault(key, []).append(value.clone())
    everything = copy.deepcopy(episodes)
    everything.add(~done, info["episode"])  # the episodes still going: their sums so far
    trace = {key: torch.stack(values).cpu().numpy() for key, values in trace.items()}
    return episodes.read(), everything.read(), trace


def perturbation_table(policy, env, task, task_cfg, steps, args, seed):
    """Fly the same flight under each of the task's PERTURBATIONS (settings of its Config); print and return the
    rates of each."""
    unit, minutes, rows = env.unit, args.envs * steps * env.dt / 60, {}
    names = [f"{k}_per_{unit}_min" for k in env.rates]
    print(f"  {args.envs} {unit}s x {steps * env.dt:g} s, the {'training' if args.noise else 'deterministic'} policy:")
    print(f"  {'perturbation':<26s}" + "".join(f"{n:>24s}" for n in names) + f"{'count':>10s}")
    for name in args.perturbations or task.PERTURBATIONS:
        env.cfg = dataclasses.replace(task_cfg, **task.PERTURBATIONS[name])
        env.generator.manual_seed(seed)  # the same targets under every perturbation
        torch.manual_seed(seed)
        flown = fly(policy, env, steps, args.noise)[1]
        rows[name] = {n: flown[n] for n in names}
        count = round(flown[names[-1]] * minutes)
        print(f"  {name:<26s}" + "".join(f"{flown[n]:24.3f}" for n in names) + f"{count:10d}", flush=True)
    env.cfg = task_cfg
    return {"checkpoint": args.checkpoint, f"{unit}s": args.envs, "seconds": steps * env.dt, "perturbations": rows}


def plot_learning_curve(run_dir, unit, rates):
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        by_iteration = {r["iteration"]: r for r in map(json.loads, f)}  # after a resume, the newest row wins
    rows = [r for _, r in sorted(by_iteration.items()) if r["episodes"]]
    keys = ["episode_return"] + [f"{name}_per_{unit}_min" for name in rates]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        ax.plot([r["elapsed_s"] / 60 for r in rows], [r[key] for r in rows])
        ax.set(xlabel="minutes of training", title=key.replace("_", " ").replace(f"{unit} min", f"{unit}-minute"))
        ax.grid(alpha=0.3)
        if key.startswith(("crashes", "falls")):
            ax.set_yscale("symlog", linthresh=0.01)  # from ~100 at the start down to the 0.01 that matters
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt, cfg, task_cfg = load_checkpoint(args.checkpoint)
    except ValueError as e:
        fail(e)
    import importlib
    task = importlib.import_module(TASKS[cfg.task])  # genesis starts only after the arguments were checked
    if args.perturbations is not None and not hasattr(task, "PERTURBATIONS"):
        fail(f"the {cfg.task} task names no perturbations (its module has no PERTURBATIONS)")
    unknown = [name for name in args.perturbations or () if name not in task.PERTURBATIONS]
    if unknown:
        fail(f"no perturbation named {unknown[0]!r}; the {cfg.task} task's: {', '.join(task.PERTURBATIONS)}")
    env = task.Env(args.envs, device="cuda" if torch.cuda.is_available() else "cpu", seed=cfg.seed + 10_000,
                   cfg=task_cfg, show_viewer=args.viewer, record_camera=args.video)
    policy = build_policy(cfg, env.num_obs, env.num_actions)
    policy.load_state_dict(ckpt["policy"])
    policy.to(env.device)
    stem = os.path.splitext(args.checkpoint)[0]
    if args.video:  # the camera renders itself as the scene steps, and streams frames to the file
        env.camera.start_recording(save_to_filename=stem + "_flight.mp4", fps=50)
    steps = round(args.seconds / env.dt)
    if args.perturbations is not None:
        return perturbation_table(policy, env, task, task_cfg, steps, args, cfg.seed + 10_000)
    torch.manual_seed(cfg.seed + 10_000)  # the action noise of --noise
    ended, flown, trace = fly(policy, env, steps, args.noise)
    if args.video:
        env.camera.stop_recording()
    unit, minutes = env.unit, args.envs * steps * env.dt / 60
    report = {"checkpoint": args.checkpoint, "task": cfg.task, "iteration": ckpt["iteration"], f"{unit}s": args.envs,
              "seconds": steps * env.dt, "policy": "with action noise" if args.noise else "deterministic",
              **{f"{k}_per_{unit}_min": flown[f"{k}_per_{unit}_min"] for k in env.rates},
              **{k: round(flown[f"{k}_per_{unit}_min"] * minutes) for k in env.rates}, f"{unit}_minutes": minutes,
              **task.flight_figures(trace), "episodes_ended": ended["episodes"],
              "mean_episode_length_s": ended.get("episode_length", 0) * env.dt}
    for k, v in report.items():
        print(f"  {k:<28s} {v:.3f}" if isinstance(v, float) else f"  {k:<28s} {v}")
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        return report
    task.plot_flight(trace, env.dt, stem + "_flight.png")
    if os.path.isfile(os.path.join(os.path.dirname(args.checkpoint), "metrics.jsonl")):
        plot_learning_curve(os.path.dirname(args.checkpoint) or ".", unit, env.rates)
    print(f"  wrote {stem}_flight.png and the run's learning_curve.png")
    return report


if __name__ == "__main__":
    main()
