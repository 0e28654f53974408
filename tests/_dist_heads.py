"""2-process gloo (CPU) runs for tests/test_lm_heads.py: ``python tests/_dist_heads.py OUT``.

Each rank holds its own tokens (data parallel). A tiny model (a ``body`` Linear + tanh, and a
bias-free ``head`` Linear) scores them with ``rlkern.linear_token_logprobs(hidden,
head.weight, labels)``, runs backward and one SGD step, in three set-ups, and rank 0 saves the
full weights after the step to OUT (``torch.save``) under:

- ``fsdp2``: ``fully_shard`` on body, head and the root; ``head.weight`` is the sharded DTensor
  (computed per shard: ``per_shard_calls`` counts the calls that took that path).
- ``fsdp2_gather``: the same with W gathered (``linear_logprobs._PER_SHARD = "never"``).
- ``fsdp2_lora``: a LoRA adapter (A, B parameters, frozen W) on the sharded head (gathered).
- ``fsdp2_naive``: the op called on ``head.weight.full_tensor()`` (the trap of issue 17).
- ``ddp``: ``DistributedDataParallel`` around a module whose forward calls the op.
- ``trl_fsdp2`` / ``trl_fsdp2_unpatched``: a tiny Qwen2 with TRL's fused head
  (``add_fused_lm_head``), each layer, ``lm_head`` and the root ``fully_shard``ed, its fused
  loss backward and one SGD step, with ``rlkern.integrations.trl.patch()`` and without (TRL's
  own ``full_tensor()`` of the DTensor head); ``trl_single_process_reference()`` is the
  unfused (HF loss) unsharded run.

plus ``fsdp2_grad_placements`` (the head gradient's placements) and ``error`` (a traceback, if a
set-up raised). ``single_process_reference(lora)`` is the unsharded run they must match: the mean
of the ranks' losses, one process. The loss uses the log-probs and the entropy.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rlkern

H, V, WORLD = 16, 37, 2  # V odd: FSDP2's dim-0 shards are uneven (19 + 18 rows)
TOKENS = (11, 7)  # uneven batches
LR = 0.5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)

    def forward(self, x):
        return torch.tanh(self.body(x))


class TinyLora(Tiny):
    """A LoRA adapter on the head (PEFT's lora_A / lora_B weights); the base head frozen."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(3, H) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(V, 3) * 0.3)
        self.head.weight.requires_grad_(False)


class WithLogprobs(Tiny):
    """The op inside the wrapped module's forward (DDP's hooks see every parameter used)."""

    def forward(self, x, labels):
        return _op(self, torch.tanh(self.body(x)), self.head.weight, labels)


def _op(model, hidden, weight, labels):
    lora = dict(lora_A=model.lora_A, lora_B=model.lora_B, lora_scaling=2.0) if isinstance(model, TinyLora) else {}
    return rlkern.linear_token_logprobs(hidden, weight, labels, return_entropy=True, **lora)


def build(cls=Tiny):
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        model.head.weight.mul_(4.0)
    return model


def batch(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS[rank], H, generator=gen)
    labels = torch.randint(0, V, (TOKENS[rank],), generator=gen)
    labels[0] = -100
    return x, labels


def _loss(out, labels):
    return -(out.logprobs.sum() - 0.1 * out.entropy.sum()) / (labels != -100).sum()


def single_process_reference(lora: bool = False) -> dict:
    """The unsharded run: loss = mean over ranks of each rank's loss (DDP/FSDP2 average the
    gradients), one SGD step."""
    model = build(TinyLora if lora else Tiny)
    loss = sum(_loss(_op(model, model(x), model.head.weight, labels), labels)
               for x, labels in map(batch, range(WORLD))) / WORLD
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full_state(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _fsdp2(rank: int, naive: bool = False, per_shard: str = "auto", lora: bool = False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rlkern.ops import linear_logprobs

    linear_logprobs._PER_SHARD = per_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    model = build(TinyLora if lora else Tiny)
    fully_shard(model.body, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    x, labels = batch(rank)
    weight = model.head.weight.full_tensor() if naive else model.head.weight
    _loss(_op(model, model(x), weight, labels), labels).backward()
    grad = (model.lora_B if lora else model.head.weight).grad
    placements = tuple(repr(p) for p in grad.placements)
    opt.step()
    linear_logprobs._PER_SHARD = "auto"
    return _full_state(model), placements


def _qwen2():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _tiny_models import tiny_qwen2, tiny_tokenizer

    return tiny_qwen2(tiny_tokenizer(n_words=90), hidden_size=32)


def qwen2_batch(rank: int):
    gen = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, 96, (2, 7 + 2 * rank), generator=gen)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def _params(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


def trl_single_process_reference() -> dict:
    model = _qwen2()
    loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in map(qwen2_batch, range(WORLD))) / WORLD
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return _params(model)


def _trl_fsdp2(rank: int, patched: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from trl.trainer import utils as trl_utils

    import rlkern.integrations.trl as rt

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _qwen2()
    trl_utils.add_fused_lm_head(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ids, labels = qwen2_batch(rank)
    if patched:
        rt.patch()
    try:
        before = rt.calls["ChunkedLogProbFunction"]
        model(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
        calls = rt.calls["ChunkedLogProbFunction"] - before
    finally:
        rt.unpatch()
    opt.step()
    return _params(model), calls


def _ddp(rank: int):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(build(WithLogprobs))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, labels = batch(rank)
    _loss(model(x, labels), labels).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def worker(rank: int, init_file: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from rlkern.ops import linear_logprobs

    calls = []
    per_shard = linear_logprobs._fsdp_per_shard

    def counted(*args, **kwargs):
        out = per_shard(*args, **kwargs)
        calls.append(out is not None)
        return out

    linear_logprobs._fsdp_per_shard = counted
    result = {}
    try:
        result["fsdp2"], result["fsdp2_grad_placements"] = _fsdp2(rank)
        result["per_shard_calls"] = sum(calls)
        result["fsdp2_gather"], _ = _fsdp2(rank, per_shard="never")
        result["fsdp2_lora"], result["fsdp2_lora_grad_placements"] = _fsdp2(rank, lora=True)
        result["fsdp2_naive"], _ = _fsdp2(rank, naive=True)
        result["ddp"] = _ddp(rank)
        result["trl_fsdp2"], result["trl_fsdp2_calls"] = _trl_fsdp2(rank, patched=True)
        result["trl_fsdp2_unpatched"], _ = _trl_fsdp2(rank, patched=False)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        if rank == 0:
            torch.save(result, out)
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), sys.argv[1]), nprocs=WORLD, join=True)
