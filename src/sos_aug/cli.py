"""``sos-aug``: build and inspect banks, preview CopyPaste, run the embedded demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .allocator import keep_freed_memory


def say(text: str, enabled: bool = True) -> None:
    """A line on stderr saying what a command is doing (every phase over a second or two says it)."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


def _bank_build(args) -> int:
    from .bank import build_bank, coco_source, merge_banks, rgba_tree_source, xpaste_source

    chosen = [x for x in (args.coco, args.rgba_tree, args.xpaste, args.merge) if x]
    if len(chosen) != 1:
        raise SystemExit("bank build: give exactly one of --coco, --rgba-tree, --xpaste, --merge")
    if args.merge:
        report = merge_banks(args.out, args.merge, progress=not args.quiet)
        print(json.dumps(report, indent=1))
        return 0
    if args.coco:
        if not args.images:
            raise SystemExit("bank build --coco needs --images DIR")
        cats = args.categories.split(",") if args.categories else None
        source = coco_source(args.coco, args.images, min_area=args.min_area, categories=cats)
    elif args.rgba_tree:
        source = rgba_tree_source(args.rgba_tree, metadata=args.metadata, flags=args.flags)
    else:
        source = xpaste_source(args.xpaste, categories_from=args.categories_from)
    report = build_bank(args.out, source, workers=args.workers, strict=args.strict, progress=not args.quiet,
                        ray_address=args.ray)
    print(f"added {report['added']} segments to {args.out}")
    if report["skipped"]:
        print("skipped (images for image faults, annotations otherwise; all examples in meta.json):")
        for reason, count in sorted(report["skipped"].items()):
            example = (report.get("skipped_examples", {}).get(reason) or ["?"])[0]
            print(f"  {reason}={count}, e.g. {example}")
    return 0


def _bank_info(args) -> int:
    from .bank import SegmentBank

    info = SegmentBank(args.bank).info()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{info['path']}: {info['num_segments']} segments, {info['num_categories']} categories, "
              f"{info['bytes'] / 1e6:.1f} MB of shards")
        ranked = sorted(info["categories"], key=lambda c: -c["count"])
        for c in ranked[: args.top]:
            print(f"  {c['count']:8d}  {c['name']} (id {c['id']})")
        if len(ranked) > args.top:
            print(f"  ... and {len(ranked) - args.top} more categories (--top N to list more, --json for all)")
        if info["skipped"]:
            print("skipped at build: " + ", ".join(f"{k}={v}" for k, v in sorted(info["skipped"].items())))
    return 0


def _bank_show(args) -> int:
    from .bank import SegmentBank
    from .preview import contact_sheet

    path = contact_sheet(SegmentBank(args.bank), args.out, n=args.n, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _preview(args) -> int:
    say("preview: loading torch ...", not args.quiet)
    from .preview import preview_coco

    path = preview_coco(args.bank, args.coco, args.images, args.out, n=args.n, seed=args.seed, layout=args.layout,
                        feather=args.feather, relight=args.relight, weights=args.weights, sampling=args.sampling,
                        reference=args.reference, t=args.t, referring=args.referring, progress=not args.quiet)
    what = ("each augmented image without (left) and with relighting (right)" if args.relight not in (None, "none")
            else "augmented images with referring expressions and their targets' boxes" if args.referring
            else "each original left of its augmented copy")
    print(f"wrote {path} ({what}; pasted instances in magenta, marked '+')")
    return 0


def _demo(args) -> int:
    say("demo: starting (loading torch) ...", not args.quiet)
    from .bank import build_bank, coco_source
    from .demo import make_synthetic_coco
    from .preview import preview_coco

    out = Path(args.out)
    if args.coco:
        ann, images = Path(args.coco), Path(args.images)
        print(f"using your data: {ann}")
    else:
        say(f"demo: drawing a synthetic COCO-format set of {args.images_n} images (the embedded default) ...",
            not args.quiet)
        ann = make_synthetic_coco(out / "data", n_images=args.images_n, seed=args.seed)
        images = ann.parent / "images"
        print(f"drew a synthetic COCO-format set of {args.images_n} images in {ann.parent} (embedded default)")
    report = build_bank(out / "bank", coco_source(ann, images), workers=args.workers, progress=not args.quiet)
    print(f"bank: {out / 'bank'} (+{report['added']} segments)")
    path = preview_coco(out / "bank", ann, images, out / "preview.png", n=args.n, seed=args.seed, layout=args.layout,
                   progress=not args.quiet)
    print(f"preview: {path}")
    return 0


def _relight_train(args) -> int:
    import torch

    from .relight.training.train import train_relight_net

    torch.set_num_threads(args.threads)
    teacher = None
    if args.teacher:
        from .relight.training.teacher import ICLightTeacher

        teacher = ICLightTeacher.from_local(args.teacher)
    try:
        report = train_relight_net(args.coco, args.images, args.out, minutes=args.minutes, seed=args.seed,
                                   teacher=teacher, progress=not args.quiet, device=args.device,
                                   workers=args.workers, resume=args.resume, max_steps=args.max_steps)
    except KeyboardInterrupt:
        state = Path(args.out).with_suffix(".resume.pt")
        if state.is_file():
            print(f"interrupted: training state in {state}; the same command with --resume goes on", file=sys.stderr)
        return 130
    if report.skipped.counts:
        print(f"skipped: {report.skipped}")
    print(f"saved {args.out} (best held-out fMSE {report.best_val_fmse * 255**2:.1f} at step {report.best_step} "
          f"of {report.steps}); loss curve {Path(args.out).with_suffix('.png')}")
    return 0


def _relight_iclight(args) -> int:
    from .relight.training.teacher import assemble_iclight

    print(f"wrote {assemble_iclight(args.sd15, args.offsets, args.out)} (use it as --teacher)")
    return 0


def _relight_eval(args) -> int:
    import torch

    from .relight.net import RelightNet
    from .relight.training.evaluate import evaluate, format_table

    torch.set_num_threads(args.threads)
    net = RelightNet.load(args.weights) if args.weights else RelightNet.pretrained()
    result = evaluate(args.coco, args.images, net=net, min_area=args.min_area, seed=args.seed,
                      limit=args.limit, with_oracle=not args.no_oracle, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _split(args) -> int:
    from .split import write_splits

    for path in write_splits(args.coco, args.out, args.percent, args.fold, args.stem):
        print(path)
    return 0


def _refer(args) -> int:
    say(f"refer: loading torch and reading {args.coco} ...", not args.quiet)
    from .refer import refer_coco

    result = refer_coco(args.coco, args.images, args.out, args.bank, args.paste, args.per_kind, args.limit,
                        args.seed, args.layout, tuple(args.num), progress=not args.quiet, split=args.split,
                        review=args.review)
    print(f"{result['images']} images, expressions by kind: " +
          ", ".join(f"{k}={v}" for k, v in result["expressions"].items()))
    for path in result["files"].values():
        print(path)
    return 0


def _synthesize(args) -> int:
    say(f"synthesize: loading torch and opening the bank {args.bank} ...", not args.quiet)
    from .synthesis import SynthesisConfig, synthesize

    if args.backgrounds and args.plain:
        raise ValueError("choose --backgrounds DIR or --plain, not both")
    config = SynthesisConfig(
        num_images=args.num_images, size=args.size, layout=args.layout, pastes=tuple(args.pastes),
        relight=None if args.relight == "none" else args.relight, referring=args.referring,
        backgrounds=args.backgrounds, seed=args.seed, shard_size=args.shard_size,
        categories=args.categories.split(",") if args.categories else None, sampling=args.sampling,
        single_category=args.single_category, min_visible=args.min_visible, image_format=args.format)
    report = synthesize(args.bank, args.out, config, reference=args.reference, progress=not args.quiet,
                        workers=args.workers, ray_address=args.ray)
    print(f"{report['images']} images, {report['annotations']} instances"
          + (f", {report['expressions']} referring expressions" if "expressions" in report else "")
          + f" in {args.out} (instances.json, panoptic.json" + (", grounding/" if args.referring else "") + ")")
    return 0


def _generate(args) -> int:
    from .bank import build_bank, rgba_tree_source
    from .generate import CutoutRules, generate_segments, load_pipeline

    cats_text = Path(args.categories).read_text()
    categories = json.loads(cats_text) if args.categories.endswith(".json") else \
        [line.strip() for line in cats_text.splitlines() if line.strip()]
    prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else None
    tree = Path(args.work or f"{args.out}-segments")
    pipe = load_pipeline(args.model, args.device)
    report = generate_segments(pipe, categories, args.per_category, tree, prompts, args.per_prompt, args.size,
                               args.steps, args.seed, CutoutRules(threshold=args.threshold), progress=not args.quiet)
    print(f"kept {report['kept']} segments; rejected: "
          + (", ".join(f"{k}={v}" for k, v in sorted(report["rejected"].items())) or "none"))
    if report["kept"]:
        built = build_bank(args.out, rgba_tree_source(tree, metadata=tree / "metadata.json"), progress=not args.quiet)
        print(f"added {built['added']} segments to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sos-aug", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    bank = sub.add_parser("bank", help="build and inspect segment banks").add_subparsers(dest="bank_cmd", required=True)
    b = bank.add_parser("build", help="build a bank, or add to one (resumes an interrupted build)")
    b.add_argument("--out", required=True, help="bank directory")
    b.add_argument("--coco", help="COCO or LVIS instances JSON")
    b.add_argument("--images", help="image folder for --coco")
    b.add_argument("--min-area", type=int, default=1, help="smallest mask area in pixels (--coco)")
    b.add_argument("--categories", help="comma-separated names or ids to keep (--coco)")
    b.add_argument("--rgba-tree", help="SOS layout: category/sub_category/ID.png")
    b.add_argument("--metadata", help="SOS metadata JSON keyed '{category}_{sub_category}' (--rgba-tree)")
    b.add_argument("--flags", help="per-segment quality flags JSON (--rgba-tree)")
    b.add_argument("--xpaste", help="X-Paste/DiverGen pool JSON {category_id: [paths]}")
    b.add_argument("--categories-from", help="COCO/LVIS JSON naming the pool's ids (--xpaste)")
    b.add_argument("--merge", nargs="+", help="banks to add to --out")
    b.add_argument("--workers", type=int, default=1, help="processes that read images and cut segments")
    b.add_argument("--ray", nargs="?", const="local", help="read and cut as Ray tasks: on a running cluster at "
                   "ADDRESS, or a local Ray without one (pip install sos-aug[ray])")
    b.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_bank_build)

    i = bank.add_parser("info", help="segments and categories of a bank")
    i.add_argument("bank", help="bank directory")
    i.add_argument("--json", action="store_true", help="everything, as JSON")
    i.add_argument("--top", type=int, default=20, help="categories to list, most segments first")
    i.set_defaults(func=_bank_info)

    s = bank.add_parser("show", help="a contact sheet of random segments")
    s.add_argument("bank", help="bank directory")
    s.add_argument("--out", required=True, help="contact sheet PNG to write")
    s.add_argument("--n", type=int, default=48, help="segments on the sheet")
    s.add_argument("--seed", type=int, default=0, help="which segments (a seeded draw)")
    s.set_defaults(func=_bank_show)

    sp = sub.add_parser("split", help="low-data training splits, the same images as mmdetection's split_coco.py draws",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--coco", required=True, help="COCO instances JSON to split")
    sp.add_argument("--percent", type=float, nargs="+", default=[1.0], help="labelled percentages")
    sp.add_argument("--fold", type=int, nargs="+", default=[1], help="folds (each the split's seed)")
    sp.add_argument("--out", required=True, help="folder for {stem}.{fold}@{percent}.json and ...-unlabeled.json")
    sp.add_argument("--stem", default="instances_train2017", help="file name stem")
    sp.set_defaults(func=_split)

    rf = sub.add_parser("refer", help="verified referring expressions for a COCO set, as it is or after pasting, "
                        "written as ODVG, gRefCOCO and RefCOCO", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rf.add_argument("--coco", required=True, help="COCO instances JSON")
    rf.add_argument("--images", required=True, help="its image folder")
    rf.add_argument("--out", required=True, help="output folder")
    rf.add_argument("--bank", help="segment bank to paste from (with --paste)")
    rf.add_argument("--paste", action="store_true", help="paste segments first; the images go to OUT/images")
    rf.add_argument("--per-kind", type=int, default=2, help="expressions of each kind per image, at most")
    rf.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    rf.add_argument("--seed", type=int, default=0, help="seeds the pastes and the expressions")
    rf.add_argument("--layout", choices=["random", "sos", "existing", "stats"], default="sos",
                    help="where pasted segments go (stats: sized like the COCO file's instances)")
    rf.add_argument("--num", type=int, nargs=2, default=[2, 8], metavar=("LOW", "HIGH"), help="segments per image")
    rf.add_argument("--split", help="the split the exports name (default: train, val or test from the --coco "
                    "file's name, else its stem)")
    rf.add_argument("--review", type=int, default=0, metavar="N",
                    help="draw N expressions at random (seeded, spread over kinds) into OUT/review: pictures and "
                    "review.html, a page to give verdicts on and save them as JSON")
    rf.add_argument("--quiet", action="store_true", help="no progress bar")
    rf.set_defaults(func=_refer)

    sy = sub.add_parser("synthesize", help="an SOS-style synthetic dataset (COCO instances + panoptic), "
                        "made with the in-loop CopyPaste, resumable")
    sy.add_argument("--bank", required=True, help="segment bank to paste from")
    sy.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    sy.add_argument("--num-images", type=int, required=True, help="images to make")
    sy.add_argument("--size", type=int, default=1024, help="square image side in pixels")
    sy.add_argument("--layout", choices=["random", "sos", "existing"], default="sos", help="where segments go")
    sy.add_argument("--pastes", type=int, nargs=2, default=[5, 19], metavar=("LOW", "HIGH"),
                    help="segments per image (equal values: a fixed number)")
    sy.add_argument("--relight", choices=["none", "net", "lab", "reinhard", "net+lab"], default="none",
                    help="relight the pasted segments")
    sy.add_argument("--referring", action="store_true", help="verified referring expressions and grounding exports")
    sy.add_argument("--backgrounds", help="folder of background photos (any size; scaled and cropped)")
    sy.add_argument("--plain", action="store_true", help="plain and gradient canvases (the default without "
                    "--backgrounds)")
    sy.add_argument("--seed", type=int, default=0, help="the whole dataset follows from it")
    sy.add_argument("--workers", type=int, default=1, help="processes making shards")
    sy.add_argument("--ray", nargs="?", const="local", help="run the shards as Ray tasks: on a running cluster "
                    "at ADDRESS, or a local Ray without one (pip install sos-aug[ray])")
    sy.add_argument("--shard-size", type=int, default=100, help="images per shard (the unit of resuming)")
    sy.add_argument("--categories", help="comma-separated bank categories to use (default: all)")
    sy.add_argument("--sampling", choices=["uniform", "category_balanced", "repeat_factor"],
                    default="category_balanced", help="how segments are drawn (repeat_factor: rare first)")
    sy.add_argument("--reference", help="repeat_factor: the instances JSON whose frequencies count")
    sy.add_argument("--single-category", action="store_true", help="one category per image (intra-class "
                    "referring)")
    sy.add_argument("--min-visible", type=float, default=0.5, help="instances less visible are dropped")
    sy.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image files")
    sy.add_argument("--quiet", action="store_true", help="no progress bar")
    sy.set_defaults(func=_synthesize)

    gn = sub.add_parser("generate", help="segments from a local text-to-image model (diffusers), cut out, "
                        "filtered and added to a bank")
    gn.add_argument("--model", required=True, help="local diffusers pipeline directory (never downloaded)")
    gn.add_argument("--categories", required=True, help="category names: a text file, one per line, or a JSON list")
    gn.add_argument("--per-category", type=int, required=True, help="segments to keep per category")
    gn.add_argument("--out", required=True, help="bank to add the segments to")
    gn.add_argument("--prompts", help="JSON {category: [prompts]} instead of the built-in templates")
    gn.add_argument("--work", help="where the RGBA tree goes (default: OUT-segments); rerun to resume")
    gn.add_argument("--device", default="cpu", help="where the model runs (cuda: float16)")
    gn.add_argument("--size", type=int, default=512, help="generated image side in pixels")
    gn.add_argument("--steps", type=int, default=30, help="denoising steps")
    gn.add_argument("--per-prompt", type=int, default=3, help="images per prompt in turn (SOS: 3)")
    gn.add_argument("--threshold", type=float, default=40.0, help="RGB distance from the background that counts "
                    "as object")
    gn.add_argument("--seed", type=int, default=0, help="every image's seed follows from it")
    gn.add_argument("--quiet", action="store_true", help="no progress bar")
    gn.set_defaults(func=_generate)

    v = sub.add_parser("preview", help="a grid of augmented images with outlines, boxes and labels")
    v.add_argument("--bank", required=True, help="bank to paste from")
    v.add_argument("--coco", required=True, help="COCO instances JSON of the images to augment")
    v.add_argument("--images", required=True, help="their image folder")
    v.add_argument("--out", required=True, help="grid PNG to write")
    v.add_argument("--n", type=int, default=8, help="images in the grid")
    v.add_argument("--seed", type=int, default=0, help="which images and which pastes (a seeded draw)")
    v.add_argument("--layout", choices=["random", "sos", "existing", "stats"], default="sos",
                    help="where pasted segments go (stats: sized like the COCO file's instances)")
    v.add_argument("--feather", type=float, default=0.0, help="alpha feathering sigma in pixels (0: hard)")
    v.add_argument("--relight", choices=["none", "net", "lab", "reinhard", "net+lab"], default="none",
                   help="show the batch without and with this relighting")
    v.add_argument("--weights", help="relighting net weights (default: the shipped ones)")
    v.add_argument("--sampling", choices=["uniform", "category_balanced", "repeat_factor"], default="uniform",
                   help="how segments are drawn from the bank")
    v.add_argument("--reference", help="repeat_factor: the training set's instances JSON that f_c is measured on "
                   "(default: --coco)")
    v.add_argument("--t", type=float, default=0.001, help="repeat_factor threshold (LVIS uses 0.001)")
    v.add_argument("--referring", action="store_true",
                   help="draw a few verified referring expressions per image with their targets' boxes")
    v.add_argument("--quiet", action="store_true", help="no progress messages")
    v.set_defaults(func=_preview)

    rl = sub.add_parser("relight", help="train and evaluate the relighting net").add_subparsers(
        dest="relight_cmd", required=True)
    t = rl.add_parser("train", help="perturb-and-recover training (or teacher distillation) on COCO instances")
    t.add_argument("--coco", required=True, help="COCO instances JSON with the real objects to learn from")
    t.add_argument("--images", required=True, help="their image folder")
    t.add_argument("--out", required=True, help="weights file (.pt); the loss curve goes beside it as .png")
    t.add_argument("--minutes", type=float, default=10.0, help="training time budget, data loading included")
    t.add_argument("--max-steps", type=int, help="stop after this many steps, if the budget lasts that long")
    t.add_argument("--device", default="cpu", help="where the net trains, e.g. cuda")
    t.add_argument("--workers", type=int, default=0, help="DataLoader processes building training batches")
    t.add_argument("--seed", type=int, default=0, help="seeds the data draw, the split and the init")
    t.add_argument("--teacher", help="local IC-Light directory (diffusers layout) to distil from")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT's .resume.pt (same data, seed and settings)")
    t.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_relight_train)
    ic = rl.add_parser("iclight", help="make the local IC-Light teacher directory from SD 1.5 and IC-Light's offsets")
    ic.add_argument("--sd15", required=True, help="Stable Diffusion 1.5 in diffusers layout (unet/, vae/, ...)")
    ic.add_argument("--offsets", required=True, help="IC-Light's iclight_sd15_fc.safetensors")
    ic.add_argument("--out", required=True, help="new directory, then --teacher for relight train")
    ic.set_defaults(func=_relight_iclight)
    e = rl.add_parser("eval", help="two suites at 256²: baselines, the net, the net with LabBlend")
    e.add_argument("--coco", required=True, help="COCO instances JSON of the evaluation images")
    e.add_argument("--images", required=True, help="their image folder")
    e.add_argument("--weights", help="weights to evaluate (default: the shipped ones)")
    e.add_argument("--json", help="write the results here as JSON")
    e.add_argument("--min-area", type=int, default=400, help="smallest instance area evaluated, in pixels")
    e.add_argument("--seed", type=int, default=0, help="seeds the perturbations")
    e.add_argument("--limit", type=int, help="evaluate only the first N instances")
    e.add_argument("--no-oracle", action="store_true", help="skip the (slow) fitted ceiling")
    e.add_argument("--threads", type=int, default=2, help="torch threads")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_relight_eval)

    d = sub.add_parser("demo", help="build a bank and write a preview, on embedded data or yours")
    d.add_argument("--out", default="demo_out", help="output folder (bank/ and preview.png)")
    d.add_argument("--coco", help="use this COCO JSON instead of the embedded synthetic set")
    d.add_argument("--images", help="image folder for --coco")
    d.add_argument("--images-n", type=int, default=24, help="synthetic images to draw")
    d.add_argument("--n", type=int, default=8, help="images in the preview")
    d.add_argument("--seed", type=int, default=0, help="which images and which pastes (a seeded draw)")
    d.add_argument("--layout", choices=["random", "sos", "existing", "stats"], default="sos",
                   help="where pasted segments go")
    d.add_argument("--workers", type=int, default=1, help="processes building the bank")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    return p


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends with the option's default, where it has one its help does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's --help shows each option's default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.formatter_class = _DefaultsShown
                _show_defaults(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _show_defaults(parser)
    args = parser.parse_args(argv)
    keep_freed_memory()  # the command is the whole process (and its DataLoader workers, forked from it)
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as err:  # a missing or bad file, bad input: named, no traceback
        print(f"sos-aug: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
