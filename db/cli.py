"""``softcam db``, ``softcam images`` and ``softcam annotations`` commands (contracts in DESIGN.md).

Each handler opens one transaction (``session_scope``) and calls the same repository functions the
Streamlit pages call; a failure rolls everything back.
"""

from __future__ import annotations

import argparse
import sys

from annotations.formats import EXPORT_FORMATS, IMPORT_FORMATS

from .schema import ROLES


def _progress_bar(desc: str):
    """(callback, close) for a tqdm bar on stderr, created on the first progress call."""
    from tqdm import tqdm

    state: dict = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False,
                                      disable=total < 20)
        bar.n = done
        bar.refresh()

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return update, close


def _db_upgrade(args: argparse.Namespace) -> int:
    from .session import get_engine, upgrade

    engine = get_engine(args.url)
    revision = upgrade(engine)
    print(f"database {engine.url.render_as_string(hide_password=True)} is at revision {revision}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from .session import current_revision, get_engine, head_revision

    engine = get_engine(args.url)
    current = current_revision(engine)
    head = head_revision()
    print(f"database revision: {current or '(empty)'}; newest: {head}")
    return 0 if current == head else 1


def _images_import(args: argparse.Namespace) -> int:
    from .repository import add_cohort, import_images
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    update, close = _progress_bar("importing images")
    try:
        with session_scope(engine) as session:
            cohort = add_cohort(session, args.cohort, modality=args.modality)
            result = import_images(session, args.paths, cohort, modality=args.modality, progress=update,
                                   commit_every=16, dates=args.dates)
    finally:
        close()
    for item in result.accepted:
        held = f" HELD: {item.quarantine_reason}" if item.quarantine_reason else ""
        print(f"accepted  {item.name} -> {item.pseudonym}{'' if item.new else ' (already imported)'}{held}")
    for item in result.rejected:
        print(f"rejected  {item.name}: {item.reason}")
    print(f"{len(result.accepted)} accepted ({result.new} new), {len(result.rejected)} rejected into cohort {args.cohort!r}")
    if result.quarantined:
        print(f"{len(result.quarantined)} held in quarantine (possible burned-in text): hidden from reviewers "
              "until an admin releases them on the Data page")
    return 1 if result.rejected else 0


def _images_label(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .repository import LabelImportError, get_or_create_user, import_labels
    from .session import get_engine, session_scope, upgrade

    path = Path(args.labels)
    if not path.is_file():
        raise ValueError(f"{path}: label file not found")
    engine = get_engine()
    upgrade(engine)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if classes is not None and (len(classes) != 2 or not all(classes)):
        raise ValueError(f"--classes needs two names NEG,POS, got {args.classes!r}")
    try:
        with session_scope(engine) as session:
            user = get_or_create_user(session, args.user, role="researcher") if args.user else None
            result = import_labels(session, args.cohort, path, image_col=args.image_col, label_col=args.label_col,
                                   classes=classes, partial=args.partial, user=user, source=path.name)
    except LabelImportError as exc:
        for line, text in exc.problems:
            print(f"line {line}: {text}", file=sys.stderr)
        print(f"{path.name}: {len(exc.problems)} row(s) not usable, {exc.resolved} resolved; nothing changed "
              "(--partial labels the rows that resolve)", file=sys.stderr)
        return 1
    for line, text in result.problems:
        print(f"skipped line {line}: {text}", file=sys.stderr)
    counts = ", ".join(f"{label or '(unlabeled)'} {n}" for label, n in sorted(result.counts.items()))
    print(f"{result.changed} image(s) labelled, {result.unchanged} unchanged, {len(result.problems)} row(s) skipped "
          f"({result.layout} layout); cohort {args.cohort!r}: {counts}")
    return 0


def _images_split(args: argparse.Namespace) -> int:
    from .repository import assign_splits
    from .session import get_engine, session_scope, upgrade

    try:
        fractions = tuple(float(v) for v in args.fractions.split(","))
    except ValueError:
        raise ValueError(f"--fractions needs three numbers, got {args.fractions!r}") from None
    engine = get_engine()
    upgrade(engine)
    with session_scope(engine) as session:
        table = assign_splits(session, args.cohort, fractions, seed=args.seed, overwrite=args.overwrite)
    if not table:
        raise ValueError(f"cohort {args.cohort!r} has no labelled image to split; label it first (softcam images label)")
    for label, counts in table.items():
        print(f"{label}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


def _annotations_import(args: argparse.Namespace) -> int:
    from .repository import AnnotationImportError, get_or_create_user, import_annotations
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    if args.user:
        with session_scope(engine) as session:
            get_or_create_user(session, args.user)
    update, close = _progress_bar("importing annotations")
    try:
        # a fresh session: the file is validated in a read-only transaction, then written at once
        with session_scope(engine) as session:
            result = import_annotations(session, args.file, args.format, args.cohort, args.user, label=args.label,
                                        progress=update, skip_unknown_images=args.skip_unknown_images)
    except AnnotationImportError as exc:
        close()
        print(exc.report.summary(limit=None if args.all_errors else 50), file=sys.stderr)
        shown = "" if args.all_errors or len(exc.report.errors) + len(exc.report.warnings) <= 50 else " (--all-errors lists them all)"
        print(f"{exc.report.source}: {len(exc.report.errors)} bad row(s){shown}; nothing imported", file=sys.stderr)
        if any(e.problem.startswith("no image matches") for e in exc.report.errors) and not args.skip_unknown_images:
            print("rows naming images that are not in the cohort can be skipped with --skip-unknown-images",
                  file=sys.stderr)
        return 1
    finally:
        close()
    if result.report.warnings:
        print(result.report.summary(limit=20), file=sys.stderr)
    print(f"{result.added} annotation(s) imported, {result.duplicates} already present, "
          f"{result.images} image(s) matched in cohort {args.cohort!r}")
    unknown = result.report.unknown
    if unknown:
        print(f"skipped {sum(unknown.values())} row(s) naming {len(unknown)} image(s) not in the cohort "
              f"(e.g. {', '.join(sorted(unknown)[:3])})")
    return 0


def _annotations_export(args: argparse.Namespace) -> int:
    from .repository import export_annotations, export_dicom_seg, export_dicom_sr, get_cohort
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    with session_scope(engine, readonly=True) as session:
        cohort = get_cohort(session, args.cohort)
        if args.format in ("seg", "sr"):
            written = (export_dicom_seg if args.format == "seg" else export_dicom_sr)(session, cohort, args.out)
            print(f"wrote {len(written)} DICOM {args.format.upper()} file(s) to {args.out}")
            return 0
        left_out: dict[str, int] = {}
        out = export_annotations(session, args.format, cohort, args.out, left_out=left_out)
    print(f"wrote {out}")
    if left_out:
        where = {"point": "coco or points", "polygon": "coco or voc", "mask": "seg, for DICOM images"}
        print(f"not in {args.format}: " + "; ".join(f"{n} {kind} annotation(s) (written by --format {where.get(kind, 'coco')})"
                                                   for kind, n in left_out.items()), file=sys.stderr)
    return 0


def _annotations_agreement(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .agreement import cohort_agreement
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    with session_scope(engine, readonly=True) as session:
        per_image, summary = cohort_agreement(session, args.cohort, tolerance=args.tolerance, iou=args.iou,
                                              all_images=args.all_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_image.to_csv(out, index=False)
    summary_path = out.with_name(out.stem + ".summary.csv")
    summary.to_csv(summary_path, index=False)
    print(f"{len(summary.attrs['annotators'])} annotators, {int(summary.iloc[:-1]['images'].max())} image(s) per pair "
          f"(points within {args.tolerance:g} px, boxes IoU >= {args.iou:g}; "
          f"{'every image' if args.all_images else 'images someone annotated'})")
    shown = summary[["annotator_a", "annotator_b", "images", "f1_mean", "f1_pooled", "kappa_presence"]].astype({"images": int})
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out} and {summary_path}")
    return 0


def _study_create(args: argparse.Namespace) -> int:
    from .repository import create_study
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    with session_scope(engine) as session:
        study = create_study(session, args.name, args.cohort, args.model, args.methods.split(","), seed=args.seed,
                             images=args.images)
        print(f"reader study {study.name!r}: {len(study.image_ids)} image(s) x {len(study.methods)} method(s) = "
              f"{len(study.image_ids) * len(study.methods)} maps per reader, blinded, order seeded by {study.seed} "
              "and the reader")
    return 0


def _study_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from softcam_core.reader_study import rating_summary

    from .repository import answers_table
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    with session_scope(engine, readonly=True) as session:
        answers = answers_table(session, args.name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    answers.to_csv(out, index=False)
    summary = rating_summary(answers, resamples=args.bootstrap)
    summary_path = out.with_name(out.stem + ".summary.csv")
    summary.to_csv(summary_path, index=False)
    print(f"{len(answers)} answer(s) by {answers['reader'].nunique()} reader(s)")
    if len(summary):
        print(summary[["method", "ratings", "mean", "ci_low", "ci_high"]].to_string(
            index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {out} and {summary_path}")
    return 0


def _read_password(args: argparse.Namespace) -> str:
    """Password from --password-stdin (one line) or an interactive prompt; never from argv."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass

        password = getpass.getpass(f"password for {args.username}: ")
    if len(password) < 8:
        raise ValueError(f"password for {args.username!r} must have at least 8 characters")
    return password


def _users_add(args: argparse.Namespace) -> int:
    from .repository import create_user
    from .session import get_engine, session_scope, upgrade

    password = _read_password(args)
    engine = get_engine()
    upgrade(engine)
    with session_scope(engine) as session:
        create_user(session, args.username, args.role, password, display_name=args.name)
    print(f"user {args.username} ({args.role}) created")
    return 0


def _users_password(args: argparse.Namespace) -> int:
    from .repository import set_password
    from .session import get_engine, session_scope, upgrade

    password = _read_password(args)
    engine = get_engine()
    upgrade(engine)
    with session_scope(engine) as session:
        set_password(session, args.username, password)
    print(f"password of {args.username} changed")
    return 0


def _users_change(args: argparse.Namespace) -> int:
    """``users role|deactivate|activate|link``: one account change, written to the audit log (by the
    operator at the shell; the app's own checks read the role again on the user's next action)."""
    from .repository import get_user
    from .repository.audit import record_event
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    with session_scope(engine) as session:
        user = get_user(session, args.username)
        if user is None:
            raise ValueError(f"no user {args.username!r}")
        if args.users_command == "role":
            if args.role not in ROLES:
                raise ValueError(f"role {args.role!r} is not one of {', '.join(ROLES)}")
            detail, user.role = f"{user.role} -> {args.role}", args.role
        elif args.users_command == "link":
            detail, user.oidc_subject = "OIDC subject linked", args.subject.strip() or None
        else:
            user.active = args.users_command == "activate"
            detail = args.users_command + "d"
        record_event(session, f"user_{args.users_command}", user.username, detail=detail)
    print(f"user {args.username}: {detail}")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    from .repository import list_users
    from .session import get_engine, session_scope, upgrade

    engine = get_engine()
    upgrade(engine)
    with session_scope(engine, readonly=True) as session:
        for user in list_users(session):
            print(f"{user.username}\t{user.role}\t{'active' if user.active else 'inactive'}")
    return 0


def register_cli(subparsers) -> None:
    """Add the ``db``, ``users``, ``images`` and ``annotations`` command groups."""
    db = subparsers.add_parser("db", help="create or migrate the database (SOFTCAM_DB_URL)")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser("upgrade", help="create the database or migrate it to the newest revision")
    up.add_argument("--url", help="SQLAlchemy URL (default: SOFTCAM_DB_URL or SQLite in SOFTCAM_HOME)")
    up.set_defaults(func=_db_upgrade)
    cur = db_sub.add_parser("current", help="show the database revision (exit 1 if not the newest)")
    cur.add_argument("--url", help="SQLAlchemy URL (default: SOFTCAM_DB_URL or SQLite in SOFTCAM_HOME)")
    cur.set_defaults(func=_db_current)

    users = subparsers.add_parser("users", help="manage app accounts (local sign-in with hashed passwords)")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    uadd = users_sub.add_parser("add", help="create an account (password prompted, or read from stdin)")
    uadd.add_argument("username")
    uadd.add_argument("--role", required=True, choices=ROLES)
    uadd.add_argument("--name", help="display name")
    uadd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    uadd.set_defaults(func=_users_add)
    upw = users_sub.add_parser("password", help="set a new password")
    upw.add_argument("username")
    upw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    upw.set_defaults(func=_users_password)
    urole = users_sub.add_parser("role", help="change an account's role (applies on the user's next action)")
    urole.add_argument("username")
    urole.add_argument("role", choices=ROLES)
    urole.set_defaults(func=_users_change)
    for action, text in (("deactivate", "stop an account from signing in or acting (applies at once)"),
                         ("activate", "let a deactivated account sign in again")):
        change = users_sub.add_parser(action, help=text)
        change.add_argument("username")
        change.set_defaults(func=_users_change)
    ulink = users_sub.add_parser("link", help="link an account to the OIDC provider's subject ('sub' claim)")
    ulink.add_argument("username")
    ulink.add_argument("subject")
    ulink.set_defaults(func=_users_change)
    ulist = users_sub.add_parser("list", help="list accounts and roles")
    ulist.set_defaults(func=_users_list)

    images = subparsers.add_parser("images", help="import image files into a cohort (de-identified)")
    images_sub = images.add_subparsers(dest="images_command", metavar="ACTION", required=True)
    imp = images_sub.add_parser("import", help="import files, folders or zips; prints accepted / rejected with reasons")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="image files (PNG, JPEG, TIFF, DICOM), folders or zips")
    imp.add_argument("--cohort", required=True, help="cohort name (created if new)")
    imp.add_argument("--modality", choices=("fundus", "oct", "cxr", "other"), help="override the detected modality")
    imp.add_argument("--dates", choices=("shift", "remove"), default="shift",
                     help="DICOM dates: shift back by a per-patient offset (default; intervals kept) or remove them")
    imp.set_defaults(func=_images_import)
    lab = images_sub.add_parser(
        "label", help="class labels from a CSV (image,label; Kaggle image,level; RSNA patientId,Target); "
                      "nothing changes unless every row resolves (or --partial)")
    lab.add_argument("--cohort", required=True)
    lab.add_argument("--labels", required=True, metavar="CSV", help="the label file")
    lab.add_argument("--image-col", help="column naming the image (default: image, filename, patientId, image_id ...)")
    lab.add_argument("--label-col", help="column holding the label (default: label, level, Target, class)")
    lab.add_argument("--classes", help="NEG,POS class names of the numeric layouts (default: the cohort's first two, "
                                       "else healthy,diseased)")
    lab.add_argument("--partial", action="store_true", help="label the rows that resolve and list the others")
    lab.add_argument("--user", help="who to record in the label history (created as a researcher if new)")
    lab.set_defaults(func=_images_label)
    spl = images_sub.add_parser("split", help="stratified train/val/test split of the labelled images, saved with the cohort")
    spl.add_argument("--cohort", required=True)
    spl.add_argument("--fractions", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    spl.add_argument("--seed", type=int, default=0)
    spl.add_argument("--overwrite", action="store_true", help="re-split images that already have a split")
    spl.set_defaults(func=_images_split)

    ann = subparsers.add_parser("annotations", help="import or export annotation files")
    ann_sub = ann.add_subparsers(dest="annotations_command", metavar="ACTION", required=True)
    aimp = ann_sub.add_parser("import", help="atomic import: every row valid or nothing imported (exit 1, per-row report)")
    aimp.add_argument("file", metavar="FILE", help="annotation file, folder (VOC, YOLO, masks) or zip")
    aimp.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    aimp.add_argument("--cohort", required=True, help="cohort whose images the file refers to")
    aimp.add_argument("--user", help="author to record (created as an annotator if new)")
    aimp.add_argument("--label", help="label for mask imports (default: lesion)")
    aimp.add_argument("--skip-unknown-images", action="store_true",
                      help="rows naming images not in the cohort are counted and skipped instead of refusing the file "
                           "(a study file covering more images than were imported)")
    aimp.add_argument("--all-errors", action="store_true", help="list every bad row (default: the first 50)")
    aimp.set_defaults(func=_annotations_import)
    aexp = ann_sub.add_parser("export", help="export the cohort's annotations (pseudonymous image ids only): COCO boxes, "
                              "polygons and keypoints; points CSV; VOC/RSNA/YOLO/CSV boxes; DICOM SEG / SR")
    aexp.add_argument("--format", required=True, choices=(*EXPORT_FORMATS, "seg", "sr"),
                      help="seg: one DICOM Segmentation per DICOM image with masks; sr: one DICOM SR measurement "
                      "report (TID 1500) per DICOM image and annotator with boxes, points or polygons "
                      "(--out is a folder for both)")
    aexp.add_argument("--cohort", required=True)
    aexp.add_argument("--out", required=True, metavar="FILE",
                      help="output file (VOC and YOLO: a folder, or a zip when FILE ends with .zip)")
    aexp.set_defaults(func=_annotations_export)
    from .agreement import DEFAULT_IOU, DEFAULT_TOLERANCE

    agr = ann_sub.add_parser("agreement", help="inter-annotator agreement: F1 of one-to-one same-label matches and "
                             "Cohen's kappa on presence, per annotator pair")
    agr.add_argument("--cohort", required=True)
    agr.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                     help="points match within this distance, image pixels (default %(default)s)")
    agr.add_argument("--iou", type=float, default=DEFAULT_IOU, help="boxes match at IoU >= this (default %(default)s)")
    agr.add_argument("--all-images", action="store_true",
                     help="score every image of the cohort (default: the images someone annotated)")
    agr.add_argument("--out", required=True, metavar="A.csv",
                     help="one row per annotator pair per image; the cohort summary goes to A.summary.csv")
    agr.set_defaults(func=_annotations_agreement)

    study = subparsers.add_parser("study", help="blinded reader studies of the maps (ratings 1-5 per map)")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    screate = study_sub.add_parser("create", help="a study of METHODS on a cohort's images; readers answer on the "
                                   "Reader study page")
    screate.add_argument("--name", required=True)
    screate.add_argument("--cohort", required=True)
    screate.add_argument("--model", required=True, help="checkpoint whose maps are read")
    screate.add_argument("--methods", required=True, help="comma-separated, e.g. softcam,gradcam,sanity:centre")
    screate.add_argument("--seed", type=int, default=0, help="seeds the image sample and every reader's order")
    screate.add_argument("--images", type=int, default=None, help="a seeded sample of this many images (default all)")
    screate.set_defaults(func=_study_create)
    sexport = study_sub.add_parser("export", help="the answers, and a per-method summary with bootstrap intervals")
    sexport.add_argument("--name", required=True)
    sexport.add_argument("--out", required=True, metavar="ANSWERS.csv",
                         help="one row per answer; the summary goes to ANSWERS.summary.csv")
    sexport.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    sexport.set_defaults(func=_study_export)

    # `softcam evaluate` (softcam_core.evaluate, registered before this module) reads database cohorts
    # through this default, so softcam_core never imports db: see db.evaluation.open_database_cohort
    evaluate = subparsers.choices.get("evaluate")
    if evaluate is not None:
        from .evaluation import database_annotators, open_database_cohort

        evaluate.set_defaults(open_database_cohort=open_database_cohort, database_annotators=database_annotators)
    train = subparsers.choices.get("train")  # the same for `softcam train --cohort`
    if train is not None:
        from .evaluation import open_training_cohort

        train.set_defaults(open_training_cohort=open_training_cohort)
