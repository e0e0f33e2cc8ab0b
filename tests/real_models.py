"""Tiny randomly initialised models of real libraries (transformers 5, timm, torch.nn), built
from configs (nothing is downloaded), and the gauge check that proves CM pairs their heads.

Shared by ``tests/test_real_models.py`` and ``bench/model_survey.py``.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from cm_triton.groups import group_layout, head_views


def _torchvision_importable_beside_cpu_torch() -> None:
    """PyPI's torchvision wheels are CUDA builds: beside the CPU torch wheel their compiled ops
    cannot load, and ``import torchvision`` then fails registering fake kernels for two of them
    (``operator torchvision::nms does not exist``). transformers and timm import torchvision,
    and these tests use none of its ops: defining the two schemas lets the Python part import.
    Any call of those ops would still fail loudly (no kernel)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when torchvision's ops loaded
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_importable_beside_cpu_torch.lib = lib  # keep the definitions alive


_torchvision_importable_beside_cpu_torch()


V = 100  # vocabulary of the tiny language models
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=V)


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and what CM should make of it.

    ``attention``: ``(kind, layout)`` of the attention groups param_groups must find (with
    multiplicity); ``qk_matrix``: no RoPE and no q/k norm, so the QK gauge may use a full
    dh x dh matrix (otherwise per-head scalars); ``vo_matrix`` likewise for V/O (gated outputs
    allow only scalars); ``unhandled``: modules param_groups must warn about.
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[nn.Module], dict]
    attention: tuple[tuple[str, str | None], ...]
    qk_matrix: bool = False
    vo_matrix: bool = True
    unhandled: tuple[str, ...] = ()


def _tokens(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, V, (2, 8), generator=g)}


def _tokens_and_memory(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(2)
    return _tokens(model) | {"encoder_hidden_states": torch.randn(2, 5, 64, generator=g)}


def _seq2seq(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, V, (2, 8), generator=g),
            "decoder_input_ids": torch.randint(0, V, (2, 6), generator=g)}  # fmt: skip


def _images(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _timm_images(model: nn.Module) -> dict:
    return {"x": _images(model)["pixel_values"]}


def _seq(d: int) -> Callable[[nn.Module], dict]:
    def make(model: nn.Module) -> dict:
        g = torch.Generator().manual_seed(1)
        return {"src": torch.randn(2, 6, d, generator=g), "tgt": torch.randn(2, 5, d, generator=g)}

    return make


def _hf(config_name: str, model_name: str, **cfg):
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        model = getattr(transformers, model_name)(config)
        if hasattr(model, "set_experts_implementation"):
            try:  # the grouped-mm experts kernel has no float64 path on the CPU
                model.set_experts_implementation("eager")
            except (ValueError, AttributeError):
                pass
        return model

    return build


def _timm(name: str, **kw):
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2,
                                 embed_dim=64, num_heads=4, num_classes=10, **kw)  # fmt: skip

    return build


class _Seq2Seq(nn.Module):
    """``nn.Transformer`` with a cross-attention whose memory is narrower (kdim/vdim)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1,
                                          num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                                          batch_first=True)  # fmt: skip
        self.cross = nn.MultiheadAttention(32, 4, kdim=24, vdim=20, batch_first=True)
        self.mem = nn.Linear(32, 24)

    def forward(self, src, tgt):
        y = self.transformer(src, tgt)
        m = self.mem(src)
        return y + self.cross(y, m, m[..., :20])[0]


QK_VO = (("qk", None), ("ov", None))
# DeepSeek-V2/V3: multi-head latent attention and a MoE MLP after one dense layer.
MLA = dict(COMMON, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1)  # fmt: skip
# Qwen3-Next / Qwen3.5: a linear-attention layer, then a gated full-attention one.
QWEN_HYBRID = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                   linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"],
                   rms_norm_eps=0.0)  # fmt: skip
L2 = 2  # layers of every tiny model


def _llama_like(cfg_name, model_name, **extra):
    cfg = dict(COMMON, num_attention_heads=4, num_key_value_heads=2) | extra
    return _hf(cfg_name, model_name, **cfg)


FAMILIES: dict[str, Family] = {
    "llama": Family(_llama_like("LlamaConfig", "LlamaForCausalLM"), _tokens, QK_VO * L2),
    "mistral": Family(
        _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=4), _tokens, QK_VO * L2
    ),  # fmt: skip
    "qwen2": Family(_llama_like("Qwen2Config", "Qwen2ForCausalLM"), _tokens, QK_VO * L2),
    # q/k RMSNorm: eps 0 keeps the per-head scalar gauge exact (RMSNorm(a x) = sign(a) RMSNorm(x))
    "qwen3": Family(
        _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=32, rms_norm_eps=0.0),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "gemma": Family(
        _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=32), _tokens, QK_VO * L2
    ),  # fmt: skip
    "gemma2": Family(
        _llama_like(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=4,
        ),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "gemma3": Family(
        _llama_like(
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=4,
            rms_norm_eps=0.0,
        ),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "mixtral": Family(
        _llama_like(
            "MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2
        ),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "gpt_oss": Family(
        _hf(
            "GptOssConfig",
            "GptOssForCausalLM",
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            vocab_size=V,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "qwen3_next": Family(
        _hf(
            "Qwen3NextConfig",
            "Qwen3NextForCausalLM",
            **QWEN_HYBRID,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        _tokens,
        (("attention", "gated_q"),),
        vo_matrix=False,
        unhandled=("linear_attn",),
    ),  # fmt: skip
    "qwen3_5": Family(
        _hf("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", **QWEN_HYBRID),
        _tokens,
        (("attention", "gated_q"),),
        vo_matrix=False,
        unhandled=("linear_attn",),
    ),  # fmt: skip
    "deepseek_v3": Family(
        _hf(
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            **MLA,
            num_key_value_heads=4,
            n_group=2,
            topk_group=1,
        ),
        _tokens,
        (("attention", "mla"),) * L2,
        qk_matrix=True,  # the no-RoPE pair: no RoPE, no norm on its heads
    ),  # fmt: skip
    "deepseek_v2": Family(
        _hf("DeepseekV2Config", "DeepseekV2ForCausalLM", **MLA),
        _tokens,
        (("attention", "mla"),) * L2,
        qk_matrix=True,
    ),  # fmt: skip
    # DeepSeek-V2-Lite's form: no q latent (q_lora_rank None), q_proj from the hidden state.
    "deepseek_v2_lite": Family(
        _hf("DeepseekV2Config", "DeepseekV2ForCausalLM", **(MLA | dict(q_lora_rank=None))),
        _tokens,
        (("attention", "mla"),) * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "phi3": Family(
        _llama_like(
            "Phi3Config", "Phi3ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2
        ),
        _tokens,
        (("attention", "qkv_blocks"),) * L2,
    ),
    "falcon_gqa": Family(
        _hf(
            "FalconConfig",
            "FalconForCausalLM",
            hidden_size=64,
            num_hidden_layers=2,
            vocab_size=V,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
        ),
        _tokens,
        (("attention", "qkv_grouped"),) * L2,
    ),  # fmt: skip
    "falcon_mqa": Family(
        _hf(
            "FalconConfig",
            "FalconForCausalLM",
            hidden_size=64,
            num_hidden_layers=2,
            vocab_size=V,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            bias=True,
        ),
        _tokens,
        (("attention", "qkv_blocks"),) * L2,
    ),  # fmt: skip
    "falcon_mha": Family(
        _hf(
            "FalconConfig",
            "FalconForCausalLM",
            hidden_size=64,
            num_hidden_layers=2,
            vocab_size=V,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=False,
            bias=True,
        ),
        _tokens,
        (("attention", "qkv_interleaved"),) * L2,
    ),  # fmt: skip
    "gpt_neox": Family(
        _hf(
            "GPTNeoXConfig", "GPTNeoXForCausalLM", **COMMON, num_attention_heads=4, rotary_pct=0.25
        ),
        _tokens,
        (("attention", "qkv_interleaved"),) * L2,
    ),  # fmt: skip
    "hf_vit": Family(
        _hf(
            "ViTConfig",
            "ViTForImageClassification",
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
            qkv_bias=True,
        ),
        _images,
        QK_VO * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "opt": Family(
        _hf(
            "OPTConfig",
            "OPTForCausalLM",
            vocab_size=V,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            enable_bias=True,
        ),
        _tokens,
        QK_VO * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "bart": Family(
        _hf(
            "BartConfig",
            "BartForConditionalGeneration",
            vocab_size=V,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=64,
        ),
        _seq2seq,
        QK_VO * 6,
        qk_matrix=True,
    ),  # fmt: skip
    "gptj": Family(
        _hf(
            "GPTJConfig",
            "GPTJForCausalLM",
            vocab_size=V,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            rotary_dim=8,
            n_inner=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "gpt2_cross": Family(
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            vocab_size=V,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            bos_token_id=0,
            eos_token_id=0,
            add_cross_attention=True,
        ),
        _tokens_and_memory,
        (("attention", "qkv_blocks_t"),) * L2 + (("attention", "q_kv_t"),) * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "bert": Family(
        _hf(
            "BertConfig",
            "BertForMaskedLM",
            vocab_size=V,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            type_vocab_size=2,
        ),
        _tokens,
        QK_VO * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "t5": Family(
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=V,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        ),
        _seq2seq,
        QK_VO * 6,
        qk_matrix=True,
    ),  # fmt: skip
    "phi": Family(
        _hf(
            "PhiConfig",
            "PhiForCausalLM",
            vocab_size=V,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            partial_rotary_factor=0.5,
        ),
        _tokens,
        QK_VO * L2,
    ),  # fmt: skip
    "gpt2": Family(
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            vocab_size=V,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
        _tokens,
        (("attention", "qkv_blocks_t"),) * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "timm_vit": Family(
        _timm("vit_base_patch16_224", reg_tokens=1),
        _timm_images,
        (("attention", "qkv_blocks"),) * L2,
        qk_matrix=True,
    ),  # fmt: skip
    "timm_vit_map": Family(
        _timm("vit_base_patch16_224", global_pool="map", class_token=False),
        _timm_images,
        (("attention", "qkv_blocks"),) * L2 + (("attention", "q_kv"),),
        qk_matrix=True,
    ),  # fmt: skip
    "nn_transformer": Family(
        _Seq2Seq, _seq(32), (("mha", None),) * 3 + QK_VO, qk_matrix=True
    ),  # fmt: skip
}


# -- the gauge check ----------------------------------------------------------------------
def biases(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(weight) -> bias`` along the weight's output axis, for every biased projection."""
    out: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
            if m.in_proj_weight is not None:
                out[id(m.in_proj_weight)] = m.in_proj_bias
            else:
                for w, b in zip((m.q_proj_weight, m.k_proj_weight, m.v_proj_weight),
                                m.in_proj_bias.split(m.embed_dim)):  # fmt: skip
                    out[id(w)] = b
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and b.dim() == 1:
            out.setdefault(id(w), b)
    return out


def _invertible(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` well-conditioned random ``n x n`` matrices (float64)."""
    return (
        torch.eye(n, dtype=torch.float64)
        + 0.3 * torch.randn(k, n, n, generator=g, dtype=torch.float64) / n**0.5
    )


def _signed_pow2(k: int, g: torch.Generator) -> torch.Tensor:
    """Per-head scalars ``±2^{-1,0,1}``: exact in floating point, and signs test the pairing
    even through a q/k RMSNorm, which cancels any positive scale."""
    mag = 2.0 ** torch.randint(-1, 2, (k,), generator=g).double()
    sign = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).double()
    return mag * sign


def _factor_views(h, is_o: bool, group: dict, named: dict, role: dict, bias: dict) -> list:
    """A factor's heads (the public ``head_views``), and for q/k/v their bias rows (o's bias
    is on the model width, not per head); heads run along the output axis, with the bias."""
    out = [named[role[id(h)]]]
    b = bias.get(id(group["params"][h.param]))
    if b is not None and not is_o:
        out.append(h.view(b.detach()[:, None] if h.axis == 0 else b.detach()[None]))
    return out


@torch.no_grad()
def apply_gauge(model: nn.Module, groups: list[dict], fam: Family, seed: int = 0) -> None:
    """Transform every attention pair by a random element of its gauge group, through the
    groups' own head views: ``(Q_h, K_g) -> (A_g^T Q_h, A_g^{-1} K_g)`` and
    ``(V_g, O_h) -> (B_g V_g, O_h B_g^{-1})`` (biases with their rows). The composed maps
    ``Q_h^T K_g`` and ``O_h V_g`` are unchanged exactly when the views are the true heads."""
    g = torch.Generator().manual_seed(seed)
    bias = biases(model)
    for group in (gr for gr in groups if gr["kind"] in ("qk", "ov", "mha", "attention")):
        layout, named = group_layout(group), head_views(group)
        role = {id(h): n for n, h in layout.entries()}
        views = partial(_factor_views, group=group, named=named, role=role, bias=bias)
        for pair in layout.pairs:
            # The main pairs take the family's gauge; extra pairs (MLA's RoPE part, whose
            # k_pe all heads share, through RoPE) only a shared signed scalar.
            matrix = {"qk": fam.qk_matrix, "ov": fam.vo_matrix}.get(pair.name, False)
            p_views, s_views = views(pair.p, pair.kind == "ov"), views(pair.s, False)
            hkv, dh = s_views[0].shape[-3], s_views[0].shape[-2]
            if matrix:
                a = _invertible(dh, hkv, g)
            else:
                a = _signed_pow2(hkv, g)[:, None, None] * torch.eye(dh, dtype=torch.float64)
            a_inv = torch.linalg.inv(a)
            # q/k: P heads get A^T, the shared head A^{-1}. v/o: V gets B, O_h B^{-1}, i.e. the
            # transposed o view (O_h^T) gets B^{-T}.
            p_map, s_map = (a.mT, a_inv) if pair.kind == "qk" else (a_inv.mT, a)
            for x in s_views:
                x.copy_((s_map.to(x.dtype) @ x.reshape(hkv, dh, -1)).reshape(x.shape))
            for x in p_views:
                grouped = x.reshape(hkv, -1, *x.shape[-2:])
                x.copy_((p_map.to(x.dtype)[:, None] @ grouped).reshape(x.shape))


def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"no logits in {type(out).__name__}")


def randomise(model: nn.Module, seed: int = 0) -> None:
    """O(1) weights and non-zero biases: zero biases and 0.02-std weights would leave the bias
    handling untested and the softmax almost uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.3 if p.dim() < 2 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def gauge_diff(name: str, groups: list[dict] | None = None) -> tuple[float, float]:
    """Build ``name`` in float64, apply the gauge through ``param_groups``'s views; return the
    largest change of the output and the output's largest magnitude."""
    from cm_triton import param_groups

    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = fam.build().double().eval()
    randomise(model)
    if groups is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = param_groups(model)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in fam.inputs(model).items()}
    before = forward(model, inputs)
    apply_gauge(model, groups, fam)
    after = forward(model, inputs)
    return (after - before).abs().max().item(), before.abs().max().item()
