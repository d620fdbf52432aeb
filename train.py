"""Train one shared policy on thousands of Genesis robots at once, with PPO and a hand-written Adam.

    python train.py [--task go2]         the drone task [the Go2 quadruped]; --help lists every setting
    python eval.py RUN/ckpt_NNNN.pt      then fly the trained policy and measure it

One iteration of the loop in train(), for N envs and T steps:
    rollout    T times: policy.act(obs [N, obs]) -> env.step(actions [N, act]): ONE call for all N envs
               (the task's file, policy.py); the T*N samples go to storage.add()
    storage    GAE advantages and returns over [T, N]                              (storage.py)
    update     epochs x minibatches: PPO loss -> backward -> Adam step            (ppo.py, adam.py)
               Adam overwrites theta in place, so the next rollout acts with the new weights
The loop knows no task: --task names a module with a Config, an Env that keeps README.md's contract ("Your own
robot") and the settings it trains with (TRAIN; CPU_PRESET without CUDA). Flags, presets, checks and reading
checkpoints live in config.py.
"""
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

# Idle torch threads sleep, not spin (before torch loads): spinning slowed updates 2x (EXPERIMENTS.md, "CPU threads")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import config  # noqa: E402
from adam import Adam  # noqa: E402
from config import setting  # noqa: E402
from logger import EpisodeStats, RunLog, learner_summary  # noqa: E402
from policy import ACTIVATIONS  # noqa: E402
from ppo import PPOConfig, update  # noqa: E402
from storage import RolloutStorage  # noqa: E402
from workers import StopOnSignal, Workers, cpu_threads, launch  # noqa: E402


@dataclass
class TrainConfig:
    task: str = setting("hover", "the task: hover, crazyflie, go2, or the path of a task's module (a.b.c); it sets "
                                 "the defaults it trains with")
    num_envs: int = setting(8192, "envs simulated together as one batch, per worker", low=1, high=2 ** 20)
    num_steps: int = setting(100, "steps per env per iteration: a rollout is num_steps x num_envs samples", low=1,
                             high=10_000)
    max_iterations: int = setting(301, "iterations of rollout + update, counting those before a resume", low=1)
    seed: int = setting(1, "seeds the network, the action noise and the env's own draws", low=0)
    device: str = setting("auto", "auto (CUDA if torch sees it, else CPU), cpu, cuda or cuda:K")
    log_dir: str = setting("runs", "each run writes config.json, metrics.jsonl and checkpoints to log_dir/run_name")
    run_name: str = setting("", "the run's directory name; empty: a timestamp")
    save_interval: int = setting(50, "iterations between checkpoints (one is always written at the end)", low=1)
    hidden: tuple = setting((128, 128), "hidden layer widths of the actor and of the critic", low=1, high=8192,
                            length=None)
    activation: str = setting("tanh", "the hidden layers' activation", choices=tuple(ACTIVATIONS))
    init_std: float = setting(1.0, "initial std of the action noise (learned from there)", above=0)
    min_std: float = setting(0.0, "floor of the action noise's std (0: none)", low=0)
    normalize_obs: bool = setting(False, "running mean/variance normalization of the observations, in the policy")
    random_episode_start: bool = setting(True, "spread the first time-outs (rsl_rl's init_at_random_ep_len)")
    threads_update: int = setting(2, "CPU only: torch threads for the PPO update (the rollout's: 1, the simulator's)",
                                  low=1, high=1024)
    workers: int = setting(1, "CPU only: data-parallel processes started by train.py, each with num_envs envs", low=1,
                           high=1024)
    tensorboard: bool = setting(False, "also log every figure for TensorBoard, under rsl_rl's names "
                                       "(pip install tensorboard)")
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def conflicts(self):
        if self.num_envs * self.num_steps % self.ppo.num_minibatches:
            yield (f"--num-minibatches {self.ppo.num_minibatches} does not divide the batch of {self.num_envs} envs "
                   f"x {self.num_steps} steps = {self.num_envs * self.num_steps} samples")
        if self.num_envs * self.num_steps > 2 ** 25:
            yield (f"--num-envs x --num-steps must be at most 2^25 samples per worker (memory), got "
                   f"{self.num_envs} x {self.num_steps}")
        if self.workers > 1 and self.device != "cpu":
            yield "--workers is for CPU runs; on GPUs start one process per GPU with torchrun --nproc_per_node=GPUS"


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


def train(cfg, task_cfg, task, resume=None):
    workers = Workers()
    say = print if workers.main else (lambda *args, **kwargs: None)
    device = torch.device(f"cuda:{workers.local_rank}" if cfg.device.startswith("cuda") and workers.world > 1
                          else cfg.device)
    workers.start(device)
    torch.manual_seed(cfg.seed + workers.rank)  # each worker samples its own action noise
    Env, unit, run_dir = task.Env, task.Env.unit, os.path.join(cfg.log_dir, cfg.run_name)
    settings = {**dataclasses.asdict(cfg), "task_config": dataclasses.asdict(task_cfg)}  # (config.json)
    say(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}; run directory: "
        f"{run_dir}\nconfig: {json.dumps(settings)}\n{workers.world} worker(s) x {cfg.num_envs} {unit}s x "
        f"{cfg.num_steps} steps = {workers.world * cfg.num_envs * cfg.num_steps:,} samples per iteration")
    policy = config.build_policy(settings, Env.num_obs, Env.num_actions).to(device)
    optimizer = Adam(policy.parameters(), lr=torch.tensor(cfg.ppo.learning_rate, device=device))
    storage = RolloutStorage(cfg.num_steps, cfg.num_envs, Env.num_obs, Env.num_actions, device)
    # the iteration and training time before this process (resume): the counter and the clock go on
    start, elapsed_before = (resume.state["iteration"], resume.state["elapsed_s"]) if resume else (0, 0.0)
    if resume:
        policy.load_state_dict(resume.state["policy"])  # (config.py checked that the shapes fit)
        optimizer.load_state_dict(resume.state["optimizer"])
    workers.broadcast(optimizer.theta)  # one flat tensor: every worker starts from rank 0's weights
    say(learner_summary(policy, optimizer, storage, unit) + f"\nbuilding the Genesis scene with {cfg.num_envs} "
        f"{unit}s (the first build compiles kernels: minutes)")
    cpu_threads(cfg, "rollout")
    # check_actions=False: the per-step NaN check would sync every step; theta is checked once per iteration instead.
    env = Env(cfg.num_envs, device=str(device), seed=cfg.seed + workers.rank, check_actions=False, cfg=task_cfg)
    episodes = EpisodeStats(env.rates, unit, env.dt)
    log = RunLog(run_dir, settings, episodes, cfg.max_iterations, cfg.tensorboard, active=workers.main)
    env.set_iteration(start + 1)  # the curriculum's settings before the first episodes draw theirs (resume: mid-way)
    saved = resume.state["workers"] if resume else []  # (a worker added on resume starts from its seed)
    obs = config.restore_worker(env, saved[workers.rank]) if workers.rank < len(saved) else None
    if obs is None:
        obs = env.reset(random_episode_start=cfg.random_episode_start)
    samples = cfg.num_steps * cfg.num_envs * workers.world
    t_start = time.time()
    with StopOnSignal() as stop:
        for it in range(start, cfg.max_iterations):
            t0 = time.time()
            env.set_iteration(it + 1)  # the task's curriculum, if it has one
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
                log.save(f"ckpt_{it + 1:04d}.pt", {  # everything a resume needs (config.load_checkpoint reads it)
                    "format": config.FORMAT, "iteration": it + 1, "elapsed_s": row["elapsed_s"],
                    "config": dataclasses.asdict(cfg), "task_config": dataclasses.asdict(task_cfg),
                    "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                    "workers": workers.gather(config.worker_state(env, obs, device.type == "cuda"))})
            if stop_requested:
                break
    log.close()
    workers.close()
    say(f"done at iteration {it + 1}; checkpoints in {run_dir}\n"
        f"fly the last one: python eval.py {os.path.join(run_dir, f'ckpt_{it + 1:04d}.pt')}")
    return run_dir


def main(argv=None):
    workers = Workers()
    with config.refusing("train.py"):
        cfg, task_cfg, task, resume = config.train_settings(argv, TrainConfig, __doc__,
                                                            say=print if workers.world == 1 else lambda s: None)
        if not cfg.run_name:  # resolved once and saved in the config, so a resume continues in the same directory
            cfg = dataclasses.replace(cfg, run_name=time.strftime("%Y-%m-%d_%H-%M-%S"))
        run_dir = os.path.join(cfg.log_dir, cfg.run_name)
        if workers.main and not resume and os.path.isdir(run_dir) and os.listdir(run_dir):
            raise config.BadInput(f"{run_dir} already holds a run: pick another --run-name, or continue it with "
                                  f"--resume CKPT")
        config.check_writable(run_dir)
    if cfg.workers > 1 and workers.world == 1:  # start the workers, each of which runs train() below
        argv = sys.argv[1:] if argv is None else argv
        launch(cfg.workers, [sys.executable, os.path.abspath(__file__), *argv, "--run-name", cfg.run_name])
    return train(cfg, task_cfg, task, resume)


if __name__ == "__main__":
    main()
