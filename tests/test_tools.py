"""Tests of the tools around the loop: train.py and config.py (settings, checkpoints, resume, signals, workers),
eval.py, export.py, bench.py and workers.py. They train tiny runs of the drone task in this process; the drone's
scene of the whole run (conftest.py) flies the exported policies."""
import contextlib
import ctypes
import dataclasses
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import config
import env as env_module
import eval as evaluation
import export
import train
from adam import Adam
from env import HoverConfig
from logger import tensorboard_name
from policy import ActorCritic
from ppo import PPOConfig, update
from storage import Batch, RolloutStorage
from tests.checks import assert_same_run
from workers import Workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8


@pytest.fixture
def env(hover_env):
    return hover_env


TINY = ["--device", "cpu", "--workers", "1", "--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2",
        "--num-epochs", "2"]


def settings(*flags):
    """config.py's reading of train.py's command line, quietly."""
    return config.train_settings(list(flags), train.TrainConfig, "", say=lambda s: None)


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "0"], "--num-envs must be >= 1, got 0"),
    (["--num-envs", "10", "--num-steps", "3", "--num-minibatches", "4"], "does not divide the batch"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--min-std", "-0.1"], "--min-std must be >= 0, got -0.1"),
    (["--hidden", "-1"], "--hidden must be >= 1, got -1"),
    (["--hidden", "64", "0"], "--hidden must be >= 1, got 64 0"),
    (["--progress-speed-cap", "-1"], "--progress-speed-cap must be >= 0, got -1.0"),
    (["--crash-multiple", "0"], "--crash-multiple must be > 0, got 0.0"),
    (["--crash-ramp", "200", "100"], "--crash-ramp must be a range LOW HIGH with LOW <= HIGH, got 200 100"),
    (["--crash-ramp", "100"], "--crash-ramp takes 2 values, got 100"),
    (["--dt", "0"], "--dt must be > 0, got 0.0"),
    (["--episode-length-s", "0"], "--episode-length-s must be > 0, got 0.0"),
    (["--episode-length-s", "0.001"], "--episode-length-s must be 1 to 2^31 steps (--dt 0.01)"),
    (["--init-pos", "0", "0"], "--init-pos takes 3 values, got 0.0 0.0"),
    (["--init-pos", "0", "0", "0.05"], "--init-pos must start above --crash-min-height 0.1"),
    (["--target-low", "0", "0"], "--target-low takes 3 values"),
    (["--target-low", "2", "0", "1"], "--target-low must be <= --target-high on every axis"),
    (["--crash-rel-pos", "1", "1"], "--crash-rel-pos takes 3 values, got 1.0 1.0"),
    (["--reward-crash", "nan"], "--reward-crash must be a finite number, got nan"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),
    (["--desired-kl", "0"], "--desired-kl must be > 0, got 0.0"),
    (["--clip", "-1"], "--clip must be > 0, got -1.0"),
    (["--gamma", "1.5"], "--gamma must be <= 1, got 1.5"),
    (["--lr-min", "0.1", "--lr-max", "0.01"], "--lr-min must be <= --lr-max, got 0.1 and 0.01"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cudax"], "unknown device 'cudax'"),
    (["--resume", "/nonexistent/ckpt.pt"], "no checkpoint at"),
    (["--normalize-obs", "ture"], "argument --normalize-obs: expected true or false"),
    (["--hidden", "64", "x"], "argument --hidden: invalid int value: 'x'"),
    (["--task", "humanoid"], "no task 'humanoid'"),
    (["--task", "json"], "the module json is no task: it lacks Config, Env, TRAIN, CPU_PRESET"),
    (["--activation", "relu6"], "--activation must be one of tanh, elu, got 'relu6'"),
    (["--task", "go2", "--progress-speed-cap", "1"], "unrecognized arguments: --progress-speed-cap 1"),
    (["--task", "go2", "--default-joint-angles", "0", "1"], "--default-joint-angles takes 12 values"),
    (["--eval", "runs/x/ckpt_0010.pt"], "unrecognized arguments: --eval"),
    (["--task", ""], "no task ''"),
    (["--task", ".foo"], "no task '.foo'"),
    (["--resume", ""], "no checkpoint at"),
    (["--episode-length-s", "1e8"], "--episode-length-s must be 1 to 2^31 steps"),
    (["--hidden", "100000"], "--hidden must be <= 8192, got 100000"),
    (["--num-envs", "1048576", "--num-steps", "10000"], "must be at most 2^25 samples per worker"),
])
def test_train_rejects_bad_settings_before_genesis(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
    with pytest.raises(SystemExit) as e:
        train.main(["--device", "cpu", *flags] if "--device" not in flags else flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and message in err and len(err.splitlines()) == 1, err


def test_train_refuses_a_log_dir_it_cannot_write_before_genesis(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
    (tmp_path / "file").write_text("")
    for log_dir, message in ((tmp_path / "file", "cannot write into"), (tmp_path / "file" / "under", "cannot write")):
        with pytest.raises(SystemExit) as e:
            train.main(["--device", "cpu", "--log-dir", str(log_dir), "--run-name", "x"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_rejects_missing_cuda_from_the_command_line():
    # a real process: exit status 2, one line on stderr, and genesis never imported
    cmd = [sys.executable, "-c", "import sys, train\ntry:\n    train.main(['--device', 'cuda'])\n"
           "finally:\n    print('genesis' in sys.modules)"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == ("train.py: error: --device cuda asked for, but torch sees no CUDA device: "
                                "use --device cpu")
    assert r.stdout.strip() == "False"


def test_train_rejects_corrupt_and_mismatched_checkpoints(smoke_run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    state = torch.load(os.path.join(smoke_run, "ckpt_0002.pt"), weights_only=True)
    state["config"]["hidden"] = [2 * h for h in state["config"]["hidden"]]  # weights that do not fit these settings
    torch.save(state, tmp_path / "misfit.pt")
    for content in (b"not a checkpoint", b'{"iteration": 1, "loss"', (tmp_path / "misfit.pt").read_bytes()):
        bad.write_bytes(content)  # (torch's error for the second: 10 lines)
        for program in (train, evaluation, export):
            with pytest.raises(SystemExit) as e:
                program.main(["--resume", str(bad)] if program is train else [str(bad)])
            err = capsys.readouterr().err
            assert e.value.code == 2 and "is not a checkpoint of this project" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_train_booleans_are_strict(text, value):
    assert settings("--device", "cpu", "--normalize-obs", text).cfg.normalize_obs is value


def test_train_settings_come_from_the_declarations(capsys):
    """--help shows each field's own help text, the task's settings among them; each task's own training settings
    (TRAIN) apply, and on a CPU its CPU preset, printed when it applies; flags override both."""
    import examples.go2.go2_env as go2_module
    for task_name, task in (("hover", env_module), ("go2", go2_module)):
        with pytest.raises(SystemExit):
            settings("--task", task_name, "--help")
        help_text = " ".join(capsys.readouterr().out.split())
        for cls in (train.TrainConfig, PPOConfig):
            for f in dataclasses.fields(cls):
                if f.name != "ppo":
                    assert " ".join(f.metadata["help"].split()) in help_text, f.name
        assert all(f"--{f.name.replace('_', '-')}" in help_text for f in dataclasses.fields(task.Config))
        assert f"the task ({task.__name__}.Config)" in help_text and config.flags_text(task.CPU_PRESET) in help_text
        cfg, task_cfg, module, _ = config.train_settings(["--task", task_name, "--device", "cpu", "--num-steps",
                                                          "20"], train.TrainConfig, "")
        out = capsys.readouterr().out
        assert module is task and "CPU preset applies" in out and config.flags_text(task.CPU_PRESET) in out
        assert cfg.task == task_name and cfg.num_steps == 20  # a flag overrides the preset
        for k, v in {**task.TRAIN, **task.CPU_PRESET}.items():
            if k != "num_steps":
                assert getattr(cfg, k, getattr(cfg.ppo, k, getattr(task_cfg, k, None))) == v, k
    assert "upper bound of the adaptive learning rate (rsl_rl's) (default 0.01)" in help_text
    cfg, task_cfg, _, _ = settings("--device", "cpu", "--crash-ramp", "5", "9", "--hidden", "64", "32")
    assert cfg.task == "hover" and task_cfg.crash_ramp == (5, 9) and cfg.hidden == (64, 32)  # tuples, not lists
    assert settings("--device", "cpu", "--task", "examples.go2.go2_env").task is go2_module  # a module path


TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # optional: pip install tensorboard


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The real loop on 8 drones with the design's network (the GPU's 128-128), asked for 5 iterations; a SIGTERM
    arrives during the second one. It logs for TensorBoard too where the package is installed. Reused by the resume,
    eval and export tests."""
    log_dir = str(tmp_path_factory.mktemp("runs"))
    real_update, calls = train.update, []

    def update_then_sigterm(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a cluster scheduler would
        return real_update(*args)

    train.update = update_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            train.main(TINY + ["--hidden", "128", "128", "--max-iterations", "5", "--save-interval", "1",
                               "--log-dir", log_dir, "--run-name", "smoke", "--tensorboard", str(TENSORBOARD)])
    finally:
        train.update = real_update
    assert signal.getsignal(signal.SIGTERM) is before  # training's handler is gone when training returns
    with open(os.path.join(log_dir, "stdout.txt"), "w") as f:
        f.write(out.getvalue())
    return os.path.join(log_dir, "smoke")


def test_train_smoke_run_writes_config_metrics_and_checkpoints(smoke_run):
    files = set(os.listdir(smoke_run))
    # SIGTERM finished iteration 2, saved it and stopped cleanly
    assert {"config.json", "metrics.jsonl", "ckpt_0001.pt", "ckpt_0002.pt"} <= files and "ckpt_0003.pt" not in files
    assert not any(".tmp" in f for f in files)
    with open(os.path.join(smoke_run, "config.json")) as f:
        assert json.load(f)["num_envs"] == 8
    with open(os.path.join(smoke_run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["total_steps"] == 64 * r["iteration"] for r in rows)
    ckpt = config.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt")).state
    assert ckpt["iteration"] == 2 and ckpt["optimizer"]["t"] == 2 * 2 * 2  # 2 iterations x 2 epochs x 2 minibatches
    assert ckpt["format"] == config.FORMAT and len(ckpt["workers"]) == 1  # one worker's random states and envs
    assert set(ckpt["workers"][0]) == {"torch", "cuda", "generators", "env", "obs"}
    with open(os.path.join(os.path.dirname(smoke_run), "stdout.txt")) as f:
        lines = f.read().splitlines()
    # the design's figures, printed at start from the real tensors; then one line per iteration
    assert "actor 19,332 + critic 18,945 = 38,277 weights + 4 action std" in lines[4]
    assert [line.split()[-2:] for line in lines[6:11]] == [["153.1", "KB"]] * 4 + [["612.5", "KB"]]
    progress = [line for line in lines if line.startswith("iter ")]
    assert [line.split()[1] for line in progress] == ["1/5", "2/5"] and "targets/drone-min" in progress[0]


def test_train_refuses_to_overwrite_a_run(smoke_run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--log-dir", os.path.dirname(smoke_run), "--run-name", "smoke"])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_train_resume_restores_the_optimizer_exactly(smoke_run, tmp_path, monkeypatch):
    shutil.copytree(smoke_run, tmp_path / "smoke")  # (the shared run stays as it is)
    saved = config.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt")).state
    saved["task_config"]["obs_ang_vel_scale"] = 1 / 3.14159  # trained with the Genesis example's scale: resumed so
    saved["config"]["log_dir"] = str(tmp_path)
    ckpt_path = str(tmp_path / "smoke" / "ckpt_0002_example_scale.pt")
    torch.save(saved, ckpt_path)
    seen, rolled = [], []
    real_update, real_rollout = train.update, train.rollout

    def spy(policy, optimizer, batches, cfg, average):
        if not seen:  # the optimizer as the first update of the resumed run finds it
            seen.append((optimizer.m.clone(), optimizer.v.clone(), optimizer.t, float(optimizer.param_groups[0]["lr"]),
                         {k: v.clone() for k, v in policy.named_parameters()}))
        return real_update(policy, optimizer, batches, cfg, average)

    def rollout_spy(policy, env, *args):
        if not rolled:  # the policy as the first rollout finds it, the observation normalizer's statistics included
            rolled.append({k: v.clone() for k, v in policy.state_dict().items()})
            rolled.append((env.cfg, env.reward_crash))
        return real_rollout(policy, env, *args)

    monkeypatch.setattr(train, "update", spy)
    monkeypatch.setattr(train, "rollout", rollout_spy)
    train.main(["--resume", ckpt_path, "--max-iterations", "3", "--crash-multiple", "4", "--crash-ramp", "1", "3"])
    m, v, t, lr, weights = seen[0]
    assert torch.equal(m, saved["optimizer"]["m"]) and torch.equal(v, saved["optimizer"]["v"])
    assert t == saved["optimizer"]["t"] and lr == float(saved["optimizer"]["lr"])
    assert all(torch.equal(weights[k], saved["policy"][k]) for k in weights)
    assert rolled[0].keys() == saved["policy"].keys()
    assert all(torch.equal(rolled[0][k], saved["policy"][k]) for k in rolled[0])
    # iteration 3 of a crash penalty grown from x1 at iteration 1 to x4 at 3 (the task's curriculum, flags given
    # on resume); the checkpoint keeps the task's own penalty, and the scale it was trained with
    task = dataclasses.replace(config.from_dict(HoverConfig, saved["task_config"]), crash_multiple=4.0,
                               crash_ramp=(1, 3))
    assert rolled[1] == (task, 4 * task.reward_crash) and task.reward_crash == -10
    assert task.obs_ang_vel_scale == 1 / 3.14159
    with open(tmp_path / "smoke" / "metrics.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3]  # the counter went on
    resumed = config.load_checkpoint(str(tmp_path / "smoke" / "ckpt_0003.pt"))
    assert resumed.state["iteration"] == 3 and resumed.task_cfg == task


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    """2 iterations, then a resume for 2 more, equal 4 uninterrupted ones: every metrics row and the weights."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        train.main(TINY + ["--max-iterations", "4", "--save-interval", "2", "--log-dir", str(tmp_path), "--run-name",
                           "four"])
        train.main(TINY + ["--max-iterations", "2", "--log-dir", str(tmp_path), "--run-name", "two"])
        train.main(["--resume", str(tmp_path / "two" / "ckpt_0002.pt"), "--max-iterations", "4"])
    assert_same_run(tmp_path / "four", tmp_path / "two", 1, 4)


def test_resume_refuses_a_finished_run_other_envs_and_another_device_kind(smoke_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
    for flags, message in ((["--max-iterations", "2"], "the checkpoint has trained its 2 iterations: resume with "
                                                       "--max-iterations above 2"),
                           (["--max-iterations", "1"], "resume with --max-iterations above 2")):
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", os.path.join(smoke_run, "ckpt_0002.pt"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", os.path.join(smoke_run, "ckpt_0002.pt"), "--max-iterations", "3", "--num-envs", "16"])
    assert e.value.code == 2 and "--num-envs must stay 8 on resume" in capsys.readouterr().err
    state = torch.load(os.path.join(smoke_run, "ckpt_0002.pt"), weights_only=True)
    state["config"]["device"] = "cuda"
    torch.save(state, tmp_path / "gpu.pt")
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "gpu.pt"), "--max-iterations", "3", "--device", "cpu"])
    assert e.value.code == 2 and "the checkpoint's random states are cuda's" in capsys.readouterr().err


def test_train_resume_rejects_another_network_shape(smoke_run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", os.path.join(smoke_run, "ckpt_0002.pt"), "--hidden", "64", "64"])
    assert e.value.code == 2 and "does not match" in capsys.readouterr().err


@pytest.mark.skipif(not TENSORBOARD, reason="the optional tensorboard package is not installed")
def test_tensorboard_scalars_equal_the_metrics(smoke_run):
    """Every figure of metrics.jsonl, at its iteration, under rsl_rl's name where it has one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(smoke_run, size_guidance={"scalars": 0})
    board.Reload()
    with open(os.path.join(smoke_run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][:2]  # the smoke run's own two iterations
    expected = {(tensorboard_name(k), r["iteration"]): v for r in rows for k, v in r.items() if k != "iteration"}
    logged = {(tag, e.step): e.value for tag in board.Tags()["scalars"] for e in board.Scalars(tag) if e.step <= 2}
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9) for key, value in expected.items())
    assert {"Loss/value_function", "Loss/surrogate", "Loss/entropy", "Loss/learning_rate", "Policy/mean_std",
            "Perf/total_fps", "Perf/collection time", "Perf/learning_time", "Train/mean_reward",
            "Train/mean_episode_length", "Episode/reward_target", "Train/targets_per_drone_min",
            "Train/crashes_per_drone_min"} <= {tag for tag, _ in logged}


def test_tensorboard_missing_is_one_line_before_genesis(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--tensorboard", "true"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err == "train.py: error: --tensorboard needs the tensorboard package: pip install tensorboard"


def test_nonfinite_weights_stop_training_without_saving(tmp_path, monkeypatch, capsys):
    real_update = train.update

    def poisoned(policy, optimizer, batches, cfg, average):
        stats = real_update(policy, optimizer, batches, cfg, average)
        optimizer.theta[0] = float("nan")
        return stats

    monkeypatch.setattr(train, "update", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--max-iterations", "2", "--log-dir", str(tmp_path), "--run-name", "nan"])
    assert e.value.code == 1
    assert "non-finite loss or weights at iteration 1" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path / "nan") if f.endswith(".pt")]


def test_train_starts_cpu_workers_one_sigterm_stops_them_and_a_resume_repeats_them(tmp_path):
    """--workers 2: train.py runs two data-parallel copies of itself; a SIGTERM to it reaches both once, so they
    finish the iteration, save it and exit 0. Resumed from the checkpoint of iteration 2, the two workers repeat
    the iterations after it bit for bit: every worker's random states and envs are in the checkpoint."""
    log = open(tmp_path / "out.txt", "w+")
    cmd = [sys.executable, "train.py", *TINY, "--workers", "2", "--threads-update", "1", "--save-interval", "2",
           "--normalize-obs", "true", "--log-dir", str(tmp_path), "--run-name", "two"]
    proc = subprocess.Popen(cmd + ["--max-iterations", "10000"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    metrics = tmp_path / "two" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, "the workers never got going"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    log.seek(0)
    output = log.read()
    assert "2 worker(s) x 8 drones x 8 steps = 128 samples per iteration" in output
    assert "[W " not in output and "WARNING" not in output  # the kernel compiler's warnings stay quiet
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = rows[-1]["iteration"]
    assert 3 <= last < 10000 and all(r["total_steps"] == 128 * r["iteration"] for r in rows)
    assert f"ckpt_{last:04d}.pt" in os.listdir(tmp_path / "two") and "ckpt_0002.pt" in os.listdir(tmp_path / "two")
    ckpt = config.load_checkpoint(str(tmp_path / "two" / f"ckpt_{last:04d}.pt")).state
    assert ckpt["iteration"] == last and len(ckpt["workers"]) == 2  # both workers' random states and envs
    assert ckpt["policy"]["obs_norm.count"].item() == 128 * last  # the normalizer saw both workers' samples
    os.makedirs(tmp_path / "resumed")
    shutil.copy(tmp_path / "two" / "ckpt_0002.pt", tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed" / "ckpt_0002.pt", weights_only=True)
    state["config"]["run_name"] = "resumed"
    torch.save(state, tmp_path / "resumed" / "ckpt_0002.pt")
    subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "resumed" / "ckpt_0002.pt"),
                    "--max-iterations", str(last)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    assert_same_run(tmp_path / "two", tmp_path / "resumed", 3, last)


def test_train_rejects_cpu_workers_on_cuda(capsys):
    with pytest.raises(config.BadInput, match="torchrun"):
        config.check(train.TrainConfig(device="cuda", workers=2))


# ---------------------------------------------------------------- eval.py
def test_eval_counts_what_the_flight_counts(smoke_run, env):
    """eval.fly's counts and mean distance equal those of the same flight counted here, step by step, from the
    env's own episode sums and state."""
    ckpt = config.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
    policy = config.build_policy(ckpt.settings, 17, 4)
    policy.load_state_dict(ckpt.state["policy"])
    steps, crashes, targets, distance = 200, 0, 0, 0.0
    evaluation.reseed(env, 7)
    obs = env.reset()
    with torch.no_grad():
        for _ in range(steps):
            obs, _, done, info = env.step(policy.act_deterministic(obs))
            crashes += int((info["episode"]["crashes"] * done).sum())
            targets += int((info["episode"]["targets"] * done).sum())
            distance += (env.target_pos - env.base_pos).norm(dim=1).sum().item()
    targets += int((info["episode"]["targets"] * ~done).sum())  # the episodes still going count too
    evaluation.reseed(env, 7)
    ended, flown, means, head = evaluation.fly(policy, env, steps, noise=False, plot_steps=50)
    counts = evaluation.counted(flown, env)
    assert crashes > 0 and (counts["crashes"], counts["targets"]) == (crashes, targets)  # (the policy crashes)
    minutes = (steps * N) * env.dt / 60
    assert counts["crashes_per_drone_min"] == pytest.approx(crashes / minutes)
    assert means["mean_distance_m"] == pytest.approx(distance / (steps * N), rel=1e-5)
    assert head["distance_m"].shape == (50, N) and ended["episodes"] == crashes


def test_eval_reports_on_a_checkpoint(smoke_run):
    ckpt = os.path.join(smoke_run, "ckpt_0002.pt")
    report = evaluation.main([ckpt, "--drones", "8", "--seconds", "2"])
    assert report["drones"] == 8 and report["seconds"] == pytest.approx(2.0) and report["iteration"] == 2
    assert report["drone_minutes"] == pytest.approx(8 * 2 / 60) and report["task"] == "hover"
    assert report["crashes"] > 0 and 0 < report["mean_distance_m"] < 5  # (the same counting as the test above)
    assert os.path.isfile(os.path.join(smoke_run, "ckpt_0002_flight.png"))
    assert os.path.isfile(os.path.join(smoke_run, "learning_curve.png"))
    noisy = evaluation.main([ckpt, "--drones", "8", "--seconds", "2", "--noise"])
    assert noisy["policy"] == "with action noise" and noisy["mean_distance_m"] != report["mean_distance_m"]


def test_eval_plots_the_learning_curve_of_a_run_killed_mid_write(smoke_run, tmp_path):
    shutil.copytree(smoke_run, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "loss"')  # the last line of a killed run
    os.remove(tmp_path / "run" / "learning_curve.png")
    evaluation.main([str(tmp_path / "run" / "ckpt_0002.pt"), "--drones", "2", "--seconds", "0.1"])
    assert (tmp_path / "run" / "learning_curve.png").is_file()


def test_eval_flies_the_task_the_checkpoint_was_trained_on(smoke_run, tmp_path, monkeypatch):
    ckpt = config.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt")).state
    ckpt["task_config"]["obs_ang_vel_scale"] = 1 / 3.14159  # a policy trained with the Genesis example's scale
    torch.save(ckpt, tmp_path / "example_scale.pt")
    built = []

    class Built(Exception):
        pass

    class RecordTheTask(env_module.HoverEnv):  # stands in for HoverEnv: no scene is built
        def __init__(self, *args, cfg, **kwargs):
            built.append(cfg)
            raise Built

    monkeypatch.setattr(env_module, "Env", RecordTheTask)
    with pytest.raises(Built):
        evaluation.main([str(tmp_path / "example_scale.pt")])
    assert built[0].obs_ang_vel_scale == 1 / 3.14159 and built[0].reward_target == HoverConfig().reward_target


@pytest.mark.parametrize("flags, message", [
    (["/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["CKPT", "--drones", "0"], "--envs must be within 1 and 1048576, got 0"),
    (["CKPT", "--seconds", "0"], "--seconds must be within 0 and 3600, got 0.0"),
    (["CKPT", "--seconds", "inf"], "--seconds must be within 0 and 3600, got inf"),
    (["CKPT", "--seconds", "nan"], "--seconds must be within 0 and 3600, got nan"),
    (["CKPT", "--seconds", "1e9"], "--seconds must be within 0 and 3600, got 1000000000.0"),
    (["CKPT", "--seconds", "0.001"], "--seconds must be at least one control step, 0.01 s, got 0.001"),
    (["CKPT", "--task", "go2"], "the go2 task does not take the settings of the checkpoint's task, hover"),
    (["CKPT", "--perturbations"], "the hover task names no perturbations"),
    (["CKPT", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_eval_rejects_bad_input_in_one_line(flags, message, capsys, smoke_run, monkeypatch):
    class NoScene(env_module.HoverEnv):
        def __init__(self, *args, **kwargs):
            pytest.fail("a scene was built")

    monkeypatch.setattr(env_module, "Env", NoScene)
    flags = [os.path.join(smoke_run, "ckpt_0002.pt") if f == "CKPT" else f for f in flags]
    with pytest.raises(SystemExit) as e:
        evaluation.main(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("eval.py: error: ") and message in err and len(err.splitlines()) == 1



# ---------------------------------------------------------------- workers.py: data-parallel training


def dp_batches(T, N, M, seed, rank, world, average):
    """The same global data on every worker: T steps of world*N envs; worker r owns envs [r*N, (r+1)*N).
    Minibatch k of worker r holds the samples with index % M == k, so that minibatch k of the single
    process (world=1, N*world envs) is exactly the union of the workers' minibatches k."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = ActorCritic(17, 4, hidden=(32, 32))  # the rollout policy, the same on every worker
    s = RolloutStorage(T, N, 17, 4, "cpu")
    cols = slice(rank * N, (rank + 1) * N)
    with torch.no_grad():
        for _ in range(T):
            obs = torch.randn(N * world, 17, generator=g)
            done = torch.rand(N * world, generator=g) < 0.1
            a = torch.randn(N * world, 4, generator=g)
            out = policy.evaluate(obs, a)
            s.add(obs=obs[cols], actions=a[cols], rewards=torch.randn(N * world, generator=g)[cols], dones=done[cols],
                  time_outs=done[cols], final_obs=obs[cols], values=out.value[cols], log_probs=out.log_prob[cols],
                  mean=out.mean[cols], std=out.std[cols])
        s.compute_returns(torch.zeros(N * world)[cols], policy.value(s.timed_out_obs()), 0.99, 0.95, average=average)
    flat = [x.flatten(0, 1) for x in (s.obs, s.actions, s.log_probs, s.values, s.advantages, s.returns, s.mean,
                                      s.std)]
    # sample (t, n) of worker r is global sample (t, r*N + n); order each minibatch by global index
    index = (torch.arange(T)[:, None] * N * world + rank * N + torch.arange(N)[None]).flatten()
    return [Batch(*(x[index % M == k] for x in flat)) for k in range(M)]


def dp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    workers = Workers()
    workers.start(torch.device("cpu"))
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, hidden=(32, 32))
    opt = Adam(policy.parameters(), lr=1e-3)
    if rank == 1:
        opt.theta.add_(1.0)  # a different start: the broadcast must fix it
    workers.broadcast(opt.theta)
    thetas = []
    for it in range(3):  # three updates on fresh data, theta recorded after each
        batches = dp_batches(T=6, N=8, M=2, seed=it, rank=rank, world=world, average=workers.average)
        update(policy, opt, batches * 2, PPOConfig(), workers.average)  # 2 epochs x 2 minibatches
        thetas.append(opt.theta.clone())
    torch.save(thetas, os.path.join(out_dir, f"rank{rank}.pt"))
    workers.close()


def test_data_parallel_update_equals_single_process_on_the_global_batch():
    with tempfile.TemporaryDirectory() as out:
        port = 29500 + os.getpid() % 1000
        mp.spawn(dp_worker, args=(2, port, out), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    # single process, all 2 x 8 envs, the same minibatch partition and the same starting weights
    torch.manual_seed(0)
    policy = ActorCritic(17, 4, hidden=(32, 32))
    opt = Adam(policy.parameters(), lr=1e-3)
    for it in range(3):
        assert torch.equal(r0[it], r1[it])  # the workers' weights are bit-identical after every update
        update(policy, opt, dp_batches(T=6, N=16, M=2, seed=it, rank=0, world=1, average=None) * 2, PPOConfig())
        assert torch.allclose(r0[it], opt.theta, atol=1e-6), (r0[it] - opt.theta).abs().max()
    assert (r0[-1] - torch.cat([p.detach().flatten() for p in ActorCritic(17, 4, hidden=(32, 32)).parameters()])
            ).abs().max() > 1e-3  # the weights really moved


# ---------------------------------------------------------------- bench.py

def test_bench_runs_its_sections_and_counts_the_operators_of_a_step(tmp_path, capsys):
    """Every section but `workers` (which runs `train.py --workers 2`, as the workers test does) runs at a tiny size,
    and writes what it prints. Its timings vary and no test asserts one; the operators a rollout step dispatches are
    counted, not timed, and are asserted."""
    import bench
    out = str(tmp_path / "bench.json")
    sections = [s for s in bench.SECTIONS if s != "workers"]
    results = bench.main(["--num-envs", "8", "--num-steps", "8", "--env-steps", "5", "--iterations", "1",
                          "--sections", *sections, "--out", out])
    printed = capsys.readouterr().out
    r = results["sizes"][8]
    assert r["samples"] == 64 and r["memory"]["host_peak_rss_mb"] > 0
    assert {"env_overhead", "update_ratio_to_floor", "train_ratio_to_floor", "rollout_steps_per_s"} <= set(r)
    assert f"ratio {r['update_ratio_to_floor']:.2f}" in printed  # (a consistency check of the printout, no more)
    assert set(results["adam"]) == {"this Adam (flat buffers)", "torch Adam foreach", "torch Adam fused",
                                    "torch Adam for-loop"}
    ops = r["ops"]  # operators per rollout step, Genesis's own left out
    assert ops["storage.add"]["by_name"] == {"select": 10, "copy_": 10}  # a view and a copy per field
    assert {k: c["launching"] for k, c in ops.items()} == {"policy.act": 34, "env.step": 79, "storage.add": 10,
                                                          "EpisodeStats.add": 5}  # EXPERIMENTS.md's counts
    assert set(ops) == {"policy.act", "env.step", "storage.add", "EpisodeStats.add"}
    assert all(0 < c["launching"] <= c["ops"] == sum(c["by_name"].values()) for c in ops.values())
    with open(out) as f:
        assert json.load(f)["sizes"]["8"] == json.loads(json.dumps(r))


# ---------------------------------------------------------------- export.py


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """The smoke run's last checkpoint exported in every format this machine can write."""
    out = str(tmp_path_factory.mktemp("export"))
    export.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--out", out])
    ckpt = config.load_checkpoint(os.path.join(smoke_run, "ckpt_0002.pt"))
    policy = config.build_policy(ckpt.settings, 17, 4)  # as train.py built it
    policy.load_state_dict(ckpt.state["policy"])
    assert policy.obs_norm.count > 0  # the normalizer is on (CPU preset) and has learned: the export must carry it
    return out, policy


@pytest.fixture(scope="module")
def parity_obs(hover_env, exported):
    """10,000 random observations and 10,000 from a real rollout of the policy (8 drones x 1,250 steps)."""
    _, policy = exported
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(10_000, 17, generator=g) * 3 - 1.5
    obs, seen = hover_env.reset(), []
    with torch.no_grad():
        for _ in range(1250):
            seen.append(obs)
            obs = hover_env.step(policy.act(obs).actions)[0]
    return {"random": rand, "rollout": torch.cat(seen)}


def deterministic_actions(policy, obs):
    with torch.no_grad():
        return policy.act_deterministic(obs).clamp(-1, 1)  # the env clips actions to [-1, 1] too


@pytest.fixture(scope="module")
def c_policy(exported, tmp_path_factory):
    """policy.c compiled with the system's cc, with a batch loop around policy_act for the tests."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine")
    out, _ = exported
    build = tmp_path_factory.mktemp("c")
    (build / "batch.c").write_text('#include "policy.h"\nvoid act_batch(const float *obs, float *act, int n) {\n'
                                   '    for (int k = 0; k < n; k++) policy_act(obs + 17 * k, act + 4 * k);\n}\n')
    lib = build / "libpolicy.so"
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{out}", "-o", str(lib),
                    os.path.join(out, "policy.c"), str(build / "batch.c"), "-lm"], check=True)
    act_batch = ctypes.CDLL(str(lib)).act_batch

    def run(obs):  # obs [B, 17] -> actions [B, 4] from the C code
        x = np.ascontiguousarray(obs.detach().cpu().numpy(), dtype=np.float32)
        y = np.empty((len(x), 4), dtype=np.float32)
        act_batch(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(len(x)))
        return torch.from_numpy(y)
    return run


def test_export_writes_every_artifact(exported):
    out, _ = exported
    onnx = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None
    expected = {"policy.pt2", "policy.h", "policy.c", "policy.json"} | ({"policy.onnx"} if onnx else set())
    assert set(os.listdir(out)) == expected  # and no temporary file left behind
    with open(os.path.join(out, "policy.json")) as f:
        meta = json.load(f)
    assert meta["iteration"] == 2 and meta["control_rate_hz"] == 100 and len(meta["observation"]) == 17
    assert [o["index"] for o in meta["observation"]] == list(range(17))
    assert meta["action"]["hover_rpm"] == pytest.approx(14468.429183500699) and "microcontroller" not in meta
    assert meta["c_footprint"] == {"flash_bytes": 4 * (19_332 + 2 * 17), "stack_bytes": 4 * (17 + 2 * 128),
                                   "multiply_adds": 17 * 128 + 128 * 128 + 128 * 4, "tanhf_calls": 256}


@pytest.mark.parametrize("source", ["random", "rollout"])
def test_exported_torch_program_matches_the_policy(exported, parity_obs, source):
    out, policy = exported
    program = torch.export.load(os.path.join(out, "policy.pt2")).module()  # torch alone: no project code
    obs = parity_obs[source]
    with torch.no_grad():
        err = (program(obs) - deterministic_actions(policy, obs)).abs().max().item()
        assert program(obs[:1]).shape == (1, 4)  # any batch size
    assert err <= 1e-6, err


@pytest.mark.parametrize("source", ["random", "rollout"])
def test_exported_onnx_matches_the_policy(exported, parity_obs, source):
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnx export and check need the optional packages onnx, onnxscript and onnxruntime")
    import onnxruntime
    out, policy = exported
    session = onnxruntime.InferenceSession(os.path.join(out, "policy.onnx"))
    obs = parity_obs[source]
    actions = torch.from_numpy(session.run(None, {"obs": obs.numpy()})[0])
    assert (actions - deterministic_actions(policy, obs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("source", ["random", "rollout"])
def test_exported_c_matches_the_policy(exported, parity_obs, c_policy, source):
    _, policy = exported
    obs = parity_obs[source]
    err = (c_policy(obs) - deterministic_actions(policy, obs)).abs().max().item()
    assert err <= 1e-5, err


def test_exported_c_flies_like_the_policy(env, exported, c_policy):
    """Closed loop: the C policy flies the drones as the torch policy does, step by step, through crashes and
    resets: 2 s of flight with the same targets, positions within 1 mm of each other at every step."""
    _, policy = exported
    paths = {}
    for name, act in (("torch", lambda obs: deterministic_actions(policy, obs)), ("c", c_policy)):
        evaluation.reseed(env, 10_001)  # the same targets for both
        obs, path, crashes = env.reset(), [], 0
        for _ in range(200):
            obs, _, done, info = env.step(act(obs))
            path.append(env.base_pos.clone())
            crashes += int((info["episode"]["crashes"] * done).sum())
        paths[name] = torch.stack(path), crashes
    assert paths["torch"][1] > 0 and paths["c"][1] == paths["torch"][1]  # crashes, each at the same step
    assert (paths["c"][0] - paths["torch"][0]).abs().max() < 1e-3


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["CKPT", "--formats", "tflite"], "argument --formats: invalid choice: 'tflite'"),
    (["CKPT", "--out", "/proc/no/such/dir"], "cannot write into /proc/no/such/dir"),
])
def test_export_rejects_bad_input_in_one_line(smoke_run, argv, message, capsys):
    argv = [os.path.join(smoke_run, "ckpt_0002.pt") if a == "CKPT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_export_of_a_foreign_file_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        export.main([str(bad), "--out", str(out)])
    assert e.value.code == 2 and "is not a checkpoint of this project" in capsys.readouterr().err
    assert not out.exists()  # checked before anything is written


def test_export_interrupted_leaves_no_partial_file(smoke_run, tmp_path, monkeypatch):
    """A failure while writing policy.c leaves the files already renamed whole, and no half-written one."""
    def broken(model, header):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle
    monkeypatch.setattr(export, "c_source", broken)
    with pytest.raises(KeyboardInterrupt):
        export.main([os.path.join(smoke_run, "ckpt_0002.pt"), "--out", str(tmp_path), "--formats", "torch", "c"])
    assert sorted(os.listdir(tmp_path)) == ["policy.h", "policy.pt2"]




# ---------------------------------------------------------------- a third task, from README's contract alone
POINT_TASK = '''
"""Point masses on a line, each pushed toward its target: README's task contract, written from its table alone."""
from dataclasses import dataclass, field

import torch


def setting(default, help, **rule):
    return field(default=default, metadata={"help": help, **rule})


@dataclass
class Config:
    dt: float = setting(0.05, "control step [s]", above=0)
    episode_length_s: float = setting(2.0, "time limit [s]", above=0)

    def conflicts(self):
        if self.episode_length_s < self.dt:
            yield "--episode-length-s must be at least one step"


TRAIN = dict(hidden=(16, 16))
CPU_PRESET = dict(num_envs=16, num_steps=8, workers=1, num_minibatches=2, num_epochs=2)


class Env:
    num_obs, num_actions, unit, rates = 2, 1, "point", ("arrivals",)

    def __init__(self, num_envs, device="cpu", seed=0, cfg=None, show_viewer=False, record_camera=False,
                 check_actions=True):
        self.num_envs, self.cfg, self.device, self.camera = num_envs, cfg or Config(), torch.device(device), None
        self.dt, self.max_episode_length = self.cfg.dt, round(self.cfg.episode_length_s / self.cfg.dt)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.x, self.target = torch.zeros(num_envs), torch.zeros(num_envs)
        self.t, self.sums = torch.zeros(num_envs), torch.zeros(num_envs, 3)

    def set_iteration(self, i):
        pass

    def _obs(self):
        return torch.stack((self.target - self.x, self.t / self.max_episode_length), 1)

    def reset(self, random_episode_start=False):
        self.x.zero_(), self.t.zero_(), self.sums.zero_()
        self.target = torch.rand(self.num_envs, generator=self.generator) * 2 - 1
        return self._obs()

    def step(self, actions):
        gap = (self.target - self.x).abs()
        self.x = self.x + actions[:, 0].clamp(-1, 1) * self.dt
        reward = gap - (self.target - self.x).abs()
        arrived = (self.target - self.x).abs() < 0.05
        self.t += 1
        time_outs = (self.t >= self.max_episode_length) & ~arrived
        done = arrived | time_outs
        self.sums += torch.stack((reward, torch.ones_like(reward), arrived.float()), 1)
        episode = {"return": self.sums[:, 0].clone(), "length": self.sums[:, 1].clone(),
                   "arrivals": self.sums[:, 2].clone()}
        final_obs = self._obs()
        new = torch.rand(self.num_envs, generator=self.generator) * 2 - 1
        self.x, self.t = self.x.masked_fill(done, 0.0), self.t.masked_fill(done, 0.0)
        self.target, self.sums = torch.where(done, new, self.target), self.sums.masked_fill(done[:, None], 0.0)
        return self._obs(), reward, done, {"time_outs": time_outs, "final_obs": final_obs, "episode": episode}

    def measure(self):
        return {"gap": (self.target - self.x).abs()}


def describe(cfg):
    return {"control_rate_hz": round(1 / cfg.dt), "observation": ["target - x", "time"],
            "action": {"size": 1, "range": [-1.0, 1.0]}}
'''


def test_a_third_task_written_from_the_contract_trains_evaluates_and_exports(tmp_path, monkeypatch):
    (tmp_path / "point_task.py").write_text(POINT_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--task", "point_task", "--device", "cpu", "--max-iterations", "2", "--log-dir", str(tmp_path),
                    "--run-name", "points"])
    assert "one network for every point" in out.getvalue() and "arrivals/point-min" in out.getvalue()
    ckpt = str(tmp_path / "points" / "ckpt_0002.pt")
    report = evaluation.main([ckpt, "--envs", "16", "--seconds", "2"])
    assert report["task"] == "point_task" and report["points"] == 16 and "mean_gap" in report
    assert report["arrivals"] >= 0 and (tmp_path / "points" / "ckpt_0002_flight.png").is_file()
    written = export.main([ckpt, "--formats", "torch", "c"])
    assert {os.path.basename(p) for p in written} == {"policy.pt2", "policy.h", "policy.c", "policy.json"}
    assert json.loads((tmp_path / "points" / "ckpt_0002_export" / "policy.json").read_text())["action_size"] == 1


# ---------------------------------------------------------------- every task file stands alone
ALONE = """
import os, sys, torch
for folder, module, actions in %r:
    os.chdir(folder)
    sys.path.insert(0, folder)
    sys.modules.pop("env", None)  # (each folder's own copy)
    e = __import__(module).Env(4, device="cpu", seed=0)
    e.reset()
    obs, reward, done, info = e.step(torch.zeros(4, actions))
    assert obs.shape == (4, e.num_obs) and reward.shape == (4,), module
    sys.path.remove(folder)
    print("ok", module)
"""


def test_each_task_file_runs_alone_in_an_empty_folder(tmp_path):
    """Copied into another project, each task works with torch and genesis only: env.py alone, go2_env.py alone,
    crazyflie_env.py beside the env.py it builds on (one process, one folder each, nothing else on the path)."""
    cases = []
    for name, files, module, actions in (("hover", ["env.py"], "env", 4),
                                         ("go2", ["examples/go2/go2_env.py"], "go2_env", 12),
                                         ("crazyflie", ["env.py", "examples/crazyflie/crazyflie_env.py"],
                                          "crazyflie_env", 4)):
        os.makedirs(tmp_path / name)
        for f in files:
            shutil.copy(os.path.join(ROOT, f), tmp_path / name)
        cases.append((str(tmp_path / name), module, actions))
    r = subprocess.run([sys.executable, "-c", ALONE % cases], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.stdout.split() == ["ok", "env", "ok", "go2_env", "ok", "crazyflie_env"], r.stderr[-2000:]
    assert all(sorted(os.listdir(tmp_path / name)) in ([f], [f, "__pycache__"]) for name, f in
               (("hover", "env.py"), ("go2", "go2_env.py")))
