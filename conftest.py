"""pytest's set-up for every test file: Genesis's performance mode off, for this process and every process the
tests start (a cached scene then builds in seconds whatever its number of envs: env.init_genesis), and one scene
of 8 drones that the drone's tests and the tools' share (training runs build their own)."""
import os

import pytest

os.environ["GS_PERFORMANCE_MODE"] = "0"


@pytest.fixture(scope="session")
def hover_env():
    from env import HoverEnv  # (imports genesis: only the tests that ask for a scene pay for it)
    return HoverEnv(num_envs=8, device="cpu", seed=0)
