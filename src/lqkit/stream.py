"""A causal LM opened one decoder block at a time.

:func:`open_model` builds the model's skeleton on the meta device (no weights in memory) and reads
tensors from the folder's safetensors files only when they are needed: everything outside the
decoder blocks (embeddings, final norm, head) once with :meth:`BlockSource.load_rest`, and each block
with :meth:`BlockSource.load_block`, dropped again with :meth:`BlockSource.release_block`. Memory is
then bounded by one block, not by the model. Blocks run in :func:`compute_dtype`: the stored 16-bit
type on a GPU, fp32 on a CPU.

Any transformers causal LM whose safetensors names are its module names works (no per-architecture
code: the block list is the largest ``nn.ModuleList``). A folder without safetensors, or whose tensor
names differ from the module names, is loaded whole instead (:class:`MemorySource`, with a log line),
and so is a model already in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .calibrate import find_blocks
from .errors import ModelLoadError
from .models import DEFAULT_MODEL, LoadedModel, load_error, load_model, load_tokenizer, resolve

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def compute_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype blocks run in: the stored 16-bit type on a GPU; fp32 on a CPU (bf16 matmuls are
    emulated and several times slower on most CPUs) and for 32/64-bit sources."""
    if device.type == "cuda" and stored in (torch.bfloat16, torch.float16):
        return stored
    return torch.float32


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the host memory freed with a block back to the system. Without this, glibc keeps the
    freed pages of many mid-sized tensors in its heaps and the process's resident size grows with
    every block (measured on a 16-block model: peak RSS 2277 MiB without, 1058 MiB with)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def to_meta(module: nn.Module) -> None:
    """Drop the parameters and persistent buffers of ``module`` (replaced by meta tensors of the same
    shape and dtype); non-persistent buffers (e.g. rotary tables), which no file holds, stay."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and n not in m._non_persistent_buffers_set:
                m._buffers[n] = torch.empty_like(b, device="meta")


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move the real (non-meta) buffers of ``module`` to ``device``."""
    for m in module.modules():
        for n, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                m._buffers[n] = b.to(device)


class BlockSource:
    """A model whose decoder blocks are brought to the compute device one at a time."""

    model: nn.Module
    tokenizer: object
    source: str  # what the user named (id or path)
    path: str | None  # the folder the weights come from (None: a model in memory)
    stored_dtype: torch.dtype  # dtype of the source's floating tensors, kept for uncompressed tensors
    dtype: torch.dtype  # compute dtype
    device: torch.device

    def _init(self, model: nn.Module, device: torch.device) -> None:
        self.prefix, self.blocks = find_blocks(model)
        self.device = device

    @property
    def streamed(self) -> bool:
        """True when weights are read from files block by block (False: the whole model is in memory)."""
        return False

    def block_of(self, name: str) -> int | None:
        """The block holding module ``name``, or None."""
        head = f"{self.prefix}."
        if not name.startswith(head):
            return None
        k = name[len(head):].split(".", 1)[0]
        return int(k) if k.isdigit() and int(k) < len(self.blocks) else None

    def load_rest(self) -> None:
        raise NotImplementedError

    def load_block(self, k: int) -> nn.Module:
        raise NotImplementedError

    def release_block(self, k: int) -> None:
        raise NotImplementedError

    def rest_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the blocks in its stored dtype (on the CPU), tied tensors once."""
        raise NotImplementedError

    def fingerprint(self, names: Iterable[str]) -> str:
        raise NotImplementedError


class FileSource(BlockSource):
    """Weights read from a folder's safetensors files when needed; the skeleton lives on meta."""

    def __init__(self, path: Path, source: str, index: Mapping[str, str], stored: torch.dtype,
                 device: torch.device, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.source, self.index, self.stored_dtype = str(path), source, dict(index), stored
        self.dtype = dtype or compute_dtype(stored, device)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with init_empty_weights():  # parameters on the meta device; buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # tied parameters are one (counted and stored once) from the start
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self._init(model, device)
        self.tokenizer = load_tokenizer(str(path))
        self._rest_loaded = False

    @property
    def streamed(self) -> bool:
        return True

    def _names(self, module: nn.Module, prefix: str) -> list[str]:
        return [prefix + k for k in module.state_dict()]

    def missing(self) -> list[str]:
        """Tensor names of the blocks that no file holds (the folder cannot be streamed then)."""
        return [n for k in range(len(self.blocks)) for n in self._names(self.blocks[k], f"{self.prefix}.{k}.")
                if n not in self.index]

    def read(self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
        """The named tensors from the files, on ``device``; floating ones cast to ``dtype`` if given."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.index[n], []).append(n)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(str(Path(self.path) / fname), framework="pt", device=str(device)) as f:
                for key in keys:
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def _rest_names(self) -> list[str]:
        inside = f"{self.prefix}."
        return [n for n in self.model.state_dict() if not n.startswith(inside) and n in self.index]

    def load_rest(self) -> None:
        if self._rest_loaded:
            return
        state = self.read(self._rest_names(), self.device, self.dtype)
        self.model.load_state_dict(state, strict=False, assign=True)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        inside = f"{self.prefix}."
        left = [n for n, p in self.model.named_parameters() if p.device.type == "meta" and not n.startswith(inside)]
        if left:
            raise ModelLoadError(f"the files of {self.source!r} hold no tensor for {left[:3]}; the folder is "
                                 "incomplete or uses other tensor names")
        for n, m in self.model.named_modules():
            if m is not self.blocks and not n.startswith(inside):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
        _move_buffers(self.model, self.device)
        self._rest_loaded = True

    def load_block(self, k: int) -> nn.Module:
        block = self.blocks[k]
        prefix = f"{self.prefix}.{k}."
        state = self.read(self._names(block, prefix), self.device, self.dtype)
        block.load_state_dict({n[len(prefix):]: t for n, t in state.items()}, strict=True, assign=True)
        for p in block.parameters():
            p.requires_grad_(False)
        _move_buffers(block, self.device)
        return block

    def release_block(self, k: int) -> None:
        to_meta(self.blocks[k])
        return_freed_memory()

    def rest_state(self) -> dict[str, torch.Tensor]:
        return self.read(self._rest_names())

    def fingerprint(self, names: Iterable[str]) -> str:
        """sha256 of the selected names and of each tensor file's size, header and first and last MiB
        (cheap for large models; a changed weight changes its file's bytes, size or header)."""
        h = hashlib.sha256("|".join(names).encode())
        for fname in sorted(set(self.index.values())):
            f = Path(self.path) / fname
            size = f.stat().st_size
            h.update(f"{fname}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
        return h.hexdigest()


class MemorySource(BlockSource):
    """A model already whole in (CPU) memory; blocks are moved to the compute device when needed."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.source, self.path = loaded.model, loaded.tokenizer, loaded.source, loaded.path
        first = next((p for p in loaded.model.parameters() if p.is_floating_point()), None)
        self.stored_dtype = first.dtype if first is not None else torch.float32
        self.dtype = dtype or compute_dtype(self.stored_dtype, device)
        self.home = first.device if first is not None else torch.device("cpu")
        self._init(loaded.model, device)

    def _inside(self) -> set[int]:
        return {id(p) for p in self.blocks.parameters()}

    def load_rest(self) -> None:
        inside = self._inside()
        for p in self.model.parameters():
            if id(p) not in inside:
                p.data = p.data.to(self.device, self.dtype if p.is_floating_point() else p.dtype)
        _move_buffers(self.model, self.device)

    def load_block(self, k: int) -> nn.Module:
        block = self.blocks[k]
        for p in block.parameters():
            p.data = p.data.to(self.device, self.dtype if p.is_floating_point() else p.dtype)
        _move_buffers(block, self.device)
        return block

    def release_block(self, k: int) -> None:
        if self.device != self.home:
            self.blocks[k].to(self.home)
        return_freed_memory()

    def rest_state(self) -> dict[str, torch.Tensor]:
        inside = f"{self.prefix}."
        return {n: t for n, t in self.model.state_dict().items() if not n.startswith(inside)}

    def fingerprint(self, names: Iterable[str]) -> str:
        from .allocate import weights_fingerprint

        return weights_fingerprint(self.model, list(names))


def _index(folder: Path) -> dict[str, str] | None:
    """tensor name -> safetensors file of ``folder`` (None if it has none)."""
    idx = folder / INDEX_FILE
    if idx.is_file():
        try:
            return dict(json.loads(idx.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{idx} is unreadable ({e}); re-save the model") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f.name for k in fh.keys()})
    return out


def _stored_dtype(folder: Path, index: Mapping[str, str]) -> torch.dtype:
    """The dtype of the folder's floating weights (of the first one found)."""
    from safetensors import safe_open

    for name, fname in index.items():
        if name.endswith(".weight"):
            with safe_open(str(folder / fname), framework="pt") as fh:
                dt = _ST_DTYPES.get(fh.get_slice(name).get_dtype())
            if dt is not None:
                return dt
    return torch.float32


def _local(name_or_path: str | None) -> tuple[Path, str]:
    """(a local folder holding the model, what the user asked for)."""
    path = resolve(name_or_path)
    if not Path(path).is_dir():  # a Hub id: the files it needs into the Hub cache (offline: an error)
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                           "*.txt"])
        except Exception as e:
            raise load_error(name_or_path, e) from None
    return Path(path), name_or_path or DEFAULT_MODEL


def open_model(name_or_path: str | None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               stream: bool = True) -> BlockSource:
    """The model ``name_or_path`` (folder, Hub id, None: the default model) as a :class:`BlockSource`
    computing on ``device``: streamed from its safetensors files where possible, else loaded whole."""
    device = torch.device(device)
    folder, source = _local(name_or_path)
    index = _index(folder) if stream else None
    if index:
        try:
            src = FileSource(folder, source, index, _stored_dtype(folder, index), device, dtype)
        except ModelLoadError:
            raise
        except Exception as e:  # transformers: unknown architecture, code it would have to run, bad config
            raise load_error(name_or_path, e) from None
        missing = src.missing()
        if not missing:
            return src
        log.info("the tensor names of %s differ from its module names (e.g. %s); loading it whole instead",
                 source, missing[0])
    elif stream:
        log.info("%s has no safetensors files; loading it whole instead of block by block", source)
    return MemorySource(load_model(name_or_path), device, dtype)
