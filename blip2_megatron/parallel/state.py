"""Process groups: torch.distributed start-up and megatron-core's parallel_state.

megatron-core's ``parallel_state`` is the single source of truth for the TP / PP / DP
groups (ranks ordered tensor-fastest, then data, then pipeline). This module starts
torch.distributed from the launcher's environment (deepspeed, torchrun or srun) or, for a
plain single-process run, from a private TCP store on 127.0.0.1, and exposes the few
questions the rest of the package asks: ranks, sizes and groups.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import random
import re
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from blip2_megatron import accelerator
from blip2_megatron.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Rank information handed over by the launcher."""

    rank: int
    world_size: int
    local_rank: int


# The bound on every collective, set when torch.distributed starts (train.collective_timeout_s).
_collective_timeout = datetime.timedelta(seconds=600)

# The gloo group for host-side flags (see host_group), built with torch.distributed.
_host_group: dist.ProcessGroup | None = None


def launch_env() -> LaunchEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (or SLURM's equivalents); defaults to one process."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def free_port() -> int:
    """A loopback port free now, drawn below the kernel's ephemeral range where there is room.

    A port the kernel hands out for ``bind(0)`` comes from the same range as the source ports
    of outgoing connections, so between this call and the rendezvous's own bind another
    process's gloo connection can take it (EADDRINUSE). Ports under the range are only ever
    taken by a bind that names them.
    """
    lowest_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, lowest_ephemeral - 12000), lowest_ephemeral))
    random.SystemRandom().shuffle(candidates)
    for port in [*candidates[:64], 0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """Check that TP x PP divides the world size; return the data-parallel degree."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"tensor/pipeline parallel sizes must be >= 1 (tp={tp}, pp={pp})")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tp x pp = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} processes or change model.llm.tp / model.llm.pp"
        )
    return world_size // (tp * pp)


def init_distributed(timeout_s: float = 600) -> LaunchEnv:
    """Start torch.distributed (once) with the accelerator's backend; TF32 on GPU.

    ``timeout_s`` bounds every collective: a rank that waits longer for a lost peer fails
    instead of hanging the job.
    """
    global _collective_timeout
    env = launch_env()
    if dist.is_initialized():
        if _host_group is None:  # torch.distributed was started by someone else: add ours once
            _bind_gloo_interface()
            _build_host_group()
        return env
    _collective_timeout = datetime.timedelta(seconds=timeout_s)
    accelerator.set_device(env.local_rank)
    # Every job process passes here: fp32 matmuls of fp32 jobs (and of the fp32 parts of
    # bf16 ones) run on TF32 tensor cores on GPU, as Megatron-LM's and LAVIS's users expect.
    accelerator.allow_tf32()
    backend = accelerator.communication_backend()
    timeout = _collective_timeout
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        if env.world_size != 1:
            raise RuntimeError(
                f"WORLD_SIZE={env.world_size} but MASTER_ADDR/MASTER_PORT are not set; "
                "start the job with deepspeed, torchrun or srun"
            )
        # A plain `python script.py`: a private rendezvous on loopback, published the way a
        # launcher would (DeepSpeed's engine insists on LOCAL_RANK).
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    # Before any gloo group exists (on CPU the default group is one): gloo reads the
    # variable when it builds a group.
    _bind_gloo_interface()
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    _build_host_group()
    if accelerator.is_cpu():
        _check_op_build_locks()
    # DeepSpeed keeps its own handle on the (already running) process group.
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    _release_shared_memory_buffer(env.rank)
    logger.info("torch.distributed up: rank %d/%d, backend %s", env.rank, env.world_size, backend)
    return env


#: Where the device libraries are told which interface joins the nodes, in the order consulted
#: when GLOO_SOCKET_IFNAME is not set (SOCKET_IFNAME is launch/slurm's knob for all of them).
DEVICE_IFNAME_VARS = ("NCCL_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME", "SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (first) IPv4 address


def interface_addresses() -> dict[str, set[str]]:
    """{interface name: its IP addresses} of this host (Linux; empty elsewhere).

    IPv4 addresses come from the SIOCGIFADDR ioctl (an interface's first address; aliases
    are not listed), IPv6 ones from /proc/net/if_inet6.
    """
    addresses: dict[str, set[str]] = {}
    if not sys.platform.startswith("linux"):
        return addresses
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            # struct ifreq: 16 bytes of name, then a sockaddr_in whose address starts at byte 4.
            addresses.setdefault(name, set()).add(socket.inet_ntoa(reply[20:24]))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            fields = line.split()
            if len(fields) == 6:
                address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
                addresses.setdefault(fields[5], set()).add(address)
    return addresses


def source_address(destination: str, port: int) -> str | None:
    """The local address this host sends from to reach ``destination`` (a name or address).

    A UDP socket's connect only asks the kernel for the route: no packet leaves.
    """
    try:
        candidates = socket.getaddrinfo(destination, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for family, kind, proto, _name, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(sockaddr)
                return sock.getsockname()[0].split("%")[0]  # without an IPv6 scope
        except OSError:  # no route in this family: try the next address
            continue
    return None


def _is_loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(address).is_loopback
    return False


def _named_interfaces(value: str, addresses: Mapping[str, set[str]], routed: str | None) -> str | None:
    """The interface(s) an NCCL/HCCL-style ``*_SOCKET_IFNAME`` value picks here, as gloo wants them.

    gloo takes exact names (a comma-separated list); NCCL and HCCL also take prefixes
    ("eth" for eth0) and exact names after "=". A prefix is resolved to the interface that
    routes to the master if it matches, else to the first that does. An exclusion list
    ("^docker,lo") names nothing: None, and the route decides.
    """
    value = value.strip()
    if not value or value.startswith("^"):
        return None
    exact = value.startswith("=")
    chosen = []
    for entry in filter(None, (part.strip() for part in value.lstrip("=").split(","))):
        if entry in addresses:
            chosen.append(entry)
        elif not exact:
            matching = sorted(name for name in addresses if name.startswith(entry))
            if routed in matching:
                chosen.append(routed)
            elif matching:
                chosen.append(matching[0])
    return ",".join(dict.fromkeys(chosen)) or None


def _like_nccl(addresses: Mapping[str, set[str]]) -> str | None:
    """The interface NCCL picks by itself: InfiniBand (ib*) first, then any but loopback and docker."""
    names = sorted(addresses)
    for accept in (lambda n: n.startswith("ib"), lambda n: n != "lo" and not n.startswith("docker")):
        for name in names:
            if accept(name) and any(not _is_loopback(a) for a in addresses[name]):
                return name
    return None


def gloo_interface(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The network interface for gloo, and why: (name or None for gloo's own choice, reason).

    gloo by itself binds to the address this host's name resolves to, which on many
    clusters is loopback (Debian's ``127.0.1.1 <host>`` line) or a management network the
    other nodes cannot reach: the job then waits out the collective timeout and fails.
    The choice, first that applies:

    1. GLOO_SOCKET_IFNAME, when set: kept as it is;
    2. the interface NCCL_SOCKET_IFNAME, HCCL_SOCKET_IFNAME or SOCKET_IFNAME names (in that
       order), so gloo takes the network NCCL/HCCL were told to take;
    3. the interface holding the local address that routes to MASTER_ADDR. Where
       MASTER_ADDR is this very host but resolves to a loopback address although it is not
       written as one (the Debian line again), the other nodes do not come in over
       loopback: the interface NCCL would pick by itself (ib*, else the first that is not
       loopback or docker) is taken instead.
    """
    environ = os.environ if environ is None else environ
    if environ.get("GLOO_SOCKET_IFNAME"):
        return environ["GLOO_SOCKET_IFNAME"], "GLOO_SOCKET_IFNAME is set"
    addresses = interface_addresses()
    master = environ.get("MASTER_ADDR")
    port = int(environ.get("MASTER_PORT") or 29500)
    source = source_address(master, port) if master else None
    routed = next((name for name, addrs in addresses.items() if source in addrs), None)
    for var in DEVICE_IFNAME_VARS:
        if environ.get(var):
            named = _named_interfaces(environ[var], addresses, routed)
            if named:
                return named, f"{var}={environ[var]}"
    if master is None:
        return None, "MASTER_ADDR is not set"
    if source is None:
        return None, f"no route from this host to MASTER_ADDR={master}"
    if routed is None:
        return None, f"no interface here holds {source}, the address that routes to MASTER_ADDR={master}"
    if _is_loopback(source) and not _is_loopback(master) and master != "localhost":
        outward = _like_nccl(addresses)
        if outward is not None:
            return outward, (
                f"MASTER_ADDR={master} is this host but resolves to loopback {source}: "
                "the first interface NCCL would take"
            )
    return routed, f"it holds {source}, the address that routes to MASTER_ADDR={master}"


def _bind_gloo_interface() -> None:
    """Point gloo at the interface :func:`gloo_interface` chooses (GLOO_SOCKET_IFNAME), and log it."""
    name, reason = gloo_interface()
    if name is None:
        logger.warning(
            "gloo binds to the address of this host's name (%s): %s; name the interface between "
            "the nodes with GLOO_SOCKET_IFNAME or SOCKET_IFNAME if the job does not start",
            socket.gethostname(),
            reason,
        )
        return
    os.environ["GLOO_SOCKET_IFNAME"] = name
    logger.info("gloo (host-side collectives) binds to interface %s: %s", name, reason)


#: DeepSpeed's CPU op builds in under a minute here; a build lock older than this was left by a killed build.
STALE_BUILD_LOCK_S = 300
#: File systems other hosts may share: a build lock there may belong to a process this host cannot see.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "afs", "9p"}
    | {"fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse"}
)


def _build_lock_holders(lock: Path) -> list[int] | None:
    """Processes of this host that hold ``lock`` open; None where /proc cannot tell.

    torch creates the lock with ``os.open`` and keeps that descriptor until the build ends
    (``FileBaton``), so a build in progress on this host shows up among its open files.
    """
    if not Path("/proc/self/fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:  # the process ended, or belongs to another user
            continue
    return holders


def _filesystem_type(path: Path) -> str | None:
    """The type of the file system ``path`` lives on (/proc/self/mountinfo), None if unknown."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, fs_type = os.path.realpath(path), "", None
    for line in mounts:
        fields, _, rest = line.partition(" - ")
        # The kernel writes a space in a mount point as "\040" (an octal escape).
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):  # the innermost mount holds the path
            best, fs_type = mount_point, rest.split()[0]
    return fs_type


def _check_op_build_locks() -> None:
    """Remove build locks that a killed build left behind; say so when a live build holds us up.

    On the first CPU run DeepSpeed JIT-builds its communication op (``deepspeed_shm_comm``)
    under a lock file in torch's extension directory, and every other process waits for
    that file to go. A build killed midway leaves it, and every later run then waits forever
    in ``deepspeed.init_distributed``. A lock that no process of this host holds open, on a
    file system no other host shares, is such a leftover whatever its age, and is removed
    (this process then builds the op). A lock a live process holds is a build in progress:
    it is named with the builder's pid, and DeepSpeed waits for it. Where this host cannot
    see every possible builder (no /proc, a network file system), a lock older than any
    build takes (:data:`STALE_BUILD_LOCK_S`) is removed and a younger one named.
    """
    from torch.utils.cpp_extension import get_default_build_root

    # torch builds op X in $TORCH_EXTENSIONS_DIR/X, or else in <its cache>/<python, device tag>/X.
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        locks = Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock")
    else:
        locks = Path(get_default_build_root()).glob("*/*/lock")
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            continue
        holders = _build_lock_holders(lock)
        if holders:
            logger.warning(
                "%s is held by process %s, which is building a DeepSpeed CPU op (%.0f s so far): "
                "waiting for it to finish",
                lock,
                ", ".join(map(str, holders)),
                age,
            )
            continue
        private = holders is not None and _filesystem_type(lock) not in NETWORK_FILESYSTEMS
        if private or age > STALE_BUILD_LOCK_S:
            logger.warning(
                "removing %s, a build lock left %.0f s ago by a build that did not finish%s",
                lock,
                age,
                " (no process holds it)" if private else "",
            )
            lock.unlink(missing_ok=True)
        else:
            logger.warning(
                "%s exists (%.0f s old): DeepSpeed waits until the process building its CPU op removes "
                "it; if no such process runs (a build was killed), remove the file",
                lock,
                age,
            )


def _release_shared_memory_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm (CPU runs).

    DeepSpeed's CPU communication op creates a ~66 MB shared-memory file per rank when it
    starts (``deepspeed.init_distributed``) and never removes it, so every finished or
    killed CPU job left its files in /dev/shm, which is RAM, until the machine filled.
    Every rank maps its peers' files while it starts; after a barrier the names can go,
    and the memory is freed when the last process that maps it exits.
    """
    if not accelerator.is_cpu():
        return
    dist.barrier()
    uid, addr, port = os.getuid(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}")


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> None:
    """Build megatron-core's TP/PP/DP groups over the running world (tensor fastest)."""
    if not dist.is_initialized():
        init_distributed()
    world = dist.get_world_size()
    validate_layout(world, tp, pp)
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        order="tp-dp-pp",
        create_gloo_process_groups=False,
        # The same bound as the world group: a lost peer fails every group's collectives.
        distributed_timeout_minutes=_collective_timeout.total_seconds() / 60,
    )


def destroy() -> None:
    """Tear down the model-parallel groups, the host group and torch.distributed (tests, end of a job)."""
    global _host_group
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        if _host_group is not None:
            dist.destroy_process_group(_host_group)
        dist.destroy_process_group()
    _host_group = None


def _build_host_group() -> None:
    """Create the host group (every rank, once, right after torch.distributed starts)."""
    global _host_group
    if _host_group is None:
        # Always a group of its own, even where the default backend is gloo too (CPU): a
        # check tells host-side collectives from device-side ones by the group object.
        _host_group = dist.new_group(backend="gloo", timeout=_collective_timeout)


def host_group() -> dist.ProcessGroup:
    """The gloo group over all ranks for host-side flags (pre-emption, fault handling).

    NCCL takes only CUDA tensors and HCCL only NPU tensors; a flag that lives on the host
    goes through this group instead, as a CPU tensor, with no device round trip. It is for
    small host flags only, never for model tensors (those use the device groups). Every
    rank must call the collectives on it in the same order, as on any group. It is a
    separate group object from the default (device) group on every backend, CPU included,
    and it binds to the interface :func:`gloo_interface` chooses.
    Built by :func:`init_distributed`, destroyed by :func:`destroy`.
    """
    if _host_group is None:
        raise RuntimeError(
            "the host group is built by blip2_megatron.parallel.state.init_distributed(); call it first"
        )
    return _host_group


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def pp_group() -> dist.ProcessGroup:
    return parallel_state.get_pipeline_model_parallel_group()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()


def is_initialized() -> bool:
    return parallel_state.model_parallel_is_initialized()


def embedding_group() -> dist.ProcessGroup | None:
    """The group of the first and last pipeline stage of this rank's pipeline (None when PP = 1).

    A head tied to the token embedding lives on both stages when PP > 1; its two copies
    are kept equal over this group (megatron-core builds it with the pipeline groups).
    """
    if pp_size() == 1 or not parallel_state.is_rank_in_embedding_group():
        return None
    return parallel_state.get_embedding_group()
