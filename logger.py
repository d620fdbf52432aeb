"""What a training run leaves behind: episode figures, metrics.jsonl, TensorBoard scalars and checkpoints.

    rollout -> [EpisodeStats.add() every step] -> ... -> update -> [RunLog.write(): one row per iteration]

EpisodeStats sums what the env reports about its finished episodes on the device, with no host sync per step;
read() turns the sums into one iteration's figures. RunLog writes a row to the terminal, to metrics.jsonl and,
when asked, to TensorBoard under rsl_rl's names, so that runs of both sit side by side. Checkpoints and exports
are written through write_atomically: a crash or Ctrl-C never leaves half a file. Imports torch only.
"""
import json
import os
import time

import torch


class EpisodeStats:
    """Sums of the env's per-episode figures over the episodes that finished, on the device; train.py and eval.py
    count with it. Figures: each per-episode sum as a mean per episode (`episode_<name>`), and the env's `rates`
    (counts such as targets or falls) per env-minute (`<name>_per_<unit>_min`)."""

    def __init__(self, rates, unit, dt):
        self.rates, self.unit, self.dt, self.names, self.sums = rates, unit, dt, None, None

    def add(self, done, episode):  # done [N] bool: which episodes to count; episode: env.step's sums, [N] each
        if self.names is None:
            self.names = list(episode)
            self.sums = torch.zeros(1 + len(self.names), dtype=torch.float64, device=done.device)
        per_env = torch.stack([done.float(), *(episode[name] for name in self.names)], 1).double()  # [N, 1 + names]
        self.sums.addmv_(per_env.T, done.double())  # sums over the envs where done: 4 ops, whatever the names

    def read(self, all_sum=None):
        """The figures, over all workers (all_sum adds a tensor up over them): one host sync; the sums restart."""
        count, *sums = (all_sum(self.sums) if all_sum else self.sums).tolist()
        self.sums.zero_()
        if count == 0:
            return {"episodes": 0}
        totals = dict(zip(self.names, sums))
        minutes = totals["length"] * self.dt / 60
        return {"episodes": int(count), **{f"episode_{name}": total / count for name, total in totals.items()},
                **{f"{name}_per_{self.unit}_min": totals[name] / minutes for name in self.rates}}


RSL_RL_NAMES = {"value_loss": "Loss/value_function", "surrogate": "Loss/surrogate", "entropy": "Loss/entropy",
                "lr": "Loss/learning_rate", "action_std": "Policy/mean_std", "steps_per_s": "Perf/total_fps",
                "collect_s": "Perf/collection time", "learn_s": "Perf/learning_time",
                "episode_return": "Train/mean_reward", "episode_length": "Train/mean_episode_length"}


def tensorboard_name(key):
    """A figure of metrics.jsonl as TensorBoard shows it: rsl_rl's name where it has one; reward terms under
    Episode/, every other figure under Train/."""
    if key in RSL_RL_NAMES:
        return RSL_RL_NAMES[key]
    return "Episode/" + key[len("episode_"):] if key.startswith("episode_reward_") else "Train/" + key


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


class RunLog:
    """The run's directory: config.json, metrics.jsonl (a row per iteration, appended: a resumed run goes on in the
    same file), TensorBoard event files if asked, checkpoints. Only the main worker writes (active)."""

    def __init__(self, run_dir, config, episodes, max_iterations, tensorboard=False, active=True):
        self.run_dir, self.active, self.board, self.metrics = run_dir, active, None, None
        self.episodes, self.max_iterations = episodes, max_iterations  # (what the line shows)
        if active:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
            if tensorboard:  # (train.py checked that the package is there)
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(run_dir)

    def write(self, row):
        """One iteration: a line on the terminal, every figure in metrics.jsonl (and TensorBoard)."""
        if self.active:
            print(self.line(row), flush=True)
            print(json.dumps(row), file=self.metrics, flush=True)
        for key, value in row.items() if self.board else ():
            if key != "iteration":
                self.board.add_scalar(tensorboard_name(key), value, row["iteration"])

    def line(self, row):
        hms = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))  # noqa: E731
        unit = self.episodes.unit
        figures = "  ".join([f"return {row['episode_return']:7.3f}"] + [
            f"{k}/{unit}-min {row[f'{k}_per_{unit}_min']:6.3f}" for k in self.episodes.rates]) \
            if row["episodes"] else "no episode ended"
        return (f"iter {row['iteration']:4d}/{self.max_iterations}  {row['steps_per_s']:7,.0f} steps/s  {figures}  "
                f"kl {row['kl']:.4f}  lr {row['lr']:.1e}  std {row['action_std']:.3f}  "
                f"elapsed {hms(row['elapsed_s'])}  eta {hms(row['eta_s'])}")

    def save(self, name, state):
        if self.active:
            write_atomically(os.path.join(self.run_dir, name), lambda tmp: torch.save(state, tmp))

    def close(self):
        for f in (self.metrics, self.board):
            if f is not None:
                f.close()


def learner_summary(policy, optimizer, storage, unit):
    """What the design promises, read from the real tensors: one network's weights, the learner's memory, the
    rollout's."""
    n = {part: sum(p.numel() for p in getattr(policy, part).parameters()) for part in ("actor", "critic")}
    memory = dict(optimizer.nbytes(), total=sum(optimizer.nbytes().values()))
    return (f"one network for every {unit}: actor {n['actor']:,} + critic {n['critic']:,} = {sum(n.values()):,} "
            f"weights + {policy.std.numel()} action std\nmemory of the learner (float32):\n" +
            "\n".join(f"  {k:<16s} {b / 1e3:7.1f} KB" for k, b in memory.items()) +
            f"\nrollout storage: {sum(storage.nbytes().values()) / 1e6:.1f} MB on {storage.obs.device}")
