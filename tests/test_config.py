import re

import pytest

from lighthouse_megatron import LighthouseConfig


def test_gathered_length_matches_paper_example():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=1536, tile_topk=128)
    cfg.validate(98_304)
    assert cfg.gathered_length(98_304) == 18_432
    assert LighthouseConfig(levels=3, pooling_factor=4, topk=4096).gathered_length(512 * 1024) == 65_536


def test_levels_one_is_dense_length():
    cfg = LighthouseConfig(levels=1, topk=256, tile_topk=128)
    assert cfg.gathered_length(4096) == 4096


def test_dict_round_trip_and_unknown_keys():
    cfg = LighthouseConfig(levels=2, pooling_factor=8, topk=512, tile_topk=64, dense_layers=[0, -1])
    d = cfg.to_dict()
    assert d["dense_layers"] == [0, -1] and all(type(v) in (int, str, list) for v in d.values())
    assert LighthouseConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown lighthouse settings \['top_k'\].*topk"):
        LighthouseConfig.from_dict({"top_k": 4})


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"levels": 0}, r"levels must be >= 1.*got 0"),
        ({"levels": 2.0}, r"levels must be an integer"),
        ({"pooling_factor": 3}, r"pooling_factor must be a power of two >= 2, got 3; nearest valid: 2 or 4"),
        ({"pooling_factor": 6}, r"pooling_factor .* got 6; nearest valid: 4 or 8"),
        ({"pooling_factor": 1}, r"pooling_factor .* got 1; nearest valid: 2"),
        ({"tile_topk": 127}, r"tile_topk must be even .* got 127; nearest valid: 126 or 128"),
        ({"tile_topk": 0}, r"tile_topk must be even"),
        ({"topk": 1000, "tile_topk": 128}, r"topk must be a positive multiple of tile_topk=128, got 1000; "
                                           r"nearest valid: 896 or 1024"),
        ({"topk": 64, "tile_topk": 128}, r"topk .* got 64; nearest valid: 128"),
        ({"scorer": "learned"}, r"scorer must be one of \['norm'\], got 'learned'"),
        ({"backend": "xformers"}, r"backend must be one of \['auto', 'te', 'cudnn', 'flash', 'math'\]"),
        ({"dense_layers": ["first"]}, r"dense_layers must be integers"),
        ({"level_merge": "max"}, r"level_merge must be one of \['sum', 'mean'\], got 'max'"),
    ],
)
def test_bad_settings_raise_with_numbers(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LighthouseConfig(**kwargs)


def test_sequence_not_divisible():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=1536, tile_topk=128)
    # p**(L-1) * (k/T) = 16 * 12 = 192
    with pytest.raises(ValueError, match=r"sequence length 100000 must be divisible by .*=16 x tiles "
                                         r"\(topk/tile_topk=12\) = 192; nearest valid: 99840 or 100032"):
        cfg.validate(100_000)


def test_too_few_coarsest_entries_per_tile():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=4096, tile_topk=128)
    # 32768 / 16 = 2048 coarsest entries over 32 tiles = 64 per tile < 128
    with pytest.raises(ValueError, match=r"only 64 coarsest entries .* tile_topk=128 .* "
                                         r"use topk=2048, levels=2 or a sequence length >= 65536"):
        cfg.validate(32_768)
    # Every fix suggested passes every rule with the other settings.
    LighthouseConfig(levels=3, pooling_factor=4, topk=2048, tile_topk=128).validate(32_768)
    LighthouseConfig(levels=2, pooling_factor=4, topk=4096, tile_topk=128).validate(32_768)
    LighthouseConfig(levels=3, pooling_factor=4, topk=4096, tile_topk=128).validate(65_536)
    # Too short for any budget with T = 128: no topk is suggested, the other settings that fit are.
    with pytest.raises(ValueError, match=r"no topk is valid with sequence length 512, levels=3, "
                                         r"pooling_factor=4 and tile_topk=128 .*; change another setting: "
                                         r"tile_topk=32 \(then topk=32\), levels=2 or a sequence length that "
                                         r"is a multiple of 2048 \(then topk=128\)$"):
        LighthouseConfig(levels=3, pooling_factor=4, topk=2048, tile_topk=128).validate(512)
    LighthouseConfig(levels=3, pooling_factor=4, topk=32, tile_topk=32).validate(512)
    LighthouseConfig(levels=2, pooling_factor=4, topk=128, tile_topk=128).validate(512)
    LighthouseConfig(levels=3, pooling_factor=4, topk=128, tile_topk=128).validate(2048)


@pytest.mark.parametrize("seq,cp,topk,tile,levels", [
    (512, 1, 100, 8, 3), (512, 1, 96, 8, 3), (256, 1, 2048, 128, 3), (4096, 2, 384, 64, 3),
    (98_304, 4, 1536, 128, 3), (100_000, 1, 1536, 128, 3), (8192, 1, 4096, 128, 2), (1000, 1, 16, 8, 3),
])
def test_every_suggested_topk_passes_every_rule(seq, cp, topk, tile, levels):
    """Issue 28: --lighthouse-topk 100 at 512 tokens with T=8 suggested 96 or 104, both invalid.
    Now each suggested budget is valid with the other settings; with none, the message says so."""
    from lighthouse_megatron.config import topk_hint, valid_topks

    ks = valid_topks(levels, 4, tile, seq, cp)
    for k in ks:
        LighthouseConfig(levels=levels, pooling_factor=4, topk=k, tile_topk=tile).validate(seq, cp_size=cp)
    hint = topk_hint(levels, 4, tile, seq, cp, topk)
    if hint.startswith("nearest valid: "):
        for k in hint.removeprefix("nearest valid: ").split(" or "):
            assert int(k) in ks
    else:
        assert not ks and hint.startswith("no topk is valid")
    if topk in ks:
        return
    with pytest.raises(ValueError) as e:
        LighthouseConfig(levels=levels, pooling_factor=4, topk=topk, tile_topk=tile).validate(seq, cp_size=cp)
    for k in (int(k) for k in re.findall(r"topk[= ](\d+)", str(e.value).split(";", 1)[1])):
        assert k in valid_topks(levels, 4, tile, seq, cp) or "tile_topk=" in str(e.value), str(e.value)


@pytest.mark.parametrize("n,cp", [(32_768, 1), (40_960, 1), (24_576, 1), (98_304, 2), (49_152, 4)])
def test_suggested_topk_is_valid(n, cp):
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=8192, tile_topk=128)
    with pytest.raises(ValueError, match="use topk=") as e:
        cfg.validate(n, cp_size=cp)
    suggested = int(re.search(r"use topk=(\d+)", str(e.value)).group(1))
    assert suggested < cfg.topk
    LighthouseConfig(levels=3, pooling_factor=4, topk=suggested, tile_topk=128).validate(n, cp_size=cp)


@pytest.mark.parametrize("bad", [0, 3, "0,1"])
def test_dense_layers_must_be_a_sequence(bad):
    with pytest.raises(ValueError, match=r"dense_layers must be a sequence of 0-based layer indices"):
        LighthouseConfig(dense_layers=bad)


def test_context_parallel_rules():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=1536, tile_topk=128)
    cfg.validate(98_304, cp_size=2)  # 12 tiles over 4 chunks
    with pytest.raises(ValueError, match=r"topk=1536 must be a multiple of 2\*cp_size\*tile_topk="
                                         r"2\*4\*128=1024 .* nearest valid: 1024 or 2048"):
        cfg.validate(98_304, cp_size=4)
    assert cfg.chunk_config(2).topk == 384
    # The chunks' gathered lengths add up to the global one.
    assert 4 * cfg.chunk_config(2).gathered_length(98_304 // 4) == cfg.gathered_length(98_304)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_sequence_and_cp_values(bad):
    cfg = LighthouseConfig(topk=256)
    with pytest.raises(ValueError, match="sequence length must be a positive integer"):
        cfg.validate(bad)
    with pytest.raises(ValueError, match="context-parallel size must be a positive integer"):
        cfg.validate(4096, cp_size=bad)


def test_dense_layers_resolution():
    cfg = LighthouseConfig(dense_layers=(0, 1, -2, -1))
    assert cfg.resolve_dense_layers(30) == {0, 1, 28, 29}
    with pytest.raises(ValueError, match=r"dense_layers entry 30 is out of range .* 30 layers "
                                         r"\(valid: -30 .. 29\)"):
        LighthouseConfig(dense_layers=(30,)).resolve_dense_layers(30)


@pytest.mark.parametrize("kwargs, field", [
    ({"topk": -5}, "topk"), ({"topk": 0}, "topk"), ({"topk": -300}, "topk"),
    ({"tile_topk": -4, "topk": 128}, "tile_topk"), ({"tile_topk": 0, "topk": 128}, "tile_topk"),
])
def test_suggested_value_is_itself_valid(kwargs, field):
    # "nearest valid: 0" for --lighthouse-topk -5 was itself refused.
    with pytest.raises(ValueError, match="nearest valid: ") as e:
        LighthouseConfig(**kwargs)
    suggestions = str(e.value).split("nearest valid: ")[1].split(" or ")
    for value in suggestions:
        LighthouseConfig(**{**kwargs, field: int(value)})


def test_levels_one_ignores_the_topk_rules():
    # Dense attention selects nothing: topk and tile_topk are unused, so they are not checked,
    # neither alone nor against a sequence length or a CP degree.
    cfg = LighthouseConfig(levels=1, topk=-5, tile_topk=3)
    cfg.validate(1000)
    cfg.validate(1000, cp_size=4)
    assert cfg.gathered_length(1000) == 1000
    with pytest.raises(ValueError, match="topk must be a positive multiple"):
        LighthouseConfig(levels=2, topk=-5)


def test_topk_fits_is_membership_in_the_valid_topks():
    """The check every call runs (no list of divisors: traceable with a symbolic length) accepts
    exactly the budgets that the suggestions list."""
    import itertools

    from lighthouse_megatron.config import topk_fits, valid_topks

    for levels, p, t, n, cp in itertools.product((1, 2, 3), (2, 4), (2, 3, 4, 64), (256, 4096, 12288),
                                                 (1, 2, 4)):
        valid = set(valid_topks(levels, p, t, n, cp))
        assert {k for k in range(1, n + 1) if topk_fits(levels, p, t, n, cp, k)} == valid
