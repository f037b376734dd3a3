"""A frozen base sharded across processes, a head whole on every one: what the rest of backattn needs to know.

A base too large for one device is loaded sharded by Transformers itself,
``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=world_size))`` (FSDP2 ``fully_shard`` on
its decoder blocks, its embedding table and the model): every base weight is then a ``DTensor`` holding
``1/world_size`` of the rows on each process, gathered while the module that owns it runs. A head added *after*
loading (``model.add_head``) stays an ordinary tensor, whole on every process; the Transformers ``Trainer``
broadcasts it from rank 0 and averages its gradients over the processes (it does so for any trainable parameter
that FSDP2 does not manage), so the head trains data-parallel on a sharded base. ``train_sft.py --shard_base``
does exactly this; ``docs/distributed.md`` has the launch commands.

Two things differ from an unsharded base, and this module handles both:

- the head reads the embedding table (and the output layer) directly, not through the modules' forwards, so
  without the base running (training from a feature cache) nothing would gather them:
  :func:`gather_output_tables` does, before the head reads them;
- anything that reads a whole base tensor (the embedding fingerprint of head files, the feature cache's key)
  must gather it on every process at once: :func:`full_tensor` is that gather, a collective.

Imports torch alone, so that the model files still load with ``trust_remote_code=True``.
"""

from __future__ import annotations

import torch


def is_sharded_tensor(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a tensor spread over processes)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model) -> bool:
    """Whether ``model``'s base was sharded at load time (``from_pretrained(distributed_config=...)``, FSDP2)."""
    return bool(getattr(model, "_is_fsdp_managed_module", False)) or any(
        is_sharded_tensor(parameter) for parameter in model.parameters()
    )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` gathered from every process (a collective: every process must call it, in
    the same order), any other tensor as it is."""
    return tensor.full_tensor() if is_sharded_tensor(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor``; any other tensor as it is. No communication."""
    return tensor.to_local() if is_sharded_tensor(tensor) else tensor


def gather_output_tables(model) -> None:
    """Gather the embedding table and the output layer of a sharded base (no-op otherwise).

    FSDP2 gathers a module's weights when that module's forward runs; the head reads ``E`` and ``W_out`` as
    tensors, and while training from cached features the base (embedding included) does not run at all. Each
    process then holds these two tables whole for the step (the head needs all ``V`` rows of them anyway).
    A collective: called from ``forward``, which every process of a sharded run calls in step.
    """
    if not getattr(model, "_is_fsdp_managed_module", False):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if isinstance(module, FSDPModule):
            module.unshard()
