"""Training text for fine-tuning: plain text or JSONL, tokenized and packed into fixed-length sequences.

Formats (chosen by ``fmt``; "auto" picks JSONL for a ``.jsonl``/``.json`` suffix, plain text otherwise):
- plain text: the whole UTF-8 file is one document; every token is a training target.
- JSONL: one JSON object per line, either ``{"text": ...}`` or ``{"prompt": ..., "response": ...}``
  (``"completion"`` is accepted for ``"response"``). Prompt tokens get label -100 (no loss). Each
  example ends with EOS. Blank lines are ignored; other bad lines are reported by line number and
  either stop the run (``on_bad_line="error"``) or are skipped with a warning (``"skip"``).

Packing: the documents' tokens form one stream that is cut into chunks of ``seq_len − 1`` tokens;
each chunk gets BOS prepended (as in the evaluation protocol), so every sequence has ``seq_len``
tokens. A last partial chunk is dropped. The held-out split is the *last* sequences of the stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, SpecError
from .evaluate import bos_id

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss
FORMATS = ("auto", "text", "jsonl")
BAD_LINE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Example:
    prompt: str  # no loss on these tokens ("" for plain text)
    target: str  # loss on these tokens


@dataclass(frozen=True)
class PackedData:
    """Packed training and held-out sequences (rows of ``seq_len`` tokens)."""

    input_ids: torch.Tensor  # (N, T) long, training sequences
    labels: torch.Tensor  # (N, T) long, IGNORE where no loss
    eval_input_ids: torch.Tensor  # (M, T) long, held-out sequences (M may be 0)
    eval_labels: torch.Tensor  # (M, T)
    examples: int  # documents / JSONL examples read
    skipped_lines: tuple[int, ...]  # 1-based line numbers of skipped bad JSONL lines
    sha256: str  # of the data file's bytes (a resumed run checks it)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; pass an existing text or JSONL file, e.g. "
                        "--data train.txt or --data data.jsonl")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data file {str(path)!r} is empty; pass a file with training text in it")
    return raw


def _parse_line(line: str) -> Example:
    """One JSONL line as an Example; ValueError with a short reason when it is not usable."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError('"text" must be a non-empty string')
        return Example("", obj["text"])
    response = obj.get("response", obj.get("completion"))
    if "prompt" in obj and response is not None:
        if not isinstance(obj["prompt"], str) or not isinstance(response, str) or not response:
            raise ValueError('"prompt" and "response" must be strings (response non-empty)')
        return Example(obj["prompt"], response)
    raise ValueError('needs a "text" field or "prompt" and "response" fields')


def read_examples(path: str | Path, fmt: str = "auto", on_bad_line: str = "error") -> tuple[list[Example], tuple[int, ...], str]:
    """(examples, skipped line numbers, sha256) of a data file. Raises DataError on unusable input."""
    if fmt not in FORMATS:
        raise SpecError(f"data format must be one of {FORMATS}, got {fmt!r}")
    if on_bad_line not in BAD_LINE_POLICIES:
        raise SpecError(f"on_bad_line must be one of {BAD_LINE_POLICIES}, got {on_bad_line!r}")
    path = Path(path).expanduser()
    raw = _read_file(path)
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(path)!r} is not valid UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"
    if fmt == "text":
        return [Example("", text)], (), digest
    examples, skipped = [], []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(_parse_line(line))
        except ValueError as e:
            if on_bad_line == "error":
                raise DataError(f"{path.name} line {no}: {e}; fix the line or pass --on-bad-line skip") from None
            skipped.append(no)
    if skipped:
        shown = ", ".join(str(n) for n in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        log.warning("skipped %d bad line(s) of %s: line %s", len(skipped), path.name, shown)
    if not examples:
        raise DataError(f"data file {str(path)!r} has no usable JSONL example (each line needs \"text\" "
                        "or \"prompt\"/\"response\")")
    return examples, tuple(skipped), digest


def _stream(tokenizer, examples: list[Example]) -> tuple[list[int], list[int]]:
    """Token ids and labels of all examples, concatenated; JSONL-style examples end with EOS."""
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        t = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        if len(examples) > 1 or ex.prompt:
            t = t + ([eos] if eos is not None else [])
        ids += p + t
        labels += [IGNORE] * len(p) + t
    return ids, labels


def pack(tokenizer, examples: list[Example], seq_len: int, eval_fraction: float = 0.05,
         max_eval_sequences: int = 32, *, skipped: tuple[int, ...] = (), sha256: str = "",
         label: str = "the data") -> PackedData:
    """Tokenize and pack ``examples`` into sequences of ``seq_len`` tokens (BOS + seq_len − 1 text tokens);
    hold out the last ``eval_fraction`` of them (at most ``max_eval_sequences``, at least one when
    there are two or more sequences and the fraction is positive)."""
    if seq_len < 2:
        raise SpecError(f"sequence length must be at least 2, got {seq_len}")
    if not 0 <= eval_fraction < 1:
        raise SpecError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    ids, labels = _stream(tokenizer, examples)
    span = seq_len - 1
    n = len(ids) // span
    if n == 0:
        raise DataError(f"{label} has {len(ids)} tokens, fewer than one sequence of {seq_len} needs ({span} + BOS); "
                        f"add text or pass --seq-len {max(2, len(ids) + 1)} or less")
    bos = bos_id(tokenizer)
    body = torch.tensor(ids[:n * span], dtype=torch.long).view(n, span)  # (N, T-1)
    lab = torch.tensor(labels[:n * span], dtype=torch.long).view(n, span)
    x = torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)  # (N, T)
    y = torch.cat([torch.full((n, 1), IGNORE, dtype=torch.long), lab], dim=1)
    k = 0
    if eval_fraction > 0 and n >= 2:
        k = min(max(1, round(eval_fraction * n)), max_eval_sequences, n - 1)
    if (y[: n - k, 1:] != IGNORE).sum() == 0:
        raise DataError(f"{label} has no response tokens to train on (every token is a masked prompt)")
    return PackedData(x[: n - k], y[: n - k], x[n - k:], y[n - k:], len(examples), skipped, sha256)


def load_packed(path: str | Path, tokenizer, seq_len: int, *, fmt: str = "auto", on_bad_line: str = "error",
                eval_fraction: float = 0.05, max_eval_sequences: int = 32) -> PackedData:
    """Read, tokenize and pack a data file (see module docstring)."""
    examples, skipped, digest = read_examples(path, fmt, on_bad_line)
    return pack(tokenizer, examples, seq_len, eval_fraction, max_eval_sequences, skipped=skipped, sha256=digest,
                label=f"data file {str(path)!r}")
