"""The Fashion-MNIST study (issue 7): the paper's image and label ablations under one protocol.

One ``nrrdd run`` per (IPC, method), each training ``--seeds`` students per label
mode, into ``OUT/ipc<N>-<method>/``; finished runs are skipped and interrupted
ones resumed, so the study can be stopped and restarted. Then:

- ``OUT/study.md``: top-1 (mean ± std over the student seeds, last epoch, the
  full real test set) per method and label mode, the DBR recover rate
  (dbr - onehot) / (soft - onehot), the orderings the paper claims with whether
  each holds beyond noise (difference > 2 standard deviations of either side),
  the wall time of each stage, and the exact command of every row;
- ``OUT/study.json``: the same numbers;
- ``OUT/methods_ipc<N>.png``: one row of synthetic images per method (first
  image of each class), the same classes in the same columns.

    python benchmarks/fashion_mnist_study.py --teacher teacher.pt --out study \\
        --ipc 1 --ipc 10 --ipc 50 --seeds 3 --device cuda
    python benchmarks/fashion_mnist_study.py --out study --table-only
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("random", "rded", "cidd", "sre2l", "nrr")
LABELS = ("soft", "onehot", "dbr")
# the paper's claims, as (better, worse)
ORDERINGS = (("nrr", "cidd"), ("cidd", "rded"), ("cidd", "random"))


def run_dir(out: Path, ipc: int, method: str) -> Path:
    return out / f"ipc{ipc}-{method}"


def command(args, ipc: int, method: str) -> list:
    cmd = ["nrrdd", "run", "--dataset", "fashion-mnist", "--teacher", str(args.teacher),
           "--method", method, "--ipc", str(ipc), "--labels", ",".join(args.labels),
           "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--iterations", str(args.iterations),
           "--mipc", str(args.mipc), "--factor", str(args.factor),
           "--out", str(run_dir(args.out, ipc, method)), "--quiet"]
    if args.data_dir:
        cmd[4:4] = ["--data-dir", str(args.data_dir)]
    if args.device:
        cmd += ["--device", args.device]
    return cmd


def run_all(args) -> None:
    todo = [(ipc, m) for ipc in args.ipc for m in args.methods]
    for k, (ipc, method) in enumerate(todo):
        d = run_dir(args.out, ipc, method)
        cmd = command(args, ipc, method)
        if (d / "run.json").is_file():
            print(f"[{k + 1}/{len(todo)}] ipc {ipc} {method}: done before", flush=True)
            continue
        if d.is_dir() and any(d.iterdir()):
            cmd.append("--resume")
        print(f"[{k + 1}/{len(todo)}] ipc {ipc} {method}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        with open(args.out / f"ipc{ipc}-{method}.log", "a") as log:
            rc = subprocess.call([sys.executable, "-m", "nrrdd", *cmd[1:]], stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"ipc {ipc} {method} failed (exit {rc}); see {args.out}/ipc{ipc}-{method}.log")
        print(f"    {time.time() - t0:.0f} s", flush=True)


def _cell(values):
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def collect(args) -> dict:
    rows = {}
    for ipc in args.ipc:
        for method in args.methods:
            f = run_dir(args.out, ipc, method) / "run.json"
            if not f.is_file():
                continue
            r = json.loads(f.read_text())
            cells = {mode: _cell(r["top1"][mode]) for mode in r["top1"]}
            rec = None
            if all(cells.get(m) for m in ("soft", "onehot", "dbr")):
                gap = cells["soft"]["mean"] - cells["onehot"]["mean"]
                rec = (cells["dbr"]["mean"] - cells["onehot"]["mean"]) / gap if gap > 0 else None
            rows[f"{ipc}/{method}"] = {"ipc": ipc, "method": method, "top1": cells, "recover_rate": rec,
                                        "seconds": r["seconds"], "label_bytes": r.get("label_bytes"),
                                        "teacher": r["teacher"], "device": r["device"],
                                        "torch": r.get("torch_version"),
                                        "command": " ".join(command(args, ipc, method))}
    orderings = []
    for ipc in args.ipc:
        for better, worse in ORDERINGS:
            a, b = rows.get(f"{ipc}/{better}"), rows.get(f"{ipc}/{worse}")
            if not a or not b or not a["top1"].get("soft") or not b["top1"].get("soft"):
                continue
            ca, cb = a["top1"]["soft"], b["top1"]["soft"]
            diff = ca["mean"] - cb["mean"]
            noise = 2 * max(ca["std"], cb["std"])
            verdict = ("holds" if diff > noise else "fails" if diff < -noise else "within noise") \
                if min(ca["n"], cb["n"]) > 1 else ("higher" if diff > 0 else "lower") + " (one seed: no noise estimate)"
            orderings.append({"ipc": ipc, "claim": f"{better} > {worse}", "diff": diff, "two_std": noise,
                              "verdict": verdict})
    return {"rows": rows, "orderings": orderings, "labels": list(args.labels),
            "protocol": {"iterations": args.iterations, "epochs": args.epochs, "mipc": args.mipc,
                         "factor": args.factor, "seeds": args.seeds}}


def table(study: dict) -> str:
    labels = study["labels"]
    p = study["protocol"]
    out = [f"Protocol: {p['iterations']} refinement iterations, {p['epochs']} student epochs, mipc "
           f"{p['mipc']}, factor {p['factor']}, {p['seeds']} student seed(s); top-1 % on the full test "
           "set at the last epoch, mean ± std over student seeds.", "",
           "| IPC | method | " + " | ".join(labels) + " | DBR recover | distill s | relabel s | evaluate s |",
           "|---|---|" + "---|" * len(labels) + "---|---|---|---|"]
    for r in study["rows"].values():
        cells = []
        for m in labels:
            c = r["top1"].get(m)
            cells.append("" if not c else f"{c['mean']:.2f} ± {c['std']:.2f}" + (f" (n={c['n']})" if c["n"] != p["seeds"] else ""))
        rec = "" if r["recover_rate"] is None else f"{100 * r['recover_rate']:.0f}%"
        s = r["seconds"]
        out.append(f"| {r['ipc']} | {r['method']} | " + " | ".join(cells)
                   + f" | {rec} | {s.get('distill', 0):.0f} | {s.get('relabel', 0):.0f} | {s.get('evaluate', 0):.0f} |")
    if study["orderings"]:
        out += ["", "| IPC | claim (soft labels) | difference | 2 std | verdict |", "|---|---|---|---|---|"]
        for o in study["orderings"]:
            out.append(f"| {o['ipc']} | {o['claim']} | {o['diff']:+.2f} | {o['two_std']:.2f} | {o['verdict']} |")
    out += ["", "Commands:", ""]
    out += [f"- IPC {r['ipc']} {r['method']}: `{r['command']}`" for r in study["rows"].values()]
    return "\n".join(out) + "\n"


def figure(args, ipc: int) -> Path | None:
    """methods_ipc<N>.png: a row per method, the first synthetic image of each class."""
    import torch
    from torchvision.utils import save_image

    rows, names = [], []
    for method in args.methods:
        d = run_dir(args.out, ipc, method) / "distilled"
        if not (d / "images.pt").is_file():
            continue
        cfg = json.loads((d / "config.json").read_text())
        images, labels = torch.load(d / "images.pt"), torch.load(d / "labels.pt")
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        first = torch.stack([images[labels == c][0] for c in range(int(labels.max()) + 1)])
        rows.append((first * std + mean).clamp(0, 1))
        names.append(method)
    if not rows:
        return None
    path = args.out / f"methods_ipc{ipc}.png"
    save_image(torch.cat(rows), path, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    (args.out / f"methods_ipc{ipc}.txt").write_text("rows, top to bottom: " + ", ".join(names) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, help="ConvNet-3 checkpoint from `nrrdd train-teacher`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--ipc", type=int, action="append", help="repeatable (default 1, 10, 50)")
    p.add_argument("--method", dest="methods", action="append", choices=METHODS,
                   help="repeatable (default: all)")
    p.add_argument("--labels", default=",".join(LABELS), help="comma-separated label modes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--mipc", type=int, default=300)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--table-only", action="store_true", help="only rebuild study.md/json and the figures")
    args = p.parse_args(argv)
    args.ipc = args.ipc or [1, 10, 50]
    args.methods = args.methods or list(METHODS)
    args.labels = [m for m in args.labels.split(",") if m]
    if not args.table_only:
        if args.teacher is None or not args.teacher.is_file():
            p.error("--teacher must name an existing checkpoint (train one with `nrrdd train-teacher`)")
        args.out.mkdir(parents=True, exist_ok=True)
        run_all(args)
        if args.dry_run:
            return 0
    study = collect(args)
    (args.out / "study.json").write_text(json.dumps(study, indent=1, sort_keys=True))
    (args.out / "study.md").write_text(table(study))
    for ipc in args.ipc:
        figure(args, ipc)
    print(table(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
