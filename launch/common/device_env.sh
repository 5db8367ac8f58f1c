# shellcheck shell=bash
# Device set-up shared by the SLURM templates (launch/slurm/) and the seed-job runner
# (launch/common/run_seed_job.sh). Source it, then call:
#
#   blip2_device_env DEVICE       # DEVICE = gpu | npu | cpu: exports what the trainer needs
#   blip2_devices_per_node DEVICE # prints how many accelerators this node has (cpu: 0)
#
# The trainer itself picks the device through DeepSpeed's get_accelerator()
# (blip2_megatron/accelerator.py); this file only prepares the environment it reads:
#   gpu -> nothing to force (DeepSpeed finds CUDA; NCCL backend)
#   npu -> the CANN / HCCL / torch_npu environment of launch/ascend/env_npu.sh (HCCL backend)
#   cpu -> DS_ACCELERATOR=cpu, so DeepSpeed neither probes for devices nor picks a GPU (gloo)

BLIP2_COMMON_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BLIP2_REPO_DIR=$(cd "$BLIP2_COMMON_DIR/../.." && pwd)

blip2_device_env() {
  local device=$1
  case $device in
    gpu)
      # A stale DS_ACCELERATOR=cpu from a test shell would silently train on CPU.
      if [[ ${DS_ACCELERATOR:-} == cpu ]]; then
        echo "device_env: DS_ACCELERATOR=cpu is set but --device gpu was asked for; unsetting it" >&2
        unset DS_ACCELERATOR
      fi
      ;;
    npu)
      # shellcheck source=../ascend/env_npu.sh
      source "$BLIP2_REPO_DIR/launch/ascend/env_npu.sh"
      ;;
    cpu)
      export DS_ACCELERATOR=cpu
      ;;
    *)
      echo "device_env: unknown device '$device' (expected gpu, npu or cpu)" >&2
      return 2
      ;;
  esac
  export BLIP2_DEVICE=$device
}

blip2_devices_per_node() {
  local device=$1 n=0
  case $device in
    gpu)
      if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
      fi
      # CUDA_VISIBLE_DEVICES narrows what this job may use.
      if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
      fi
      ;;
    npu)
      if [[ -n ${ASCEND_RT_VISIBLE_DEVICES:-} ]]; then
        n=$(awk -F, '{print NF}' <<<"$ASCEND_RT_VISIBLE_DEVICES")
      elif command -v npu-smi >/dev/null 2>&1; then
        # One "NPU ID" row per chip in `npu-smi info -l`.
        n=$(npu-smi info -l 2>/dev/null | grep -c 'NPU ID')
      fi
      ;;
  esac
  echo "$n"
}
