"""Compression as stages over one decoder block at a time: load → statistics → costs → solve →
compress → save, with memory bounded by one block (plus the calibration activations), not by the
model, and every stage on the compute device.

Pass 1 runs only as far as the plan or the budget needs (data-free plans skip it):
- H only: block k runs on the uncompressed model's hidden states (a forward sweep); its input
  second moments are complete once it has run.
- With the Fisher diagonal: a forward sweep keeps every block's inputs (in memory when small, else
  on disk), the model's own tail turns the last hidden states into d loss_w / d hidden for every
  window w, and a backward sweep recomputes each block from its inputs, back-propagates that
  gradient and gathers each weight's per-window squared gradients (and H) on the way: block k's
  statistics are complete in the backward sweep, last block first.
When a block's statistics are complete its cost-table rows are computed (a budget run), and what
later stages read is saved under ``$LQKIT_CACHE/runs/<key>/`` (the Fisher diagonal whole only for
matrices that can use it, else its row and column sums): a run killed part-way resumes there, and
finished blocks are not recomputed.

Solve: the integer program over every block's rows (:mod:`lqkit.allocate`).

Pass 2: block by block, H recomputed from what the already compressed blocks produce (sequential,
as GPTQ does), the block's matrices decomposed, the compressed block run to give the next block's
inputs, and its tensors written to the checkpoint's shards.

With several processes (:mod:`lqkit.dist`) the per-matrix work of each block is split over the ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .calibrate import (CalibrationError, FisherAccumulator, HessianAccumulator, TableAccumulator, _check_finite,
                        backward_block, block_calls, first_inputs, forward_block, tail_grads, windows_per_call)
from .compress import MatrixReport, SizeSummary, _compress_one
from .core.costs import CandidateSet, MatrixCosts, matrix_costs
from .core.decompose import MatrixSpec, storage_bits
from .core.embed import RowCandidates, RowSpec, TableCosts, TableStats
from .core.rotation import for_matrix
from .core.stats import MatrixStats, forget
from .dist import SINGLE, Group
from .models import cache_dir
from .nn.linear import CompressedLinear
from .nn.surgery import set_submodule
from .stream import BlockSource

log = logging.getLogger(__name__)

RUN_VERSION = 1
ACTIVATIONS_IN_MEMORY = 1 << 30  # bytes of kept block inputs up to which they stay in memory, not on disk


@dataclass(frozen=True)
class Sweep:
    """How the sweeps run: windows per block call, per call of the model's tail, the process group."""

    chunk: int
    tail_chunk: int
    group: Group = SINGLE
    progress: bool = True

    @classmethod
    def for_source(cls, src: BlockSource, seqlen: int, group: Group = SINGLE, progress: bool = True) -> "Sweep":
        vocab = int(getattr(src.model.config, "vocab_size", 0) or 0) or 32000
        logits = max(1, (1 << 27) // max(seqlen * vocab, 1))  # about 512 MiB of fp32 logits per tail call
        return cls(windows_per_call(seqlen, src.device), logits, group, progress and group.main)


def block_linears(src: BlockSource, names: Iterable[str]) -> tuple[dict[int, list[str]], list[str]]:
    """({block: its named linears in the given order}, the names outside every block)."""
    inside: dict[int, list[str]] = {}
    outside = []
    for n in names:
        k = src.block_of(n)
        (outside.append(n) if k is None else inside.setdefault(k, []).append(n))
    return inside, outside


# ----------------------------------------------------------------------------------------------
# what is kept between stages: per-block statistics and cost-table rows, and kept activations


class RunStore:
    """Per-block statistics and cost-table rows of one run, saved as they complete (rank 0 writes)."""

    def __init__(self, root: Path, writer: bool = True):
        self.root, self.writer = root, writer

    def _stats(self, k: int) -> Path:
        return self.root / f"block-{k:05d}.stats.safetensors"

    def _costs(self, k: int) -> Path:
        return self.root / f"block-{k:05d}.costs.json"

    def done(self, k: int, costs: bool) -> bool:
        """Block k's files are there and readable; damaged ones (a full disk, a copy cut short) are
        removed with a warning, so that the block is computed again instead of failing every run."""
        if not (self._stats(k).is_file() and (not costs or self._costs(k).is_file())):
            return False
        if self._intact(k, costs):
            return True
        log.warning("cached statistics or costs of block %d in %s are damaged; computing them again", k, self.root)
        if self.writer:
            self._stats(k).unlink(missing_ok=True)
            self._costs(k).unlink(missing_ok=True)
        return False

    def _intact(self, k: int, costs: bool) -> bool:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._stats(k)), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
            alias = json.loads(meta.get("h_alias", "{}"))
            names = json.loads(meta.get("names", "[]"))
            if not isinstance(names, list) or any(f"h.{alias.get(n, n)}" not in keys and f"fisher.{n}" not in keys
                                                  and f"frows.{n}" not in keys for n in names):
                return False
            if costs:
                d = json.loads(self._costs(k).read_text())
                if not (isinstance(d, dict) and set(d) >= set(names)):
                    return False
                for v in d.values():
                    MatrixCosts.from_dict(v)
            return True
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def save(self, k: int, stats: Mapping[str, MatrixStats], costs: Mapping[str, MatrixCosts] | None,
             shared: list[tuple[str, ...]] = ()) -> None:
        """Statistics first, then costs (a block counts as done when both exist); ``shared``: the
        groups of layers that read one input (kept for the allocation's ties)."""
        if not self.writer:
            return
        from safetensors.torch import save as st_save

        tensors, alias, seen = {}, {}, {}
        for n, ms in stats.items():
            if ms.h is not None:
                if id(ms.h) in seen:
                    alias[n] = seen[id(ms.h)]
                else:
                    seen[id(ms.h)] = n
                    tensors[f"h.{n}"] = ms.h
            if ms.fisher is not None:
                tensors[f"fisher.{n}"] = ms.fisher
            elif ms.fisher_sums is not None:
                tensors[f"frows.{n}"], tensors[f"fcols.{n}"] = ms.fisher_sums
        data = st_save({k_: v.detach().contiguous().cpu() for k_, v in tensors.items()},
                       metadata={"h_alias": json.dumps(alias), "names": json.dumps(list(stats)),
                                 "shared": json.dumps([list(g) for g in shared])})
        checkpoint.write_atomic(self._stats(k), data)
        if costs is not None:
            checkpoint.write_atomic(self._costs(k), json.dumps({n: c.to_dict() for n, c in costs.items()}).encode())

    def load_stats(self, k: int, device) -> dict[str, MatrixStats]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._stats(k)), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                t = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CalibrationError(f"cannot read {self._stats(k)} ({e}); delete {self.root} to recompute") from None
        alias = json.loads(meta.get("h_alias", "{}"))
        out = {}
        for n in json.loads(meta.get("names", "[]")):
            h = t.get(f"h.{alias.get(n, n)}")
            sums = (t[f"frows.{n}"], t[f"fcols.{n}"]) if f"frows.{n}" in t else None
            out[n] = MatrixStats(h=h, fisher=t.get(f"fisher.{n}"), fisher_sums=sums)
        return out

    def shared(self, k: int) -> list[tuple[str, ...]]:
        """The groups of layers reading one input that :meth:`save` was given for block k."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._stats(k)), framework="pt", device="cpu") as f:
                return [tuple(g) for g in json.loads((f.metadata() or {}).get("shared", "[]"))]
        except (SafetensorError, OSError, ValueError) as e:
            raise CalibrationError(f"cannot read {self._stats(k)} ({e}); delete {self.root} to recompute") from None

    def load_costs(self, k: int) -> dict[str, MatrixCosts]:
        try:
            return {n: MatrixCosts.from_dict(d) for n, d in json.loads(self._costs(k).read_text()).items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CalibrationError(f"cannot read {self._costs(k)} ({e}); delete {self.root} to recompute") from None


class TableStore:
    """The statistics and cost rows of a run's embedding / head tables (:mod:`lqkit.core.embed`), saved
    beside its blocks' (rank 0 writes): a whole-model budget and a linear-only one on the same model,
    text and candidates share a run (its key does not name the scope); the tables' statistics come
    with the first whole-model budget, their rows once per set of row candidates."""

    def __init__(self, root: Path, writer: bool = True):
        self.stats_path, self.costs_path, self.writer = root / "tables.stats.safetensors", root / "tables.costs.json", writer

    def save_stats(self, stats: Mapping[str, TableStats]) -> None:
        if not self.writer:
            return
        from safetensors.torch import save as st_save

        tensors = {f"{n}::{k}": v.contiguous().cpu() for n, ts in stats.items() for k, v in ts.tensors().items()}
        checkpoint.write_atomic(self.stats_path, st_save(tensors, metadata={"names": json.dumps(list(stats))}))

    def load_stats(self) -> dict[str, TableStats] | None:
        """The saved statistics, or None when there are none (or they are unreadable)."""
        from safetensors import SafetensorError, safe_open

        from .core.embed import TableStats

        try:
            with safe_open(str(self.stats_path), framework="pt", device="cpu") as f:
                names = json.loads((f.metadata() or {}).get("names", "[]"))
                t = {key: f.get_tensor(key) for key in f.keys()}
            return {n: TableStats.from_tensors({k.split("::", 1)[1]: v for k, v in t.items()
                                                if k.startswith(f"{n}::")}) for n in names}
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            if self.stats_path.exists():
                log.warning("the cached table statistics %s are unreadable (%s); computing them again", self.stats_path, e)
            return None

    def save_costs(self, costs: Mapping[str, TableCosts], cands: RowCandidates) -> None:
        if self.writer:
            data = {"candidates": cands.to_dict(), "tables": {n: c.to_dict() for n, c in costs.items()}}
            checkpoint.write_atomic(self.costs_path, json.dumps(data).encode())

    def load_costs(self, cands: RowCandidates) -> dict[str, TableCosts] | None:
        """The saved rows when they were made for ``cands``, else None."""
        try:
            d = json.loads(self.costs_path.read_text())
            if RowCandidates.from_dict(d["candidates"]) != cands:
                return None
            return {n: TableCosts.from_dict(c) for n, c in d["tables"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


class Activations:
    """Each block's inputs (and, where given, its H), kept for the backward sweep: in memory when they
    are small, else on disk (safetensors, one file a block), so that memory does not grow with depth."""

    def __init__(self, root: Path, in_memory: bool):
        self.root, self.in_memory = root, in_memory
        self._mem: dict[tuple[int, str], object] = {}

    def _path(self, k: int, what: str) -> Path:
        return self.root / f"{what}-{k:05d}.safetensors"

    def put(self, k: int, x: torch.Tensor) -> None:
        """Keep block k's inputs (a copy: the caller may go on changing x)."""
        if self.in_memory:
            self._mem[(k, "x")] = x.clone()
            return
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        save_file({"x": x.detach().contiguous().cpu()}, str(self._path(k, "x")))

    def put_h(self, k: int, h: Mapping[str, torch.Tensor]) -> None:
        """Keep block k's H (name -> tensor; layers sharing an input share the tensor)."""
        if self.in_memory:
            self._mem[(k, "h")] = dict(h)
            return
        from safetensors.torch import save_file

        first: dict[int, str] = {}
        alias = {n: first.setdefault(id(t), n) for n, t in h.items()}
        save_file({f"h.{n}": t.contiguous().cpu() for n, t in h.items() if alias[n] == n}, str(self._path(k, "h")),
                  metadata={"alias": json.dumps(alias)})

    def get(self, k: int, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(block k's inputs, its H or {}), dropped here."""
        if self.in_memory:
            return self._mem.pop((k, "x")), self._mem.pop((k, "h"), {})
        from safetensors import safe_open
        from safetensors.torch import load_file

        x = load_file(str(self._path(k, "x")), device=str(device))["x"]
        self._path(k, "x").unlink()
        h = {}
        if self._path(k, "h").is_file():
            with safe_open(str(self._path(k, "h")), framework="pt", device=str(device)) as f:
                alias = json.loads((f.metadata() or {}).get("alias", "{}"))
                t = {key: f.get_tensor(key) for key in f.keys()}
            self._path(k, "h").unlink()
            h = {n: t[f"h.{a}"] for n, a in alias.items()}
        return x, h

    def close(self) -> None:
        self._mem.clear()
        if not self.in_memory:
            shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# pass 1: statistics (and, through on_block, the cost table)


def statistics(src: BlockSource, ids: torch.Tensor, by_block: Mapping[int, list[str]], fisher: bool,
               todo: Iterable[int], on_block: Callable[[int, dict[str, MatrixStats]], None], sweep: Sweep,
               scratch: Path, autocast: str = "float32", tables: TableAccumulator | None = None) -> dict:
    """Compute H (and with ``fisher`` the Fisher diagonal) of the linears of every block in ``todo``,
    calling ``on_block(k, {name: MatrixStats})`` while block k is loaded, as its statistics complete.
    H is always gathered from a forward in the compute dtype; the Fisher's backward sweep (and the
    model's tail) runs under ``autocast`` ("float32": none; see ``calibrate.fast_autocast_dtype``).
    ``tables`` (with ``fisher`` and block 0 in ``todo``): also fed the statistics of the embedding
    and the head (the head's in the tail, the lookup's from the gradient at block 0's input, which
    must be the embedding's output). Returns timings and the number of windows used."""
    todo = sorted(set(todo))
    if tables is not None and (not fisher or (todo and todo[0] != 0)):
        raise ValueError("the statistics of the embedding and head need the Fisher sweep down to block 0")
    info = {"seconds_forward": 0.0, "seconds_backward": 0.0, "windows": int(ids.shape[0])}
    if not todo:
        return info
    model, blocks, dev = src.model, src.blocks, src.device
    n = len(blocks)
    ac = dict(device_type=dev.type, dtype=getattr(torch, autocast), enabled=autocast != "float32")
    t0 = time.time()
    src.load_rest()
    calls = block_calls(model, blocks, ids, dev)
    x = first_inputs(model, blocks, ids, dev, sweep.chunk)
    scale = _embedding_scale(model, ids, x) if tables is not None else 1.0
    kmin = todo[0]
    last = n - 1 if fisher else todo[-1]
    bar = tqdm(total=last + 1 + (n - kmin if fisher else 0), desc="calibrate", unit="block", disable=not sweep.progress)
    acts = Activations(scratch / "activations", x.numel() * x.element_size() * (n - kmin) <= ACTIVATIONS_IN_MEMORY)
    try:
        for k in range(last + 1):
            block = src.load_block(k)
            lin = {nm: model.get_submodule(nm) for nm in by_block.get(k, [])}
            wanted = k in todo and bool(lin)
            acc = HessianAccumulator(lin) if wanted and (not fisher or ac["enabled"]) else None
            if fisher and k >= kmin:
                acts.put(k, x)
            with acc.hooks() if acc is not None else contextlib.nullcontext():
                forward_block(block, x, calls[k], sweep.chunk, acc)
            if acc is not None:
                _check_finite(acc)
                hs = acc.means(lin)
                if fisher:  # H now (a forward in the compute dtype); the Fisher's sweep runs under autocast
                    acts.put_h(k, hs)
                else:
                    on_block(k, {nm: MatrixStats(h=hs[nm]) for nm in lin})
            src.release_block(k)
            bar.update()
        info["seconds_forward"] = round(time.time() - t0, 1)
        if not fisher:
            return info
        t1 = time.time()
        with torch.autocast(**ac), (tables.head_hooks() if tables is not None else contextlib.nullcontext()):
            g, used = tail_grads(model, blocks, x, ids, sweep.tail_chunk)
        del x
        windows = int(used.sum())
        if windows == 0:
            raise CalibrationError("every calibration window gave a non-finite loss; the model produces NaN/inf: "
                                   "no Fisher statistics can be computed")
        info["windows"] = windows
        for k in reversed(range(kmin, n)):
            block = src.load_block(k)
            xk, hs = acts.get(k, dev)
            lin = {nm: model.get_submodule(nm) for nm in by_block.get(k, [])}
            stats = None
            if k in todo and lin:
                hacc = None if hs else HessianAccumulator(lin)
                facc = FisherAccumulator(lin)
                with torch.autocast(**ac):
                    g = backward_block(block, xk, g, calls[k], sweep.chunk, hacc, facc)
                if hacc is not None:
                    _check_finite(hacc)
                    hs = hacc.means(lin)
                stats = {}
                for nm in lin:
                    f = facc.sq[nm].div_(windows)
                    if not torch.isfinite(f).all():
                        raise CalibrationError(f"the Fisher diagonal of {nm} is not finite on the calibration text; "
                                               "the model produces NaN/inf gradients")
                    stats[nm] = MatrixStats(h=hs[nm], fisher=f)
                del facc
            elif k > kmin:  # the gradient still has to reach the blocks below
                with torch.autocast(**ac):
                    g = backward_block(block, xk, g, calls[k], sweep.chunk)
            del xk, hs
            if stats is not None:
                on_block(k, stats)  # block k still loaded
            src.release_block(k)
            bar.update()
        if tables is not None:  # g: the gradient at block 0's input, the embedding's output
            tables.add_lookup(ids, g, scale)
        info["seconds_backward"] = round(time.time() - t1, 1)
        return info
    finally:
        acts.close()
        bar.close()


def _embedding_scale(model, ids: torch.Tensor, x: torch.Tensor) -> float:
    """s with block 0's inputs x = s·W[ids] (W the embedding table); a model that changes its
    embeddings otherwise before the first block (a norm, a projection) has no lookup statistics here."""
    from .nn.embedding import embed_scale

    emb = model.get_input_embeddings()
    first = ids[:1].to(x.device)
    s = embed_scale(emb)
    with torch.no_grad():
        ref = emb.weight[first].to(x.dtype) * s
    if not torch.allclose(ref, x[:1], rtol=1e-2, atol=1e-3 * float(ref.abs().max().clamp_min(1e-30))):
        raise CalibrationError("this model transforms its token embeddings before the first decoder block, where "
                               "lqkit reads the lookup statistics of the embedding table; use --scope linear")
    return s


def stored_stats(stats: Mapping[str, MatrixStats], full: Callable[[str], bool], keep_h: bool,
                 dtype: torch.dtype, inplace: bool = False) -> dict[str, MatrixStats]:
    """What later stages read of a block's statistics: H when ``keep_h``; the Fisher diagonal in
    ``dtype``, whole for the matrices where ``full(name)``, else its row and column sums. ``inplace``:
    round the given fp32 Fisher tensors to ``dtype`` where they are instead of copying them (a 70B
    block's are 3.2 GB)."""
    out = {}
    for n, ms in stats.items():
        f = ms.fisher
        if f is not None and f.dtype != dtype:
            f = f.copy_(f.to(dtype)) if inplace and f.dtype == torch.float32 else f.to(dtype).float()
        ms = MatrixStats(h=ms.h if keep_h else None, fisher=f)
        out[n] = ms if (f is None or full(n)) else ms.compact()
    return out


# ----------------------------------------------------------------------------------------------
# the cost table of one block


def _costs_row(name: str, w: torch.Tensor, stats: MatrixStats | None, cands: CandidateSet, metric: str) -> dict:
    return matrix_costs(w, stats, cands, metric, rotation=for_matrix(name, w.shape[1])).to_dict()


class CostPool:
    """Worker processes for cost-table rows on a CPU, each with its share of the threads: the rows'
    inner loops are partly Python-bound and LAPACK on small matrices scales badly over threads, so
    two single-thread workers beat one two-thread process. Started once per run."""

    def __init__(self, workers: int):
        import concurrent.futures as cf

        import torch.multiprocessing as tmp

        from .allocate import _worker_init

        threads = max(1, torch.get_num_threads() // workers)
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=tmp.get_context("spawn"), initializer=_worker_init,
                                           initargs=(threads,))
        self.broken = False

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def block_costs(src: BlockSource, names: list[str], stats: Mapping[str, MatrixStats], cands: CandidateSet,
                metric: str, group: Group, bar, pool: CostPool | None = None) -> dict[str, MatrixCosts]:
    """Cost-table rows of the named matrices (of a loaded block), split over the group's ranks (and,
    with ``pool``, computed in its worker processes)."""
    import concurrent.futures as cf

    model = src.model
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]
    owners = group.owners([o * i * i for o, i in shapes])
    mine = [n for n, r in zip(names, owners) if r == group.rank]
    rows = {}
    if pool is not None and not pool.broken:
        from concurrent.futures.process import BrokenProcessPool

        per = len(cands.quant_specs()) * len(cands.rotations)
        try:
            size = dict(zip(names, [o * i * i for o, i in shapes]))
            futures = {pool.pool.submit(_costs_row, n, model.get_submodule(n).weight.detach().cpu(), stats.get(n),
                                        cands, metric): n
                       for n in sorted(mine, key=lambda n: -size[n])}  # largest first: the workers end together
            for f in cf.as_completed(futures):
                rows[futures[f]] = f.result()
                bar.update(per)
        except BrokenProcessPool as e:  # e.g. a script without `if __name__ == "__main__":` under spawn
            pool.broken = True
            log.warning("cost-table workers failed (%s); computing in this process. Scripts that call lqkit should "
                        "guard their entry point with `if __name__ == \"__main__\":`", e or "a worker died")
    left = [n for n in mine if n not in rows]
    for i, n in enumerate(left):
        w = model.get_submodule(n).weight.detach()
        t0 = time.time()
        rows[n] = matrix_costs(w, stats.get(n), cands, metric, on_progress=bar.update,
                               rotation=for_matrix(n, w.shape[1])).to_dict()
        log.debug("cost-table row of %s (%dx%d): %.1f s", n, *w.shape, time.time() - t0)
        h = stats[n].h if n in stats else None
        if h is not None and not any(stats[m].h is h for m in left[i + 1:] if m in stats):
            forget(h)  # its factorisations (n×n each) are not needed by the rows still to come
    if group.world > 1:
        for part in group.gather(rows):
            rows.update(part)
    return {n: MatrixCosts.from_dict(rows[n]) for n in names}


# ----------------------------------------------------------------------------------------------
# pass 2: compress block by block and write the checkpoint


def _exchange(src: BlockSource, name: str, owner: int, group: Group, reports: dict) -> None:
    """Give every rank the compressed layer ``name`` that rank ``owner`` computed."""
    model = src.model
    mine = group.rank == owner
    payload = None
    if mine:
        m = model.get_submodule(name)
        payload = (m.spec.to_dict(), reports[name].to_dict(), m.bias is not None)
    spec_d, rep_d, has_bias = group.broadcast_object(payload, owner)
    if not mine:
        old = model.get_submodule(name)
        spec = MatrixSpec.from_dict(spec_d)
        new = CompressedLinear(spec, (old.out_features, old.in_features), has_bias, dtype=old.weight.dtype,
                               device=old.weight.device)
        set_submodule(model, name, new)
        rep_d = {k: v for k, v in rep_d.items() if k != "bits_per_param"}
        reports[name] = MatrixReport(**{**rep_d, "shape": tuple(rep_d["shape"])})
    m = model.get_submodule(name)
    with torch.no_grad():
        for t in list(m.buffers()) + list(m.parameters()):
            group.broadcast_(t.data, owner)


def compress_blocks(src: BlockSource, plan: Mapping[str, MatrixSpec], *, stats: Callable[[int], Mapping[str, MatrixStats]] | None,
                    seq_ids: torch.Tensor | None, writer: "checkpoint.CheckpointWriter | None", sweep: Sweep,
                    device: torch.device) -> dict[str, MatrixReport]:
    """Replace each planned linear by its CompressedLinear, block by block; each block's tensors go
    to ``writer`` (in stored dtypes) and the block is released. ``stats(k)``: the stored statistics
    of block k; ``seq_ids``: calibration windows when H is recomputed sequentially."""
    model, blocks, group = src.model, src.blocks, sweep.group
    by_block, outside = block_linears(src, plan)
    reports: dict[str, MatrixReport] = {}
    bar = tqdm(total=len(plan), desc="compress", unit="matrix", disable=not sweep.progress)
    src.load_rest()
    x = calls = None
    if seq_ids is not None:
        calls = block_calls(model, blocks, seq_ids, src.device)
        x = first_inputs(model, blocks, seq_ids, src.device, sweep.chunk)

    def compress(names: list[str], given: Mapping[str, MatrixStats], hs: Mapping[str, torch.Tensor]) -> None:
        shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]
        owners = group.owners([o * i * i for o, i in shapes])
        for n, r in zip(names, owners):
            if r == group.rank:
                base = given.get(n)
                h = hs.get(n, base.h if base is not None else None)
                ms = MatrixStats(h=h, fisher=base.fisher if base else None, fisher_sums=base.fisher_sums if base else None)
                reports[n] = _compress_one(model, n, plan[n], ms if (h is not None or base is not None) else None,
                                           device)
            bar.update()
        if group.world > 1:
            for n, r in zip(names, owners):
                _exchange(src, n, r, group, reports)

    try:
        for k in range(len(blocks)):
            block = src.load_block(k)
            names = by_block.get(k, [])
            hs = {}
            if names and x is not None:
                acc = HessianAccumulator({n: model.get_submodule(n) for n in names})
                with acc.hooks():
                    forward_block(block, x, calls[k], sweep.chunk, acc, keep=False)
                _check_finite(acc)
                hs = acc.means(names)
            compress(names, stats(k) if stats is not None else {}, hs)
            del hs
            for n in names:  # the next block's inputs: the reference path (no kernel compiles or tuning here)
                model.get_submodule(n).backend = "torch"
            if x is not None and k < len(blocks) - 1:
                forward_block(block, x, calls[k], sweep.chunk)
            if writer is not None:
                state, aliases = checkpoint.stored_state(block, src.stored_dtype, prefix=f"{src.prefix}.{k}.")
                writer.add(state)
                for a, t in aliases.items():
                    writer.alias(a, t)
            src.release_block(k)
        compress(outside, {}, {})  # layers outside the blocks (e.g. a head the user included): data-free only
        if writer is not None:
            state, aliases = checkpoint.stored_state(model, src.stored_dtype, exclude=f"{src.prefix}.")
            writer.add(state)
            for a, t in aliases.items():
                writer.alias(a, t)
    finally:
        bar.close()
    return {n: reports[n] for n in plan}


def other_params(src: BlockSource, names: Iterable[str]) -> int:
    """Parameters that stay uncompressed (tied ones once): everything but the named linears' weights.
    Call before compression, while the named layers are still nn.Linear."""
    model = src.model
    return sum(p.numel() for p in model.parameters()) - sum(model.get_submodule(n).weight.numel() for n in names)


def size_summary(src: BlockSource, plan: Mapping[str, MatrixSpec], other: int,
                 tables: Mapping[str, RowSpec] | None = None) -> SizeSummary:
    """Exact storage of the planned matrices (resolved specs), of the tables stored as quantized rows
    (``tables``) and of the ``other`` parameters (tables included: counted before they were replaced)
    at their stored dtype."""
    from .core import embed

    model = src.model
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in plan}
    cbits = sum(storage_bits(plan[n], shapes[n]) for n in plan)
    tshapes = {n: tuple(_table_shape(model.get_submodule(n))) for n in (tables or {})}
    tparams = sum(r * d for r, d in tshapes.values())
    tbits = sum(embed.storage_bits(s, tshapes[n]) for n, s in (tables or {}).items())
    other -= tparams
    return SizeSummary(sum(o * i for o, i in shapes.values()), cbits, other,
                       other * torch.empty((), dtype=src.stored_dtype).element_size() * 8, tparams, tbits)


def _table_shape(module) -> tuple[int, int]:
    shape = getattr(module, "shape", None)  # a quantized table
    return tuple(shape) if shape is not None else tuple(module.weight.shape)


def run_key(src: BlockSource, names: list[str], ids: torch.Tensor, parts: Mapping) -> str:
    """Identifies a run's per-block statistics and costs: the weights, the calibration windows, the
    compute dtype and device type, and ``parts`` (what is computed and kept)."""
    blob = json.dumps({"v": RUN_VERSION, "w": src.fingerprint(names),
                       "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "shape": list(ids.shape),
                       "dtype": str(src.dtype), "device": src.device.type, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_dir(key: str) -> Path:
    return cache_dir() / "runs" / key

