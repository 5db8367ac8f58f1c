# shellcheck shell=bash
# What train.sbatch and benchmark.sbatch share: the per-node layout, the rendezvous, one
# torchrun per node through srun, and the pre-emption signal path. Sourced by them after
# they set REPO_DIR and their knobs; not a job script by itself.
#
# Why srun + torchrun (and not the `deepspeed` launcher): in SLURM mode DeepSpeed's launcher
# starts the remote ranks itself through pdsh or ssh (or needs its own srun/mpirun config),
# which compute nodes often do not allow. `srun --ntasks-per-node=1` starts exactly one
# torchrun per allocated node through slurmd (so SLURM tracks, signals and cleans up every
# process), and torchrun's c10d rendezvous needs only a host:port that all nodes reach.
# launch/train.py reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from torchrun and sets
# DeepSpeed up itself, so nothing is lost by not using the DeepSpeed launcher.
#
# Signals (verified on a local slurmctld/slurmd 22.05 by tests/test_slurm.py):
# - `#SBATCH --signal=B:USR1@120` sends USR1 to this batch shell only, 120 s before the time
#   limit. bash runs a trap only between commands, so srun runs in the background and the
#   shell sits in `wait`, which a trapped signal interrupts at once.
# - The trap forwards USR1 with `scancel --signal=USR1 $SLURM_JOB_ID`: every process of
#   every step on every node gets it (slurmd signals the whole step, not only the task),
#   so the training processes see it directly.
# - torchrun must not die of it: USR1's default action kills a process, torchrun does not
#   handle USR1, and slurmstepd tears the step down once its task (torchrun) exits, which
#   would cut the checkpoint write short. So torchrun starts with USR1/USR2 ignored
#   (launch/slurm/node.sh: `trap '' USR1 USR2` before exec; an ignored signal stays
#   ignored across exec); the trainer installs its own USR1 handler, saves at the next
#   step boundary and exits 0, and torchrun then exits 0 like after any normal run. Until
#   the trainer has installed its handler (imports, model build) USR1 is ignored there
#   too, so the batch shell sends it again every PREEMPT_RESEND_S seconds (default 30)
#   until the step ends.
# - Then, for USR1 (time limit), the shell requeues the job (`scontrol requeue`); the same
#   RUN_NAME means the same output directory, so the next start resumes from
#   checkpoints/latest (train.resume=auto). USR2 means "save and stop": no requeue.
# - A plain `scancel`/pre-emption sends SIGTERM to all processes: torchrun forwards it, the
#   trainer saves and exits, within SLURM's KillWait (torchrun waits
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before it kills the workers).
#
# Across nodes (verified by tests/test_slurm_multinode.py on two slurmd in network
# namespaces): torchrun numbers the nodes by their host names' order (c10d rendezvous), so
# global ranks are node-major with the node's local ranks contiguous, and megatron-core's
# tp-dp-pp order (TP fastest) keeps a TP group inside one node whenever TP divides the
# processes per node. When one node's processes die, srun reports that node's task first
# ("srun: error: node2: task 1: Killed") and --kill-on-bad-exit ends the others at once,
# which otherwise would wait in a collective until it times out; the step's end names
# that node (_blip2_report_failed_nodes).

BLIP2_LOG_PREFIX="[blip2-slurm]"

blip2_log() { echo "$BLIP2_LOG_PREFIX $(date '+%F %T') $*"; }

# Fails the job early with a clear message (rather than deep inside torchrun).
blip2_die() {
  echo "$BLIP2_LOG_PREFIX error: $*" >&2
  exit 2
}

# Resolves the layout and rendezvous from SLURM's environment and the knobs:
#   DEVICE (gpu|npu|cpu), GPUS_PER_NODE (gpu/npu), MASTER_PORT, SOCKET_IFNAME (optional)
# and exports NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS.
blip2_slurm_setup() {
  [[ -n ${SLURM_JOB_ID:-} ]] || blip2_die "not inside a SLURM job (submit with sbatch)"
  local user_hccl_if_ip=${HCCL_IF_IP:-}
  # shellcheck source=../common/device_env.sh
  source "$REPO_DIR/launch/common/device_env.sh"
  blip2_device_env "${DEVICE:?set DEVICE to gpu, npu or cpu}" || blip2_die "DEVICE=$DEVICE"

  # The network the nodes talk over, for all three collective libraries at once; each
  # library's own variable, when set, wins. Needed where a node's hostname resolves to an
  # address on another network than the one between the nodes (a management network, or
  # loopback in /etc/hosts), or where several networks connect the nodes.
  if [[ -n ${SOCKET_IFNAME:-} ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}
    export HCCL_SOCKET_IFNAME=${HCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
  fi
  # env_npu.sh has just set HCCL_IF_IP to an address of *this* host, but this shell runs on
  # the first node only and srun hands its environment to every node: unless the user chose
  # the address, each node looks up its own (launch/slurm/node.sh). HCCL_IF_IP would also
  # override HCCL_SOCKET_IFNAME, so it stays unset when an interface is named.
  if [[ $DEVICE == npu && -z $user_hccl_if_ip ]]; then
    unset HCCL_IF_IP
    [[ -n ${HCCL_SOCKET_IFNAME:-} ]] || export BLIP2_HCCL_IF_IP_PER_NODE=1
  fi

  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  if [[ $DEVICE == cpu ]]; then
    # CPU mode (tests, laptops): one process per SLURM task of the node.
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-$NNODES} / NNODES ))}}
  else
    # One process per accelerator: the knob, else what SLURM granted, else what the node has.
    local granted=${SLURM_GPUS_ON_NODE:-}
    [[ -n $granted ]] || granted=$(blip2_devices_per_node "$DEVICE")
    NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-$granted}}
  fi
  [[ $NPROC_PER_NODE =~ ^[0-9]+$ && $NPROC_PER_NODE -gt 0 ]] \
    || blip2_die "cannot tell how many processes per node to start (DEVICE=$DEVICE): set GPUS_PER_NODE"

  # Rendezvous on the first node of the allocation, on a port that follows from the job id:
  # every node can compute it without asking anyone, a requeued job (same id) gets the same
  # one, and two jobs sharing a node differ unless their ids are 15000 apart. 15000-29999
  # stays below Linux's default ephemeral range (32768-60999), so no outgoing connection
  # of another process can be holding it. MASTER_PORT overrides it.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [[ -n $MASTER_ADDR ]] || blip2_die "could not read the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
  export NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT

  # Threads per process: the node's CPUs shared by its processes (torchrun would pick 1).
  local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  BLIP2_CPUS_PER_NODE=$cpus
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$((cpus / NPROC_PER_NODE))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
  fi
  # How long torchrun lets the workers finish (save) after a SIGTERM before it kills them.
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
  export PYTHONUNBUFFERED=1

  blip2_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} node(s) (${SLURM_JOB_NODELIST}) x ${NPROC_PER_NODE} process(es), device ${DEVICE}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, ${OMP_NUM_THREADS} thread(s)/process${SOCKET_IFNAME:+, interface $SOCKET_IFNAME}"
}

BLIP2_PREEMPT_SIGNAL=""
BLIP2_SRUN_PID=""
BLIP2_RESEND_PID=""

# Trap body for USR1/USR2 reaching the batch shell: pass USR1 on to the training processes.
# A training process still starting up (before the trainer installs its handler) ignores
# USR1, as torchrun does, so the signal is sent again every PREEMPT_RESEND_S seconds until
# the step has exited; a trainer that is already saving just notes it again.
_blip2_on_preempt() {
  local sig=$1
  BLIP2_PREEMPT_SIGNAL=$sig
  if [[ -z $BLIP2_SRUN_PID ]]; then
    blip2_log "received SIG$sig before training started"
    return
  fi
  blip2_log "received SIG$sig: asking the training processes to save a checkpoint and exit"
  _blip2_signal_step
  if [[ -z $BLIP2_RESEND_PID ]]; then
    (
      while sleep "${PREEMPT_RESEND_S:-30}" && kill -0 "$BLIP2_SRUN_PID" 2>/dev/null; do
        _blip2_signal_step
      done
    ) &
    BLIP2_RESEND_PID=$!
  fi
}

_blip2_signal_step() {
  # Without --batch/--full, scancel signals every step of the job but not this shell.
  scancel --signal=USR1 "$SLURM_JOB_ID" \
    || { blip2_log "scancel failed; signalling srun instead"; kill -USR1 "$BLIP2_SRUN_PID"; }
}

_blip2_on_term() {
  BLIP2_PREEMPT_SIGNAL=TERM
  blip2_log "received SIGTERM (cancel or pre-emption): waiting for the training processes to save and exit"
}

# blip2_slurm_run ENTRY [ARGS...]: one torchrun per node running ENTRY (a path absolute or
# relative to REPO_DIR) with ARGS, in the background, with the signal path above. Returns
# the step's exit code.
blip2_slurm_run() {
  local entry=$1
  shift
  [[ $entry == /* ]] || entry=$REPO_DIR/$entry
  trap '_blip2_on_preempt USR1' USR1
  trap '_blip2_on_preempt USR2' USR2
  trap '_blip2_on_term' TERM
  if [[ -n $BLIP2_PREEMPT_SIGNAL ]]; then
    return 0 # signalled during set-up: nothing ran, nothing to save
  fi

  local cmd=(
    "${PYTHON:-python3}" -m torch.distributed.run
    --nnodes="$NNODES"
    --nproc_per_node="$NPROC_PER_NODE"
    --rdzv_backend=c10d
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
    --rdzv_id="blip2-$SLURM_JOB_ID"
    --max_restarts=0
    "$entry" "$@"
  )
  blip2_log "launching: ${cmd[*]}"

  # srun's own messages name the node of every task that failed ("srun: error: node2:
  # task 1: Killed"), in the order they happened. A copy of srun's stderr (the tasks'
  # stderr passes through it too) lets the end of this function say which node was lost,
  # while the job log still gets every line as it comes. tee ignores TERM and INT: a plain
  # scancel sends SIGTERM to every process of the batch step, and srun must keep its
  # stderr while the trainers save.
  local step_tmp
  step_tmp=$(mktemp -d "${TMPDIR:-/tmp}/blip2-step-XXXXXX") || blip2_die "mktemp failed"
  mkfifo "$step_tmp/stderr" || blip2_die "mkfifo $step_tmp/stderr failed"
  (
    trap '' TERM INT
    exec tee -a "$step_tmp/srun.err" <"$step_tmp/stderr" >&2
  ) &
  local tee_pid=$!

  # --cpus-per-task: the one task per node gets all of the node's CPUs (a step would
  # otherwise get one CPU and, with CPU binding, pin every rank of the node to it).
  # --kill-on-bad-exit: a node that fails ends the others instead of leaving them hung in
  # a collective until it times out.
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
    --cpus-per-task="$BLIP2_CPUS_PER_NODE" --kill-on-bad-exit=1 \
    bash "$REPO_DIR/launch/slurm/node.sh" "${cmd[@]}" 2>"$step_tmp/stderr" &
  BLIP2_SRUN_PID=$!

  # `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting
  # until srun itself has exited, then until tee has passed on srun's last lines.
  local rc
  while true; do
    wait "$BLIP2_SRUN_PID"
    rc=$?
    kill -0 "$BLIP2_SRUN_PID" 2>/dev/null || break
  done
  BLIP2_SRUN_PID=""
  while kill -0 "$tee_pid" 2>/dev/null; do
    wait "$tee_pid"
  done
  if [[ -n $BLIP2_RESEND_PID ]]; then
    kill "$BLIP2_RESEND_PID" 2>/dev/null
    BLIP2_RESEND_PID=""
  fi
  blip2_log "training step exited with code $rc${BLIP2_PREEMPT_SIGNAL:+ after SIG$BLIP2_PREEMPT_SIGNAL}"
  # After a SIGTERM (scancel, pre-emption) every node exits non-zero by design: no culprit.
  if ((rc != 0)) && [[ $BLIP2_PREEMPT_SIGNAL != TERM ]]; then
    _blip2_report_failed_nodes "$step_tmp/srun.err"
  fi
  rm -rf "$step_tmp"
  return "$rc"
}

# Names the node that failed first, from srun's messages in the step's stderr ($1):
#   srun: error: node2: task 1: Killed
#   srun: error: node1: tasks 0-1: Exited with exit code 1
#   srun: error: Node failure on node2
# A node failure (SLURM lost contact with the node's slurmd) names the lost node whenever
# it came; otherwise the first message is where the step broke, and the ones after it were
# ended by srun --kill-on-bad-exit or failed in a collective with it. A task ended by a
# signal means the node's processes were lost (killed, out of memory); an exit code means
# they stopped on an error of their own, whose traceback is in the output above.
_blip2_report_failed_nodes() {
  local failures
  failures=$(sed -nE \
    -e 's/^srun: error: Node failure on ([^ ]+).*/\1|node failure/p' \
    -e 's/^srun: error: ([^ :]+): (tasks? [0-9,-]+: .*)$/\1|\2/p' "$1" 2>/dev/null)
  if [[ -z $failures ]]; then
    blip2_log "the step failed without an srun message naming a node (nodes: $SLURM_JOB_NODELIST); see the output above"
    return
  fi
  local first
  first=$(grep -m 1 '|node failure$' <<<"$failures") || first=${failures%%$'\n'*}
  local node=${first%%|*} reason=${first#*|}
  local others
  others=$(grep -vxF "$first" <<<"$failures" | sed -E 's/\|/: /' | paste -sd ';' - | sed 's/;/; /g')
  local what="lost node $node ($reason)"
  [[ $reason == *"Exited with exit code"* ]] && what="node $node failed first ($reason)"
  blip2_log "$what; srun ended the step on every node${others:+ (also: $others)}"
}

# After a USR1 (time limit) that training answered by saving and exiting 0: requeue, so the
# job starts again and resumes from the checkpoint. Ends the script when it requeues.
blip2_requeue_if_preempted() {
  local rc=$1
  [[ $BLIP2_PREEMPT_SIGNAL == USR1 ]] || return 0
  if [[ ${REQUEUE_ON_PREEMPT:-1} != 1 ]]; then
    blip2_log "REQUEUE_ON_PREEMPT=${REQUEUE_ON_PREEMPT:-}: not requeueing; resubmit with the same RUN_NAME to resume"
    return 0
  fi
  if [[ $rc != 0 ]]; then
    blip2_log "not requeueing: training exited with code $rc"
    return 0
  fi
  blip2_log "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint of the same run"
  # scontrol requeue ends this script at once (the job goes back to PENDING), so it comes last.
  scontrol requeue "$SLURM_JOB_ID" || blip2_log "scontrol requeue failed (submitted with --no-requeue?); resubmit to resume"
}
