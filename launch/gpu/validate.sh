#!/bin/bash
# Validate a checkout on one CUDA machine (about 8 minutes on one H100, installs included), or
# rehearse every part on CPU at tiny size (--cpu: what CI runs), so that a GPU run is left with
# nothing but GPU behaviour to find. Parts, in this order, each under its own timeout:
#
#   caption   LAVIS's COCO caption fine-tuning at its real size with random weights (EVA ViT-g
#             trained at 364 px with activation checkpointing, OPT-2.7B frozen in bf16, batch 16,
#             bf16), 20 steps after 5 of warm-up on one device, with --profile: images/s, MFU,
#             memory, where the step goes. Ours only: the transformers baseline comes last.
#             --cpu: the same job at tiny size.
#   parity    ours exported to transformers' Blip2 (launch/convert.py ours-to-hf's export), both
#             from the same weights, at OPT-2.7B BLIP-2's widths with two layers per part in
#             bf16: loss within rtol 2e-2, identical greedy tokens (tests/test_gpu.py's
#             exported_parity). --cpu: the tiny flavour in fp32 (rtol 1e-4), the same code.
#   tests     the gpu-marked tests (tests/test_gpu.py) with DS_ACCELERATOR=cuda; a skip is a
#             failure. --cpu: not applicable (every test there needs a CUDA device); the module
#             must still collect, every test skip for that one reason, none error: it proves the
#             test code and what it imports are installed.
#   train     the default tiny job (tiny_stage2, built-in data), 40 steps (--cpu: 6) under the
#             DeepSpeed launcher on NPROC devices, ZeRO-2, bf16, saving at the end: a finite,
#             falling loss, no step skipped, the run on the device.
#   resume    the train run continued to 60 steps (--cpu: 10) from its checkpoint (a save and a
#             load through NCCL, or gloo with --cpu).
#   tp2, pp2  with NPROC >= 2: a few steps at model.llm.tp=2, then at model.llm.pp=2 (else skipped).
#   benchmark launch/benchmark.py on the tiny job, 20 bf16 steps after 5 of warm-up.
#   baseline  the caption part again beside transformers' Blip2 (launch/benchmark.py --baseline
#             hf, fewer steps): the speed and memory ratios. --cpu: at tiny size.
#
#   bash launch/gpu/validate.sh [NPROC]          # GPU mode; NPROC: GPUs for train/resume/tp2/pp2 (1)
#   bash launch/gpu/validate.sh --cpu [NPROC]    # CPU mode, DS_ACCELERATOR=cpu; NPROC gloo ranks (2)
#
# Needs torch (and, in GPU mode, NPROC visible GPUs). A machine with only torch, transformers,
# pillow and pytest is enough: where deepspeed, megatron-core or webdataset do not import, they
# and their dependencies are installed from the wheels in launch/gpu/wheels/ (or $WHEELS),
# made beforehand on any machine with internet by (14 wheels, about 8 MB, no torch or CUDA wheel)
#   bash launch/gpu/make_wheels.sh --python-version 3.12 launch/gpu/wheels
# The package itself is installed (`pip install --no-deps -e .`) unless it imports from outside
# the checkout; the launch scripts import it from the checkout anyway. PYTHON picks the Python
# (default python3). Logs, runs and figures go to a fresh directory under ${TMPDIR:-/tmp},
# printed first and kept; every figure lands in one JSON file there (validate.json) and a
# one-screen summary ends the output. Every part runs even when an earlier one failed; the exit
# status is 1 when any part failed, 2 when it could not start.
set -euo pipefail

MODE=gpu
NPROC=""
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu ;;
    -h | --help) sed -n '2,46p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) NPROC=$arg ;;
  esac
done
PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO_DIR"
if [[ $MODE == cpu ]]; then NPROC=${NPROC:-${VALIDATE_NPROC:-2}}; else NPROC=${NPROC:-${VALIDATE_NPROC:-1}}; fi
if [[ ! $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/gpu/validate.sh [--cpu] [NPROC]  (NPROC: a positive number, got '$NPROC')" >&2
  exit 2
fi
if ! visible=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'); then
  echo "validate: cannot import torch with $PYTHON" >&2
  exit 2
fi
if [[ $MODE == gpu ]] && ((visible < NPROC)); then
  echo "validate: $NPROC GPU(s) asked for, torch sees $visible (--cpu rehearses on CPU)" >&2
  exit 2
fi

# ------------------------------------------------------------------ installs
WHEELS=${WHEELS:-$REPO_DIR/launch/gpu/wheels}
install_start=$SECONDS
if ! "$PYTHON" -c 'import deepspeed, megatron.core, webdataset, braceexpand' 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "validate: deepspeed, megatron-core or webdataset does not import and $WHEELS holds no wheels" >&2
    echo "validate: make them with: bash launch/gpu/make_wheels.sh --python-version 3.12 $WHEELS" >&2
    exit 2
  fi
  echo "[validate] installing deepspeed, megatron-core, webdataset and their dependencies from $WHEELS"
  # No index: the machine may have no internet; what the wheels folder lacks is a mistake to see.
  PIP_CONSTRAINT="" "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" \
    deepspeed megatron-core webdataset braceexpand || exit 2
fi
# From a neutral directory: from the checkout's root the package imports without being installed.
if ! (cd / && "$PYTHON" -c 'import blip2_megatron') 2>/dev/null; then
  echo "[validate] installing blip2_megatron (editable, no dependencies)"
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$REPO_DIR" \
    || "$PYTHON" -m pip install -q --no-deps -e "$REPO_DIR" || exit 2
fi
INSTALL_S=$((SECONDS - install_start))
# The package picks its device through DeepSpeed's accelerator; a stale DS_ACCELERATOR=cpu
# from a test shell would run a GPU validation on the CPU (and the gpu tests would skip).
if [[ $MODE == gpu ]]; then export DS_ACCELERATOR=cuda; else export DS_ACCELERATOR=cpu; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ $MODE == cpu ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blip2-validate-$MODE.XXXXXX")
mkdir -p "$WORK/parts"
echo "[validate] $MODE mode, NPROC=$NPROC; outputs in $WORK"
FAILED=0

# Sizes and timeouts (seconds) per mode. GPU: the 8-minute budget on one H100.
if [[ $MODE == gpu ]]; then
  CAPTION_SIZE=(model.init_checkpoint= model.llm.weights= model.llm.tokenizer=builtin:tiny
    model.qformer.tokenizer=builtin:tiny model.llm.dtype=bf16)
  CAPTION_STEPS=(--steps 20 --warmup 5) BASELINE_STEPS=(--steps 10 --warmup 3)
  PARITY_SIZE=real_width PARITY_DTYPE=bf16
  TRAIN_STEPS=40 RESUME_STEPS=60 LAYOUT_STEPS=4 LOG_INTERVAL=10 BENCH_STEPS=(--steps 20 --warmup 5)
  declare -A TIMEOUT=([caption]=150 [parity]=60 [tests]=120 [train]=60 [resume]=60 [tp2]=60 [pp2]=60
    [benchmark]=45 [baseline]=120)
else
  # The caption job at the journeys' tiny size (tests/journeys.py tiny_overrides: 364 px -> 48 px).
  CAPTION_SIZE=(model.flavour=tiny model.init_checkpoint= model.llm.weights= model.llm.tokenizer=builtin:tiny
    model.qformer.tokenizer=builtin:tiny model.vision.image_size=48 model.llm.max_position_embeddings=512
    data.batch_size=4 model.llm.dtype=bf16)
  CAPTION_STEPS=(--steps 3 --warmup 1) BASELINE_STEPS=(--steps 3 --warmup 1)
  PARITY_SIZE=tiny PARITY_DTYPE=fp32
  TRAIN_STEPS=6 RESUME_STEPS=10 LAYOUT_STEPS=2 LOG_INTERVAL=1 BENCH_STEPS=(--steps 3 --warmup 1)
  declare -A TIMEOUT=([caption]=240 [parity]=180 [tests]=180 [train]=300 [resume]=300 [tp2]=300 [pp2]=300
    [benchmark]=180 [baseline]=300)
fi
TIMEOUT_SCALE=${VALIDATE_TIMEOUT_SCALE:-1}

# run_part PART LOG CMD...: CMD under the part's timeout, its output into LOG (and this screen).
run_part() {
  local part=$1 log=$2 limit
  shift 2
  limit=$((TIMEOUT[$part] * TIMEOUT_SCALE))
  PART_START=$SECONDS
  if timeout --kill-after=20 "$limit" "$@" >"$log" 2>&1; then PART_RC=0; else PART_RC=$?; fi
  tail -n 5 "$log" | sed "s/^/  [$part] /"
  if ((PART_RC == 124 || PART_RC == 137)); then PART_NOTE="timed out after ${limit} s"; else PART_NOTE="exit $PART_RC"; fi
}

# check PART ARGS...: judge a part from what it wrote, print one line, write parts/PART.json.
# Status 0 when the part passed (and its command exited 0).
check() {
  local part=$1
  shift
  "$PYTHON" - "$part" "$MODE" "$NPROC" "$WORK" "$PART_RC" "$PART_NOTE" "$((SECONDS - PART_START))" "$@" <<'EOF'
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

part, mode, nproc, work, rc, note, seconds, *args = sys.argv[1:]
nproc, work, rc = int(nproc), Path(work), int(rc)
problems, figures = [], {}


def on_device(device):
    if mode == "gpu" and (device or "cpu") == "cpu":
        problems.append("ran on the CPU")


def run_files(run):
    try:
        summary = json.loads((run / "summary.json").read_text())
        records = [json.loads(t) for t in (run / "log.jsonl").read_text().splitlines() if t.strip()]
    except OSError as err:
        problems.append(f"no run summary ({err})")
        return None, []
    return summary, records


def losses(records):
    return [(r["step"], r["loss"]) for r in records if "event" not in r and "loss" in r]


def benchmark(path, with_baseline):
    try:
        result = json.loads(Path(path).read_text())
    except OSError as err:
        problems.append(f"no benchmark figures ({err})")
        return "n/a"
    ours = result["ours"]
    figures.update(result)
    on_device(result.get("device"))
    if not ours.get("fps", 0) > 0:
        problems.append(f"fps {ours.get('fps')}")
    if not math.isfinite(ours.get("final_loss", math.nan)):
        problems.append(f"final loss {ours.get('final_loss')}")
    ratios = result.get("ratios") or {}
    if with_baseline and not ratios:
        problems.append("no transformers figures")

    def fmt(key, spec):
        value = ours.get(key)
        return "n/a" if value is None else format(value, spec)

    line = (
        f"{result.get('precision')} on {result.get('world_size')} x {result.get('device')}: "
        f"{fmt('fps', '.1f')} images/s, step {fmt('step_time', '.4f')} s, "
        f"{fmt('tflops_per_device', '.2f')} TFLOP/s, MFU {fmt('mfu', '.1%')}, peak {fmt('peak_mem_gb', '.2f')} GiB"
    )
    if ratios:
        memory = ratios.get("memory")
        line += f"; vs transformers: speed {ratios['speed']:.2f}x, memory " + (
            "n/a" if memory is None else f"{memory:.2f}x"
        )
    if "profile" in result:
        line += "; profiled"
    return line


if part in ("caption", "benchmark", "baseline"):
    line = benchmark(args[0], part == "baseline")
elif part == "parity":
    try:
        figures = json.loads(Path(args[0]).read_text())
        line = (
            f"{figures['size']} in {figures['dtype']}: loss {figures['loss_ours']:.5f} vs transformers "
            f"{figures['loss_transformers']:.5f} (rel {figures['loss_rel_diff']:.1e}), greedy tokens "
            + ("identical" if figures["greedy_tokens_identical"] else "DIFFER")
        )
        on_device(figures.get("device"))
    except (OSError, KeyError, ValueError) as err:
        line = f"no parity figures ({err})"
        problems.append("see the log")
elif part == "tests":
    try:
        root = ET.parse(args[0]).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        skip_reasons = {s.get("message", "") for s in root.iter("skipped")}
    except (OSError, ET.ParseError) as err:
        n, skip_reasons = None, set()
        problems.append(f"no test report ({err})")
    if n is not None:
        passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        figures = {**n, "passed": passed}
        line = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped of {n['tests']}"
        if n["tests"] == 0 or n["failures"] or n["errors"]:
            problems.append("not all ran")
        elif mode == "gpu" and n["skipped"]:
            problems.append(f"skipped on a GPU: {sorted(skip_reasons)}")
        elif mode == "cpu":
            # Not applicable on CPU: every test needs a CUDA device; the module must collect and
            # skip for that reason only (an import error would be an error, not a skip).
            if n["skipped"] != n["tests"] or not all("needs a CUDA device" in r for r in skip_reasons):
                problems.append(f"expected every test skipped for want of a CUDA device: {sorted(skip_reasons)}")
            line = f"n/a on CPU: {n['tests']} gpu tests collected, all skipped (needs a CUDA device)"
            figures["applicable"] = False
    else:
        line = "no test report"
elif part in ("train", "resume", "tp2", "pp2"):
    run, steps = Path(args[0]), int(args[1])
    summary, records = run_files(run)
    line = "no run"
    if summary is not None:
        logged = losses(records)
        figures = {key: summary.get(key) for key in (
            "steps", "world_size", "tp", "pp", "dp", "device", "precision", "skipped_steps",
            "fps_mean", "peak_mem_gb", "mfu_mean", "tflops_per_device_mean")}
        figures["losses"] = logged
        if summary.get("steps") != steps:
            problems.append(f"{summary.get('steps')} steps, not {steps}")
        if summary.get("world_size") != nproc:
            problems.append(f"world size {summary.get('world_size')}, not {nproc}")
        on_device(summary.get("device"))
        if summary.get("skipped_steps"):
            problems.append(f"{summary['skipped_steps']} steps skipped")
        if not logged or not all(math.isfinite(v) for _, v in logged):
            problems.append(f"logged losses {logged}")
        if part == "train" and len(logged) >= 2 and not logged[-1][1] < logged[0][1]:
            problems.append(f"loss did not fall ({logged[0][1]:.4f} -> {logged[-1][1]:.4f})")
        if part == "resume":
            ends = [i for i, r in enumerate(records) if r.get("event") == "summary"]
            first_end = int(args[2])
            after = [r["step"] for r in records[ends[0] + 1 :] if "event" not in r] if ends else []
            figures["resumed_from"] = first_end
            if len(ends) != 2 or not after or min(after) <= first_end:
                problems.append(f"did not continue from step {first_end} (steps logged after: {after[:5]})")
        if part in ("tp2", "pp2"):
            want = ("tp", 2) if part == "tp2" else ("pp", 2)
            if summary.get(want[0]) != want[1]:
                problems.append(f"{want[0]} {summary.get(want[0])}, not {want[1]}")
        fps = summary.get("fps_mean")
        line = (
            f"{summary.get('steps')} steps on {summary.get('world_size')} x {summary.get('device')} "
            f"(TP {summary.get('tp')}, PP {summary.get('pp')}), "
            + (f"loss {logged[0][1]:.4f} (step {logged[0][0]}) -> {logged[-1][1]:.4f} (step {logged[-1][0]}), " if logged else "")
            + f"{'n/a' if fps is None else f'{fps:.1f}'} images/s"
        )
else:
    raise SystemExit(f"unknown part {part}")

if rc != 0:
    problems.append(note)
status = "ok" if not problems else "FAILED"
if problems:
    line += "; " + "; ".join(problems)
(work / "parts" / f"{part}.json").write_text(
    json.dumps({"part": part, "status": status, "seconds": int(seconds), "line": line, "figures": figures}, indent=1)
)
print(line)
sys.exit(0 if status == "ok" else 1)
EOF
}

SUMMARY=()
report() { # report PART LINE-STATUS (from check's exit status) LINE
  local part=$1 ok=$2 line=$3 word=ok
  if ((ok != 0)); then word=FAILED FAILED=1; fi
  SUMMARY+=("$(printf '%-9s %-7s %4ss  %s' "$part" "$word" "$((SECONDS - PART_START))" "$line")")
  echo "[validate] $part: $word: $line"
}
skip_part() { # skip_part PART WHY: a part that does not apply (not a failure)
  SUMMARY+=("$(printf '%-9s %-7s %4ss  %s' "$1" skipped 0 "$2")")
  printf '{"part": "%s", "status": "skipped", "seconds": 0, "line": "%s", "figures": {}}\n' "$1" "$2" \
    >"$WORK/parts/$1.json"
  echo "[validate] $1: skipped: $2"
}
judge() { # judge PART ARGS...: check, then report
  local line ok=0
  line=$(check "$@") || ok=1
  report "$1" "$ok" "$line"
}
# A free loopback port below the kernel's ephemeral range (as parallel/state.py's free_port: a
# port bind(0) hands out can be taken by another process's outgoing connection before use).
free_port() {
  "$PYTHON" - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(max(1024, low - 12000), low), 64) + [0]:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(sock.getsockname()[1])
        break
PY
}
# The DeepSpeed launcher of $PYTHON (`deepspeed` on PATH may belong to another Python).
LAUNCHER=("$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC")

# ------------------------------------------------------------------ caption (real size on GPU), ours
echo "[validate] caption: caption_coco_opt2.7b, ours, --profile"
run_part caption "$WORK/caption.log" "$PYTHON" launch/benchmark.py --config caption_coco_opt2.7b \
  "${CAPTION_STEPS[@]}" --profile --out "$WORK/caption.json" train.precision=bf16 "${CAPTION_SIZE[@]}" \
  "train.output_dir=$WORK/caption"
judge caption "$WORK/caption.json"

# ------------------------------------------------------------------ parity with transformers
echo "[validate] parity: ours exported to transformers' Blip2 ($PARITY_SIZE, $PARITY_DTYPE)"
run_part parity "$WORK/parity.log" "$PYTHON" - "$PARITY_SIZE" "$PARITY_DTYPE" "$WORK/parity" "$WORK/parity.json" <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from test_gpu import REAL_WIDTH_FEW_LAYERS, TINY, exported_parity  # noqa: E402

from blip2_megatron import accelerator  # noqa: E402
from blip2_megatron.parallel import state  # noqa: E402

size, dtype, out, figures_path = sys.argv[1:]
state.initialize_model_parallel(1, 1)
try:
    size = REAL_WIDTH_FEW_LAYERS if size == "real_width" else TINY
    figures = exported_parity(accelerator.current_device(), dtype, size, Path(out) / "hf")
finally:
    state.destroy()
Path(figures_path).write_text(json.dumps(figures))
EOF
judge parity "$WORK/parity.json"

# ------------------------------------------------------------------ gpu tests
echo "[validate] tests: tests/test_gpu.py"
# One process (the repository's addopts run two test workers, and pytest-xdist may be absent);
# the parity test is what the parity part ran already.
run_part tests "$WORK/tests.log" "$PYTHON" -m pytest -q -o addopts=--strict-markers -p no:xdist -m gpu -rsP \
  -p no:cacheprovider --junitxml="$WORK/tests.xml" -k "not exported_model_matches" tests/test_gpu.py
judge tests "$WORK/tests.xml"

# ------------------------------------------------------------------ train, save, resume
TRAIN_ARGS=(launch/train.py --ds_config ds_configs/zero2.json train.precision=bf16 "train.log_interval=$LOG_INTERVAL"
  eval.enabled=false data.num_workers=1 "train.output_dir=$WORK/train")
echo "[validate] train: tiny_stage2, $TRAIN_STEPS bf16 steps on $NPROC rank(s), ZeRO-2, saving at the end"
run_part train "$WORK/train.log" "${LAUNCHER[@]}" --master_port "$(free_port)" "${TRAIN_ARGS[@]}" "train.max_steps=$TRAIN_STEPS"
judge train "$WORK/train" "$TRAIN_STEPS"
echo "[validate] resume: the same run to $RESUME_STEPS steps from its checkpoint"
run_part resume "$WORK/resume.log" "${LAUNCHER[@]}" --master_port "$(free_port)" "${TRAIN_ARGS[@]}" "train.max_steps=$RESUME_STEPS"
judge resume "$WORK/train" "$RESUME_STEPS" "$TRAIN_STEPS"

# ------------------------------------------------------------------ TP 2, PP 2
for layout in tp2 pp2; do
  if ((NPROC < 2)); then
    skip_part "$layout" "needs NPROC >= 2"
    continue
  fi
  key=model.llm.${layout:0:2}
  echo "[validate] $layout: $LAYOUT_STEPS steps at $key=2 on $NPROC rank(s)"
  run_part "$layout" "$WORK/$layout.log" "${LAUNCHER[@]}" --master_port "$(free_port)" launch/train.py --ds_config ds_configs/zero1.json \
    train.precision=bf16 "$key=2" "train.max_steps=$LAYOUT_STEPS" train.log_interval=1 eval.enabled=false \
    data.num_workers=1 "train.output_dir=$WORK/$layout"
  judge "$layout" "$WORK/$layout" "$LAYOUT_STEPS"
done

# ------------------------------------------------------------------ benchmark of the tiny job
echo "[validate] benchmark: tiny_stage2 in bf16"
run_part benchmark "$WORK/benchmark.log" "$PYTHON" launch/benchmark.py --config tiny_stage2 "${BENCH_STEPS[@]}" \
  --out "$WORK/benchmark.json" train.precision=bf16 "train.output_dir=$WORK/benchmark"
judge benchmark "$WORK/benchmark.json"

# ------------------------------------------------------------------ caption beside transformers
echo "[validate] baseline: caption_coco_opt2.7b beside transformers' Blip2"
run_part baseline "$WORK/baseline.log" "$PYTHON" launch/benchmark.py --config caption_coco_opt2.7b \
  "${BASELINE_STEPS[@]}" --baseline hf --out "$WORK/baseline.json" train.precision=bf16 "${CAPTION_SIZE[@]}" \
  "train.output_dir=$WORK/baseline"
judge baseline "$WORK/baseline.json"

# ------------------------------------------------------------------ one JSON, one screen
"$PYTHON" - "$WORK" "$MODE" "$NPROC" "$INSTALL_S" "$SECONDS" <<'EOF'
import json
import sys
from pathlib import Path

work, mode, nproc, install_s, total_s = sys.argv[1:]
order = ["caption", "parity", "tests", "train", "resume", "tp2", "pp2", "benchmark", "baseline"]
parts = {}
for name in order:
    path = Path(work) / "parts" / f"{name}.json"
    parts[name] = json.loads(path.read_text()) if path.exists() else {"status": "missing"}
result = {
    "mode": mode,
    "nproc": int(nproc),
    "install_s": int(install_s),
    "total_s": int(total_s),
    "passed": all(p["status"] in ("ok", "skipped") for p in parts.values()),
    "parts": parts,
}
(Path(work) / "validate.json").write_text(json.dumps(result, indent=1))
EOF
echo
echo "[validate] summary ($MODE, NPROC=$NPROC, installs ${INSTALL_S} s, total ${SECONDS} s; figures in $WORK/validate.json)"
printf '  %s\n' "${SUMMARY[@]}"
exit "$FAILED"
