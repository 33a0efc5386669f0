"""Built-in layouts *shaped like* published hybrid models, plus a dense GQA baseline.

They follow each model's published layer ratio and typical dims; they are not exact copies
of any checkpoint (head counts, state dtypes and conv tails are rounded to common choices),
so their ``model_id`` is the preset's own name. All use bf16 and 16-token blocks (vLLM's
default block size). Figures per whole model at tensor-parallel rank 0, unsharded:

================== ===== ================= ============ ====================
preset             layers full layer        bytes/token  fixed bytes/request
================== ===== ================= ============ ====================
kimi-linear-48b     27   7 × MLA 512+64       8 064         22 446 080
qwen3.5-gdn-80b     48   12 × GQA 2×256      24 576         39 518 208
mimo-v2-flash       48   8 × GQA 4×128       16 384         20 971 520
ring-2.5-1t         80   10 × MLA 512+64     11 520        146 800 640
dense-gqa-8b        32   32 × GQA 8×128     131 072                  0
================== ===== ================= ============ ====================

* ``kimi-linear-48b``: Kimi Linear tech report (Moonshot AI, arXiv 2510.26692) and the
  Kimi-Linear-48B-A3B model card: 3:1 KDA:MLA, 27 layers with MLA at every 4th layer and the
  last (7 MLA, 20 KDA). MLA caches a 512-dim latent + 64-dim rope key per token. KDA state:
  32 heads × 128 × 128 recurrent matrix + a 3-step short-conv tail over q, k, v (3 × 4096).
* ``qwen3.5-gdn-80b``: Qwen3-Next-80B-A3B model card, the hybrid layout Qwen3.5 carries on:
  48 layers = 12 × (3 Gated DeltaNet + 1 gated GQA). GQA: 2 KV heads × 256. GDN: 32 value
  heads × 128 × 128 state + conv tail over q, k (16 × 128 each) and v (32 × 128).
* ``mimo-v2-flash``: Xiaomi MiMo-V2-Flash model card: 5:1 sliding-window:global attention,
  128-token window. 48 layers = 8 × (5 SWA + 1 GQA), 4 KV heads × 128 for global layers; an
  SWA layer's "state" is its window of K and V (128 tokens × 8 KV heads × 128).
* ``ring-2.5-1t``: inclusionAI Ring-2.5-1T model card (Ling 2.5 hybrid linear architecture):
  7:1 linear (lightning) attention : MLA. 80 layers = 10 × (7 linear + 1 MLA); linear state
  64 heads × 128 × 128, no conv tail.
* ``dense-gqa-8b``: Llama-3.1-8B model card: 32 GQA layers, 8 KV heads × 128. The baseline
  that shows why dense models' KV is too large to ship across datacenters.
"""

from __future__ import annotations

from pathlib import Path

from .model import FullAttention, LayerKind, LayoutError, LinearState, ModelLayout

BLOCK_TOKENS = 16


def _mla() -> FullAttention:
    return FullAttention(BLOCK_TOKENS, kv_heads=1, head_dim=576, mla_latent_dim=512, rope_dim=64)


def _gqa(kv_heads: int, head_dim: int) -> FullAttention:
    return FullAttention(BLOCK_TOKENS, kv_heads=kv_heads, head_dim=head_dim)


def _delta_state(v_heads: int, qk_heads: int, head_dim: int, conv_kernel: int = 4) -> LinearState:
    """Recurrent state (v_heads, dk, dv) + the short conv's last kernel-1 inputs over q, k, v."""
    conv_channels = 2 * qk_heads * head_dim + v_heads * head_dim
    return LinearState(((v_heads, head_dim, head_dim), (conv_channels, conv_kernel - 1)))


def _pattern(unit: list[LayerKind], times: int, tail: list[LayerKind] | None = None) -> tuple:
    return tuple(unit * times + (tail or []))


def kimi_linear_48b() -> ModelLayout:
    kda = _delta_state(32, 32, 128)
    layers = _pattern([kda, kda, kda, _mla()], 6, [kda, kda, _mla()])
    return ModelLayout("kimi-linear-48b", "kimi-linear-48b", layers)


def qwen35_gdn_80b() -> ModelLayout:
    gdn = _delta_state(32, 16, 128)
    layers = _pattern([gdn, gdn, gdn, _gqa(2, 256)], 12)
    return ModelLayout("qwen3.5-gdn-80b", "qwen3.5-gdn-80b", layers)


def mimo_v2_flash() -> ModelLayout:
    swa = LinearState(((128, 8, 128), (128, 8, 128)))  # K and V of the 128-token window
    layers = _pattern([swa] * 5 + [_gqa(4, 128)], 8)
    return ModelLayout("mimo-v2-flash", "mimo-v2-flash", layers)


def ring_25_1t() -> ModelLayout:
    lin = LinearState(((64, 128, 128),))
    layers = _pattern([lin] * 7 + [_mla()], 10)
    return ModelLayout("ring-2.5-1t", "ring-2.5-1t", layers)


def dense_gqa_8b() -> ModelLayout:
    return ModelLayout("dense-gqa-8b", "dense-gqa-8b", _pattern([_gqa(8, 128)], 32))


PRESETS = {
    "kimi-linear-48b": kimi_linear_48b,
    "qwen3.5-gdn-80b": qwen35_gdn_80b,
    "mimo-v2-flash": mimo_v2_flash,
    "ring-2.5-1t": ring_25_1t,
    "dense-gqa-8b": dense_gqa_8b,
}


def preset(name: str) -> ModelLayout:
    try:
        return PRESETS[name]()
    except KeyError:
        raise LayoutError("name", f"no preset {name!r} (known: {', '.join(PRESETS)})") from None


def preset_names() -> list[str]:
    return list(PRESETS)


def load_layout(name: str) -> ModelLayout:
    """A preset by name, else a layout file (``.toml`` or ``.json``); LayoutError says
    which and why."""
    if name in PRESETS:
        return preset(name)
    path = Path(name)
    if path.suffix in (".toml", ".json") and path.is_file():
        try:
            text = path.read_text()
        except OSError as exc:
            raise LayoutError("file", f"cannot read {name!r}: {exc}") from exc
        if path.suffix == ".toml":
            return ModelLayout.from_toml(text)
        return ModelLayout.from_json(text)
    raise LayoutError("name", f"no preset or layout file {name!r} (presets: {', '.join(PRESETS)})")
