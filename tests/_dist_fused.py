"""2-process gloo (CPU) runs for the fused LM-head losses under FSDP2:
``python tests/_dist_fused.py OUT`` (tests/test_linear_preference.py runs it).

As tests/_dist_heads.py (whose tiny model it reuses): each rank holds its own batch; the body
and the head are ``fully_shard``ed, so ``head.weight`` (and a LoRA adapter's A and B) are Shard(0)
DTensors that ``rlkern.linear_policy_loss`` / ``linear_preference_loss`` / ``linear_kto_loss``
take as they are. One backward and one SGD step; rank 0 saves the full weights after the step
to OUT under ``"<loss>"`` and ``"<loss>_lora"`` (and ``error``, a traceback, if a set-up raised).
``single_process_reference(loss, lora)`` is the unsharded run they must match: the mean of the
ranks' losses (FSDP2 averages the gradients), one process.

``trl_<trainer>_fused`` / ``trl_<trainer>_loss``: TRL's GRPOTrainer / DPOTrainer ``_compute_loss``
(tests/test_trl_fused.py's trainers, real tiny Qwen2 models with TRL's fused head) on a
``fully_shard``ed policy (each layer, lm_head, the root), one SGD step, with
``patch(loss="fused")`` (the captured DTensor head gathered by the fused loss) and with
``patch(loss=True)`` (rlkern's fused head, tested in tests/test_lm_heads.py), and
``trl_<trainer>_fused_calls`` (the fused loss' call counter).
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_heads as heads  # noqa: E402

import rlkern  # noqa: E402

LOSSES = ("policy", "preference", "kto")
LENGTHS = (6, 5)  # uneven batches


def batch(rank: int):
    gen = torch.Generator().manual_seed(300 + rank)
    t = LENGTHS[rank]
    x = torch.randn(2, t, heads.H, generator=gen)
    labels = torch.randint(0, heads.V, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, -1] = False
    ref = -torch.rand(2, t, generator=gen) * 3 - 1
    return dict(x=x, labels=labels, mask=mask, ref=ref, old=ref + 0.2 * torch.randn(2, t, generator=gen),
                adv=torch.randn(2, generator=gen), desirable=torch.tensor([True, rank == 1]))


def fused_loss(loss: str, model, data):
    hidden = model(data["x"])
    lora = (dict(lora_A=model.lora_A, lora_B=model.lora_B, lora_scaling=2.0)
            if isinstance(model, heads.TinyLora) else {})
    w, labels, mask, ref = model.head.weight, data["labels"], data["mask"], data["ref"]
    if loss == "policy":
        return rlkern.linear_policy_loss(hidden, w, labels, data["old"], data["adv"], mask, ref_logprobs=ref,
                                         kl_coef=0.1, entropy_coef=0.05, chunk_size=4, **lora)[0]
    if loss == "preference":
        return rlkern.linear_preference_loss(hidden, w, labels, mask, ref, beta=0.5, **lora)[0]
    return rlkern.linear_kto_loss(hidden, w, labels, mask, ref, data["desirable"], torch.tensor([0.3]),
                                  torch.zeros(1), beta=0.5, chunk_size=3, **lora)[0]


def single_process_reference(loss: str, lora: bool = False) -> dict:
    model = heads.build(heads.TinyLora if lora else heads.Tiny)
    total = sum(fused_loss(loss, model, batch(rank)) for rank in range(heads.WORLD)) / heads.WORLD
    total.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=heads.LR).step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fsdp2(rank: int, loss: str, lora: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (heads.WORLD,))
    model = heads.build(heads.TinyLora if lora else heads.Tiny)
    fully_shard(model.body, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=heads.LR)
    fused_loss(loss, model, batch(rank)).backward()
    opt.step()
    return heads._full_state(model)


def _trl(rank: int, trainer: str, loss):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import rlkern.integrations.trl as rt
    import test_trl_fused as tf

    mesh = init_device_mesh("cpu", (heads.WORLD,))
    if trainer == "grpo":
        model = tf._model()
        options = dict(loss_type="dr_grpo", beta=0.04)
        instance = tf._trainer(model, options, "fp32")
        inputs = tf._inputs(model, dict(options), seed=rank)
    else:
        model, ref = tf._dpo_models(False)
        instance = tf._dpo_trainer(model, ref, dict(loss_type="sigmoid"))
        inputs = tf._dpo_inputs(model.config.vocab_size, seed=rank)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=heads.LR)
    cls = type(instance)
    rt.patch(loss=loss)
    try:
        key = f"{cls.__name__}._compute_loss[fused]"
        before = rt.calls[key]
        args = (instance, model, inputs) if trainer == "grpo" else (instance, model, inputs, False)
        cls._compute_loss(*args).backward()
        calls = rt.calls[key] - before
    finally:
        rt.unpatch()
    opt.step()
    return heads._params(model), calls


def worker(rank: int, init_file: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=heads.WORLD)
    result = {}
    try:
        for loss in LOSSES:
            result[loss] = _fsdp2(rank, loss, False)
            result[f"{loss}_lora"] = _fsdp2(rank, loss, True)
        for trainer in ("grpo", "dpo"):
            result[f"trl_{trainer}_fused"], result[f"trl_{trainer}_fused_calls"] = _trl(rank, trainer, "fused")
            result[f"trl_{trainer}_loss"], _ = _trl(rank, trainer, True)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        if rank == 0:
            torch.save(result, out)
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), sys.argv[1]), nprocs=heads.WORLD, join=True)
