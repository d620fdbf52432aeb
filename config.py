"""Settings from flags, presets and checkpoints, each checked before anything expensive starts.

    python train.py --task go2 --num-envs 512 ...  ->  train_settings()  ->  TrainConfig + the task's Config -> train()

Every field of train.py's TrainConfig, of ppo.PPOConfig and of the task's Config is a flag, with the help and the
rule declared beside the field: setting(default, help, above=, low=, below=, high=, choices=, length=, ordered=).
The settings merge in this order, the later winning: the field's default, the task's TRAIN, its CPU_PRESET (a
fresh run without CUDA), the flags; a resumed run starts from its checkpoint's settings instead, never from a
preset. A value that breaks its rule, or a Config's conflicts(), is refused with one line before Genesis starts.
eval.py and export.py read checkpoints here (load_checkpoint), so that neither imports train.py.
"""
import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from dataclasses import field
from typing import NamedTuple

import torch

from policy import ActorCritic
from workers import resolve_device

# --task NAME: the module that holds the task (README, "Your own robot"); any module path works, these are aliases.
TASKS = {"hover": "env", "crazyflie": "examples.crazyflie.crazyflie_env", "go2": "examples.go2.go2_env"}
FORMAT = 2  # of checkpoints; load_checkpoint upgrades format 1 (no "format" key) as it reads it


class BadInput(Exception):
    """A setting, flag or file that cannot work: one line that says what to change."""


@contextlib.contextmanager
def refusing(program):
    """Bad input inside this block ends the program with one line on stderr and exit status 2."""
    try:
        yield
    except BadInput as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)


def setting(default, help, **rule):
    """A setting: its default, its flag's help and the rule its value keeps (see rule_broken)."""
    return field(default=default, metadata={"help": help, **rule})


def flag(name):
    return "--" + name.replace("_", "-")


def rule_broken(f, value):
    """What is wrong with `value` for the field f, by the rule in its metadata, or None. A tuple field takes as many
    values as its default (length=None: any number, at least one), each kept to the bounds; ordered: LOW <= HIGH."""
    rule, default = f.metadata, f.default
    if isinstance(default, tuple):
        n = rule.get("length", len(default))
        if not isinstance(value, tuple) or not value or (n is not None and len(value) != n):
            shown = " ".join(map(repr, value)) if isinstance(value, tuple) else repr(value)
            return f"takes {n or 'one or more'} values, got {shown or 'none'}"
        if rule.get("ordered") and value[0] > value[1]:
            return f"must be a range LOW HIGH with LOW <= HIGH, got {' '.join(map(repr, value))}"
    for x in value if isinstance(value, tuple) else (value,):
        if isinstance(x, float) and not math.isfinite(x):
            return f"must be a finite number, got {x}"
        if "choices" in rule and x not in rule["choices"]:
            return f"must be one of {', '.join(map(str, rule['choices']))}, got {x!r}"
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else x  # (numbers: strings have choices)
        for key, holds, words in (("above", lambda a, b: a > b, ">"), ("low", lambda a, b: a >= b, ">="),
                                  ("below", lambda a, b: a < b, "<"), ("high", lambda a, b: a <= b, "<=")):
            if key in rule and not holds(x, rule[key]):
                return f"must be {words} {rule[key]}, got {shown}"
    return None


def check(cfg):
    """Raise BadInput for the first setting of cfg (a dataclass, nested ones included) that breaks its rule, then
    for the first of cfg.conflicts(), if it has them."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value)
        elif (problem := rule_broken(f, value)) is not None:
            raise BadInput(f"{flag(f.name)} {problem}")
    for problem in cfg.conflicts() if hasattr(cfg, "conflicts") else ():
        raise BadInput(problem)


def from_dict(cls, stored):
    """cls rebuilt from its asdict() (a checkpoint's, or config.json's): lists back to tuples, nested dataclasses
    rebuilt; a setting stored that cls no longer has is refused, one it lacks takes its default."""
    kinds = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(stored) - set(kinds)
    if unknown:
        raise BadInput(f"settings unknown to {cls.__name__}: {', '.join(sorted(unknown))}")
    values = {}
    for name, value in stored.items():
        f = kinds[name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            value = from_dict(f.default_factory, value)
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


# ------------------------------------------------------------------------------------------------------- flags
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage text
        raise BadInput(message)


def boolean(text):
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")
    return value


def flags_text(settings: dict) -> str:
    return " ".join(f"{flag(k)} {' '.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in settings.items())


def add_flags(parser, title, cls, shown):
    """A flag per field of cls (nested dataclasses: a group of their own), its help ending in the default that
    applies (shown: the task's TRAIN, where it sets one)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:  # a nested dataclass
            add_flags(parser, f.default_factory.__name__, f.default_factory, shown)
            continue
        d, default = f.default, shown.get(f.name, f.default)
        kind = type(d[0]) if isinstance(d, tuple) else boolean if isinstance(d, bool) else type(d)
        default = " ".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(flag(f.name), type=kind, nargs="+" if isinstance(d, tuple) else None,
                           help=f"{f.metadata.get('help', '')} (default {default})".replace("%", "%%"))


def field_names(cls):
    return {name for f in dataclasses.fields(cls) for name in (
        field_names(f.default_factory) if f.default is dataclasses.MISSING else (f.name,))}


def task_module(name):
    """The module of a task: an alias of TASKS or a module path; it must keep the task contract's names."""
    try:
        module = importlib.import_module(TASKS.get(name, name))
    except (ImportError, TypeError, ValueError) as e:  # (no such module; an empty or relative name)
        raise BadInput(f"no task {name!r} ({first_line(e)}): use {', '.join(TASKS)} or a module path such as "
                       f"examples.go2.go2_env") from None
    missing = [n for n in ("Config", "Env", "TRAIN", "CPU_PRESET") if not hasattr(module, n)]
    if missing:
        raise BadInput(f"the module {module.__name__} is no task: it lacks {', '.join(missing)} (README, 'Your own "
                       f"robot')")
    return module


class TrainSettings(NamedTuple):
    cfg: object  # train.py's TrainConfig
    task_cfg: object  # the task's Config
    task: object  # the task's module
    resume: object  # the Checkpoint to continue from, or None


def train_settings(argv, TrainConfig, description, say=print) -> TrainSettings:
    """train.py's settings from its command line (argv: None for sys.argv), checked; raises BadInput."""
    first = Parser(add_help=False)
    first.add_argument("--task")
    first.add_argument("--resume")
    known, resume = first.parse_known_args(argv)[0], None
    if known.resume is not None:
        resume = load_checkpoint(known.resume)
        if known.task is not None and task_module(known.task) is not resume.task:
            raise BadInput(f"{known.resume} is a checkpoint of the {resume.settings['task']} task, not of {known.task}")
    task = resume.task if resume else task_module(TrainConfig.task if known.task is None else known.task)
    clash = field_names(TrainConfig) & field_names(task.Config)
    if clash:
        raise BadInput(f"{task.__name__}.Config's settings {', '.join(sorted(clash))} have the names of train.py's: "
                       f"rename them")
    unknown = (set(task.TRAIN) | set(task.CPU_PRESET)) - field_names(TrainConfig) - field_names(task.Config)
    if unknown:
        raise BadInput(f"{task.__name__}'s TRAIN or CPU_PRESET names settings that do not exist: "
                       f"{', '.join(sorted(unknown))}")
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"Without CUDA, a fresh run starts from the task's CPU preset: {flags_text(task.CPU_PRESET)}")
    add_flags(p, "training", TrainConfig, task.TRAIN)
    add_flags(p, f"the task ({task.__name__}.Config)", task.Config, task.TRAIN)
    p.add_argument("--resume", metavar="CKPT", help="continue training from a checkpoint, with its settings")
    flags = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(p.parse_args(argv)).items()
             if v is not None and k != "resume"}
    try:
        device = resolve_device(flags.pop("device", "auto"))  # a resumed run too: it goes on with what is here
    except ValueError as e:
        raise BadInput(e) from None
    if resume:
        cfg, task_cfg = from_dict(TrainConfig, resume.settings), resume.task_cfg
    else:
        cfg, task_cfg = TrainConfig(), task.Config()
        if device == "cpu":
            say(f"CPU run: the task's CPU preset applies (flags given override it): {flags_text(task.CPU_PRESET)}")
        flags = {**task.TRAIN, **(task.CPU_PRESET if device == "cpu" else {}), **flags}
    ppo = {k: flags.pop(k) for k in list(flags) if k in field_names(type(cfg.ppo))}
    own = {k: flags.pop(k) for k in list(flags) if k in field_names(TrainConfig)}
    cfg = dataclasses.replace(cfg, device=device, ppo=dataclasses.replace(cfg.ppo, **ppo), **own)
    task_cfg = dataclasses.replace(task_cfg, **flags)  # the rest are the task's settings
    check(cfg)
    check(task_cfg)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise BadInput("--tensorboard needs the tensorboard package: pip install tensorboard")
    if resume:
        check_resumable(resume, cfg)
    return TrainSettings(cfg, task_cfg, task, resume)


def check_resumable(ckpt, cfg):
    try:
        policy = build_policy(dataclasses.asdict(cfg), ckpt.task.Env.num_obs, ckpt.task.Env.num_actions)
        policy.load_state_dict(ckpt.state["policy"])
    except RuntimeError as e:
        raise BadInput(f"the checkpoint's network does not match this configuration: "
                       f"{str(e).splitlines()[0][:200]}") from None
    saved = ckpt.settings["num_envs"]
    if cfg.num_envs != saved and any("env" in worker for worker in ckpt.state["workers"]):
        raise BadInput(f"--num-envs must stay {saved} on resume: the checkpoint holds the state of {saved} envs per "
                       f"worker")
    done, kind = ckpt.state["iteration"], torch.device(ckpt.settings["device"]).type
    if done >= cfg.max_iterations:
        raise BadInput(f"the checkpoint has trained its {done} iterations: resume with --max-iterations above {done}")
    if kind != torch.device(cfg.device).type:
        raise BadInput(f"the checkpoint's random states are {kind}'s, this run is on {cfg.device}: resume it where a "
                       f"{kind} device is (its weights evaluate and export anywhere)")


def check_writable(directory):
    """Make the directory (and its parents) if need be, and check that files can be written there."""
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise BadInput(f"cannot write into {directory}: {e.strerror if e.strerror else e}") from None


# ------------------------------------------------------------------------------------------------- checkpoints
def worker_state(env, obs, cuda):
    """This worker's part of a checkpoint: its random states (torch's, CUDA's, each generator the env holds) and,
    where the task gives them (state_dict), its envs' state and the observation its loop holds. The envs are written
    back from that state at once: Genesis's setters round the last bit of what they set, so this run and any run
    resumed from the checkpoint step on from the very same state, and a resumed run repeats this one bit for bit."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None,
             "generators": {k: g.get_state() for k, g in vars(env).items() if isinstance(g, torch.Generator)}}
    if hasattr(env, "state_dict"):
        state["env"] = on_cpu(env.state_dict())
        env.load_state_dict(state["env"])
        state["obs"] = obs.cpu()
    return state


def on_cpu(x):  # the tensors of nested dicts, copied to the host
    return {k: on_cpu(v) for k, v in x.items()} if isinstance(x, dict) else x.cpu() if torch.is_tensor(x) else x


def restore_worker(env, state):
    """A worker's part of a checkpoint put back (worker_state's); the observation its loop goes on from, or None
    where the task keeps no state of its envs (they start new episodes)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    for name, generator_state in state["generators"].items():
        getattr(env, name).set_state(generator_state)
    if "env" not in state or not hasattr(env, "load_state_dict"):
        return None
    env.load_state_dict(state["env"])
    return state["obs"].to(env.device)


class Checkpoint(NamedTuple):
    state: dict  # what train.py saved: format, iteration, elapsed_s, config, task_config, policy, optimizer, workers
    settings: dict  # its TrainConfig, as a dict
    task: object  # the task's module
    task_cfg: object  # its task Config


def build_policy(settings: dict, num_obs, num_actions):
    """The actor-critic that a TrainConfig (as a dict) describes: train.py, eval.py and export.py build it here."""
    return ActorCritic(num_obs, num_actions, tuple(settings["hidden"]), settings["init_std"],
                       settings["normalize_obs"], settings["min_std"], settings["activation"])


def load_checkpoint(path) -> Checkpoint:
    """A checkpoint, its settings as they were trained with, checked; BadInput in one line for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"no checkpoint at {path}") from None
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise BadInput(f"{path} is not a checkpoint of this project ({type(e).__name__}: {first_line(e)})") from None
    try:
        if "format" not in state:
            state = upgrade_format_1(state)
        if state["format"] > FORMAT:
            raise BadInput(f"{path} was written by a newer version of this project (format {state['format']})")
        missing = {"iteration", "elapsed_s", "config", "task_config", "policy", "optimizer", "workers"} - set(state)
        if missing:
            raise BadInput(f"it is not a whole checkpoint: it lacks {', '.join(sorted(missing))}")
        settings = state["config"]
        task = task_module(settings["task"])
        task_cfg = from_dict(task.Config, state["task_config"])
        check(task_cfg)
        build_policy(settings, task.Env.num_obs, task.Env.num_actions).load_state_dict(state["policy"])
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    except Exception as e:  # a setting of another type, a network that does not fit its settings, ...
        raise BadInput(f"{path} is not a checkpoint of this project ({type(e).__name__}: {first_line(e)})") from None
    return Checkpoint(state, settings, task, task_cfg)


# Format 1 (up to commit e1667a0): "task" held the task's settings, "rng" the main worker's random states only,
# and the drone's perturbations were settings of the hover task (--randomize, which replaced defaults when built).
# A checkpoint flown with any of them on is a crazyflie checkpoint now, with exactly the values it stored; a setting
# it lacks had the default of its day, off, which the crazyflie task's defaults are not.
FORMAT_1_PERTURBATIONS = dict(motor_lag_s=(0.0, 0.0), action_delay=(0, 0), mass_scale=(1.0, 1.0),
                              thrust_scale=(1.0, 1.0), obs_noise=(0.0, 0.0, 0.0, 0.0), push_force=0.0,
                              push_torque=0.0, push_interval_s=(1.0, 2.0), nominal_share=0.0, perturb_ramp=(0, 0))
FORMAT_1_GAPS = ("motor_lag_s", "action_delay", "mass_scale", "thrust_scale", "obs_noise", "push_force", "push_torque")


def first_line(error):
    return (str(error).strip().splitlines() or [""])[0][:160]


def upgrade_format_1(state):
    settings, task_cfg = dict(state["config"]), dict(state["task"])
    task_cfg.pop("randomize", None)
    if settings["task"] == "hover":
        gaps = {k: task_cfg.pop(k, off) for k, off in FORMAT_1_PERTURBATIONS.items()}
        gaps = {k: tuple(v) if isinstance(v, list) else v for k, v in gaps.items()}
        if any(gaps[k] != FORMAT_1_PERTURBATIONS[k] for k in FORMAT_1_GAPS):
            settings["task"], task_cfg = "crazyflie", {"progress_per_metre": False, **task_cfg, **gaps}
    rest = {k: v for k, v in state.items() if k not in ("config", "task", "rng")}
    rng = state["rng"]  # the main worker's; the envs' state was not saved
    return {**rest, "format": FORMAT, "config": settings, "task_config": task_cfg,
            "workers": [{"torch": rng["torch"], "cuda": rng["cuda"], "generators": {"generator": rng["env"]}}]}
