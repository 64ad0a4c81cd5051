"""Parameter counts and weight memory, by arithmetic on a config. No torch here.

The counts follow the modules in ``gptcli.model.gpt`` one for one; a test checks them against
``sum(p.numel())`` of each shipped config built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptcli.config import GPTConfig

# Bytes per parameter for the weight-memory figures.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class BlockParams:
    attention: int  # fused Q, K, V projections (+ bias when qkv_bias) and the output projection
    feed_forward: int  # emb_dim -> 4*emb_dim -> emb_dim, with biases
    norms: int  # norm1 and norm2, scale and shift each

    @property
    def total(self) -> int:
        return self.attention + self.feed_forward + self.norms


@dataclass(frozen=True)
class ParamCount:
    token_embedding: int
    position_embedding: int
    block: BlockParams
    n_layers: int
    final_norm: int
    output_head: int  # the separate head matrix; 0 when tied to the token embedding
    head_matrix: int  # vocab_size * emb_dim, the head's size whether or not it is shared
    tie_weights: bool

    @property
    def blocks(self) -> int:
        return self.block.total * self.n_layers

    @property
    def total(self) -> int:
        """Parameters of the model as built (with its own tying)."""
        return self.token_embedding + self.position_embedding + self.blocks + self.final_norm + self.output_head

    @property
    def tied(self) -> int:
        """The count when the head shares the token-embedding matrix."""
        return self.total - self.output_head

    @property
    def untied(self) -> int:
        """The count when the head has its own matrix."""
        return self.tied + self.head_matrix

    @property
    def non_embedding(self) -> int:
        """Without token and position embeddings (and without a separate head), as in the scaling-law papers."""
        return self.tied - self.token_embedding - self.position_embedding

    def memory_bytes(self) -> dict[str, int]:
        return weight_memory(self.total)

    def breakdown(self) -> list[tuple[str, int]]:
        """(row label, count) rows that add up to ``total``."""
        b = self.block
        return [
            ("token embedding (tok_emb)", self.token_embedding),
            ("position embedding (pos_emb)", self.position_embedding),
            (f"attention (att) x {self.n_layers}", b.attention * self.n_layers),
            (f"feed-forward (ff) x {self.n_layers}", b.feed_forward * self.n_layers),
            (f"layer norms (norm1, norm2) x {self.n_layers}", b.norms * self.n_layers),
            ("final norm (final_norm)", self.final_norm),
            ("output head (out_head)" + (", tied to tok_emb" if self.tie_weights else ""), self.output_head),
        ]

    def to_dict(self) -> dict:
        b = self.block
        return {
            "total": self.total,
            "tied": self.tied,
            "untied": self.untied,
            "non_embedding": self.non_embedding,
            "tie_weights": self.tie_weights,
            "breakdown": {
                "token_embedding": self.token_embedding,
                "position_embedding": self.position_embedding,
                "per_block": {"attention": b.attention, "feed_forward": b.feed_forward, "norms": b.norms, "total": b.total},
                "n_layers": self.n_layers,
                "blocks": self.blocks,
                "final_norm": self.final_norm,
                "output_head": self.output_head,
            },
            "memory_bytes": self.memory_bytes(),
        }


def weight_memory(n_params: int) -> dict[str, int]:
    return {dtype: n_params * size for dtype, size in DTYPE_BYTES.items()}


def count_params(cfg: GPTConfig) -> ParamCount:
    d, v = cfg.emb_dim, cfg.vocab_size
    b = 1 if cfg.bias else 0  # biases of out_proj and the feed-forward, LayerNorm shifts
    attention = 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + b * d
    feed_forward = d * 4 * d + b * 4 * d + 4 * d * d + b * d
    norms = 2 * (1 + b) * d
    return ParamCount(
        token_embedding=v * d,
        position_embedding=cfg.context_length * d,
        block=BlockParams(attention=attention, feed_forward=feed_forward, norms=norms),
        n_layers=cfg.n_layers,
        final_norm=(1 + b) * d,
        output_head=0 if cfg.tie_weights else v * d,
        head_matrix=v * d,
        tie_weights=cfg.tie_weights,
    )


def human_bytes(n: int) -> str:
    """Binary units, as the book prints them ("621.83 MB" is 652,038,144 bytes / 1024**2)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
