"""``nrrdd run``: the whole pipeline — teacher → distill → relabel → evaluate — into one folder.

``OUT/teacher.pt`` (when no ``--teacher`` is given), ``OUT/distilled/`` (the
distilled set, ``labels_<mode>/``, ``eval_*.json``), ``OUT/report.md`` and
``OUT/run.json`` (settings, the time of each stage, the top-1 per label mode).

``--method`` picks the images, so the paper's ablations run under one protocol:

- ``nrr``: CIDD (lowest-confidence patches) + non-critical region refinement (default);
- ``cidd``: CIDD only, no refinement;
- ``rded``: highest-confidence patches (RDED's choice), no refinement;
- ``sre2l``: refinement with ``--mask none`` (all-pixel update);
- ``random``: random real training images.

``--images-from DIR`` skips the distillation: it copies another run's distilled set
(``images.pt``, ``labels.pt``, ``patches.pt``, ``config.json``) into ``OUT/distilled``
and labels it with this run's teacher. That makes the label-swap controls one command:
one teacher's images, another teacher's labels.

Every method's students see the same augmentation (the preset's
RandomResizedCrop scale (1/factor, 1), flip, CutMix).

Presets:

- ``quick``: for trying it out on a CPU (Fashion-MNIST in minutes): a ConvNet-3
  teacher trained 1 epoch (AdamW 2e-3, batch 64) on 8,000 training images (its
  accuracy is measured on 1,000 test images), IPC 10, CIDD on 40 images per
  class, 20 refinement iterations, ConvNet-3 students for 100 epochs, one seed.
  Student top-1 is on the full real test set. Measured on a shared 2-core CPU:
  see the README.
- ``paper``: Appendix A: ResNet-18 teacher (200 epochs, when not given), IPC 10,
  factor 2, mipc 300, 5 crops, 2000 iterations at batch 100, students trained
  300 epochs (AdamW 1e-3, wd 0.01, cosine, batch 100), 3 seeds. For a GPU.

Any preset value can be overridden by its flag.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from nrrdd.errors import UsageError

PRESETS = {
    "quick": {"teacher_arch": "convnet3", "teacher_epochs": 1, "teacher_train_images": 8000,
              "teacher_test_images": 1000, "teacher_optimizer": "adamw", "teacher_lr": 2e-3,
              "teacher_batch_size": 64, "ipc": 10, "iterations": 20, "mipc": 40, "num_crop": 5, "factor": 2,
              "batch_size": 100, "epochs": 100, "seeds": 1},
    "paper": {"teacher_arch": "resnet18", "teacher_epochs": 200, "teacher_train_images": None,
              "teacher_test_images": None, "teacher_optimizer": "sgd", "teacher_lr": None,
              "teacher_batch_size": 128, "ipc": 10, "iterations": 2000, "mipc": 300, "num_crop": 5,
              "factor": 2, "batch_size": 100, "epochs": 300, "seeds": 3},
}
METHODS = ("nrr", "cidd", "rded", "sre2l", "random")
LABEL_MODES = ("dbr", "soft", "compact", "onehot")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nrrdd.commands.evaluate import add_eval_split_arguments, add_student_speed_arguments

    p.add_argument("--dataset", required=True, help="fashion-mnist, cifar10, cifar100 or imagefolder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None, help="resize images (default: the dataset's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<dataset>-<method>-<preset>)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    p.add_argument("--method", choices=METHODS, default=None, help="how the images are made (default nrr)")
    p.add_argument("--images-from", type=Path, default=None, metavar="DISTILLED",
                   help="skip distillation: label this distilled folder's images (copied into OUT) with "
                        "this run's teacher")
    p.add_argument("--labels", default="dbr",
                   help="label mode(s) to evaluate, comma-separated: dbr, soft, compact, onehot")
    p.add_argument("--online", action="store_true", help="teacher labels computed during training")
    p.add_argument("--teacher", default=None, help="use this teacher checkpoint instead of training one")
    p.add_argument("--teacher-arch", default=None)
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--teacher-train-images", type=int, default=None,
                   help="train the teacher on a class-balanced subset of this many images")
    p.add_argument("--teacher-test-images", type=int, default=None,
                   help="measure the teacher's accuracy on a subset of this many test images")
    p.add_argument("--student", default=None, help="student arch (default: the teacher's)")
    p.add_argument("--ipc", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--mipc", type=int, default=None)
    p.add_argument("--factor", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="student epochs")
    p.add_argument("--seeds", type=int, default=None, help="students per label mode")
    # the default is nrrdd.cidd.CROP_SCALE, written out: building the parser imports no torch
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="area fraction of CIDD's random resized crops (%(default)s)")
    p.add_argument("--cam-eps", type=float, default=0.5, help="epsilon of the non-critical mask (Eq. 4)")
    p.add_argument("--label-refine", action=argparse.BooleanOptionalAction, default=True,
                   help="the label-refinement term L_lr in refinement (Eq. 11; the paper's DBR+LR)")
    p.add_argument("--r", type=float, default=0.4,
                   help="hinge margin r of label refinement (Eq. 12) and of the DBR loss (Eqs. 9-10)")
    p.add_argument("--alpha-lr", type=float, default=1.0,
                   help="weight of the label-refinement term L_lr in refinement (Eq. 11; the paper's 1)")
    add_eval_split_arguments(p)
    add_student_speed_arguments(p, prefix="student-")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-ddranking", action="store_true",
                   help="also write OUT/ddranking/{images,labels,soft_labels}.pt")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast refine path of `nrrdd distill --fast` (default: on for CUDA)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _subset(ds, n: int | None, seed: int):
    """A class-balanced random subset of ``n`` images of an ImageSet (all when n is None)."""
    import torch

    from nrrdd.augment import generator

    if n is None or n >= len(ds):
        return ds
    g = generator(seed, 7)
    per = max(1, n // ds.num_classes)
    idx = torch.cat([c[torch.randperm(len(c), generator=g)[:per]]
                     for c in (ds.class_indices(k) for k in range(ds.num_classes))]).sort().values
    return ds.subset(idx)


def _random_real(train, ipc: int, seed: int, out: Path, teacher_meta: dict, data_dir, factor: int,
                 holdout_per_class: int = 0) -> None:
    """``--method random``: ``ipc`` random real training images per class, teacher-normalised."""
    import torch

    from nrrdd.augment import generator
    from nrrdd.data import normalize
    from nrrdd.distilled_set import save_distilled
    from nrrdd.teacher import teacher_record

    g = generator(seed, 11)
    counts = train.class_counts()
    if int(counts.min()) < ipc:
        raise UsageError(f"--ipc {ipc} is larger than the {int(counts.min())} images of the smallest class")
    idx = torch.cat([train.class_indices(c)[torch.randperm(int(counts[c]), generator=g)[:ipc]]
                     for c in range(train.num_classes)])
    mean, std = teacher_meta.get("mean") or list(train.mean), teacher_meta.get("std") or list(train.std)
    images = normalize(train.get(idx), mean, std)
    config = {"format": "nrrdd-random-v1", "method": "random", "dataset": train.name,
              "data_dir": None if data_dir is None else str(Path(data_dir).resolve()), "ipc": ipc,
              "num_classes": train.num_classes, "classes": train.classes, "mean": list(mean),
              "holdout_per_class": holdout_per_class,
              "std": list(std), "seed": seed, "factor": factor, "source_indices": idx.tolist(),
              "teacher": teacher_record(teacher_meta)}
    save_distilled(out, images, train.labels[idx], config)


def _images_source(args: argparse.Namespace, P: dict):
    """``--images-from``: the distilled set to label, checked against the flags. The
    settings that made its images come from it (method, IPC, factor); a flag that
    would change them is refused, as is a holdout the set was not made without."""
    from nrrdd.distilled_set import load_distilled

    source = load_distilled(args.images_from)
    cfg = source.config
    if cfg.get("dataset") and cfg["dataset"] != args.dataset:
        raise UsageError(f"--images-from {source.path} holds {cfg['dataset']} images, not {args.dataset}")
    made = [f"--{k}" for k in ("iterations", "mipc") if getattr(args, k) is not None]
    if made:
        raise UsageError(f"{' and '.join(made)} set how images are distilled; --images-from takes "
                         f"{source.path}'s as they are")
    ipc = cfg.get("ipc") or len(source) // source.num_classes
    for flag, given, have in (("--method", args.method, cfg.get("method")), ("--ipc", args.ipc, ipc),
                              ("--factor", args.factor, cfg.get("factor"))):
        if given is not None and have is not None and given != have:
            raise UsageError(f"{flag} {given}, but the --images-from set was made with {flag} {have}")
    held = args.holdout_per_class if args.eval_split == "holdout" else 0
    if held and int(cfg.get("holdout_per_class") or 0) != held:
        raise UsageError(f"--eval-split holdout scores on {held} held-out images per class, but "
                         f"{source.path} was made with holdout_per_class {cfg.get('holdout_per_class', 0)}")
    args.method = args.method or cfg.get("method") or "imported"
    P.update(ipc=int(ipc), factor=int(args.factor or cfg.get("factor") or P["factor"]),
             iterations=0, mipc=None)
    return source


def run(args: argparse.Namespace) -> int:
    import torch

    from nrrdd import storage
    from nrrdd.commands.evaluate import prepare
    from nrrdd.devices import StageMeter, resolve_device
    from nrrdd.data import DATASETS, holdout_split, load_split
    from nrrdd.distill import DistillSettings, check_crop_scale, distill
    from nrrdd.distilled_set import export_ddranking, import_distilled, load_distilled
    from nrrdd.models import known_arch
    from nrrdd.relabel import default_augment, relabel
    from nrrdd.report import report
    from nrrdd.teacher import load_teacher, partial_path, save_teacher, teacher_record, train_teacher

    P = dict(PRESETS[args.preset])
    source = _images_source(args, P) if args.images_from is not None else None
    args.method = args.method or "nrr"
    for key in ("teacher_arch", "teacher_epochs", "teacher_train_images", "teacher_test_images", "ipc",
                "iterations", "mipc", "factor", "epochs", "seeds"):
        if getattr(args, key) is not None:
            P[key] = getattr(args, key)
    modes = [m.strip() for m in args.labels.split(",") if m.strip()]
    bad = [m for m in modes if m not in LABEL_MODES]
    if not modes or bad:
        raise UsageError(f"--labels takes {', '.join(LABEL_MODES)} (comma-separated), got {args.labels!r}")
    if args.online and "onehot" in modes:
        raise UsageError("--online needs teacher label modes, not onehot")
    for key in ("teacher_epochs", "teacher_train_images", "teacher_test_images", "ipc", "factor", "epochs",
                "seeds", "mipc"):
        if P[key] is not None and P[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {P[key]}")
    if P["iterations"] < 0:
        raise UsageError("--iterations must be >= 0")
    if args.seed < 0:
        raise UsageError("--seed must be non-negative")
    for flag, v in (("--cam-eps", args.cam_eps), ("--r", args.r), ("--alpha-lr", args.alpha_lr)):
        if not (0 <= v < float("inf")):
            raise UsageError(f"{flag} must be a finite number >= 0, got {v}")
    check_crop_scale(*args.crop_scale)
    if args.eval_split == "holdout" and args.holdout_per_class < 1:
        raise UsageError(f"--holdout-per-class must be at least 1, got {args.holdout_per_class}")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r} (choose from {', '.join(DATASETS)})")
    if args.resume and args.force:
        raise UsageError("--resume and --force exclude each other")
    if args.teacher is None and not known_arch(P["teacher_arch"]):
        raise UsageError(f"unknown teacher arch {P['teacher_arch']!r}")
    if args.student is not None and not known_arch(args.student):
        raise UsageError(f"unknown student arch {args.student!r}")
    device = resolve_device(args.device)
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-{args.preset}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.force):
        raise UsageError(f"{out} is not empty: --resume to continue the run there, --force to redo it")
    if source is not None:  # checked here: --force below would delete a source inside OUT
        dist = out / "distilled"
        if out.resolve() in source.path.resolve().parents:
            raise UsageError(f"--images-from {source.path} is inside this run's --out {out}")
        if (args.resume and (dist / "images.pt").is_file()
                and load_distilled(dist).fingerprint() != source.fingerprint()):
            raise UsageError(f"{dist} holds other images than --images-from {source.path}: "
                             "rerun with --force to copy them again")
    if args.force and out.is_dir():
        import shutil

        for name in ("teacher.pt", "teacher.pt.partial", "distilled", "ddranking", "run.json", "report.md"):
            t = out / name
            shutil.rmtree(t) if t.is_dir() else t.unlink(missing_ok=True)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    t_all = time.perf_counter()
    meter = StageMeter(device)
    timings = meter.seconds
    # data (fails early on a missing folder)
    train = load_split(args.dataset, args.data_dir, "train", args.image_size)
    test = load_split(args.dataset, args.data_dir, "test", args.image_size)
    held = args.holdout_per_class if args.eval_split == "holdout" else 0
    if held:  # the teacher, CIDD and random selection never see the held-out images
        train = holdout_split(train, held)[0]
        say(f"holding out {held} training images per class to score the students on")

    counts = train.class_counts()
    smallest = int(counts.min())
    if P["ipc"] > smallest:
        raise UsageError(f"--ipc {P['ipc']} is larger than the {smallest} images of the smallest class")
    if args.method != "random" and source is None:
        from nrrdd.cidd import pool_size

        need, have = P["ipc"] * P["factor"] ** 2, pool_size(smallest, P["mipc"], 1, P["num_crop"])
        if have < need:
            raise UsageError(f"CIDD needs {need} patches per class (ipc x factor^2) but the smallest class "
                             f"pools only {have}: raise --mipc or lower --factor/--ipc")

    # 1. teacher
    meter.start()
    if args.teacher is not None:
        teacher_path = Path(args.teacher)
        teacher, meta = load_teacher(teacher_path, device)
    else:
        teacher_path = out / "teacher.pt"
        if args.resume and teacher_path.is_file():
            teacher, meta = load_teacher(teacher_path, device)
            say(f"teacher: reusing {teacher_path}")
        else:
            tr = _subset(train, P["teacher_train_images"], args.seed)
            te = _subset(test, P["teacher_test_images"], args.seed)
            say(f"teacher: training {P['teacher_arch']} for {P['teacher_epochs']} epoch(s) on "
                f"{len(tr)} images")
            # the state after each epoch, so --resume continues an interrupted training
            partial = partial_path(teacher_path)
            model, meta = train_teacher(P["teacher_arch"], tr, te, epochs=P["teacher_epochs"], device=device,
                                        seed=args.seed, optimizer=P["teacher_optimizer"], lr=P["teacher_lr"],
                                        batch_size=P["teacher_batch_size"], quiet=args.quiet,
                                        log=say, checkpoint=partial)
            meta.update(train_images=len(tr), test_images=len(te),
                        data_dir=None if args.data_dir is None else str(Path(args.data_dir).resolve()))
            save_teacher(model, meta, teacher_path)
            partial.unlink(missing_ok=True)
            teacher, meta = load_teacher(teacher_path, device)
    if int(meta["num_classes"]) != train.num_classes or int(meta["in_channels"]) != train.in_channels:
        raise UsageError(f"teacher {teacher_path} ({meta['num_classes']} classes, {meta['in_channels']} "
                         f"channels) does not fit {args.dataset}")
    student = args.student or meta["arch"]
    meter.stop("teacher")
    acc = meta.get("test_accuracy")
    say(f"teacher: {meta['arch']}" + (f", test accuracy {acc:.4f}" if acc is not None else ""))

    # 2. distilled images
    meter.start()
    dist = out / "distilled"
    if source is not None:
        if not (args.resume and (dist / "images.pt").is_file()):
            import_distilled(source, dist)
    elif args.method == "random":
        if not (args.resume and (dist / "images.pt").is_file()):
            train.mean, train.std = tuple(meta.get("mean") or train.mean), tuple(meta.get("std") or train.std)
            _random_real(train, P["ipc"], args.seed, dist, meta, args.data_dir, P["factor"], held)
    else:
        iterations = 0 if args.method in ("cidd", "rded") else P["iterations"]
        settings = DistillSettings(
            dataset=args.dataset, teacher=str(teacher_path), ipc=P["ipc"], out=str(dist),
            data_dir=args.data_dir, image_size=args.image_size, iterations=iterations, factor=P["factor"],
            mipc=P["mipc"], num_crop=P["num_crop"], select="highest" if args.method == "rded" else "lowest",
            mask="none" if args.method == "sre2l" else "cam", batch_size=P["batch_size"], seed=args.seed,
            device=str(device), method=args.method, quiet=args.quiet, fast=args.fast,
            cam_eps=args.cam_eps, r=args.r, alpha_lr=args.alpha_lr, holdout_per_class=held,
            label_refine=args.label_refine, crop_min_scale=args.crop_scale[0], crop_max_scale=args.crop_scale[1])
        distill(settings, resume=args.resume, log=say)
    ds = load_distilled(dist)
    meter.stop("distill")
    # the refinement of every batch, whichever process ran it (a resumed run's "distill" is its last process's)
    timings["refine_work"] = float((ds.config.get("timings") or {}).get("refine_work") or 0.0)
    say(f"distilled: {len(ds)} images ({args.method}) in {timings['distill']:.0f}s -> {dist}")

    # 3. labels, 4. students
    augment = default_augment(ds, P["batch_size"], "cutmix", 1.0 / P["factor"])
    results = {}
    timings["relabel"], timings["evaluate"] = 0.0, 0.0
    for mode in modes:
        if not args.online:
            meter.start()
            m = relabel(ds, teacher, meta, mode, P["epochs"], seed=args.seed, augment=augment, device=device,
                        resume=args.resume, quiet=args.quiet, log=say)
            meter.stop("relabel")
            say(f"labels: {mode}, {m['bytes_stored']} bytes ({m['bytes_per_image_per_epoch']} per image "
                f"per epoch)")
        meter.start()
        ns = argparse.Namespace(
            distilled=str(dist), dataset=args.dataset, data_dir=args.data_dir, student=student, labels=mode,
            online=args.online, teacher=str(teacher_path), epochs=P["epochs"], seeds=P["seeds"],
            seed=args.seed, batch_size=P["batch_size"], mix="cutmix", min_scale=1.0 / P["factor"],
            temperature=None, lr=1e-3, weight_decay=0.01, device=str(device), resume=args.resume,
            quiet=args.quiet, eval_split=args.eval_split, holdout_per_class=args.holdout_per_class,
            dbr_r=args.r, channels_last=args.student_channels_last, bf16=args.student_bf16)
        res = prepare(ns, extra={"method": args.method, "preset": args.preset})()
        meter.stop("evaluate")
        results[mode] = res
    if args.export_ddranking:
        export_ddranking(ds, out / "ddranking", teacher, str(device))
    timings["total"] = time.perf_counter() - t_all
    table = report([dist])
    storage.write_bytes(table.encode(), out / "report.md")
    storage.write_json({
        "dataset": args.dataset, "preset": args.preset, "method": args.method, "settings": P,
        "seed": args.seed, "student": student, "device": str(device), "online": args.online,
        "teacher": {**teacher_record(meta), "train_images": meta.get("train_images"),
                    "test_images": meta.get("test_images")},
        "top1": {m: r["top1"] for m, r in results.items()},
        "top1_mean": {m: r["top1_mean"] for m, r in results.items()},
        "top1_std": {m: r["top1_std"] for m, r in results.items()},
        "label_bytes": {m: r["label_bytes"] for m, r in results.items()},
        "seconds": timings, "gpu_peak_GiB": meter.gpu_peaks(), "torch_version": torch.__version__,
        "fast": ds.config.get("run", {}).get("fast"), "eval_split": args.eval_split,
        "holdout_per_class": held, "cam_eps": args.cam_eps, "r": args.r, "label_refine": args.label_refine,
        "alpha_lr": args.alpha_lr, "crop_scale": list(args.crop_scale),
        "images_from": None if source is None else str(source.path.resolve()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }, out / "run.json")
    say(table.rstrip())
    for mode, r in results.items():
        print(f"top-1 ({args.method}, IPC {P['ipc']}, {mode}{' online' if args.online else ''} labels, "
              f"{student}): {r['top1_mean']:.2f} ± {r['top1_std']:.2f}% "
              f"[{timings['total']:.0f}s total] -> {out}")
    return 0
