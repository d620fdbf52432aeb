"""Train one shared policy on thousands of Genesis robots at once, with PPO and a hand-written Adam.

    python train.py [--task go2]         the drone task [the Go2 quadruped]; --help lists every setting
    python eval.py RUN/ckpt_NNNN.pt      then fly the trained policy and measure it

One iteration of the loop in train(), for N envs and T steps:
    rollout    T times: policy.act(obs [N, obs]) -> env.step(actions [N, act]): ONE call for all N envs
               (the task's file, policy.py); the T*N samples go to storage.add()
    storage    GAE advantages and returns over [T, N]                              (storage.py)
    update     epochs x minibatches: PPO loss -> backward -> Adam step            (ppo.py, adam.py)
               Adam overwrites theta in place, so the next rollout acts with the new weights
The loop knows no task: --task names a module (TASKS) with a Config, an Env that keeps README.md's contract ("Your
own robot") and the settings it trains with (TRAIN; CPU_PRESET without CUDA).
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field

# Idle torch threads sleep, not spin (before torch loads): spinning slowed updates 2x (EXPERIMENTS.md, "CPU threads")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import workers as dp  # noqa: E402
from adam import Adam  # noqa: E402
from policy import ACTIVATIONS, ActorCritic  # noqa: E402
from ppo import PPOConfig, update  # noqa: E402
from logger import EpisodeStats, RunLog, learner_summary  # noqa: E402
from storage import RolloutStorage  # noqa: E402

# --task NAME: the module that holds the task. Importing it does not start Genesis (its Env does, when built).
TASKS = {"hover": "env", "go2": "examples.go2.go2_env"}


# ---------------------------------------------------------------------------------------------------- settings
def _setting(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    task: str = _setting("hover", "the task; its module sets the defaults it trains with", tuple(TASKS))
    num_envs: int = _setting(8192, "envs simulated together as one batch, per worker")
    num_steps: int = _setting(100, "steps per env per iteration: a rollout is num_steps x num_envs samples")
    max_iterations: int = _setting(301, "iterations of rollout + update, counting those before a resume")
    seed: int = _setting(1, "seeds the network, the action noise and the env's own draws")
    device: str = _setting("auto", "auto (CUDA if torch sees it, else CPU), cpu, cuda or cuda:K")
    log_dir: str = _setting("runs", "each run writes config.json, metrics.jsonl and checkpoints to log_dir/run_name")
    run_name: str = _setting("", "the run's directory name; empty: a timestamp")
    save_interval: int = _setting(50, "iterations between checkpoints (one is always written at the end)")
    hidden: tuple = _setting((128, 128), "hidden layer widths of the actor and of the critic")
    activation: str = _setting("tanh", "the hidden layers' activation", tuple(ACTIVATIONS))
    init_std: float = _setting(1.0, "initial std of the action noise (learned from there)")
    min_std: float = _setting(0.0, "floor of the action noise's std (0: none)")
    normalize_obs: bool = _setting(False, "running mean/variance normalization of the observations, in the policy")
    random_episode_start: bool = _setting(True, "spread the first time-outs (rsl_rl's init_at_random_ep_len)")
    threads_update: int = _setting(2, "CPU only: torch threads for the PPO update (the rollout's: 1, the simulator's)")
    workers: int = _setting(1, "CPU only: data-parallel processes started by train.py, each with num_envs envs")
    tensorboard: bool = _setting(False, "also log every figure for TensorBoard, under rsl_rl's names "
                                 "(pip install tensorboard)")
    ppo: PPOConfig = field(default_factory=PPOConfig)


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def boolean(text):
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")
    return value


def as_flags(settings):
    return " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in settings.items())


def parse_args(argv=None):
    """(args, task module, resume: (checkpoint, TrainConfig, task Config) or None); a flag per field, with its help."""
    first = argparse.ArgumentParser(add_help=False)
    first.error = fail  # one line and exit status 2, not the usage text
    first.add_argument("--task", choices=TASKS)
    first.add_argument("--resume")
    known, resume = first.parse_known_args(argv)[0], None
    if known.resume:
        try:
            resume = load_checkpoint(known.resume)
        except ValueError as e:
            fail(e)
        if known.task not in (None, resume[1].task):
            fail(f"{known.resume} is a checkpoint of the {resume[1].task} task, not of {known.task}")
    task = importlib.import_module(TASKS[resume[1].task if resume else known.task or TrainConfig.task])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Without CUDA, a fresh run starts from the task's CPU preset: "
                                       f"{as_flags(task.CPU_PRESET)}")
    p.error = fail
    for title, fields in (("training", dataclasses.fields(TrainConfig)[:-1]), ("PPO", dataclasses.fields(PPOConfig)),
                          (f"the task ({task.__name__}.Config)", dataclasses.fields(task.Config))):
        group = p.add_argument_group(title)
        for f in fields:
            d, shown = f.default, task.TRAIN.get(f.name, f.default)  # the task's own defaults, shown as such
            kind = type(d[0]) if isinstance(d, tuple) else boolean if isinstance(d, bool) else type(d)
            shown = " ".join(map(str, shown)) if isinstance(shown, tuple) else shown
            group.add_argument("--" + f.name.replace("_", "-"), type=kind, nargs="+" if isinstance(d, tuple) else None,
                               choices=f.metadata.get("choices"),
                               help=f"{f.metadata.get('help', '')} (default {shown})".replace("%", "%%"))
    p.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint, with its settings")
    return p.parse_args(argv), task, resume


def build_config(args, task, base=None):
    """(TrainConfig, task Config): defaults, the task's TRAIN and CPU_PRESET (or base, on resume), then the flags."""
    flags = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
             if v is not None and k != "resume"}
    try:
        device = dp.resolve_device(flags.pop("device", "auto"))  # a resumed run too: it goes on with what is here
    except ValueError as e:
        fail(e)
    cfg, task_cfg = base or (TrainConfig(), task.Config())
    if base is None:
        if device == "cpu" and dp.Workers().world == 1:  # (the process the user started, not each of its workers)
            print(f"CPU run: the task's CPU preset applies (flags given override it): {as_flags(task.CPU_PRESET)}")
        flags = {**task.TRAIN, **(task.CPU_PRESET if device == "cpu" else {}), **flags}
    ppo = {k: flags.pop(k) for k in list(flags) if k in PPOConfig.__dataclass_fields__}
    own = {k: flags.pop(k) for k in list(flags) if k in TrainConfig.__dataclass_fields__}
    cfg = dataclasses.replace(cfg, device=device, ppo=dataclasses.replace(cfg.ppo, **ppo), **own)
    try:
        task_cfg = dataclasses.replace(task_cfg, **flags)  # the rest are the task's settings, checked by it
    except ValueError as e:
        fail(e)
    check_config(cfg)
    return cfg, task_cfg


def check_config(cfg):
    """Reject bad settings in one line, before any expensive work."""
    for name in ("num_envs", "num_steps", "max_iterations", "save_interval", "threads_update", "workers",
                 "learning_rate", "num_epochs", "num_minibatches"):
        value = getattr(cfg if hasattr(cfg, name) else cfg.ppo, name)
        if not value > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if cfg.num_envs * cfg.num_steps % cfg.ppo.num_minibatches:
        fail(f"--num-minibatches {cfg.ppo.num_minibatches} does not divide the batch of {cfg.num_envs} envs x "
             f"{cfg.num_steps} steps = {cfg.num_envs * cfg.num_steps} samples")
    if not (cfg.init_std > 0 and cfg.min_std >= 0):
        fail(f"--init-std must be > 0 and --min-std >= 0, got {cfg.init_std} and {cfg.min_std}")
    if not (0 <= cfg.ppo.gamma <= 1 and 0 <= cfg.ppo.lam <= 1):
        fail("--gamma and --lam must be within [0, 1]")
    if cfg.workers > 1 and cfg.device != "cpu":
        fail("--workers is for CPU runs; on GPUs start one process per GPU with torchrun --nproc_per_node=GPUS")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        fail("--tensorboard needs the tensorboard package: pip install tensorboard")


# ------------------------------------------------------------------------------------------------- checkpoints
def build_policy(cfg, num_obs, num_actions):
    """The actor-critic a TrainConfig describes: train.py, eval.py and export.py all build it here."""
    return ActorCritic(num_obs, num_actions, cfg.hidden, cfg.init_std, cfg.normalize_obs, cfg.min_std, cfg.activation)


def load_checkpoint(path):
    """(checkpoint, its TrainConfig, its task Config). A missing or foreign file raises ValueError, in one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        d = ckpt["config"]
        cfg = TrainConfig(**dict(d, hidden=tuple(d["hidden"]), ppo=PPOConfig(**d["ppo"])))
        return ckpt, cfg, importlib.import_module(TASKS[cfg.task]).Config(**ckpt["task"])
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {path}") from None
    except Exception as e:  # a truncated or foreign file, or another version's: one line, not a traceback
        raise ValueError(f"{path} is not a checkpoint of this project, or not of this version of it "
                         f"({type(e).__name__}: {e})"[:300]) from None


# -------------------------------------------------------------------------------------------- the loop's parts
def rollout(policy, env, storage, obs, episodes, cfg, workers):
    """num_steps steps of all envs into storage, then GAE. obs [N, obs] in, the last obs out."""
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
def train(cfg, task_cfg, resume=None):
    task, workers = importlib.import_module(TASKS[cfg.task]), dp.Workers()
    say = print if workers.main else (lambda *args, **kwargs: None)
    device = torch.device(f"cuda:{workers.local_rank}" if cfg.device.startswith("cuda") and workers.world > 1
                          else cfg.device)
    workers.start(device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed + workers.rank)  # each worker samples its own action noise
    run_dir, unit, Env = os.path.join(cfg.log_dir, cfg.run_name), task.Env.unit, task.Env
    config = {**dataclasses.asdict(cfg), "task_config": dataclasses.asdict(task_cfg)}  # (also config.json)
    say(f"device: {torch.cuda.get_device_name(device) if cuda else device}; run directory: {run_dir}\nconfig: "
        f"{json.dumps(config)}\n{workers.world} worker(s) x {cfg.num_envs} {unit}s x {cfg.num_steps} steps = "
        f"{workers.world * cfg.num_envs * cfg.num_steps:,} samples per iteration")
    policy = build_policy(cfg, Env.num_obs, Env.num_actions).to(device)
    optimizer = Adam(policy.parameters(), lr=torch.tensor(cfg.ppo.learning_rate, device=device))
    storage = RolloutStorage(cfg.num_steps, cfg.num_envs, Env.num_obs, Env.num_actions, device)
    # the iteration and training time before this process (resume): the counter and the clock go on
    start, elapsed_before = (resume["iteration"], resume["elapsed_s"]) if resume else (0, 0.0)
    try:
        if resume:
            policy.load_state_dict(resume["policy"])
            optimizer.load_state_dict(resume["optimizer"])
    except (RuntimeError, ValueError) as e:
        fail(f"the checkpoint's network does not match this configuration: {str(e).splitlines()[0][:200]}")
    workers.broadcast(optimizer.theta)  # one flat tensor: every worker starts from rank 0's weights
    say(learner_summary(policy, optimizer, storage, unit) + f"\nbuilding the Genesis scene with {cfg.num_envs} "
        f"{unit}s (the first build compiles kernels: minutes)")
    dp.cpu_threads(cfg, "rollout")
    # check_actions=False: the per-step NaN check would sync every step; theta is checked once per iteration instead.
    env = Env(cfg.num_envs, device=str(device), seed=cfg.seed + workers.rank, check_actions=False, cfg=task_cfg)
    if resume is not None and workers.main:  # (other workers keep their own seeds)
        torch.set_rng_state(resume["rng"]["torch"])
        env.generator.set_state(resume["rng"]["env"])
        if resume["rng"]["cuda"] is not None and cuda:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
    episodes = EpisodeStats(env.rates, unit, env.dt)
    log = RunLog(run_dir, config, episodes, cfg.max_iterations, cfg.tensorboard, active=workers.main)
    env.set_iteration(start + 1)  # the curriculum's settings before the first episodes draw theirs (resume: mid-way)
    obs = env.reset(random_episode_start=cfg.random_episode_start)
    samples = cfg.num_steps * cfg.num_envs * workers.world
    t_start, it = time.time(), start
    with dp.StopOnSignal() as stop:
        for it in range(start, cfg.max_iterations):
            t0 = time.time()
            env.set_iteration(it + 1)  # the task's curriculum, if it has one
            dp.cpu_threads(cfg, "rollout")
            obs = rollout(policy, env, storage, obs, episodes, cfg, workers)
            t1 = time.time()
            dp.cpu_threads(cfg, "update")
            stats = update(policy, optimizer, storage.minibatches(cfg.ppo.num_epochs, cfg.ppo.num_minibatches),
                           cfg.ppo, workers.average)
            # The iteration's one host sync: figures, health and a stop request, of all workers.
            checks = workers.sum(torch.stack([torch.isfinite(optimizer.theta).all() & torch.isfinite(stats["loss"]),
                                              torch.tensor(stop.requested, device=device)]).float())
            stats["action_std"] = policy.action_std().detach().mean()
            row = dict(zip(stats, torch.stack(list(stats.values())).tolist()), **episodes.read(workers.sum))
            finite, stop_requested = checks.tolist()
            if finite < workers.world:  # never save NaN weights: the last checkpoint on disk stays the last good one
                say(f"train.py: non-finite loss or weights at iteration {it + 1}: stopped without saving; "
                    f"the last good checkpoint is in {run_dir}", file=sys.stderr)
                sys.exit(1)
            t2 = time.time()
            row.update(iteration=it + 1, total_steps=(it + 1) * samples, steps_per_s=samples / (t2 - t0),
                       collect_s=t1 - t0, learn_s=t2 - t1, elapsed_s=elapsed_before + t2 - t_start,
                       eta_s=(t2 - t_start) / (it + 1 - start) * (cfg.max_iterations - it - 1))
            log.write(row)  # a line on the terminal; every figure to metrics.jsonl (and TensorBoard)
            if (it + 1) % cfg.save_interval == 0 or it + 1 == cfg.max_iterations or stop_requested:
                log.save(f"ckpt_{it + 1:04d}.pt", {  # everything a resume needs
                    "iteration": it + 1, "elapsed_s": row["elapsed_s"], "config": dataclasses.asdict(cfg),
                    "task": dataclasses.asdict(task_cfg), "policy": policy.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state(),
                    "env": env.generator.get_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}})
            if stop_requested:
                break
    log.close()
    workers.close()
    say(f"done at iteration {it + 1}; checkpoints in {run_dir}\n"
        f"fly the last one: python eval.py {os.path.join(run_dir, f'ckpt_{it + 1:04d}.pt')}")
    return run_dir


def main(argv=None):
    args, task, resume = parse_args(argv)
    cfg, task_cfg = build_config(args, task, resume and resume[1:])
    if not cfg.run_name:  # resolved once and saved in the config, so a resume continues in the same directory
        cfg = dataclasses.replace(cfg, run_name=time.strftime("%Y-%m-%d_%H-%M-%S"))
    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    if not resume and dp.Workers().main and os.path.isdir(run_dir) and os.listdir(run_dir):
        fail(f"{run_dir} already holds a run: pick another --run-name, or continue it with --resume CKPT")
    if cfg.workers > 1 and dp.Workers().world == 1:
        argv = sys.argv[1:] if argv is None else argv
        dp.launch(cfg.workers, [sys.executable, os.path.abspath(__file__), *argv, "--run-name", cfg.run_name])
    return train(cfg, task_cfg, resume=resume and resume[0])


if __name__ == "__main__":
    main()
