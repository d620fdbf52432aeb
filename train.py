"""Train one shared policy on thousands of Genesis drones at once, with PPO and a hand-written Adam.

    python train.py                      train (CUDA if present, else the CPU preset)
    python train.py --eval RUN/ckpt.pt   fly a trained policy and measure it
    python train.py --help               every setting

One iteration of the loop below, for N envs and T steps:

    rollout    T times: policy.act(obs [N,17]) -> env.step(actions [N,4])   (env.py, policy.py)
               each step is ONE call for all N envs; the T*N samples go to storage.add()
    storage    GAE advantages and returns over [T, N]                         (storage.py)
    update     epochs x minibatches: PPO loss -> backward -> Adam step       (ppo.py, adam.py)
               Adam overwrites theta in place, so the next rollout acts with the new weights
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

# Idle torch CPU threads sleep instead of spin-waiting; set before torch loads. On an idle 2-core machine
# this costs nothing measurable; with one other busy process, spinning made the PPO update 2x slower (README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from adam import Adam
from policy import ActorCritic, describe
from ppo import PPOConfig, update
from storage import RolloutStorage


@dataclass
class TrainConfig:
    num_envs: int = 8192  # environments stepped together as one batch (the Genesis example's)
    num_steps: int = 100  # steps per env per iteration: a rollout is num_steps x num_envs samples
    max_iterations: int = 301  # total iterations, counting those before a resume
    seed: int = 1  # seeds torch and the env's target sampling
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:K"
    log_dir: str = "runs"  # each run writes config.json, metrics.jsonl and checkpoints to log_dir/run_name
    run_name: str = ""  # empty: a timestamp
    save_interval: int = 50  # iterations between checkpoints (one is always written at the end)
    hidden: tuple = (128, 128)  # actor and critic hidden layers
    init_std: float = 1.0  # initial action std
    normalize_obs: bool = False  # running observation normalization inside the policy
    random_episode_start: bool = True  # spread the first resets over the episode (rsl_rl's init_at_random_ep_len)
    threads_rollout: int = 1  # CPU only: torch threads while the simulator steps (see cpu_threads())
    threads_update: int = 2  # CPU only: torch threads for the PPO update
    workers: int = 1  # CPU only: data-parallel processes train.py starts, each with num_envs envs (see Workers)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# The CPU preset: what learned fastest in wall-clock time on a 2-core machine (measured; see README).
# Two worker processes of 1024 drones x 50 steps: the example's 102,400-sample batch, 1.24x faster than
# one process because each simulator has a core of its own (so each update uses 1 torch thread). The
# observation normalizer lets the policy correct the last centimetres to a target (without it, some runs
# park just outside the 0.1 m that counts), and a smaller initial std (0.3) keeps its flying careful.
CPU_PRESET = dict(num_envs=1024, num_steps=50, workers=2, threads_update=1, normalize_obs=True, init_std=0.3,
                  max_iterations=250)


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


class Workers:
    """Data-parallel training with torch.distributed, one process per GPU (or CPU), launched by torchrun.

    Each worker simulates its own num_envs drones (the global batch grows with the workers) and keeps
    a full copy of the network. They start from rank 0's weights; after every backward the flat
    gradient is averaged with one all-reduce, so every worker takes the same Adam step and theta,
    m and v stay identical everywhere. Without torchrun there is one worker and nothing is reduced."""
    TIMEOUT_S = 600  # a collective waiting longer than this (a dead worker) fails with an error instead of hanging

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0  # only the main worker prints, writes metrics and saves checkpoints

    def start(self, device):
        if self.world > 1:
            import datetime
            import torch.distributed as dist
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=self.TIMEOUT_S))

    def average(self, t):  # in place: t becomes its mean over all workers
        torch.distributed.all_reduce(t)
        return t.div_(self.world)

    def sum(self, t):
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def broadcast(self, t):  # rank 0's t, everywhere
        if self.world > 1:
            torch.distributed.broadcast(t, 0)

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def field_help(cls):
    """The comment after each field of a config dataclass: one place documents a setting, --help shows it."""
    import inspect
    import re
    return dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(cls), re.M))


def boolean(text):
    return text.lower() in ("1", "true", "yes", "on")


def parse_args(argv=None):
    preset = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_PRESET.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Without CUDA, a fresh run starts from the CPU preset: {preset}.")
    for cls, defaults in ((TrainConfig, TrainConfig()), (PPOConfig, PPOConfig())):
        docs = field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name == "ppo":
                continue
            default = getattr(defaults, f.name)
            kind = boolean if isinstance(default, bool) else int if isinstance(default, tuple) else type(default)
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            nargs = "+" if isinstance(default, tuple) else None
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, nargs=nargs, default=None,
                           help=f"{docs.get(f.name, '')} (default {shown})".replace("%", "%%"))
    p.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint")
    p.add_argument("--eval", metavar="CKPT", help="fly the deterministic policy of a checkpoint and report")
    p.add_argument("--eval-envs", type=int, default=256, help="drones flown by --eval (default 256)")
    p.add_argument("--eval-seconds", type=float, default=30.0, help="simulated seconds flown by --eval (default 30)")
    p.add_argument("--video", action="store_true", help="with --eval: save an mp4 of drone 0")
    p.add_argument("--viewer", action="store_true", help="with --eval: open Genesis's interactive viewer")
    return p.parse_args(argv)


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        fail(f"unknown device {name!r}: use auto, cpu, cuda or cuda:K")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name} asked for, but torch sees no CUDA device: use --device cpu")
    return name


def build_config(args, base=None):
    """Defaults, then the CPU preset (fresh CPU runs), then the checkpoint's config (resume/eval), then the flags."""
    cfg = base or TrainConfig()
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    device = resolve_device(explicit.get("device", cfg.device))
    if base is None and device == "cpu":
        cfg = dataclasses.replace(cfg, **CPU_PRESET)
    ppo_names = {f.name for f in dataclasses.fields(PPOConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"ppo"}
    ppo = dataclasses.replace(cfg.ppo, **{k: v for k, v in explicit.items() if k in ppo_names})
    cfg = dataclasses.replace(cfg, ppo=ppo, device=device,
                              **{k: (tuple(v) if k == "hidden" else v) for k, v in explicit.items()
                                 if k in train_names and k != "device"})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Reject bad settings in one line, before any expensive work."""
    positive = {"num_envs": cfg.num_envs, "num_steps": cfg.num_steps, "max_iterations": cfg.max_iterations,
                "save_interval": cfg.save_interval, "learning_rate": cfg.ppo.learning_rate,
                "num_epochs": cfg.ppo.num_epochs, "num_minibatches": cfg.ppo.num_minibatches,
                "threads_rollout": cfg.threads_rollout, "threads_update": cfg.threads_update}
    for name, value in positive.items():
        if not value > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {value}")
    samples = cfg.num_envs * cfg.num_steps
    if samples % cfg.ppo.num_minibatches:
        fail(f"--num-minibatches {cfg.ppo.num_minibatches} does not divide the batch of "
             f"{cfg.num_envs} envs x {cfg.num_steps} steps = {samples} samples")
    if not 0 <= cfg.ppo.gamma <= 1 or not 0 <= cfg.ppo.lam <= 1:
        fail("--gamma and --lam must be within [0, 1]")
    if cfg.workers > 1 and cfg.device != "cpu":
        fail("--workers is for CPU runs; on GPUs start one process per GPU with torchrun --nproc_per_node=GPUS")


def config_from_dict(d):
    d = dict(d, hidden=tuple(d["hidden"]), ppo=PPOConfig(**d["ppo"]))
    return TrainConfig(**d)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return ckpt, config_from_dict(ckpt["config"])
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        fail(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {str(e)[:120]})")


def save_checkpoint(path, policy, optimizer, iteration, elapsed_s, cfg, env):
    """Atomic: write a temporary file, flush it to disk, then rename over the target.
    A crash or kill mid-save leaves the previous file untouched."""
    state = {"iteration": iteration, "elapsed_s": elapsed_s, "config": dataclasses.asdict(cfg),
             "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "env": env.generator.get_state(),
                     "cuda": torch.cuda.get_rng_state() if str(cfg.device).startswith("cuda") else None}}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_policy(cfg, device):
    return ActorCritic(17, 4, hidden=cfg.hidden, init_std=cfg.init_std, normalize_obs=cfg.normalize_obs).to(device)


def cpu_threads(cfg, phase):
    """On CPU, torch's thread count is set per phase (measured on 2 cores, README). The simulator runs its
    kernels on one thread, and between its calls torch only runs small ops: 1 thread is fastest there.
    The update is all torch and uses both cores, or one core per worker when two workers share them."""
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads_rollout if phase == "rollout" else cfg.threads_update)


class EpisodeStats:
    """Sums over the episodes that finished during one iteration, kept on the device (no sync per step)."""
    KEYS = ("count", "return", "length", "targets", "crashed")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), device=device)

    def add(self, done, episode):
        d = done.float()  # [N]
        values = torch.stack([d, episode["return"] * d, episode["length"] * d, episode["targets"] * d,
                              episode["crashed"].float() * d])  # [5, N]
        self.sums += values.sum(1)

    def read(self, dt, workers):
        """Sums over all workers, read with one host sync: per-episode means and per-drone-minute rates."""
        count, ret, length, targets, crashed = workers.sum(self.sums).tolist()
        self.sums.zero_()
        if count == 0:
            return {"episodes": 0}
        minutes = length * dt / 60
        return {"episodes": int(count), "episode_return": ret / count, "episode_length": length / count,
                "targets_per_episode": targets / count, "crashes_per_episode": crashed / count,
                "targets_per_drone_min": targets / minutes, "crashes_per_drone_min": crashed / minutes}


def print_iteration(it, cfg, row):
    fmt = lambda k, f: (f % row[k]) if k in row else "-"
    print(f"iter {it + 1}/{cfg.max_iterations}  steps {row['total_steps']:,}  "
          f"{row['steps_per_s']:,.0f} steps/s  (collect {row['collect_s']:.2f} s, learn {row['learn_s']:.2f} s)  "
          f"elapsed {format_time(row['elapsed_s'])}  eta {format_time(row['eta_s'])}\n"
          f"   episodes {row['episodes']:4d}  return {fmt('episode_return', '%7.2f')}  "
          f"length {fmt('episode_length', '%6.0f')}  targets/ep {fmt('targets_per_episode', '%5.1f')}  "
          f"crashed {fmt('crashes_per_episode', '%4.2f')}  targets/drone-min {fmt('targets_per_drone_min', '%5.1f')}"
          f"  crashes/drone-min {fmt('crashes_per_drone_min', '%6.3f')}\n"
          f"   value {row['value_loss']:.4f}  surrogate {row['surrogate']:+.4f}  entropy {row['entropy']:.3f}  "
          f"kl {row['kl']:.4f}  clip {row['clip_fraction']:.3f}  lr {row['lr']:.1e}  std {row['action_std']:.3f}",
          flush=True)


def format_time(s):
    return f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def train(cfg, resume=None):
    from env import HoverEnv  # imported here: genesis starts only after the settings were checked

    workers = Workers()
    say = print if workers.main else (lambda *args, **kwargs: None)
    device = torch.device(f"cuda:{workers.local_rank}" if cfg.device.startswith("cuda") and workers.world > 1
                          else cfg.device)
    workers.start(device)
    torch.manual_seed(cfg.seed + workers.rank)  # each worker samples its own action noise
    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    say(f"device: {device}  (torch threads: rollout {cfg.threads_rollout}, update {cfg.threads_update})"
        if device.type == "cpu" else f"device: {device} ({torch.cuda.get_device_name(device)})")
    say(f"run directory: {run_dir}\nconfig: {json.dumps(dataclasses.asdict(cfg))}")
    if workers.world > 1:
        say(f"{workers.world} workers x {cfg.num_envs} envs x {cfg.num_steps} steps = "
            f"{workers.world * cfg.num_envs * cfg.num_steps:,} samples per iteration")
    policy = make_policy(cfg, device)
    optimizer = Adam(policy.parameters(), lr=cfg.ppo.learning_rate)
    storage = RolloutStorage(cfg.num_steps, cfg.num_envs, HoverEnv.num_obs, HoverEnv.num_actions, device)
    start, elapsed_before = 0, 0.0  # training time before this process (resume): the clock is cumulative
    if resume is not None:
        try:
            policy.load_state_dict(resume["policy"])
            optimizer.load_state_dict(resume["optimizer"])
        except (RuntimeError, ValueError) as e:
            fail(f"the checkpoint's network does not match this configuration: {str(e).splitlines()[0][:200]}")
        start, elapsed_before = resume["iteration"], resume["elapsed_s"]
        say(f"resuming at iteration {start}")
    workers.broadcast(optimizer.theta)  # one flat tensor: every worker starts from rank 0's weights
    say(describe(policy, optimizer))
    say(f"rollout storage ({cfg.num_steps} steps x {cfg.num_envs} envs, on {device}): "
        f"{sum(storage.nbytes().values()) / 1e6:.1f} MB")
    say(f"building the Genesis scene with {cfg.num_envs} drones (the first build compiles kernels: minutes)")
    cpu_threads(cfg, "rollout")
    # check_actions=False: the per-step NaN check would sync every step; theta is checked once per iteration instead.
    env = HoverEnv(cfg.num_envs, device=str(device), seed=cfg.seed + workers.rank, check_actions=False)
    if resume is not None and workers.main:  # (other workers keep their own seeds)
        torch.set_rng_state(resume["rng"]["torch"])
        env.generator.set_state(resume["rng"]["env"])
        if resume["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
    if workers.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    average = workers.average if workers.world > 1 else None
    episodes = EpisodeStats(device)
    obs = env.reset(random_episode_start=cfg.random_episode_start)
    t_start, it = time.time(), start
    with open(os.path.join(run_dir, "metrics.jsonl") if workers.main else os.devnull, "a") as metrics, \
            StopOnSignal() as stop:
        for it in range(start, cfg.max_iterations):
            t0 = time.time()
            cpu_threads(cfg, "rollout")
            obs = rollout(policy, env, storage, obs, episodes, cfg, average, workers.sum)
            t1 = time.time()
            cpu_threads(cfg, "update")
            losses = update(policy, optimizer, storage.minibatches(cfg.ppo.num_epochs, cfg.ppo.num_minibatches),
                            cfg.ppo, average)
            # The iteration's one host sync: losses, episode sums of all workers, health, a stop request anywhere.
            health = torch.stack([torch.isfinite(optimizer.theta).all() & torch.isfinite(losses["loss"]),
                                  torch.tensor(stop.requested, device=device)]).float()
            row = {k: v.item() for k, v in losses.items()}
            row.update(episodes.read(env.dt, workers), action_std=policy.std.mean().item())
            finite, stop_requested = workers.sum(health).tolist()
            if finite < workers.world:  # never save NaN weights: the last checkpoint on disk stays the last good one
                say(f"train.py: non-finite loss or weights at iteration {it + 1}: stopped without saving; "
                    f"the last good checkpoint is in {run_dir}", file=sys.stderr)
                sys.exit(1)
            t2 = time.time()
            row.update(iteration=it + 1, total_steps=(it + 1) * cfg.num_steps * cfg.num_envs * workers.world,
                       steps_per_s=cfg.num_steps * cfg.num_envs * workers.world / (t2 - t0),
                       collect_s=t1 - t0, learn_s=t2 - t1, elapsed_s=elapsed_before + t2 - t_start,
                       eta_s=(t2 - t_start) / (it + 1 - start) * (cfg.max_iterations - it - 1))
            if workers.main:
                print_iteration(it, cfg, row)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if workers.main and ((it + 1) % cfg.save_interval == 0 or it + 1 == cfg.max_iterations or stop_requested):
                save_checkpoint(os.path.join(run_dir, f"ckpt_{it + 1:04d}.pt"), policy, optimizer, it + 1,
                                row["elapsed_s"], cfg, env)
            if stop_requested:
                break
    workers.close()
    say(f"done at iteration {it + 1} ({format_time(time.time() - t_start)} in this process); checkpoints in {run_dir}")
    if workers.main:
        plot_curves(run_dir)
    return run_dir


def rollout(policy, env, storage, obs, episodes, cfg, average=None, all_sum=None):
    """num_steps steps of all envs into storage, then GAE. obs [N, 17] in, the last obs out.
    average / all_sum: in-place mean / sum over data-parallel workers (None: one process)."""
    storage.clear()
    with torch.no_grad():
        for _ in range(cfg.num_steps):
            # The normalizer (if on) learns every step, as rsl_rl's does, so that it is in use from the first
            # rollout on; each worker merges all workers' moments, so the statistics stay identical everywhere.
            policy.update_normalizer(obs, all_sum)
            actions, log_prob, value, mean, std = policy.act(obs)
            next_obs, reward, done, info = env.step(actions)
            storage.add(obs, actions, reward, done, info["time_outs"], info["final_obs"], value, log_prob, mean, std)
            episodes.add(done, info["episode"])
            obs = next_obs
        # A time-out bootstraps with the value of the observation its episode ended in (storage.py).
        storage.compute_returns(policy.value(obs), policy.value(storage.timed_out_obs()), cfg.ppo.gamma,
                                cfg.ppo.lam, average=average)
    return obs


class StopOnSignal:
    """Ctrl-C or SIGTERM: finish the iteration, save it, exit cleanly. A second signal stops at once;
    the last checkpoint on disk is intact either way, since saves are atomic."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving", flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def plot_curves(run_dir):
    """learning_curve.png from metrics.jsonl, when matplotlib is importable (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        by_iteration = {r["iteration"]: r for r in map(json.loads, f)}  # after a resume, the newest row wins
    rows = [by_iteration[k] for k in sorted(by_iteration)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("episode_return", "targets_per_drone_min", "crashes_per_drone_min")):
        pts = [(r["elapsed_s"] / 60, r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_xlabel("minutes of training")
        if key.startswith("crashes"):
            ax.set_yscale("symlog", linthresh=0.01)  # from ~100 down to the 0.02 that matters
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=100)
    plt.close(fig)


def evaluate(cfg, ckpt, args):
    """Fly the deterministic policy (the action mean) on a batch of drones and measure it."""
    from env import HoverEnv

    env = HoverEnv(args.eval_envs, device=cfg.device, seed=cfg.seed + 10_000, show_viewer=args.viewer,
                   record_camera=args.video)
    policy = make_policy(cfg, env.device)
    policy.load_state_dict(ckpt["policy"])
    steps, n = round(args.eval_seconds / env.dt), env.num_envs
    dist = torch.zeros(steps, n, device=env.device)  # [steps, N] distance to the current target
    track = torch.zeros(steps, min(n, 4), 6, device=env.device)  # [steps, 4, pos+target] for the plot
    sums = torch.zeros(4, device=env.device)  # targets, crashes, episodes ended, their total length
    video = os.path.splitext(args.eval)[0] + "_flight.mp4"
    if args.video:  # the camera renders itself as the scene steps, and streams frames to the file
        env.camera.start_recording(save_to_filename=video, fps=50)
    obs = env.reset(random_episode_start=False)
    with torch.no_grad():
        for t in range(steps):
            obs, _, done, info = env.step(policy.act_deterministic(obs))
            ep = info["episode"]
            sums += torch.stack([(ep["targets"] * done).sum(), (ep["crashed"] & done).sum(), done.sum(),
                                 (ep["length"] * done).sum()])
            dist[t] = torch.linalg.vector_norm(env.target_pos - env.base_pos, dim=-1)
            track[t] = torch.cat([env.base_pos, env.target_pos], -1)[:4]
            track[t, :, :3].masked_fill_(done[:4, None], float("nan"))  # a gap in the line where an episode ended
    if args.video:
        env.camera.stop_recording()
        print(f"video of drone 0: {video}")
    sums[0] += (ep["targets"] * ~done).sum()  # for envs still flying, info["episode"] holds the running sums
    targets, crashes, ended, ended_length = sums.tolist()
    minutes = n * steps * env.dt / 60
    d = dist.flatten()
    report = {"drones": n, "seconds": steps * env.dt, "targets_per_drone_min": targets / minutes,
              "crashes_per_drone_min": crashes / minutes, "mean_distance_m": d.mean().item(),
              "p95_distance_m": d.quantile(0.95).item() if d.numel() <= 2 ** 24 else float("nan"),
              "episodes_ended": int(ended), "mean_episode_length_s": (ended_length / ended * env.dt) if ended else None}
    print(f"evaluation of {args.eval} (iteration {ckpt['iteration']}): {n} drones x {steps * env.dt:.0f} s, "
          f"deterministic policy")
    for k, v in report.items():
        print(f"  {k:<24s} {v:.3f}" if isinstance(v, float) else f"  {k:<24s} {v}")
    plot_tracks(track.cpu(), os.path.splitext(args.eval)[0] + "_tracks.png")
    return report


def plot_tracks(track, path):
    """3-D trajectories of a few drones with their targets, when matplotlib is importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    for i in range(track.shape[1]):
        line, = ax.plot(*track[:, i, :3].T.numpy(), lw=1)
        ax.scatter(*track[:, i, 3:].unique(dim=0).T.numpy(), color=line.get_color(), marker="x", s=40)
    ax.set_xlabel("x (m)"), ax.set_ylabel("y (m)"), ax.set_zlabel("z (m)")
    ax.set_title("drone paths (lines) and their targets (x)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"trajectories: {path}")


def launch_workers(cfg, argv):
    """Start cfg.workers copies of this script as the data-parallel workers of one run on this machine (as
    torchrun would), wait for them, exit with their status. On 2 CPU cores two workers train 1.24x faster
    than one process: each simulator gets a core of its own. The workers run in their own session, so a
    Ctrl-C or SIGTERM reaches them once, from here: they finish the iteration, save and stop."""
    import socket
    import subprocess
    with socket.socket() as s:  # a free port for the workers to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(cfg.workers))
    command = [sys.executable, os.path.abspath(__file__), *argv, "--run-name", cfg.run_name]
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), start_new_session=True)
             for r in range(cfg.workers)]
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: [p.send_signal(signum) for p in procs])
    while None in (codes := [p.poll() for p in procs]):
        if any(codes):  # a worker failed: the others would wait for it at the next all-reduce
            for p in procs:
                p.kill()  # (a no-op for those already finished)
        time.sleep(0.2)
    sys.exit(1 if any(codes) else 0)


def main(argv=None):
    args = parse_args(argv)
    path = args.resume or args.eval
    if args.resume and args.eval:
        fail("give either --resume or --eval, not both")
    if (args.video or args.viewer) and not args.eval:
        fail("--video and --viewer go with --eval CKPT")
    if not (args.eval_envs > 0 and args.eval_seconds > 0):
        fail(f"--eval-envs and --eval-seconds must be > 0, got {args.eval_envs} and {args.eval_seconds}")
    if args.viewer and sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                               or os.environ.get("WAYLAND_DISPLAY")):
        fail("--viewer needs a display and none was found (DISPLAY is unset): use --video to save an mp4 instead")
    ckpt, base = load_checkpoint(path) if path else (None, None)
    if base is not None and args.device is None:
        base = dataclasses.replace(base, device="auto")  # a checkpoint made on a GPU evaluates on a laptop
    if args.eval:
        base = dataclasses.replace(base, workers=1)  # ...and one made by CPU workers on a GPU: one process
    cfg = build_config(args, base)
    if not cfg.run_name:  # resolved once and saved in the config, so a resume continues in the same directory
        cfg = dataclasses.replace(cfg, run_name=time.strftime("%Y-%m-%d_%H-%M-%S"))
    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    if not path and Workers().main and os.path.isdir(run_dir) and os.listdir(run_dir):
        fail(f"{run_dir} already holds a run: pick another --run-name, or continue it with --resume CKPT")
    if args.eval:
        return evaluate(cfg, ckpt, args)
    if cfg.workers > 1 and Workers().world == 1:
        launch_workers(cfg, sys.argv[1:] if argv is None else argv)
    return train(cfg, resume=ckpt)


if __name__ == "__main__":
    main()
