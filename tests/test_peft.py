"""PEFT (LoRA) fine-tuning: attention seen through PEFT's wrappers, nothing mis-reported.

A tiny Llama from a config, wrapped by ``peft.get_peft_model`` with LoRA on q/k/v/o: the base
weights are frozen, so CM has nothing to pair; the adapters are trainable low-rank matrices
and go to Muon, with a log line that says so. No ``UnhandledAttentionWarning``, and no error
under ``unrecognised="raise"``: every part of the model is understood.
"""

from __future__ import annotations

import logging
import warnings

import torch
from helpers import optional
from real_models import FAMILIES

from cm_triton import CompositionalMuon, param_groups
from cm_triton.discovery import UnhandledAttentionWarning

peft = optional("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _lora_llama(seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES["llama"].build()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def _strict_groups(model, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnhandledAttentionWarning)  # a warning fails the test
        with caplog.at_level(logging.INFO, logger="cm_triton"):
            return param_groups(model, unrecognised="raise")


def test_lora_model_is_understood_without_warning_or_error(caplog):
    model = _lora_llama()
    groups = _strict_groups(model, caplog)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable  # frozen base: no group
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and adapters == trainable  # LoRA trains only its adapters
    # 2 layers x 4 projections x (lora_A, lora_B), all in Muon groups
    muon = {id(p) for g in groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == adapters and len(adapters) == 16
    assert not any(g["kind"] in ("qk", "ov", "attention") for g in groups)
    assert "16 adapter matrices" in caplog.text and "go to Muon" in caplog.text
    assert "2 x LlamaAttention: attention found, its weights are frozen" in caplog.text
    assert "layout qk+ov" not in caplog.text  # the log counts only what CM steps


def test_unfrozen_base_through_the_wrappers_is_paired(caplog):
    # The same wrappers with the base weights trainable: CM pairs them through base_layer.
    model = _lora_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    groups = _strict_groups(model, caplog)
    pairs = [g for g in groups if g["kind"] in ("qk", "ov")]
    assert len(pairs) == 4
    attn = model.base_model.model.model.layers[0].self_attn
    assert pairs[0]["params"][0] is attn.q_proj.base_layer.weight
    assert "2 x LlamaAttention: layout qk+ov" in caplog.text


def test_a_frozen_factor_sends_its_partner_to_muon_and_says_so(caplog):
    torch.manual_seed(0)
    model = FAMILIES["llama"].build()
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight.requires_grad_(False)
    groups = _strict_groups(model, caplog)
    kinds = {id(p): g["kind"] for g in groups for p in g["params"]}
    assert id(attn.q_proj.weight) not in kinds
    assert kinds[id(attn.k_proj.weight)] == "muon"
    assert kinds[id(attn.v_proj.weight)] == "ov"
    assert "model.layers.0.self_attn: part of its qk pair is frozen" in caplog.text
    # layer 0 steps only its OV pair, layer 1 both: the log says exactly that
    assert "1 x LlamaAttention: layout ov," in caplog.text
    assert "1 x LlamaAttention: layout qk+ov," in caplog.text


def test_lora_fine_tune_lowers_the_loss(caplog):
    model = _lora_llama()
    opt = CompositionalMuon(_strict_groups(model, caplog), lr=0.02, adamw_lr=3e-3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 16), generator=g)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
