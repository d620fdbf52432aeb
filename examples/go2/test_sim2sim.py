"""Tests of the Go2 off Genesis: the MuJoCo model standing under the task's PD law, the joint-order map between the
policy and the SDK's motors, the state machine's transitions, sim2sim.py refusing a contract it cannot fly. One
MuJoCo model for the file; no checkpoint, no Genesis (the file runs in seconds)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from examples.go2 import sim2sim
from examples.go2.go2_env import SDK_MOTORS, Go2Config, describe
from examples.go2.mujoco_go2 import MujocoGo2, build_model
from examples.go2.sim2sim import LYING_HEIGHT, LYING_LEG, Controller
from examples.go2.state_machine import Mode, StateMachine, tilt_deg

HERE = os.path.dirname(os.path.abspath(__file__))
CONTRACT = {"task": "go2", **describe(Go2Config())}
DT = 1.0 / CONTRACT["control_rate_hz"]
SUBSTEPS = round(DT / CONTRACT["trained_in"]["physics_dt_s"])
DEFAULT = np.array(CONTRACT["action"]["default_angle"])  # the default config: policy order is SDK order


@pytest.fixture(scope="module")
def model():
    sim = CONTRACT["trained_in"]
    return build_model(SDK_MOTORS, sim["physics_dt_s"], sim["joint_armature"], sim["friction"])


def go2(model):
    return MujocoGo2(model, CONTRACT["action"]["torque_limit"])


def test_the_model_is_the_urdf_robot_on_a_floor(model):
    assert model.nu == 12 and model.nq == 7 + 12 and model.opt.timestep == 0.01
    assert model.body_subtreemass[1] == pytest.approx(15.019, abs=1e-6)  # the URDF's masses, as Genesis has them
    assert np.all(model.dof_armature[6:] == 0.1) and np.all(model.dof_armature[:6] == 0.0)  # motors only
    feet = [g for g in range(model.ngeom) if model.geom_type[g] == 2 and model.geom_size[g, 0] == 0.022]
    assert len(feet) == 4  # a sphere at each foot, the URDF's collision geometry


def test_the_go2_stands_in_the_default_pose_under_pd(model):
    """Dropped from 0.42 m (go2_env's start) with the targets at the default pose and the task's gains, it bounces
    for 1.5 s, then stays at 0.27-0.29 m and level for 2 s. Genesis, the same drop with zero actions (go2_env,
    2026-12-07), every 0.4 s: 0.417, 0.249, 0.281, 0.280, 0.277, 0.288, 0.275, 0.275, 0.276 m; MuJoCo here:
    0.417, 0.250, 0.279, 0.281, 0.276, 0.288, 0.276, 0.274, 0.277 m; both 0.2659 m at 9.6 s, every joint within
    0.001 rad of the other's."""
    robot = go2(model)
    robot.place(0.42, DEFAULT)
    kp, kd = CONTRACT["action"]["kp"], CONTRACT["action"]["kd"]
    heights, tilts = [], []
    for _ in range(round(3.5 / DT)):
        robot.step(kp, kd, DEFAULT, SUBSTEPS)
        heights.append(robot.base_height())
        tilts.append(max(map(abs, tilt_deg(robot.gravity()))))
    settled = np.array(heights[round(1.5 / DT):])  # the last 2 s
    assert 0.265 < settled.min() and settled.max() < 0.295, (settled.min(), settled.max())
    assert max(tilts) < CONTRACT["safety"]["fall_angle_deg"] and max(tilts[round(1.5 / DT):]) < 3.0  # no fall


def test_stand_up_lifts_the_lying_go2_to_the_default_pose_level(model):
    robot = go2(model)
    robot.place(LYING_HEIGHT, np.tile(LYING_LEG, 4))
    sm = StateMachine(DEFAULT, CONTRACT["action"]["kp"], CONTRACT["action"]["kd"],
                      CONTRACT["safety"]["fall_angle_deg"])
    for k in range(round(0.5 / DT)):  # ZERO_TORQUE: it settles on its belly
        robot.step(*sm.update(k * DT, robot.motor_angles(), robot.gravity()), SUBSTEPS)
    assert robot.base_height() < 0.1 and sm.mode is Mode.ZERO_TORQUE
    start = round(0.5 / DT)
    sm.stand_up(start * DT, robot.motor_angles())
    k = start
    while sm.mode is Mode.STAND_UP:
        sm.command(k * DT)
        robot.step(*sm.update(k * DT, robot.motor_angles(), robot.gravity(), DEFAULT), SUBSTEPS)
        k += 1
    assert sm.mode is Mode.POLICY and (k - 1 - start) * DT == pytest.approx(sm.stand_up_s + sm.settle_s)
    assert robot.base_height() > 0.29 and max(map(abs, tilt_deg(robot.gravity()))) < 3.0
    assert np.abs(robot.motor_angles() - DEFAULT).max() < 0.15


def test_the_joint_order_map_round_trips():
    # A policy trained in another joint order: legs RL, FL, RR, FR.
    order = [3, 1, 2, 0]
    joints = tuple(SDK_MOTORS[3 * leg + j] for leg in order for j in range(3))
    angles = tuple(Go2Config().default_joint_angles[3 * leg + j] for leg in order for j in range(3))
    contract = describe(Go2Config(joint_names=joints, default_joint_angles=angles))
    assert contract["action"]["sdk_motor_order"][:3] == ["FR_hip_joint", "FR_thigh_joint", "FR_calf_joint"]
    assert contract["action"]["sdk_motor_order"][9:] == ["RL_hip_joint", "RL_thigh_joint", "RL_calf_joint"]
    control = Controller(contract)
    x = np.random.default_rng(0).normal(size=(5, 12))
    assert np.array_equal(control.to_sdk(control.to_policy(x)), x)
    assert np.array_equal(control.to_policy(control.to_sdk(x)), x)
    sdk = control.to_sdk(np.arange(12.0)[None])[0]  # policy joint i's value lands on its named motor
    assert all(contract["action"]["sdk_motor_order"][int(k)] == joints[i] for i, k in zip(range(12), np.argsort(
        sdk)))
    assert np.allclose(control.targets(np.zeros((1, 12)))[0], Go2Config().default_joint_angles)  # SDK order
    with pytest.raises(Exception, match="sdk_motor_index"):
        Controller({**contract, "action": {**contract["action"], "sdk_motor_index": list(range(12))}})


def test_the_sdk_motor_order_reaches_the_mujoco_joints(model):
    robot = go2(model)
    angles = np.linspace(-0.5, 0.5, 12)  # motor k's angle
    robot.place(0.5, angles)
    for k, name in enumerate(SDK_MOTORS):
        assert robot.data.joint(name).qpos[0] == pytest.approx(angles[k])


def test_the_state_machine_goes_zero_torque_stand_policy_then_damping():
    sm = StateMachine(DEFAULT, 20.0, 0.5, 10.0, stand_up_s=1.0, settle_s=0.5, command_timeout_s=0.3)
    level, lying = np.array([0.0, 0.0, -1.0]), np.tile(LYING_LEG, 4)
    assert sm.update(0.0, lying, level) == (0.0, 0.0, None) and sm.mode is Mode.ZERO_TORQUE
    sm.stand_up(1.0, lying)
    kp, kd, target = sm.update(1.5, lying, level)  # halfway through the ramp
    assert sm.mode is Mode.STAND_UP and (kp, kd) == (sm.stand_kp, sm.stand_kd)
    assert np.allclose(target, (lying + DEFAULT) / 2)
    assert np.allclose(sm.update(2.2, lying, level)[2], DEFAULT)  # held while it settles
    policy_target = DEFAULT + 0.1
    sm.command(2.4)
    kp, kd, target = sm.update(2.5, DEFAULT, level, policy_target)
    assert sm.mode is Mode.POLICY and (kp, kd) == (20.0, 0.5) and target is policy_target
    sm.command(2.7)
    sm.update(2.9, DEFAULT, level, policy_target)
    assert sm.mode is Mode.POLICY  # 0.2 s since the last command: fresh enough
    assert sm.update(3.1, DEFAULT, level, policy_target) == (0.0, 3.0, None)  # 0.4 s: stale
    assert sm.mode is Mode.DAMPING and sm.reason.startswith("stale command")
    sm.command(3.2)
    sm.update(3.2, DEFAULT, level, policy_target)
    assert sm.mode is Mode.DAMPING  # final: a new command does not restart the policy


@pytest.mark.parametrize("roll_deg, pitch_deg, falls", [(11, 0, True), (0, -11, True), (9, 9, False)])
def test_a_fall_sends_the_policy_to_damping(roll_deg, pitch_deg, falls):
    sm = StateMachine(DEFAULT, 20.0, 0.5, 10.0, stand_up_s=0.0, settle_s=0.0)
    sm.stand_up(0.0, DEFAULT)
    sm.command(0.0)
    sm.update(0.0, DEFAULT, np.array([0.0, 0.0, -1.0]))
    assert sm.mode is Mode.POLICY
    r, p = math.radians(roll_deg), math.radians(pitch_deg)
    gravity = np.array([math.sin(p), -math.cos(p) * math.sin(r), -math.cos(p) * math.cos(r)])  # R^T (0, 0, -1)
    assert tilt_deg(gravity) == pytest.approx((roll_deg, pitch_deg))
    sm.command(0.02)
    sm.update(0.02, DEFAULT, gravity, DEFAULT)
    assert (sm.mode is Mode.DAMPING) == falls and (sm.reason.startswith("fall") or not falls)


def test_a_stop_sends_the_policy_to_damping():
    sm = StateMachine(DEFAULT, 20.0, 0.5, 10.0, stand_up_s=0.0, settle_s=0.0)
    sm.stop(0.0)
    assert sm.mode is Mode.ZERO_TORQUE  # nothing to stop yet
    sm.stand_up(0.0, DEFAULT)
    sm.command(0.0)
    sm.update(0.0, DEFAULT, np.array([0.0, 0.0, -1.0]))
    sm.stop(0.01)
    assert sm.mode is Mode.DAMPING and sm.reason == "stop"


def without(contract, *path):
    """A deep copy of contract with the field at path (keys, indices) removed."""
    contract = json.loads(json.dumps(contract))
    parent = contract
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return contract


def write_export(folder, contract):
    (folder / "policy.json").write_text(json.dumps(contract))
    (folder / "policy.pt2").write_bytes(b"")  # never read: the contract is refused first


def test_sim2sim_refuses_a_contract_with_a_missing_field(tmp_path):
    """As a user meets it: its own process, one line on stderr, exit status 2."""
    write_export(tmp_path, without(CONTRACT, "action", "kp"))
    run = subprocess.run([sys.executable, os.path.join(HERE, "sim2sim.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr == f"sim2sim.py: error: {tmp_path}/policy.json lacks the field 'action.kp'\n"


def refused(argv, capsys):
    """sim2sim.main(argv) in this process: its exit status and its stderr."""
    with pytest.raises(SystemExit) as exit:
        sim2sim.main(argv)
    return exit.value.code, capsys.readouterr().err


@pytest.mark.parametrize("path, message", [(("safety",), "lacks the field 'safety'"),
                                           (("trained_in", "physics_dt_s"), "lacks the field 'trained_in.physics"),
                                           (("observation", 0, "scale"), "observation 0 lacks the field 'scale'")])
def test_sim2sim_names_the_missing_field(tmp_path, capsys, path, message):
    write_export(tmp_path, without(CONTRACT, *path))
    status, err = refused([str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and message in err


def test_sim2sim_refuses_another_tasks_contract_and_a_file_that_is_no_checkpoint(tmp_path, capsys):
    write_export(tmp_path, {**CONTRACT, "task": "hover"})
    status, err = refused([str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "the hover task's contract" in err
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    status, err = refused([str(tmp_path / "ckpt.pt")], capsys)
    assert status == 2 and err.count("\n") == 1 and "is not a checkpoint of this project" in err
    assert not (tmp_path / "ckpt_export").exists()  # refused before the export
