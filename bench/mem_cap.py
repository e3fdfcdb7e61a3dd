"""What holds the GPU memory of an ``lqkit`` run: the CLI run under a memory cap, with the allocator's
record of where each live tensor was allocated.

    python bench/mem_cap.py --cap-gib 38 --out /tmp/mem.json -- compress --model FOLDER --out CK --budget 3.0

The process may allocate at most ``--cap-gib`` on the GPU (``torch.cuda.set_per_process_memory_fraction``),
and sees a GPU of that size (``torch.cuda.mem_get_info`` reports the cap less what the process has
reserved, so that code sizing its work by free memory does so as on a smaller GPU).
If the run needs more, the out-of-memory moment is caught and the tensors alive then are written,
grouped by the lqkit frames that allocated them (largest first), with the allocation that failed; the
run then fails as it would on a smaller GPU. If it fits, the peak is written. Either way the JSON has
machine info and the run's exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import by_site, machine_info, write_json  # noqa: E402


def live_tensors(top: int = 15) -> dict:
    """The allocator's active blocks now, grouped by where they were allocated (needs the history on)."""
    blocks = [(b["size"], b.get("frames", [])) for seg in torch.cuda.memory._snapshot()["segments"]
              for b in seg["blocks"] if b["state"] == "active_allocated"]
    return {"allocated_mib": round(sum(size for size, _ in blocks) / 2**20), "by_site": by_site(blocks, top)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gib", type=float, required=True, help="GPU memory the run may allocate (GiB)")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("cli", nargs="+", help="the lqkit arguments, after --")
    a = ap.parse_args()
    from lqkit import cli

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as lqkit compress; before CUDA starts
    out = Path(a.out)
    result: dict = {"machine": machine_info(), "cap_gib": a.cap_gib, "argv": a.cli}
    total = torch.cuda.get_device_properties(0).total_memory
    cap = int(a.cap_gib * 2**30)
    torch.cuda.mem_get_info = lambda device=None: (max(0, cap - torch.cuda.memory_reserved(device)), cap)
    torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total))
    torch.cuda.memory._record_memory_history(max_entries=1, stacks="python")  # block origins, no long trace
    t0 = time.time()

    def on_oom(device, alloc, device_alloc, device_free) -> None:
        if "oom" in result:
            return
        result["oom"] = {"after_s": round(time.time() - t0, 1), "asked_mib": round(alloc / 2**20),
                         **live_tensors()}
        write_json(out, result)
        print(json.dumps(result["oom"], indent=1), flush=True)

    torch._C._cuda_attach_out_of_memory_observer(on_oom)
    rc = 1
    try:
        rc = cli.main(a.cli)
    finally:
        result.update(rc=rc, seconds=round(time.time() - t0, 1),
                      peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                      peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20))
        write_json(out, result)
    sys.exit(rc)


if __name__ == "__main__":
    main()
