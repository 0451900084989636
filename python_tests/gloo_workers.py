"""Multi-process tests on CPU: run a function in N processes joined by a gloo process group.

Workers leave with os._exit after a barrier instead of calling destroy_process_group: with gloo
that call can deadlock (pytorch/pytorch#75097; seen here in CI on torch 2.13: the group's
destructor holds the GIL while joining a gloo thread that waits for it), which would hang the
whole test run rather than fail it.
"""
import os
import socket
import sys
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world: int, port: int, args: tuple) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def spawn_gloo(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` processes; raises if any of them fails."""
    mp.spawn(_worker, args=(fn, world, free_port(), args), nprocs=world, join=True)
