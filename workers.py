"""Data-parallel training: several processes (workers), each with its own envs and a copy of the network.

    every worker: rollout of its own envs -> storage -> PPO loss -> backward
                  -> [gradient averaged over all workers: one all-reduce] -> the same Adam step everywhere

The global batch is workers x num_envs x num_steps. Workers start from rank 0's weights and average every
gradient (and the KL, the advantage statistics and the normalizer's moments), so theta, m and v stay
bit-identical everywhere. One process per GPU under torchrun (NCCL), or `train.py --workers N` on CPU cores
(gloo): Genesis steps a CPU scene on one thread, so N workers keep N cores busy. Also: the device and the CPU
threads a process uses, and stopping on a signal.
"""
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist


class Workers:
    """This process's place among the workers, read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    TIMEOUT_S = 600  # a collective waiting longer than this (a dead worker) fails with an error instead of hanging

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0  # only the main worker prints, writes metrics and saves checkpoints

    def start(self, device):
        if self.world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=self.TIMEOUT_S))

    def average(self, t):  # in place: t becomes its mean over all workers
        return self.sum(t).div_(self.world) if self.world > 1 else t

    def sum(self, t):  # in place: t becomes its sum over all workers
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, t):  # in place: rank 0's t, everywhere
        if self.world > 1:
            dist.broadcast(t, 0)

    def gather(self, obj):  # [each worker's obj], on every worker (any picklable object)
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def resolve_device(name):
    """auto (CUDA if torch sees it, else CPU), cpu, cuda or cuda:K; a ValueError says what to change."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", name):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:K")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA device: use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return name


def cpu_threads(cfg, phase):
    """On a CPU, torch's threads per phase: one while the simulator steps (it runs on one thread; more only
    contend), cfg.threads_update for the update (EXPERIMENTS.md, "CPU threads")."""
    if cfg.device == "cpu":
        torch.set_num_threads(1 if phase == "rollout" else cfg.threads_update)


def launch(num_workers, command):
    """Run `command` as num_workers data-parallel workers on this machine, as torchrun would; exit with their
    status. If one fails, the others are stopped (they would wait for it at the next all-reduce). They run in a
    session of their own, so a Ctrl-C or SIGTERM reaches each once, from here: they finish the iteration, save."""
    with socket.socket() as s:  # a free port for the workers to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(num_workers))
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), start_new_session=True)
             for r in range(num_workers)]
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: [p.send_signal(signum) for p in procs])
    while None in (codes := [p.poll() for p in procs]):
        if any(codes):
            for p in procs:
                p.kill()  # (a no-op for those already finished)
        time.sleep(0.2)
    sys.exit(1 if any(codes) else 0)


class StopOnSignal:
    """Ctrl-C or SIGTERM: finish the iteration, save it, exit cleanly. A second signal stops at once; the
    last checkpoint on disk is intact either way, since saves are atomic."""

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
