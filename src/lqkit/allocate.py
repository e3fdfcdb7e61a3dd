"""Memory-budget allocation over a whole model: the cost table (cached on disk), the solve, the plan.

The user states one number, a budget in bits per compressed parameter (``Budget(2.75)``) or in bytes
(``Budget(bytes=40_000_000)``) for the selected linear layers. For every such matrix the cost
table (:func:`lqkit.core.costs.matrix_costs`) lists the Pareto-optimal candidates with their exact
stored bits and sensitivity-weighted errors; :func:`lqkit.core.allocate.solve` picks one per matrix
minimising the total error within the budget; the result is a plan (module name -> MatrixSpec)
that drives surgery, is saved in the checkpoint and is reported.

With a serving target (``CandidateSet(target="vllm")``, ``lqkit compress --target vllm``) the table
holds only what the runtime serves, and layers that read one input — which vLLM and SGLang fuse into
one layer of one scheme (q/k/v, gate/up) — are tied to one integer scheme in the integer program
(their ranks stay free: the adapter carries L·R per layer). Who reads one input is what calibration
saw (:func:`input_groups`), never a list of names.

The table is the expensive part. It is computed matrix by matrix, in worker processes on a CPU (each
with its share of the threads: the table's inner loops are partly Python-bound, so two single-thread
workers beat one two-thread process), on the GPU in-process when ``device`` is CUDA, and cached
as JSON under ``$LQKIT_CACHE/tables/`` keyed by a fingerprint of the weights, of the statistics, of
the candidate set and of the metric: a second budget on the same model costs only the solve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .core.allocate import Allocation, BudgetError, min_bits, solve
from .core.costs import METRICS, CandidateSet, MatrixCosts, matrix_costs, min_candidate_bits
from .core import embed
from .core.decompose import MatrixSpec
from .core.embed import RowCandidates, RowSpec, TableCosts
from .core.rotation import for_matrix
from .core.stats import MatrixStats
from .errors import SpecError
from .models import cache_dir
from .plan import Plan

log = logging.getLogger(__name__)

TABLE_VERSION = 1
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_bytes(text: str) -> int:
    """'40MB' -> 40_000_000, '1.5GiB' -> 1610612736, '123456' -> 123456 (decimal and binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise SpecError(f"cannot read {text!r} as a size; write e.g. 40MB, 38.5MiB or 40000000")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


SCOPES = ("linear", "model")


@dataclass(frozen=True)
class Budget:
    """The memory budget: bits per parameter, or bytes in total, of the compressed linear layers
    (scope "linear") or of every stored tensor of the model (scope "model": linear layers, embedding
    and head, norms and everything else kept; bits per parameter over all its parameters)."""

    bits_per_param: float | None = None
    bytes: int | None = None
    scope: str = "linear"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise SpecError(f"the budget's scope is 'linear' or 'model' (e.g. --scope model), got {self.scope!r}")
        if (self.bits_per_param is None) == (self.bytes is None):
            raise SpecError("give the budget either in bits per parameter (--budget, e.g. 3.0) or in bytes "
                            "(--budget-bytes, e.g. 40MB)")
        v = self.bits_per_param if self.bits_per_param is not None else self.bytes
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise SpecError(f"the budget must be a positive number, e.g. --budget 3.0 or --budget-bytes 40MB; got {v!r}")
        if self.bits_per_param is not None and self.bits_per_param > MAX_BITS_PER_PARAM:
            raise SpecError(f"--budget {v:g} is above {MAX_BITS_PER_PARAM} bits/param, more than the uncompressed "
                            "16-bit weights take; choose a budget between 2 and 8, e.g. --budget 3.0")

    def total_bits(self, params: int) -> int:
        if self.bits_per_param is not None:
            return int(math.floor(self.bits_per_param * params))
        return int(self.bytes) * 8

    def label(self) -> str:
        text = f"{self.bits_per_param:g} bits/param" if self.bits_per_param is not None else f"{self.bytes} bytes"
        return text + (" (whole model)" if self.scope == "model" else "")

    def to_dict(self) -> dict:
        return {"bits_per_param": self.bits_per_param, "bytes": self.bytes, "scope": self.scope}


MAX_BITS_PER_PARAM = 16


@dataclass(frozen=True)
class ModelScope:
    """What a whole-model budget counts besides the linear layers: the tables (the input embedding, and
    an output head not tied to it and not among the linear layers), which are candidates too, and
    everything else stored as it is (norms, biases, linear layers left out)."""

    params: int  # every parameter of the model, tied ones once
    fixed_bits: int  # stored bits of what is neither a compressed linear layer nor a table
    tables: tuple[str, ...]  # module names
    shapes: tuple[tuple[int, int], ...]
    keep_bits: tuple[int, ...]  # stored bits of each table kept as it is
    tied: tuple[tuple[str, str], ...] = ()  # (head, table): heads that compute with a table's rows
    lookup: tuple[bool, ...] = ()  # per table: read by lookup (an embedding)
    head: tuple[bool, ...] = ()  # per table: used as the output head (an untied head, or tied to it)


def model_scope(model: nn.Module, names: Sequence[str], stored: torch.dtype) -> ModelScope:
    """The :class:`ModelScope` of ``model`` (weights may be on the meta device) whose linear layers
    ``names`` are compressed; every other tensor is stored in ``stored``."""
    mods = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tables, lookup, heads, tied = [mods[id(emb)]], [True], [False], []
    if head is not None and getattr(head, "weight", None) is emb.weight:
        heads[0] = True
        tied.append((mods[id(head)], tables[0]))
    elif isinstance(head, nn.Linear) and head.bias is None and mods[id(head)] not in names:
        tables.append(mods[id(head)])
        lookup.append(False)
        heads.append(True)
    shapes = tuple(tuple(model.get_submodule(n).weight.shape) for n in tables)
    bits = torch.empty((), dtype=stored).element_size() * 8
    params = sum(p.numel() for p in model.parameters())
    linear = sum(model.get_submodule(n).weight.numel() for n in names)
    table = sum(r * d for r, d in shapes)
    return ModelScope(params, (params - linear - table) * bits, tuple(tables), shapes,
                      tuple(r * d * bits for r, d in shapes), tuple(tied), tuple(lookup), tuple(heads))


def check_reachable(config: "AllocationConfig", shapes: Mapping[str, tuple[int, int]],
                    scope: ModelScope | None = None) -> None:
    """Refuse, before any statistics or costs, a budget below what the candidate specs alone can reach
    for these matrices (a lower bound: the exact minimum is checked again once the costs are known);
    with a whole-model budget, for the tables and the rest of the model too."""
    need = sum(min_candidate_bits(config.candidates, tuple(sh)) for sh in shapes.values())
    params = sum(int(o) * int(i) for o, i in shapes.values())
    if config.budget.scope == "model" and scope is not None:
        specs = config.tables.specs()
        need += scope.fixed_bits + sum(min([embed.storage_bits(s, sh) for s in specs] + [k])
                                       for sh, k in zip(scope.shapes, scope.keep_bits))
        params = scope.params
    if params and config.budget.total_bits(params) < need:
        what = "the whole model" if config.budget.scope == "model" else f"{len(shapes)} matrices"
        raise BudgetError(f"the budget of {config.budget.label()} is below the smallest size these candidates can "
                          f"reach for {what} ({need / params:.4f} bits/param, {math.ceil(need / 8)} "
                          f"bytes); raise it, e.g. {_raise_hint(need, params, config.budget.scope)}")


def _raise_hint(need: int, params: int, scope: str) -> str:
    """Flags that give a budget of at least ``need`` bits."""
    tail = " --scope model" if scope == "model" else ""
    return (f"--budget {math.ceil(need / params * 100 + 1e-6) / 100:g}{tail} or --budget-bytes "
            f"{math.ceil(need / 8)}{tail}")


@dataclass(frozen=True)
class Constraint:
    """Matrices whose name matches ``pattern`` (re.search) only take candidates with effective bits
    per parameter (everything stored for the matrix / its parameters) in [min_bits, max_bits]."""

    pattern: str
    min_bits: float = 0.0
    max_bits: float = math.inf

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise SpecError(f"bad constraint pattern {self.pattern!r}: {e}") from None
        if not self.min_bits <= self.max_bits:
            raise SpecError(f"constraint on {self.pattern!r}: minimum {self.min_bits} above maximum {self.max_bits}")

    @classmethod
    def parse(cls, text: str, kind: str) -> "Constraint":
        """'REGEX=BITS' as a minimum (kind "min") or maximum (kind "max") constraint."""
        pattern, sep, value = str(text).rpartition("=")
        try:
            bits = float(value)
        except ValueError:
            bits = None
        if not sep or not pattern or bits is None:
            raise SpecError(f"cannot read constraint {text!r}; write REGEX=BITS, e.g. 'down_proj=4'")
        return cls(pattern, min_bits=bits) if kind == "min" else cls(pattern, max_bits=bits)

    def applies(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "min_bits": self.min_bits,
                "max_bits": None if math.isinf(self.max_bits) else self.max_bits}


@dataclass(frozen=True)
class AllocationConfig:
    """Everything that turns a budget into a plan."""

    budget: Budget
    candidates: CandidateSet = field(default_factory=CandidateSet)
    metric: str = "kfac"  # error of the cost table: kfac, hessian or fisher (see lqkit.core.stats)
    constraints: tuple[Constraint, ...] = ()
    refine_iters: int = 0  # > 0: matrices with a low-rank part run LQ alternations from the LoRC start
    workers: int | None = None  # cost-table worker processes (None: by machine and model size)
    cache: bool = True  # read / write the cost table under $LQKIT_CACHE/tables
    tables: RowCandidates = field(default_factory=RowCandidates)  # embedding / head rows (budget scope "model")

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise SpecError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.budget.scope == "model" and self.metric == "hessian":
            raise SpecError("a whole-model budget (--scope model) weighs the embedding's errors on the loss scale, "
                            "as the kfac and fisher metrics do; use --metric kfac (the default) or fisher")
        if self.budget.scope == "model" and self.candidates.target is not None:
            raise SpecError(f"target {self.candidates.target} cannot serve a quantized embedding table; drop --target "
                            "or use --scope linear")
        if not (isinstance(self.refine_iters, int) and self.refine_iters >= 0):
            raise SpecError(f"refine iterations must be a non-negative integer, got {self.refine_iters!r}")

    def needs(self) -> set[str]:
        """Statistics the metric and the candidate quantizers use."""
        need = {"kfac": {"h", "fisher"}, "hessian": {"h"}, "fisher": {"fisher"}}[self.metric]
        return need | self.candidates.needs() | ({"fisher"} if self.budget.scope == "model" else set())


@dataclass(frozen=True)
class CostTable:
    """Per matrix (model order): its shape and Pareto-optimal candidates."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    costs: tuple[MatrixCosts, ...]
    metric: str
    candidates: CandidateSet
    key: str
    seconds: float  # time it took to compute (not to load)

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.shapes)

    def to_json(self) -> dict:
        return {
            "version": TABLE_VERSION, "key": self.key, "metric": self.metric, "seconds": self.seconds,
            "candidates": self.candidates.to_dict(),
            "matrices": [{"name": n, "shape": list(s), **c.to_dict()}
                         for n, s, c in zip(self.names, self.shapes, self.costs)],
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "CostTable":
        if d.get("version") != TABLE_VERSION:
            raise SpecError(f"cost table version {d.get('version')} is not {TABLE_VERSION}; recompute it")
        mats = d["matrices"]
        costs = tuple(MatrixCosts.from_dict(m) for m in mats)
        return cls(tuple(m["name"] for m in mats), tuple(tuple(m["shape"]) for m in mats), costs, d["metric"],
                   CandidateSet.from_dict(d["candidates"]), d["key"], d["seconds"])


@dataclass(frozen=True)
class AllocationResult:
    plan: Plan
    allocation: Allocation
    config: AllocationConfig
    table: CostTable
    table_cached: bool
    ties: tuple[tuple[str, ...], ...] = ()  # layers held to one scheme (a target's fused layers)
    scope: ModelScope | None = None  # a whole-model budget: what it counts besides the linear layers
    table_costs: tuple[TableCosts, ...] = ()  # per scope table
    tables: dict[str, RowSpec] = field(default_factory=dict)  # the tables stored as quantized rows (others kept)

    @property
    def linear_bits(self) -> int:
        """Stored bits of the chosen linear-layer candidates."""
        return int(sum(int(c.bits[k]) for c, k in zip(self.table.costs, self.allocation.choice)))

    def _model_report(self) -> dict:
        """The whole-model side of :meth:`report`: every stored bit, the tables' choices."""
        sc, a = self.scope, self.allocation
        n = len(self.table.costs)
        picks = a.choice[n:]
        tbits = sum(int(c.bits[k]) for c, k in zip(self.table_costs, picks))
        total = self.linear_bits + tbits + sc.fixed_bits
        need = min_bits([c.bits for c in self.table.costs] + [c.bits for c in self.table_costs]) + sc.fixed_bits
        tables = {}
        for name, c, k in zip(sc.tables, self.table_costs, picks):
            spec = c.specs[k]
            tables[name] = {"spec": spec.label() if spec is not None else "kept", "bits": int(c.bits[k]),
                            "predicted_relative_error": float(c.errors[k] / max(c.base, 1e-300))}
        return {"params": sc.params, "budget_bits": a.budget_bits + sc.fixed_bits, "fixed_bits": sc.fixed_bits,
                "achieved_bits": total, "achieved_bits_per_param": total / sc.params, "achieved_bytes": total // 8,
                "minimum_bits_per_param": need / sc.params, "minimum_bytes": math.ceil(need / 8), "tables": tables,
                "tied": {h: t for h, t in sc.tied}}

    def report(self) -> dict:
        """JSON-ready summary, saved in the checkpoint and printed by ``lqkit inspect``. The linear layers'
        figures ("achieved_bits", ...) always count them alone; a whole-model budget adds "model"."""
        a, t = self.allocation, self.table
        idx = {n: i for i, n in enumerate(t.names)}
        predicted = {n: float(t.costs[idx[n]].errors[c] / max(t.costs[idx[n]].base, 1e-300))
                     for n, c in zip(t.names, a.choice)}
        lbits = self.linear_bits
        return {
            "budget": self.config.budget.to_dict(), "budget_bits": a.budget_bits,
            "budget_bits_per_param": a.budget_bits / t.params, "achieved_bits": lbits,
            "achieved_bits_per_param": lbits / t.params, "params": t.params,
            **({"model": self._model_report()} if self.scope is not None else {}),
            "minimum_bits_per_param": min_bits([c.bits for c in t.costs]) / t.params,
            "objective": a.objective, "solver_status": a.status, "optimal": a.optimal,
            "solver_seconds": round(a.seconds, 3), "variables": a.variables,
            "metric": t.metric, "candidates": t.candidates.to_dict(),
            "constraints": [c.to_dict() for c in self.config.constraints], "refine_iters": self.config.refine_iters,
            "table_key": t.key, "table_seconds": round(t.seconds, 1), "table_cached": self.table_cached,
            "evaluated": int(sum(c.evaluated for c in t.costs)),
            "predicted_relative_error": predicted,
            **({"target": t.candidates.target, "ties": [list(g) for g in self.ties]} if t.candidates.target else {}),
        }


# ----------------------------------------------------------------------------------------------
# fingerprints and cache


def _sample(t: torch.Tensor, n: int = 4096) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step].float().cpu().numpy().tobytes()


def weights_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """sha256 of the selected matrices' names, shapes and a strided sample of their values."""
    h = hashlib.sha256()
    for n in names:
        w = model.get_submodule(n).weight
        h.update(f"{n}{tuple(w.shape)}".encode())
        h.update(_sample(w))
    return h.hexdigest()


def stats_fingerprint(stats, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    meta = {k: v for k, v in getattr(stats, "meta", {}).items() if not k.startswith(("seconds", "peak"))}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for n in names:
        ms = stats.get(n) if stats is not None else None
        for t in (getattr(ms, "h", None), getattr(ms, "fisher", None)):
            h.update(b"-" if t is None else _sample(t))
    return h.hexdigest()


def table_key(weights_fp: str, stats_fp: str, cands: CandidateSet, metric: str) -> str:
    blob = json.dumps({"v": TABLE_VERSION, "w": weights_fp, "s": stats_fp, "c": cands.to_dict(), "m": metric},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def table_path(key: str) -> Path:
    return cache_dir() / "tables" / f"{key}.json"


def _write_json(path: Path, data: dict) -> None:
    from .checkpoint import write_atomic

    write_atomic(path, json.dumps(data).encode())


# ----------------------------------------------------------------------------------------------
# the table


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _one(name: str, w: torch.Tensor, stats: MatrixStats | None, cands: CandidateSet, metric: str
         ) -> tuple[str, MatrixCosts]:
    return name, matrix_costs(w, stats, cands, metric, rotation=for_matrix(name, w.shape[1]))


class _PoolFailed(Exception):
    pass


def _in_workers(jobs, args, workers: int, results: dict, bar) -> None:
    """Fill ``results`` from spawned worker processes, each with its share of the threads."""
    import concurrent.futures as cf
    from concurrent.futures.process import BrokenProcessPool

    import torch.multiprocessing as tmp

    threads = max(1, torch.get_num_threads() // workers)
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=tmp.get_context("spawn"), initializer=_worker_init,
                                    initargs=(threads,)) as pool:
            futures = [pool.submit(_one, *args(n)) for n in jobs]
            for f in cf.as_completed(futures):
                n, c = f.result()
                results[n] = c
                bar.update()
    except BrokenProcessPool as e:
        raise _PoolFailed(str(e) or "a worker process died") from None


def default_workers(params: int, device: str | None) -> int:
    """Worker processes for a table: 1 on a GPU or for small models, else up to 4 CPU cores."""
    if (device and str(device).startswith("cuda")) or params < 20_000_000:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def cost_table(model: nn.Module, stats, names: Sequence[str], cands: CandidateSet, metric: str, *,
               device: str | None = None, workers: int | None = None, cache: bool = True,
               progress: bool = True) -> tuple[CostTable, bool]:
    """(the cost table of the named matrices, whether it came from the cache)."""
    names = list(names)
    key = table_key(weights_fingerprint(model, names), stats_fingerprint(stats, names), cands, metric)
    path = table_path(key)
    if cache and path.is_file():
        try:
            table = CostTable.from_json(json.loads(path.read_text()))
            if list(table.names) == names:
                log.info("cost table %s from the cache (%s)", key, path)
                return table, True
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring an unreadable cached cost table %s: %s", path, e)
    t0 = time.time()
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    params = sum(o * i for o, i in shapes.values())
    workers = workers or default_workers(params, device)
    jobs = sorted(names, key=lambda n: -shapes[n][0] * shapes[n][1] * shapes[n][1])  # largest first
    results: dict[str, MatrixCosts] = {}
    bar = tqdm(total=len(names), desc="cost table", unit="matrix", disable=not progress)

    def args(n: str):
        w = model.get_submodule(n).weight.detach()
        ms = stats.get(n) if stats is not None else None
        if device:
            w, ms = w.to(device), (ms.to(device) if ms is not None else None)
        return n, w, ms, cands, metric

    if workers > 1:
        try:
            _in_workers(jobs, args, workers, results, bar)
        except _PoolFailed as e:  # e.g. a script without `if __name__ == "__main__":` under spawn
            log.warning("cost-table workers failed (%s); computing in this process. Scripts that call lqkit "
                        "should guard their entry point with `if __name__ == \"__main__\":`", e)
            workers = 1
    for n in jobs:
        if n not in results:
            results[n] = _one(*args(n))[1]
            bar.update()
    bar.close()
    seconds = time.time() - t0
    table = CostTable(tuple(names), tuple(shapes[n] for n in names), tuple(results[n] for n in names), metric,
                      cands, key, seconds)
    log.info("cost table of %d matrices in %.0f s (%d workers)", len(names), seconds, workers)
    if cache:
        _write_json(path, table.to_json())
    return table, False


# ----------------------------------------------------------------------------------------------
# the solve and the plan


def _allowed(table: CostTable, constraints: Iterable[Constraint]) -> list[np.ndarray]:
    """Per matrix, the indices of the candidates every applicable constraint allows."""
    constraints = list(constraints)
    out = []
    for name, shape, c in zip(table.names, table.shapes, table.costs):
        bpp = c.bits / (shape[0] * shape[1])
        ok = np.ones(len(c.bits), dtype=bool)
        for k in constraints:
            if k.applies(name):
                ok &= (bpp >= k.min_bits - 1e-12) & (bpp <= k.max_bits + 1e-12)
        if not ok.any():
            lo, hi = float(bpp.min()), float(bpp.max())
            raise SpecError(f"no candidate of {name} satisfies the constraints (its candidates range over "
                            f"{lo:.3f}-{hi:.3f} bits/param); loosen --min-bits/--max-bits so that some value in that "
                            "range is allowed for it, or widen the candidates (e.g. --cand-bits 2,3,4,6,8)")
        out.append(np.flatnonzero(ok))
    return out


@contextmanager
def _quiet_stdout():
    """Silence what native code writes to file descriptor 1 (HiGHS prints MIP debugging lines such as
    'HighsMipSolverData::transformNewIntegerFeasibleSolution' straight to stdout)."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. captured): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def refined(spec: MatrixSpec, iters: int) -> MatrixSpec:
    """A LoRC spec as LQ alternations started from the LoRC result (never worse than it)."""
    if iters <= 0 or spec.method != "lorc":
        return spec
    return replace(spec, method="lq", iters=iters + 1, init="quant")


def input_groups(aliases: Mapping[str, str], names: Sequence[str]) -> list[tuple[str, ...]]:
    """The groups (model order, two or more) of ``names`` that read one input, from calibration's
    {layer: the first layer that read the same input tensor}."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(aliases.get(n, n), []).append(n)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def groups_by_identity(stats: Mapping[str, MatrixStats]) -> list[tuple[str, ...]]:
    """:func:`input_groups` of one block's statistics, where layers reading one input share their H."""
    first: dict[int, str] = {}
    return input_groups({n: first.setdefault(id(ms.h), n) for n, ms in stats.items() if ms.h is not None}, list(stats))


def _labels(table: CostTable, allowed: list[np.ndarray]) -> list[np.ndarray]:
    """Per matrix, the integer scheme of each allowed candidate as an integer label."""
    from .core.serving import scheme

    ids: dict = {}
    return [np.array([ids.setdefault(scheme(c.specs[i].quant, shape[1]), len(ids)) for i in a], dtype=np.int64)
            for shape, c, a in zip(table.shapes, table.costs, allowed)]


def _ties(table: CostTable, ties: Sequence[Sequence[str]]) -> list[tuple[int, ...]]:
    from .core.serving import get_target

    target = table.candidates.target
    if target is None or not get_target(target).ties:
        return []
    idx = {n: i for i, n in enumerate(table.names)}
    out = []
    for g in ties:
        members = tuple(idx[n] for n in g if n in idx)
        if len(members) < len(g):
            log.warning("layers %s read one input but only %d are compressed; the others stay dense "
                        "(a runtime fusing them needs one scheme: include or exclude them together)", g, len(members))
        if len(members) > 1:
            out.append(members)
    return out


def allocate(table: CostTable, config: AllocationConfig, table_cached: bool = False,
             ties: Sequence[Sequence[str]] = (), scope: ModelScope | None = None,
             table_costs: Sequence[TableCosts] = ()) -> AllocationResult:
    """Solve the budget over ``table`` under ``config``'s constraints; the plan keeps table order.
    ``ties``: groups of layers that read one input; with a target that fuses them (the table's
    candidate set says), each group takes one integer scheme. A whole-model budget (scope "model")
    needs ``scope`` and the cost rows of its tables (``table_costs``, in ``scope.tables`` order): they
    enter the same program, and what stays as it is (``scope.fixed_bits``) is taken off the budget."""
    whole = config.budget.scope == "model"
    if whole and (scope is None or len(table_costs) != len(scope.tables)):
        raise SpecError("a whole-model budget needs the model's scope and the cost rows of its tables")
    allowed = _allowed(table, config.constraints)
    bits = [c.bits[a] for c, a in zip(table.costs, allowed)]
    errs = [c.errors[a] for c, a in zip(table.costs, allowed)]
    tied = _ties(table, ties)
    labels = _labels(table, allowed) if tied else None
    params, fixed = (scope.params, scope.fixed_bits) if whole else (table.params, 0)
    if whole:  # the tables: one more row each, no constraint, no tie
        bits += [c.bits for c in table_costs]
        errs += [c.errors for c in table_costs]
        allowed += [np.arange(len(c.bits)) for c in table_costs]
        labels = labels + [np.full(len(c.bits), -1 - i) for i, c in enumerate(table_costs)] if labels else None
    budget_bits = config.budget.total_bits(params) - fixed
    need = min_bits(bits, labels, tied)
    if budget_bits < need:
        what = "bits for every stored tensor of" if whole else "bits for"
        raise BudgetError(f"the budget of {config.budget.label()} ({budget_bits + fixed} {what} {params} parameters) "
                          f"is below the smallest achievable {(need + fixed) / params:.4f} bits/param "
                          f"({math.ceil((need + fixed) / 8)} bytes) with these candidates and constraints; raise the "
                          f"budget, e.g. {_raise_hint(need + fixed, params, config.budget.scope)}")
    with _quiet_stdout():
        sol = solve(bits, errs, budget_bits, labels=labels, ties=tied)
    choice = tuple(int(a[c]) for a, c in zip(allowed, sol.choice))
    sol = replace(sol, choice=choice)
    n = len(table.costs)
    plan = {nm: refined(c.specs[k], config.refine_iters) for nm, c, k in zip(table.names, table.costs, choice[:n])}
    tables = {}
    if whole:
        tables = {nm: c.specs[k] for nm, c, k in zip(scope.tables, table_costs, choice[n:]) if c.specs[k] is not None}
    log.info("allocation: %s -> %.4f bits/param (%s, %d candidates, %d ties, %.2f s)", config.budget.label(),
             (sol.bits + fixed) / params, sol.status, sol.variables, len(tied), sol.seconds)
    names = tuple(tuple(table.names[m] for m in t) for t in tied)
    return AllocationResult(plan, sol, config, table, table_cached, names, scope if whole else None,
                            tuple(table_costs) if whole else (), tables)
