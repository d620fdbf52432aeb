"""Tests of config.py: every flag of every task refuses what breaks the rule declared with its field (a property
test: hypothesis draws the bad values from each rule), in one line, before anything is built; checkpoints of the
earlier format load with the settings they were trained with."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

import config
import env as hover
import examples.crazyflie.crazyflie_env as cf
import examples.go2.go2_env as go2
import train
from ppo import PPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOLEANS = {"true", "1", "yes", "false", "0", "no"}
FREE_TEXT = {"task", "log_dir", "run_name"}  # any text is a setting there (checked by their own cases below)


# The values that break each bound: (hypothesis's bound, an int's shift, excluded for floats)
BREAKING = {"above": ("max_value", 0, False), "low": ("max_value", -1, True), "below": ("min_value", 0, False),
            "high": ("min_value", 1, True)}


def element_breaking(f):
    """A strategy of one value (as flag text) that breaks f's rule for a single element."""
    rule, default = f.metadata, f.default
    kind = type(default[0] if isinstance(default, tuple) else default)
    options = []
    if kind is bool:
        options.append(st.text(min_size=1).filter(lambda t: t.lower() not in BOOLEANS and not t.startswith("-")))
    if kind is float:
        options.append(st.sampled_from(["nan", "inf", "-inf"]))
    if kind is int:
        options.append(st.sampled_from(["1.5", "x", "1e3"]))  # not an int
    for key, (side, shift, excluded) in BREAKING.items():
        if key in rule and kind is int:
            options.append(st.integers(**{side: int(rule[key]) + shift}).map(repr))
        elif key in rule:
            exclude = {("exclude_max" if side == "max_value" else "exclude_min"): excluded}
            options.append(st.floats(allow_nan=False, allow_infinity=False, **{side: float(rule[key])},
                                     **exclude).map(repr))
    if "choices" in rule:
        options.append(st.text(min_size=1).filter(lambda t: t not in rule["choices"] and not t.startswith("-")))
    return st.one_of(options)


def element_keeping(f):
    """A strategy of one value (as flag text) that keeps f's rule for a single element."""
    rule, default = f.metadata, f.default
    value = default[0] if isinstance(default, tuple) else default
    if "choices" in rule:
        return st.sampled_from([str(c) for c in rule["choices"]])
    low, high = rule.get("above", rule.get("low", value - 10)), rule.get("below", rule.get("high", value + 10))
    if isinstance(value, int):
        return st.integers(min_value=int(low) + ("above" in rule), max_value=int(high) - ("below" in rule)).map(repr)
    return st.floats(min_value=low, max_value=high, exclude_min="above" in rule, exclude_max="below" in rule).map(repr)


def breaking(f):
    """A strategy of flag tokens for field f that break its declared rule."""
    one = element_breaking(f)
    if not isinstance(f.default, tuple):
        return one.map(lambda v: [v])
    n, rule = f.metadata.get("length", len(f.default)), f.metadata
    good = element_keeping(f)
    ways = [  # one bad value among good ones
        st.integers(0, (n or 1) - 1).flatmap(lambda i: st.tuples(
            st.lists(good, min_size=i, max_size=i), one, st.lists(good, min_size=(n or 1) - i - 1,
                                                                  max_size=(n or 1) - i - 1))).map(
            lambda t: [*t[0], t[1], *t[2]])]
    if n is not None:  # a wrong number of good values
        ways.append(st.integers(0, n + 3).filter(lambda k: k != n).flatmap(
            lambda k: st.lists(good, min_size=k, max_size=k)))
    else:
        ways.append(st.just([]))
    if rule.get("ordered"):  # HIGH before LOW
        ways.append(st.tuples(good, good).filter(lambda t: float(t[0]) != float(t[1])).map(
            lambda t: sorted(t, key=float, reverse=True)))
    return st.one_of(ways)


def refused(task, flag_tokens):
    """config's verdict on train.py's command line with these flags: the BadInput message, or None."""
    try:
        config.train_settings(["--device", "cpu", "--task", task, *flag_tokens], train.TrainConfig, "",
                              say=lambda s: None)
    except config.BadInput as e:
        return str(e)
    return None


CLASSES = [("hover", train.TrainConfig), ("hover", PPOConfig), ("hover", hover.HoverConfig),
           ("crazyflie", cf.CrazyflieConfig), ("go2", go2.Go2Config)]


@pytest.mark.parametrize("task, cls", CLASSES, ids=[c.__name__ for _, c in CLASSES])
def test_every_flag_refuses_what_breaks_its_rule_in_one_line(task, cls):
    fields = [f for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING and f.name not in FREE_TEXT
              and (f.name == "device" or not isinstance(f.default, str) or "choices" in f.metadata)]
    assert len(fields) >= 10

    def tokens(f):
        if f.name == "device":
            return st.text(min_size=1).filter(lambda t: not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", t)
                                              and not t.startswith("-")).map(lambda t: [t])
        return breaking(f)

    @hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), tokens(f))))
    def check(field_and_tokens):
        f, values = field_and_tokens
        message = refused(task, [config.flag(f.name), *values])
        assert message is not None, (f.name, values)
        assert "\n" not in message and message.strip(), message
    check()


def test_the_rules_accept_every_default_and_preset():
    """Each task's settings with its CPU preset (a CPU run) and with its TRAIN alone (a GPU run's)."""
    for task in ("hover", "crazyflie", "go2"):
        assert refused(task, []) is None
        module = config.task_module(task)
        split = {name: {k: v for k, v in module.TRAIN.items() if k in {f.name for f in dataclasses.fields(cls)}}
                 for name, cls in (("train", train.TrainConfig), ("ppo", PPOConfig), ("task", module.Config))}
        config.check(dataclasses.replace(train.TrainConfig(), ppo=PPOConfig(**split["ppo"]), **split["train"]))
        config.check(module.Config(**split["task"]))


def test_a_typo_in_a_tasks_presets_is_named(monkeypatch):
    monkeypatch.setattr(hover, "CPU_PRESET", dict(hover.CPU_PRESET, num_env=4))
    assert "TRAIN or CPU_PRESET names settings that do not exist: num_env" in refused("hover", [])


def test_a_checkpoint_with_a_setting_of_another_type_is_refused_in_one_line(tmp_path, hover_checkpoint):
    for change in (dict(dt="0.01"), dict(init_pos=1.0)):
        state = torch.load(hover_checkpoint, weights_only=True)
        state["task_config"].update(change)
        torch.save(state, tmp_path / "typed.pt")
        with pytest.raises(config.BadInput) as e:
            config.load_checkpoint(str(tmp_path / "typed.pt"))
        assert "\n" not in str(e.value) and "typed.pt" in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--task", "not.a.module"], "no task 'not.a.module'"),
    (["--log-dir", "runs", "--run-name", "x", "--num-envs", "3", "--num-minibatches", "2", "--num-steps", "3"],
     "does not divide the batch"),
])
def test_text_settings_and_relations(flags, message):
    assert message in refused("hover", flags)


def test_bad_input_is_refused_in_a_real_process_before_genesis_starts(tmp_path):
    """The commands a user types, each in one process: exit status 2, one line, genesis never imported."""
    (tmp_path / "file").write_text("")
    cases = [["train.py", "--dt", "0"], ["train.py", "--hidden", "0"], ["train.py", "--device", "cudax"],
             ["train.py", "--log-dir", str(tmp_path / "file")], ["train.py", "--task", "go2", "--command-resample-s",
                                                                 "0.005"],
             ["eval.py", "x.pt", "--seconds", "inf"], ["eval.py", "/nonexistent.pt"]]
    code = ("import runpy, sys\nfor argv in %r:\n    sys.argv = argv\n    try:\n        runpy.run_path(argv[0], "
            "run_name='__main__')\n    except SystemExit as e:\n        print('exit', e.code)\n"
            "print('genesis imported:', 'genesis' in sys.modules)" % cases)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    said = [line for line in r.stdout.splitlines() if line.startswith(("exit", "genesis"))]
    assert said == ["exit 2"] * len(cases) + ["genesis imported: False"], (r.stdout, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(cases) and all(re.match(r"(train|eval)\.py: error: ", line) for line in lines), lines


# ---------------------------------------------------------------- checkpoints of the earlier format
def format_1(state, task_settings):
    """A checkpoint as commit e1667a0 wrote it, from one of today's: "task" held the task's settings, "rng" the
    main worker's states, no format key."""
    rest = {k: v for k, v in state.items() if k not in ("format", "task_config", "workers")}
    main = state["workers"][0]
    return {**rest, "task": task_settings, "rng": {"torch": main["torch"], "env": main["generators"]["generator"],
                                                   "cuda": main["cuda"]}}


def test_a_randomized_checkpoint_of_format_1_loads_as_it_was_trained(tmp_path, hover_checkpoint):
    """--randomize true of its day, before nominal_share and progress per metre: a crazyflie checkpoint with the
    values it stored, and the settings it lacks off, as they were (not today's defaults of the crazyflie task)."""
    state = torch.load(hover_checkpoint, weights_only=True)
    stored = dict(state["task_config"], randomize=True, motor_lag_s=[0.03, 0.08], action_delay=[0, 1],
                  mass_scale=[0.9, 1.2], thrust_scale=[0.85, 1.15], obs_noise=[0.01, 0.05, 1.0, 0.1], push_force=0.05,
                  push_torque=5e-4, push_interval_s=[1.0, 2.0], perturb_ramp=[50, 150], reward_target=10.0)
    del stored["progress_per_metre"]
    torch.save(format_1(state, stored), tmp_path / "old.pt")
    ckpt = config.load_checkpoint(str(tmp_path / "old.pt"))
    assert ckpt.settings["task"] == "crazyflie" and ckpt.state["format"] == config.FORMAT
    cfg = ckpt.task_cfg
    assert (cfg.nominal_share, cfg.progress_per_metre, cfg.reward_target) == (0.0, False, 10.0)  # as trained
    assert (cfg.motor_lag_s, cfg.perturb_ramp) == ((0.03, 0.08), (50, 150))


def test_a_hover_checkpoint_of_format_1_loads_exports_and_resumes(tmp_path, hover_checkpoint, capsys):
    import export
    state = torch.load(hover_checkpoint, weights_only=True)
    stored = {**state["task_config"], **{k: list(v) if isinstance(v, tuple) else v for k, v in
                                        config.FORMAT_1_PERTURBATIONS.items()}, "randomize": False}
    del stored["nominal_share"]  # (written before it existed: the KeyError export.py once raised)
    torch.save(format_1(state, stored), tmp_path / "old.pt")
    ckpt = config.load_checkpoint(str(tmp_path / "old.pt"))
    assert ckpt.settings["task"] == "hover" and ckpt.task_cfg == config.from_dict(hover.HoverConfig,
                                                                                    state["task_config"])
    export.main([str(tmp_path / "old.pt"), "--out", str(tmp_path / "export"), "--formats", "torch"])
    assert sorted(os.listdir(tmp_path / "export")) == ["policy.json", "policy.pt2"]
    train.main(["--resume", str(tmp_path / "old.pt"), "--max-iterations", str(ckpt.state["iteration"] + 1),
                "--log-dir", str(tmp_path), "--run-name", "resumed"])
    assert config.load_checkpoint(str(tmp_path / "resumed" / f"ckpt_{ckpt.state['iteration'] + 1:04d}.pt"))


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path, hover_checkpoint):
    state = torch.load(hover_checkpoint, weights_only=True)
    torch.save(dict(state, format=config.FORMAT + 1), tmp_path / "new.pt")
    with pytest.raises(config.BadInput, match="written by a newer version"):
        config.load_checkpoint(str(tmp_path / "new.pt"))


@pytest.fixture(scope="module")
def hover_checkpoint(tmp_path_factory):
    """A hover checkpoint of 2 iterations of 8 drones."""
    import contextlib
    import io
    log_dir = tmp_path_factory.mktemp("runs")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--device", "cpu", "--workers", "1", "--num-envs", "8", "--num-steps", "8", "--num-minibatches",
                    "2", "--num-epochs", "2", "--max-iterations", "2", "--log-dir", str(log_dir), "--run-name", "h"])
    return str(log_dir / "h" / "ckpt_0002.pt")
