"""Checkpoint I/O: safetensors for tensors, JSON for the plan, reports and checksums.

A checkpoint folder holds the tensors of the compressed model (packed codes, scales, L and R in their
stored dtypes, and the uncompressed parameters in the source model's dtype) in one or more
safetensors shards (``model.safetensors``, or ``model-00001-of-00003.safetensors``, ... for models
over ``max_shard_bytes``), ``lqkit.json`` (format version, plan, per-matrix reports, size summary,
sha256 and size of every tensor file), the model's ``config.json`` and the tokenizer. It is
written into a temporary folder (shard by shard, so a streamed compression never holds the whole
model: :class:`CheckpointWriter`) and renamed into place. Loading builds the model skeleton without
allocating weights, swaps in empty compressed layers from the plan, and assigns the stored tensors
shard by shard: no full-precision copy of a compressed layer is built.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .core.decompose import MatrixSpec
from .core.embed import RowSpec
from .core.quant import DTYPES
from .errors import CheckpointError
from .outdir import check_out_dir, make_temp_dir, release, swap_in, umask  # noqa: F401  (check_out_dir: re-exported)
from .nn.embedding import build_tables, quantized_tables, tied_heads
from .nn.inference import prepare_for_inference
from .nn.surgery import build_empty, compressed_modules
from .plan import plan_from_json, plan_to_json

log = logging.getLogger(__name__)

FORMAT = "lqkit"
FORMAT_VERSION = 6  # 6: a matrix may store integer zero points (QuantSpec.int_zero; written only then);
# 5: tables (embedding, head) stored as quantized rows, listed under "tables" (written only then);
# 4: a matrix may carry an input rotation (written only then: an older lqkit reads every other
# checkpoint and says "upgrade lqkit" for these); 3: config.json (and generation_config.json) checksummed
# too; 2: tensors in one or more shards, each listed under "files"; 1: one model.safetensors
META_FILE = "lqkit.json"
TENSOR_FILE = "model.safetensors"
MAX_SHARD_BYTES = 2 * 2**30  # a shard is written once its tensors reach this size


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def stored_state(module: nn.Module, dense_dtype: torch.dtype | None, prefix: str = "",
                 exclude: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s state in stored dtypes — L and R in their plan's factor dtype, other floating
    tensors in ``dense_dtype`` (if given), compressed buffers as they are — with names prefixed by
    ``prefix``, leaving out names that start with ``exclude``; tensors that share memory are stored
    once (their other names returned as aliases)."""
    factor, packed = {}, set()
    for name, m in compressed_modules(module).items():
        for part in ("L", "R"):
            if getattr(m, part) is not None:
                factor[f"{name}.{part}" if name else part] = DTYPES[m.spec.factor_dtype]
        packed |= {f"{name}.{b}" if name else b for b, _ in m.named_buffers()}  # codes, scales, ...: as planned
    for name, m in quantized_tables(module).items():  # a table's codes, scales, offsets: as planned
        packed |= {f"{name}.{b}" if name else b for b, _ in m.named_buffers()}
    state, aliases, seen = {}, {}, {}
    for key, t in module.state_dict().items():
        if exclude is not None and key.startswith(exclude):
            continue
        ident = (t.data_ptr(), t.numel(), t.dtype, t.device)
        if ident in seen:
            aliases[prefix + key] = seen[ident]
            continue
        seen[ident] = prefix + key
        if key in factor:
            t = t.to(factor[key])
        elif dense_dtype is not None and t.is_floating_point() and key not in packed:
            t = t.to(dense_dtype)
        state[prefix + key] = t.detach()
    return state, aliases


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
                      torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class _ShardFile:
    """One safetensors file written as its tensors come: each tensor's bytes go straight to a data
    file on disk, and :meth:`close` writes the header (names, dtypes, shapes, offsets) and appends the
    data in one kernel-side copy. Host memory holds one tensor at a time, whatever the shard's size
    (``safetensors.save_file`` needs every tensor of the file in memory at once)."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self._data = self.data_path.open("wb")
        self.header: dict[str, dict] = {}
        self.bytes = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if n:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.bytes, self.bytes + n]}
        self.bytes += n

    def close(self) -> None:
        self._data.close()
        meta = {"__metadata__": {"format": "pt", "producer": f"lqkit {__version__}"}, **self.header}
        head = json.dumps(meta, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
        with self.path.open("wb") as out, self.data_path.open("rb") as data:
            out.write(len(head).to_bytes(8, "little") + head)
            out.flush()
            shutil.copyfileobj(data, out, 1 << 24)
        self.data_path.unlink()


class CheckpointWriter:
    """Writes a checkpoint folder piece by piece: tensors are added in stored dtypes and written to
    disk as they come, into shards of about ``max_shard_bytes`` (host memory holds one tensor, never a
    shard); then :meth:`finish` writes the JSON, config and tokenizer and renames the folder into place.
    Until then everything is in a temporary folder beside ``out``, removed by :meth:`abort`."""

    def __init__(self, out: str | Path, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out = check_out_dir(out, overwrite)  # and claimed: one run writes it at a time
        self.tmp = make_temp_dir(self.out)
        self.max_shard_bytes = max_shard_bytes
        self.aliases: dict[str, str] = {}
        self._keys: set[str] = set()
        self._open: _ShardFile | None = None
        self._shards: list[Path] = []

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write tensors (any device; stored as given: cast them to their stored dtype first)."""
        for key, t in tensors.items():
            if key in self._keys or key in self.aliases:
                raise CheckpointError(f"tensor {key!r} added twice to a checkpoint")
            self._keys.add(key)
            if self._open is None:
                self._open = _ShardFile(self.tmp / f"model-{len(self._shards) + 1:05d}.safetensors")
            self._open.add(key, t)
        if self._open is not None and self._open.bytes >= self.max_shard_bytes:
            self._flush()

    def alias(self, key: str, target: str) -> None:
        """``key`` is the same tensor as ``target`` (tied weights): stored once."""
        self.aliases[key] = target

    def _flush(self) -> None:
        if self._open is None:
            return
        self._open.close()
        self._shards.append(self._open.path)
        self._open = None

    def finish(self, model_config, tokenizer, *, plan: Mapping[str, MatrixSpec], reports: Mapping[str, dict] | None,
               summary: dict | None, extra: dict | None, dtype: torch.dtype, generation_config=None,
               files: Mapping[str, bytes] | None = None, overwrite: bool = False,
               tables: Mapping[str, tuple[RowSpec, tuple[int, int]]] | None = None,
               tied: Mapping[str, str] | None = None) -> Path:
        """Write the remaining tensors, the JSON, config and tokenizer; rename into place. ``tables``:
        module name -> (RowSpec, shape) of the tables stored as quantized rows; ``tied``: head -> the
        table it computes with."""
        try:
            self._flush()
            if not self._shards:
                save_file({}, str(self.tmp / TENSOR_FILE))
                self._shards.append(self.tmp / TENSOR_FILE)
            n = len(self._shards)
            names = [TENSOR_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for src, name in zip(self._shards, names):
                if src.name != name:
                    os.rename(src, self.tmp / name)
            model_config.save_pretrained(self.tmp)
            if generation_config is not None:
                generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            for fname, data in (files or {}).items():
                if Path(fname).name != fname or fname == META_FILE or fname.endswith(".safetensors"):
                    raise CheckpointError(f"cannot store an extra file named {fname!r} in a checkpoint")
                (self.tmp / fname).write_bytes(data)
            meta = {
                "format": FORMAT, "format_version": _version(plan, tables), "lqkit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "dtype": str(dtype).removeprefix("torch."),
                "plan": plan_to_json(plan), "reports": dict(reports or {}), "summary": summary or {},
                "aliases": self.aliases, "extra": extra or {},
                **({"tables": tables_to_json(tables, tied)} if tables else {}),
                "files": {name: {"sha256": _sha256(self.tmp / name), "bytes": (self.tmp / name).stat().st_size}
                          for name in names + [c for c in CHECKSUMMED if (self.tmp / c).is_file()]},
            }
            meta["meta_sha256"] = _meta_digest(meta)
            (self.tmp / META_FILE).write_text(json.dumps(meta, indent=1))
            swap_in(self.tmp, self.out, overwrite)
        except BaseException:
            self.abort()
            raise
        release(self.out)
        log.info("wrote %s (%d tensor file%s)", self.out, n, "s" if n > 1 else "")
        return self.out

    def abort(self) -> None:
        if self._open is not None:
            try:
                self._open._data.close()
            except OSError:  # the write that failed (a full disk) fails again on the flush
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        release(self.out)


def _version(plan: Mapping[str, MatrixSpec], tables=None) -> int:
    """The oldest format that holds ``plan`` (and ``tables``)."""
    if any(s.quant is not None and s.quant.int_zero for s in plan.values()):
        return 6
    if tables:
        return 5
    return 4 if any(s.rotation is not None for s in plan.values()) else 3


def tables_to_json(tables: Mapping[str, tuple[RowSpec, tuple[int, int]]], tied: Mapping[str, str] | None) -> dict:
    """lqkit.json's "tables": {name: {"spec": ..., "shape": [rows, dim], "tied": [heads]}}."""
    tied = tied or {}
    return {n: {"spec": spec.to_dict(), "shape": list(shape), "tied": sorted(h for h, t in tied.items() if t == n)}
            for n, (spec, shape) in tables.items()}


def refuse_tables(meta: Mapping, path, verb: str) -> None:
    """A SpecError for a verb that does not handle quantized tables yet, when the checkpoint has them."""
    if meta.get("tables"):
        from .errors import SpecError

        raise SpecError(f"checkpoint {path} stores its embedding as quantized rows (--scope model), which {verb} "
                        "does not handle yet; use a checkpoint compressed with --scope linear")


def tables_from_json(d: Mapping) -> tuple[dict[str, RowSpec], dict[str, str]]:
    """({table: RowSpec}, {head: table}) of lqkit.json's "tables"."""
    return ({n: RowSpec.from_dict(e["spec"]) for n, e in d.items()},
            {h: n for n, e in d.items() for h in e.get("tied", [])})


def save(model: nn.Module, tokenizer, out: str | Path, *, plan: Mapping[str, MatrixSpec],
         reports: Mapping[str, dict] | None = None, summary: dict | None = None, extra: dict | None = None,
         overwrite: bool = False, dense_dtype: torch.dtype | None = None,
         files: Mapping[str, bytes] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a checkpoint of an in-memory model atomically (temporary folder, then rename).
    ``dense_dtype``: dtype of the uncompressed floating tensors (default: as in the model).
    ``files``: further small files to put in the folder (name -> bytes), e.g. a picture of the plan."""
    writer = CheckpointWriter(out, overwrite, max_shard_bytes)
    try:
        state, aliases = stored_state(model, dense_dtype)
        writer.add(state)
        for k, v in aliases.items():
            writer.alias(k, v)
    except BaseException:
        writer.abort()
        raise
    dtype = dense_dtype or next(model.parameters()).dtype
    tables = {n: (m.spec, m.shape) for n, m in quantized_tables(model).items()}
    return writer.finish(model.config, tokenizer, plan=plan, reports=reports, summary=summary, extra=extra,
                         dtype=dtype, generation_config=getattr(model, "generation_config", None), files=files,
                         overwrite=overwrite, tables=tables, tied=tied_heads(model))


def read_meta(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not an lqkit checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META_FILE} is corrupted ({e}); re-create the checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_FILE} is not an lqkit checkpoint description; re-create the checkpoint")
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{path / META_FILE} is not an lqkit checkpoint description")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {meta['format_version']} is newer than this lqkit "
                              f"understands ({FORMAT_VERSION}); upgrade lqkit")
    _check_meta(path, meta)
    return meta


def _meta_digest(meta: Mapping) -> str:
    """sha256 of lqkit.json's content (but this digest itself), key order and spacing aside."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_meta(path: Path, meta: dict) -> None:
    """lqkit.json as lqkit wrote it: its own checksum (format 3 on), and every section of the type
    it must have, the plan one that parses. One line naming what is wrong, never a traceback."""
    where = path / META_FILE
    if meta["format_version"] >= 3 and meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"{where} is corrupted or was edited (its checksum does not match); re-create the "
                              "checkpoint")
    for key, kind in (("plan", dict), ("files", dict), ("aliases", dict), ("reports", dict), ("summary", dict),
                      ("extra", dict), ("dtype", str)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{where}: {key!r} is a {type(meta[key]).__name__}, not a {kind.__name__}; "
                                  "re-create the checkpoint")
    if "plan" not in meta:
        raise CheckpointError(f"{where} has no plan; re-create the checkpoint")
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {meta['dtype']!r}; re-create the checkpoint")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.get("aliases", {}).items()):
        raise CheckpointError(f"{where} has malformed aliases; re-create the checkpoint")
    try:
        tables_from_json(meta.get("tables") or {})
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{where}: the tables entry is malformed ({msg}); re-create the checkpoint") from None
    for name, spec in meta["plan"].items():
        try:
            if not isinstance(spec, dict):
                raise TypeError(f"a {type(spec).__name__}")
            MatrixSpec.from_dict(spec)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{where}: the plan entry of {name!r} is malformed ({msg}); re-create the "
                                  "checkpoint") from None


def update_extra(path: str | Path, extra: Mapping) -> None:
    """Merge ``extra`` into a checkpoint's ``extra`` section (e.g. an evaluation made after saving);
    lqkit.json is replaced atomically."""
    path = Path(path).expanduser()
    meta = read_meta(path)
    meta["extra"] = {**(meta.get("extra") or {}), **extra}
    if meta["format_version"] >= 3:
        meta["meta_sha256"] = _meta_digest(meta)
    write_atomic(path / META_FILE, json.dumps(meta, indent=1).encode())


CHECKSUMMED = ("config.json", "generation_config.json")  # small files whose checksum a checkpoint also keeps


def verify(path: str | Path, meta: dict | None = None) -> None:
    """Check the checkpoint's files against its JSON: every listed file is a plain name inside the
    folder, present, of its size and sha256; every tensor file in the folder is listed (so none can be
    added, swapped in or left out unseen), and at least one is."""
    path = Path(path)
    meta = meta or read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict) or not tensor_files(meta):
        raise CheckpointError(f"{path / META_FILE} lists no tensor files; re-create the checkpoint")
    for fname, info in files.items():  # names first: nothing outside the folder is ever opened
        if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", "..") or not isinstance(info, dict):
            raise CheckpointError(f"{path / META_FILE} names a file {fname!r} outside the checkpoint folder; "
                                  "re-create the checkpoint")
    on_disk = {f.name for f in path.glob("*.safetensors")}
    if meta.get("format_version", 0) >= 3:  # from version 3 on, the config is covered as well
        on_disk |= {c for c in CHECKSUMMED if (path / c).is_file()}
    unlisted = sorted(on_disk - set(files))
    if unlisted:
        raise CheckpointError(f"checkpoint file {path / unlisted[0]} is not listed in {META_FILE}; the folder was "
                              "altered: re-create or re-copy the checkpoint")
    for fname, info in files.items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; re-create the checkpoint")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"checkpoint file {f} is truncated or altered ({size} bytes, expected "
                                  f"{info.get('bytes')}); re-create or re-copy the checkpoint")
        if _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"checkpoint file {f} is corrupted (sha256 mismatch); re-create or re-copy it")


def _check_stored(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], where: Path) -> None:
    """Every tensor of a shard has the shape the model (and plan) gives it, and every compressed
    buffer (codes, scales, indices, ...) the dtype the plan stores it in: a rewritten tensor is an
    error, never a silently different model."""
    for key, t in state.items():
        if key not in expected:
            continue  # reported as unexpected by the caller
        shape, dt = expected[key]
        if tuple(t.shape) != shape or (dt is not None and t.dtype != dt):
            what = f"{tuple(t.shape)} {t.dtype}".replace("torch.", "")
            want = f"{shape} {dt or 'a floating dtype'}".replace("torch.", "")
            raise CheckpointError(f"tensor {key!r} in {where} is {what}, but the plan stores {want}; the checkpoint "
                                  "was altered: re-create it")


def tensor_files(meta: dict) -> list[str]:
    """The checkpoint's tensor files (shards) in order."""
    return sorted(f for f in meta.get("files", {}) if f.endswith(".safetensors"))


TUNE_DEFAULT = False  # load(tune=...): time the one-token launch configurations on a GPU


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         check: bool = True, prepare: bool = True, tune: bool = TUNE_DEFAULT) -> nn.Module:
    """Load a compressed checkpoint as a working ``transformers`` model, one shard at a time; with
    ``prepare`` (default) ready for fast inference (lqkit.nn.prepare_for_inference: on CUDA kernels
    prepared and layers that share an input stacked; on the CPU deq(Q) kept dense). Training or
    moving the model drops that state. ``tune`` (on a GPU): the one-token kernel calls get the launch
    configuration timed fastest on this GPU for their shape and format, kept under
    ``$LQKIT_CACHE/kernels/`` (timed once per GPU, triton version, shape and format; later loads
    read it), instead of the default one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    meta = read_meta(path)
    if check:
        verify(path, meta)
    plan = plan_from_json(meta["plan"])
    tables, tied = tables_from_json(meta.get("tables") or {})
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with init_empty_weights():  # parameters on the meta device; buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        build_empty(model, plan, dtype=dtype, device="meta")
        build_tables(model, tables, tied, dtype=dtype, device="meta")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # config.json or plan do not fit
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot build the model of checkpoint {path}: {msg}; re-create the checkpoint") from None
    comp_buffers = {f"{n}.{b}" for n, m in compressed_modules(model).items() for b, _ in m.named_buffers()}
    comp_buffers |= {f"{n}.{b}" for n, m in quantized_tables(model).items() for b, _ in m.named_buffers()}
    expected = {k: (tuple(t.shape), t.dtype if k in comp_buffers else None) for k, t in model.state_dict().items()}
    aliases = meta.get("aliases", {})  # a dict of names: read_meta checked
    loaded: dict[str, torch.Tensor] = {}
    for fname in tensor_files(meta):
        try:
            state = load_file(str(path / fname), device=str(device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path / fname}: {e}; re-create the checkpoint") from None
        _check_stored(state, expected, path / fname)
        for key, t in state.items():
            if t.is_floating_point() and key not in comp_buffers:
                state[key] = t.to(dtype)
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected:
            raise CheckpointError(f"checkpoint has tensors the model does not: {unexpected[:3]}...")
        loaded.update({k: state[k] for k in aliases.values() if k in state})
        del state
    tied = {}
    for alias, target in aliases.items():
        if target not in loaded:
            raise CheckpointError(f"checkpoint alias {alias!r} names {target!r}, which no tensor file holds; "
                                  "re-create the checkpoint")
        tied[alias] = loaded[target]
    if tied:
        model.load_state_dict(tied, strict=False, assign=True)
    if hasattr(model, "tie_weights") and not tables:  # a quantized table's heads are tied by their modules
        model.tie_weights()
    still_meta = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"checkpoint lacks tensors for {still_meta[:3]}; re-create the checkpoint")
    model.to(device)
    model.eval()
    if prepare:  # issue #24: ready for generate() (kernels, stacked q/k/v and gate/up; dense deq(Q) on the CPU)
        tuned = read_tuned() if tune and torch.device(device).type == "cuda" else None
        before = dict(tuned or {})
        prepare_for_inference(model, tuned=tuned)
        if tuned is not None and tuned != before:
            write_tuned(tuned)
    return model


def tuned_path() -> Path:
    """Where the launch configurations timed on this machine's GPUs are kept (JSON)."""
    from .models import cache_dir

    return cache_dir() / "kernels" / "tuned.json"


TUNED_FORMAT = 1


def read_tuned() -> dict[str, dict]:
    """The kept launch configurations ({} when none, or when the file is unreadable or of another
    format: they are timed again). An entry that is not a valid configuration is timed again too."""
    p = tuned_path()
    try:
        d = json.loads(p.read_text())
        if d.get("format") != TUNED_FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {TUNED_FORMAT}")
        return {k: v for k, v in d.get("configs", {}).items() if isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring %s (%s); the kernels' launch configurations will be timed again", p, e)
        return {}


def write_tuned(configs: Mapping[str, dict]) -> None:
    """Keep ``configs`` (atomically; a failure to write only warns: they are timed again next time)."""
    data = json.dumps({"format": TUNED_FORMAT, "configs": dict(sorted(configs.items()))}, indent=1)
    try:
        write_atomic(tuned_path(), data.encode())
    except OSError as e:
        log.warning("could not keep the timed launch configurations in %s (%s)", tuned_path(), e)


# ----------------------------------------------------------------------------------------------
# training state (resumable fine-tuning): tensors in safetensors, everything else in JSON, no pickle

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
STATE_POINTER = "LATEST"


def save_state(root: str | Path, tag: str, tensors: Mapping[str, torch.Tensor], meta: dict, keep: int = 1) -> Path:
    """Write one training state as ``root/tag/`` (tensors + JSON with their sha256), then point
    ``root/LATEST`` at it with an atomic rename; older states beyond ``keep`` are removed. A process
    killed at any moment leaves ``LATEST`` naming a complete state."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root / tag)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        meta = dict(meta, tensors_sha256=_sha256(tmp / STATE_TENSORS))
        (tmp / STATE_META).write_text(json.dumps(meta, indent=1))
        swap_in(tmp, root / tag, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{STATE_POINTER}.tmp"
    pointer.write_text(tag)
    os.replace(pointer, root / STATE_POINTER)
    states = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in [p for p in states if p.name != tag][: max(0, len(states) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".*.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    return root / tag


def load_state(root: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of the state that ``root/LATEST`` names."""
    root = Path(root)
    try:
        tag = (root / STATE_POINTER).read_text().strip()
    except FileNotFoundError:
        raise CheckpointError(f"no saved training state in {str(root)!r}; run without --resume to start") from None
    d = root / tag
    try:
        meta = json.loads((d / STATE_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"training state {str(d)!r} is unreadable ({e}); start again without --resume") from None
    f = d / STATE_TENSORS
    if not f.is_file() or _sha256(f) != meta.get("tensors_sha256"):
        raise CheckpointError(f"training state {str(d)!r} is corrupted (sha256 mismatch); start again without --resume")
    return load_file(str(f)), meta


# ----------------------------------------------------------------------------------------------
# calibration statistics: one safetensors file, tensors keyed "h.<module>" / "fisher.<module>",
# JSON metadata (format, counts, aliases of shared H, model, text sha256, samples, seqlen, ...)

STATS_FORMAT = "lqkit-stats"
STATS_VERSION = 1


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename: readers see the old
    file or the new one, never a part (the temporary file is removed if writing fails)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # as an ordinary file would be (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_stats(stats, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write :class:`lqkit.calibrate.CalibrationStats` to a safetensors file (atomically)."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise CheckpointError(f"statistics file {str(path)!r} already exists; pass --overwrite or choose another path")
    if path.exists() and path.is_dir():
        raise CheckpointError(f"statistics path {str(path)!r} is a folder; choose a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"h.{n}": t.contiguous().cpu() for n, t in stats.h.items()}
    tensors.update({f"fisher.{n}": t.contiguous().cpu() for n, t in stats.fisher.items()})
    meta = {"format": STATS_FORMAT, "format_version": str(STATS_VERSION), "lqkit_version": __version__,
            "count": json.dumps(stats.count), "h_alias": json.dumps(stats.h_alias), "meta": json.dumps(stats.meta)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_stats(path: str | Path, device: str = "cpu"):
    """Read a statistics file written by :func:`save_stats`."""
    from safetensors import safe_open

    from .calibrate import CalibrationStats

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"statistics file {str(path)!r} does not exist; create it with `lqkit calibrate`")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise CheckpointError(f"{path} is not an lqkit statistics file (written by `lqkit calibrate`)")
            if int(meta.get("format_version", 0)) > STATS_VERSION:
                raise CheckpointError(f"{path} has statistics format {meta['format_version']}, newer than this "
                                      f"lqkit understands ({STATS_VERSION}); upgrade lqkit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read statistics file {path}: {e}; re-create it with `lqkit calibrate`") from None
    return CalibrationStats(
        h={k[2:]: t for k, t in tensors.items() if k.startswith("h.")},
        count={k: int(v) for k, v in json.loads(meta["count"]).items()},
        h_alias=json.loads(meta["h_alias"]),
        fisher={k[7:]: t for k, t in tensors.items() if k.startswith("fisher.")},
        meta=json.loads(meta["meta"]),
    )
