# shellcheck shell=bash
# The Ascend (910B) environment for blip2-megatron, in one place. Source it before a launch:
#
#   source launch/ascend/env_npu.sh
#
# launch/common/device_env.sh sources it for `--device npu` and for DEVICE=npu under SLURM.
# Every setting is a default: export a variable before sourcing to override it.
# NOTE: written from the torch_npu / CANN documentation; no NPU run has been verified
# from this repository (see docs/launching.md).

# --- CANN toolkit: compilers, runtime libraries, the ACL/HCCL shared objects -------------
# The install path is recorded in /etc/Ascend/ascend_cann_install.info on installs that
# do not use the default /usr/local/Ascend.
_cann_root=/usr/local/Ascend
if [[ -f /etc/Ascend/ascend_cann_install.info ]]; then
  _cann_root=$(sed -n 's/^Install_Path=//p' /etc/Ascend/ascend_cann_install.info | head -n 1)
  _cann_root=${_cann_root:-/usr/local/Ascend}
fi
# CANN's set_env.sh reads unset variables (LD_LIBRARY_PATH, PYTHONPATH): relax `set -u`
# for it when the caller runs with it, and restore the caller's setting afterwards.
_had_nounset=0
[[ $- == *u* ]] && _had_nounset=1 && set +u
if [[ -f $_cann_root/ascend-toolkit/set_env.sh ]]; then
  source "$_cann_root/ascend-toolkit/set_env.sh"
elif [[ -f $_cann_root/nnae/set_env.sh ]]; then
  source "$_cann_root/nnae/set_env.sh"   # runtime-only installs ship nnae instead of the toolkit
else
  echo "env_npu: no CANN set_env.sh under $_cann_root (ascend-toolkit or nnae); torch_npu will not find the NPU runtime" >&2
fi
((_had_nounset)) && set -u
unset _cann_root _had_nounset

# --- Which chips this node's processes may use --------------------------------------------
# The NPU counterpart of CUDA_VISIBLE_DEVICES. Left as the caller set it (a scheduler with
# NPU gres sets it per job); unset = every chip of the node (8 on an Atlas 800T A2).
# Example for half a node:  export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3
if [[ -n ${ASCEND_RT_VISIBLE_DEVICES:-} ]]; then
  export ASCEND_RT_VISIBLE_DEVICES
fi

# --- HCCL (the collective library; "nccl" of Ascend) ----------------------------------------
# Seconds to establish links between ranks at start-up. The default (120 s) is too short when
# ranks start unevenly: the first run compiles operators and builds dataset indexes.
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
# Seconds a rank may wait inside one collective. Rank 0 writing a checkpoint or running the
# caption evaluation keeps the others waiting in the next collective, so allow for that.
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
# 1 = no IP whitelist check between hosts (the whitelist is for locked-down clusters).
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
# The host IP HCCL uses for its host-side connection set-up. The first address of
# `hostname -I` is right on most hosts; set it when the node has several networks.
if [[ -z ${HCCL_IF_IP:-} ]]; then
  HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}') || true
fi
[[ -n ${HCCL_IF_IP:-} ]] && export HCCL_IF_IP

# --- torch_npu execution --------------------------------------------------------------------
# Operator dispatch through a task queue: 1 = level-1, 2 = level-2 pipelining (less host
# overhead; slightly higher peak memory). 0 turns it off (debugging).
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
# Combined-operator optimisation for sequences on non-contiguous tensors (view + copy patterns).
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
# Bind each rank's threads to the CPU cores of its NPU's NUMA node: 1 = coarse (cores split
# evenly per chip), 2 = fine (dispatch threads on dedicated cores, data loaders on the rest).
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
# Caching allocator: expandable segments cut fragmentation with variable-length text batches
# and the 364 px ViT activations of caption fine-tuning.
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
# 1 would run every operator synchronously (and disable the task queue): debugging only.
export ASCEND_LAUNCH_BLOCKING=${ASCEND_LAUNCH_BLOCKING:-0}

# --- Logging ------------------------------------------------------------------------------
# CANN log level: 0 debug, 1 info, 2 warning, 3 error. Lower levels slow training noticeably.
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
# 0 = CANN logs go to files under ~/ascend/log, not the job's stdout.
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
# 0 = no event logs (they are for profiling sessions).
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}

# --- DeepSpeed ------------------------------------------------------------------------------
# DeepSpeed would find the NPU by importing torch_npu anyway; naming it removes the guess.
export DS_ACCELERATOR=${DS_ACCELERATOR:-npu}
