"""The reliability cases of issue 28, run as a user would: each one a `lqkit` command line on a tiny
random llama folder or a checkpoint of it, damaged or misused on purpose. For each case: exit code,
the number of lines on stderr, its last line, and whether what must hold held (nothing deleted, no
code run, nothing left behind, ...). Writes bench/results/reliability.json and prints the table
(docs/reliability.md holds it with the "before" column from the issue).

    python bench/reliability.py [--only REGEX]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from common import machine_info, write_json  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}


def lqkit(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
          stdin: str | None = None, shell: str | None = None) -> dict:
    """Run `python -m lqkit ARGS -q` (after the shell commands ``shell``, if given) and sum it up."""
    t = time.time()
    cmd = [sys.executable, "-m", "lqkit", *args, "-q"]
    if shell is not None:
        cmd = ["bash", "-c", f"{shell}; exec {shlex.join(cmd)}"]
    p = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True,
                       text=True, timeout=timeout, input=stdin if stdin is not None else "")
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return {"rc": p.returncode, "stderr_lines": len(err), "message": err[-1] if err else "",
            "seconds": round(time.time() - t, 1), "stdout": p.stdout}


def build(work: Path) -> tuple[Path, Path]:
    """A tiny llama folder (random weights, the bundled-text tokenizer) and an rtn-4 checkpoint of it."""
    from synth import build as synth_build

    model = work / "tiny"
    if not (model / "config.json").exists():
        synth_build("tiny", None, model, device="cpu", dtype=torch.float32, vocab=512)
    ck = work / "ck"
    if not (ck / "lqkit.json").exists():
        r = lqkit("compress", "--model", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32",
                  "--out", str(ck))
        assert r["rc"] == 0, r
    lr = work / "ck-lr"
    if not (lr / "lqkit.json").exists():
        r = lqkit("compress", "--model", str(model), "--method", "lorc", "--bits", "4", "--group-size", "32",
                  "--rank", "4", "--out", str(lr))
        assert r["rc"] == 0, r
    return model, ck


def sha_tree(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def edit_meta(ck: Path, edit, digest: bool = True) -> None:
    from lqkit import checkpoint

    meta = json.loads((ck / "lqkit.json").read_text())
    edit(meta)
    if digest:
        meta["meta_sha256"] = checkpoint._meta_digest(meta)
    (ck / "lqkit.json").write_text(json.dumps(meta))


def edit_tensors(ck: Path, edit) -> None:
    """Rewrite the tensor file with ``edit`` applied and every checksum brought up to date."""
    from safetensors.torch import load_file, save_file

    f = ck / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    edit_meta(ck, lambda m: m["files"]["model.safetensors"].update(sha256=digest, bytes=f.stat().st_size))


def first(state: dict, suffix: str) -> str:
    return next(k for k in sorted(state) if k.endswith(suffix))


def cases(work: Path, model: Path, ck: Path):
    """(id, what was done, function returning the row) in the issue's order."""

    def copy_ck(name: str) -> Path:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(ck, d)
        return d

    def text() -> Path:
        f = work / "train.txt"
        f.write_text(("The tower is tall and the river is wide. " * 40 + "\n") * 50)
        return f

    def ft_over_source():
        d = work / "ft-src"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(work / "ck-lr", d)
        before = sha_tree(d)
        r = lqkit("finetune", str(d), "--data", str(text()), "--out", str(d), "--overwrite", "--steps", "1")
        return r, {"checkpoint intact": sha_tree(d) == before}

    def ft_over_parent():
        parent = work / "ft-parent"
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        d = parent / "ck"
        shutil.copytree(work / "ck-lr", d)
        (parent / "notes.txt").write_text("mine")
        before = sha_tree(parent)
        r = lqkit("finetune", str(d), "--data", str(text()), "--out", str(parent), "--overwrite", "--steps", "1")
        return r, {"folder intact": sha_tree(parent) == before}

    def remote_code(verb: str):
        def run():
            d = work / f"evil-{verb}"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(model, d)
            marker = work / f"ran-{verb}"
            marker.unlink(missing_ok=True)
            (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                       "from transformers import LlamaConfig as EvilConfig\n"
                                       "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(model_type="evil-arch", auto_map={"AutoConfig": "evil.EvilConfig",
                                                          "AutoModelForCausalLM": "evil.EvilForCausalLM"})
            (d / "config.json").write_text(json.dumps(cfg))
            args = ["eval", str(d), "--windows", "1"] if verb == "eval" else \
                ["compress", "--model", str(d), "--method", "rtn", "--bits", "4", "--out", str(work / "evil-out")]
            r = lqkit(*args, stdin="y\n")  # even a "y" on stdin runs nothing
            return r, {"no code ran": not marker.exists()}
        return run

    def damaged(edit, name: str):
        def run():
            d = copy_ck(name)
            edit(d)
            r = lqkit("eval", str(d), "--windows", "1")
            return r, {}
        return run

    def flip_with_empty_files(d: Path):
        f = d / "model.safetensors"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 1
        f.write_bytes(bytes(b))
        edit_meta(d, lambda m: m.update(files={}))

    def outside_name(d: Path):
        other = work / "other.safetensors"
        shutil.copy(d / "model.safetensors", other)
        info = json.loads((d / "lqkit.json").read_text())["files"]["model.safetensors"]
        edit_meta(d, lambda m: m["files"].update({"../other.safetensors": info}))

    def int16_scales(d: Path):
        edit_tensors(d, lambda s: s.update({first(s, "q_scale"): s[first(s, "q_scale")].view(torch.int16)}))

    def config_edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        cfg["rms_norm_eps"] = 0.5
        (d / "config.json").write_text(json.dumps(cfg))

    def two_runs():
        out = work / "two"
        shutil.rmtree(out, ignore_errors=True)
        args = ["compress", "--model", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32",
                "--calib-samples", "64", "--calib-seqlen", "128", "--out", str(out), "-q"]
        a = subprocess.Popen([sys.executable, "-m", "lqkit", *args], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        r = lqkit(*args)
        a_out, a_err = a.communicate(timeout=300)
        return r, {"first run rc": a.returncode, "one run succeeded": (a.returncode == 0) != (r["rc"] == 0)}

    def swap_crash():
        # the swap is one renameat2(RENAME_EXCHANGE); shown by tests/test_reliability.py::test_swap_*
        from lqkit import outdir

        return {"rc": None, "stderr_lines": 0, "message": "", "seconds": 0}, {
            "renameat2 available": outdir._renameat2() is not None}

    def shape_edit(d: Path):
        edit_tensors(d, lambda s: s.update({first(s, "norm.weight"): s[first(s, "norm.weight")][:-1]}))

    def missing_tensor(d: Path):
        edit_tensors(d, lambda s: s.pop(first(s, "q_codes") if any(k.endswith("q_codes") for k in s)
                                        else first(s, "norm.weight")))

    def no_files(d: Path):
        edit_meta(d, lambda m: m.pop("files"))

    def bad_alias(d: Path):
        edit_meta(d, lambda m: m.update(aliases={"lm_head.weight": "model.nothing.weight"}))

    def plan_unknown_key(d: Path):
        edit_meta(d, lambda m: next(iter(m["plan"].values())).update(bogus=1))

    def plan_list(d: Path):
        edit_meta(d, lambda m: m.update(plan=list(m["plan"].values())))

    def config_damaged(d: Path):
        (d / "config.json").write_text("{not json")
        from lqkit import checkpoint

        digest = checkpoint._sha256(d / "config.json")
        edit_meta(d, lambda m: m["files"]["config.json"].update(sha256=digest, bytes=(d / "config.json").stat().st_size))

    def inspect_of(edit, name):
        def run():
            d = copy_ck(name)
            edit(d)
            return lqkit("inspect", str(d)), {}
        return run

    def compress_to(out: str, *extra: str, cwd: Path | None = None, env: dict | None = None):
        def run():
            t = time.time()
            r = lqkit("compress", "--model", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32",
                      "--out", out, *extra, cwd=cwd, env=env)
            return r, {"seconds to the error": round(time.time() - t, 1)}
        return run

    def rtn4_in_shell(setup: str, out: Path) -> dict:
        """`lqkit compress` (rtn 4-bit) to ``out`` from a shell that runs ``setup`` first (a limit, a umask)."""
        return lqkit("compress", "--model", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32",
                     "--out", str(out), shell=setup)

    def readonly_out():
        return compress_to("/proc/lqkit-out")()

    def full_disk():
        out = work / "full"
        shutil.rmtree(out, ignore_errors=True)
        r = rtn4_in_shell("ulimit -f 4", out)  # a file-size limit: the first shard cannot be written (a full disk)
        left = [x.name for x in work.iterdir() if x.name.startswith(".full.")]
        return r, {"nothing left behind": not left and not out.exists()}

    def cwd_out():
        here = work / "here"
        here.mkdir(exist_ok=True)
        (here / "mine.txt").write_text("mine")
        r, extra = compress_to(".", "--overwrite", cwd=here)()
        return r, {**extra, "folder intact": (here / "mine.txt").exists()}

    def bad_include():
        return compress_to(str(work / "inc"), "--include", "self_attn(")()

    def tiny_budget_bytes():
        t = time.time()
        r = lqkit("compress", "--model", str(model), "--budget-bytes", "1KB", "--out", str(work / "bb"))
        return r, {"seconds to the error": round(time.time() - t, 1)}

    def huge_budget():
        return lqkit("compress", "--model", str(model), "--budget", "100", "--out", str(work / "b100")), {}

    def stale_temp():
        out = work / "stale"
        shutil.rmtree(out, ignore_errors=True)
        left = work / ".stale.tmp-killed"
        left.mkdir(exist_ok=True)
        (left / "model-00001.safetensors").write_bytes(b"x" * 1000)
        r, _ = compress_to(str(out))()
        return r, {"left-over removed": not left.exists()}

    def stats_corrupt():
        cache = work / "cache-corrupt"
        shutil.rmtree(cache, ignore_errors=True)
        env = {**ENV, "LQKIT_CACHE": str(cache)}
        args = ["compress", "--model", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32",
                "--calib-samples", "8", "--calib-seqlen", "64", "--no-sequential", "--overwrite"]
        r1 = lqkit(*args, "--out", str(work / "sc1"), env=env)
        files = [f for f in cache.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json")]
        for f in files:
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
        r = lqkit(*args, "--out", str(work / "sc2"), env=env)
        return r, {"first run rc": r1["rc"], "cache files damaged": len(files)}

    def eval_json_inf():
        d = copy_ck("inf")
        edit_tensors(d, lambda s: s.update({first(s, "norm.weight"): s[first(s, "norm.weight")] * 1e30}))
        r = lqkit("eval", str(d), "--windows", "1", "--json")
        try:
            json.loads(r["stdout"], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            valid = True
        except ValueError:
            valid = False
        return r, {"stdout is strict JSON": valid, "stdout": r["stdout"].strip()[:120]}

    def hub_id():
        env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        t = time.time()
        r = lqkit("eval", "some-org/some-model", "--windows", "1", env=env)
        return r, {"seconds": round(time.time() - t, 1)}

    def perms():
        out = work / "perms"
        shutil.rmtree(out, ignore_errors=True)
        r = rtn4_in_shell("umask 022", out)
        modes = sorted({oct(f.stat().st_mode & 0o777) for f in [out, *out.iterdir()]}) if out.exists() else []
        return r, {"modes under umask 022": modes}

    def api_load():
        p = subprocess.run([sys.executable, "-c", f"import lqkit; m = lqkit.load({str(ck)!r}); print(type(m).__name__)"],
                           env=ENV, capture_output=True, text=True, timeout=300)
        return {"rc": p.returncode, "stderr_lines": 0, "message": p.stdout.strip() or p.stderr.strip()[-200:],
                "seconds": 0}, {}

    return [
        ("1a", "finetune --overwrite --out = the checkpoint being tuned", ft_over_source),
        ("1b", "finetune --overwrite --out = a folder holding it and other files", ft_over_parent),
        ("2a", "eval of a folder whose config asks for its own code (auto_map), 'y' on stdin", remote_code("eval")),
        ("2b", "compress --model of that folder, 'y' on stdin", remote_code("compress")),
        ("3a", 'tensor byte flipped, lqkit.json "files": {}', damaged(flip_with_empty_files, "flip")),
        ("3b", "lqkit.json lists ../other.safetensors with its real hash", damaged(outside_name, "outside")),
        ("3c", "scales rewritten as int16, checksums updated", damaged(int16_scales, "int16")),
        ("3d", "config.json edited (rms_norm_eps)", damaged(config_edit, "cfg")),
        ("4a", "two compress runs to one --out at once, no --overwrite", two_runs),
        ("4b", "crash between the renames of an --overwrite", swap_crash),
        ("5a", "a tensor of the wrong shape, checksums updated", damaged(shape_edit, "shape")),
        ("5b", "a tensor missing, checksums updated", damaged(missing_tensor, "missing")),
        ("5c", 'lqkit.json without "files"', damaged(no_files, "nofiles")),
        ("5d", "an alias to a missing tensor", damaged(bad_alias, "alias")),
        ("5e", "a plan entry with an unknown key (inspect)", inspect_of(plan_unknown_key, "pkey")),
        ("5f", "the plan stored as a list (inspect)", inspect_of(plan_list, "plist")),
        ("5g", "a damaged config.json, checksum updated", damaged(config_damaged, "cfgbad")),
        ("5h", "--out in a folder that cannot be written (/proc)", readonly_out),
        ("5i", "a full disk while saving (file-size limit 4 KiB)", full_disk),
        ("5j", "--device cuda without CUDA", compress_to(str(work / "dev1"), "--device", "cuda")),
        ("5k", "--device bogus", compress_to(str(work / "dev2"), "--device", "bogus")),
        ("5l", "--out . --overwrite (the current folder)", cwd_out),
        ("6a", "an invalid --include regex", bad_include),
        ("6b", "--budget-bytes 1KB (below the smallest plan)", tiny_budget_bytes),
        ("6c", "--budget 100", huge_budget),
        ("7a", "a temp folder left by a save killed with -9, then a new run", stale_temp),
        ("7b", "every statistics-cache file truncated, then a new run", stats_corrupt),
        ("7c", "eval --json of a model whose perplexity is infinite", eval_json_inf),
        ("7d", "a Hub id without network (HF_HUB_OFFLINE unset)", hub_id),
        ("7e", "permissions of a checkpoint written under umask 022", perms),
        ("7f", "lqkit.load(DIR)", api_load),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="regex of case ids")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lqkit-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    model, ck = build(work)
    rows = []
    for cid, what, fn in cases(work, model, ck):
        if args.only and not re.search(args.only, cid):
            continue
        r, held = fn()
        r.pop("stdout", None)
        row = {"case": cid, "what": what, **r, **held}
        rows.append(row)
        print(f"{cid:4} rc={r['rc']} lines={r['stderr_lines']} {r['message'][:150]!r} {held}", flush=True)
    write_json(Path(args.out), {"machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
