"""What the recipes share: a tiny Llama built from a config (nothing is downloaded) and
byte-level text that ships inside every CPython (``pydoc_data.topics``).

Swap ``tiny_llama`` for your model and ``text_chunks`` for your data: nothing else in a recipe
depends on them.
"""

from __future__ import annotations

from pydoc_data.topics import topics

import torch


def text_chunks(seq_len: int = 64, limit: int = 200_000) -> torch.Tensor:
    """CPython's documentation topics as bytes, cut into ``(n, seq_len)`` token ids (vocab 256)."""
    data = "\n".join(topics[k] for k in sorted(topics)).encode()[:limit]
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


class Chunks(torch.utils.data.Dataset):
    """``text_chunks`` as a dataset of ``{"input_ids", "labels"}`` (a causal LM shifts them)."""

    def __init__(self, seq_len: int = 64) -> None:
        self.ids = text_chunks(seq_len)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GQA Llama (width 64, 4 query heads of 16, 2 KV heads), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg)
