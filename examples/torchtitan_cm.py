"""CompositionalMuon as torchtitan's optimizer (torchtitan 0.3.0): a documented example.

Not run by the tests: torchtitan 0.3.0's trainer does not run on a CPU as shipped (it picks
its device at import as "cuda" when no accelerator is found, its language models attend with
flex_attention, which has no backward on the CPU, and its memory monitor and process-group
barrier call CUDA-only APIs). On 2026-12-01 this container trained a tiny Llama3 through
torchtitan's own ``Trainer`` on the CPU (gloo, one process) only after five monkeypatches of
those internals, with SDPA standing in for flex attention; that is a test of the patches
more than of torchtitan, so it is not in CI. On a GPU machine, use it as below.

torchtitan 0.3.0 has no optimizer registry: a subclass of ``OptimizersContainer`` with its
own nested ``Config`` is the extension point (``Trainer.Config(optimizer=...)``); the
trainer builds it with ``config.optimizer.build(model_parts=...)``.

    from torchtitan.trainer import Trainer
    cfg = Trainer.Config(..., optimizer=CMOptimizersContainer.Config(lr=0.02, adamw_lr=3e-3))
"""

from __future__ import annotations

import dataclasses

from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.models.common.attention import FusedQKVLinear, GQAttention

import cm_triton
from cm_triton import CompositionalMuon


def titan_param_groups(model, **cm_options) -> list[dict]:
    """CompositionalMuon's groups for a torchtitan decoder. Each ``GQAttention`` with a fused
    ``wqkv`` is CM's ``"qkv_grouped"`` layout (per KV group ``[q_1 .. q_G; k; v]``, the order
    torchtitan's own ``_split_qkv_on_save`` reads); everything else as ``param_groups`` routes
    it. ``param_names`` (torchtitan's FQNs) make the container's checkpoint work."""
    attn = []
    for name, m in model.named_modules():
        if isinstance(m, GQAttention) and isinstance(m.qkv_linear, FusedQKVLinear):
            attn.append({"kind": "attention", "layout": "qkv_grouped", "module": name,
                         "params": [m.qkv_linear.wqkv.weight, m.wo.weight],
                         "head_dim": m.head_dim, "num_heads": m.n_heads,
                         "num_kv_heads": m.n_kv_heads, **cm_options})  # fmt: skip
    taken = {id(p) for g in attn for p in g["params"]}
    rest = []
    for g in cm_triton.param_groups(model, attention=False):
        params = [p for p in g["params"] if id(p) not in taken]
        if params:
            rest.append(dict(g, params=params))
    names = {id(p): canonical_fqn(n) for n, p in model.named_parameters()}
    groups = attn + rest
    for g in groups:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return groups


class CMOptimizersContainer(OptimizersContainer):
    """torchtitan's optimizer container holding one CompositionalMuon per model part."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        lr: float = 0.02
        adamw_lr: float = 3e-3
        cm_options: dict = dataclasses.field(default_factory=dict)

    def __init__(self, config: Config, *, model_parts) -> None:
        self.model_parts = model_parts
        self.optimizers = []
        params = []
        for model in model_parts:
            opt = CompositionalMuon(titan_param_groups(model, **config.cm_options),
                                    lr=config.lr, adamw_lr=config.adamw_lr)  # fmt: skip
            self.optimizers.append(opt)
            params += [p for g in opt.param_groups for p in g["params"]]
        self._validate_params(params)
        self._post_init(params)
