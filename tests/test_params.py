"""Parameter arithmetic: the issue's independently checked table, and agreement with the model."""

import pytest

from gptcli.config import SIZES, shipped_config
from gptcli.params import count_params, human_bytes

EXPECTED = {  # config: (total, tied, untied)
    "124M": (124_439_808, 124_439_808, 163_037_184),
    "355M": (354_823_168, 354_823_168, 406_286_336),
    "774M": (774_030_080, 774_030_080, 838_359_040),
    "1558M": (1_557_611_200, 1_557_611_200, 1_638_022_400),
    "book": (163_009_536, 124_412_160, 163_009_536),
}


@pytest.mark.parametrize("size", EXPECTED)
def test_counts_match_the_checked_table(size):
    count = count_params(shipped_config(size))
    assert (count.total, count.tied, count.untied) == EXPECTED[size]


def test_book_memory_is_621_83_mb():
    count = count_params(shipped_config("book"))
    assert count.memory_bytes() == {
        "float32": 652_038_144, "bfloat16": 326_019_072, "float16": 326_019_072, "int8": 163_009_536,
    }
    assert human_bytes(count.memory_bytes()["float32"]) == "621.83 MiB"


@pytest.mark.parametrize("size", EXPECTED)
def test_breakdown_adds_up(size):
    count = count_params(shipped_config(size))
    assert sum(n for _, n in count.breakdown()) == count.total


@pytest.mark.parametrize("size", list(SIZES))
def test_arithmetic_equals_the_meta_model(size):
    from gptcli.model.gpt import build_model

    cfg = shipped_config(size)
    model = build_model(cfg, device="meta")
    count = count_params(cfg)
    assert sum(p.numel() for p in model.parameters()) == count.total
    block = model.trf_blocks[0]
    assert sum(p.numel() for p in block.att.parameters()) == count.block.attention
    assert sum(p.numel() for p in block.ff.parameters()) == count.block.feed_forward
    assert count.non_embedding == count.tied - model.tok_emb.weight.numel() - model.pos_emb.weight.numel()


def test_tiny_config_counts_match_a_real_model(tiny_config_file):
    from gptcli.config import load_config_file
    from gptcli.model.gpt import GPTModel

    for tie in (True, False):
        for bias in (True, False):
            cfg = load_config_file(tiny_config_file(tie_weights=tie, qkv_bias=bias, vocab_size=100))
            model = GPTModel(cfg)
            assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total
