"""CompositionalMuon on sharded parameters: FSDP2, tensor parallel, HSDP, FSDP2 x TP.

Everything is computed on ``to_local()`` shards with explicit collectives, never by implicit
DTensor redistribution. The parameters may live on a 1-D or 2-D ``DeviceMesh`` (or slices of
one, as FSDP2 x TP leaves the embeddings on its data-parallel slice);
``cm_triton.placement.blocks_of`` gives every rank's block of each one, and ``Comm`` numbers
the mesh's ranks in one flat group, with a group per mesh dimension. Spec §2.3: tensor
parallelism keeps heads whole, FSDP2's row shards keep q/k/v heads whole where they fall on
heads and cut o's rows (the model width), a replicate dimension repeats. ``Comm.attention``
picks a plan per batch from the blocks (``heads``; every rank computes every rank's blocks,
so all pick the same):

- ``"qk_local"``: every rank holds whole KV heads with exactly their query heads (FSDP2 and
  TP with Hq and Hkv divisible by the shard count): the step is local, **no collective**
  (every flag but per_mat_renorm, whose norms span all heads).
- ``"heads_local"``: the same for a whole attention group stored KV group after KV group
  (``heads.GROUP_MAJOR``: four projections, torchtitan's fused ``wqkv``), under TP.
- ``"ov_local"``: o's rows whole and each rank's V heads those of its O columns (tensor
  parallel: ``RowwiseParallel`` o, ``ColwiseParallel`` v): every leg local; the hybrid O sign
  (one sign over all of o_w) spans the ranks holding other heads (``_whole_sign``).
- ``"ov_sharded"`` (``heads.ov_sharded``): o's rows split along one mesh dimension
  (FSDP's), heads whole: **one all_reduce** over that dimension carries the O Grams (summed
  over the width) and the V Grams; the O leg per head one more for the Gram restart; hybrid,
  the sign over the ranks whose part differs: ``"gather"`` (one all_gather, the
  single-process sign) or ``"sharded"`` (Newton-Schulz with ``X X^T`` all-reduced each step,
  where only rows or only columns are split), by a cost estimate (``o_sign="auto"``). For
  Gram-form flags (``reference.phases.fusable``).
- ``"heads_gather"``: a 2-D mesh whose blocks cut heads, or flags ``ov_sharded`` does not take,
  where the ranks along one mesh dimension together hold whole heads (FSDP2 x TP: a TP rank's;
  HSDP: a replica's): the pair is gathered over that dimension only and stepped there.
- ``"gather"``: anything else (fused q/k/v, MLA, uneven heads, per_mat_renorm): the pair's
  weights and direction (and momentum where the step reads it) are all-gathered over every
  rank (**one all_gather**), the single-process step runs on every rank, each keeps its block.
- Muon (``muon_owner``): matrices split into blocks (rows under FSDP2, columns under TP, both
  under FSDP2 x TP) are orthogonalised once, on one owner rank each (microsoft/dion's scheme;
  owners rotate over every rank, replicas included): one all_to_all sends each distinct block
  to its owner (a replica sends nothing its twin sent), one sends every rank its block back.
  Expert stacks sharded along the expert axis hold whole matrices: local.
- AdamW: elementwise on the shards, local.

Replicated parameters (plain tensors, as DDP keeps them: identical on every rank) with a
process group: ``replicated="split"`` (the default) splits each batch's L stacked entries
(layers) into contiguous chunks of ``ceil(L / W)``, rank r computes the step of its chunk
(the chunks' first rank rotates over the step's batches, so small batches spread), and
**one all_gather** per batch (chunks padded to equal sizes, all of a batch's weight stacks in
one buffer) brings every rank the full new weights: plan ``"replicated_split"`` (attention)
or ``"muon_replicated_split"``. The momentum update is elementwise (``beta m + G``; Muon's
``m mom + G`` for Muon rows), so every rank computes it for all L with the rule's own
expression, bit for bit, and nothing more is sent; ``momentum_reproject`` writes a projected
momentum, which is gathered with the weights instead. Batched products on 3-D contiguous
stacks are batch-invariant on the CPU, so the result equals the single-process step bit for
bit; where a one-entry chunk of a longer batch would round differently (``_one_entry_differs``)
that rank computes a neighbouring entry along. Whatever the device, every rank ends the step
with the same gathered bytes: the replicas never drift apart. ``replicated="every_rank"``:
every rank computes everything (plan ``"local"``), and with no DTensor parameter there is no
communicator at all (zero collectives, as without a group). Replicated DTensors (``Replicate``
placements) keep the ``"local"`` plan.

Every decision that could differ between ranks (non-finite gradients, a non-finite result) is
agreed by an all_reduce first, so no rank ever waits in a collective another rank skipped.
``Comm.counts`` holds the last step's collectives, by kind; ``Comm.by_plan`` by the plan that
issued them (``"agree"``: the agreements); ``Comm.sent`` the bytes this rank sent.
"""

from cm_triton.distributed.comm import (
    O_SIGN_STRATEGIES,
    REPLICATED,
    Comm,
    Group,
    check_replicated,
    comm_for,
    o_sign_cost,
)

__all__ = ["Comm", "Group", "O_SIGN_STRATEGIES", "REPLICATED", "check_replicated", "comm_for",
           "o_sign_cost"]  # fmt: skip
