"""What every ``python -m tfkd.*`` entry point shares: quiet TensorFlow start-up, one-line errors
with their exit codes, interrupts that exit 130, and argparse types that refuse bad counts.

Each command parses and validates its options *before* TensorFlow is imported (a bad option costs
a fraction of a second, not TensorFlow's start-up), then calls ``import_tensorflow``, which hides
TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) unless ``--verbose`` is given or
``TFKD_LOG_LEVEL`` is set (``TFKD_LOG_LEVEL=info`` shows everything TensorFlow prints).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import tempfile
from typing import Any, Callable, Iterator

from tfkd.errors import ConfigError, TfkdError

#: TensorFlow's glog-style C++ lines (``I0000 00:00:... port.cc:153] ...``) and absl's preamble.
_CHATTER = re.compile(r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl"
                      r"|To enable the following instructions:|oneDNN custom operations)")


def verbose_logs(flag: bool = False) -> bool:
    """True when TensorFlow's own log should reach the terminal (``--verbose`` or TFKD_LOG_LEVEL)."""
    return flag or os.environ.get("TFKD_LOG_LEVEL", "").strip().lower() not in ("", "0", "quiet", "error")


def import_tensorflow(verbose: bool = False) -> Any:
    """Imports TensorFlow and probes the devices with its C++ start-up lines filtered out of
    stderr (unless ``verbose``); anything else it printed is passed through. Returns ``tf``."""
    if verbose_logs(verbose):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with quiet_native_logs():
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA probing prints here, once
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    return tf


#: What LiteRT's converter prints on every conversion (its C++ quantizer's settings line).
_CONVERTER_CHATTER = re.compile(r"^(fully_quantize: \d|Estimated count of arithmetic ops)")


@contextlib.contextmanager
def quiet_native_logs(verbose: bool = False) -> Iterator[None]:
    """Runs the block with TensorFlow's C++ chatter (start-up lines, the converter's lines) and
    ``tf.lite.Interpreter``'s deprecation warning (TensorFlow's own converter and quantization
    debugger create one) kept off the console, unless ``verbose`` (or TensorFlow's log was asked
    for); anything else written to stderr meanwhile is passed through after the block."""
    import warnings

    if verbose_logs(verbose) or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated",
                                category=UserWarning)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not _CHATTER.match(line) and not _CONVERTER_CHATTER.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


# ------------------------------------------------------------------------ argparse types
def _integer(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{value}: expected {what}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts of epochs, steps, runs, images)."""
    return _integer(text, 1, None, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 meaning 'none' or 'all', as the flag says)."""
    return _integer(text, 0, None, "an integer >= 0")


def seed_int(text: str) -> int:
    """argparse type: a random seed, 0 to 2**32 - 1."""
    return _integer(text, 0, 2**32 - 1, "a seed from 0 to 4294967295")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number > 0")
    return value


#: What ``points_or_none`` returns for ``none``: the flag's check is turned off.
NONE = "none"


def points_or_none(text: str) -> float | str:
    """argparse type: points of top-1 from 0 to 100, or ``none`` (returned as ``NONE``)."""
    if text.strip().lower() == NONE:
        return NONE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected points of top-1 from 0 to 100, or none") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text}: expected points of top-1 from 0 to 100, or none")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line prefixed like every other tfkd error (exit code 2)."""

    def error(self, message: str) -> None:
        """argparse's hook for a usage error: one line, exit code 2 (never returns)."""
        self.exit(2, f"tfkd: error: {self.prog}: {message}\n")


# ------------------------------------------------------------------------ running a command
#: Signals received by this process (``run`` turns whatever error they cause into exit 130).
_RECEIVED: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def raise_if_interrupted() -> None:
    """Raises ``KeyboardInterrupt`` if a signal arrived whose exception was swallowed on its way
    up (Python ignores exceptions raised in ``__del__``, where a garbage-collected TensorFlow
    function may be when the signal lands): call it before anything irreversible."""
    if _RECEIVED:
        raise KeyboardInterrupt(f"signal {_RECEIVED[0]}")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds SIGINT/SIGTERM back until the block ends (for the few renames that publish a result),
    then raises ``KeyboardInterrupt`` if one arrived: the block is never cut in half. An interrupt
    that arrived earlier (and was swallowed) stops the block before it starts."""
    raise_if_interrupted()
    received: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt(f"signal {received[0]}")


def os_error_message(error: OSError, what: str = "") -> str:
    """``PATH: what went wrong`` for an OSError, naming the file."""
    name = error.filename or ""
    reason = error.strerror or str(error)
    if error.errno == errno.ENAMETOOLONG:
        reason = "name too long for the file system"
    return f"{name}: {what + ': ' if what else ''}{reason}" if name else f"{what or 'I/O error'}: {reason}"


def run(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Runs a command body: a ``TfkdError`` prints its one line and exits with its code, an
    interrupt (Ctrl-C or SIGTERM) exits 130, an OS error about a file exits 2 naming it.

    A library may turn the ``KeyboardInterrupt`` of a Ctrl-C into an error of its own (the
    TFLite converter does); any error after an interrupt signal still exits 130.
    """
    _RECEIVED.clear()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        code = body()
        raise_if_interrupted()  # the body finished, but a swallowed interrupt still ends in 130
        return code
    except SystemExit as exit_:  # argparse: --help (0) or a one-line usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except BaseException as error:  # noqa: BLE001 - sorted into exit codes below
        if isinstance(error, KeyboardInterrupt) or _RECEIVED:
            print(f"tfkd: {interrupted}", file=sys.stderr)
            return 130
        if isinstance(error, TfkdError):
            print(f"tfkd: error: {error}", file=sys.stderr)
            return error.exit_code
        if isinstance(error, OSError):  # one we did not anticipate: still one line naming the file
            print(f"tfkd: error: {os_error_message(error)}", file=sys.stderr)
            return ConfigError.exit_code
        if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
            print("tfkd: error: out of memory: lower data.batch_size (or the image size)", file=sys.stderr)
            return ConfigError.exit_code
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
            except ValueError:
                pass
