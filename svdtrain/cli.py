"""The `svdtrain` command: each subcommand is one plain function of the pipeline.

    svdtrain run [CONFIG] [key=value ...]          all stages in a new run folder (default: the quick recipe)
    svdtrain run --resume RUN_DIR [key=value ...]  continue an interrupted run
    svdtrain STAGE RUN_DIR [key=value ...]         one stage (train sparsify prune finetune export report)
    svdtrain bench latency|overhead [options]      the benchmarks; results into RESULTS.md

A run folder is data: opening one (--resume, a stage) runs no code it names; a folder whose model is user code
(model=file.py:fn or package.module:fn) needs --trust-code. A failed command leaves the folder as it was, and
overrides are saved into its config only once they pass the checks a new run's config passes.

Under `torchrun --nproc_per_node N -m svdtrain.cli run ...` the training stages run on N processes.

The last line printed is the run folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .recipes.config import ConfigError, load_config, parse_overrides
from .recipes.data import DataError
from .recipes.distributed import stop
from .recipes.models import one_line
from .recipes.folder import STAGES
from .recipes.pipeline import run_all, run_stage
from .recipes.run import Run
from .recipes.train import TrainingError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdtrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage", description="Run every stage. CONFIG: a .toml path or a "
                         "name in configs/ (default: the quick Fashion-MNIST ResNet-20 recipe).")
    run.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder where it stopped")
    trust = ("run the model code the run folder's config names (model=file.py:fn or package.module:fn); without "
             "it such a folder is refused")
    run.add_argument("--trust-code", action="store_true", help=trust)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage on a run folder")
        p.add_argument("run_dir", metavar="RUN_DIR")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.add_argument("--resume", action="store_true", help="continue the stage from its last checkpoint")
        p.add_argument("--trust-code", action="store_true", help=trust)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    lat = bench.add_parser("latency", help="measured speed-up of exported models over dense")
    lat.add_argument("--models", default="resnet20,resnet50,lenet300")
    lat.add_argument("--levels", default="0.6,0.45,0.35", help="FLOPs levels (fractions of dense)")
    lat.add_argument("--batches", default="1,32")
    lat.add_argument("--backends", default="eager,eager_prepared,compiled,onnxruntime")
    lat.add_argument("--rank-multiple", type=int, help="round ranks to this (default: 8; for resnet50 prune_'s default)")
    lat.add_argument("--budget-s", type=float, default=3.0, help="seconds of timing per point")
    over = bench.add_parser("overhead", help="training-step cost of the SVD form vs dense (ResNet-20)")
    over.add_argument("--rounds", type=int, default=15)
    over.add_argument("--steps", type=int, default=3)
    over.add_argument("--batch", type=int, default=128)
    for p in (lat, over):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/<name>.json)")
        p.add_argument("--results", type=Path, default=Path("RESULTS.md"), help="Markdown file that gets the section")
    return parser


def _bench(args, argv) -> None:
    from .recipes import bench

    command = " ".join(["svdtrain", *argv])
    kwargs = {"threads": args.threads, "results": args.results, "command": command}
    if args.out:
        kwargs["out"] = args.out
    if args.bench == "overhead":
        bench.overhead(args.rounds, args.steps, args.batch, **kwargs)
    else:
        bench.latency(args.models.split(","), [float(v) for v in args.levels.split(",")],
                      [int(v) for v in args.batches.split(",")], args.backends.split(","),
                      rank_multiple=args.rank_multiple, budget_s=args.budget_s, **kwargs)


def _error(message: str):
    """One line on stderr; under torchrun only rank 0 says it (every process stops with the same error)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"svdtrain: error: {message}", file=sys.stderr)


def _open(folder: str, overrides: list[str], trust_code: bool, stage: str | None = None) -> Run:
    """A run folder opened for a command (`stage`, or --resume): its config with the overrides checked as a new
    run's would be (data, model, budget, room to write), and the stages before `stage` finished, before the
    overrides are saved into it."""
    run = Run.open(folder, parse_overrides(overrides), trust_code=trust_code)
    run.finish_swaps()
    if stage:
        run.check_inputs(stage)
    run.preflight()
    run.check_writable()
    run.save_config()
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    # Warnings (torch's among them) are held back: an error stays one line, and after a success each distinct
    # warning is one line on stderr, before the run folder (the last line printed).
    with warnings.catch_warnings(record=True) as caught:  # the filters stay: what Python hides stays hidden
        code, run = _command(args, argv)
    if code == 0:
        for text in dict.fromkeys(one_line(w.message) for w in caught):
            print(f"svdtrain: warning: {text}", file=sys.stderr)
        if run is not None and run.cluster.main:
            print(run.folder)
    return code


def _command(args, argv) -> tuple[int, Run | None]:
    """The command's exit status, and its run (None for benchmarks, or when none was opened)."""
    run = None
    try:
        if args.command == "bench":
            _bench(args, argv)
            return 0, None
        if args.command == "run":
            config = [a for a in args.args if "=" not in a]
            overrides = [a for a in args.args if "=" in a]
            if len(config) > 1 or (config and args.resume):
                raise ConfigError(f"expected at most one CONFIG (and none with --resume), got {config}")
            if args.resume:
                run = _open(args.resume, overrides, args.trust_code)
            else:
                run = Run.create(load_config(config[0] if config else None, overrides))
            run_all(run, resume=bool(args.resume))
        else:
            run = _open(args.run_dir, args.overrides, args.trust_code, args.command)
            run_stage(run, args.command, resume=args.resume)
    except (ConfigError, DataError, TrainingError, ValueError, FileNotFoundError) as e:
        _error(str(e))
        return 2, run
    except OSError as e:  # e.g. the disk filled up during the run: what was saved before is whole
        where = f"; files saved before are intact; continue with: svdtrain run --resume {run.folder}" if run else ""
        _error(f"cannot write {e.filename or ''}: {e.strerror or e}{where}")
        return 2, run
    except KeyboardInterrupt:
        where = f"; continue with: svdtrain run --resume {run.folder}" if run is not None else ""
        print(f"\nsvdtrain: interrupted{where}", file=sys.stderr)
        return 130, run
    finally:
        stop()
    return 0, run


if __name__ == "__main__":
    sys.exit(main())
