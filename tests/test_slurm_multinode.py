"""launch/slurm/*.sbatch across two SLURM nodes, on one machine.

The cluster (tests/slurm/local_cluster.py, ``nodes=2``) runs one slurmd per node, each in
its own network namespace with its own address, host name and /etc/hosts, joined by a
private bridge: a job's processes on node2 reach node1 only over that bridge, by name.
Each node's /etc/hosts is Debian's: the node's own name on loopback (127.0.1.1), so gloo
left to itself would bind where no other node reaches it; jobs start without SOCKET_IFNAME
all the same (0.), because the trainer binds gloo to the interface that routes to the
rendezvous host.
Every job is ``sbatch --nodes=2 --ntasks-per-node=1`` with two gloo ranks per node
(NPROC_PER_NODE=2, world 4) at TP=2 x DP=2, the tiny job:

0. start-up where host names resolve to loopback: two steps without SOCKET_IFNAME, each
   rank's gloo bound to eth0, node1 (the rendezvous host) included;
1. layout and parity: the tiny job trains on two nodes, started through a probe
   (tests/slurm/layout_probe.py) that records each rank's node and process groups before
   handing over to launch/train.py in the same processes: each TP group sits inside one
   node and each DP group spans both, and the per-step losses equal a one-node run of the
   same layout (world 4 on node1);
2. faults: USR1 pre-emption saves one checkpoint (written by all ranks), requeues, and the
   requeued job resumes from it; then node2's training processes are killed (SIGKILL):
   the whole job ends within the collective timeout, its log names node2, and a
   resubmission resumes from the last complete checkpoint;
3. benchmark.sbatch on two nodes reports the FPS of the whole job.

Skips, with the reason, where the cluster cannot start (not root, SLURM or munge missing,
no network namespaces); fails instead where BLIP2_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from jobs import (  # noqa: E402
    BENCH_SBATCH,
    assert_completed,
    job_output,
    latest_step,
    start_cluster,
    step_records,
    submit,
    wait_for_steps,
    wait_requeued,
)
from local_cluster import LocalSlurmCluster  # noqa: E402
from netns import NODE_IFNAME, OWN_NAME_ADDRESS  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("node1", "node2")
TP = 2
COLLECTIVE_TIMEOUT_S = 60
# Four ranks share 2 CPU cores: the tiny job, small batches, no loader workers.
TINY = [
    f"model.llm.tp={TP}",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.log_interval=1",
    "eval.enabled=false",
    f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
]
LOSS_RTOL = 1e-5
#: Records each rank's node and process groups, then trains (tests/slurm/layout_probe.py).
PROBE_ENTRY = "tests/slurm/layout_probe.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = start_cluster(tmp_path_factory.mktemp("slurm-2node"), nodes=len(NODES))
    try:
        yield local
    finally:
        local.stop()


def _submit(
    cluster: LocalSlurmCluster,
    out_dir: Path,
    run_name: str,
    overrides: list[str],
    nodes: int = 2,
    procs_per_node: int = 2,
    **knobs: str,
) -> int:
    """One SLURM task (one torchrun) per node, ``procs_per_node`` ranks in each."""
    return submit(
        cluster,
        out_dir,
        run_name,
        [*TINY, *overrides],
        nodes=nodes,
        tasks_per_node=1,
        cpus_per_task=cluster.cpus,
        NPROC_PER_NODE=str(procs_per_node),
        OMP_NUM_THREADS="1",
        **knobs,
    )


def _wait_completed(cluster, out_dir: Path, run_name: str, job: int, timeout: float = 240) -> str:
    return assert_completed(cluster, cluster.wait_job(job, timeout=timeout), out_dir, run_name, job)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in step_records(run_dir)]


def _layout(run_dir: Path) -> dict[int, dict]:
    """{rank: record} from tests/slurm/layout_probe.py, checked for the things every run shares."""
    records = json.loads((run_dir / "layout.json").read_text())
    assert [r["rank"] for r in records] == [0, 1, 2, 3] and all(r["world_size"] == 4 for r in records), (
        records
    )
    for r in records:
        # The host name is the namespace's own, so the rank really runs on the node SLURM says.
        assert r["hostname"] == r["slurm_node"], r
    assert {tuple(r["tp"]) for r in records} == {(0, 1), (2, 3)}, records
    assert {tuple(r["dp"]) for r in records} == {(0, 2), (1, 3)}, records
    return {r["rank"]: r for r in records}


def _resolve_on(cluster: LocalSlurmCluster, node: str, name: str) -> str:
    """The address ``name`` resolves to on ``node``."""
    cmd = [sys.executable, "-c", f"import socket; print(socket.gethostbyname({name!r}))"]
    res = subprocess.run(cluster.network.node_command(node, cmd), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_two_nodes_start_where_host_names_resolve_to_loopback(cluster, tmp_path):
    # The trap: on each node, its own name is loopback; the other node's name is its address.
    network = cluster.network
    for node, other in (NODES, NODES[::-1]):
        assert _resolve_on(cluster, node, node) == OWN_NAME_ADDRESS
        assert _resolve_on(cluster, node, other) == network.addresses[other]

    # No SOCKET_IFNAME (nor GLOO_SOCKET_IFNAME: the cluster's environment drops this machine's).
    run_dir = tmp_path / "runs" / "own-name-loopback"
    job = _submit(cluster, tmp_path, "own-name-loopback", ["train.max_steps=2"], TRAIN_ENTRY=PROBE_ENTRY)
    log = _wait_completed(cluster, tmp_path, "own-name-loopback", job)
    assert "/process, interface" not in log, "SOCKET_IFNAME reached the job"  # common.sh names it there
    layout = _layout(run_dir)
    for rank, r in layout.items():  # gloo bound to the interface between the nodes on every rank
        assert r["gloo_ifname"] == NODE_IFNAME and r["host_group"] == [0, 1, 2, 3], (rank, r)
        assert r["gloo_choice"].startswith(
            f"gloo (host-side collectives) binds to interface {NODE_IFNAME}: "
        ), r
        # node1 holds the rendezvous: it routes to its own name over loopback, and must not bind there.
        assert ("resolves to loopback" in r["gloo_choice"]) == (r["slurm_node"] == "node1"), r
    assert [r["step"] for r in step_records(run_dir)] == [1, 2]


def test_two_node_layout_and_loss_parity(cluster, tmp_path):
    t0 = time.monotonic()
    network = cluster.network
    for node in NODES:
        assert "default" not in network.routes(node), f"{node} has a route out: {network.routes(node)}"

    # 1. The tiny job on two nodes, through the layout probe (which then runs the trainer in
    #    the same processes). SOCKET_IFNAME names the interface between the nodes, as on a
    #    cluster whose host names resolve to another network.
    sent_before = network.tx_bytes("node2")
    job = _submit(
        cluster,
        tmp_path,
        "two-node",
        ["train.max_steps=3"],
        TRAIN_ENTRY=PROBE_ENTRY,
        SOCKET_IFNAME=NODE_IFNAME,
    )
    log = _wait_completed(cluster, tmp_path, "two-node", job)
    sent = network.tx_bytes("node2") - sent_before
    assert "2 node(s) (node[1-2]) x 2 process(es)" in log and f"interface {NODE_IFNAME}" in log, log[-4000:]
    for node in NODES:
        assert f"node {node} (host {node}, " in log, log[-4000:]
    layout = _layout(tmp_path / "runs" / "two-node")
    node_of = {rank: r["slurm_node"] for rank, r in layout.items()}
    # torchrun numbers the nodes in host-name order, each node's ranks contiguous.
    assert node_of == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}, layout
    for rank, r in layout.items():
        assert len({node_of[m] for m in r["tp"]}) == 1, f"rank {rank}: TP group spans nodes: {layout}"
        assert {node_of[m] for m in r["dp"]} == set(NODES), f"rank {rank}: DP group within one node: {layout}"
    summary = json.loads((tmp_path / "runs" / "two-node" / "summary.json").read_text())
    assert (summary["world_size"], summary["tp"], summary["dp"]) == (4, TP, 2), summary
    two_node = _losses(tmp_path / "runs" / "two-node")
    # Gradients and activations cross the bridge every step (about 3 MB per step here).
    assert sent > 1_000_000, f"node2 sent only {sent} bytes over the bridge"
    print(
        f"two-node run done at {time.monotonic() - t0:.0f}s; node2 sent {sent / 1e6:.1f} MB over the bridge; "
        f"layout {[(rank, r['slurm_node'], r['tp'], r['dp']) for rank, r in layout.items()]}"
    )

    # 2. The same layout on one node (world 4 on node1): the same losses, step by step.
    job = _submit(
        cluster,
        tmp_path,
        "one-node",
        ["train.max_steps=3"],
        nodes=1,
        procs_per_node=4,
        TRAIN_ENTRY=PROBE_ENTRY,
    )
    log = _wait_completed(cluster, tmp_path, "one-node", job)
    assert "1 node(s) (node1) x 4 process(es)" in log, log[-4000:]
    assert {r["slurm_node"] for r in _layout(tmp_path / "runs" / "one-node").values()} == {"node1"}
    one_node = _losses(tmp_path / "runs" / "one-node")
    assert [s for s, _ in two_node] == [s for s, _ in one_node] == [1, 2, 3], (two_node, one_node)
    for (step, two), (_, one) in zip(two_node, one_node):
        assert two == pytest.approx(one, rel=LOSS_RTOL), f"step {step}: 2 nodes {two!r} vs 1 node {one!r}"
    worst = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(two_node, one_node))
    print(
        f"one-node run done at {time.monotonic() - t0:.0f}s; losses 2 nodes {[loss for _, loss in two_node]} "
        f"vs 1 node {[loss for _, loss in one_node]}: max relative difference {worst:.2e}"
    )


def _training_processes(cluster, node: str) -> dict[int, str]:
    """torchrun and the trainers running in ``node``'s namespace: {pid: command line}."""
    found = {}
    for pid in cluster.network.pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "torch.distributed.run" in cmdline or "launch/train.py" in cmdline:
            found[pid] = cmdline
    return found


def _kill_training_on(cluster, node: str) -> dict[int, str]:
    """SIGKILL torchrun and the trainers on ``node`` (slurmd and slurmstepd live on), as when
    the node's processes are lost: no handler runs, no message comes from them."""
    victims = _training_processes(cluster, node)
    for pid in victims:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return victims


def test_two_node_preemption_requeue_and_lost_node(cluster, tmp_path):
    t0 = time.monotonic()
    name = "faults"
    run_dir = tmp_path / "runs" / name
    ckpt_root = run_dir / "checkpoints"

    # 1. Time-limit pre-emption of a running 2-node job: one checkpoint, by all ranks, then requeue.
    job = _submit(cluster, tmp_path, name, ["train.max_steps=2000", "train.save_interval=0"])
    wait_for_steps(cluster, job, run_dir, 1, tmp_path, name)
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    info = wait_requeued(cluster, job, tmp_path, name)
    log = job_output(tmp_path, name, job)
    assert int(info.get("Restarts", "0")) == 1 and info.get("JobState") == "PENDING", f"{info}\n{log[-6000:]}"
    assert "training step exited with code 0 after SIGUSR1" in log and "requeueing job" in log, log[-6000:]
    for rank in range(4):  # the signal reached every rank on both nodes
        assert f"[rank{rank}] WARNING blip2_megatron.training.trainer: received SIGUSR1" in log, log[-6000:]
    saved = latest_step(run_dir)
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir())
    assert tags == [f"step_{saved:08d}"], f"expected one checkpoint, found {tags}"
    assert log.count("saved checkpoint") == 1, log[-6000:]
    files = {p.name for p in (ckpt_root / tags[0]).iterdir()}
    expected = {f"rng_rank{r}.pt" for r in range(4)}
    expected |= {f"mp_rank_{t:02d}_model_states.pt" for t in range(TP)}
    expected |= {f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(2) for t in range(TP)}
    assert expected <= files, f"checkpoint lacks {sorted(expected - files)}: {sorted(files)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGUSR1" and summary["steps"] == saved, summary
    print(f"pre-empted at step {saved}, requeued, at {time.monotonic() - t0:.0f}s")

    # 2. The requeued job (same id) resumes from that checkpoint. SLURM holds a requeued job
    #    for about two minutes; let it start now. Not within the second of the requeue: slurmd
    #    refuses a launch whose credential is as old as the job's revocation, in whole seconds
    #    ("Job credential revoked"), which is what that hold is for.
    records_before = len(step_records(run_dir))
    time.sleep(2)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    resumed = wait_for_steps(cluster, job, run_dir, records_before + 1, tmp_path, name)[records_before:]
    assert resumed[0]["step"] == saved + 1, resumed
    log = job_output(tmp_path, name, job)
    assert re.search(rf"resumed from \S+ at step {saved}\b", log), log[-6000:]
    first_resumed_loss = resumed[0]["loss"]

    # 3. node2's training processes die: the job ends on both nodes, well within the
    #    collective timeout, and says which node was lost.
    killed = _kill_training_on(cluster, "node2")
    killed_at = time.monotonic()
    assert killed, f"no training process found on node2: {cluster.network.pids('node2')}"
    info = cluster.wait_job(job, timeout=COLLECTIVE_TIMEOUT_S + 60)
    ended_after = time.monotonic() - killed_at
    log = job_output(tmp_path, name, job)
    assert info.get("JobState") == "FAILED", f"{info}\n{log[-6000:]}"
    assert ended_after < COLLECTIVE_TIMEOUT_S, f"job ended {ended_after:.0f}s after the kill\n{log[-6000:]}"
    lost = re.search(r"\[blip2-slurm\] \S+ \S+ lost node (\S+) \(", log)
    assert lost and lost.group(1) == "node2", log[-6000:]
    assert f"resume from checkpoint step_{saved:08d}" in log, log[-6000:]
    for node in NODES:  # nothing of the job survives on either node
        assert not _training_processes(cluster, node), f"training processes left on {node}"
    assert latest_step(run_dir) == saved
    print(
        f"node2 killed ({len(killed)} processes); job ended {ended_after:.1f}s later, at {time.monotonic() - t0:.0f}s"
    )

    # 4. A resubmission under the same run name resumes from the last complete checkpoint;
    #    its first step sees the same weights and batch as the killed job's first step.
    records_before = len(step_records(run_dir))
    job = _submit(cluster, tmp_path, name, [f"train.max_steps={saved + 2}", "train.save_interval=0"])
    log = _wait_completed(cluster, tmp_path, name, job)
    assert re.search(rf"resumed from \S+ at step {saved}\b", log), log[-6000:]
    after = step_records(run_dir)[records_before:]
    assert [r["step"] for r in after] == [saved + 1, saved + 2], after
    assert after[0]["loss"] == pytest.approx(first_resumed_loss, rel=LOSS_RTOL), (
        after[0],
        first_resumed_loss,
    )
    assert latest_step(run_dir) == saved + 2
    print(f"resubmission resumed at step {saved} and finished at {time.monotonic() - t0:.0f}s")


def test_two_node_benchmark(cluster, tmp_path):
    name = "bench"
    job = _submit(cluster, tmp_path, name, [], script=BENCH_SBATCH, STEPS="3", WARMUP="1")
    log = _wait_completed(cluster, tmp_path, name, job)
    figures = json.loads((tmp_path / "runs" / f"{name}-{job}" / "benchmark.json").read_text())
    assert "FPS (images/s, global)" in log, log[-4000:]
    # Every rank of both nodes took part, and the FPS is the whole job's.
    assert (figures["world_size"], figures["tp"], figures["dp"]) == (4, TP, 2), figures
    assert figures["ours"]["fps"] > 0, figures
