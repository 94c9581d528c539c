"""The errors the library raises, and how a failed capture is described to the user."""

from __future__ import annotations

import traceback
from collections.abc import Callable

__all__ = ["BudgetError", "CaptureError", "describe_capture_failure", "unwrap_compile_error"]


class CaptureError(RuntimeError):
    """The step cannot be captured as one graph; the message says why and where."""


class BudgetError(RuntimeError):
    """The memory budget cannot be met even by recomputing every activation that can be."""


def unwrap_compile_error(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first exception of one of ``types`` in the chain under a dynamo/compile error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, types):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return None


def describe_capture_failure(fn: Callable, exc: BaseException) -> CaptureError:
    """A :class:`CaptureError` that says which function could not be captured, where and why."""
    where = _user_frame(exc)
    # (dynamo's BackendCompilerFailed says only "backend='...' raised:" on its first line)
    why = getattr(exc, "inner_exception", None) or exc
    return CaptureError(
        f"could not capture {getattr(fn, '__qualname__', fn)!r} as one graph"
        f"{' at ' + where if where else ''}: {type(why).__name__}: {_first_lines(why)}"
    )


def _first_lines(exc: BaseException, n: int = 6) -> str:
    return "\n".join(str(exc).strip().splitlines()[:n])


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and this library (the user's code), as
    'file:line in func'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/lightning_ac/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}"
