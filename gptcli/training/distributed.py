"""Training under torchrun: a process's rank, the process group (gloo on the CPU, nccl on GPUs), and the
few collectives the loop needs. One process needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptcli.errors import UserError
from gptcli.training.settings import TrainSettings

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """The process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def check_batch_split(s: TrainSettings, dist: Dist) -> None:
    """``--batch-size`` is the global micro-batch: every process takes an equal share of its rows."""
    if s.batch_size % dist.world:
        raise UserError(f"--batch-size {s.batch_size} does not split evenly over {dist.world} processes; "
                        f"use a multiple of {dist.world}")


def init_distributed(dist: Dist, device: "torch.device") -> "torch.device":
    """Join the process group (nccl on GPUs, gloo on the CPU); the device this process uses (its own GPU)."""
    import torch
    import torch.distributed as td

    if dist.world <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def finish_distributed(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def mean_across(value: float, device: "torch.device") -> float:
    import torch
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return float(t.item()) / td.get_world_size()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
