"""launch/train.py with one fault injected, for the fault tests (run under any launcher).

    BLIP2_FAULT=kill_in_save:2 python tests/scripts/faulty_train.py <launch/train.py arguments>
    BLIP2_FAULT=nan_loss:3-4:1 deepspeed --num_gpus 2 tests/scripts/faulty_train.py ...

Faults:
* ``kill_in_save:N``: SIGKILL this process while it writes its N-th checkpoint (after
  DeepSpeed's files, before our weights), as a crash or an OOM kill would.
* ``nan_loss:A-B[:R]``: the loss of training steps A..B (1-based; B may be ``inf``) is NaN,
  on global rank R only when given (the others compute a finite loss).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _install(fault: str) -> None:
    kind, _, spec = fault.partition(":")
    if kind == "kill_in_save":
        from blip2_megatron.training import checkpoint

        target, calls = int(spec), [0]
        original = checkpoint.save_weights

        def save_weights(engine, folder):
            calls[0] += 1
            if calls[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(engine, folder)

        checkpoint.save_weights = save_weights
    elif kind == "nan_loss":
        from blip2_megatron.models.blip2 import Blip2ForLLM

        steps, _, rank = spec.partition(":")
        first, last = steps.split("-")
        first, last = int(first), float(last)
        original_forward = Blip2ForLLM.forward
        count = [0]

        def forward(self, batch):
            out = original_forward(self, batch)
            if self.training:
                count[0] += 1
                import torch.distributed as dist

                if first <= count[0] <= last and (not rank or dist.get_rank() == int(rank)):
                    out["loss"] = out["loss"] * float("nan")
            return out

        Blip2ForLLM.forward = forward
    else:
        raise SystemExit(f"unknown BLIP2_FAULT {fault!r}")


if __name__ == "__main__":
    _install(os.environ["BLIP2_FAULT"])
    sys.path.insert(0, str(REPO / "launch"))
    sys.argv = [str(REPO / "launch" / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")
