"""What pattern a transformers mask function describes, read from how `masking_utils` composes it: `and_masks` keeps
its parts in the closure variable `mask_functions`, `sliding_window_overlay` its window in `sliding_window` (private
structure, the same in transformers 5.17 to 5.24; tests/test_seams.py guards it)."""

from __future__ import annotations

from transformers import masking_utils

__all__ = ["causal_window"]

_MODULE = masking_utils.__name__


def causal_window(mask_function) -> tuple[bool, int | None]:
    """(True, None) for transformers' causal mask function, (True, w) for a sliding-window causal one (`and_masks` of
    causal and windows: the narrowest wins), (False, None) for anything else (bidirectional parts, token types,
    chunks, a user's function)."""
    windows: list[int] = []
    causal = [False]
    if not _walk(mask_function, windows, causal) or not causal[0]:
        return False, None
    return True, min(windows) if windows else None


def _walk(fn, windows: list[int], causal: list[bool]) -> bool:
    if fn is masking_utils.causal_mask_function:
        causal[0] = True
        return True
    if getattr(fn, "__module__", None) != _MODULE:
        return False
    cells = _closure(fn)
    name = getattr(fn, "__qualname__", "")
    if name == "and_masks.<locals>.and_mask" and isinstance(cells.get("mask_functions"), tuple):
        return all(_walk(part, windows, causal) for part in cells["mask_functions"])
    window = cells.get("sliding_window")
    if name == "sliding_window_overlay.<locals>.inner_mask" and type(window) is int and window > 0:
        windows.append(window)
        return True
    return False


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    except ValueError:  # an empty cell
        return {}
