"""The ``bigopt`` command line.

    bigopt <command> <config.yaml> [key.sub=value ...] [--flags]

Overrides (``key.sub=value``) may also come after the flags: ``bigopt ingest conf.yaml
--input a.gz criteo.ingest.verify=false`` is the same as putting the override first.

Every command is a module in ``jobs/`` exposing ``add_arguments(parser)`` and
``run(cfg, args) -> int``; the same module runs under spark-submit
(``spark-submit jobs/<command>.py conf/x.yaml key=value``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util  # not implied by `import importlib` (an editable install's finder imports it)
import logging
import os
import sys
from collections.abc import Sequence

# command -> (module, one-line help). Order is the order of the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("jobs.generate", "write synthetic raw data in the exact raw format"),
    "ingest": ("jobs.ingest", "raw files -> bronze Delta table (+ quarantine, ledger)"),
    "quarantine": ("jobs.quarantine", "show the raw lines ingest quarantined: counts per file and reason, the lines"),
    "featurize": ("jobs.featurize", "bronze -> gold train/valid/test Delta tables + vocabulary"),
    "train": ("jobs.train", "train a model on gold tables with Horovod-on-Spark, tracked in MLflow"),
    "run": ("jobs.run", "the whole pipeline: generate (demo) -> ingest -> featurize -> train -> test"),
    "compare": ("jobs.compare", "compare the runs of an MLflow experiment: repeats, confidence intervals, paired gaps"),
    "batch-size": ("jobs.batch_size", "measure memory/time vs batch size and predict the bounds"),
    "lake": ("jobs.lake", "Delta table maintenance: history, vacuum, optimize, roundtrip check"),
    "config": ("jobs.show_config", "print the fully resolved configuration"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            out[name] = (mod, help_)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigopt",
        description="Spark big-data pipelines and a rigorous optimizer bench (Delta -> torch -> Horovod -> MLflow).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name, (mod, help_) in _available().items():
        sp = sub.add_parser(name, help=help_, description=help_)
        module = importlib.import_module(mod)
        # e.g. `bigopt generate criteo conf.yaml`: command-specific leading positionals
        for lead, lead_help in getattr(module, "LEADING_ARGS", {}).items():
            sp.add_argument(lead, help=lead_help)
        sp.add_argument("config", nargs="?", default=None, help="YAML config (conf/*.yaml)")
        sp.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")
        # after the command too (`bigopt train conf.yaml -v` was "unrecognized arguments: -v");
        # SUPPRESS: when not given here, the one before the command stands
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        module.add_arguments(sp)
        # its usage line for a stray argument, and the module's check of flags given together
        sp.set_defaults(command_parser=sp, command_check=getattr(module, "check_arguments", None))
    return p


def at_least(low: int):
    """An argparse type for the commands' counts and sizes: an integer >= ``low``, else a usage
    error (not a traceback from whatever the number reaches)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides may follow the flags.

    argparse fills the ``overrides`` positional from the run of arguments before the first
    flag; an override after a flag would otherwise be "unrecognized". A leftover that is not
    an override (a flag of another command, a second config file) is still an error, and so
    are flags that contradict each other (the command module's ``check_arguments(args)``, which
    returns what is wrong, or None)."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    stray = [a for a in extra if a not in late]
    command_parser = vars(args).pop("command_parser", None) or parser
    check = vars(args).pop("command_check", None)
    if stray:
        command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if check is not None and (problem := check(args)):
        command_parser.error(problem)
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from rich.logging import RichHandler

    from jobs.console import make_console, print_error

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(parser, argv)
    handler = RichHandler(console=make_console(), show_path=False, rich_tracebacks=False)
    handler.addFilter(Py4jNoise(verbose=args.verbose))  # a dead JVM, Ctrl-C / SIGTERM: said once, below
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[handler])
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if not args.command:  # a usage error: its help on stderr, as argparse says its own errors
        parser.print_help(sys.stderr)
        return 2
    from jobs.config import ConfigError, load_config
    from pipelines.env import EnvSettingError, check_environment

    try:  # before the config, Spark and the lake: a bad switch is one line, not a traceback later
        check_environment()
    except EnvSettingError as e:
        print(f"bigopt {args.command}: {e}", file=sys.stderr)
        return 2

    # a config path that looks like an override (k=v) means "no config file"
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"bigopt {args.command}: {e}", file=sys.stderr)
        return 2
    module = importlib.import_module(_available()[args.command][0])
    from pipelines.spark import SparkStartError
    from pipelines.stopping import stop_behind

    previous = _stop_cleanly_on_sigterm()
    try:
        try:
            return int(module.run(cfg, args) or 0)
        except Exception as e:  # an error raised while a stop unwound (py4j's, its connection cut) is the stop
            if (stop := stop_behind(e)) is None:
                raise
            raise stop from None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Airflow stopping a task): the `finally`s ran
        by = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"bigopt {args.command}: stopped by {by}; {_after_a_stop(e, argv)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `bigopt quarantine --raw | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except SparkStartError as e:  # no Java, or Spark's JVM died while starting: no traceback
        from jobs.spark_step import error_text

        print_error(error_text(args.command, e))
        return 1
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _after_a_stop(stop: KeyboardInterrupt, argv: list[str]) -> str:
    """What a stop left: a stopped training (``jobs.train.resumable_on_a_stop``: ``bigopt train``,
    or ``bigopt run`` in its train step) its checkpoints, and the command that continues from
    them is this one with ``--resume`` (without ``run``'s --force-* data flags: its data steps
    are done); any other step deleted what it had not committed."""
    if not getattr(stop, "resumable", False):
        return "what it had not committed was removed"
    import shlex

    # a stop in `bigopt run`'s train step comes after its data steps: forcing them again would
    # re-ingest and rebuild gold for nothing (or abbreviated, as argparse accepts: --force-i)
    rerun = ("--force-ingest", "--force-featurize") if argv[:1] == ["run"] else ()
    kept = [a for a in argv if not (a.startswith("--force-") and any(f.startswith(a) for f in rerun))]
    if not getattr(stop, "checkpointed", True):  # stopped before its first checkpoint
        return "it had written no checkpoint yet (train.checkpoint_every): the same command starts again from step 0"
    again = shlex.join(["bigopt", *kept, *([] if "--resume" in kept else ["--resume"])])
    return f"its checkpoints are kept: {again} continues from the last"


class Py4jNoise(logging.Filter):
    """Drops what py4j logs to the ROOT logger (``logging.info(...)`` in its java_gateway.py, so
    the ``py4j`` logger's level does not reach it): its INFO "Exception while sending command."
    with a Py4JNetworkError traceback when the JVM died (the step then says so in one line),
    kept under ``-v``; and the tracebacks it logs when Ctrl-C or SIGTERM interrupts a call to
    the JVM ("KeyboardInterrupt while sending command", and its retry's error)."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}py4j{os.sep}" not in record.pathname:
            return True
        if record.name == "root" and record.levelno < logging.WARNING and not self.verbose:
            return False
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        from pipelines.stopping import stop_behind  # only for py4j's tracebacks, not every record

        return stop_behind(error) is None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is, so the same clean-up
    runs (a generator's temporary files, a write's uncommitted Parquet files)."""


def _stop_cleanly_on_sigterm():
    """Make SIGTERM raise :class:`Terminated`; returns the handler it replaced (None when not
    in the main thread, where no handler can be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        # once: a second SIGTERM (Airflow may send more) must not cut short the clean-up the
        # first one started; SIGKILL still ends the process
        signal.signal(signal.SIGTERM, lambda *_: None)
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminated)


def submit_main(command: str) -> None:
    """Entry used by ``spark-submit jobs/<command>.py conf.yaml k=v``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
