"""The host (gloo) group for host-side flags, and the interface gloo binds to.

The interface choice is what lets a multi-node job start where a node's host name resolves
to an address the other nodes cannot reach (tests/test_slurm_multinode.py runs such a
cluster); here it is checked on this host's own interfaces, and on a made-up host where a
route alone cannot tell the answer.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from blip2_megatron.parallel import state

LOOPBACK_MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
#: A host with loopback and one cluster interface (what interface_addresses would report).
TWO_INTERFACES = {"lo": {"127.0.0.1", "::1"}, "ens7": {"10.9.8.7"}}


def test_the_interface_is_the_one_that_routes_to_the_master():
    # This host's own interfaces and routes: 127.0.0.1 is reached over loopback.
    name, reason = state.gloo_interface(LOOPBACK_MASTER)
    assert name == "lo", reason
    assert "127.0.0.1" in reason


def test_gloo_socket_ifname_is_kept_as_set():
    name, reason = state.gloo_interface(
        {**LOOPBACK_MASTER, "GLOO_SOCKET_IFNAME": "ib3", "SOCKET_IFNAME": "lo"}
    )
    assert (name, reason) == ("ib3", "GLOO_SOCKET_IFNAME is set")


@pytest.mark.parametrize("var", state.DEVICE_IFNAME_VARS)
def test_an_interface_named_for_nccl_or_hccl_wins_over_the_route(monkeypatch, var):
    monkeypatch.setattr(state, "interface_addresses", lambda: TWO_INTERFACES)
    name, reason = state.gloo_interface({**LOOPBACK_MASTER, var: "ens7"})
    assert name == "ens7" and reason == f"{var}=ens7"


def test_nccl_socket_ifname_comes_before_socket_ifname(monkeypatch):
    monkeypatch.setattr(state, "interface_addresses", lambda: TWO_INTERFACES)
    name, _ = state.gloo_interface({**LOOPBACK_MASTER, "NCCL_SOCKET_IFNAME": "ens7", "SOCKET_IFNAME": "lo"})
    assert name == "ens7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ens", "ens7"),  # an NCCL prefix: the interface it matches (gloo wants exact names)
        ("=ens7", "ens7"),  # NCCL's exact-name form
        ("=ens", "lo"),  # exact, and no such interface: the route decides
        ("^docker,lo", "lo"),  # an exclusion list names nothing: the route decides
        ("ib", "lo"),  # no interface matches: the route decides
    ],
)
def test_nccl_style_values_are_turned_into_gloo_names(monkeypatch, value, expected):
    monkeypatch.setattr(state, "interface_addresses", lambda: TWO_INTERFACES)
    assert state.gloo_interface({**LOOPBACK_MASTER, "NCCL_SOCKET_IFNAME": value})[0] == expected


def test_a_master_host_whose_name_resolves_to_loopback_binds_outward(monkeypatch):
    # Debian's "127.0.1.1 node1" in node1's /etc/hosts: node1 routes to itself over loopback,
    # but the other nodes reach it over the cluster network.
    monkeypatch.setattr(state, "interface_addresses", lambda: {**TWO_INTERFACES, "docker0": {"172.17.0.1"}})
    monkeypatch.setattr(state, "source_address", lambda destination, port: "127.0.0.1")
    name, reason = state.gloo_interface({"MASTER_ADDR": "node1", "MASTER_PORT": "29500"})
    assert name == "ens7", reason
    assert "resolves to loopback" in reason


def test_no_master_address_leaves_gloo_its_own_choice():
    name, reason = state.gloo_interface({})
    assert name is None and "MASTER_ADDR" in reason


def test_an_unresolvable_master_leaves_gloo_its_own_choice():
    name, reason = state.gloo_interface({"MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "1"})
    assert name is None and "no route" in reason


def _host_group_probe(rank: int, world_size: int) -> dict:
    group = state.host_group()
    flag = torch.tensor([rank], dtype=torch.int32)  # a CPU tensor, as every host flag is
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)

    from blip2_megatron.training.trainer import PreemptionFlag

    preemption = PreemptionFlag()
    quiet = preemption.raised_anywhere()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
    raised = preemption.raised_anywhere()
    return {
        "distinct": group is not dist.group.WORLD and group != dist.distributed_c10d._get_default_group(),
        "backend": dist.get_backend(group),
        "size": dist.get_world_size(group),
        "max": int(flag.item()),
        "same_object_again": state.host_group() is group and preemption.group is group,
        "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "quiet": quiet,
        "raised": raised,
        "signal": preemption.signal_name,
    }


@pytest.mark.dist
def test_the_host_group_is_a_gloo_group_of_its_own_that_carries_the_preemption_flag():
    results = run_distributed(_host_group_probe, 2)
    for rank, result in enumerate(results):
        # On CPU the default group is gloo too; the host group is still another object.
        assert result["distinct"] and result["backend"] == "gloo" and result["size"] == 2, result
        assert result["max"] == 1 and result["same_object_again"], result
        assert result["ifname"] == "lo", result  # MASTER_ADDR is 127.0.0.1 here
        # The signal reached rank 1 only; both ranks learn which one in the same step.
        assert result["quiet"] is None and result["raised"] == "SIGUSR1", result
        assert result["signal"] == ("SIGUSR1" if rank == 1 else None), result


def test_the_host_group_goes_with_the_others(single_process_group):
    group = state.host_group()
    assert group is not dist.group.WORLD
    state.destroy()
    with pytest.raises(RuntimeError, match="init_distributed"):
        state.host_group()
    state.init_distributed()  # the fixture's own destroy() then finds a running world again
    assert state.host_group() is not group
