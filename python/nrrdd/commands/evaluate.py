"""``nrrdd evaluate``: train fresh students on a distilled set, report real test top-1 (``nrrdd.student``).

Every check (folders, label manifest vs. seed/epochs/images, teacher and test set
vs. the distilled set, the student arch) runs before any training.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nrrdd.errors import UsageError


def add_eval_split_arguments(p: argparse.ArgumentParser) -> None:
    """--eval-split / --holdout-per-class (shared with `nrrdd run`)."""
    from nrrdd.data import HOLDOUT_PER_CLASS

    p.add_argument("--eval-split", choices=("test", "holdout"), default="test",
                   help="score students on the real test set, or on training images held out of "
                        "distillation (for choosing settings without the test set)")
    p.add_argument("--holdout-per-class", type=int, default=HOLDOUT_PER_CLASS,
                   help=f"training images per class held out for --eval-split holdout ({HOLDOUT_PER_CLASS})")


def add_student_speed_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--channels-last / --bf16 (`nrrdd run`: --student-channels-last / --student-bf16)."""
    p.add_argument(f"--{prefix}channels-last", action="store_true",
                   help="train the students in the channels_last layout: the same training to float32 "
                        "rounding, 0.81x the time per epoch at IPC 10 and 0.66x at IPC 50 "
                        "(ConvNet-3, one CPU thread; benchmarks/bench_student.py)")
    p.add_argument(f"--{prefix}bf16", action="store_true",
                   help="train the students under bfloat16 autocast (for GPUs and CPUs with AMX; "
                        "slower on other CPUs); the evaluation's name gains -bf16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distilled", required=True, help="distilled folder (images.pt, labels.pt, config.json)")
    p.add_argument("--dataset", default=None, help="dataset of the real test set (default: config.json's)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: config.json's)")
    p.add_argument("--student", required=True, help="student arch (may differ from the teacher's)")
    p.add_argument("--labels", required=True, choices=("dbr", "soft", "onehot", "compact"))
    p.add_argument("--online", action="store_true",
                   help="run the teacher during training instead of reading stored labels")
    p.add_argument("--teacher", default=None, help="teacher for --online (default: config.json's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="student epochs (default: the labels' epoch count, else 300)")
    p.add_argument("--seeds", type=int, default=3, help="students to train (init seeds 0..N-1)")
    p.add_argument("--seed", type=int, default=None,
                   help="augmentation replay seed (default: the labels' seed, else 0)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="for --online / onehot without a labels folder")
    p.add_argument("--mix", choices=("cutmix", "mixup", "none"), default="cutmix",
                   help="for --online / onehot without a labels folder")
    p.add_argument("--min-scale", type=float, default=None,
                   help="for --online / onehot without a labels folder (default 1/factor)")
    p.add_argument("--temperature", type=float, default=None,
                   help="soft-label temperature (default 20 with CutMix, 4 with Mixup)")
    add_eval_split_arguments(p)
    p.add_argument("--dbr-r", type=float, default=None, help="hinge margin r of the DBR loss (0.4)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    add_student_speed_arguments(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the per-seed checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-seed lines")


def prepare(args: argparse.Namespace, extra: dict | None = None):
    """Validate everything and return a zero-argument callable that runs the evaluation."""
    from nrrdd import distributed as D
    from nrrdd import labels as L
    from nrrdd.augment import AugmentConfig
    from nrrdd.devices import resolve_device
    from nrrdd.data import holdout_split, load_split
    from nrrdd.distilled_set import load_distilled
    from nrrdd.models import build_model, known_arch
    from nrrdd.relabel import check_teacher_fits, default_augment, resolve_teacher_path
    from nrrdd.student import DBR_R, EPOCHS, OnlineLabels, StoredLabels, evaluate, no_labels
    from nrrdd.teacher import load_teacher

    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if args.online and args.labels == "onehot":
        raise UsageError("--online needs a teacher label mode (dbr, soft or compact), not onehot")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError("--temperature must be positive")
    split = getattr(args, "eval_split", "test")
    dbr_r = DBR_R if getattr(args, "dbr_r", None) is None else float(args.dbr_r)
    if not dbr_r >= 0:
        raise UsageError(f"--dbr-r must be >= 0, got {dbr_r}")
    device = resolve_device(D.local_device(args.device))
    ds = load_distilled(args.distilled)
    dataset = args.dataset or ds.config.get("dataset")
    if dataset is None:
        raise UsageError(f"{ds.path}/config.json names no dataset: give --dataset")
    if args.dataset and ds.config.get("dataset") and args.dataset != ds.config["dataset"]:
        raise UsageError(f"the distilled set comes from {ds.config['dataset']}, not {args.dataset}")
    if not known_arch(args.student):
        raise UsageError(f"unknown student arch {args.student!r}")

    store = L.LabelStore(ds.path, args.labels)
    manifest = None
    if not args.online and (args.labels in L.STORED_MODES or store.exists()):
        manifest = store.manifest()
        L.check_manifest(manifest, mode=args.labels, num_images=len(ds), fingerprint=ds.fingerprint(),
                         num_classes=manifest.get("num_classes"), seed=args.seed, epochs=args.epochs,
                         where=store.path)
        if not manifest.get("complete"):
            raise UsageError(f"{store.path} is incomplete ({manifest.get('epochs_done')}/"
                             f"{manifest.get('epochs')} epochs): rerun `nrrdd relabel ... --resume`")
        augment = AugmentConfig.from_dict(manifest["augment"])
        replay_seed, epochs = int(manifest["seed"]), int(manifest["epochs"])
        num_classes = int(manifest["num_classes"])
    else:
        if args.batch_size < 1:
            raise UsageError("--batch-size must be positive")
        augment = default_augment(ds, args.batch_size, args.mix, args.min_scale)
        replay_seed = 0 if args.seed is None else args.seed
        epochs = EPOCHS if args.epochs is None else args.epochs
        num_classes = None
    if replay_seed < 0:
        raise UsageError("--seed must be non-negative")

    temperature = args.temperature or L.DEFAULT_TEMPERATURE[augment.mix]
    if manifest is not None and args.labels == "compact":
        if args.temperature is not None and args.temperature != manifest["temperature"]:
            raise UsageError(f"compact labels were stored at temperature {manifest['temperature']}")
        temperature = float(manifest["temperature"])

    teacher_sha256 = None
    if args.online:
        model, meta = load_teacher(resolve_teacher_path(ds, args.teacher), device)
        check_teacher_fits(meta, ds)
        num_classes = int(meta["num_classes"])
        targets = OnlineLabels(model, args.labels, temperature)
        teacher_sha256 = meta["sha256"]
    elif manifest is not None and args.labels != "onehot":
        targets = StoredLabels(store, manifest, device)
    else:
        targets = no_labels

    data_dir = args.data_dir or ds.config.get("data_dir")
    if split == "holdout":
        held = int(args.holdout_per_class)
        made_with = ds.config.get("holdout_per_class")
        if made_with != held:
            raise UsageError(f"--eval-split holdout scores on {held} training images per class held out, "
                             f"but {ds.path} was made with holdout_per_class={made_with}: the distilled "
                             "images may come from the images scored on")
        test = holdout_split(load_split(dataset, data_dir, "train", image_size=ds.image_size), held)[1]
    else:
        test = load_split(dataset, data_dir, "test", image_size=ds.image_size)
    if num_classes is None:
        num_classes = int(ds.config.get("num_classes") or test.num_classes)
    if test.num_classes != num_classes:
        raise UsageError(f"the {dataset} test set has {test.num_classes} classes, the labels {num_classes}")
    if test.in_channels != ds.in_channels:
        raise UsageError(f"the {dataset} test set has {test.in_channels} channels, the distilled "
                         f"images {ds.in_channels}")
    if int(ds.labels.max()) >= num_classes:
        raise UsageError(f"the distilled set has label {int(ds.labels.max())}, "
                         f"the data {num_classes} classes")
    build_model(args.student, num_classes, ds.in_channels, ds.image_size)  # fails here, not mid-run
    mean = ds.config.get("mean") or list(test.mean)
    std = ds.config.get("std") or list(test.std)

    def go() -> dict:
        return evaluate(ds, arch=args.student, mode=args.labels, test_set=test, epochs=epochs,
                        seeds=args.seeds, augment=augment, replay_seed=replay_seed, targets=targets,
                        num_classes=num_classes, mean=mean, std=std, online=args.online,
                        temperature=temperature, dbr_r=dbr_r, split=split,
                        label_manifest=manifest, device=device,
                        resume=args.resume, quiet=args.quiet, lr=args.lr,
                        weight_decay=args.weight_decay, extra=extra,
                        default_augment=default_augment(ds) if manifest is None else None,
                        channels_last=args.channels_last, bf16=args.bf16, teacher_sha256=teacher_sha256,
                        log=(lambda s: None) if args.quiet or not D.is_main() else print)
    return go


def run(args: argparse.Namespace) -> int:
    from nrrdd import distributed as D
    from nrrdd.student import eval_name

    result = prepare(args)()
    if not D.is_main():
        return 0
    name = eval_name(args.labels, args.student, args.online, args.eval_split, result["variant"])
    out = Path(args.distilled) / f"{name}.json"
    print(f"{args.student} on {args.labels}{' (online)' if args.online else ''} labels: top-1 "
          f"{result['top1_mean']:.2f} ± {result['top1_std']:.2f}% over {len(result['top1'])} "
          f"seed(s), last epoch of {result['epochs']} ({result['seconds']:.0f}s) -> {out}")
    return 0
