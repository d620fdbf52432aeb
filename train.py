"""Train one shared policy on thousands of Genesis drones at once, with PPO and a hand-written Adam.

    python train.py                      train (CUDA if present, else the CPU preset); --help: every setting
    python eval.py RUN/ckpt_NNNN.pt      then fly the trained policy and measure it

One iteration of the loop in train(), for N envs and T steps:
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
import sys
import time
from dataclasses import dataclass, field

# Idle torch CPU threads sleep, not spin (set before torch loads): spinning ones slowed the update 2x (EXPERIMENTS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import workers as dp  # noqa: E402
from adam import Adam  # noqa: E402
from policy import ActorCritic  # noqa: E402
from ppo import PPOConfig, update  # noqa: E402
from storage import RolloutStorage  # noqa: E402


# ---------------------------------------------------------------------------------------------------- settings
def _setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    num_envs: int = _setting(8192, "drones simulated together as one batch, per worker (the Genesis example's)")
    num_steps: int = _setting(100, "steps per drone per iteration: a rollout is num_steps x num_envs samples")
    max_iterations: int = _setting(301, "iterations of rollout + update, counting those before a resume")
    seed: int = _setting(1, "seeds the network, the action noise and the env's targets")
    device: str = _setting("auto", "auto (CUDA if torch sees it, else CPU), cpu, cuda or cuda:K")
    log_dir: str = _setting("runs", "each run writes config.json, metrics.jsonl and checkpoints to log_dir/run_name")
    run_name: str = _setting("", "the run's directory name; empty: a timestamp")
    save_interval: int = _setting(50, "iterations between checkpoints (one is always written at the end)")
    hidden: tuple = _setting((128, 128), "hidden layer widths of the actor and of the critic")
    init_std: float = _setting(1.0, "initial std of the action noise (learned from there)")
    min_std: float = _setting(0.0, "floor of the action noise's std (0: none)")
    normalize_obs: bool = _setting(False, "running mean/variance normalization of the observations, in the policy")
    progress_speed_cap: float = _setting(0.0, "m/s: progress toward the target pays at most as for this speed "
                                         "(env.HoverConfig; 0: no cap, as in the Genesis example)")
    crash_multiple: float = _setting(1.0, "the crash penalty grows to this multiple of the task's over crash_ramp "
                                     "(1: the task's throughout, as in the Genesis example)")
    crash_ramp: tuple = _setting((100, 200), "iterations over which the crash penalty grows linearly from the "
                                 "task's to crash_multiple times it (held after)")
    random_episode_start: bool = _setting(True, "spread the first time-outs (rsl_rl's init_at_random_ep_len)")
    threads_rollout: int = _setting(1, "CPU only: torch threads while the simulator steps")
    threads_update: int = _setting(2, "CPU only: torch threads for the PPO update")
    workers: int = _setting(1, "CPU only: data-parallel processes started by train.py, each with num_envs drones")
    ppo: PPOConfig = field(default_factory=PPOConfig)


# Without CUDA, a fresh run starts from this preset (printed when applied; flags override it): on 2 CPU cores, the
# best of everything measured (EXPERIMENTS.md). Two workers of 1024 drones x 50 steps (102,400 samples, an eighth
# of the GPU batch), each simulator on a core of its own; the normalizer, an action std held at 0.3 (start and
# floor): with a small batch, it learned faster and crashed less on most seeds than a lower floor; progress paid
# up to 2.5 m/s, so that the drones stop racing at the edge of control, where they crashed; and a crash penalty
# grown tenfold over iterations 100-200, once the drones chase targets (from the start, it made them timid).
CPU_PRESET = dict(num_envs=1024, num_steps=50, workers=2, threads_update=1, normalize_obs=True, init_std=0.3,
                  min_std=0.3, progress_speed_cap=2.5, crash_multiple=10.0, max_iterations=250)
PRESET_FLAGS = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in CPU_PRESET.items())


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def boolean(text):
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")
    return value


def parse_args(argv=None):
    """One flag per field of TrainConfig and PPOConfig, with the field's help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Without CUDA, a fresh run starts from the CPU preset: " + PRESET_FLAGS)
    p.error = fail  # one line and exit status 2, not the usage text
    for f in dataclasses.fields(TrainConfig)[:-1] + dataclasses.fields(PPOConfig):  # [:-1]: not the ppo field
        d = f.default
        kind = boolean if isinstance(d, bool) else int if isinstance(d, tuple) else type(d)
        shown = " ".join(map(str, d)) if isinstance(d, tuple) else d
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, nargs="+" if isinstance(d, tuple) else None,
                       help=f"{f.metadata['help']} (default {shown})".replace("%", "%%"))
    p.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint, with its settings")
    p.add_argument("--eval", help=argparse.SUPPRESS)  # moved to eval.py; said so in one line
    return p.parse_args(argv)


def build_config(args, base=None):
    """Defaults, then the CPU preset (fresh runs without CUDA) or the checkpoint's config (resume); then the flags."""
    flags = {k: (tuple(v) if k == "hidden" else v) for k, v in vars(args).items()
             if v is not None and k not in ("resume", "eval")}
    cfg = base or TrainConfig()
    device = flags.pop("device", cfg.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device != "cpu" and not device.startswith("cuda"):
        fail(f"unknown device {device!r}: use auto, cpu, cuda or cuda:K")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device} asked for, but torch sees no CUDA device: use --device cpu")
    if base is None and device == "cpu":
        cfg = dataclasses.replace(cfg, **CPU_PRESET)
        if dp.Workers().world == 1:  # (the process the user started, not each of its workers)
            print(f"CPU run: the CPU preset applies (flags given override it): {PRESET_FLAGS}")
    ppo = {k: flags.pop(k) for k in list(flags) if hasattr(cfg.ppo, k)}
    cfg = dataclasses.replace(cfg, device=device, ppo=dataclasses.replace(cfg.ppo, **ppo), **flags)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Reject bad settings in one line, before any expensive work."""
    for name in ("num_envs", "num_steps", "max_iterations", "save_interval", "threads_rollout", "threads_update",
                 "workers", "learning_rate", "num_epochs", "num_minibatches"):
        value = getattr(cfg if hasattr(cfg, name) else cfg.ppo, name)
        if not value > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if cfg.num_envs * cfg.num_steps % cfg.ppo.num_minibatches:
        fail(f"--num-minibatches {cfg.ppo.num_minibatches} does not divide the batch of {cfg.num_envs} envs x "
             f"{cfg.num_steps} steps = {cfg.num_envs * cfg.num_steps} samples")
    if not (cfg.init_std > 0 and cfg.min_std >= 0):
        fail(f"--init-std must be > 0 and --min-std >= 0, got {cfg.init_std} and {cfg.min_std}")
    if cfg.progress_speed_cap < 0:
        fail(f"--progress-speed-cap must be >= 0 (0: no cap), got {cfg.progress_speed_cap}")
    if not (cfg.crash_multiple > 0 and len(cfg.crash_ramp) == 2 and 0 <= cfg.crash_ramp[0] <= cfg.crash_ramp[1]):
        fail(f"--crash-multiple must be > 0 and --crash-ramp two iterations FROM TO with 0 <= FROM <= TO, got "
             f"{cfg.crash_multiple} and {' '.join(map(str, cfg.crash_ramp))}")
    if not (0 <= cfg.ppo.gamma <= 1 and 0 <= cfg.ppo.lam <= 1):
        fail("--gamma and --lam must be within [0, 1]")
    if cfg.workers > 1 and cfg.device != "cpu":
        fail("--workers is for CPU runs; on GPUs start one process per GPU with torchrun --nproc_per_node=GPUS")


# ------------------------------------------------------------------------------------------------- checkpoints
def build_policy(cfg, num_obs, num_actions):
    """The actor-critic a TrainConfig describes: train.py, eval.py and export.py all build it here."""
    return ActorCritic(num_obs, num_actions, cfg.hidden, cfg.init_std, cfg.normalize_obs, cfg.min_std)


def load_checkpoint(path):
    """(checkpoint dict, its TrainConfig). A missing or foreign file raises ValueError with a one-line reason."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        d = ckpt["config"]
        return ckpt, TrainConfig(**dict(d, hidden=tuple(d["hidden"]), ppo=PPOConfig(**d["ppo"])))
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {path}") from None
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise ValueError(f"{path} is not a checkpoint of this project ({type(e).__name__}: {e})"[:300]) from None


def write_atomically(path, write):
    """write(tmp) makes a temporary file, renamed over path once complete and on disk: a crash leaves no half file."""
    tmp = "{0}.tmp{1}".format(*os.path.splitext(path))  # ckpt_0010.tmp.pt: torch.export wants the extension
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, policy, optimizer, iteration, elapsed_s, cfg, task, generator):
    state = {"iteration": iteration, "elapsed_s": elapsed_s, "config": dataclasses.asdict(cfg),
             "policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "task": dataclasses.asdict(task),
             "rng": {"torch": torch.get_rng_state(), "env": generator.get_state(),
                     "cuda": torch.cuda.get_rng_state() if str(cfg.device).startswith("cuda") else None}}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


# -------------------------------------------------------------------------------------------- the loop's parts
def cpu_threads(cfg, phase):  # on a CPU, torch's threads are set per phase (measured: EXPERIMENTS.md)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads_rollout if phase == "rollout" else cfg.threads_update)


def crash_scale(iteration, cfg):
    """The crash penalty's multiple in this iteration: 1, then linear to crash_multiple over crash_ramp, then held."""
    start, end = cfg.crash_ramp
    if iteration >= end:
        return cfg.crash_multiple
    return 1.0 if iteration <= start else 1.0 + (cfg.crash_multiple - 1.0) * ((iteration - start) / (end - start))


def rollout(policy, env, storage, obs, episodes, cfg, workers):
    """num_steps steps of all envs into storage, then GAE. obs [N, 17] in, the last obs out."""
    storage.clear()
    with torch.no_grad():
        for _ in range(cfg.num_steps):
            # The normalizer (if on) learns every step, as rsl_rl's does, from the moments of all workers.
            policy.update_normalizer(obs, workers.sum)
            act = policy.act(obs)
            next_obs, reward, done, info = env.step(act.actions)
            storage.add(obs=obs, actions=act.actions, rewards=reward, dones=done, time_outs=info["time_outs"],
                        final_obs=info["final_obs"], values=act.value, log_probs=act.log_prob, mean=act.mean,
                        std=act.std)
            episodes.add(done, info["episode"])
            obs = next_obs
        # A time-out bootstraps with the value of the observation its episode ended in (storage.py).
        storage.compute_returns(policy.value(obs), policy.value(storage.timed_out_obs()), cfg.ppo.gamma,
                                cfg.ppo.lam, average=workers.average)
    return obs


# ---------------------------------------------------------------------------------------------------- training
def train(cfg, resume=None):
    from env import EpisodeStats, HoverConfig, HoverEnv  # here: genesis starts only after the settings were checked

    workers = dp.Workers()
    say = print if workers.main else (lambda *args, **kwargs: None)
    device = torch.device(f"cuda:{workers.local_rank}" if cfg.device.startswith("cuda") and workers.world > 1
                          else cfg.device)
    workers.start(device)
    torch.manual_seed(cfg.seed + workers.rank)  # each worker samples its own action noise
    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    say(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; run directory: "
        f"{run_dir}\nconfig: {json.dumps(dataclasses.asdict(cfg))}\n{workers.world} worker(s) x {cfg.num_envs} "
        f"drones x {cfg.num_steps} steps = {workers.world * cfg.num_envs * cfg.num_steps:,} samples per iteration")
    policy = build_policy(cfg, HoverEnv.num_obs, HoverEnv.num_actions).to(device)
    optimizer = Adam(policy.parameters(), lr=torch.tensor(cfg.ppo.learning_rate, device=device))
    storage = RolloutStorage(cfg.num_steps, cfg.num_envs, HoverEnv.num_obs, HoverEnv.num_actions, device)
    start, elapsed_before = 0, 0.0  # training time before this process (resume): the clock is cumulative
    if resume is not None:
        try:
            policy.load_state_dict(resume["policy"])
            optimizer.load_state_dict(resume["optimizer"])
        except (RuntimeError, ValueError) as e:
            fail(f"the checkpoint's network does not match this configuration: {str(e).splitlines()[0][:200]}")
        start, elapsed_before = resume["iteration"], resume["elapsed_s"]
    workers.broadcast(optimizer.theta)  # one flat tensor: every worker starts from rank 0's weights
    n = {part: sum(p.numel() for p in getattr(policy, part).parameters()) for part in ("actor", "critic")}
    memory = dict(optimizer.nbytes(), total=sum(optimizer.nbytes().values()))
    say(f"one network for every drone: actor {n['actor']:,} + critic {n['critic']:,} = {sum(n.values()):,} weights "
        f"+ {policy.std.numel()} action std\nmemory of the learner (float32):\n" +
        "\n".join(f"  {k:<16s} {b / 1e3:7.1f} KB" for k, b in memory.items()) +
        f"\nrollout storage: {sum(storage.nbytes().values()) / 1e6:.1f} MB on {device}\n"
        f"building the Genesis scene with {cfg.num_envs} drones (the first build compiles kernels: minutes)")
    cpu_threads(cfg, "rollout")
    # check_actions=False: the per-step NaN check would sync every step; theta is checked once per iteration instead.
    task = HoverConfig(**{**(resume or {}).get("task", {}),  # a resumed run keeps its task's scales
                          "progress_speed_cap": cfg.progress_speed_cap})
    env = HoverEnv(cfg.num_envs, device=str(device), seed=cfg.seed + workers.rank, check_actions=False, cfg=task)
    if resume is not None and workers.main:  # (other workers keep their own seeds)
        torch.set_rng_state(resume["rng"]["torch"])
        env.generator.set_state(resume["rng"]["env"])
        if resume["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
    if workers.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    episodes = EpisodeStats(device)
    obs = env.reset(random_episode_start=cfg.random_episode_start)
    samples = cfg.num_steps * cfg.num_envs * workers.world
    t_start, it = time.time(), start
    with open(os.path.join(run_dir, "metrics.jsonl") if workers.main else os.devnull, "a") as metrics, \
            dp.StopOnSignal() as stop:
        for it in range(start, cfg.max_iterations):
            t0 = time.time()
            env.cfg = dataclasses.replace(task, reward_crash=task.reward_crash * crash_scale(it + 1, cfg))
            cpu_threads(cfg, "rollout")
            obs = rollout(policy, env, storage, obs, episodes, cfg, workers)
            t1 = time.time()
            cpu_threads(cfg, "update")
            stats = update(policy, optimizer, storage.minibatches(cfg.ppo.num_epochs, cfg.ppo.num_minibatches),
                           cfg.ppo, workers.average)
            # The iteration's one host sync: figures, health and a stop request, of all workers.
            checks = workers.sum(torch.stack([torch.isfinite(optimizer.theta).all() & torch.isfinite(stats["loss"]),
                                              torch.tensor(stop.requested, device=device)]).float())
            stats["action_std"] = policy.action_std().detach().mean()
            row = dict(zip(stats, torch.stack(list(stats.values())).tolist()), **episodes.read(env.dt, workers.sum))
            finite, stop_requested = checks.tolist()
            if finite < workers.world:  # never save NaN weights: the last checkpoint on disk stays the last good one
                say(f"train.py: non-finite loss or weights at iteration {it + 1}: stopped without saving; "
                    f"the last good checkpoint is in {run_dir}", file=sys.stderr)
                sys.exit(1)
            t2 = time.time()
            row.update(iteration=it + 1, total_steps=(it + 1) * samples, steps_per_s=samples / (t2 - t0),
                       collect_s=t1 - t0, learn_s=t2 - t1, elapsed_s=elapsed_before + t2 - t_start,
                       eta_s=(t2 - t_start) / (it + 1 - start) * (cfg.max_iterations - it - 1))
            if workers.main:  # one line per iteration; metrics.jsonl has every figure
                hms = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))  # noqa: E731
                episodes_line = (f"targets/drone-min {row['targets_per_drone_min']:5.1f}  crashes/drone-min "
                                 f"{row['crashes_per_drone_min']:6.3f}" if row["episodes"] else "no episode ended")
                print(f"iter {it + 1:4d}/{cfg.max_iterations}  {row['steps_per_s']:7,.0f} steps/s  {episodes_line}  "
                      f"kl {row['kl']:.4f}  lr {row['lr']:.1e}  std {row['action_std']:.3f}  "
                      f"elapsed {hms(row['elapsed_s'])}  eta {hms(row['eta_s'])}", flush=True)
                print(json.dumps(row), file=metrics, flush=True)
            if workers.main and ((it + 1) % cfg.save_interval == 0 or it + 1 == cfg.max_iterations or stop_requested):
                save_checkpoint(os.path.join(run_dir, f"ckpt_{it + 1:04d}.pt"), policy, optimizer, it + 1,
                                row["elapsed_s"], cfg, task, env.generator)
            if stop_requested:
                break
    workers.close()
    say(f"done at iteration {it + 1}; checkpoints in {run_dir}\n"
        f"fly the last one: python eval.py {os.path.join(run_dir, f'ckpt_{it + 1:04d}.pt')}")
    return run_dir


def main(argv=None):
    args = parse_args(argv)
    if args.eval:
        fail(f"evaluation moved to its own script: python eval.py {args.eval}")
    try:
        ckpt, base = load_checkpoint(args.resume) if args.resume else (None, None)
    except ValueError as e:
        fail(e)
    if base is not None and args.device is None:
        base = dataclasses.replace(base, device="auto")  # a run started on a GPU continues on whatever is here
    cfg = build_config(args, base)
    if not cfg.run_name:  # resolved once and saved in the config, so a resume continues in the same directory
        cfg = dataclasses.replace(cfg, run_name=time.strftime("%Y-%m-%d_%H-%M-%S"))
    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    if not args.resume and dp.Workers().main and os.path.isdir(run_dir) and os.listdir(run_dir):
        fail(f"{run_dir} already holds a run: pick another --run-name, or continue it with --resume CKPT")
    if cfg.workers > 1 and dp.Workers().world == 1:
        argv = sys.argv[1:] if argv is None else argv
        dp.launch(cfg.workers, [sys.executable, os.path.abspath(__file__), *argv, "--run-name", cfg.run_name])
    return train(cfg, resume=ckpt)


if __name__ == "__main__":
    main()
