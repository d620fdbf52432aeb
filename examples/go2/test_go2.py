"""Tests of the Go2 task: the same contract as the drone's, its observations against Genesis's own state, its
rewards, falls and time-outs, one scene of G robots for the file; then the Go2 through train.py, eval.py and
export.py, and its file copied alone."""
import contextlib
import ctypes
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import config
import eval as evaluation
import examples.go2.go2_env as go2_module
import export
import train
from examples.go2.go2_env import Go2Config, Go2Env
from tests.checks import SyncSpy, assert_same_run, rotation_matrix

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--device", "cpu", "--workers", "1", "--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2",
        "--num-epochs", "2"]

G = 4
GO2_TERMS = ("tracking_lin_vel", "tracking_ang_vel", "lin_vel_z", "base_height", "action_rate", "similar_to_default")


@pytest.fixture(scope="module")
def go2():
    return Go2Env(num_envs=G, device="cpu", seed=0)


def test_go2_keeps_the_task_contract(go2):
    obs = go2.reset()
    assert obs.shape == (G, 45) and obs.dtype == torch.float32 and go2.num_obs == 45 and go2.num_actions == 12
    assert go2.dt == 0.02 and go2.max_episode_length == 1000 and go2.unit == "robot" and go2.rates == ("falls",)
    obs, rew, done, info = go2.step(torch.zeros(G, 12))
    assert obs.shape == (G, 45) and rew.shape == (G,) and rew.dtype == torch.float32
    assert done.shape == (G,) and done.dtype == torch.bool and info["time_outs"].dtype == torch.bool
    assert info["final_obs"].shape == (G, 45) and info["nonfinite"].shape == (G,)
    assert set(info["episode"]) == {"return", "length", "falls", *(f"reward_{t}" for t in GO2_TERMS)}
    assert all(v.shape == (G,) for v in info["episode"].values())
    go2.set_iteration(7)  # the contract's curriculum hook: this task has none


def test_go2_starts_standing_level_with_its_command(go2):
    obs = go2.reset()
    expected = torch.zeros(G, 45)
    expected[:, 5] = -1.0  # gravity straight down the body's z
    expected[:, 6] = 0.5 * 2.0  # the example's command, 0.5 m/s forward, times the observation scale
    assert torch.equal(obs, expected) and torch.equal(go2.commands, torch.tensor([[0.5, 0.0, 0.0]] * G))
    angles = go2.robot.get_dofs_position(go2._motors)
    assert torch.allclose(angles, torch.tensor(Go2Config().default_joint_angles).expand(G, 12), atol=1e-6)
    assert torch.allclose(go2.robot.get_pos(), torch.tensor([0.0, 0.0, 0.42]).expand(G, 3), atol=1e-6)


def test_go2_stands_on_zero_action_and_observes_its_state(go2):
    go2.reset()
    for _ in range(25):  # 0.5 s
        obs, _, done, info = go2.step(torch.zeros(G, 12))
        assert not done.any()
    height = go2.robot.get_pos()[:, 2]
    assert ((height > 0.2) & (height < 0.42)).all()  # it settled onto its legs, in the default pose
    quat = go2.robot.get_quat()
    R_T = rotation_matrix(quat).transpose(1, 2)
    ang_b = (R_T @ go2.robot.get_ang()[:, :, None])[..., 0]
    assert torch.allclose(obs[:, :3], ang_b * 0.25, atol=1e-5)
    assert torch.allclose(obs[:, 3:6], -R_T[:, :, 2], atol=1e-5)  # R^T (0, 0, -1)
    defaults = torch.tensor(Go2Config().default_joint_angles)
    assert torch.allclose(obs[:, 9:21], go2.robot.get_dofs_position(go2._motors) - defaults, atol=1e-5)
    assert torch.allclose(obs[:, 21:33], go2.robot.get_dofs_velocity(go2._motors) * 0.05, atol=1e-5)
    assert torch.equal(obs[:, 33:], torch.zeros(G, 12)) and torch.equal(info["final_obs"], obs)
    vel_b = (R_T @ go2.robot.get_vel()[:, :, None])[..., 0]
    assert torch.allclose(go2.measure()["forward_velocity"], vel_b[:, 0], atol=1e-5)


def test_go2_applies_each_action_one_step_late(go2):
    """Robot 0 commands its FR thigh +1 (0.25 rad above the default), the others 0. With the example's latency the
    joints get the previous step's action: after one step all robots are still alike, after two robot 0's thigh
    has moved. Without the latency, it moves in the first step."""
    actions = torch.zeros(G, 12)
    actions[0, 1] = 1.0
    for latency, differs_after in ((True, 2), (False, 1)):
        go2.cfg = dataclasses.replace(Go2Config(), action_latency=latency)
        try:
            go2.reset()
            for step in (1, 2):
                obs, *_ = go2.step(actions)
                thigh = obs[:, 10]  # FR thigh angle - default
                moved = thigh[0] - thigh[1]
                assert (moved > 0.01) == (step >= differs_after), (latency, step, thigh)
                assert torch.allclose(thigh[1:], thigh[1:2].expand(G - 1), atol=1e-6)
        finally:
            go2.cfg = Go2Config()


def test_go2_tilt_is_genesis_roll_and_pitch():
    from genesis.utils.geom import quat_to_xyz
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1000, 4, generator=g)
    q = q / q.norm(dim=1, keepdim=True)
    down = torch.tensor([[0.0, 0.0, -1.0]]).expand(1000, 3)
    roll, pitch = go2_module.tilt_deg(go2_module.quat_rotate_inverse(q, down))
    rpy = quat_to_xyz(q, rpy=True, degrees=True)
    ok = rpy[:, 1].abs() < 85  # away from gimbal lock, where roll is undefined
    assert torch.allclose(roll[ok], rpy[ok, 0], atol=1e-2) and torch.allclose(pitch, rpy[:, 1], atol=1e-2)


def test_go2_falls_past_10_degrees_and_times_out_after_1000_steps(go2):
    """Robots 0 and 1 are put rolled and pitched by 15 degrees directly: a fall, not a time-out; robots 2 and 3 hit
    the time-out (their counters set to 999 directly) on the same step."""
    go2.reset()
    qpos = go2.robot.get_qpos()
    for i, (r, p) in enumerate(((15.0, 0.0), (0.0, -15.0))):
        r, p = math.radians(r) / 2, math.radians(p) / 2
        qpos[i, 3:7] = torch.tensor([math.cos(r) * math.cos(p), math.sin(r) * math.cos(p), math.cos(r) * math.sin(p),
                                     -math.sin(r) * math.sin(p)])  # q_y(pitch) q_x(roll)
    go2.robot.set_qpos(qpos, zero_velocity=True)
    go2.episode_length.fill_(999)
    obs, _, done, info = go2.step(torch.zeros(G, 12))
    assert done.all() and info["episode"]["falls"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert info["time_outs"].tolist() == [False, False, True, True]
    assert torch.equal(info["episode"]["length"], torch.ones(G))
    assert torch.equal(go2.episode_length, torch.zeros(G, dtype=torch.int32))
    assert (info["final_obs"][:2, 3:5].abs().max(1).values > math.sin(math.radians(10))).all()  # tilted gravity
    assert torch.equal(obs[:, 3:6], torch.tensor([[0.0, 0.0, -1.0]] * G))  # reset: level again


def test_go2_rewards_of_one_step(go2):
    """Each term of one mid-episode step (the difference of the running sums), against the same term computed
    from Genesis's own state after the step; then a one-step episode's sums are its terms."""
    go2.reset()
    actions = torch.full((G, 12), 0.5)
    for _ in range(10):
        _, _, done, info = go2.step(actions)
    before = {k: v.clone() for k, v in info["episode"].items()}
    obs, rew, done, info = go2.step(actions * 0.8)
    assert not done.any()
    term = {k: info["episode"][f"reward_{k}"] - before[f"reward_{k}"] for k in GO2_TERMS}
    R_T = rotation_matrix(go2.robot.get_quat()).transpose(1, 2)
    vel_b = (R_T @ go2.robot.get_vel()[:, :, None])[..., 0]
    ang_b = (R_T @ go2.robot.get_ang()[:, :, None])[..., 0]
    height = go2.robot.get_pos()[:, 2]
    dt, command = 0.02, torch.tensor([0.5, 0.0, 0.0])
    expected = {
        "tracking_lin_vel": dt * 1.0 * torch.exp(-(command[:2] - vel_b[:, :2]).square().sum(1) / 0.25),
        "tracking_ang_vel": dt * 0.2 * torch.exp(-(command[2] - ang_b[:, 2]).square() / 0.25),
        "lin_vel_z": dt * -1.0 * vel_b[:, 2].square(),
        "base_height": dt * -50.0 * (height - 0.3).square(),
        "action_rate": torch.full((G,), dt * -0.005 * 12 * 0.1 ** 2),
        "similar_to_default": dt * -0.1 * obs[:, 9:21].abs().sum(1)}
    for k in GO2_TERMS:
        assert torch.allclose(term[k], expected[k], atol=2e-6), (k, term[k], expected[k])
    assert torch.allclose(rew, sum(term.values()), atol=1e-6)
    go2.reset()
    go2.episode_length.fill_(999)
    _, rew, done, info = go2.step(actions)
    assert done.all() and torch.allclose(info["episode"]["return"], rew)
    assert torch.allclose(rew, sum(info["episode"][f"reward_{t}"] for t in GO2_TERMS), atol=1e-7)


def test_go2_bad_actions_raise_and_step_has_no_host_sync(go2):
    go2.reset()
    for bad in (torch.zeros(G, 4), torch.zeros(G, 12, dtype=torch.float64), torch.full((G, 12), float("nan"))):
        with pytest.raises(ValueError):
            go2.step(bad)
    g = torch.Generator().manual_seed(0)
    go2.check_actions = False
    try:
        with SyncSpy() as spy:
            for _ in range(40):  # wild actions: robots fall and reset inside the spied steps
                _, _, done, info = go2.step(torch.randn(G, 12, generator=g) * 3)
        assert spy.calls == []
    finally:
        go2.check_actions = True
    assert info["episode"]["length"].min() < 40  # someone fell and restarted


def test_go2_describe_lists_every_observation():
    meta = go2_module.describe(Go2Config())
    assert [o["index"] for o in meta["observation"]] == list(range(45)) and meta["control_rate_hz"] == 50
    assert meta["observation"][6]["name"] == "command_forward_m_s" and meta["observation"][6]["scale"] == 2.0
    assert meta["action"]["size"] == 12 and meta["action"]["joints"][0] == "FR_hip_joint"
    assert meta["action"]["range"] == [-100.0, 100.0]


def test_go2_settings_are_checked_before_genesis():
    for flags, message in ((["--command-resample-s", "0.005"], r"--command-resample-s must be 1 to 2\^31 steps"),
                           (["--joint-names", *go2_module.JOINTS[:11], "FR_hip_joint"], "name each joint once"),
                           (["--default-joint-angles", "0", "1"], "--default-joint-angles takes 12 values"),
                           (["--joint-names", *go2_module.JOINTS[:11], "tail"], "--joint-names must be one of")):
        with pytest.raises(config.BadInput, match=message):
            config.train_settings(["--task", "go2", "--device", "cpu", *flags], train.TrainConfig, "",
                                  say=lambda s: None)


# ---------------------------------------------------------------- through train.py, eval.py and export.py
@pytest.fixture(scope="module")
def go2_run(tmp_path_factory):
    """The same loop on 8 Go2 robots, with the example's network (512-256-128 ELU): 2 iterations."""
    log_dir = str(tmp_path_factory.mktemp("runs"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--task", "go2", *TINY, "--max-iterations", "2", "--save-interval", "1", "--hidden", "512", "256",
                    "128", "--activation", "elu", "--log-dir", log_dir, "--run-name", "go2"])
    return os.path.join(log_dir, "go2"), out.getvalue()


def test_train_runs_the_go2_task_through_the_same_loop(go2_run, capsys):
    run_dir, out = go2_run
    ckpt = config.load_checkpoint(os.path.join(run_dir, "ckpt_0002.pt"))
    assert ckpt.settings["task"] == "go2" and ckpt.task_cfg == Go2Config() and ckpt.state["iteration"] == 2
    assert ckpt.state["policy"]["actor.0.weight"].shape == (512, 45) and ckpt.state["policy"]["std"].shape == (12,)
    assert "one network for every robot: actor 189,324 + critic 187,905 = 377,229 weights + 12 action std" in out
    assert "1 worker(s) x 8 robots x 8 steps = 64 samples per iteration" in out
    progress = [line for line in out.splitlines() if line.startswith("iter ")]
    assert len(progress) == 2 and all("falls/robot-min" in line or "no episode ended" in line for line in progress)
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["task_config"]["kp"] == 20.0
    with pytest.raises(SystemExit) as e:  # a checkpoint resumes only as its own task
        train.main(["--task", "hover", "--resume", os.path.join(run_dir, "ckpt_0002.pt"), "--max-iterations", "3"])
    assert e.value.code == 2 and "is a checkpoint of the go2 task, not of hover" in capsys.readouterr().err


def test_a_resumed_go2_run_repeats_the_uninterrupted_one_bit_for_bit(go2_run, tmp_path):
    """Resumed from its first iteration's checkpoint, the run repeats its second iteration: the robots' contacts go
    on where they were (both runs save, and write their envs back, at the same iterations)."""
    run_dir, _ = go2_run
    state = torch.load(os.path.join(run_dir, "ckpt_0001.pt"), weights_only=True)
    state["config"].update(log_dir=str(tmp_path), run_name="resumed")
    os.makedirs(tmp_path / "resumed")
    torch.save(state, tmp_path / "resumed" / "ckpt_0001.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--resume", str(tmp_path / "resumed" / "ckpt_0001.pt"), "--max-iterations", "2"])
    assert_same_run(run_dir, tmp_path / "resumed", 2, 2)


def test_eval_reports_the_walking_figures_of_a_go2_checkpoint(go2_run, go2, capsys):
    """eval.py's means and falls equal those of the same flight recorded here from Genesis's own state (the
    training policy's noisy actions, which make robots fall)."""
    run_dir, _ = go2_run
    ckpt = config.load_checkpoint(os.path.join(run_dir, "ckpt_0002.pt"))
    policy = config.build_policy(ckpt.settings, 45, 12)
    policy.load_state_dict(ckpt.state["policy"])
    steps, forward, error, height, falls = 200, 0.0, 0.0, 0.0, 0
    evaluation.reseed(go2, 5)
    obs = go2.reset()
    with torch.no_grad():
        for _ in range(steps):
            obs, _, done, info = go2.step(policy.act(obs).actions)
            R_T = rotation_matrix(go2.robot.get_quat()).transpose(1, 2)
            vel_b = (R_T @ go2.robot.get_vel()[:, :, None])[..., 0]  # (zero where a robot was just reset)
            forward += vel_b[:, 0].sum().item()
            error += (vel_b[:, 0] - go2.commands[:, 0]).sum().item()
            height += go2.robot.get_pos()[:, 2].sum().item()
            falls += int((info["episode"]["falls"] * done).sum())
    evaluation.reseed(go2, 5)
    _, flown, means, _ = evaluation.fly(policy, go2, steps, noise=True)
    assert falls > 0 and evaluation.counted(flown, go2)["falls"] == falls  # the barely trained policy falls
    assert means["mean_forward_velocity"] == pytest.approx(forward / (steps * G), abs=1e-5)
    assert means["mean_forward_velocity_error"] == pytest.approx(error / (steps * G), abs=1e-5)
    assert means["mean_base_height"] == pytest.approx(height / (steps * G), abs=1e-5)
    report = evaluation.main([os.path.join(run_dir, "ckpt_0002.pt"), "--robots", "8", "--seconds", "1"])
    assert report["task"] == "go2" and report["robots"] == 8 and report["robot_minutes"] == pytest.approx(8 / 60)
    assert os.path.isfile(os.path.join(run_dir, "ckpt_0002_flight.png"))
    with pytest.raises(SystemExit) as e:
        evaluation.main([os.path.join(run_dir, "ckpt_0002.pt"), "--perturbations"])
    assert e.value.code == 2 and "the go2 task names no perturbations" in capsys.readouterr().err


def test_export_of_the_go2_policy_takes_its_sizes_and_activation_from_the_checkpoint(go2_run, tmp_path):
    """The Go2 policy (45 obs, 512-256-128 ELU, 12 actions in [-100, 100]): the torch program and the C match the
    policy to README's tolerances, scaled to the actions' size; policy.json describes the Go2's observations."""
    run_dir, _ = go2_run
    export.main([os.path.join(run_dir, "ckpt_0002.pt"), "--out", str(tmp_path), "--formats", "torch", "c"])
    ckpt = config.load_checkpoint(os.path.join(run_dir, "ckpt_0002.pt"))
    policy = config.build_policy(ckpt.settings, 45, 12)
    policy.load_state_dict(ckpt.state["policy"])
    obs = torch.randn(2000, 45, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        expected = policy.act_deterministic(obs).clamp(-100, 100)
    scale = max(1.0, float(expected.abs().max()))
    program = torch.export.load(str(tmp_path / "policy.pt2")).module()
    assert (program(obs) - expected).abs().max() <= 1e-6 * scale
    meta = json.loads((tmp_path / "policy.json").read_text())
    assert meta["task"] == "go2" and meta["observation_size"] == 45 and len(meta["observation"]) == 45
    assert meta["network"] == {"hidden": [512, 256, 128], "activation": "elu"} and meta["control_rate_hz"] == 50
    assert "microcontroller" not in meta and meta["c_footprint"]["expm1f_calls"] == 512 + 256 + 128
    source = (tmp_path / "policy.c").read_text()
    assert "clipped to [-100.0f, 100.0f]" in source and "tanhf" not in source
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine")
    (tmp_path / "batch.c").write_text('#include "policy.h"\nvoid act_batch(const float *obs, float *act, int n) {\n'
                                      '    for (int k = 0; k < n; k++) policy_act(obs + 45 * k, act + 12 * k);\n}\n')
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{tmp_path}", "-o",
                    str(tmp_path / "libgo2.so"), str(tmp_path / "policy.c"), str(tmp_path / "batch.c"), "-lm"],
                   check=True)
    x = np.ascontiguousarray(obs.numpy())
    y = np.empty((len(x), 12), dtype=np.float32)
    ctypes.CDLL(str(tmp_path / "libgo2.so")).act_batch(x.ctypes.data_as(ctypes.c_void_p),
                                                       y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(len(x)))
    assert np.abs(y - expected.numpy()).max() <= 1e-5 * scale
