"""Fly a trained policy on a batch of drones and measure it: what to run after train.py.

    python eval.py runs/<run>/ckpt_0250.pt                    256 drones x 30 s, the deterministic policy
    python eval.py CKPT --drones 1024 --seconds 60            the size of the figures in README.md
    python eval.py CKPT --noise                               flown with the training policy's action noise
    python eval.py CKPT --video | --viewer                    an mp4 of drone 0 | Genesis's viewer (a display)

Prints targets reached (within 0.1 m; a new one is then drawn) and crashes per drone-minute, counted over
every step flown with training's own episode bookkeeping (env.EpisodeStats), and the mean and 95th-percentile
distance to the current target. Writes <ckpt>_flight.png (one drone's position and target against time, and
the distance to target) and the run's learning_curve.png (from its metrics.jsonl), with matplotlib.
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

from train import build_policy, load_checkpoint


def fail(message):
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line and exit status 2, not the usage text
    p.add_argument("checkpoint", help="a ckpt_NNNN.pt written by train.py")
    p.add_argument("--drones", type=int, default=256, help="drones flown at once (default 256)")
    p.add_argument("--seconds", type=float, default=30.0, help="simulated seconds of flight (default 30)")
    p.add_argument("--noise", action="store_true", help="sample actions as in training instead of the mean")
    p.add_argument("--video", action="store_true", help="save <ckpt>_flight.mp4 of drone 0")
    p.add_argument("--viewer", action="store_true", help="open Genesis's interactive viewer")
    args = p.parse_args(argv)
    if not (args.drones > 0 and args.seconds > 0):
        fail(f"--drones and --seconds must be > 0, got {args.drones} and {args.seconds}")
    if args.viewer and sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                               or os.environ.get("WAYLAND_DISPLAY")):
        fail("--viewer needs a display and none was found (DISPLAY is unset): use --video to save an mp4 instead")
    return args


def fly(policy, env, steps, noise):
    """Fly all drones `steps` steps from a reset. Returns the EpisodeStats figures of the episodes that ended and of
    all flight, the distance to target of every drone [steps, N], drone 0's position and target [steps, 6]."""
    from env import EpisodeStats
    episodes = EpisodeStats(env.device)
    distance = torch.zeros(steps, env.num_envs, device=env.device)
    trace = torch.zeros(steps, 6, device=env.device)
    obs = env.reset(random_episode_start=False)
    with torch.no_grad():
        for t in range(steps):
            obs, _, done, info = env.step(policy.act(obs).actions if noise else policy.act_deterministic(obs))
            episodes.add(done, info["episode"])
            distance[t] = torch.linalg.vector_norm(env.target_pos - env.base_pos, dim=-1)
            trace[t] = torch.cat([env.base_pos[0], env.target_pos[0]])
            trace[t, :3].masked_fill_(done[0], float("nan"))  # a gap in the line where an episode ended
    everything = copy.deepcopy(episodes)
    everything.add(~done, info["episode"])  # the episodes still flying: their sums so far
    return episodes.read(env.dt), everything.read(env.dt), distance.cpu().numpy(), trace.cpu().numpy()


def plot_flight(trace, distance, dt, path, seconds=10):
    import matplotlib.pyplot as plt
    steps = min(len(trace), round(seconds / dt))  # the first 10 s: longer is a tangle
    trace, distance, t = trace[:steps], distance[:steps], np.arange(steps) * dt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i, (axis, color) in enumerate(zip("xyz", ("C0", "C1", "C2"))):
        top.plot(t, trace[:, i], color=color, label=f"drone {axis}")
        top.plot(t, trace[:, 3 + i], color=color, ls="--", lw=1, label=f"target {axis}")
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


def plot_learning_curve(run_dir):
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        by_iteration = {r["iteration"]: r for r in map(json.loads, f)}  # after a resume, the newest row wins
    rows = [r for _, r in sorted(by_iteration.items()) if r["episodes"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("targets_per_drone_min", "crashes_per_drone_min")):
        ax.plot([r["elapsed_s"] / 60 for r in rows], [r[key] for r in rows])
        ax.set(xlabel="minutes of training", title=key.replace("_", " ").replace("drone min", "drone-minute"))
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=0.01)  # from ~100 at the start down to the 0.01 that matters
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt, cfg = load_checkpoint(args.checkpoint)
    except ValueError as e:
        fail(e)
    from env import HoverConfig, HoverEnv  # genesis starts only after the arguments were checked
    task = HoverConfig(**ckpt.get("task", {}))  # the observation scales the policy was trained with
    env = HoverEnv(args.drones, device="cuda" if torch.cuda.is_available() else "cpu", seed=cfg.seed + 10_000,
                   cfg=task, show_viewer=args.viewer, record_camera=args.video)
    policy = build_policy(cfg, env.num_obs, env.num_actions)
    policy.load_state_dict(ckpt["policy"])
    policy.to(env.device)
    stem = os.path.splitext(args.checkpoint)[0]
    if args.video:  # the camera renders itself as the scene steps, and streams frames to the file
        env.camera.start_recording(save_to_filename=stem + "_flight.mp4", fps=50)
    torch.manual_seed(cfg.seed + 10_000)  # the action noise of --noise
    steps = round(args.seconds / env.dt)
    ended, flown, distance, trace = fly(policy, env, steps, args.noise)
    if args.video:
        env.camera.stop_recording()
    minutes = args.drones * steps * env.dt / 60
    report = {"checkpoint": args.checkpoint, "iteration": ckpt["iteration"], "drones": args.drones,
              "seconds": steps * env.dt, "policy": "with action noise" if args.noise else "deterministic",
              "targets_per_drone_min": flown["targets_per_drone_min"],
              "crashes_per_drone_min": flown["crashes_per_drone_min"],
              "crashes": round(flown["crashes_per_drone_min"] * minutes), "drone_minutes": minutes,
              "mean_distance_m": float(distance.mean()), "p95_distance_m": float(np.percentile(distance, 95)),
              "episodes_ended": ended["episodes"], "mean_episode_length_s": ended.get("episode_length", 0) * env.dt}
    for k, v in report.items():
        print(f"  {k:<22s} {v:.3f}" if isinstance(v, float) else f"  {k:<22s} {v}")
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        return report
    plot_flight(trace, distance, env.dt, stem + "_flight.png")
    if os.path.isfile(os.path.join(os.path.dirname(args.checkpoint), "metrics.jsonl")):
        plot_learning_curve(os.path.dirname(args.checkpoint) or ".")
    print(f"  wrote {stem}_flight.png and the run's learning_curve.png")
    return report


if __name__ == "__main__":
    main()
