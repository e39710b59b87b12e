"""Encoder training across processes: PyTorch DDP, one process a GPU (or a CPU process under gloo).

Started by ``torchrun``, which sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; every rank runs the
same training loop (:func:`~afmrl_dagster.training.encoder_training.train_listing_encoder`) on
the whole catalog's inputs and draws the same global batches from the same seeded sampler.
A global batch is split by product (:func:`product_shards`): each rank embeds whole product
groups, the pairs of one product together. The embeddings are gathered across ranks with
autograd (:func:`gather_rows`), as open_clip gathers its contrastive features, so every rank
computes AGCL over the whole global batch: in-batch negatives from every rank, the BM25
weights and the false-negative mask of the global batch (every rank holds every listing's
attribute terms, so they are computed from listing indices rather than gathered).

Gradients are exact: every rank's loss is the global batch's, the gather's backward sums what
every rank's loss sends to a rank's rows, and DDP averages the parameters' gradients over the
ranks, which leaves the gradient of the one-process loss on the same global batch. With
dropout off, two processes train the weights one process trains, within float rounding
(``tests/test_distributed_training.py``); with dropout on they differ by the random masks.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

WORLD_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_from_environment(device: str = "cpu") -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (nccl on CUDA, gloo
    otherwise); a process started without it stays alone. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        missing = [name for name in WORLD_ENV if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE > 1 but {missing} are not set: start the training with torchrun")
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return distributed_world()


def product_shards(product_codes: np.ndarray, world_size: int) -> list[np.ndarray]:
    """The positions of a global batch's pairs per rank (anchors' product codes ``product_codes``):
    whole products, the largest groups first to the least loaded rank, each rank's positions
    in batch order. A batch of fewer products than ranks is split by pairs instead, so that no
    rank is left without work (DDP needs every rank's gradients)."""
    product_codes = np.asarray(product_codes)
    if len(product_codes) < world_size:
        raise ValueError(f"a batch of {len(product_codes)} pairs cannot feed {world_size} ranks: raise batch_size or lower world_size")
    products, first, counts = np.unique(product_codes, return_index=True, return_counts=True)
    if len(products) < world_size:
        return [np.sort(part) for part in np.array_split(np.arange(len(product_codes)), world_size)]
    load, owner = np.zeros(world_size, dtype=np.int64), {}
    for index in sorted(range(len(products)), key=lambda i: (-counts[i], first[i])):
        rank = int(np.argmin(load))
        owner[products[index]] = rank
        load[rank] += counts[index]
    ranks = np.array([owner[code] for code in product_codes])
    return [np.flatnonzero(ranks == rank) for rank in range(world_size)]


def gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``local`` rows ``[sizes[r], d]`` concatenated in rank order, differentiable:
    the backward pass returns to each rank the gradient every rank's loss sends to its rows."""
    rank, world_size = distributed_world()
    if world_size == 1:
        return local
    if len(local) != sizes[rank]:
        raise ValueError(f"rank {rank} holds {len(local)} rows but the plan gives it {sizes[rank]}")
    padded = nn.functional.pad(local, (0, 0, 0, max(sizes) - len(local)))  # all_gather needs one shape
    gathered = torch.distributed.nn.functional.all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


class RowEmbedder(nn.Module):
    """What DDP wraps: an encoder's embeddings of some listing rows, and its temperature (returned
    from the forward pass so that DDP sees every trained parameter used)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, inputs, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.embed_rows(inputs, rows), self.encoder.temperature


def wrap_for_ranks(model: nn.Module, device: torch.device, inputs_are_listings: bool = True) -> nn.Module:
    """``model`` inside DDP (trained parameters broadcast from rank 0, their gradients averaged over
    ranks): an encoder as a :class:`RowEmbedder` (``inputs_are_listings``), any other module as it
    is. Frozen parameters (a LoRA base model, a tower's frozen blocks) are left out of DDP: every
    rank loads the same ones, and a base model of billions of weights is not broadcast."""
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    module = RowEmbedder(model) if inputs_are_listings else model
    frozen = [name for name, parameter in module.named_parameters() if not parameter.requires_grad]
    if frozen:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def distributed_embeddings(model: nn.Module, inputs, anchors: np.ndarray, positives: np.ndarray, product_codes: np.ndarray,
                           autocast) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """This rank's share of a global batch embedded and everyone's gathered: the embeddings of
    every anchor then every positive in the order the shards give, the temperature, and that
    order (positions into ``anchors``/``positives``)."""
    rank, world_size = distributed_world()
    shards = product_shards(np.asarray(product_codes)[anchors], world_size)
    mine = shards[rank]
    with autocast:
        local, temperature = model(inputs, np.concatenate([anchors[mine], positives[mine]]))
    local = local.float()
    sizes = [len(shard) for shard in shards]
    anchor_rows = gather_rows(local[: len(mine)], sizes)
    positive_rows = gather_rows(local[len(mine):], sizes)
    return torch.cat([anchor_rows, positive_rows]), temperature, np.concatenate(shards)


def barrier() -> None:
    if distributed_world()[1] > 1:
        torch.distributed.barrier()
