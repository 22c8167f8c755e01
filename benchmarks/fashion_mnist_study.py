"""The Fashion-MNIST study (issue 7): the paper's image and label ablations under one protocol.

One ``nrrdd run`` per (IPC, method) and distillation seed (``--distill-seeds``), each
training ``--seeds`` students per label mode, into ``OUT/ipc<N>-<method>/`` (seed 0) and
``OUT/ipc<N>-<method>-seed<k>/``; finished runs are skipped and interrupted
ones resumed, so the study can be stopped and restarted. Then:

- ``OUT/study.md``: top-1 (mean ± std over the student seeds, last epoch, the
  full real test set) per method and label mode, the DBR recover rate
  (dbr - onehot) / (soft - onehot), the orderings the paper claims with whether
  each holds beyond noise (difference > 2 standard deviations of either side),
  the wall time of each stage, and the exact command of every row;
- ``OUT/study.json``: the same numbers. The summary is cumulative: rows, sweeps and
  cross rows of earlier invocations into the same OUT (same protocol) stay in it, so a
  study run one method at a time ends with one table;
- ``OUT/methods_ipc<N>.png``: one row of synthetic images per method (first
  image of each class), the same classes in the same columns.

Optional parts:

- ``--sweep cam_eps=0.1,0.3,0.5,0.7,0.9`` / ``--sweep r=0.1,...`` /
  ``--sweep alpha_lr=0,0.1,1`` (the weight of L_lr in refinement) /
  ``--sweep crop_min=0.08,0.25,0.5`` (CIDD's crop area range, MIN to 1) /
  ``--sweep factor=1,2``: ``--sweep-method`` (``nrr``) at IPC ``--sweep-ipc`` (10)
  for each value, scored on training images held out of distillation
  (``--eval-split holdout``), never on the test set, with the students of each
  ``--sweep-labels`` mode (soft; r also sets the DBR loss's margin, so sweep it with
  ``--sweep-labels soft,dbr``); the table marks the value with the best holdout
  top-1 of the first mode. For a method without L_lr in its refinement (random,
  rded, cidd, nrr-nolr) r reaches only the DBR students: the r sweep then distils
  once (``OUT/sweep-<method>-r-base/``, at the defaults) and trains the DBR students
  of each value on that set (``nrrdd evaluate --dbr-r``);
- ``--cross-student resnet18 --cross-student mobilenetv2``: the set of
  ``--cross-method`` (``nrr``) at IPC ``--cross-ipc`` (10), distilled with the
  ConvNet-3 teacher, evaluated on those students, soft labels;
- ``--cross-teacher CKPT``: ``--cross-method`` at IPC ``--cross-ipc`` distilled with
  another teacher (e.g. a ResNet-18) and evaluated on ConvNet-3 students, the other
  way round;
- ``--swap-labels`` (with ``--cross-teacher``): the label-swap controls, each one
  ``nrrdd run --images-from``: the ``--teacher``'s set labelled by the cross teacher
  (``OUT/swap-<method>-images-main/``) and the cross teacher's set labelled by the
  ``--teacher`` (``OUT/swap-<method>-images-cross/``), ConvNet-3 students, soft labels;
  with the two sets' own rows this is the 2×2 of who chose the images against who
  labels them;
- ``--method nrr@cam_eps=0.3``: a method at one setting of those the sweeps take
  (``METHOD@NAME=VALUE``), scored on the test set like any row, into
  ``OUT/ipc<N>-nrr-cam_eps0.3/``: how the holdout's choice is measured on the test set
  (its row sits under the method's own);
- ``--record docs/results/fashion_mnist_students.csv``: merge every distillation's
  students (per label mode) into the committed record (``results_record.py``), which
  outlives the run folders.

    python benchmarks/fashion_mnist_study.py --teacher teacher.pt --out study \\
        --ipc 1 --ipc 10 --ipc 50 --seeds 3 --device cuda --jobs 4
    python benchmarks/fashion_mnist_study.py --out study --table-only
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # a checkout's nrrdd first
from nrrdd.commands.run import LABEL_MODES  # noqa: E402
from nrrdd.data import HOLDOUT_PER_CLASS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_record.py beside it, also under `python -P`
import results_record  # noqa: E402

METHODS = ("random", "rded", "cidd", "sre2l", "nrr")
# beyond the default five: nrr refined without the label-refinement term L_lr, so that
# its dbr column is the paper's "DBR" and nrr's the paper's "DBR+LR" (Table 2)
EXTRA_METHODS = {"nrr-nolr": ("nrr", ["--no-label-refine"]),
                 # SRe2L's unmasked update without L_lr: the no-mask end of nrr-nolr's ε sweep
                 "sre2l-nolr": ("sre2l", ["--no-label-refine"])}
# the issue's label columns: soft, one-hot, compact (top-2) and DBR; nrr is DBR+LR, nrr-nolr plain DBR
LABELS = ("soft", "onehot", "compact", "dbr")
# what each sweepable setting becomes on the `nrrdd run` command line ("factor" replaces --factor)
SWEEP_FLAGS = {"cam_eps": lambda v: ["--cam-eps", v], "r": lambda v: ["--r", v],
               "alpha_lr": lambda v: ["--alpha-lr", v],
               "crop_min": lambda v: ["--crop-scale", v, "1"], "factor": lambda v: []}
# methods whose refinement has no label-refinement term L_lr: the margin r reaches only their
# DBR students, so an r sweep of one of them evaluates one distilled set at each value
NO_LABEL_REFINE = ("random", "rded", "cidd", "nrr-nolr", "sre2l-nolr")
# the paper's claims, as (better, worse)
ORDERINGS = (("nrr", "cidd"), ("cidd", "rded"), ("cidd", "random"))


def split_method(spec: str) -> tuple:
    """``nrr@cam_eps=0.3`` -> ("nrr", ("cam_eps", "0.3")); ``nrr`` -> ("nrr", None).
    Raises ValueError naming what is wrong."""
    base, at, setting = spec.partition("@")
    if base not in METHODS + tuple(EXTRA_METHODS):
        raise ValueError(f"unknown method {base!r} (choose from {', '.join(METHODS + tuple(EXTRA_METHODS))})")
    if not at:
        return base, None
    name, eq, value = setting.partition("=")
    if name not in SWEEP_FLAGS or not eq:
        raise ValueError(f"{spec!r}: the setting after @ is NAME=VALUE with NAME one of {', '.join(SWEEP_FLAGS)}")
    try:
        ok = float(value) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{spec!r}: {value!r} is not a non-negative number")
    return base, (name, value)


def run_dir(out: Path, ipc: int, method: str, seed: int = 0) -> Path:
    """The run of one distillation; seed 0 has no suffix, so a study that later adds
    distillation seeds reuses its first runs. ``nrr@cam_eps=0.3`` runs in ``ipc<N>-nrr-cam_eps0.3``."""
    base, setting = split_method(method)
    name = base if setting is None else f"{base}-{setting[0]}{setting[1]}"
    return out / (f"ipc{ipc}-{name}" if seed == 0 else f"ipc{ipc}-{name}-seed{seed}")


def distillations(out: Path, ipc: int, method: str) -> list:
    """(seed, folder) of every finished distillation of (ipc, method), seed 0 first."""
    found = [(0, run_dir(out, ipc, method))]
    prefix = run_dir(out, ipc, method).name + "-seed"
    for d in out.glob(prefix + "*"):
        if d.name[len(prefix):].isdigit():
            found.append((int(d.name[len(prefix):]), d))
    return sorted((s, d) for s, d in found if (d / "run.json").is_file())


def command(args, ipc: int, method: str, out: Path | None = None, labels=None, extra=(),
            teacher=None, factor=None, seed: int = 0) -> list:
    out = out or run_dir(args.out, ipc, method, seed)
    method, setting = split_method(method)
    if setting is not None:
        name, value = setting
        extra = [*SWEEP_FLAGS[name](value), *extra]
        factor = value if name == "factor" else factor
    method, more = EXTRA_METHODS.get(method, (method, []))
    extra = [*more, *extra]
    # --preset paper: the paper's protocol is the base, and run.json records it as such
    cmd = ["nrrdd", "run", "--dataset", "fashion-mnist", "--preset", "paper",
           "--teacher", str(teacher or args.teacher or "TEACHER.pt"), "--method", method,
           "--ipc", str(ipc), "--labels", ",".join(labels or args.labels),
           "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--iterations", str(args.iterations),
           "--mipc", str(args.mipc), "--factor", str(factor or args.factor),
           "--out", str(out), "--quiet", *(["--seed", str(seed)] if seed else []), *extra]
    return cmd


def sweep_dir(out: Path, name: str, value: str, method: str = "nrr") -> Path:
    return out / (f"sweep-{name}-{value}" if method == "nrr" else f"sweep-{method}-{name}-{value}")


def students_only(name: str, method: str) -> bool:
    """Whether sweeping ``name`` for ``method`` changes only the students, not the images."""
    return name == "r" and method in NO_LABEL_REFINE


def r_eval_file(base: Path, value: str, split: str = "holdout") -> Path:
    """The DBR students' evaluation at margin ``value`` on the r sweep's one set."""
    from nrrdd.student import eval_name, eval_variant

    variant = eval_variant("dbr", dbr_r=float(value))
    return base / "distilled" / f"{eval_name('dbr', 'convnet3', False, split, variant)}.json"


def cross_dir(out: Path, method: str = "nrr", ipc: int = 10) -> Path:
    return out / (f"cross-teacher-{method}" if ipc == 10 else f"cross-teacher-ipc{ipc}-{method}")


def swap_dirs(args) -> dict:
    """{images' chooser: (the swap run's folder, the set it labels, the labelling teacher)}."""
    m, ipc = args.cross_method, args.cross_ipc
    suffix = "" if ipc == 10 else f"-ipc{ipc}"
    return {"main": (args.out / f"swap-{m}{suffix}-images-main", run_dir(args.out, ipc, m) / "distilled",
                     args.cross_teacher),
            "cross": (args.out / f"swap-{m}{suffix}-images-cross", cross_dir(args.out, m, ipc) / "distilled",
                      args.teacher)}


def jobs(args) -> list:
    """(name, folder, command, done-marker) of every run of the study, in order. A job
    without a folder, or named "swap ...", reads the folders of other runs: it runs after them."""
    todo = []
    for ipc in args.ipc:
        for m in args.methods:
            for seed in range(args.distill_seeds):
                d = run_dir(args.out, ipc, m, seed)
                name = f"ipc {ipc} {m}" + (f" seed {seed}" if seed else "")
                todo.append((name, d, command(args, ipc, m, seed=seed), d / "run.json"))
    holdout = ["--eval-split", "holdout", "--holdout-per-class", str(args.holdout_per_class)]
    for name, values in args.sweeps:
        if students_only(name, args.sweep_method):
            base = sweep_dir(args.out, name, "base", args.sweep_method)
            cmd = command(args, args.sweep_ipc, args.sweep_method, base, args.sweep_labels, holdout)
            todo.append((f"sweep {args.sweep_method} {name} base", base, cmd, base / "run.json"))
            for v in values:
                cmd = ["nrrdd", "evaluate", "--distilled", str(base / "distilled"), "--student", "convnet3",
                       "--labels", "dbr", "--dbr-r", v, "--seeds", str(args.seeds), *holdout, "--quiet"]
                if args.device:
                    cmd += ["--device", args.device]
                todo.append((f"sweep {args.sweep_method} {name}={v}", None, cmd, r_eval_file(base, v)))
            continue
        for v in values:
            d = sweep_dir(args.out, name, v, args.sweep_method)
            extra = [*holdout, *SWEEP_FLAGS[name](v)]
            cmd = command(args, args.sweep_ipc, args.sweep_method, d, args.sweep_labels, extra,
                          factor=v if name == "factor" else None)
            todo.append((f"sweep {args.sweep_method} {name}={v}", d, cmd, d / "run.json"))
    base = run_dir(args.out, args.cross_ipc, args.cross_method) / "distilled"
    for student in args.cross_students:
        cmd = ["nrrdd", "evaluate", "--distilled", str(base), "--student", student, "--labels", "soft",
               "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--quiet"]
        if args.device:
            cmd += ["--device", args.device]
        todo.append((f"cross student {student}", None, cmd, base / f"eval_soft_{student}.json"))
    if args.cross_teacher:
        d = cross_dir(args.out, args.cross_method, args.cross_ipc)
        cmd = command(args, args.cross_ipc, args.cross_method, d, ["soft"], ["--student", "convnet3"],
                      teacher=args.cross_teacher)
        todo.append(("cross teacher", d, cmd, d / "run.json"))
    if args.swap_labels:
        for chooser, (d, images, teacher) in swap_dirs(args).items():
            cmd = ["nrrdd", "run", "--dataset", "fashion-mnist", "--preset", "paper", "--images-from", str(images),
                   "--teacher", str(teacher or "TEACHER.pt"), "--labels", "soft", "--student", "convnet3",
                   "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--out", str(d), "--quiet"]
            todo.append((f"swap labels {chooser} images", d, cmd, d / "run.json"))
    return todo


def _after_runs(job) -> bool:
    name, folder = job[0], job[1]
    return folder is None or name.startswith("swap ")


def _prepare(args, k: int, total: int, job) -> tuple | None:
    """The command line and log of one job, or None when it finished before."""
    name, d, cmd, done = job
    if args.device and cmd[1] == "run":
        cmd = cmd + ["--device", args.device]
    if args.fast is not None and cmd[1] == "run":
        cmd = cmd + ["--fast" if args.fast else "--no-fast"]
    if args.student_channels_last and cmd[1] in ("run", "evaluate"):
        cmd = cmd + ["--student-channels-last" if cmd[1] == "run" else "--channels-last"]
    if args.data_dir:
        cmd = cmd[:2] + ["--data-dir", str(args.data_dir)] + cmd[2:]
    if done.is_file():
        print(f"[{k + 1}/{total}] {name}: done before", flush=True)
        return None
    if d is not None and d.is_dir() and any(d.iterdir()):
        cmd.append("--resume")
    print(f"[{k + 1}/{total}] {name}: {' '.join(cmd)}", flush=True)
    log_path = args.out / (name.replace(" ", "_").replace("=", "-") + ".log")
    return name, cmd, log_path


def _execute(prepared: tuple) -> tuple:
    name, cmd, log_path = prepared
    t0 = time.time()
    with open(log_path, "a") as log:
        # -P: the working folder is not put on sys.path, so a source checkout's uncompiled
        # nrrdd_ext/ cannot shadow the installed package
        rc = subprocess.call([sys.executable, "-P", "-m", "nrrdd", *cmd[1:]], stdout=log,
                             stderr=subprocess.STDOUT)
    return name, rc, log_path, time.time() - t0


def run_all(args) -> None:
    """Every job not finished before. With --jobs N, up to N at once: first the runs
    (each writes its own folder), then the evaluations of finished sets (the r sweep's
    margins, the cross-architecture students), which read those folders. The first
    failure stops what has not started."""
    todo = jobs(args)
    ready = [(job, _prepare(args, k, len(todo), job)) for k, job in enumerate(todo)]
    if args.dry_run:
        return
    phases = [[p for job, p in ready if p and not _after_runs(job)], [p for job, p in ready if p and _after_runs(job)]]
    for phase in phases:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(_execute, p) for p in phase]
            for fut in as_completed(futures):
                name, rc, log_path, seconds = fut.result()
                if rc != 0:
                    for f in futures:
                        f.cancel()
                    raise SystemExit(f"{name} failed (exit {rc}); see {log_path}")
                print(f"    {name}: {seconds:.0f} s", flush=True)


def _cell(values):
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def _top1_source(run: Path, run_json: dict, mode: str) -> Path:
    """Where the students' top-1 of one label mode on the run's split is read from: the
    evaluation file (which holds more seeds when ``nrrdd evaluate --seeds N`` was run on
    the set later, or the only ones when the mode was evaluated after ``nrrdd run``) when
    there is one, else run.json."""
    from nrrdd.student import eval_name

    name = eval_name(mode, run_json.get("student", "convnet3"), False, run_json.get("eval_split", "test"))
    f = run / "distilled" / f"{name}.json"
    return f if f.is_file() else run / "run.json"


def _top1(run: Path, run_json: dict, mode: str) -> list:
    """The students' top-1 of one label mode (see ``_top1_source``); [] when the run has none."""
    f = _top1_source(run, run_json, mode)
    if f.name != "run.json":
        return json.loads(f.read_text())["top1"]
    return run_json["top1"].get(mode) or []


def _protocol(args) -> dict:
    return {"iterations": args.iterations, "epochs": args.epochs, "mipc": args.mipc,
            "factor": args.factor, "seeds": args.seeds, "distill_seeds": args.distill_seeds}


def previous_summary(args) -> dict | None:
    """OUT/study.json of earlier invocations, when it was made under the same protocol:
    the new summary keeps its rows, sweeps and cross rows (study.json is cumulative, so
    running one method at a time never drops the others from the table)."""
    f = args.out / "study.json"
    if not f.is_file():
        return None
    old = json.loads(f.read_text())
    if old.get("protocol") != _protocol(args):
        print(f"note: {f} was made under another protocol ({old.get('protocol')}); the new summary "
              "holds only this invocation's runs", flush=True)
        return None
    return old


def _cells(args, previous: dict | None) -> list:
    """(ipc, method) of every row: this invocation's, then the previous summary's, sorted
    by IPC and in the order of METHODS (the extra methods after them)."""
    cells = {(ipc, m) for ipc in args.ipc for m in args.methods}
    if previous:
        cells |= {(r["ipc"], r["method"]) for r in previous["rows"].values()}
    order = list(METHODS) + list(EXTRA_METHODS)

    def key(c):  # a method at a setting sits under the method itself
        base = split_method(c[1])[0]
        return c[0], order.index(base) if base in order else len(order), c[1] != base, c[1]
    return sorted(cells, key=key)


def collect(args, previous: dict | None = None) -> dict:
    rows = {}
    ours = {(ipc, m) for ipc in args.ipc for m in args.methods}
    for ipc, method in _cells(args, previous):
        found = distillations(args.out, ipc, method)
        runs = [(d, json.loads((d / "run.json").read_text())) for _, d in found]
        if not runs:
            continue
        r = runs[0][1]
        # every distillation's students per label mode, those evaluated after `nrrdd run` included
        top1 = [{m: got for m in LABELS if (got := _top1(d, rj, m))} for d, rj in runs]
        cells = {}
        for mode in [m for m in LABELS if any(m in t for t in top1)]:
            # every student of every distillation; and how far the distillations' own means spread
            per_run = [t[mode] for t in top1 if mode in t]
            cells[mode] = _cell([v for vals in per_run for v in vals])
            means = [statistics.fmean(v) for v in per_run]
            cells[mode]["distillations"] = len(per_run)
            cells[mode]["distill_std"] = statistics.pstdev(means) if len(means) > 1 else None
            # per distillation seed: its students, the day they were measured and the teacher (for --record)
            cells[mode]["by_distillation"] = [
                {"seed": seed, "values": t[mode],
                 "measured": time.strftime("%Y-%m-%d", time.gmtime(_top1_source(d, rj, mode).stat().st_mtime)),
                 "teacher": results_record.teacher_name(rj["teacher"]["arch"], rj["teacher"].get("test_accuracy"))}
                for (seed, d), (_, rj), t in zip(found, runs, top1) if mode in t]
        # the recover rate from the distillations that have all three modes, so that a
        # later soft-only distillation does not mix into its soft term alone
        full = [t for t in top1 if all(m in t for m in ("soft", "onehot", "dbr"))]
        rec = None
        if full:
            mean = {m: statistics.fmean([v for t in full for v in t[m]]) for m in ("soft", "onehot", "dbr")}
            gap = mean["soft"] - mean["onehot"]
            rec = (mean["dbr"] - mean["onehot"]) / gap if gap > 0 else None
        made = list(cells)  # the label modes the row has, not this invocation's
        rows[f"{ipc}/{method}"] = {"ipc": ipc, "method": method, "top1": cells, "recover_rate": rec,
                                   "seconds": r["seconds"], "label_bytes": r.get("label_bytes"),
                                   "teacher": r["teacher"], "device": r["device"],
                                   "torch": r.get("torch_version"),
                                   "distill_seeds": [seed for seed, _ in distillations(args.out, ipc, method)],
                                   "command": " ".join(command(args, ipc, method, labels=made))}
        if (ipc, method) not in ours and f"{ipc}/{method}" in previous["rows"]:
            rows[f"{ipc}/{method}"]["command"] = previous["rows"][f"{ipc}/{method}"]["command"]
    orderings = []
    for ipc in sorted({r["ipc"] for r in rows.values()}):
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
    sweeps = []
    for name, values in args.sweeps:
        pts = []
        only = students_only(name, args.sweep_method)
        # the point's own numbers: those of the first label mode; DBR's when only its students change
        modes = ["dbr"] + [m for m in args.sweep_labels if m != "dbr"] if only else list(args.sweep_labels)
        for v in values:
            f = sweep_dir(args.out, name, "base" if only else v, args.sweep_method) / "run.json"
            if f.is_file():
                r = json.loads(f.read_text())
                cells = {m: _cell(t) for m in args.sweep_labels if (t := _top1(f.parent, r, m))}
                if only:  # the base set's DBR students at this margin; the other modes do not depend on r
                    e = r_eval_file(f.parent, v)
                    cells.pop("dbr", None)
                    if e.is_file():
                        cells["dbr"] = _cell(json.loads(e.read_text())["top1"])
                if modes[0] in cells:
                    pts.append({"value": float(v), **cells[modes[0]], "labels": cells})
        if pts:
            best = max(pts, key=lambda q: q["mean"])["value"]
            sweeps.append({"name": name, "method": args.sweep_method, "ipc": args.sweep_ipc, "points": pts,
                           "label_modes": modes, "best_on_holdout": best, "students_only": only})
    cross = []
    for student in args.cross_students:
        f = run_dir(args.out, args.cross_ipc, args.cross_method) / "distilled" / f"eval_soft_{student}.json"
        if f.is_file():
            cross.append({"method": args.cross_method, "ipc": args.cross_ipc, "teacher": "convnet3",
                          "student": student,
                          **_cell(json.loads(f.read_text())["top1"])})
    f = cross_dir(args.out, args.cross_method, args.cross_ipc) / "run.json"
    if args.cross_teacher and f.is_file():
        r = json.loads(f.read_text())
        cross.append({"method": args.cross_method, "ipc": args.cross_ipc, "teacher": r["teacher"]["arch"],
                      "labels_by": r["teacher"]["arch"], "student": "convnet3",
                      **_cell(r["top1"]["soft"])})
    if args.swap_labels:
        for d, images, _ in swap_dirs(args).values():
            if (d / "run.json").is_file():
                r = json.loads((d / "run.json").read_text())
                chooser = json.loads((images / "config.json").read_text())["teacher"]["arch"]
                cross.append({"method": args.cross_method, "ipc": args.cross_ipc, "teacher": chooser,
                              "labels_by": r["teacher"]["arch"], "student": "convnet3", **_cell(r["top1"]["soft"])})
    labels = list(args.labels)
    if previous:  # what this invocation did not recompute stays as it was
        labels += [m for m in previous["labels"] if m not in labels]
        done = {(q["name"], q["method"], q["ipc"]) for q in sweeps}
        sweeps += [q for q in previous.get("sweeps", []) if (q["name"], q.get("method", "nrr"), q["ipc"]) not in done]
        key = lambda c: (c["method"], c["ipc"], c["teacher"], c.get("labels_by", c["teacher"]), c["student"])  # noqa: E731
        done = {key(c) for c in cross}
        cross += [c for c in previous.get("cross", []) if key(c) not in done]
    return {"rows": rows, "orderings": orderings, "labels": labels, "sweeps": sweeps,
            "cross": cross, "protocol": _protocol(args)}


def record_rows(study: dict) -> list:
    """The record's rows (results_record.FIELDS) of every distillation of every row, per
    label mode."""
    return [results_record.from_values(r["ipc"], r["method"], mode, d["seed"], d["values"], d["measured"],
                                       d["teacher"])
            for r in study["rows"].values() for mode, c in r["top1"].items() for d in c.get("by_distillation", [])]


def _fmt_cell(c: dict, seeds: int) -> str:
    txt = f"{c['mean']:.2f} ± {c['std']:.2f}"
    if c.get("distillations", 1) > 1:
        return txt + f" (n={c['n']}: {c['distillations']} distillations, their means ± {c['distill_std']:.2f})"
    return txt + (f" (n={c['n']})" if c["n"] != seeds else "")


def table(study: dict) -> str:
    labels = study["labels"]
    p = study["protocol"]
    out = [f"Protocol: {p['iterations']} refinement iterations, {p['epochs']} student epochs, mipc "
           f"{p['mipc']}, factor {p['factor']}, {p['seeds']} student seed(s); top-1 % on the full test "
           "set at the last epoch, mean ± std over student seeds, pooled over the distillations where a "
           "row has several (population std, ddof 0, as numpy's np.std in the field's code). Seconds: "
           "the run's stages; distill s of a run resumed across processes is its whole refinement's "
           "time (timings.json's refine_work) when that is larger than the last process's.", "",
           "| IPC | method | " + " | ".join(labels) + " | DBR recover | distill s | relabel s | evaluate s |",
           "|---|---|" + "---|" * len(labels) + "---|---|---|---|"]
    for r in study["rows"].values():
        cells = []
        for m in labels:
            c = r["top1"].get(m)
            cells.append("" if not c else _fmt_cell(c, p["seeds"]))
        rec = "" if r["recover_rate"] is None else f"{100 * r['recover_rate']:.0f}%"
        s = r["seconds"]
        # a run resumed across processes: its last process's distill time, or the whole refinement if larger
        distill_s = max(s.get("distill", 0), s.get("refine_work") or 0)
        out.append(f"| {r['ipc']} | {r['method']} | " + " | ".join(cells)
                   + f" | {rec} | {distill_s:.0f} | {s.get('relabel', 0):.0f} | {s.get('evaluate', 0):.0f} |")
    if study["orderings"]:
        out += ["", "| IPC | claim (soft labels) | difference | 2 std | verdict |", "|---|---|---|---|---|"]
        for o in study["orderings"]:
            out.append(f"| {o['ipc']} | {o['claim']} | {o['diff']:+.2f} | {o['two_std']:.2f} | {o['verdict']} |")
    for sw in study.get("sweeps", []):
        modes = sw.get("label_modes", ["soft"])
        out += ["", f"Sweep of {sw['name']} ({sw.get('method', 'nrr')}, IPC {sw['ipc']}, top-1 on held-out "
                    "training images, not the test set; best by the first label mode):", "",
                "| " + sw["name"] + " | " + " | ".join(f"holdout top-1, {m} labels" for m in modes) + " |",
                "|---|" + "---|" * len(modes)]
        for q in sw["points"]:
            cells = q.get("labels", {modes[0]: q})
            row = [f"{cells[m]['mean']:.2f} ± {cells[m]['std']:.2f}" if m in cells else "" for m in modes]
            if q["value"] == sw["best_on_holdout"]:
                row[0] += " (best)"
            out.append(f"| {q['value']:g} | " + " | ".join(row) + " |")
    if study.get("cross"):
        out += ["", "Cross-architecture (soft labels):", "",
                "| IPC | method | distilled with | labelled by | student | top-1 |", "|---|---|---|---|---|---|"]
        for c in study["cross"]:
            out.append(f"| {c.get('ipc', 10)} | {c.get('method', 'nrr')} | {c['teacher']} | "
                       f"{c.get('labels_by', c['teacher'])} | {c['student']} | "
                       f"{c['mean']:.2f} ± {c['std']:.2f} |")
    out += ["", "Commands:", ""]
    out += [f"- IPC {r['ipc']} {r['method']}: `{r['command']}`"
            + "".join(f", and with `--seed {s}`" for s in r.get("distill_seeds", [0]) if s)
            for r in study["rows"].values()]
    return "\n".join(out) + "\n"


def _first_per_class(distilled: Path):
    """The first synthetic image of each class of a distilled folder, in [0, 1], or None."""
    import torch

    if not (distilled / "images.pt").is_file():
        return None
    cfg = json.loads((distilled / "config.json").read_text())
    images, labels = torch.load(distilled / "images.pt"), torch.load(distilled / "labels.pt")
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    first = torch.stack([images[labels == c][0] for c in range(int(labels.max()) + 1)])
    return (first * std + mean).clamp(0, 1)


def _image_rows(folders: dict, path: Path) -> Path | None:
    """path (PNG): a row per named distilled folder, the same classes in the same columns;
    path.txt names the rows."""
    import torch
    from torchvision.utils import save_image

    rows = {name: im for name, im in ((n, _first_per_class(d)) for n, d in folders.items()) if im is not None}
    if not rows:
        return None
    first = next(iter(rows.values()))
    save_image(torch.cat(list(rows.values())), path, nrow=first.shape[0], padding=2, pad_value=1.0)
    path.with_suffix(".txt").write_text("rows, top to bottom: " + ", ".join(rows) + "\n")
    return path


def figure(args, study: dict, ipc: int) -> Path | None:
    """methods_ipc<N>.png: a row per method of the summary, the first synthetic image of each class."""
    methods = [r["method"] for r in study["rows"].values() if r["ipc"] == ipc]
    return _image_rows({m: run_dir(args.out, ipc, m) / "distilled" for m in methods},
                       args.out / f"methods_ipc{ipc}.png")


def sweep_figures(args) -> list:
    """sweep_[<method>_]<name>_images.png: a row per value of each sweep that changes the images."""
    made = []
    for name, values in args.sweeps:
        if students_only(name, args.sweep_method):
            continue
        m = args.sweep_method
        png = args.out / (f"sweep_{name}_images.png" if m == "nrr" else f"sweep_{m}_{name}_images.png")
        f = _image_rows({f"{name}={v}": sweep_dir(args.out, name, v, m) / "distilled" for v in values}, png)
        if f is not None:
            made.append(f)
    return made


def charts(args, study: dict) -> list:
    """accuracy_ipc.png (soft-label top-1 against IPC, a line per method) when the study
    has several IPCs; sweep_<name>.png (holdout top-1 against the swept value)."""
    from nrrdd.charts import line_chart

    made = []
    by_method = {}
    for r in study["rows"].values():
        if r["top1"].get("soft"):
            by_method.setdefault(r["method"], []).append((r["ipc"], r["top1"]["soft"]["mean"]))
    if len({ipc for pts in by_method.values() for ipc, _ in pts}) > 1:
        made.append(line_chart(by_method, args.out / "accuracy_ipc.png", title="Fashion-MNIST, ConvNet-3, soft labels",
                               xlabel="images per class (log scale)", ylabel="top-1 %", log_x=True))
    for sw in study.get("sweeps", []):
        method = sw.get("method", "nrr")
        modes = sw.get("label_modes", ["soft"])
        # the legend names the label mode; the title the method, IPC and split (the legend is narrow)
        lines = {f"{m} labels": [(q["value"], q["labels"][m]["mean"])
                                 for q in sw["points"] if m in q.get("labels", {})]
                 for m in modes}
        made.append(line_chart({k: v for k, v in lines.items() if v},
                               args.out / (f"sweep_{sw['name']}.png" if method == "nrr"
                                           else f"sweep_{method}_{sw['name']}.png"),
                               title=f"{method}, IPC {sw['ipc']}: top-1 on the holdout against {sw['name']}",
                               xlabel=sw["name"], ylabel="top-1 %"))
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, help="ConvNet-3 checkpoint from `nrrdd train-teacher`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--ipc", type=int, action="append", help="repeatable (default 1, 10, 50)")
    p.add_argument("--method", dest="methods", action="append", metavar="METHOD[@NAME=VALUE]",
                   help=f"repeatable: {', '.join(METHODS + tuple(EXTRA_METHODS))} (default: the five of the "
                        "paper's ablation; nrr-nolr adds nrr without L_lr), or one of them at a setting the "
                        "sweeps take, scored on the test set (nrr@cam_eps=0.3)")
    p.add_argument("--labels", default=",".join(LABELS), help="comma-separated label modes")
    p.add_argument("--seeds", type=int, default=3, help="students per label mode and distillation")
    p.add_argument("--distill-seeds", type=int, default=1,
                   help="distillations per (IPC, method), seeds 0..N-1 (`nrrdd run --seed`); seed k > 0 "
                        "goes to OUT/ipc<N>-<method>-seed<k>/, and the table pools every finished one")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--mipc", type=int, default=300)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--student-channels-last", action="store_true",
                   help="every student in the channels_last layout (nrrdd run --student-channels-last, "
                        "nrrdd evaluate --channels-last): float32 rounding apart the same students, "
                        "0.66-0.81x the time on the CPU")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="nrrdd run's --fast/--no-fast for every run (default nrrdd's: on for CUDA, off on the CPU, "
                        "where --fast takes about 0.66x the plain refinement step, in float32)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="values of cam_eps, r, alpha_lr, crop_min or factor to sweep for --sweep-method, scored on "
                        "held-out training images")
    p.add_argument("--sweep-method", default="nrr", choices=METHODS + tuple(EXTRA_METHODS),
                   help="the method the sweeps distil (nrr)")
    p.add_argument("--sweep-ipc", type=int, default=10)
    p.add_argument("--sweep-labels", default="soft",
                   help="comma-separated label modes the sweeps' students learn from (soft)")
    p.add_argument("--holdout-per-class", type=int, default=HOLDOUT_PER_CLASS,
                   help="training images per class held out for the sweeps (500 of Fashion-MNIST's 6000)")
    p.add_argument("--cross-student", dest="cross_students", action="append", default=[],
                   help="also evaluate the --cross-ipc set of --cross-method on this student arch "
                        "(repeatable)")
    p.add_argument("--cross-teacher", type=Path, default=None,
                   help="also distil --cross-method at --cross-ipc with this teacher, evaluated on ConvNet-3")
    p.add_argument("--swap-labels", action="store_true",
                   help="with --cross-teacher: each teacher's --cross-method set labelled by the other teacher")
    p.add_argument("--cross-method", default="nrr", choices=METHODS + tuple(EXTRA_METHODS),
                   help="the set the cross-architecture rows use (nrr)")
    p.add_argument("--cross-ipc", type=int, default=10, help="the IPC of that set (10)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (a GPU runs several small cells side by side; on a CPU give each "
                        "OMP_NUM_THREADS=cores/jobs)")
    p.add_argument("--record", type=Path, default=None,
                   help="merge the students of every distillation into this CSV "
                        "(docs/results/fashion_mnist_students.csv; see results_record.py)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--table-only", action="store_true", help="only rebuild study.md/json and the figures")
    args = p.parse_args(argv)
    args.ipc = args.ipc or [1, 10, 50]
    args.methods = args.methods or list(METHODS)
    for m in args.methods:
        try:
            split_method(m)
        except ValueError as e:
            p.error(f"--method: {e}")
    args.labels = [m for m in args.labels.split(",") if m]
    args.sweep_labels = [m for m in args.sweep_labels.split(",") if m]
    if args.distill_seeds < 1:
        p.error(f"--distill-seeds must be at least 1, got {args.distill_seeds}")
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if not args.sweep_labels or not set(args.sweep_labels) <= set(LABEL_MODES):
        p.error(f"--sweep-labels takes {', '.join(LABEL_MODES)} (comma-separated), got {','.join(args.sweep_labels)!r}")
    args.sweeps = []
    for spec in args.sweep:
        name, _, values = spec.partition("=")
        if name not in SWEEP_FLAGS or not values:
            p.error(f"--sweep takes NAME=V1,V2,... with NAME one of {', '.join(SWEEP_FLAGS)}, got {spec!r}")
        vals = [v for v in values.split(",") if v]
        for v in vals:
            try:
                ok = float(v) >= 0
            except ValueError:
                ok = False
            if not ok:
                p.error(f"--sweep {name}: {v!r} is not a non-negative number")
        if students_only(name, args.sweep_method) and "dbr" not in args.sweep_labels:
            p.error(f"for {args.sweep_method}, r reaches only the DBR students: add dbr to --sweep-labels")
        args.sweeps.append((name, vals))
    if args.swap_labels and args.cross_teacher is None:
        p.error("--swap-labels needs --cross-teacher (the other teacher)")
    if args.record is not None and args.record.exists():
        try:
            results_record.read(args.record)  # a record that does not parse is refused before any work
        except (ValueError, OSError) as e:
            p.error(f"--record: {e}")
    if not args.table_only:
        if args.teacher is None or not args.teacher.is_file():
            p.error("--teacher must name an existing checkpoint (train one with `nrrdd train-teacher`)")
        args.out.mkdir(parents=True, exist_ok=True)
        run_all(args)
        if args.dry_run:
            return 0
    study = collect(args, previous_summary(args))
    (args.out / "study.json").write_text(json.dumps(study, indent=1, sort_keys=True))
    (args.out / "study.md").write_text(table(study))
    for ipc in sorted({r["ipc"] for r in study["rows"].values()}):
        figure(args, study, ipc)
    sweep_figures(args)
    charts(args, study)
    print(table(study))
    if args.record is not None:
        try:
            added, replaced = results_record.merge(args.record, record_rows(study))
        except ValueError as e:  # another teacher's record: the runs stay; `--table-only --record OTHER` writes them
            print(f"error: --record: {e}", file=sys.stderr)
            return 2
        print(f"{args.record}: {added} rows added, {replaced} replaced")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
