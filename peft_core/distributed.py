"""Data-parallel training over several processes started by torchrun (torch.distributed).

Each optimizer step's global batch is built the same way on every rank (same seed, same
order, same padding), and rank r trains on its slice of the rows. The loss is weighted by
tokens across ranks, so N processes with 1/N of the batch each make the same update as one
process with the whole batch:

    one process:  ℓ = Σ_micro (Σ_tokens loss) / n_micro / len(micro)
    rank r:       ℓ_r = Σ_micro (Σ_tokens of r's rows loss) / n_micro / len(micro)
                  with n_micro the micro-batch's supervised tokens over all ranks

and the adapter's gradients are summed across ranks (all_reduce) before clipping and the
optimizer step, which every rank then takes identically. Evaluation is sharded the same way
(summed losses and counts, all-reduced). Dropout masks of the LoRA and DoRA steps are drawn
for the whole batch on every rank and cut to its rows, so even with dropout the adapter is
the one a single process trains; other dropouts (a base model's own, bottleneck adapters')
draw per rank: the same distribution, not the same bits.

Why not torch's DistributedDataParallel wrapper: peft_core's causal-LM loss runs the LM head
outside the model's forward (peft_core/loss.py), which DDP's reducer cannot follow, and an
adapter's gradients are a few MB, so one all_reduce per step costs little. Only trainable
parameters travel; the frozen base is loaded by each rank.

Launch with `torchrun --standalone --nproc-per-node N` (peft_core.cli does it for
`peftlab train --devices N`); gloo on the CPU, nccl on GPUs.
"""

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

T = TypeVar("T")

# How long a collective waits for the slowest rank: FSDP's ranks load the base in turn.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place: rank and size of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_torchrun(device_type: str) -> torch.device:
    """Join the process group torchrun set up (env://); the device this rank trains on."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", timeout=TIMEOUT)
        return torch.device("cuda", local_rank)
    dist.init_process_group(backend="gloo", timeout=TIMEOUT)
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share_of(rows: int, here: World) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of `rows` rows."""
    per = -(-rows // here.size)
    return min(here.rank * per, rows), min((here.rank + 1) * per, rows)


def rows_of(batch: dict[str, torch.Tensor], here: World) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a global batch's rows (padding kept as the global
    batch has it, so every row computes exactly as it would in one process)."""
    if not here.parallel:
        return batch
    start, stop = share_of(next(iter(batch.values())).shape[0], here)
    return {name: tensor[start:stop] for name, tensor in batch.items()}


# Dropout masks. One process draws a (batch × …) mask in one go; a rank with rows [a, b)
# draws the whole batch's mask from the same generator state and keeps rows [a, b), so the
# masks, and so the adapter, are the ones one process would have had. Set while a rank runs
# its share of a micro-batch (peft_core.train); read by the LoRA/DoRA steps' `drop`.
_share: tuple[int, int, int] | None = None  # (global rows, start, stop)


@contextmanager
def drawing_for_whole_batch(rows: int, here: World) -> Iterator[None]:
    global _share
    start, stop = share_of(rows, here)
    _share = (rows, start, stop) if here.parallel else None
    try:
        yield
    finally:
        _share = None


def bernoulli_like(x: torch.Tensor, keep_probability: float) -> torch.Tensor:
    """A 0/1 mask shaped like `x` (rows first), drawn as one process would for the batch."""
    if _share is not None:
        rows, start, stop = _share
        mine = stop - start
        if mine and x.shape[0] % mine == 0:
            per_row = x.shape[0] // mine  # e.g. the tokens of a flattened (rows·T, d) input
            whole = torch.empty((rows * per_row, *x.shape[1:]), dtype=x.dtype, device=x.device)
            whole.bernoulli_(keep_probability)
            return whole[start * per_row : stop * per_row]
    return torch.empty_like(x).bernoulli_(keep_probability)


def sum_across(values: Sequence[float], here: World, device: torch.device) -> list[float]:
    """The element-wise sum of `values` over all ranks (float64 on the wire)."""
    if not here.parallel:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool, here: World, device: torch.device) -> bool:
    """True on every rank when it is true on one (a stop request seen by rank 0)."""
    return bool(sum_across([float(flag)], here, device)[0]) if here.parallel else flag


def sync_random_state(here: World, device: torch.device) -> None:
    """Every rank takes rank 0's generator state (rank 0 always has rows: a rank left without
    any in a short last batch drew no masks and would fall out of step)."""
    if not here.parallel:
        return
    state = torch.get_rng_state()
    dist.broadcast(state, src=0)
    torch.set_rng_state(state)
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(device)
        dist.broadcast(cuda_state, src=0)
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def sum_gradients(params: Sequence[torch.nn.Parameter], here: World) -> None:
    """Sum the parameters' gradients over all ranks, in one flat buffer per dtype."""
    if not here.parallel:
        return
    for param in params:
        if param.grad is None:  # this rank had no rows in the step: it adds nothing
            param.grad = torch.zeros_like(param)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(summed)


# ---- FSDP: the frozen base sharded over the ranks --------------------------------------------
#
# DDP (above) keeps a whole base on every device. With `parallel="fsdp"` the frozen base's
# weights are split over the ranks with torch's FSDP2 (`fully_shard`): one group per
# transformer block and one for the rest (embeddings, final norm, head), so a device holds
# 1/N of the base plus one block's weights at a time, gathered for its forward and backward.
# The adapter's own tensors are left out of the sharding (`ignored_params`): they are a few
# MB, every rank keeps them whole, and the DDP machinery above (token-weighted loss, summed
# gradients, one optimizer step on every rank, checkpoints and adapters as plain tensors)
# applies to them unchanged. FSDP's collectives need every rank in every forward, so under
# FSDP a rank without rows in a micro-batch runs one row with zero weight (`idle_rows`).
#
# Which methods: those whose adapter lives inside the blocks or beside the model's inputs
# and whose initialisation reads no base weight after sharding. A quantised base is refused
# (bitsandbytes' packed weights cannot be split by FSDP): configs.refuse_fsdp says which.


def adapter_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The tensors FSDP leaves whole: trainable ones and any the adapter owns."""
    from peft_core.model import adapter_key_map

    owned = set(adapter_key_map(model).values())
    return {
        param
        for name, param in model.named_parameters(remove_duplicate=False)
        if param.requires_grad or name in owned
    }


def shard_base(model: torch.nn.Module, device: torch.device) -> None:
    """Split `model`'s frozen base over the ranks (FSDP2, one group per block) and move it,
    adapter included, to `device`. Call on every rank, after the adapter is applied."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from peft_core.graph import find_blocks

    # The model's output under the chunked loss is its hidden state passed through (a view);
    # FSDP warns that an in-place op on it would skip a hook. peft_core does none.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world().size,))
    whole = adapter_parameters(model)
    blocks, _ = find_blocks(model)
    for block in model.get_submodule(blocks):
        fully_shard(block, mesh=mesh, ignored_params=whole & set(block.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=whole)
    model.to(device)  # the adapter's tensors and the buffers; the shards are there already


def in_turn(load: Callable[[], T]) -> T:
    """`load()` on one rank after another, rank 0 first: a rank that loads a whole base and
    shards it (shard_base) frees the rest before the next starts, so the host holds one
    whole base at a time, not one per rank."""
    here = world()
    result = None
    for rank in range(here.size):
        if rank == here.rank:
            result = load()
        if here.parallel:
            dist.barrier()
    return result


def held_here(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements in all) of the model's split (FSDP) weights."""
    from torch.distributed.tensor import DTensor

    split = [p for p in model.parameters() if isinstance(p, DTensor)]
    return sum(p.to_local().numel() for p in split), sum(p.numel() for p in split)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
