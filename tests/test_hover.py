"""Tests of env.py, the drone-hover task: shapes, observations, rewards, resets and time-outs, checked against
Genesis's own state on one scene of N drones shared by the whole run (conftest.py). Every test starts from
env.reset(), so the order does not matter; some set env state directly (targets, episode counters, drone pose) to
construct situations quickly, and each says so."""
import os

import pytest
import torch
import env as env_module
from env import HoverConfig, HoverEnv
from tests.checks import SyncSpy, rotation_matrix

REWARD_TERMS = ("target", "smooth", "yaw", "angular", "crash")

N = 8
CFG = HoverConfig()
INIT = torch.tensor(CFG.init_pos)
DT = CFG.dt
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(hover_env):
    return hover_env


def full(value):
    return torch.full((N, 4), float(value))


def run(env, actions, steps):
    for _ in range(steps):
        out = env.step(actions)
    return out


def expected_reset_obs(env):
    rel = ((env.target_pos - INIT) / 3).clamp(-1, 1)
    return torch.cat((rel, torch.tensor([[1.0, 0, 0, 0]]).expand(N, 4), torch.zeros(N, 10)), dim=1)


def test_shapes_dtypes_device(env):
    obs = env.reset()
    assert obs.shape == (N, 17) and obs.dtype == torch.float32 and obs.device.type == "cpu"
    assert env.num_obs == 17 and env.num_actions == 4 and env.max_episode_length == 1500 and env.dt == 0.01
    obs, rew, done, info = env.step(torch.zeros(N, 4))
    assert obs.shape == (N, 17) and obs.dtype == torch.float32
    assert rew.shape == (N,) and rew.dtype == torch.float32
    assert done.shape == (N,) and done.dtype == torch.bool
    assert info["time_outs"].shape == (N,) and info["time_outs"].dtype == torch.bool
    assert info["nonfinite"].shape == (N,) and info["nonfinite"].dtype == torch.bool
    assert info["final_obs"].shape == (N, 17)
    keys = {"return", "length", "targets", "crashes", *(f"reward_{t}" for t in REWARD_TERMS)}
    assert set(info["episode"]) == keys
    assert all(v.shape == (N,) and v.device.type == "cpu" for v in info["episode"].values())
    assert env.base_pos.shape == (N, 3) and env.target_pos.shape == (N, 3)


def test_reset_observation_layout(env):
    obs = env.reset()
    assert torch.equal(env.base_pos, INIT.expand(N, 3))
    assert torch.allclose(obs, expected_reset_obs(env), atol=1e-6)
    assert torch.allclose(env.drone.get_pos(), INIT.expand(N, 3), atol=1e-6)
    assert torch.equal(env.episode_length, torch.zeros(N, dtype=torch.int32))


def test_observation_matches_genesis_state(env):
    """Body-frame velocities and quaternion in obs agree with Genesis's own getters after some tumbling."""
    env.reset()
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        actions = torch.rand(N, 4, generator=g) * 0.6 - 0.3
        obs, _, done, _ = env.step(actions)
    assert not done.any()
    quat = env.drone.get_quat()
    R_T = rotation_matrix(quat).transpose(1, 2)
    lin_b = (R_T @ env.drone.get_vel()[:, :, None])[..., 0]
    ang_b = (R_T @ env.drone.get_ang()[:, :, None])[..., 0]
    assert torch.allclose(obs[:, 3:7], quat, atol=1e-6)
    assert torch.allclose(obs[:, 7:10], (lin_b / 3).clamp(-1, 1), atol=1e-5)
    assert torch.allclose(obs[:, 10:13], (ang_b / 25).clamp(-1, 1), atol=1e-5)  # clipped at 25 rad/s, not pi
    assert torch.equal(obs[:, 13:17], actions)  # the action applied in this step
    assert torch.allclose(obs[:, :3], ((env.target_pos - env.drone.get_pos()) / 3).clamp(-1, 1), atol=1e-6)
    assert torch.allclose(env.base_pos, env.drone.get_pos(), atol=1e-6)


def test_zero_action_hovers(env):
    env.reset()
    obs, _, done, info = run(env, torch.zeros(N, 4), 50)  # 0.5 s
    assert not done.any() and torch.equal(info["final_obs"], obs)
    assert (env.base_pos - INIT).norm(dim=1).max() < 0.1
    assert torch.equal(info["episode"]["length"], torch.full((N,), 50.0))  # running sums where not done


def test_full_throttle_climbs(env):
    env.reset()
    obs, _, done, _ = run(env, full(1.0), 30)
    assert not done.any()
    assert (env.base_pos[:, 2] > INIT[2] + 0.2).all()
    assert (obs[:, 9] > 0).all()  # body z velocity (drone stays level) points up
    obs, _, _, _ = env.step(full(3.0))  # out-of-range actions are clipped to [-1, 1] before use
    assert torch.equal(obs[:, 13:17], full(1.0))


def test_min_throttle_crashes_and_resets(env):
    env.reset()
    for step in range(1, 101):
        obs, rew, done, info = env.step(full(-1.0))
        if done.any():
            break
    assert done.all() and 30 < step < 100  # ~0.45 s of near free fall from 1 m
    ep = info["episode"]
    assert (ep["crashes"] == 1).all() and not info["time_outs"].any() and not info["nonfinite"].any()
    assert (info["final_obs"][:, 2] > 0.9 / 3).all()  # pre-reset height below 0.1 m: rel z > 0.9
    assert torch.allclose(ep["reward_crash"], torch.full((N,), -10.0 * DT))
    assert torch.equal(ep["length"], torch.full((N,), float(step)))
    assert torch.equal(env.base_pos, INIT.expand(N, 3))
    assert torch.allclose(obs, expected_reset_obs(env), atol=1e-6)
    assert torch.allclose(env.drone.get_pos(), INIT.expand(N, 3), atol=1e-6)
    assert torch.allclose(env.drone.get_dofs_velocity(), torch.zeros(N, 6))
    obs, _, done, _ = env.step(torch.zeros(N, 4))  # the reset drone really flies from the start pose
    assert not done.any() and (env.base_pos - INIT).norm(dim=1).max() < 0.01


def test_time_out_after_1500_steps(env):
    """The episode counter is set to 1495 directly (instead of hovering 1495 steps); zero action hovers."""
    env.reset()
    env.episode_length.fill_(1495)
    for _ in range(4):
        _, _, done, info = env.step(torch.zeros(N, 4))
        assert not done.any()
    obs, _, done, info = env.step(torch.zeros(N, 4))
    assert done.all() and info["time_outs"].all() and not info["episode"]["crashes"].any()
    assert torch.equal(info["episode"]["length"], torch.full((N,), 5.0))  # steps actually stepped
    assert torch.equal(env.episode_length, torch.zeros(N, dtype=torch.int32))
    assert torch.allclose(obs, expected_reset_obs(env), atol=1e-6)
    assert not torch.allclose(info["final_obs"], obs)  # bootstrapping sees the pre-reset state


def test_crash_on_last_step_counts_as_crash(env):
    """Env 0 is put 5 cm above the ground on the time-out step: it is a crash, not a time-out."""
    env.reset()
    env.episode_length.fill_(1499)
    qpos = env.drone.get_qpos()
    qpos[0, 2] = 0.05
    env.drone.set_qpos(qpos, zero_velocity=True)
    _, _, done, info = env.step(torch.zeros(N, 4))
    assert done.all()
    assert info["episode"]["crashes"].tolist() == [1.0] + [0.0] * (N - 1)
    assert info["time_outs"].tolist() == [False] + [True] * (N - 1)


def last_step_of_episode(env, actions):
    """Step once as the episode's last step (counter set to 1499 directly) so info["episode"] is valid for all."""
    env.episode_length.fill_(1499)
    _, rew, done, info = env.step(actions)
    assert done.all()
    return rew, info


def test_reward_target_sign(env):
    """Targets are set directly: above the drone (climbing toward it pays), then below (climbing away costs)."""
    for target_z, sign in ((2.0, 1.0), (0.5, -1.0)):
        env.reset()
        env.target_pos[:] = torch.tensor([0.0, 0.0, target_z])
        run(env, full(1.0), 5)
        _, info = last_step_of_episode(env, full(1.0))
        assert (sign * info["episode"]["reward_target"] > 0).all()


def test_reward_terms_one_step(env):
    env.reset()
    prev_pos, target = env.base_pos.clone(), env.target_pos.clone()
    rew, info = last_step_of_episode(env, full(0.5))
    ep = info["episode"]  # a one-step episode: its sums are this step's terms
    pos = target - info["final_obs"][:, :3] * 3  # |rel| < 3 here, so the clip is inactive
    expected = 10 * DT * ((prev_pos - target).square().sum(1) - (pos - target).square().sum(1))
    assert torch.allclose(ep["reward_target"], expected, atol=1e-6)
    assert torch.allclose(ep["reward_smooth"], torch.full((N,), -1e-4 * DT * 4 * 0.25))
    assert torch.allclose(ep["reward_yaw"], torch.full((N,), 0.01 * DT), atol=1e-8)  # level start: yaw ~ 0
    ang = info["final_obs"][:, 10:13] * 25
    assert torch.allclose(ep["reward_angular"], -2e-4 * DT * ang.norm(dim=1) / 3.14159, atol=1e-9)
    assert torch.equal(ep["reward_crash"], torch.zeros(N))
    total = sum(ep[f"reward_{t}"] for t in REWARD_TERMS)
    assert torch.allclose(rew, total, atol=1e-9) and torch.allclose(ep["return"], rew)
    assert torch.equal(ep["length"], torch.ones(N))


def test_progress_speed_cap():
    """Without a cap the term is the drop in squared distance; with one, closing in faster than the cap pays as if
    at the cap (2 |p_prev - target| v dt), slower or receding flight is paid as before."""
    prev = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0]])
    now = torch.tensor([[1.9, 0, 0], [1.995, 0, 0], [2.1, 0, 0]])  # 10 m/s, 0.5 m/s toward; 10 m/s away
    dist2 = now.square().sum(1)
    plain = env_module.progress(prev, dist2, 0.0, DT)
    assert torch.allclose(plain, 4 - dist2)
    capped = env_module.progress(prev, dist2, 2.5, DT)
    assert torch.allclose(capped, torch.stack((torch.tensor(2 * 2.0 * 2.5 * DT), plain[1], plain[2])))


def test_progress_per_metre():
    """Per metre, the term is the drop in distance, the same for closing in at a speed 0.15 m or 2 m from the
    target; a cap pays faster closing as if at the cap (v dt), slower or receding flight as before."""
    prev = torch.tensor([[2.0, 0, 0], [0.15, 0, 0], [2.0, 0, 0], [2.0, 0, 0]])
    now = torch.tensor([[1.995, 0, 0], [0.145, 0, 0], [1.9, 0, 0], [2.1, 0, 0]])  # 0.5 m/s toward, twice; 10 in, out
    dist2 = now.square().sum(1)
    metres = env_module.progress(prev, dist2, 0.0, DT, per_metre=True)
    assert torch.allclose(metres, torch.tensor([0.005, 0.005, 0.1, -0.1]), atol=1e-6)
    squared = env_module.progress(prev, dist2, 0.0, DT)
    assert squared[0] > 10 * squared[1]  # squared distances pay the last centimetres little
    capped = env_module.progress(prev, dist2, 2.5, DT, per_metre=True)
    assert torch.allclose(capped, torch.tensor([0.005, 0.005, 2.5 * DT, -0.1]), atol=1e-6)


def climb_one_step(env, cfg):
    """A one-step episode at full throttle toward a target 1 m above, flown under cfg (env.cfg replaced directly,
    then restored: the progress settings are read at every step; the reward weights stay the 10 per unit of
    progress the env was built with). Returns the
    distance to the target before [N], after [N], and the progress reward paid [N]."""
    env.reset()
    env.target_pos[:] = torch.tensor([0.0, 0.0, 2.0])
    prev_dist = torch.linalg.vector_norm(env.target_pos - env.base_pos, dim=1)
    env.cfg = cfg
    try:
        _, info = last_step_of_episode(env, full(1.0))
    finally:
        env.cfg = CFG
    return prev_dist, (info["final_obs"][:, :3] * 3).norm(dim=1), info["episode"]["reward_target"]


def test_env_pays_capped_progress(env):
    """With a cap of 0.05 m/s, the climb closes in faster than that, and is paid as if at 0.05 m/s."""
    prev_dist, dist, paid = climb_one_step(env, HoverConfig(progress_speed_cap=0.05))
    capped = 10 * DT * 2 * prev_dist * 0.05 * DT
    assert (10 * DT * (prev_dist.square() - dist.square()) > 1.5 * capped).all()  # uncapped, it would be paid more
    assert torch.allclose(paid, capped, rtol=1e-4)


def test_env_pays_progress_per_metre(env):
    """Paid per metre, the climb earns reward_target * dt * the metres it closed in."""
    prev_dist, dist, paid = climb_one_step(env, HoverConfig(progress_per_metre=True))
    assert (prev_dist > dist).all()
    assert torch.allclose(paid, 10 * DT * (prev_dist - dist), rtol=1e-4)


def test_the_crash_penalty_grows_over_its_ramp_then_holds(env):
    """set_iteration(i) sets the penalty of iteration i: x1 up to FROM, linear to crash_multiple at TO, held after."""
    try:
        scales = []
        for cfg, iterations in ((HoverConfig(crash_multiple=10.0, crash_ramp=(100, 200)), (1, 100, 150, 200, 250)),
                                (HoverConfig(crash_multiple=10.0, crash_ramp=(50, 50)), (49, 50)),
                                (CFG, range(0, 400, 7))):
            env.cfg = cfg
            for i in iterations:
                env.set_iteration(i)
                scales.append(env.reward_crash / CFG.reward_crash)
                assert env._reward_weights[-1] == pytest.approx(DT * env.reward_crash)
        assert scales[:7] == [1.0, 1.0, 5.5, 10.0, 10.0, 1.0, 10.0] and set(scales[7:]) == {1.0}  # default: none
    finally:
        env.cfg = CFG
        env.set_iteration(1)


def test_set_iteration_grows_the_crash_penalty_the_env_pays(env):
    """The curriculum is the task's: train.py only tells the env the iteration. A drone put 5 cm above the ground
    crashes in one step and pays the penalty of that iteration."""
    env.cfg = HoverConfig(crash_multiple=4.0, crash_ramp=(10, 20))
    try:
        for iteration, multiple in ((5, 1.0), (15, 2.5), (30, 4.0)):
            env.set_iteration(iteration)
            env.reset()
            qpos = env.drone.get_qpos()
            qpos[:, 2] = 0.05
            env.drone.set_qpos(qpos, zero_velocity=True)
            _, _, done, info = env.step(torch.zeros(N, 4))
            paid = info["episode"]["reward_crash"]
            assert done.all() and torch.allclose(paid, torch.full((N,), -10.0 * multiple * DT))
    finally:
        env.cfg = CFG
        env.set_iteration(1)
    assert env.reward_crash == CFG.reward_crash


def test_reward_yaw_convention(env):
    """Drones are turned directly to yaws across (-3, 3) rad with a 0.3 rad roll; the yaw term must follow the z-y-x
    yaw read off the rotation matrix (atan2(R10, R00)), not some other Euler convention."""
    env.reset()
    yaw, roll = torch.linspace(-3.0, 3.0, N), torch.full((N,), 0.3)
    cz, sz, cx, sx = (yaw / 2).cos(), (yaw / 2).sin(), (roll / 2).cos(), (roll / 2).sin()
    qpos = env.drone.get_qpos()
    qpos[:, 3:] = torch.stack((cz * cx, cz * sx, sz * sx, sz * cx), 1)  # q_z(yaw) * q_x(roll)
    env.drone.set_qpos(qpos, zero_velocity=True)
    _, info = last_step_of_episode(env, torch.zeros(N, 4))
    R = rotation_matrix(info["final_obs"][:, 3:7])
    expected_yaw = torch.atan2(R[:, 1, 0], R[:, 0, 0])
    assert torch.allclose(expected_yaw, yaw, atol=0.02)  # barely turned in one step
    assert torch.allclose(info["episode"]["reward_yaw"], 0.01 * DT * torch.exp(-10 * expected_yaw.abs()), atol=1e-7)


def test_target_resampled_when_reached(env):
    """Env 0's target is set to the drone's own position, so it is reached on the next step."""
    env.reset()
    env.target_pos[0] = env.base_pos[0]
    old = env.target_pos.clone()
    obs, _, _, _ = env.step(torch.zeros(N, 4))
    assert not torch.equal(env.target_pos[0], old[0]) and torch.equal(env.target_pos[1:], old[1:])
    low, high = torch.tensor(CFG.target_low), torch.tensor(CFG.target_high)
    assert ((env.target_pos[0] >= low) & (env.target_pos[0] <= high)).all()
    assert torch.allclose(obs[0, :3], ((env.target_pos[0] - env.base_pos[0]) / 3).clamp(-1, 1), atol=1e-6)
    _, info = last_step_of_episode(env, torch.zeros(N, 4))  # read the exact per-episode count
    assert info["episode"]["targets"].tolist() == [1.0] + [0.0] * (N - 1)


def test_targets_inside_ranges(env):
    low, high = torch.tensor(CFG.target_low), torch.tensor(CFG.target_high)
    targets = [env._draw_targets() for _ in range(200)]
    for _ in range(5):
        env.reset()
        targets.append(env.target_pos)
    targets = torch.cat(targets)
    assert ((targets >= low) & (targets <= high)).all() and (targets[:, 2] == 1.0).all()
    assert targets[:, :2].min() < -0.95 and targets[:, :2].max() > 0.95  # the whole square is used


def test_random_episode_start(env):
    env.reset(random_episode_start=True)
    lengths = env.episode_length
    assert lengths.min() >= 0 and lengths.max() < 1500 and len(set(lengths.tolist())) > 1
    env.reset()
    assert (env.episode_length == 0).all()


def test_bad_actions_raise(env):
    env.reset()
    bad = [torch.zeros(N, 3), torch.zeros(N - 1, 4), torch.zeros(4), torch.zeros(N, 4, dtype=torch.float64),
           torch.zeros(N, 4, device="meta"), torch.zeros(N, 4).numpy()]
    for actions in bad:
        with pytest.raises((ValueError, TypeError)):
            env.step(actions)
    for value in (float("nan"), float("inf")):
        actions = torch.zeros(N, 4)
        actions[3, 1] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            env.step(actions)
    assert (env.episode_length == 0).all()  # nothing was stepped


def test_seeded_runs_identical(env):
    """Two seeded runs of the same env: re-seed, reset, step 20 fixed actions; obs and rewards must match bit for
    bit, whatever the global torch RNG does in between."""
    def rollout():
        env.generator.manual_seed(0)
        g = torch.Generator().manual_seed(7)
        out = [env.reset()]
        for _ in range(20):
            torch.rand(100)  # global RNG use (e.g. by the trainer) must not change the env
            obs, rew, _, _ = env.step(torch.rand(N, 4, generator=g) * 2 - 1)
            out += [obs, rew]
        return out

    a, b = rollout(), rollout()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    env.generator.manual_seed(1)
    assert not torch.equal(env.reset(), a[0])


def test_episode_statistics_exact(env):
    """Half the envs fall (crash mid-run), the others fly random actions; then everyone's counter is set to hit the
    time-out. Every finished episode's stats must equal sums kept here by hand."""
    env.reset()
    g = torch.Generator().manual_seed(3)
    ret, length, terms_seen = torch.zeros(N), torch.zeros(N), 0
    for step in range(80):
        if step == 79:
            env.episode_length.fill_(1499)
        actions = torch.rand(N, 4, generator=g) * 0.4 - 0.2
        actions[: N // 2] = -1.0
        _, rew, done, info = env.step(actions)
        ret += rew
        length += 1
        ep = info["episode"]
        if done.any():
            d = done
            assert torch.allclose(ep["return"][d], ret[d], atol=1e-5)
            assert torch.equal(ep["length"][d], length[d])
            total = sum(ep[f"reward_{t}"] for t in REWARD_TERMS)
            assert torch.allclose(total[d], ep["return"][d], atol=1e-5)
            terms_seen += int(d.sum())
            ret[d], length[d] = 0.0, 0.0
    assert done.all() and info["time_outs"][N // 2:].all()
    assert terms_seen >= N + N // 2  # the fallers finished twice (crash, then time-out)


def test_nonfinite_state_is_reset(env):
    """Env 1's velocity is set to NaN directly; the env is flagged, reset, and no NaN comes out."""
    env.reset()
    env.step(torch.zeros(N, 4))
    vel = torch.zeros(N, 6)
    vel[1] = float("nan")
    env.drone.set_dofs_velocity(vel, envs_idx=torch.arange(N) == 1)
    obs, rew, done, info = env.step(torch.zeros(N, 4))
    assert info["nonfinite"].tolist() == [False, True] + [False] * (N - 2)
    assert done.tolist() == info["nonfinite"].tolist()
    assert info["episode"]["crashes"][1] == 0 and not info["time_outs"][1] and rew[1] == 0
    for t in (obs, rew, info["final_obs"], env.base_pos):
        assert torch.isfinite(t).all()
    obs, _, done, info = env.step(torch.zeros(N, 4))
    assert not info["nonfinite"].any() and not done.any() and torch.isfinite(env.drone.get_qpos()).all()


def test_step_has_no_host_sync(env):
    env.reset()
    actions = full(-1.0)  # crashes and resets happen inside the spied steps
    env.check_actions = False
    try:
        with SyncSpy() as spy:
            run(env, actions, 60)
        assert spy.calls == []
    finally:
        env.check_actions = True
    with SyncSpy() as spy:
        env.step(actions)
    assert spy.calls == ["__bool__"]  # the NaN/inf check of the actions, and only it


def test_one_genesis_backend_per_process(env):
    with pytest.raises(RuntimeError, match="already initialised"):
        HoverEnv(num_envs=2, device="cuda")  # rejected before any scene is built
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        HoverEnv(num_envs=2, device="mps")


def test_measure_gives_eval_each_drones_distance_to_its_target(env):
    env.reset()
    env.step(torch.zeros(N, 4))
    m = env.measure()
    assert list(m) == ["distance_m"] and torch.allclose(m["distance_m"], (env.target_pos - env.base_pos).norm(dim=1))


def test_describe_lays_out_the_observation_and_the_action_map():
    meta = env_module.describe(CFG)
    assert [o["index"] for o in meta["observation"]] == list(range(17)) and meta["control_rate_hz"] == 100
    assert [o["scale"] for o in meta["observation"][:3]] == [1 / 3] * 3 and meta["observation"][10]["scale"] == 1 / 25
    assert meta["action"]["range"] == [-1.0, 1.0] and meta["action"]["rpm_gain"] == 0.8
    assert meta["trained_against"].startswith("none")
