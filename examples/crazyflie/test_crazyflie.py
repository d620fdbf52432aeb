"""Tests of the Crazyflie task: each gap to a real drone has its effect, the defaults are the recipe that trains
against them, and eval.py flies any drone checkpoint through them. One scene of N drones for the file, flown
unperturbed unless a test switches perturbations on (and off again) as eval.py does, through perturb_with()."""
import contextlib
import dataclasses
import io
import json
import math
import os

import pytest
import torch

import config
import env as hover
import eval as evaluation
import examples.crazyflie.crazyflie_env as cf
import train
from examples.crazyflie.crazyflie_env import SETTINGS, UNPERTURBED, CrazyflieConfig
from tests.checks import assert_same_run

N = 8
DT = CrazyflieConfig().dt
NOMINAL = {k: getattr(CrazyflieConfig(**UNPERTURBED), k) for k in SETTINGS}  # every gap off
HOVER = CrazyflieConfig(**dataclasses.asdict(hover.HoverConfig()), **UNPERTURBED)  # the hover task's drone
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--device", "cpu", "--workers", "1", "--num-envs", "8", "--num-steps", "8", "--num-minibatches", "2",
        "--num-epochs", "2"]


@pytest.fixture(scope="module")
def env():
    return cf.CrazyflieEnv(N, device="cpu", seed=0, cfg=HOVER)


@contextlib.contextmanager
def perturbed(env, **change):
    """The env flown with these perturbation settings (every other gap off), then unperturbed again."""
    env.perturb_with({**NOMINAL, **change})
    try:
        yield env.reset()
    finally:
        env.perturb_with(NOMINAL)
        env.reset()


def full(value):
    return torch.full((N, 4), float(value))


def run(env, actions, steps):
    for _ in range(steps):
        env.step(actions)


def test_unperturbed_it_flies_the_same_bits_as_the_hover_task(env, hover_env):
    """With every gap off, nothing of the perturbations is built or drawn: the same seeds and actions give the same
    observations and rewards as HoverEnv's, bit for bit."""
    def rollout(e):
        e.generator.manual_seed(3)
        g = torch.Generator().manual_seed(4)
        out = [e.reset()]
        for _ in range(30):
            out += e.step(torch.rand(N, 4, generator=g) * 2 - 1)[:2]
        return out
    assert all(torch.equal(a, b) for a, b in zip(rollout(env), rollout(hover_env)))
    assert env.perturb is None and not cf.perturbed(CrazyflieConfig(**UNPERTURBED))
    assert all(cf.perturbed(CrazyflieConfig(**c)) for name, c in cf.PERTURBATIONS.items() if name != "none")


def test_the_defaults_are_the_recipe_and_the_hover_task_keeps_the_examples():
    cfg, hover_cfg = CrazyflieConfig(), hover.HoverConfig()
    assert (cfg.motor_lag_s, cfg.action_delay, cfg.mass_scale, cfg.thrust_scale) == ((0.015, 0.08), (0, 1),
                                                                                       (0.9, 1.2), (0.85, 1.15))
    assert cfg.thrust_to_weight == 0 and cf.CAP == dict(thrust_to_weight=2.25)  # Genesis's drone; cf2x.urdf's
    assert (cfg.obs_noise, cfg.push_force, cfg.nominal_share, cfg.perturb_ramp) == (cf.NOISE, 0.05, 0.1, (50, 150))
    assert (cfg.progress_per_metre, cfg.reward_target) == (True, 20.0)  # its reward, paid per metre
    assert (hover_cfg.progress_per_metre, hover_cfg.reward_target) == (False, 10.0)  # the example's
    assert {f.name for f in dataclasses.fields(hover_cfg)} < {f.name for f in dataclasses.fields(cfg)}
    assert cf.TRAIN == hover.TRAIN
    faster = ("hidden", "num_epochs", "num_minibatches", "lr_max", "crash_ramp", "progress_speed_cap", "max_iterations")
    assert cf.CPU_PRESET == {**{k: v for k, v in hover.CPU_PRESET.items() if k not in faster},
                             "progress_speed_cap": 2.5, "max_iterations": 250}  # the drone's, before it went faster
    for bad, message in ((dict(motor_lag_s=(0.1, 0.05)), "--motor-lag-s must be a range LOW HIGH"),
                         (dict(mass_scale=(0.0, 1.0)), "--mass-scale must be > 0"),
                         (dict(obs_noise=(0.01,)), "--obs-noise takes 4 values"),
                         (dict(push_force=-1.0), "--push-force must be >= 0"),
                         (dict(nominal_share=1.0), "--nominal-share must be < 1"),
                         (dict(thrust_to_weight=0.9), "--thrust-to-weight must be above 1")):
        with pytest.raises(config.BadInput, match=message):
            config.check(CrazyflieConfig(**bad))


def test_a_flag_given_wins_over_the_tasks_defaults(tmp_path):
    """--nominal-share 0 trains with 0, though the task's default is 0.1: what the user types is never overruled."""
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--task", "crazyflie", *TINY, "--nominal-share", "0", "--max-iterations", "1", "--log-dir",
                    str(tmp_path), "--run-name", "share"])
    task_config = json.loads((tmp_path / "share" / "config.json").read_text())["task_config"]
    assert task_config["nominal_share"] == 0
    assert task_config["motor_lag_s"] == list(CrazyflieConfig().motor_lag_s)  # the other defaults stay


def test_nominal_share_of_episodes_flies_the_nominal_drone():
    """That share of the drones starting an episode draw no lag, delay, mass or thrust error (the noise and pushes
    reach them too); the others draw from the ranges, as without it, and only they."""
    cfg, n = CrazyflieConfig(), 20000
    p = cf.Perturbations(cfg, n, "cpu", torch.Generator().manual_seed(0), 0.3, torch.ones(17))
    p.reset(torch.ones(n, dtype=torch.bool))
    nominal = ((p.lag == 1) & (p.mass_scale == 1) & (p.rpm_scale == 1))[:, 0] & (p.delay == 0)
    assert abs(nominal.float().mean().item() - cfg.nominal_share) < 0.008  # 4 sigma: sqrt(0.1 * 0.9 / n) = 0.002
    tau = -DT / torch.log1p(-p.lag[~nominal])  # every other drone's lag within the range
    assert cfg.motor_lag_s[0] - 1e-6 <= tau.min() and tau.max() <= cfg.motor_lag_s[1] + 1e-6
    assert p.noise.any() and p.push_sigma.all()


def test_policy_json_says_what_the_policy_was_trained_against():
    assert cf.describe(CrazyflieConfig(**UNPERTURBED))["trained_against"].startswith("none")
    assert cf.describe(CrazyflieConfig())["trained_against"] == {k: getattr(CrazyflieConfig(), k) for k in SETTINGS}
    meta = cf.describe(CrazyflieConfig())
    assert meta["observation"] == hover.describe(hover.HoverConfig())["observation"]
    # Genesis turns propeller i's drag torque on the body about +z times its spin (-1, 1, -1, 1): propeller 0's
    # pushes the body clockwise, the reaction to a propeller that turns counter-clockwise seen from above.
    assert [m["spin"] for m in meta["action"]["motors"]] == ["CCW", "CW", "CCW", "CW"]
    assert meta["microcontroller"]["flash_bytes"] == 1024 * 1024


def test_perturb_with_refuses_what_cannot_change_between_flights(env):
    with pytest.raises(ValueError, match="not reward_target"):
        env.perturb_with({"motor_lag_s": (0.05, 0.05), "reward_target": 1.0})
    assert env.cfg.motor_lag_s == (0.0, 0.0)  # nothing of a refused change is applied


def test_perturb_ramp_grows_the_ranges_from_the_nominal_drone(env):
    """Under perturb_ramp, the episodes of an iteration draw from every range shrunk toward the nominal drone by
    the ramp's progress: nothing before FROM, half of each range halfway, the whole ranges from TO on."""
    assert [hover.ramp(i, (10, 20)) for i in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    wide = {k: getattr(CrazyflieConfig(), k) for k in SETTINGS}
    wide.update(mass_scale=(0.5, 1.5), action_delay=(0, 2), perturb_ramp=(10, 20))
    with perturbed(env, **wide):
        try:
            draws = {}
            for iteration in (5, 15, 25):
                env.set_iteration(iteration)
                env.reset()
                p = env.perturb
                draws[iteration] = p.mass_scale, p.lag, p.delay, p.noise, p.push_sigma
            mass, lag, delay, noise, push = draws[5]
            assert (mass == 1).all() and (lag == 1).all() and (delay == 0).all()  # lag 1: the RPM follows at once
            assert not noise.any() and not push.any()
            mass, lag, delay, noise, push = draws[15]
            assert 0.75 <= mass.min() and mass.max() <= 1.25 and delay.max() <= 1
            half_tau = wide["motor_lag_s"][1] / 2
            assert (lag >= -math.expm1(-DT / half_tau) - 1e-6).all()  # tau at most half of the range's top
            assert torch.allclose(noise, draws[25][3] / 2) and torch.allclose(push, draws[25][4] / 2)
            mass = draws[25][0]
            assert 0.5 <= mass.min() and mass.max() <= 1.5 and (mass - 1).abs().max() > 0.25  # (N drones: some)
        finally:
            env.set_iteration(25)  # whole again
    assert env.perturb is None and env._perturb_strength == 1.0


def test_motor_lag_is_first_order(env):
    """A step of the command from hover to full throttle: the RPM closes 1 - exp(-t / tau) of the gap by t."""
    cfg = env.cfg
    with perturbed(env, motor_lag_s=(0.05, 0.05)):
        hover_rpm, full_rpm = cfg.hover_rpm, cfg.hover_rpm * (1 + cfg.rpm_gain)
        for k in range(1, 11):
            env.step(full(1.0))
            expected = full_rpm - (full_rpm - hover_rpm) * math.exp(-k * DT / 0.05)
            assert torch.allclose(env.perturb.rpm, torch.full((N, 4), expected), rtol=1e-5), k
        lagged = env.base_pos[:, 2].clone()
    run(env, full(1.0), 10)
    assert (env.base_pos[:, 2] > lagged + 0.002).all()  # without the lag, the same 0.1 s climbs higher


def test_the_cap_stops_the_rpm_at_the_motors_full_thrust(env):
    """Full throttle asks 1.8 x the hover RPM (3.24 x the weight); capped at 2.25 x the weight, it gets 1.5 x."""
    cfg = env.cfg
    with perturbed(env, **cf.CAP, motor_lag_s=(0.05, 0.05)):
        run(env, full(1.0), 30)  # the lag toward the cap, not toward the command
        capped = cfg.hover_rpm * 1.5 - cfg.hover_rpm * 0.5 * math.exp(-30 * DT / 0.05)
        assert torch.allclose(env.perturb.rpm, torch.full((N, 4), capped), rtol=1e-5)
        env.step(full(-1.0))  # below the cap, the command as ever
        assert (env.perturb.rpm < cfg.hover_rpm * 1.5).all()


def test_action_delay_shifts_the_applied_action_by_k_steps(env):
    cfg = env.cfg
    with perturbed(env, action_delay=(2, 2)):
        sent = [torch.full((N, 4), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
        applied = [env.perturb.motors(a) for a in sent]  # the RPM of the action 2 steps old (hover before)
        rpm = lambda a: cfg.hover_rpm * (1 + cfg.rpm_gain * a)  # noqa: E731
        assert torch.allclose(applied[0], torch.full((N, 4), rpm(0.0)))
        assert torch.allclose(applied[1], torch.full((N, 4), rpm(0.0)))
        assert all(torch.allclose(applied[k], rpm(sent[k - 2])) for k in range(2, 5))


def test_a_heavier_drone_needs_more_rpm_to_hover(env):
    """20 % heavier: at the nominal hover RPM it sinks; at sqrt(1.2) times it, it holds its height."""
    with perturbed(env, mass_scale=(1.2, 1.2)):
        run(env, torch.zeros(N, 4), 30)
        sank = 1.0 - env.base_pos[:, 2]
        env.reset()
        hover_action = (math.sqrt(1.2) - 1) / env.cfg.rpm_gain
        run(env, torch.full((N, 4), hover_action), 30)
        held = (1.0 - env.base_pos[:, 2]).abs()
    assert (sank > 0.05).all() and (held < 0.005).all()  # 0.3 s: g / 6 falls 7.4 cm


def test_observation_noise_has_the_asked_sigmas(env):
    """Noisy observations of the same states as clean ones: the differences have the asked sigmas (scaled as the
    observation is), and the attitude is turned by about the asked angle per axis."""
    with perturbed(env, obs_noise=(0.01, 0.05, 1.0, 0.1)):
        clean = env._start_obs.expand(N, 17).clone()
        env._observe_target(clean)
        diffs = torch.stack([env.perturb.observe(clean) - clean for _ in range(2000)])  # [2000, N, 17]
        noisy_quats = torch.stack([env.perturb.observe(clean)[:, 3:7] for _ in range(2000)])
    sigma = diffs.flatten(0, 1).std(0)
    assert torch.allclose(sigma[:3], torch.full((3,), 0.01 / 3), rtol=0.05)
    assert torch.allclose(sigma[7:10], torch.full((3,), 0.05 / 3), rtol=0.05)
    assert torch.allclose(sigma[10:13], torch.full((3,), 0.1 / 25), rtol=0.05)
    assert torch.equal(sigma[13:], torch.zeros(4))  # the previous action is known exactly
    turn_deg = 2 * noisy_quats[..., 1:].flatten(0, 1).std(0) * 180 / math.pi  # from the level start: (1, r / 2)
    assert torch.allclose(turn_deg, torch.ones(3), rtol=0.05)
    assert torch.allclose(noisy_quats.norm(dim=-1), torch.ones(1), atol=1e-6)


def test_a_push_moves_the_drone_its_way(env):
    """A strong push (half the weight per axis, no torque) on hovering drones: each drifts along its own force."""
    start = torch.tensor(env.cfg.init_pos)
    with perturbed(env, push_force=0.5, push_interval_s=(1.0, 1.0)):
        run(env, torch.zeros(N, 4), 15)
        force = env.perturb.wrench[:, 0]  # [N, 3] world frame, drawn at the first step and held for 1 s
        moved = env.base_pos - start
        assert (force.norm(dim=1) > 0).all() and (env.perturb.push_left == 100 - 14).all()  # drawn at step 1
    cosine = torch.nn.functional.cosine_similarity(moved, force, dim=1)
    assert (cosine > 0.9).all(), cosine


# ---------------------------------------------------------------- training and eval.py
def test_train_resume_goes_on_with_the_episodes_and_the_curriculum_where_they_were(crazyflie_run, tmp_path,
                                                                                     monkeypatch):
    """Resumed at iteration 3 of a curriculum grown over iterations 2-4 (flags given on resume), the drones fly on
    with the gaps their episodes drew, and the episodes that start draw from half of each range, as the episodes of
    a run that never stopped would."""
    seen, real_rollout = [], train.rollout

    def rollout_spy(policy, env, *args):
        if not seen:
            p = env.perturb
            seen.append((p.mass_scale.clone(), p.strength))
            p.reset(torch.ones(N, dtype=torch.bool))  # every drone starts a new episode here
            seen.append(p.mass_scale.clone())
        return real_rollout(policy, env, *args)

    monkeypatch.setattr(train, "rollout", rollout_spy)
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--resume", str(crazyflie_run / "ckpt_0002.pt"), "--max-iterations", "3", "--mass-scale", "0.5",
                    "1.5", "--perturb-ramp", "2", "4", "--log-dir", str(tmp_path), "--run-name", "ramp"])
    (restored, strength), drawn = seen
    saved = torch.load(crazyflie_run / "ckpt_0002.pt", weights_only=True)["workers"][0]["env"]["perturb"]
    assert torch.equal(restored, saved["mass_scale"]) and strength == 0.5
    shift = (drawn - 1).abs()
    assert 0.1 < shift.max() <= 0.25 + 1e-6, drawn.flatten()


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    """Every gap whole from the first iteration: 2 iterations and a resume for 2 more equal 4 uninterrupted ones,
    the drones' motors, delays and pushes going on where they were."""
    flags = ["--task", "crazyflie", *TINY, "--perturb-ramp", "0", "0", "--log-dir", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(flags + ["--max-iterations", "4", "--save-interval", "2", "--run-name", "four"])
        train.main(flags + ["--max-iterations", "2", "--run-name", "two"])
        train.main(["--resume", str(tmp_path / "two" / "ckpt_0002.pt"), "--max-iterations", "4"])
    state = torch.load(tmp_path / "two" / "ckpt_0002.pt", weights_only=True)
    assert set(state["workers"][0]["env"]["perturb"]) == set(cf.Perturbations.STATE)
    assert set(state["workers"][0]["generators"]) == {"generator", "perturb_generator"}
    assert_same_run(tmp_path / "four", tmp_path / "two", 1, 4)


def test_every_condition_flies_the_same_targets(env):
    """The gaps draw from a generator of their own: under any of them, the targets drawn are those without."""
    streams = {}
    for name in ("none", "motor lag 0.08 s", "realistic (all at once)"):
        env.perturb_with(cf.PERTURBATIONS[name])
        evaluation.reseed(env, 11)
        first = env.reset()[:, :3].clone()
        run(env, torch.full((N, 4), 0.1), 20)
        streams[name] = first, env.generator.get_state()  # the targets' stream after 20 steps
        if name != "none":
            assert (env.perturb.lag < 1).all()  # the condition's own effect: a lagging motor
    env.perturb_with(NOMINAL)
    env.reset()
    (first, state), *others = streams.values()
    assert all(torch.equal(state, s) for _, s in others)
    assert torch.allclose(others[0][0], first)  # (the realistic drone sees them through noise)


def test_eval_flies_every_perturbation(crazyflie_run, capsys):
    ckpt = str(crazyflie_run / "ckpt_0002.pt")
    report = evaluation.main([ckpt, "--drones", "8", "--seconds", "0.5", "--perturbations"])
    rows = report["perturbations"]
    assert list(rows) == list(cf.PERTURBATIONS) and set(rows["none"]) == {"targets_per_drone_min",
                                                                          "crashes_per_drone_min", "targets", "crashes"}
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows)
    chosen = evaluation.main([ckpt, "--drones", "8", "--seconds", "0.5", "--perturbations", "none",
                              "realistic (all at once)"])["perturbations"]
    assert chosen == {name: rows[name] for name in ("none", "realistic (all at once)")}


def test_eval_flies_a_hover_checkpoint_in_this_task(crazyflie_run, tmp_path, capsys):
    """A hover checkpoint has no perturbations of its own; with --task crazyflie it flies them, its own settings
    kept (the example's reward), the gaps each condition's."""
    ckpt = config.load_checkpoint(str(crazyflie_run / "ckpt_0002.pt"))
    state = dict(ckpt.state, config=dict(ckpt.settings, task="hover"),
                 task_config=dataclasses.asdict(hover.HoverConfig()))
    torch.save(state, tmp_path / "hover.pt")
    args = evaluation.parse_args([str(tmp_path / "hover.pt"), "--task", "crazyflie", "--perturbations", "none"])
    task, task_cfg = evaluation.fly_as(config.load_checkpoint(str(tmp_path / "hover.pt")), args)
    assert task is cf and (task_cfg.reward_target, task_cfg.progress_per_metre) == (10.0, False)  # its own reward
    with pytest.raises(SystemExit) as e:
        evaluation.main([str(tmp_path / "hover.pt"), "--perturbations"])
    assert e.value.code == 2 and "--task crazyflie" in capsys.readouterr().err
    report = evaluation.main([str(tmp_path / "hover.pt"), "--task", "crazyflie", "--drones", "8", "--seconds", "1",
                              "--perturbations", "none"])
    assert list(report["perturbations"]) == ["none"]
    with pytest.raises(SystemExit) as e:
        evaluation.main([str(crazyflie_run / "ckpt_0002.pt"), "--perturbations", "wind"])
    assert e.value.code == 2
    assert "no perturbation named 'wind'; the crazyflie task's: none, motor lag 0.03 s" in capsys.readouterr().err
