"""A throw-away SLURM cluster on this machine, for tests/test_slurm*.py.

It runs Debian's munged, slurmctld and slurmd in the foreground as child processes of
the caller, with every file (config, state, spool, logs, munge socket and key) in one
temporary folder and on free ports, so it neither touches nor collides with a system
SLURM or munge. Needs root (slurmd launches jobs as the submitting user and SlurmUser is
root here) and the binaries from tests/slurm/install_slurm.sh.

- ``nodes=1`` (tests/test_slurm.py): one node, ``localhost``, slurmd in the machine's own
  network.
- ``nodes=2`` or more (tests/test_slurm_multinode.py): nodes ``node1``, ``node2``, ...,
  each slurmd in its own network namespace with its own address, host name and /etc/hosts
  (tests/slurm/netns.py), so a job's processes on node2 reach node1 only over the private
  bridge, by name, as on a real cluster. slurmctld and munged stay in the root namespace,
  where slurmctld listens on the bridge's address; the munge socket is a file, which the
  namespaces share, so one munged (one key) serves every node.

Used by the tests as a context manager; also runnable by hand to poke at the templates::

    python tests/slurm/local_cluster.py [--nodes 2]   # starts it, prints the SLURM_CONF to export, waits for Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from netns import NetworkUnavailable, PrivateNetwork  # noqa: E402

REQUIRED_BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "scontrol",
    "scancel",
    "squeue",
    "srun",
    "sinfo",
)
#: Job states after which a job will not run again by itself.
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be started here; the message says why (the test skips with it)."""


def why_unavailable(nodes: int = 1) -> str | None:
    """None when a local cluster of ``nodes`` nodes can be attempted, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not running as root (slurmd and munged must run as root for a local cluster)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"SLURM/munge binaries missing: {', '.join(missing)} (run tests/slurm/install_slurm.sh as root)"
        )
    if not Path("/etc/munge/munge.key").is_file() and shutil.which("mungekey") is None:
        return "no munge key at /etc/munge/munge.key and no mungekey to create one"
    if nodes > 1:
        return PrivateNetwork.why_unavailable()
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """RealMemory for the node: what the machine has, less a margin for the daemons."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(int(line.split()[1]) // 1024 - 1024, 1024)
    return 4096


class LocalSlurmCluster:
    """munged + slurmctld + one slurmd per node, one partition ``debug`` with every node.

    ``cpus`` is what each node declares (default: this machine's count); with several nodes
    they all share this machine's CPUs.
    """

    def __init__(self, root: Path | None = None, cpus: int | None = None, nodes: int = 1):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node_names = ["localhost"] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        #: The node namespaces (None for a single node in this machine's network).
        self.network: PrivateNetwork | None = None
        if nodes > 1:
            self.network = PrivateNetwork(self.node_names, self.root / "hosts")
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []

    # ---- life cycle -------------------------------------------------------------------
    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for the client commands (sbatch, scontrol, ...) and the jobs they start.

        Without any launcher's rank variables: a MASTER_PORT left in this process by an
        in-process test would reach every job (sbatch exports the environment) and replace
        the rendezvous port the templates derive from the job id. Nor this machine's choice
        of network interface (an in-process test's torch.distributed sets GLOO_SOCKET_IFNAME
        to "lo"): the nodes have interfaces of their own; a job names one with SOCKET_IFNAME.
        """
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        launcher += ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME", "SOCKET_IFNAME")
        return {**{k: v for k, v in os.environ.items() if k not in launcher}, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> None:
        """Start everything; on any failure, undo what was started and raise ClusterUnavailable."""
        reason = why_unavailable(len(self.node_names))
        if reason:
            raise ClusterUnavailable(reason)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        for sub in ("munge", "state", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        controller = "localhost"
        if self.network is not None:
            try:
                self.network.create()
            except NetworkUnavailable as err:
                raise ClusterUnavailable(f"cannot build the private node network: {err}") from err
            controller = f"localhost({self.network.gateway})"
        self._start_munge()
        self._write_conf(controller)
        # -D: stay in the foreground, so the daemons are our children and stop() can end them.
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.node_names:
            cmd = ["slurmd", "-D", "-N", node, "-f", str(self.conf)]
            if self.network is not None:
                cmd = self.network.node_command(node, cmd)
            self._spawn(f"slurmd-{node}", cmd)
        self._wait_nodes_idle(timeout)

    def stop(self) -> None:
        """Cancel what is still queued or running, end the daemons we started (newest first),
        then remove the node namespaces and the bridge."""
        self.cancel_all()
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()
        if self.network is not None:
            problems = self.network.destroy()
            if problems:
                print(f"local_cluster: could not remove: {'; '.join(problems)}", file=sys.stderr)

    def cancel_all(self, timeout: float = 60.0) -> None:
        """scancel every job of this private cluster and wait until none runs.

        Job steps run under slurmstepd processes that outlive slurmd, so a job left running
        (a failed test) would keep training after the daemons stop unless cancelled first.
        """
        if not self._procs or any(p.poll() is not None for p in self._procs):
            return
        res = self.run(["squeue", "-h", "-o", "%i"], check=False)
        job_ids = res.stdout.split()
        if not job_ids:
            return
        self.run(["scancel", *job_ids], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                return
            time.sleep(1.0)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.root / f"{name}.stdout"
        self._logs.append(log)
        with log.open("w") as fh:
            self._procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env))
        time.sleep(0.2)
        if self._procs[-1].poll() is not None:
            raise ClusterUnavailable(
                f"{name} exited at start (code {self._procs[-1].returncode}):\n{self.daemon_logs()}"
            )

    def _start_munge(self) -> None:
        # Our own key copy and socket: munged insists the key belongs to the user running it.
        key = self.root / "munge" / "munge.key"
        if Path("/etc/munge/munge.key").is_file():
            shutil.copyfile("/etc/munge/munge.key", key)
        else:
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        key.chmod(0o600)
        (self.root / "munge").chmod(0o700)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'munge' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"munged did not create its socket:\n{self.daemon_logs()}")
            time.sleep(0.1)

    def _write_conf(self, controller: str) -> None:
        r = self.root
        if self.network is None:
            nodes = [f"NodeName=localhost CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN"]
        else:
            # NodeAddr: slurmctld (root namespace) reaches each slurmd at its namespace's address.
            nodes = [
                f"NodeName={n} NodeAddr={self.network.addresses[n]} CPUs={self.cpus} "
                f"RealMemory={_memory_mb()} State=UNKNOWN"
                for n in self.node_names
            ]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=blip2test",
                    # "localhost" matches whatever this machine is called; the address in
                    # parentheses is where slurmd and the clients reach it (the bridge's,
                    # with node namespaces).
                    f"SlurmctldHost={controller}",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU_Memory",
                    "SchedulerType=sched/builtin",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={r / 'state'}",
                    # %n: the node's name, so every slurmd of this machine has its own files.
                    f"SlurmdSpoolDir={r / 'spool' / '%n'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
                    f"SlurmctldLogFile={r / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'slurmd-%n.log'}",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    # Keep finished jobs visible to `scontrol show job` for the whole test.
                    "MinJobAge=600",
                    "DefMemPerCPU=2000",
                    *nodes,
                    f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise ClusterUnavailable(
                        f"{' '.join(proc.args[:8])} exited (code {proc.returncode}):\n{self.daemon_logs()}"
                    )
            res = self.run(["sinfo", "-N", "-h", "-o", "%N %T"], check=False)
            states = dict(line.split(maxsplit=1) for line in res.stdout.splitlines() if " " in line)
            if all(states.get(n, "").lower() == "idle" for n in self.node_names):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"nodes never all became IDLE: {states}\n{self.daemon_logs()}")

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        daemon_files = [
            self.root / "slurmctld.log",
            *(self.root / f"slurmd-{n}.log" for n in self.node_names),
        ]
        for path in [*self._logs, *daemon_files]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- client commands --------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, env: dict[str, str] | None = None, **kw):
        return subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
            **kw,
        )

    def sbatch(
        self, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None
    ) -> int:
        """Submit; return the job id."""
        res = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr}\n{self.daemon_logs()}")
        return int(res.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...); {} once it is gone."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if res.returncode != 0:
            return {}
        return dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a finished state; return its info (raises on timeout)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            time.sleep(1.0)
        self.run(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {info}\n{self.daemon_logs()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Start a throw-away SLURM cluster until Ctrl-C.")
    parser.add_argument(
        "--nodes", type=int, default=1, help="1: localhost; 2+: node1.. in network namespaces"
    )
    args = parser.parse_args()
    # `kill <pid>` (and Ctrl-C, which a background job ignores) stops it through the clean-up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalSlurmCluster(nodes=args.nodes) as cluster:
        print(f"cluster up in {cluster.root}, nodes {', '.join(cluster.node_names)}")
        if cluster.network is not None:
            for node in cluster.node_names:
                print(f"  {node}: {cluster.network.addresses[node]} (netns {cluster.network.netns[node]})")
        print(f"  export SLURM_CONF={cluster.conf}\nCtrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
