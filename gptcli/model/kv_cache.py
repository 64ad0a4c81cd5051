"""The key/value cache decoding feeds one token at a time through (``GPTModel.forward(cache=...)``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptcli.config import GPTConfig


@dataclass
class KVCache:
    """Keys and values of every layer for the positions seen so far.

    ``keys[l]`` and ``values[l]`` are (B, nh, max_len, hs); positions [0, length) are filled.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls, cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> "KVCache":
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, past: int,
               input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values (B, nh, T, hs) after ``past`` positions, or at ``input_pos``;
        the keys and values to attend over: (B, nh, past+T, hs), or the whole cache with ``input_pos``."""
        if input_pos is not None:
            self.keys[layer].index_copy_(2, input_pos, k)
            self.values[layer].index_copy_(2, input_pos, v)
            return self.keys[layer], self.values[layer]  # (B, nh, max_len, hs)
        T = k.shape[2]
        self.keys[layer][:, :, past : past + T] = k
        self.values[layer][:, :, past : past + T] = v
        return self.keys[layer][:, :, : past + T], self.values[layer][:, :, : past + T]
