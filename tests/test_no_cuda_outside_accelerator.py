"""Only blip2_megatron/accelerator.py may name CUDA; everything else asks it for the device.

A stray ``torch.cuda.synchronize()`` or ``.cuda()`` works on GPUs and breaks the same code
on Ascend NPUs and on CPU. The check is textual, like the project's before-stop hook, so a
comment naming ``torch.cuda`` counts too: say "the device" or point at accelerator.py.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "blip2_megatron"
ALLOWED = PACKAGE / "accelerator.py"
CUDA = re.compile(r"torch\.cuda|\.cuda\(")


def cuda_mentions(package: Path = PACKAGE) -> list[str]:
    """'path:line: text' for every CUDA mention outside accelerator.py."""
    hits = []
    for path in sorted(package.rglob("*.py")):
        if path == ALLOWED:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if CUDA.search(line):
                hits.append(f"{path.relative_to(package.parent)}:{number}: {line.strip()}")
    return hits


def test_no_cuda_outside_accelerator():
    hits = cuda_mentions()
    assert not hits, "CUDA named outside blip2_megatron/accelerator.py (use its functions):\n" + "\n".join(
        hits
    )


def test_the_check_finds_cuda(tmp_path):
    pkg = tmp_path / "blip2_megatron"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "bad.py").write_text(
        "import torch\n\nx = torch.zeros(1).cuda()\ntorch.cuda.synchronize()\n"
    )
    (pkg / "good.py").write_text("from blip2_megatron import accelerator\n\naccelerator.synchronize()\n")
    assert cuda_mentions(pkg) == [
        "blip2_megatron/models/bad.py:3: x = torch.zeros(1).cuda()",
        "blip2_megatron/models/bad.py:4: torch.cuda.synchronize()",
    ]
