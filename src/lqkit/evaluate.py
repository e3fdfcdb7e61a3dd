"""Perplexity with a fixed, documented protocol.

Protocol (shared with ../shared/ANCHORS.md so numbers sit beside existing tools'):
1. Tokenize the whole text once, without special tokens: N tokens.
2. Windows of ``window_tokens − 1`` text tokens (511 by default). Default: ``windows`` (40) windows,
   window i starting at floor(i·(N − 511) / windows). With ``full=True``: every complete,
   non-overlapping 511-token chunk from the start of the text.
3. Prepend BOS to each window (512 tokens). Without a BOS token the tokenizer's EOS is used.
4. Perplexity = exp(mean negative log-likelihood of the 511 predicted text tokens over all windows),
   computed in the model's dtype (fp32 by default).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .core.loss import nll_inplace
from .errors import DataError, SpecError
from .nn.linear import materialized

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalProtocol:
    windows: int = 40  # number of evenly spaced windows (ignored when full)
    window_tokens: int = 512  # tokens per window including the prepended BOS
    full: bool = False  # every non-overlapping window instead of the fixed subset
    batch_size: int = 2  # windows per forward pass (does not change the result beyond fp noise)

    def __post_init__(self) -> None:
        if self.windows < 1:
            raise SpecError(f"windows must be at least 1, got {self.windows}")
        if self.window_tokens < 2:
            raise SpecError(f"window tokens must be at least 2, got {self.window_tokens}")
        if self.batch_size < 1:
            raise SpecError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    window_tokens: int
    tokens_scored: int
    text_tokens: int
    text_sha256: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_starts(n_tokens: int, protocol: EvalProtocol) -> list[int]:
    span = protocol.window_tokens - 1
    if n_tokens < span:
        raise DataError(f"the evaluation text has {n_tokens} tokens; at least {span} are needed for one "
                        f"window of {protocol.window_tokens} (with BOS): pass a longer --text or --window-tokens "
                        f"{n_tokens + 1} or less")
    if protocol.full:
        return list(range(0, n_tokens - span + 1, span))
    k = protocol.windows
    return [i * (n_tokens - span) // k for i in range(k)]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise DataError("the tokenizer has neither a BOS nor an EOS token to start evaluation windows with")


def perplexity(model, tokenizer, text: str, protocol: EvalProtocol = EvalProtocol(),
               progress: bool = True, ids: torch.Tensor | None = None, materialize: bool = False) -> EvalResult:
    """Perplexity of ``model`` on ``text`` under ``protocol`` (see module docstring).

    ``materialize``: dequantize compressed layers once for the whole evaluation instead of on every
    forward pass (same result, faster, but holds the dense weights in memory meanwhile)."""
    with materialized(model, next(model.parameters()).dtype) if materialize else nullcontext():
        return _perplexity(model, tokenizer, text, protocol, progress, ids)


HEAD_CHUNK = 512  # tokens per chunk of the fp32 output layer (one reused (chunk, vocab) buffer)


@contextmanager
def _head_inputs(head: torch.nn.Module, store: list):
    """Within: ``head`` stores its input in ``store`` and returns zeros of width 1 instead of logits."""
    head.forward = lambda h: store.append(h) or h.new_zeros(*h.shape[:-1], 1)
    try:
        yield
    finally:
        del head.forward


class _ChunkedHead:
    """Sum of next-token NLLs with the output layer applied in chunks of tokens into one reused
    buffer, its log-softmax computed in place. On a CPU a (batch, 512, vocab) fp32 logits tensor
    (2 GiB at a 262k vocabulary) and the copies cross-entropy makes of it are fresh memory on every
    batch, and faulting those pages in took as long as the whole model body (:mod:`.core.loss` says why
    the log-softmax avoids subnormal floats). Used only when the
    output layer is a plain fp32 ``nn.Linear`` and a probe through the model's own forward gives the
    same log-likelihoods (a model that transforms its logits, e.g. soft-capping, keeps the plain path)."""

    def __init__(self, model, probe: torch.Tensor):
        self.model, self.head, self.buf = model, model.get_output_embeddings(), None
        self.ok = type(self.head) is torch.nn.Linear and self.head.weight.dtype == torch.float32
        if self.ok:
            ref = _plain_nll(model, probe, reduction="none")
            self.ok = torch.allclose(self.nll(probe, reduction="none"), ref, rtol=1e-4, atol=1e-4)
            if not self.ok:
                log.debug("the output layer's logits are transformed by the model: plain evaluation path")

    def nll(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        store: list = []
        with _head_inputs(self.head, store):
            self.model(input_ids=x)
        h = store[0][:, :-1].reshape(-1, store[0].shape[-1])
        y = x[:, 1:].reshape(-1)
        w, b = self.head.weight, self.head.bias
        rows = min(HEAD_CHUNK, h.shape[0])
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = torch.empty(rows, w.shape[0], dtype=torch.float32, device=w.device)
        out = []
        for i in range(0, h.shape[0], rows):
            z = self.buf[:min(rows, h.shape[0] - i)]
            torch.matmul(h[i:i + rows], w.t(), out=z)
            if b is not None:
                z += b
            out.append(nll_inplace(z, y[i:i + rows]))
        nll = torch.cat(out)
        return nll.sum() if reduction == "sum" else nll


def _plain_nll(model, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def _perplexity(model, tokenizer, text, protocol, progress, ids) -> EvalResult:
    t0 = time.time()
    ids = tokenize(tokenizer, text) if ids is None else ids
    starts = window_starts(ids.numel(), protocol)
    span = protocol.window_tokens - 1
    device = next(model.parameters()).device
    bos = torch.full((1,), bos_id(tokenizer), dtype=torch.long)
    total, count = 0.0, 0
    batches = [starts[i:i + protocol.batch_size] for i in range(0, len(starts), protocol.batch_size)]
    head = _ChunkedHead(model, torch.cat([bos, ids[starts[0]:starts[0] + min(span, 15)]])[None].to(device))
    bar = tqdm(total=len(starts), desc="perplexity", unit="win", disable=not progress, leave=False)
    for batch in batches:
        x = torch.stack([torch.cat([bos, ids[s:s + span]]) for s in batch]).to(device)  # (B, T)
        nll = head.nll(x) if head.ok else _plain_nll(model, x)
        if not torch.isfinite(nll):
            log.warning("non-finite loss in an evaluation window: the model produces NaN/inf logits")
        total += float(nll)
        count += x[:, 1:].numel()
        bar.update(len(batch))
    bar.close()
    mean = total / count
    return EvalResult(
        perplexity=math.exp(mean) if mean < 700 else float("inf"),
        nll=mean, windows=len(starts), window_tokens=protocol.window_tokens, tokens_scored=count,
        text_tokens=int(ids.numel()), text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        seconds=time.time() - t0)
