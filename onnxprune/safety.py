"""Run-wide guards of the command line: a memory budget, staged outputs, quiet libraries.

- :func:`memory_budget` / :func:`check_allocation`: every array onnxprune allocates from a
  model's declared dims or from user-given sizes (random inputs, the shape probe's
  activations, image batches) is checked against a budget in bytes before it is allocated
  (``--max-memory``; default :data:`DEFAULT_MAX_MEMORY`). The budget is a context variable
  set by the CLI (and by callers of the Python API who want another one).
- :func:`staged_outputs`: within it, :func:`onnxprune.io.save_model` and
  :func:`onnxprune.io.write_text_atomic` write to hidden temporary files beside their
  destinations; only when the whole block succeeds are they moved into place (each with
  :func:`os.replace`). Any exception, Ctrl-C or SIGTERM included, removes them: a failed
  run leaves nothing behind. Outside the block writes happen at once, as before.
- :func:`quiet_libraries`: numpy floating-point warnings and library warnings do not reach
  the user (onnxprune reports what matters itself, in one line).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.errors import OnnxPruneError, OutputPathError, first_line

__all__ = ["DEFAULT_MAX_MEMORY", "OutputTransaction", "active_transaction", "check_allocation", "format_bytes",
           "memory_budget", "parse_size", "quiet_libraries", "staged_outputs"]


def _default_budget() -> int:
    """Half of the machine's memory, at most 16 GiB (4 GiB when it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30
    return int(min(16 << 30, max(total // 2, 1 << 30)))


#: Default memory budget in bytes for allocations made from declared or user-given sizes.
DEFAULT_MAX_MEMORY = _default_budget()

_budget: contextvars.ContextVar[int] = contextvars.ContextVar("onnxprune_memory_budget", default=DEFAULT_MAX_MEMORY)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str, option: str = "--max-memory") -> int:
    """``'4G'``, ``'512MiB'``, ``'1000000'`` -> bytes (binary units; a bare number is bytes).

    Raises:
        OnnxPruneError: not a positive size (the message names ``option``).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise OnnxPruneError(f"{option} {text!r}: expected a size such as 4G, 512M or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OnnxPruneError(f"{option} {text!r}: must be positive")
    return value


def format_bytes(n: float) -> str:
    """Bytes in binary units, e.g. ``'2.8 TiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


@contextlib.contextmanager
def memory_budget(max_bytes: int) -> Iterator[int]:
    """Within the block, :func:`check_allocation` refuses anything over ``max_bytes``."""
    token = _budget.set(int(max_bytes))
    try:
        yield int(max_bytes)
    finally:
        _budget.reset(token)


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` (e.g. ``"random input 'x' of shape 1x3x..."``)
    when it exceeds the memory budget.

    Raises:
        OnnxPruneError: over budget; the message names ``what``, the bytes and the budget.
    """
    limit = _budget.get()
    if nbytes > limit:
        raise OnnxPruneError(f"{what} would take {format_bytes(nbytes)}, over the memory budget of "
                             f"{format_bytes(limit)} (--max-memory)")


# ----------------------------------------------------------------------- staged outputs


@dataclass
class OutputTransaction:
    """Outputs written during a :func:`staged_outputs` block, not yet in place.

    Attributes:
        staged: ``(temporary file, destination)`` pairs, in write order.
        scratch: temporary folders to remove at the end.
    """

    staged: list[tuple[Path, Path]] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)

    def stage(self, tmp: Path, final: Path, scratch: Path | None = None) -> None:
        """Move ``tmp`` to ``final`` at commit (a later stage of the same path wins)."""
        self.staged = [(t, f) for t, f in self.staged if f != final]
        self.staged.append((Path(tmp), Path(final)))
        if scratch is not None:
            self.scratch.append(Path(scratch))

    def commit(self) -> None:
        """Move every staged file into place; on a failure, remove those this commit created.

        Raises:
            OutputPathError: a move failed (the message names the destination).
        """
        done: list[Path] = []
        try:
            for tmp, final in self.staged:
                existed = final.exists()
                os.replace(tmp, final)
                if not existed:
                    done.append(final)
        except OSError as exc:
            for p in done:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise OutputPathError(f"{final}: cannot write ({exc.strerror or first_line(exc)})") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove every staged file and scratch folder (nothing reaches its destination)."""
        for tmp, _ in self.staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for d in self.scratch:
            shutil.rmtree(d, ignore_errors=True)
        self.staged, self.scratch = [], []


_active: contextvars.ContextVar[OutputTransaction | None] = contextvars.ContextVar("onnxprune_outputs", default=None)


def active_transaction() -> OutputTransaction | None:
    """The transaction of the enclosing :func:`staged_outputs` block, or None."""
    return _active.get()


@contextlib.contextmanager
def staged_outputs() -> Iterator[OutputTransaction]:
    """Stage every output written inside the block; move them into place only when the block
    succeeds, remove them when it raises (any exception, KeyboardInterrupt included)."""
    tx = OutputTransaction()
    token = _active.set(tx)
    try:
        yield tx
    except BaseException:
        tx.abort()
        raise
    else:
        tx.commit()
    finally:
        _active.reset(token)


# ------------------------------------------------------------------------ quiet libraries


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """numpy floating-point warnings off and Python warnings not shown, within the block."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield

