#!/bin/bash
# Validate a checkout on a CUDA machine, in three parts, each summarised in one line:
#
#   1. tests: the gpu-marked tests (tests/test_gpu.py) with DS_ACCELERATOR=cuda; a skipped
#      test counts as a failure here, since on a GPU nothing should skip;
#   2. train: the default tiny job (tiny_stage2, built-in data) for 50 bf16 steps under the
#      DeepSpeed launcher on NPROC GPUs, ZeRO-2, no evaluation; the loss must be finite and
#      fall, no step skipped, the run on the GPU;
#   3. benchmark: launch/benchmark.py on the same job, 20 bf16 steps after 5 of warm-up;
#   4. caption: LAVIS's COCO caption fine-tuning at its real size with random weights (EVA
#      ViT-g trained at 364 px with activation checkpointing, OPT-2.7B frozen in bf16, batch
#      16, bf16) for 20 steps after 5 of warm-up on one GPU, and the same model through
#      transformers' Blip2 for the speed and memory ratios (launch/benchmark.py --baseline hf).
#
#   bash launch/gpu/validate.sh [NPROC]      # NPROC: GPUs for the training run (default 1)
#
# Needs NPROC visible GPUs and torch. Where deepspeed or megatron-core do not import, they
# are installed first from the wheels in launch/gpu/wheels/ (or $WHEELS), made elsewhere with
#   pip download -d launch/gpu/wheels -c constraints.txt deepspeed megatron-core
# (their dependencies come along); the package itself is installed without dependencies
# when it does not import. Runs from the
# repository root wherever it is started; logs, the run directory and the JSON figures go to
# a fresh directory under ${TMPDIR:-/tmp}, printed first and kept. Every part runs even when
# an earlier one failed; the exit status is 1 when any part failed (2: could not start).
set -euo pipefail

NPROC=${1:-${NPROC:-1}}
PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO_DIR"

if [[ ! $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/gpu/validate.sh [NPROC]  (NPROC: a positive number of GPUs, got '$NPROC')" >&2
  exit 2
fi
if ! visible=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'); then
  echo "validate: cannot import torch with $PYTHON" >&2
  exit 2
fi
if ((visible < NPROC)); then
  echo "validate: $NPROC GPU(s) asked for, torch sees $visible" >&2
  exit 2
fi
WHEELS=${WHEELS:-$REPO_DIR/launch/gpu/wheels}
if ! "$PYTHON" -c 'import deepspeed, megatron.core' 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "validate: deepspeed or megatron-core does not import and $WHEELS holds no wheels" >&2
    exit 2
  fi
  echo "[validate] installing deepspeed and megatron-core from $WHEELS"
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" deepspeed megatron-core || exit 2
fi
if ! "$PYTHON" -c 'import blip2_megatron' 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps -e "$REPO_DIR" || exit 2
fi
# The package picks its device through DeepSpeed's accelerator; a stale DS_ACCELERATOR=cpu
# from a test shell would run everything on the CPU (and the gpu tests would skip).
export DS_ACCELERATOR=cuda

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blip2-gpu-validate.XXXXXX")
echo "[validate] $NPROC GPU(s) for training; outputs in $WORK"
SUMMARY=()
FAILED=0

report() { # report PART ok|FAILED LINE
  SUMMARY+=("$(printf '%-9s %-6s %s' "$1" "$2" "$3")")
  echo "[validate] $1: $2: $3"
  if [[ $2 != ok ]]; then FAILED=1; fi
}

# benchmark_line FILE: one line of figures from launch/benchmark.py's JSON (status 1 on a problem)
benchmark_line() {
  "$PYTHON" - "$1" <<'EOF'
import json
import math
import sys

try:
    result = json.loads(open(sys.argv[1]).read())
except OSError as err:
    print(f"no benchmark figures ({err})")
    sys.exit(1)
ours = result["ours"]


def fmt(key, spec):
    value = ours.get(key)
    return "n/a" if value is None else format(value, spec)


problems = []
ratios = result.get("ratios") or {}
if result.get("device", "cpu") == "cpu":
    problems.append("ran on the CPU")
if not ours.get("fps", 0) > 0:
    problems.append(f"fps {ours.get('fps')}")
if not math.isfinite(ours.get("final_loss", math.nan)):
    problems.append(f"final loss {ours.get('final_loss')}")
print(
    f"{result.get('precision')} on {result.get('world_size')} x {result.get('device')}: "
    f"{fmt('fps', '.1f')} images/s, step {fmt('step_time', '.4f')} s, {fmt('tflops_per_device', '.3f')} TFLOP/s, "
    f"MFU {fmt('mfu', '.2%')}, peak {fmt('peak_mem_gb', '.2f')} GiB"
    + (f"; vs transformers: speed {ratios['speed']:.2f}x, memory {ratios['memory']:.2f}x" if ratios else "")
    + ("" if not problems else "; " + "; ".join(problems))
)
sys.exit(1 if problems else 0)
EOF
}

# ------------------------------------------------------------------ 1. gpu tests
echo "[validate] 1/4 gpu tests"
# One process (the repository's addopts run two test workers, and pytest-xdist may be absent here).
if "$PYTHON" -m pytest -q -o addopts=--strict-markers -p no:xdist -m gpu -rsP -p no:cacheprovider \
  --junitxml="$WORK/tests.xml" tests/test_gpu.py 2>&1 |
  tee "$WORK/tests.log"; then
  tests_rc=0
else
  tests_rc=$?
fi
if line=$("$PYTHON" - "$WORK/tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as err:
    print(f"no test report ({err})")
    sys.exit(1)
suite = root if root.tag == "testsuite" else root.find("testsuite")
n = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped of {n['tests']}")
sys.exit(0 if n["tests"] > 0 and passed == n["tests"] else 1)
EOF
) && ((tests_rc == 0)); then
  report tests ok "$line"
else
  report tests FAILED "$line (pytest exit $tests_rc; log $WORK/tests.log)"
fi

# ------------------------------------------------------------------ 2. bf16 training run
echo "[validate] 2/4 bf16 training of tiny_stage2 on $NPROC GPU(s)"
RUN_DIR="$WORK/train"
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if deepspeed --num_gpus "$NPROC" --master_port "$PORT" launch/train.py --ds_config ds_configs/zero2.json \
  train.precision=bf16 train.max_steps=50 train.log_interval=10 "train.output_dir=$RUN_DIR" eval.enabled=false \
  2>&1 | tee "$WORK/train.log"; then
  train_rc=0
else
  train_rc=$?
fi
if line=$("$PYTHON" - "$RUN_DIR" "$NPROC" <<'EOF'
import json
import math
import sys
from pathlib import Path

run, nproc = Path(sys.argv[1]), int(sys.argv[2])
try:
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(text) for text in (run / "log.jsonl").read_text().splitlines() if text.strip()]
except OSError as err:
    print(f"no run summary ({err})")
    sys.exit(1)
losses = [(r["step"], r["loss"]) for r in steps if "event" not in r and "loss" in r]
problems = []
if summary.get("steps") != 50:
    problems.append(f"{summary.get('steps')} steps, not 50")
if summary.get("world_size") != nproc:
    problems.append(f"world size {summary.get('world_size')}, not {nproc}")
if summary.get("device", "cpu") == "cpu":
    problems.append("ran on the CPU")
if summary.get("skipped_steps"):
    problems.append(f"{summary['skipped_steps']} steps skipped")
if len(losses) < 2 or not all(math.isfinite(v) for _, v in losses):
    problems.append(f"logged losses {losses}")
elif not losses[-1][1] < losses[0][1]:
    problems.append(f"loss did not fall ({losses[0][1]:.4f} at step {losses[0][0]} -> {losses[-1][1]:.4f})")
fps = summary.get("fps_mean")
print(
    f"{summary.get('steps')} steps on {summary.get('world_size')} x {summary.get('device')}, "
    + (f"loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step {losses[-1][0]}), " if losses else "")
    + f"{'n/a' if fps is None else f'{fps:.1f}'} images/s after warm-up, peak {summary.get('peak_mem_gb') or 0:.2f} GiB"
    + ("" if not problems else "; " + "; ".join(problems))
)
sys.exit(1 if problems else 0)
EOF
) && ((train_rc == 0)); then
  report train ok "$line"
else
  report train FAILED "$line (exit $train_rc; log $WORK/train.log)"
fi

# ------------------------------------------------------------------ 3. benchmark
echo "[validate] 3/4 benchmark of tiny_stage2 in bf16"
if "$PYTHON" launch/benchmark.py --config tiny_stage2 --steps 20 --warmup 5 --out "$WORK/benchmark.json" \
  train.precision=bf16 "train.output_dir=$WORK/benchmark" 2>&1 | tee "$WORK/benchmark.log"; then
  bench_rc=0
else
  bench_rc=$?
fi
if line=$(benchmark_line "$WORK/benchmark.json") && ((bench_rc == 0)); then
  report benchmark ok "$line"
else
  report benchmark FAILED "$line (exit $bench_rc; log $WORK/benchmark.log)"
fi

# ------------------------------------------------------------------ 4. caption job at real size
echo "[validate] 4/4 caption fine-tuning at real size (random weights), ours vs transformers, bf16"
if "$PYTHON" launch/benchmark.py --config caption_coco_opt2.7b --steps 20 --warmup 5 --baseline hf \
  --out "$WORK/caption.json" train.precision=bf16 model.llm.dtype=bf16 model.init_checkpoint= \
  model.llm.weights= model.llm.tokenizer=builtin:tiny model.qformer.tokenizer=builtin:tiny \
  "train.output_dir=$WORK/caption" 2>&1 | tee "$WORK/caption.log"; then
  caption_rc=0
else
  caption_rc=$?
fi
if line=$(benchmark_line "$WORK/caption.json") && ((caption_rc == 0)); then
  report caption ok "$line"
else
  report caption FAILED "$line (exit $caption_rc; log $WORK/caption.log)"
fi

echo
echo "[validate] summary (outputs in $WORK)"
printf '  %s\n' "${SUMMARY[@]}"
exit "$FAILED"
