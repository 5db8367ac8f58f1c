#!/bin/bash
# The seed-1 runs (BLIP-2 OPT-2.7B COCO caption fine-tuning; 8 devices, batch 16/device,
# 5 epochs) on one node, for any device, in Ascend ModelZoo form. The per-device scripts
# (launch/ascend/train_*_8p.sh, launch/gpu/train_*_8p.sh) are thin wrappers around this.
#
#   run_seed_job.sh --device=npu|gpu|cpu --mode=full|performance [options] [key=value ...]
#
#   --mode=full          train --epochs, then the caption evaluation (BLEU@4, CIDEr) the job runs
#                        at its end; resumes an interrupted run in the same output dir
#   --mode=performance   --steps steps (default 1000), no evaluation, FPS after --warmup steps
#   --data_path=DIR      COCO root: annotations/coco_karpathy_{train,val,test}.json,
#                        annotations/coco_karpathy_{val,test}_gt.json and images/
#   --ckpt_path=DIR      pretrained weights: blip2_pretrained_opt2.7b.pth, opt-2.7b/, bert-base-uncased/
#   --nproc=N            processes = devices on this node (default: 8 for npu/gpu, 2 for cpu)
#   --config=JOB         job YAML or shipped job (default caption_coco_opt2.7b)
#   --ds_config=FILE     DeepSpeed config (default ds_configs/zero2.json)
#   --batch_size=N       per device (default 16)
#   --epochs=N           full mode (default 5)
#   --steps=N --warmup=N performance mode (defaults 1000 and 50)
#   --output_dir=DIR     run directory (default runs/seed_<device>_<mode>_<N>p; performance runs
#                        get a time stamp so earlier measurements are kept)
#   --network=NAME       name used in the result file names (default BLIP2_OPT2.7B_caption)
#   key=value ...        job overrides passed to launch/train.py (e.g. model.llm.tp=2)
#
# Prints the ModelZoo final lines ("Final Performance images/sec", "E2E Training Duration
# sec", "Final Train Accuracy ...") and writes <output_dir>/<network>_bs<B>_<N>p_{acc,perf}.log
# plus one row of the seed table (launch/compare_runs.py). Options take --key=value or
# --key value; a later option overrides an earlier one (the wrappers rely on that).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

device="" mode="" data_path="" ckpt_path="" nproc="" config="caption_coco_opt2.7b"
ds_config="ds_configs/zero2.json" batch_size=16 epochs=5 steps=1000 warmup=50 output_dir=""
network="BLIP2_OPT2.7B_caption"
overrides=()
while (($#)); do
  arg=$1
  shift
  case $arg in
    -h | --help) usage; exit 0 ;;
    --) overrides+=("$@"); break ;;
    --*=*) key=${arg%%=*} value=${arg#*=} ;;
    --*)
      key=$arg
      (($#)) || { echo "run_seed_job: $arg needs a value" >&2; exit 2; }
      value=$1
      shift
      ;;
    *=*) overrides+=("$arg"); continue ;;
    *) echo "run_seed_job: unexpected argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
  case ${key#--} in
    device) device=$value ;;
    mode) mode=$value ;;
    data_path) data_path=$value ;;
    ckpt_path) ckpt_path=$value ;;
    nproc) nproc=$value ;;
    config) config=$value ;;
    ds_config) ds_config=$value ;;
    batch_size) batch_size=$value ;;
    epochs) epochs=$value ;;
    steps) steps=$value ;;
    warmup) warmup=$value ;;
    output_dir) output_dir=$value ;;
    network) network=$value ;;
    *) echo "run_seed_job: unknown option $key (see --help)" >&2; exit 2 ;;
  esac
done

[[ $device =~ ^(npu|gpu|cpu)$ ]] || { echo "run_seed_job: --device must be npu, gpu or cpu (got '$device')" >&2; exit 2; }
[[ $mode =~ ^(full|performance)$ ]] || { echo "run_seed_job: --mode must be full or performance (got '$mode')" >&2; exit 2; }

# shellcheck source=device_env.sh
source "$SCRIPT_DIR/device_env.sh"
blip2_device_env "$device"
if [[ -z $nproc ]]; then
  if [[ $device == cpu ]]; then nproc=2; else nproc=8; fi
fi
if [[ $device != cpu ]]; then
  have=$(blip2_devices_per_node "$device")
  if ((have > 0 && have < nproc)); then
    echo "run_seed_job: --nproc=$nproc but this node shows $have $device device(s)" >&2
    exit 2
  fi
else
  # CPU ranks share the cores; torchrun would otherwise give each rank one thread.
  threads=$(($(nproc) / nproc))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
fi
export RANK_SIZE=$nproc # the name ModelZoo scripts and logs use for the device count

case $mode in
  full) tag=acc ;;
  performance) tag=perf ;;
esac
if [[ -z $output_dir ]]; then
  output_dir=$REPO_DIR/runs/seed_${device}_${mode}_${nproc}p
  [[ $mode == performance ]] && output_dir+=_$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$output_dir"
output_dir=$(cd "$output_dir" && pwd)

# Paths are taken relative to where the script was called; the DeepSpeed config (and a job
# YAML) may also be given relative to the repository (ds_configs/zero2.json).
absolute() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }
for var in ds_config config; do
  if [[ -f ${!var} ]]; then
    printf -v "$var" '%s' "$(absolute "${!var}")"
  elif [[ -f $REPO_DIR/${!var} ]]; then
    printf -v "$var" '%s' "$REPO_DIR/${!var}"
  fi
done
[[ -n $data_path ]] && data_path=$(absolute "$data_path")
[[ -n $ckpt_path ]] && ckpt_path=$(absolute "$ckpt_path")

job_args=(--ds_config "$ds_config" --config "$config" "train.output_dir=$output_dir" "data.batch_size=$batch_size")
if [[ -n $data_path ]]; then
  ann=$data_path/annotations
  job_args+=(
    "data.train_annotation=$ann/coco_karpathy_train.json"
    "data.val_annotation=$ann/coco_karpathy_val.json"
    "data.test_annotation=$ann/coco_karpathy_test.json"
    "data.val_gt=$ann/coco_karpathy_val_gt.json"
    "data.test_gt=$ann/coco_karpathy_test_gt.json"
    "data.image_root=$data_path/images"
  )
fi
if [[ -n $ckpt_path ]]; then
  job_args+=(
    "model.init_checkpoint=$ckpt_path/blip2_pretrained_opt2.7b.pth"
    "model.llm.weights=$ckpt_path/opt-2.7b"
    "model.qformer.tokenizer=$ckpt_path/bert-base-uncased"
  )
fi
if [[ $mode == full ]]; then
  # An interrupted accuracy run picks up where it stopped (train.resume=auto).
  job_args+=("train.epochs=$epochs" "train.max_steps=0" "eval.enabled=true" "train.resume=auto")
else
  # A measurement: fresh start, no evaluation, no intermediate checkpoints.
  job_args+=("train.max_steps=$steps" "train.warmup_log_steps=$warmup" "eval.enabled=false"
    "train.resume=none" "train.save_interval=0")
fi
job_args+=("${overrides[@]}")

train_log=$output_dir/train_${tag}.log
echo "run_seed_job: $mode run on $nproc x $device -> $output_dir (log $train_log)"
start=$(date +%s)
set +e
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" \
  "$REPO_DIR/launch/train.py" "${job_args[@]}" 2>&1 | tee -a "$train_log"
rc=${PIPESTATUS[0]}
set -e
e2e=$(($(date +%s) - start))
if ((rc != 0)); then
  echo "run_seed_job: training failed with exit code $rc; see $train_log" >&2
  exit "$rc"
fi

# Figures from the run's summary.json and log.jsonl ("n/a" where a figure is missing).
read_figures() {
  "$PYTHON" - "$output_dir" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
loss = None
if (run / "log.jsonl").is_file():
    for line in (run / "log.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            loss = record["loss"]


def fmt(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


print(fmt(summary.get("fps_mean"), 2), fmt(summary.get("total_time_s"), 1), fmt(loss, 4),
      fmt(summary.get("Bleu_4"), 4), fmt(summary.get("CIDEr"), 4))
EOF
}
read -r fps train_time loss bleu4 cider < <(read_figures)

result_file=$output_dir/${network}_bs${batch_size}_${nproc}p_${tag}.log
{
  echo "Network = $network"
  echo "RankSize = $nproc"
  echo "BatchSize = $batch_size"
  echo "DeviceType = $device"
  echo "CaseName = ${network}_bs${batch_size}_${nproc}p_${tag}"
  echo "ActualFPS = $fps"
  echo "TrainingTime = $train_time"
  echo "ActualLoss = $loss"
  echo "E2ETrainingTime = $e2e"
  if [[ $mode == full ]]; then
    echo "TrainAccuracy = $bleu4"
    echo "BLEU4 = $bleu4"
    echo "CIDEr = $cider"
  fi
} >"$result_file"

echo "------------------ Final result ------------------"
echo "Final Performance images/sec : $fps"
echo "E2E Training Duration sec : $e2e"
if [[ $mode == full ]]; then
  echo "Final Train Accuracy (BLEU@4) : $bleu4"
  echo "Final Train Accuracy (CIDEr) : $cider"
  [[ $bleu4 == n/a ]] && echo "(no caption metrics in summary.json: evaluate with launch/evaluate.py --checkpoint $output_dir)"
fi
echo "Final Train Loss : $loss"
echo "Result file : $result_file"
echo
"$PYTHON" "$REPO_DIR/launch/compare_runs.py" "$output_dir" --labels "$nproc x $device ($mode)"
