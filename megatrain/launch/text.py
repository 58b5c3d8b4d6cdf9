"""Words for launch errors: the first line of an exception, rank lists as ranges."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def rank_list(values: list[int]) -> str:
    return f"rank{'s' if len(values) > 1 else ''} {ranges(values)}"


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (a thousand missing ranks stay one line)."""
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)
