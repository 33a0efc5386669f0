"""Model layouts: preset figures by hand, TOML/JSON round trips, errors naming the field."""

from __future__ import annotations

import json

import pytest

from kvship.layout import (
    FullAttention,
    LayoutError,
    LinearState,
    ModelLayout,
    preset,
    preset_names,
)

BF16 = 2

# (bytes per token, fixed bytes per request), computed from the presets' documented dims.
EXPECTED = {
    "kimi-linear-48b": (7 * (512 + 64) * BF16, 20 * (32 * 128 * 128 + 3 * 4096 * 3) * BF16),
    "qwen3.5-gdn-80b": (12 * 2 * 2 * 256 * BF16, 36 * (32 * 128 * 128 + 8192 * 3) * BF16),
    "mimo-v2-flash": (8 * 2 * 4 * 128 * BF16, 40 * 2 * 128 * 8 * 128 * BF16),
    "ring-2.5-1t": (10 * (512 + 64) * BF16, 70 * 64 * 128 * 128 * BF16),
    "dense-gqa-8b": (32 * 2 * 8 * 128 * BF16, 0),
}
RATIOS = {  # linear : full, as published
    "kimi-linear-48b": None,  # 20:7 (3:1 with the last layer full as well)
    "qwen3.5-gdn-80b": 3,
    "mimo-v2-flash": 5,
    "ring-2.5-1t": 7,
    "dense-gqa-8b": 0,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_figures(name: str) -> None:
    layout = preset(name)
    per_token, fixed = EXPECTED[name]
    assert layout.kv_bytes_per_token == per_token
    assert layout.fixed_bytes_per_request == fixed
    assert layout.bytes_for(1000) == 1000 * per_token + fixed
    assert layout.bytes_for(0) == fixed
    ratio = RATIOS[name]
    if ratio is not None:
        assert len(layout.linear_layers) == ratio * len(layout.full_layers)
    assert set(layout.full_layers) | set(layout.linear_layers) == set(range(len(layout.layers)))


def test_kimi_pattern_and_presets_listed() -> None:
    kimi = preset("kimi-linear-48b")
    assert kimi.full_layers == (3, 7, 11, 15, 19, 23, 26)
    assert sorted(preset_names()) == sorted(EXPECTED)
    with pytest.raises(LayoutError, match="name"):
        preset("nope")


def test_mla_vs_gqa_bytes() -> None:
    assert FullAttention(16, 8, 128).bytes_per_token == 4096
    assert FullAttention(16, 8, 128, dtype="float8_e4m3fn").bytes_per_token == 2048
    mla = FullAttention(16, 1, 576, mla_latent_dim=512, rope_dim=64)
    assert mla.bytes_per_token == 1152
    assert mla.block_bytes == 16 * 1152
    assert LinearState(((2, 3), (4,)), "float32").state_bytes == 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_round_trips(name: str) -> None:
    layout = preset(name)
    assert ModelLayout.from_toml(layout.to_toml()) == layout
    assert ModelLayout.from_json(layout.to_json()) == layout
    assert ModelLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_toml_repeat_groups() -> None:
    text = """
name = "tiny"
model_id = "org/tiny"
tp_rank = 1

[[layers]]
kind = "linear"
shapes = [[4, 8, 8], [96, 3]]
repeat = 3

[[layers]]
kind = "full"
block_tokens = 32
kv_heads = 2
head_dim = 64
dtype = "float16"
"""
    layout = ModelLayout.from_toml(text)
    assert len(layout.layers) == 4
    assert layout.linear_layers == (0, 1, 2)
    assert layout.block_tokens == 32
    assert layout.tp_rank == 1
    assert layout.kv_bytes_per_token == 2 * 2 * 64 * 2
    assert layout.fixed_bytes_per_request == 3 * (4 * 8 * 8 + 96 * 3) * 2


def _doc(**layer_overrides: object) -> dict:
    full = {"kind": "full", "block_tokens": 16, "kv_heads": 8, "head_dim": 128}
    full.update(layer_overrides)
    return {"name": "x", "model_id": "m", "layers": [full]}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (_doc(block_tokens=0), "layers[0].block_tokens"),
        (_doc(kv_heads=-1), "layers[0].kv_heads"),
        (_doc(dtype="float99"), "layers[0].dtype"),
        (_doc(mla_latent_dim=0), "layers[0].mla_latent_dim"),
        (_doc(rope_dim=64), "layers[0].rope_dim"),
        (_doc(kind="mamba"), "layers[0].kind"),
        (_doc(colour="red"), "layers[0].colour"),
        (_doc(repeat=0), "layers[0].repeat"),
        ({"name": "x", "layers": []}, "model_id"),
        ({"name": "x", "model_id": "m", "layers": []}, "layers"),
        ({"name": "", "model_id": "m", "layers": _doc()["layers"]}, "name"),
        ({**_doc(), "tp_rank": -1}, "tp_rank"),
        ({**_doc(), "extra": 1}, "extra"),
        (
            {"name": "x", "model_id": "m", "layers": [{"kind": "linear", "shapes": [[4, 8]]}]},
            "layers",  # no full-attention layer
        ),
        (
            {"name": "x", "model_id": "m", "layers": [{"kind": "linear", "shapes": [[4, 0]]}]},
            "layers[0].shapes[0][1]",
        ),
        (
            {"name": "x", "model_id": "m", "layers": [{"kind": "linear", "shapes": []}]},
            "layers[0].shapes",
        ),
        (
            {
                "name": "x",
                "model_id": "m",
                "layers": [
                    {"kind": "full", "block_tokens": 16, "kv_heads": 1, "head_dim": 8},
                    {"kind": "full", "block_tokens": 32, "kv_heads": 1, "head_dim": 8},
                ],
            },
            "layers[1].block_tokens",
        ),
    ],
)
def test_bad_layouts_name_the_field(doc: dict, field: str) -> None:
    with pytest.raises(LayoutError) as info:
        ModelLayout.from_dict(doc)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_bad_text() -> None:
    with pytest.raises(LayoutError, match="not TOML"):
        ModelLayout.from_toml("name = ")
    with pytest.raises(LayoutError, match="not JSON"):
        ModelLayout.from_json("{")


def test_cli_layout_show_and_list(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    import argparse

    from kvship.cli.common import UsageError
    from kvship.cli.layout import add_layout_parser

    parser = argparse.ArgumentParser()
    add_layout_parser(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = json.loads(run("layout", "show", "ring-2.5-1t", "--tokens", "1000", "--json"))
    assert out["kv_bytes_per_token"] == EXPECTED["ring-2.5-1t"][0]
    assert out["bytes_for_tokens"] == preset("ring-2.5-1t").bytes_for(1000)
    assert "8,064" in run("layout", "show", "kimi-linear-48b")
    listed = json.loads(run("layout", "list", "--json"))
    assert [r["name"] for r in listed["presets"]] == preset_names()
    path = tmp_path / "m.toml"
    path.write_text(preset("dense-gqa-8b").to_toml())
    assert "131,072" in run("layout", "show", str(path))
    with pytest.raises(UsageError):
        run("layout", "show", "no-such-model")
