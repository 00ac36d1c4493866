"""What every command shares: the error guard, ``--config`` files, the data options, printed defaults.

Heavy libraries (torch, open_clip) are imported inside commands, so ``--help``, ``--version``
and argument errors answer at once.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import LtclipError

def guarded(fn):
    """Turn project errors into one line on stderr and a non-zero exit, never a traceback.

    Also an ``OSError`` that escaped a stage (a disk that filled up under a log file, an I/O error),
    Ctrl-C (exit code 130) and SIGTERM (143; a scheduler's or ``kill``'s stop): each says how to
    continue: for a command with a ``--resume`` option (train-head, sweep) that is ``--resume`` once
    its folder holds a checkpoint or a sweep record; other commands (extract, eval) continue by running
    the same command again. ``-v`` logs the traceback as well.
    """
    resumable = "resume" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        unraisable = sys.unraisablehook
        sys.unraisablehook = _interrupt_again(unraisable)
        terminate = _stop_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except LtclipError as err:
            from ..core.atomic import WriteError

            message = str(err)
            if isinstance(err, WriteError) and err.disk_full:
                message = f"{err.problem}; {err.fix} and {_how_to_continue(resumable, kwargs)}"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:
            from ..core.atomic import FULL_ERRNOS

            logging.getLogger(__name__).debug("I/O error", exc_info=True)
            out = kwargs.get("out")
            where = f" {err.filename}" if err.filename else f" a file in {out}" if out else ""
            if err.errno in FULL_ERRNOS:
                message = f"disk full while writing{where} ({err.strerror}); free space and {_how_to_continue(resumable, kwargs)}"
            else:
                message = f"I/O error{' on' + where if where else ''} ({err.strerror or err}); fix the cause and {_how_to_continue(resumable, kwargs)}"
            typer.echo(f"error: {' '.join(message.split())}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as stop:
            logging.getLogger(__name__).debug("interrupted", exc_info=True)
            terminated = isinstance(stop, Terminated)
            _finalise_quietly(stop)
            typer.echo(f"{'terminated' if terminated else 'interrupted'}; {_how_to_continue(resumable, kwargs)}", err=True)
            raise typer.Exit(128 + signal.SIGTERM if terminated else 130) from None
        finally:
            sys.unraisablehook = unraisable
            if terminate is not None:
                signal.signal(signal.SIGTERM, terminate)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a command as Ctrl-C does (the same cleanup keeps what was written)."""


def _stop_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` in this process; returns the handler to restore (None:
    left alone: not the main thread, or a handler someone else set). A forked child (a DataLoader
    worker) that inherits the handler dies of the signal as before."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    owner = os.getpid()

    def terminated(signum, frame):
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
    return signal.SIG_DFL


def _finalise_quietly(stop: KeyboardInterrupt) -> None:
    """Free now what the stop cut off, logging (not printing) the errors of their finalisers.

    A stop that lands inside a constructor leaves a half-built object in the interrupted frames; a
    DataLoader iterator stopped after starting its workers fails in ``__del__`` (its shutdown reads
    an attribute set later) and Python would print that as "Exception ignored" with a traceback when
    the frames go. The worker processes are still ended by that shutdown's own ``finally``.
    """
    log = logging.getLogger(__name__)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda info: log.debug("while stopping: %s in %r", info.exc_value, info.object)
    try:
        traceback.clear_frames(stop.__traceback__)
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _interrupt_again(hook):
    """A ``sys.unraisablehook`` that re-raises a Ctrl-C Python could not raise where it landed.

    A KeyboardInterrupt that arrives while Python runs a finaliser, a weakref callback or an
    at-fork handler (DataLoader workers are forked) is printed as "Exception ignored in ..." and
    lost: the command would run on. Instead the signal is sent to the main thread again a moment
    later, from a helper thread (raising it at once would land in the same place).
    """

    def unraisable(info) -> None:
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            signum = signal.SIGTERM if issubclass(info.exc_type, Terminated) else signal.SIGINT
            again = threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, signum))
            again.daemon = True
            again.start()
            return
        hook(info)

    return unraisable


def _how_to_continue(resumable: bool, kwargs: dict) -> str:
    """What continues a stopped command: the same command, or (a training run, a sweep) the same
    command with --resume once its folder holds what --resume continues from."""
    if not resumable:
        return "rerun the same command to resume (what was finished is kept)"
    if kwargs.get("resume"):
        return "rerun the same command to continue from the last checkpoint"
    out = kwargs.get("out")
    if out is not None:
        from ..engine import LAST_FILE
        from ..artifacts.workspace import SWEEP_FILE

        if (Path(out) / SWEEP_FILE).is_file():
            return "rerun the same command with --resume to continue the sweep (finished points are kept)"
        if not (Path(out) / LAST_FILE).is_file():
            return f"rerun the same command (no checkpoint was written in {out} yet)"
    return "rerun the same command with --resume to continue from the last checkpoint"


def given(values: dict, *, drop: tuple[str, ...] = ()) -> dict:
    """The options a user set: None and empty lists mean "not given" (the config's default applies)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()
            if k not in drop and v is not None and v != []}


def say_default(option: str, value) -> None:
    """Print a default the command chose, so the user sees it (an explicit option always wins)."""
    if is_main_process():
        typer.echo(f"{option}: {value} (default)", err=True)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process."""
    return os.environ.get("RANK", "0") == "0"


def load_config(ctx: typer.Context, param, value: Optional[str]):
    """``--config FILE``: its keys become the command's defaults (explicit options still win)."""
    if value:
        from ..config import load_config_file

        try:
            data = load_config_file(value)
            known = {p.name for p in ctx.command.params} - {"config"}
            unknown = sorted(set(data) - known)
            if unknown:
                raise LtclipError(f"--config {value}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        except LtclipError as err:  # read while the options are parsed, before `guarded` runs
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in data.items() if v is not None}}
    return value


def config_file_option():
    """``--config FILE``: a command's option values from a file (eager: they become its defaults)."""
    from .generate import extra

    return extra("config", Optional[str], ("--config",), "TOML, YAML or JSON file of option values (a run's config.json reruns it).",
                 callback=load_config, is_eager=True)


def data_options(skip: tuple[str, ...] = ()):
    """The dataset options (``DataConfig``'s fields) as command parameters."""
    from ..config import DataConfig
    from .generate import config_options

    return config_options(DataConfig, skip=skip)


def data_config(values: dict):
    """A :class:`DataConfig` from a command's options: the data ones among ``values`` (unset ones keep their defaults)."""
    from ..config import DataConfig, from_flat, option_names

    return from_flat(DataConfig, given({k: v for k, v in values.items() if k in option_names(DataConfig)}), owner="the dataset options")


def console():
    from rich.console import Console

    return Console()
