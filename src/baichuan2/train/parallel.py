"""Distributed training applied from outside the unchanged model (torchtitan style).

Launch with ``torchrun --nproc_per_node N -m baichuan2.cli pretrain ...``.  The
processes form a 2-D device mesh ``(dp, tp)``: tensor parallelism inside a
``tp`` group (``parallelize_module``: attention and MLP projections split
across ranks, Megatron-style), and FSDP2 (``fully_shard``, ZeRO-3) across the
``dp`` groups, as Baichuan 2 trained (tensor parallel inside a machine, ZeRO
data parallel across machines).

``W_pack`` stores [Wq; Wk; Wv] stacked, so an ordinary column split would give
a rank all of q and half of k.  It is distributed with a strided placement
(``_StridedShard(0, split_factor=3)``): rank r holds [q_r; k_r; v_r], the
attention reads its local head count from tensor shapes, and ``full_tensor()``
(checkpoints, releases) still yields the official [Wq; Wk; Wv] layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelArgs:
    tp: int = 1  # tensor-parallel degree (ranks per TP group); the rest of the world is FSDP data parallel
    reshard_after_forward: bool = True  # ZeRO-3 (True) or ZeRO-2-like (False) parameter resharding


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh with dims ("dp", "tp") when distributed
    dp_rank: int = 0
    dp_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(tp: int = 1, device: str = "auto") -> DistInfo:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on GPUs) and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu") if device in ("auto", "cuda") else torch.device(
        device)
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        if tp != 1:
            raise ValueError(f"tp={tp} needs {tp} processes; launch with torchrun --nproc_per_node {tp}")
        return DistInfo(device=dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if world % tp:
        raise ValueError(f"world size {world} is not divisible by tp={tp}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return DistInfo(rank=dist.get_rank(), world=world, local_rank=local_rank, device=dev, mesh=mesh,
                    dp_rank=mesh["dp"].get_local_rank(), dp_world=world // tp)


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder trunk (``BaichuanModel``: embeddings, ``layers``, norm) inside a causal LM, a reward model
    (``.lm``) or a peft wrapper."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and hasattr(m, "embed_tokens"):
            return m
    raise ValueError(f"{type(model).__name__} has no decoder trunk (a module with embed_tokens and layers)")


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh) -> None:
    """Split attention heads and the MLP hidden dimension across the ``tp`` ranks."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.distributed.tensor.placement_types import _StridedShard

    body = trunk(model)
    cfg = body.config
    tp = tp_mesh.size()
    if cfg.num_attention_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide the heads ({cfg.num_attention_heads}) and FFN width "
                         f"({cfg.intermediate_size})")

    class PackedQKVColwise(ColwiseParallel):
        """Column parallel for a stacked [Wq; Wk; Wv] weight: each rank keeps its slice of all three."""

        def _partition_linear_fn(self, name, module, device_mesh):
            for pname, param in module.named_parameters():
                dparam = torch.nn.Parameter(distribute_tensor(param, device_mesh, [_StridedShard(0, split_factor=3)]),
                                            requires_grad=param.requires_grad)
                module.register_parameter(pname, dparam)

            def forward(x):
                # DTensor's matmul rules do not understand the strided placement, so compute with the
                # rank's rows viewed as an ordinary row shard: out_local = x @ [q_r; k_r; v_r]^T.
                w = DTensor.from_local(module.weight.to_local(), device_mesh, [Shard(0)], run_check=False)
                return torch.nn.functional.linear(x, w)

            module.forward = forward

    plan = {
        "self_attn.W_pack": PackedQKVColwise(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in body.layers:
        parallelize_module(layer, tp_mesh, plan)
    heads = cfg.num_attention_heads // tp
    r = tp_mesh.get_local_rank()
    body.head_slice = slice(r * heads, (r + 1) * heads)  # this rank's ALiBi slopes


def apply_fsdp(model: torch.nn.Module, dp_mesh, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None) -> None:
    """ZeRO-3 over ``dp``: every decoder layer is its own FSDP unit, the rest (embeddings, heads) the root.

    Works on a causal LM, a reward model and a peft (LoRA) wrapper alike: frozen parameters are sharded like
    the others and simply get no gradient.  The root is not resharded after its forward (the backward would
    all-gather it again at once), which also lets objectives use the output head *after* the forward: DPO and
    PPO compute chunked log-probabilities from the final hidden states and ``lm_head``'s weight."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in trunk(model).layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})


def parallelize(model: torch.nn.Module, info: DistInfo, args: ParallelArgs,
                param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    if not info.distributed:
        return model
    if info.mesh["tp"].size() > 1:
        apply_tensor_parallel(model, info.mesh["tp"])
    if info.mesh["dp"].size() > 1:
        apply_fsdp(model, info.mesh["dp"], args.reshard_after_forward, param_dtype)
    return model


def all_reduce_sum(values: list[float], info: DistInfo, group=None) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient norm over plain and distributed (DTensor) gradients; clip in place when > max_norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    squares = []
    for g in grads:
        n = torch.linalg.vector_norm(g.float() if not isinstance(g, DTensor) else g, 2.0)
        if isinstance(n, DTensor):
            n = n.full_tensor()  # sums the shards' partial norms across ranks
        squares.append(n.to(torch.float32) ** 2)
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    if max_norm > 0 and torch.isfinite(total):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device) if not isinstance(g, DTensor) else coef.item())
    return total
