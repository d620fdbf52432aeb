"""The Crazyflie folder's shared run: test_crazyflie.py resumes it and flies it, test_preflight.py exports it."""
import contextlib
import io

import pytest


@pytest.fixture(scope="session")
def crazyflie_run(tmp_path_factory):
    """The crazyflie task trained for 2 iterations on 8 drones, its ranges grown over iterations 1-3."""
    import train
    log_dir = tmp_path_factory.mktemp("runs")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--task", "crazyflie", "--device", "cpu", "--workers", "1", "--num-envs", "8", "--num-steps", "8",
                    "--num-minibatches", "2", "--num-epochs", "2", "--max-iterations", "2", "--perturb-ramp", "1", "3",
                    "--log-dir", str(log_dir), "--run-name", "cf"])
    return log_dir / "cf"
