"""Static SASS of the fragment kernel for one layer shape and launch, compiled for a GPU on any machine.

No GPU needed: triton compiles the launch ``_frag.launch`` would make (its arguments captured, not run)
for ``--arch`` (default sm_90, H100/H200) and ``cuobjdump`` (bundled with triton) prints the SASS. The
script reports the instruction count and, for each loop (a backward branch), its body's length: with
the loop's trip count that is the instructions one warp issues in series, a floor under a one-token
call's latency when few warps share an SM. The kernel holds every path its runtime arguments may take,
so some loops listed (the R·x prologue's, the tail blocks') are not run by a given launch; the main
loop is the one whose body decodes U blocks. A development tool: counts, not timings.

    python bench/kernel_sass.py --out 4096 --in 1024 --bits 4 bn=16,warps=1,occ=2,pf=8,xs=1
    python bench/kernel_sass.py --out 4096 --in 1024 --bits 4 bn=64,warps=4,pf=4,xs=1,kwarps=1 --json F
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lqkit import kernels  # noqa: E402
from lqkit.core import QuantSpec  # noqa: E402
from lqkit.core import quant as qmod  # noqa: E402
from lqkit.kernels import _frag  # noqa: E402
from lqkit.kernels import _triton as kt  # noqa: E402


def captured_launch(n: int, k: int, bits: int, group: int, cfg: kt.Config, sms: int):
    """(kernel, grid, args, warps) of a one-token bf16 call, captured instead of launched."""
    spec = QuantSpec(method="rtn", bits=bits, group_size=group, group_dim="in")
    q = qmod.quantize(torch.randn(n, k), spec)
    kw = kernels.prepare(q.packed, q.aux, spec, (n, k), "cpu", layout="frag")
    x, y, rec = torch.randn(1, k).to(torch.bfloat16), torch.empty(1, n, dtype=torch.bfloat16), []
    launch, count = kt._launch, kt._sms
    kt._launch = lambda fn, plan, grid, args, warps, *_, **__: rec.append((fn, grid, args, warps))
    kt._sms = lambda device: sms
    try:
        _frag.launch(x, y, kw, None, None, None, False, cfg)
    finally:
        kt._launch, kt._sms = launch, count
    return rec[0]


def compile_sass(fn, args, warps: int, arch: int) -> str:
    """SASS of ``fn`` compiled as triton's launcher would for these arguments (the same binder: types,
    constexprs, 16-byte alignment and divisibility by 16 of its pointers and integers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {"num_warps": warps, "num_stages": 1}
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, sig, const, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                       options=options.__dict__)
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        Path(p).write_bytes(k.asm["cubin"])
        return subprocess.run([str(tool), "-sass", p], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> tuple[int, list[dict]]:
    """(instructions, [{start, end, body, ops}] for every backward branch; ops: the body's opcodes,
    modifiers dropped, most frequent first)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    out = []
    for addr, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                          for a, t in ins if start <= a <= addr)
            out.append({"start": hex(start), "end": hex(addr), "body": (addr - start) // 16 + 1,
                        "ops": dict(ops.most_common())})
    return len(ins), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, required=True)
    ap.add_argument("--in", dest="k", type=int, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sms", type=int, default=132, help="SMs the launch plans for (split-K from occ)")
    ap.add_argument("--json", default=None, help="append a JSON line here")
    ap.add_argument("config", help="Config fields of the fragment launch, e.g. bn=16,warps=1,pf=8,xs=1")
    a = ap.parse_args()
    types = {f.name: f.type for f in dataclasses.fields(kt.Config)}
    fields = {key: (float(v) if types[key] in ("float", float) else int(v))
              for key, v in (kv.split("=") for kv in a.config.split(","))}
    cfg = kt.Config(kind="frag", **fields)
    fn, grid, args, warps = captured_launch(a.out, a.k, a.bits, a.group, cfg, a.sms)
    total, found = loops(compile_sass(fn, args, warps, a.arch))
    row = {"out": a.out, "in": a.k, "bits": a.bits, "group": a.group, "arch": f"sm_{a.arch}",
           "config": dataclasses.asdict(cfg), "grid": grid[0], "warps": warps, "instructions": total, "loops": found}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
