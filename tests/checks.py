"""What the Genesis tests of every room share: a spy on host syncs, a rotation matrix written independently of
the tasks' own helpers, and a comparison of two training runs."""
import json
import os

import torch
from torch.overrides import TorchFunctionMode


def rotation_matrix(q):  # [N, 4] w,x,y,z -> [N, 3, 3], written independently of env.py's helpers
    w, x, y, z = q.unbind(1)
    return torch.stack((1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)), 1).view(-1, 3, 3)


class SyncSpy(TorchFunctionMode):
    """Records torch calls that read device data back to the host."""
    SYNCING = {"item", "__bool__", "tolist", "nonzero", "argwhere", "cpu", "numpy", "__int__", "__float__",
               "__index__", "masked_select"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" else ()
        index = index if isinstance(index, tuple) else (index,)
        if (name in self.SYNCING or (name == "where" and len(args) == 1)
                or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


TIMINGS = {"steps_per_s", "collect_s", "learn_s", "elapsed_s", "eta_s"}  # the clock's, not the run's


def assert_same_run(run_dir, resumed_dir, first, last):
    """The resumed run's metrics rows first..last and its checkpoint `last` (weights, normalizer, Adam's state)
    equal the uninterrupted run's, bit for bit."""
    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return {r["iteration"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in map(json.loads, f)}
    a, b = rows(run_dir), rows(resumed_dir)
    assert [a[i] for i in range(first, last + 1)] == [b[i] for i in range(first, last + 1)]
    x, y = (torch.load(os.path.join(d, f"ckpt_{last:04d}.pt"), weights_only=True) for d in (run_dir, resumed_dir))
    assert all(torch.equal(x["policy"][k], y["policy"][k]) for k in x["policy"])
    assert all(torch.equal(x["optimizer"][k], y["optimizer"][k]) for k in ("m", "v", "lr"))
    assert x["optimizer"]["t"] == y["optimizer"]["t"]
