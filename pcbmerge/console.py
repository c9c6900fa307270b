"""The console of every command, set up once by `pcbmerge.cli.main`: our own stage lines and results, and
nothing else unless `--verbose`.

Quiet means: third-party progress bars, INFO chatter and the git message lm-eval provokes are off
(`pipeline.environment.quiet_third_party`), and Prefect's engine lines about each task run ("Created task run
…", "Finished in state Completed()") are dropped from the console; what our flows and tasks log — the stages,
the scores, the MLflow run, the registered version, the output folder — stays, and Prefect still records every
line for the UI.
"""

from __future__ import annotations

import logging

# Prefect's own lines about a run's life, not about our work. Matched on the start of the message.
ENGINE_LINES = ("Created task run", "Finished in state Completed", "Beginning flow run", "Beginning subflow run", "Executing ", "Submitting task")


class EngineChatter(logging.Filter):
    """Drops Prefect's per-task lifecycle lines (a failed or crashed state is kept: it says what went wrong)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return not str(record.msg).startswith(ENGINE_LINES)


class BriefFormatter(logging.Formatter):
    """A console formatter without tracebacks: a failed task's line says what failed, and the command's
    last line says it in one sentence; the traceback stays in Prefect's record of the run (and on the
    console with `--verbose`)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def configure(verbose: bool) -> None:
    """Call before the command imports the libraries it drives (their switches are read at import)."""
    from pipeline.environment import quiet_defaults, quiet_third_party
    from pipeline.settings import load_settings

    quiet_defaults()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:
        return
    quiet_third_party(load_settings().home)
    _filter_prefect_console()


def _filter_prefect_console() -> None:
    """Prefect installs its console handlers when it is first imported: filter them then (now, if it already is)."""
    from pipeline.environment import after_import

    def install(_module) -> None:
        for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # their lines reach the root's console
            for handler in logging.getLogger(name).handlers:
                if not any(isinstance(f, EngineChatter) for f in handler.filters):
                    handler.addFilter(EngineChatter())
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, BriefFormatter):
                    handler.setFormatter(BriefFormatter(handler.formatter or logging.Formatter()))

    after_import("prefect.logging.configuration", lambda module: _wrap_setup(module, install))


def _wrap_setup(module, install) -> None:
    """`setup_logging` builds the handlers; filter them each time it runs."""
    setup = module.setup_logging
    if getattr(setup, "_pcbmerge_filtered", False):
        return

    def setup_logging(*args, **kwargs):
        result = setup(*args, **kwargs)
        install(module)
        return result

    setup_logging._pcbmerge_filtered = True
    module.setup_logging = setup_logging
    if logging.getLogger("prefect").handlers:  # already set up
        install(module)
