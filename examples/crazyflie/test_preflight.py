"""Tests of preflight.py and what it flies: the MuJoCo drone (mujoco_drone.py) and each gap in its loop, the C
controller (firmware/) against the torch policy, its safety envelope and self-test, the gate, and bad input."""
import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import examples.crazyflie.crazyflie_env as cf
from examples.crazyflie import preflight
from examples.crazyflie.mujoco_drone import START, TICK_S, Drones, read_urdf

HERE = os.path.dirname(os.path.abspath(__file__))
FRAME = read_urdf()
HOVER_FORCE = FRAME.kf * cf.CrazyflieConfig().hover_rpm ** 2 / FRAME.max_thrust  # a normalized force
CALM = {**cf.UNPERTURBED, "push_interval_s": (1.0, 2.0)}  # no gap at all


@pytest.fixture(scope="module")
def built(crazyflie_run, tmp_path_factory):
    """The 2-iteration crazyflie run's checkpoint, exported and compiled into the controller in the loop."""
    path = str(crazyflie_run / "ckpt_0002.pt")
    ckpt = config.load_checkpoint(path)
    out = str(tmp_path_factory.mktemp("preflight"))
    controller, model, meta = preflight.build(ckpt, path, out, preflight.compiler())
    return path, out, controller, model, meta


def hover(drones, ticks, force=HOVER_FORCE):
    for _ in range(ticks):
        drones.step(np.full((drones.K, 4), force))


def heights(drones):
    return drones.data.qpos.reshape(drones.K, 7)[:, 2].copy()


def test_the_urdf_gives_the_drone_genesis_flies():
    assert FRAME.mass == 0.027 and FRAME.inertia == (1.4e-5, 1.4e-5, 2.17e-5) and FRAME.thrust2weight == 2.25
    assert FRAME.propellers == ((0.028, -0.028), (-0.028, -0.028), (-0.028, 0.028), (0.028, 0.028))
    # the hover RPM of env.py holds the URDF's weight: 4 kf rpm^2 = m g, within 0.2 % (9.8 m/s^2 there, 9.81 here)
    assert 4 * FRAME.kf * cf.CrazyflieConfig().hover_rpm ** 2 == pytest.approx(FRAME.mass * 9.81, rel=2e-3)


def test_the_mujoco_drone_hovers_at_hover_rpm():
    """At the hover RPM it neither climbs nor sinks more than 1 cm in 1 s, and stays level where it is."""
    drones = Drones(4, CALM, seed=0)
    drones.rpm[:] = math.sqrt(HOVER_FORCE * FRAME.max_thrust / FRAME.kf)  # spun up already
    hover(drones, 1000)
    qpos = drones.data.qpos.reshape(4, 7)
    assert np.abs(qpos[:, 2] - START[2]).max() < 0.01
    assert np.abs(qpos[:, :2]).max() < 1e-6 and (qpos[:, 3] > 1 - 1e-9).all()


def test_each_gap_has_its_effect_in_the_mujoco_loop():
    spun = math.sqrt(HOVER_FORCE * FRAME.max_thrust / FRAME.kf)
    # the motors' lag: from rest toward the hover RPM, 1 - exp(-t / tau) of the way at t
    lagging = Drones(2, {**CALM, "motor_lag_s": (0.05, 0.05)}, seed=0)
    hover(lagging, 50)
    assert np.allclose(lagging.rpm, spun * (1 - math.exp(-50 * TICK_S / 0.05)), rtol=1e-3)
    # the delay: a command reaches the motors 2 control steps (20 ticks) late
    late = Drones(2, {**CALM, "action_delay": (2, 2)}, seed=0)
    hover(late, 20)
    assert (late.rpm == 0).all()
    hover(late, 1)
    assert np.allclose(late.rpm, spun)
    # mass and thrust: at the nominal drone's hover command the heavier one sinks, the stronger one climbs
    for gap, sign in (({"mass_scale": (1.2, 1.2)}, -1), ({"thrust_scale": (1.15, 1.15)}, 1)):
        drones = Drones(2, {**CALM, **gap}, seed=0)
        drones.rpm[:] = spun
        hover(drones, 300)
        assert (sign * (heights(drones) - START[2]) > 0.05).all(), gap
    # sensor noise: the asked sigmas, in the firmware's view only
    noisy = Drones(1024, {**CALM, "obs_noise": (0.01, 0.05, 1.0, 0.1)}, seed=0)
    pos, vel, quat, gyro = noisy.sense()
    assert np.std(pos - START) == pytest.approx(0.01, rel=0.05)
    assert np.std(vel) == pytest.approx(0.05, rel=0.05) and np.std(gyro) == pytest.approx(0.1, rel=0.05)
    tilt = np.degrees(2 * np.arccos(np.clip(quat[:, 0], -1, 1)))  # the rotation's angle: 3 sigmas' norm
    assert np.sqrt(np.mean(tilt ** 2) / 3) == pytest.approx(1.0, rel=0.05)
    assert (heights(noisy) == START[2]).all()
    # pushes: a force of 5 % of the weight per axis moves a hovering drone off its spot
    pushed = Drones(64, {**CALM, **cf.PUSH}, seed=0)
    pushed.rpm[:] = spun
    hover(pushed, 500)
    assert np.std(pushed.wrench[:, :3]) == pytest.approx(0.05 * FRAME.mass * 9.81, rel=0.2)
    assert np.median(np.linalg.norm(pushed.data.qpos.reshape(64, 7)[:, :3] - START, axis=1)) > 0.01


def test_the_c_controller_flies_what_the_torch_policy_flies(built):
    _, _, controller, model, _ = built
    obs = torch.rand(1024, 17, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        assert np.abs(controller.act(obs.numpy()) - model(obs).numpy()).max() <= 1e-5


def tick(controller, slots, t, setpoint_ms):
    """One tick of one drone at rest at the start, its target there: (forces [4], flying)."""
    one = lambda v: np.array([v], dtype=float)  # noqa: E731
    forces, flying = controller.tick(slots, t, one(START), np.array([setpoint_ms]), one(START), one((0, 0, 0)),
                                     one((1, 0, 0, 0)), one((0, 0, 0)))
    return forces[0], flying[0]


def test_the_safety_envelope(built):
    """Never armed nor tested: off. Armed: a warm-up (controller_policy.c: 1000 ms) that ramps up to the hover thrust
    over 300 ms and holds it, then the policy. No setpoint for 200 ms: off, and it stays off (disarmed) when setpoints
    come again."""
    controller = built[2]
    slots = controller.slots(1)
    assert tick(controller, slots, 1, 1)[0].max() == 0.0  # a controller never started
    assert controller.start(slots, np.ones(1, dtype=bool)).all()
    seen = [tick(controller, slots, t, t) for t in range(1, 1101)]  # seen[k]: tick k + 1, elapsed k
    assert seen[150][0] == pytest.approx(np.full(4, HOVER_FORCE * 150 / 300), rel=1e-5)
    assert all(forces == pytest.approx(np.full(4, HOVER_FORCE), rel=1e-5) and not flying
               for forces, flying in seen[300:1000])
    assert seen[1000][1] and not (seen[1099][0] == seen[999][0]).all()  # flying: the policy sets the motors
    for t in range(1101, 1301):
        forces, flying = tick(controller, slots, t, 1100)
        assert forces.max() > 0 and flying
    forces, flying = tick(controller, slots, 1301, 1100)  # 201 ms without a setpoint
    assert forces.max() == 0.0 and not flying
    assert tick(controller, slots, 1302, 1302)[0].max() == 0.0  # a fresh setpoint does not re-arm it


def test_the_self_test_catches_a_corrupted_weight_table(built, tmp_path):
    path, out, *_ = built
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    source = (corrupt / "policy.c").read_text()
    first = re.search(r"W0\[\d+\] = \{([^,]+),", source)
    (corrupt / "policy.c").write_text(source[:first.start(1)] + "0.5f" + source[first.end(1):])
    subprocess.run([preflight.compiler(), "-O2", "-shared", "-fPIC", "-I", str(corrupt), "-I", preflight.FIRMWARE,
                    os.path.join(preflight.FIRMWARE, "sil.c"), str(corrupt / "policy.c"), "-lm", "-o",
                    str(corrupt / "sil.so")], check=True)
    controller = preflight.Controller(str(corrupt / "sil.so"))
    slots = controller.slots(1)
    assert not controller.start(slots, np.ones(1, dtype=bool)).any()
    assert all(tick(controller, slots, t, t)[0].max() == 0.0 for t in range(1, 1200))  # it never flies


def test_a_mujoco_flight_counts_as_genesis_does(built):
    """The 2-iteration policy on 8 drones for 2 s: crashes end episodes and the drones start again."""
    path, _, controller, _, _ = built
    ckpt, task, cfg = preflight.drone_checkpoint(path)
    gate, grid = preflight.conditions(task, cfg)
    assert len(grid) == 48 and gate["realistic"]["thrust_to_weight"] == 2.25
    flown = preflight.fly_mujoco(controller, cfg, gate["realistic"], 8, 2.0, seed=0)
    assert flown["crashes"] > 0 and flown["distance_m"] > 0 and math.isfinite(flown["targets"])


def test_the_gate_fails_what_it_should():
    rows = {"Genesis, torch policy, nominal": {"targets": 100.0, "crashes": 0.0},
            "MuJoCo, C controller, nominal": {"targets": 91.0, "crashes": 0.0},
            "MuJoCo, C controller, realistic": {"targets": 70.0, "crashes": 0.01}}
    assert preflight.gate_verdict(rows) == []
    rows["MuJoCo, C controller, nominal"]["targets"] = 89.0
    rows["MuJoCo, C controller, realistic"]["crashes"] = 0.02
    failed = preflight.gate_verdict(rows)
    assert len(failed) == 2 and "MuJoCo nominal: 89.0 targets" in failed[0] and "realistic: 0.020 crashes" in failed[1]


def run_preflight(*args, **env):
    return subprocess.run([sys.executable, os.path.join(HERE, "preflight.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_bad_input_gets_one_line_and_status_2(crazyflie_run, tmp_path):
    path = str(crazyflie_run / "ckpt_0002.pt")
    state = torch.load(path, weights_only=True)  # the same run, as if of the Go2 task
    go2 = config.task_module("go2")
    state["config"] = {**state["config"], "task": "go2"}
    state["task_config"] = dataclasses.asdict(go2.Config())
    state["policy"] = config.build_policy(state["config"], 45, 12).state_dict()
    torch.save(state, tmp_path / "go2.pt")
    for args, env, line in (((str(tmp_path / "go2.pt"),), {}, "flies drone checkpoints"),
                            ((path,), {"CC": "no-such-compiler"}, "no C compiler"),
                            ((path, "--drones", "0"), {}, "--drones must be within 1 and 4096")):
        result = run_preflight(*args, **env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and line in result.stderr, result.stderr


def test_preflight_ends_with_a_verdict(crazyflie_run):
    result = run_preflight(str(crazyflie_run / "ckpt_0002.pt"), "--drones", "4", "--seconds", "0.5", "--no-grid")
    assert result.returncode == 0, result.stderr
    assert "MuJoCo, C controller, realistic" in result.stdout and result.stdout.splitlines()[-1].startswith("FAIL")
