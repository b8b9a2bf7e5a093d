"""info_nce(gather=True) under torch.distributed (gloo, CPU): 2 and 3 processes, hard negatives on every rank,
both layouts. The claim under test: after DDP's gradient averaging, the parameters' gradients (encoder and
learnable temperature) equal single-process training on the concatenated global batch."""
from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

INPUT_DIM, EMBED_DIM, QUERIES_PER_RANK, GROUP_SIZE = 12, 8, 3, 3
CASES = [  # (layout, reduction, with_ids, backend)
    ("grouped", "mean", False, "cpu"),
    ("grouped", "sum", True, "cpu"),
    ("labels", "mean", True, "cpu"),
    ("labels", "sum", False, "cpu"),
    ("grouped", "mean", True, "reference"),
]


class Retriever(nn.Module):
    """A shared linear encoder and a learnable temperature: the parameters DDP averages."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(INPUT_DIM, EMBED_DIM)
        self.log_temperature = nn.Parameter(torch.tensor(-2.0))

    def forward(self, queries, passages):
        return F.normalize(self.encoder(queries), dim=-1), F.normalize(self.encoder(passages), dim=-1)


def global_batch(world_size, layout, with_ids, seed):
    """Raw features, labels and ids of every rank (all ranks build the same, then take their part)."""
    gen = torch.Generator().manual_seed(seed)
    num_passages = QUERIES_PER_RANK * GROUP_SIZE
    queries = torch.randn(world_size, QUERIES_PER_RANK, INPUT_DIM, generator=gen, dtype=torch.float64)
    passages = torch.randn(world_size, num_passages, INPUT_DIM, generator=gen, dtype=torch.float64)
    if layout == "grouped":  # [pos_i, neg_i1, neg_i2] per query
        labels = torch.arange(QUERIES_PER_RANK).repeat(world_size, 1) * GROUP_SIZE
    else:  # sentence-transformers columns: [P_1..P_B, N1_1..N1_B, N2_1..N2_B]
        labels = torch.arange(QUERIES_PER_RANK).repeat(world_size, 1)
    ids = None
    if with_ids:
        ids = torch.arange(world_size * num_passages).view(world_size, num_passages) + 100
        # rank 1's passage 4 (a hard negative in both layouts) duplicates rank 0's first positive, and a
        # rank-0 hard negative duplicates the last rank's first positive: false negatives across ranks
        ids[1, 4] = ids[0, labels[0, 0]]
        ids[0, num_passages - 1] = ids[-1, labels[-1, 0]]
        passages[1, 4] = passages[0, labels[0, 0]]
    return queries, passages, labels, ids


def _worker(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _check_every_case(rank, world_size)
    finally:
        # The gloo process group must be gone before the interpreter shuts down: a gloo thread that drops a
        # reference to a tensor during finalization aborts the process (SIGABRT, "terminate called without
        # an active exception"; pytorch/pytorch#190489). DDP's reducer keeps the group alive in a reference
        # cycle, so collect it first, then destroy the group and collect again: its destructor joins the threads.
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def _check_every_case(rank, world_size):
    """Every case of CASES on this rank, then the refusal of uneven batches."""
    from convret import info_nce

    for case_index, (layout, reduction, with_ids, backend) in enumerate(CASES):
        queries, passages, labels, ids = global_batch(world_size, layout, with_ids, seed=case_index)
        torch.manual_seed(1234)
        model = Retriever().double()
        single = Retriever().double()
        single.load_state_dict(model.state_dict())
        # DDP itself with 2 ranks; with 3, its averaging by hand (DDP's first construction imports
        # torch._dynamo, seconds per process)
        ddp = nn.parallel.DistributedDataParallel(model) if world_size == 2 else model

        # this rank's part; labels are local to its passages
        local_kwargs = {"passage_ids": None if ids is None else ids[rank]}
        if layout == "grouped":
            local_kwargs["group_size"] = GROUP_SIZE
        else:
            local_kwargs["labels"] = labels[rank]
        q_emb, p_emb = ddp(queries[rank], passages[rank])
        loss = info_nce(q_emb, p_emb, model.log_temperature.exp(), gather=True, reduction=reduction,
                        backend=backend, **local_kwargs)
        loss.backward()
        if world_size != 2:
            for param in model.parameters():
                dist.all_reduce(param.grad)
                param.grad /= world_size

        # single process on the concatenated global batch
        num_passages = passages.shape[1]
        global_kwargs = {"passage_ids": None if ids is None else ids.reshape(-1)}
        if layout == "grouped":
            global_kwargs["group_size"] = GROUP_SIZE
        else:
            global_kwargs["labels"] = (labels + torch.arange(world_size).unsqueeze(1) * num_passages).reshape(-1)
        q_all, p_all = single(queries.reshape(-1, INPUT_DIM), passages.reshape(-1, INPUT_DIM))
        want = info_nce(q_all, p_all, single.log_temperature.exp(), reduction=reduction, backend="reference",
                        **global_kwargs)
        want.backward()

        # the loss convention: the mean of the ranks' results is the global loss
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
        where = f"rank {rank}/{world_size}, case {CASES[case_index]}"
        torch.testing.assert_close(mean_loss, want.detach(), msg=lambda m: f"{where}: loss {m}")
        for (name, got), want_param in zip(model.named_parameters(), single.parameters()):
            assert want_param.grad.abs().max() > 1e-3, f"{where}: {name} gradient ~0, test cannot fail"
            torch.testing.assert_close(got.grad, want_param.grad, msg=lambda m: f"{where}: {name} grad {m}")

    # uneven batches are refused on every rank, before any collective could hang
    with pytest.raises(ValueError, match="same Q and P"):
        n = QUERIES_PER_RANK + rank
        info_nce(torch.randn(n, 4), torch.randn(n * 2, 4), gather=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 3])
def test_gathered_loss_matches_single_process_global_batch(world_size):
    mp.spawn(_worker, args=(world_size, _free_port()), nprocs=world_size, join=True)
