"""Benchmark each stage of the drone task against its own limit, in one run, on one machine. Prints a table,
writes JSON.

    python bench.py                        all sections, CPU: N = 1024 and 8192
    python bench.py --sections adam update --num-envs 8192
    python bench.py --device cuda          on a GPU (adds N = 32768)

Sections (each a ratio to a reference measured in the same run):
    physics   raw Genesis stepping of the hover scene: RPM set + state read, nothing else (the ceiling)
    env       HoverEnv.step alone, as a ratio to physics
    rollout   env + policy inference + storage writes
    update    one PPO update (epochs x minibatches) vs the same arithmetic in plain torch (its floor)
    adam      this Adam vs torch.optim.Adam (foreach, fused), one step on the default network
    train     iterations of train.py's loop, vs the floor physics + plain-torch update
    workers   CPU: `train.py --workers 2` on the same batch (N/2 envs each), vs the same floor
    ops       torch operators dispatched per rollout step by policy.act, HoverEnv.step, storage.add and
              EpisodeStats.add (Genesis's own excluded): on a GPU, each one that is not a view is a kernel launch
Run it on an idle machine: a second busy process makes such figures meaningless.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: idle torch threads sleep
import torch  # noqa: E402

from adam import Adam  # noqa: E402
from env import HoverEnv  # noqa: E402  (genesis starts when the first HoverEnv is built)
from logger import EpisodeStats  # noqa: E402
from policy import ActorCritic  # noqa: E402
from ppo import PPOConfig, ppo_loss, update  # noqa: E402
from storage import RolloutStorage  # noqa: E402
from workers import Workers, cpu_threads  # noqa: E402

OBS, ACT = HoverEnv.num_obs, HoverEnv.num_actions  # the drone task's sizes: the network of the design (README)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps, device, warmup=2):
    """Median seconds of fn() over reps runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def filled_storage(num_envs, num_steps, device, policy):
    """A rollout's worth of realistic samples: random obs, actions drawn from the policy."""
    s = RolloutStorage(num_steps, num_envs, OBS, ACT, device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _ in range(num_steps):
            obs = torch.rand(num_envs, OBS, device=device, generator=g) * 2 - 1
            act = policy.act(obs)
            done = torch.rand(num_envs, device=device, generator=g) < 0.01
            s.add(obs=obs, actions=act.actions, rewards=torch.randn(num_envs, device=device, generator=g), dones=done,
                  time_outs=done & (act.value > 0), final_obs=obs, values=act.value, log_probs=act.log_prob,
                  mean=act.mean, std=act.std)
        s.compute_returns(torch.zeros(num_envs, device=device), policy.value(s.timed_out_obs()), 0.99, 0.95)
    return s


def bench_adam(device, reps=200):
    """One optimizer step on the default 38,281-parameter network, gradients fixed."""
    results = {}
    variants = {"this Adam (flat buffers)": lambda ps: Adam(ps, lr=3e-4),
                "torch Adam foreach": lambda ps: torch.optim.Adam(ps, lr=3e-4, foreach=True),
                "torch Adam fused": lambda ps: torch.optim.Adam(ps, lr=3e-4, fused=True),
                "torch Adam for-loop": lambda ps: torch.optim.Adam(ps, lr=3e-4, foreach=False)}
    for name, make in variants.items():
        policy = ActorCritic(OBS, ACT).to(device)
        opt = make(list(policy.parameters()))
        opt.zero_grad()
        obs = torch.randn(4096, OBS, device=device)
        (policy.actor(obs).square().mean() + policy.critic(obs).square().mean()).backward()
        results[name] = timed(opt.step, reps, device, warmup=10) * 1e6  # microseconds
    ref = results["torch Adam fused"]
    return {name: {"us_per_step": us, "ratio_to_fused": us / ref} for name, us in results.items()}


def plain_torch_update(policy, optimizer, batches, cfg):
    """The floor: the same forward/backward/Adam arithmetic on the same minibatch sizes, nothing else
    (contiguous minibatches without a gather, no KL, no lr schedule, torch's fused Adam)."""
    for b in batches:
        out = policy.evaluate(b.obs, b.actions)
        loss = ppo_loss(out.log_prob, b.log_probs, b.advantages, out.value, b.values, b.returns, out.entropy,
                        cfg.clip, cfg.value_coef, cfg.entropy_coef, cfg.clip_value_loss).total
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()


def bench_update(num_envs, num_steps, device, reps=3):
    cfg = PPOConfig()
    samples = num_envs * num_steps
    policy = ActorCritic(OBS, ACT).to(device)
    storage = filled_storage(num_envs, num_steps, device, policy)
    ours = Adam(policy.parameters(), lr=torch.tensor(cfg.learning_rate, device=device))
    t_ours = timed(lambda: update(policy, ours, storage.minibatches(cfg.num_epochs, cfg.num_minibatches), cfg)
                   ["loss"].item(), reps, device, warmup=1)

    ref_policy = ActorCritic(OBS, ACT).to(device)
    ref_opt = torch.optim.Adam(ref_policy.parameters(), lr=cfg.learning_rate, fused=True)
    one_epoch = list(storage.minibatches(1, cfg.num_minibatches))  # gathered once, outside the timing
    t_floor = timed(lambda: plain_torch_update(ref_policy, ref_opt, one_epoch * cfg.num_epochs, cfg),
                    reps, device, warmup=1)

    opt_only = Adam(ActorCritic(OBS, ACT).to(device).parameters())
    t_step = timed(opt_only.step, 50, device) * cfg.num_epochs * cfg.num_minibatches
    return {"samples": samples, "update_s": t_ours, "floor_s": t_floor,
            "update_ratio_to_floor": t_ours / t_floor, "samples_per_s": samples * cfg.num_epochs / t_ours,
            "optimizer_share": t_step / t_ours}


def bench_physics_and_env(env, steps, rounds=3):
    """Raw Genesis stepping (RPM set, step, the same state reads as HoverEnv) vs HoverEnv.step, on one scene.

    Both replay one pool of small random actions in +a/-a pairs, so the drones wobble about hover and
    none crashes: the physics does the same work in both loops. Rounds alternate; the best of each is kept."""
    n, dev, cfg = env.num_envs, env.device, env.cfg
    g = torch.Generator(device=dev).manual_seed(0)
    half = [(torch.rand(n, 4, device=dev, generator=g) * 2 - 1) * 0.05 for _ in range(8)]
    pool = [x for a in half for x in (a, -a)]
    rpms = [(1 + cfg.rpm_gain * a) * cfg.hover_rpm for a in pool]

    def raw(k):
        for i in range(k):
            env.drone.set_propellers_rpm(rpms[i % 16])
            env.scene.step()
            env.drone.get_qpos(), env.drone.get_dofs_velocity()

    def wrapped(k):
        for i in range(k):
            env.step(pool[i % 16])

    best = {"raw": float("inf"), "env": float("inf")}
    for _ in range(rounds):
        for name, fn in (("raw", raw), ("env", wrapped)):
            env.reset()
            fn(20)
            sync(dev)
            t = time.perf_counter()
            fn(steps)
            sync(dev)
            best[name] = min(best[name], time.perf_counter() - t)
    raw_sps, env_sps = n * steps / best["raw"], n * steps / best["env"]
    return {"physics_steps_per_s": raw_sps, "env_steps_per_s": env_sps, "env_overhead": raw_sps / env_sps - 1}


def loop_state(env, num_steps):
    """What train.py's loop holds for one env: its config, a fresh policy and Adam, storage, episode sums, obs."""
    import train
    cfg = train.TrainConfig(num_envs=env.num_envs, num_steps=num_steps, device=str(env.device))
    policy = ActorCritic(OBS, ACT).to(env.device)
    state = {"obs": env.reset(), "episodes": EpisodeStats(env.rates, env.unit, env.dt)}
    return train, cfg, policy, Adam(policy.parameters(), lr=torch.tensor(cfg.ppo.learning_rate, device=env.device)), \
        RolloutStorage(num_steps, env.num_envs, OBS, ACT, env.device), state


def bench_rollout(env, num_steps, reps=3):
    """train.py's rollout: env + policy inference + storage writes + GAE, env-steps per second."""
    train, cfg, policy, _, storage, state = loop_state(env, num_steps)

    def run():
        state["obs"] = train.rollout(policy, env, storage, state["obs"], state["episodes"], cfg, Workers())
    t = timed(run, reps, env.device, warmup=1)
    return {"rollout_s": t, "rollout_steps_per_s": env.num_envs * num_steps / t}


def bench_train(env, num_steps, iterations=3):
    """Iterations of train.py's loop (rollout + update, the one sync per iteration), env-steps per second."""
    train, cfg, policy, optimizer, storage, state = loop_state(env, num_steps)

    def iteration():
        cpu_threads(cfg, "rollout")
        state["obs"] = train.rollout(policy, env, storage, state["obs"], state["episodes"], cfg, Workers())
        cpu_threads(cfg, "update")
        losses = update(policy, optimizer, storage.minibatches(cfg.ppo.num_epochs, cfg.ppo.num_minibatches), cfg.ppo,
                        Workers().average)
        losses["loss"].item()
    t = timed(iteration, iterations, env.device, warmup=1)
    return {"iteration_s": t, "train_steps_per_s": env.num_envs * num_steps / t}


def bench_workers(num_envs, num_steps, iterations, workers=2):
    """`python train.py --workers 2` itself on the same num_envs x num_steps batch, split over the processes.

    Genesis steps a scene on one thread, so one process leaves a core idle while it simulates; two workers
    each simulate half the drones on a core of their own and average gradients. Timed from the run's own
    metrics (elapsed time between iterations), after two warm-up iterations."""
    with tempfile.TemporaryDirectory() as log_dir:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
               "--device", "cpu", "--workers", str(workers), "--num-envs", str(num_envs // workers),
               "--num-steps", str(num_steps), "--threads-update", "1", "--max-iterations", str(iterations + 2),
               "--normalize-obs", "false",  # as in the one-process rows (the CPU preset would turn it on)
               "--save-interval", str(10 ** 9), "--log-dir", log_dir, "--run-name", "bench"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(log_dir, "bench", "metrics.jsonl")) as f:
            elapsed = [json.loads(line)["elapsed_s"] for line in f]
    t = statistics.median(b - a for a, b in zip(elapsed[1:], elapsed[2:]))
    return {"workers": workers, "workers_iteration_s": t, "workers_steps_per_s": num_envs * num_steps / t}


VIEWS = {"view", "_unsafe_view", "slice", "select", "expand", "unsqueeze", "squeeze", "t", "transpose", "as_strided",
         "detach", "alias", "unbind", "split", "permute", "lift_fresh", "_reshape_alias", "reshape", "unflatten"}


def bench_ops(env):
    """Operators each stage dispatches in one rollout step (the 6th after a reset), counted below Python by a
    TorchDispatchMode; those called from inside Genesis are left out (their frames are Genesis's)."""
    import collections
    import traceback
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any("genesis" in f.filename or "quadrants" in f.filename for f in traceback.extract_stack(limit=40)):
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    _, _, policy, _, storage, state = loop_state(env, 8)
    obs, counts = state["obs"], {}

    def stage(name, run, counting):  # one stage of the step; on the counted step, its operators into counts
        if not counting:
            return run()
        with Count() as c:
            out = run()
        counts[name] = c
        return out

    with torch.no_grad():
        for step in range(6):
            counting = step == 5
            act = stage("policy.act", lambda: policy.act(obs), counting)
            next_obs, reward, done, info = stage("env.step", lambda: env.step(act.actions), counting)
            stage("storage.add", lambda: storage.add(
                obs=obs, actions=act.actions, rewards=reward, dones=done, time_outs=info["time_outs"],
                final_obs=info["final_obs"], values=act.value, log_probs=act.log_prob, mean=act.mean, std=act.std),
                counting)
            stage("EpisodeStats.add", lambda: state["episodes"].add(done, info["episode"]), counting)
            obs = next_obs
    return {name: {"ops": sum(c.ops.values()), "launching": sum(v for k, v in c.ops.items() if k not in VIEWS),
                   "by_name": dict(c.ops.most_common())} for name, c in counts.items()}


def peak_memory(device):
    """Host peak RSS; on CUDA, torch's peak allocation (network, Adam, storage, minibatches) and the device
    memory the whole process holds now (also Genesis's own buffers and the CUDA context, outside torch)."""
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info()
        out.update(torch_peak_mb=torch.cuda.max_memory_allocated() / 1e6, process_device_mb=(total - free) / 1e6)
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-envs", type=int, nargs="+", default=None, help="default: 1024 8192 (+32768 on CUDA)")
    p.add_argument("--num-steps", type=int, default=100, help="steps per env per iteration")
    p.add_argument("--env-steps", type=int, default=100, help="steps timed in the physics/env section")
    p.add_argument("--iterations", type=int, default=3, help="timed repetitions of rollout, update and train")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--out", default="bench_results.json")
    args = p.parse_args(argv)
    import train
    cfg = train.TrainConfig(device=args.device)  # the thread settings train.py uses on CPU
    sizes = args.num_envs or ([1024, 8192] + ([32768] if args.device.startswith("cuda") else []))
    results = {"device": args.device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "cpu_threads": {"rollout": 1, "update": cfg.threads_update}, "sizes": {}}
    if "adam" in args.sections:
        cpu_threads(cfg, "update")
        results["adam"] = bench_adam(args.device)
        print(f"adam: one step on the default network (38,281 parameters), {args.device}")
        for name, r in results["adam"].items():
            print(f"  {name:<26s} {r['us_per_step']:8.1f} us   {r['ratio_to_fused']:.2f} x fused")
    for n in sizes:
        r = results["sizes"][n] = {}
        print(f"--- {n} envs x {args.num_steps} steps = {n * args.num_steps:,} samples per iteration")
        env = None
        if {"physics", "env", "rollout", "train", "ops"} & set(args.sections):
            env = HoverEnv(n, device=args.device, seed=0, check_actions=False)
        cpu_threads(cfg, "rollout")
        if {"physics", "env"} & set(args.sections):
            r.update(bench_physics_and_env(env, args.env_steps))
            print(f"  physics (raw Genesis)  {r['physics_steps_per_s']:10,.0f} env-steps/s\n"
                  f"  HoverEnv.step          {r['env_steps_per_s']:10,.0f} env-steps/s   "
                  f"overhead {100 * r['env_overhead']:+.1f} % over physics")
        if "rollout" in args.sections:
            r.update(bench_rollout(env, args.num_steps, args.iterations))
            print(f"  rollout (env+policy+storage) {r['rollout_steps_per_s']:10,.0f} env-steps/s   "
                  f"{r['rollout_s']:.3f} s per iteration")
        if "update" in args.sections:
            cpu_threads(cfg, "update")
            r.update(bench_update(n, args.num_steps, args.device, args.iterations))
            print(f"  PPO update             {r['update_s']:.3f} s  ({r['samples_per_s']:,.0f} samples/s per epoch)   "
                  f"plain-torch floor {r['floor_s']:.3f} s   ratio {r['update_ratio_to_floor']:.2f}   "
                  f"optimizer share {100 * r['optimizer_share']:.1f} %")
        if "train" in args.sections:
            r.update(bench_train(env, args.num_steps, args.iterations))
            line = f"  train.py iteration     {r['iteration_s']:.3f} s  ({r['train_steps_per_s']:,.0f} env-steps/s)"
            if "physics_steps_per_s" in r and "floor_s" in r:
                r["floor_iteration_s"] = n * args.num_steps / r["physics_steps_per_s"] + r["floor_s"]
                r["train_ratio_to_floor"] = r["iteration_s"] / r["floor_iteration_s"]
                line += f"   floor (physics + plain-torch update) {r['floor_iteration_s']:.3f} s   " \
                        f"ratio {r['train_ratio_to_floor']:.2f}"
            print(line)
        if "ops" in args.sections:
            r["ops"] = bench_ops(env)
            print("  operators per rollout step (not views: kernel launches on a GPU): " + ", ".join(
                f"{name} {c['launching']}" for name, c in r["ops"].items()))
        if "workers" in args.sections and args.device == "cpu":
            env = None  # release this scene: the workers build their own
            r.update(bench_workers(n, args.num_steps, args.iterations))
            line = f"  train.py --workers {r['workers']}   {r['workers_iteration_s']:.3f} s  " \
                   f"({r['workers_steps_per_s']:,.0f} env-steps/s, {n // r['workers']} envs each)"
            if "floor_iteration_s" in r:
                r["workers_ratio_to_floor"] = r["workers_iteration_s"] / r["floor_iteration_s"]
                line += f"   ratio to the one-process floor {r['workers_ratio_to_floor']:.2f}"
            print(line)
        r["memory"] = peak_memory(args.device)  # this size's peaks
        print("  memory (MB): " + "  ".join(f"{k} {v:,.0f}" for k, v in r["memory"].items()))
        del env
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


SECTIONS = ("physics", "env", "rollout", "update", "adam", "train", "workers", "ops")

if __name__ == "__main__":
    main()
