"""`artfuse <command>`: a thin layer over the job functions. Exit 0 on success, 2 on a usage or config error
(one line), 1 when a job fails."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from artfuse.cluster import JOBS
from artfuse.config import CHOICES, Config, ConfigError, load_config

log = logging.getLogger("artfuse")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (argparse prints the whole usage)
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _config(args: argparse.Namespace) -> Config:
    corrections = getattr(args, "corrections", None)
    overrides = [*(getattr(args, "set", None) or []), *([f"data.corrections={corrections}"] if corrections else [])]
    return load_config(getattr(args, "config", None), overrides)


def _print(result: dict) -> None:
    print(json.dumps(result, indent=1, default=str))


def cmd_samples(args: argparse.Namespace) -> None:
    from artfuse.data.samples import generate_samples

    _print(generate_samples(args.out, n=args.n, seed=args.seed))


def cmd_train(args: argparse.Namespace) -> None:
    from artfuse.pipelines.train import train

    _print(train(args.data, args.out, _config(args)))


def _corrections_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--corrections", metavar="URI", help=help)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from artfuse.pipelines.evaluate import evaluate

    metrics = evaluate(args.model, args.data, _config(args), args.out)
    _print(
        {"n": metrics["n"], "split": metrics["split"], "errors": metrics["errors"]}
        | {t: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for t, m in metrics["tasks"].items()}
    )


def cmd_calibrate(args: argparse.Namespace) -> None:
    from artfuse.pipelines.evaluate import calibrate, calibrate_out_of_fold

    if (args.data is None) == (args.out_of_fold is None):
        raise ConfigError("calibrate needs one of --data (a validation split) or --out-of-fold (fold runs)")
    if args.out_of_fold:
        _print(calibrate_out_of_fold(args.model, args.out_of_fold, _config(args)))
    else:
        _print(calibrate(args.model, args.data, _config(args)))


def cmd_report(args: argparse.Namespace) -> None:
    from artfuse.reporting.report import write_report

    _print(write_report(args.predictions, args.out, _config(args), run_id=args.run))


def cmd_ablate(args: argparse.Namespace) -> None:
    from artfuse.pipelines.ablate import ablate, to_markdown

    summary = ablate(args.data, args.out, _config(args), tuple(args.archs), args.seeds, args.folds, args.first_folds)
    print(to_markdown(summary))


def cmd_label(args: argparse.Namespace) -> None:
    from artfuse.pipelines.label import label

    cfg = _config(args)
    report = label(args.model, args.input, args.out, cfg)
    if args.report:
        from artfuse.data import storage
        from artfuse.reporting.report import write_report

        page = storage.join(args.out, "_reports", f"{report['run_id']}.html")
        report["report_page"] = write_report(args.out, page, cfg, run_id=report["run_id"])["page"]
    _print(report)


def cmd_annotate(args: argparse.Namespace) -> None:
    from artfuse.pipelines.annotate import annotate

    _print(
        annotate(
            args.predictions,
            args.out,
            args.base_url,
            load_config(args.config, args.set),
            manifests=args.manifests,
            corrections=args.corrections,
            vocabulary=args.vocabulary,
            rows=args.rows,
            image_urls=args.image_url,
            validate=args.validate,
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from artfuse.bench.label import bench, bench_memory, format_bench, format_memory

    if args.nightly:
        from artfuse.bench.nightly import bench_nightly, format_nightly

        result = bench_nightly(
            _config(args),
            args.nightly,
            args.new,
            model_uri=args.model,
            out=args.out,
            archive=args.archive,
            use_inventory=args.inventory,
            keep_archive=not args.delete_archive,
        )
        _print(result)
        print(format_nightly(result))
        return
    if args.listing:
        from artfuse.bench.nightly import bench_listing, format_listing

        result = bench_listing(_config(args), args.listing, args.archive, args.out)
        _print(result)
        print(format_listing(result))
        return
    if args.train:
        from artfuse.bench.train import bench_train, format_train_bench

        result = bench_train(_config(args), args.out)
        _print(result)
        print(format_train_bench(result))
        return
    if args.simulate is not None:
        from artfuse.bench.simulate import format_simulate, simulate

        result = simulate(_config(args), args.simulate or None, args.nodes, args.out)
        _print(result)
        print(format_simulate(result))
        return
    if args.memory:
        result = bench_memory(_config(args), args.memory, args.model, args.out)
        _print(result)
        print(format_memory(result))
        return
    result = bench(_config(args), args.model, args.out)
    _print(result)
    print(format_bench(result))


def cmd_tune(args: argparse.Namespace) -> None:
    from artfuse.pipelines.tune import tune

    overrides = [*(args.set or []), *([f"tune.num_samples={args.samples}"] if args.samples is not None else [])]
    _print(tune(args.data, args.out, load_config(args.config, overrides)))


SUBMIT_DESCRIPTION = """\
Run `python jobs/JOB.py JOB ARGS` on the Ray cluster whose dashboard is at --address, with this checkout
as the job's working_dir (the cluster's image holds the dependencies; see cluster/README.md), stream its
logs and wait for it: exit 0 if the job succeeded, 1 if it failed or the cluster could not be reached,
2 for a usage error. Every argument that is not an option below goes to the job: JOB ARGS are those of
`artfuse JOB` (see `artfuse JOB --help`), and they are checked here before anything is submitted."""
SUBMIT_EPILOG = """\
token auth: a cluster started with a token needs it here too: RAY_AUTH_TOKEN, a file at RAY_AUTH_TOKEN_PATH,
  or ~/.ray/auth_token (RAY_AUTH_MODE=token is set for you when one is found).
storage: AWS_ENDPOINT_URL and the AWS region travel with the job; credentials only with --forward-credentials.
  --forward-credentials puts this shell's AWS keys into the job's runtime_env, which Ray stores with the job and
  shows to anyone who can open its dashboard or list its jobs. Give the cluster its own credentials instead (IRSA
  or EKS Pod Identity on EKS, an instance profile on EC2; cluster/README.md).

example:
  artfuse submit label --address http://127.0.0.1:8265 --model s3://models/current \\
      --input s3://archive/images/ --out s3://labels/artfuse --set label.batch_size=128"""


def cmd_submit(args: argparse.Namespace) -> int:
    from artfuse.cluster.submit import submit_job

    return submit_job(
        args.job, args.address, args.job_args, wait=not args.no_wait, forward_credentials=args.forward_credentials
    )


def cmd_review(args: argparse.Namespace) -> None:
    from artfuse.review.app import review

    cfg = load_config(args.config, args.set)
    review(
        args.predictions,
        args.corrections,
        cfg,
        host=args.host,
        port=args.port,
        token=args.token,
        reviewer=args.reviewer,
        model_uri=args.model,
    )


def cmd_similar(args: argparse.Namespace) -> None:
    from artfuse.review.neighbours import similar

    _print(similar(args.predictions, args.uri, args.k, _config(args)))


def cmd_demo(args: argparse.Namespace) -> None:
    from artfuse.pipelines.demo import demo

    demo(args.out, getattr(args, "set", None) or [])


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (sections model, data, train, label, tune, storage)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override one config field by its dotted name, e.g. --set model.fusion=gated (repeatable)",
    )


def _samples_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="URI", help="folder (local path, file:// or s3://) to write into")
    p.add_argument("--n", type=int, default=240, help="number of images (default 240)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, metavar="URI", help="collection: folder per label, or a CSV/Parquet manifest"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="URI",
        help="where the package goes; rerun with the same --out to resume",
    )
    _corrections_option(p, "a corrections dataset (artfuse review): its decisions override and extend the labels")
    _with_config(p)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="URI", help="model package folder")
    p.add_argument("--data", metavar="URI", help="labelled collection")
    _corrections_option(p, "a corrections dataset: alone, score on its decided objects; with --data, merged into it")
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json and the PNGs")
    _with_config(p)


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="URI", help="model package folder (its artfuse.json is updated)")
    p.add_argument(
        "--data",
        metavar="URI",
        help="labelled collection (the training collection: its validation split is used)",
    )
    p.add_argument(
        "--out-of-fold",
        metavar="DIR",
        help="instead of --data: an `ablate --folds` configuration's <out>/<arch>/seed<k>, whose held folds' "
        "predictions (every image outside the test split) the temperature and threshold are fitted on",
    )
    _with_config(p)


def _ablate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="URI", help="labelled collection")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for ablation.md/.json, runs.csv and one package per (arch, seed); rerun to skip finished runs",
    )
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="training seeds train.seed .. +N-1 (default 1)")
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        metavar="K",
        help="stratified K-fold cross-validation over the images outside the test split (which no run sees): "
        "each run trains on K-1 folds and is scored on the one it held out (default 0: the plain split)",
    )
    p.add_argument(
        "--first-folds",
        type=int,
        metavar="N",
        help="with --folds: run only folds 0 .. N-1 this time (a later run with a larger N, or none, goes on)",
    )
    p.add_argument(
        "--archs",
        nargs="+",
        default=list(CHOICES["model.arch"]),
        choices=CHOICES["model.arch"],
        metavar="ARCH",
        help="architectures to train (default: all three)",
    )
    _with_config(p)


def _label_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="URI", help="model package folder")
    p.add_argument("--input", required=True, metavar="URI", help="folder of images (recursive) or a manifest")
    p.add_argument("--out", required=True, metavar="URI", help="Parquet output root (partitioned by run_date)")
    p.add_argument(
        "--report", action="store_true", help="then write the run's HTML report to <out>/_reports/<run_id>.html"
    )
    _with_config(p)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, metavar="URI", help="the label job's output root (its --out)")
    p.add_argument(
        "--run", metavar="RUN_ID", help="the run to report on (default: the latest in <predictions>/_reports)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="URI",
        help="the .html to write (local path, file:// or s3://): outside the predictions, or in their _reports/",
    )
    _with_config(p)


def _annotate_arguments(p: argparse.ArgumentParser) -> None:
    from artfuse.data.iiif_annotations import DEFAULT_SELECTION, SELECTIONS

    p.add_argument("--predictions", required=True, metavar="URI", help="the --out of `artfuse label`")
    p.add_argument("--out", required=True, metavar="URI", help="folder to write the annotations into (local or s3://)")
    p.add_argument(
        "--base-url",
        required=True,
        metavar="URL",
        help="the http(s) URL --out is published at: every id written starts with it",
    )
    p.add_argument(
        "--manifests",
        metavar="URI",
        help="the IIIF manifest or collection the labels came from (label's --input): each Presentation 3 manifest "
        "is copied under --out with its annotations inside its canvases, for Mirador and other viewers",
    )
    _corrections_option(p, "a corrections dataset (artfuse review): a curator's decision overrides the model's label")
    p.add_argument(
        "--vocabulary",
        metavar="FILE",
        help="labels to vocabulary URIs (Getty AAT, Wikidata): a CSV task,label,uri or a YAML {task: {label: uri}}",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=SELECTIONS,
        default=list(DEFAULT_SELECTION),
        help="which predictions become annotations: all, those accepted without review, those a curator decided "
        f"(--corrections); several add up (default: {' '.join(DEFAULT_SELECTION)})",
    )
    p.add_argument(
        "--image-url",
        action="append",
        default=[],
        metavar="PREFIX=URL",
        help="images under PREFIX (files, s3://) are published under URL, e.g. s3://archive/images/="
        "https://images.museum.org/: their annotations target that URL (repeatable)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="check every document against the IIIF Presentation 3 JSON Schema before writing it",
    )
    _with_config(p)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="FILE", help="write the figures as JSON (e.g. bench.json)")
    p.add_argument("--model", metavar="URI", help="model package (default: a fresh model of the configured arch)")
    p.add_argument(
        "--memory",
        nargs="+",
        type=int,
        metavar="N",
        help="instead: the label job's peak memory over collections of N images each (e.g. --memory 2000 10000)",
    )
    p.add_argument(
        "--nightly",
        type=int,
        metavar="N",
        help="instead: one night over an archive of N objects, --new of them new (the rest labelled by earlier nights)",
    )
    p.add_argument("--new", type=int, default=1000, metavar="M", help="with --nightly: new objects (default 1000)")
    p.add_argument(
        "--archive",
        metavar="URI",
        help="with --nightly: where the archive lives (default /tmp/artfuse-nightly/archive-N; s3:// for S3); "
        "kept for the next run of the same N",
    )
    p.add_argument(
        "--inventory", action="store_true", help="with --nightly and an s3:// --archive: label from an S3 Inventory"
    )
    p.add_argument("--delete-archive", action="store_true", help="with --nightly: delete the archive at the end")
    p.add_argument(
        "--listing",
        type=int,
        metavar="N",
        help="instead: list an s3:// --archive of N objects flat and side by side (storage.list_threads), and compare",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="instead: a bare training step alone and the Ray Train loop on a generated collection, as a ratio",
    )
    p.add_argument(
        "--simulate",
        nargs="?",
        const="",
        metavar="TIMINGS.json",
        help="instead: the label pipeline on a GPU machine's logical resources (16 CPUs, 1 GPU a node), each stage a "
        "sleep of the per-batch time measured on the card (default: the H200's, artfuse/bench/timings/h200.json)",
    )
    p.add_argument(
        "--nodes",
        nargs="+",
        type=int,
        metavar="N",
        help="with --simulate: cluster sizes to run (default 1), e.g. 1 2 4",
    )
    _with_config(p)


def _tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="URI", help="labelled collection: folder per label, or a manifest")
    p.add_argument(
        "--out",
        required=True,
        metavar="URI",
        help="results table, best config, best package; rerun with the same --out to resume an interrupted search",
    )
    p.add_argument("--samples", type=int, metavar="N", help="number of trials (default: tune.num_samples)")
    _with_config(p)


def _submit_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "artfuse submit JOB --address URL [--no-wait] [--forward-credentials] [JOB ARGS ...]"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = SUBMIT_DESCRIPTION
    p.epilog = SUBMIT_EPILOG
    p.add_argument("job", metavar="JOB", choices=JOBS, help=f"the job to run: {', '.join(JOBS)}")
    p.add_argument(
        "--address", required=True, metavar="URL", help="the cluster's dashboard, e.g. http://127.0.0.1:8265"
    )
    p.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    p.add_argument(
        "--forward-credentials",
        action="store_true",
        help="pass this shell's AWS credentials to the job: Ray keeps them in the job's runtime_env, visible in "
        "its dashboard; prefer the cluster's own (IRSA, instance profile)",
    )


def _review_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, metavar="URI", help="the --out of `artfuse label`")
    p.add_argument("--corrections", required=True, metavar="URI", help="corrections dataset to append to")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token", help="access token (default: $ARTFUSE_REVIEW_TOKEN, or a new one off loopback)")
    p.add_argument("--reviewer", help="name recorded with each decision (default: the login name)")
    p.add_argument("--model", metavar="URI", help="model package: its vocabulary (default: labels seen in the top-k)")
    _with_config(p)


def _similar_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, metavar="URI", help="`artfuse label` output with embeddings")
    p.add_argument("--uri", required=True, metavar="URI", help="the artwork (its uri in the predictions)")
    p.add_argument("-k", type=int, default=10, help="how many (default 10)")
    _with_config(p)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default="demo-out",
        metavar="DIR",
        help="folder for everything the demo makes (default demo-out)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a config field")


# (name, function, one-line help, its arguments): one small function per command keeps its flags on one screen
COMMANDS: list[tuple[str, Callable, str, Callable[[argparse.ArgumentParser], None]]] = [
    (
        "samples",
        cmd_samples,
        "generate the sample collection (procedural painting 'movements', one folder each)",
        _samples_arguments,
    ),
    ("train", cmd_train, "train a model package on a labelled collection with Ray Train", _train_arguments),
    (
        "evaluate",
        cmd_evaluate,
        "score a model package on a labelled collection (metrics.json + confusion PNGs)",
        _evaluate_arguments,
    ),
    (
        "calibrate",
        cmd_calibrate,
        "fit each task's temperature and review threshold for a package and store them in it (for packages "
        "trained before calibration, or on fresh labelled data)",
        _calibrate_arguments,
    ),
    (
        "ablate",
        cmd_ablate,
        "fusion vs cnn_only vs transformer_only on one collection at one budget: N seeds (test-split table) or K folds",
        _ablate_arguments,
    ),
    (
        "label",
        cmd_label,
        "label new or changed images under --input into Parquet at --out with Ray Data",
        _label_arguments,
    ),
    (
        "report",
        cmd_report,
        "one self-contained HTML page on a labelling run: counts, errors, label shift, scores, review queue, "
        "duplicates",
        _report_arguments,
    ),
    (
        "annotate",
        cmd_annotate,
        "predictions as IIIF annotations (one AnnotationPage per manifest) and manifests that show them in a viewer",
        _annotate_arguments,
    ),
    (
        "bench",
        cmd_bench,
        "throughput of the model alone, decode alone and the whole label pipeline on this machine, as ratios",
        _bench_arguments,
    ),
    (
        "tune",
        cmd_tune,
        "search fusion hyperparameters with Ray Tune (each trial a Ray Train run, ASHA early stopping)",
        _tune_arguments,
    ),
    (
        "submit",
        cmd_submit,
        "submit a job (train, tune, label, evaluate) to a Ray cluster and follow it",
        _submit_arguments,
    ),
    (
        "review",
        cmd_review,
        "review unsure predictions in the browser; each decision is appended to a corrections dataset",
        _review_arguments,
    ),
    (
        "similar",
        cmd_similar,
        "the artworks nearest to one, by the embeddings of a predictions dataset",
        _similar_arguments,
    ),
    ("demo", cmd_demo, "samples -> train -> evaluate -> label on generated data, locally", _demo_arguments),
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="artfuse", description="Artwork identification with a CNN + Transformer fusion model on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    for name, fn, help, add_arguments in COMMANDS:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "submit":
        args.job_args = unknown  # everything `submit` does not know belongs to the job
        parser.parse_args([args.job, *unknown])  # a usage error in the job's arguments ends here, not on the cluster
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        status = args.fn(args)
    except ConfigError as e:
        sys.stderr.write(f"artfuse {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"artfuse {args.command}: interrupted\n")
        return 1
    except Exception as e:  # noqa: BLE001 - a failed job ends in one line and exit 1; -v shows the traceback
        if args.verbose:
            log.exception("job failed")
        sys.stderr.write(f"artfuse {args.command}: failed: {type(e).__name__}: {e}\n")
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
