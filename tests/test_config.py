from pathlib import Path

import pytest

from gptcli.config import GPT2_SIZES, SIZES, canonical_size, configs_dir, load_config_file, resolve_config, shipped_config
from gptcli.errors import UserError

RELEASE = {  # GPT-2 release hyperparameters: emb_dim, n_layers, n_heads
    "124M": (768, 12, 12),
    "355M": (1024, 24, 16),
    "774M": (1280, 36, 20),
    "1558M": (1600, 48, 25),
}


@pytest.mark.parametrize("size", GPT2_SIZES)
def test_shipped_gpt2_configs_match_the_release(size):
    cfg = shipped_config(size)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == RELEASE[size]
    assert cfg.vocab_size == 50257 and cfg.context_length == 1024
    assert cfg.drop_rate == 0.1 and cfg.qkv_bias is True and cfg.tie_weights is True


def test_book_config_is_gpt_config_124m():
    cfg = shipped_config("book")
    assert cfg.to_dict() == {
        "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
        "drop_rate": 0.1, "qkv_bias": False, "tie_weights": False, "bias": True, "gelu": "tanh",
    }


def test_gelu_defaults_to_the_books_tanh_and_takes_nanogpts_erf(tiny_config_file):
    assert load_config_file(tiny_config_file()).gelu == "tanh"
    assert load_config_file(tiny_config_file(gelu="erf")).gelu == "erf"


@pytest.mark.parametrize(
    "given,expected",
    [("xl", "1558M"), ("XL", "1558M"), ("1558m", "1558M"), ("small", "124M"), ("Medium", "355M"),
     ("large", "774M"), ("124M", "124M"), ("gpt2-xl", "1558M"), ("BOOK", "book")],
)
def test_size_aliases_are_case_insensitive(given, expected):
    assert canonical_size(given) == expected


def test_unknown_size_names_the_choices():
    with pytest.raises(UserError, match=r"unknown size 'huge'.*1558M \(xl\)"):
        canonical_size("huge")


def test_every_shipped_file_exists():
    for file_name, _ in SIZES.values():
        assert (configs_dir() / file_name).is_file()


def test_size_and_config_together_is_an_error(tiny_config_file):
    with pytest.raises(UserError, match="mutually exclusive"):
        resolve_config("xl", tiny_config_file())


def test_default_is_124m():
    assert resolve_config(None, None).name == "124M"


def test_user_config_loads(tiny_config_file):
    cfg = load_config_file(tiny_config_file(emb_dim=64, n_heads=8))
    assert (cfg.emb_dim, cfg.n_heads, cfg.head_dim) == (64, 8, 8)


@pytest.mark.parametrize(
    "content,message",
    [
        ("emb_dim: [1, 2\n", r"invalid YAML at line \d+"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_unparseable_config(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"emb_dim": "big"}, "key 'emb_dim' must be int, got 'big'"),
        ({"emb_dim": 1.5}, "key 'emb_dim' must be int"),
        ({"qkv_bias": 1}, "key 'qkv_bias' must be bool"),
        ({"n_layers": 0}, "key 'n_layers' must be positive"),
        ({"vocab_size": -5}, "key 'vocab_size' must be positive"),
        ({"emb_dim": 30, "n_heads": 4}, "'emb_dim' \\(30\\) must be divisible by 'n_heads' \\(4\\)"),
        ({"drop_rate": 1.5}, "key 'drop_rate' must be in"),
        ({"n_embd": 5}, "unknown key 'n_embd'"),
        ({"gelu": "relu"}, "key 'gelu' must be tanh or erf, got 'relu'"),
        ({"gelu": True}, "key 'gelu' must be tanh or erf, got True"),
        ({"gelu": "[erf]"}, "key 'gelu' must be tanh or erf, got \\['erf'\\]"),
    ],
)
def test_bad_values_name_file_and_key(tiny_config_file, overrides, message):
    path = tiny_config_file(**overrides)
    with pytest.raises(UserError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value)


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("vocab_size: 10\ncontext_length: 8\n")
    with pytest.raises(UserError, match="missing key 'emb_dim'"):
        load_config_file(path)
