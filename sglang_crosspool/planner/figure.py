"""Numbers that carry their own arithmetic.

In: integers and labels. Out: `Figure(value, how)`, where `how` is the human-readable
calculation that produced `value` ("48 layers x 2 x 4 kv_heads x 128 x 2 B = 98,304 B"), and
formatting helpers shared by the report. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


@dataclass(frozen=True)
class Figure:
    """A derived number and how it was derived (the string ends with `= value unit`)."""

    value: int | float  # ints stay ints through plan.json
    how: str

    def __int__(self) -> int:
        return int(self.value)


def num(n: float) -> str:
    """12,345 for integers; 3 significant decimals for floats."""
    if isinstance(n, int) or float(n).is_integer():
        return f"{int(n):,}"
    return f"{n:,.3f}".rstrip("0").rstrip(".")


def size(n: float) -> str:
    """Bytes with a decimal-GB (or MB) hint: '57,982,058,496 B (57.98 GB)'."""
    if abs(n) >= GB:
        return f"{num(int(n))} B ({n / GB:.2f} GB)"
    if abs(n) >= 10**6:
        return f"{num(int(n))} B ({n / 10**6:.2f} MB)"
    return f"{num(int(n))} B"


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _term(term) -> tuple[int, str]:
    if isinstance(term, tuple):
        return term[0], f"{num(term[0])} {term[1]}"
    return term, num(term)


def product(*terms, unit: str = "B", note: str = "") -> Figure:
    """Multiplies terms, each an int or (int, label): `product((48, "layers"), 2, unit="B")`."""
    value = 1
    parts = []
    for term in terms:
        v, text = _term(term)
        value *= v
        parts.append(text)
    return Figure(value, f"{' x '.join(parts)} = {_with_unit(value, unit)}{note}")


def total(parts: list[tuple[str, int | Figure]], unit: str = "B") -> Figure:
    """Sums named parts: 'embedding 1 + attention 2 = 3 B'."""
    value = sum(int(v) for _, v in parts)
    text = " + ".join(f"{label} {num(int(v))}" for label, v in parts)
    return Figure(value, f"{text} = {_with_unit(value, unit)}")


def _with_unit(value: float, unit: str) -> str:
    return size(value) if unit == "B" else f"{num(value)} {unit}".rstrip()


def parse_size(text: str | int, what: str = "size") -> int:
    """'80GB' -> 80 * 10**9, '80GiB' -> 80 * 2**30, '2MiB', '4096' (bytes). GB is decimal."""
    if isinstance(text, int):
        value = text
    else:
        raw = text.strip().replace("_", "").replace(",", "")
        digits = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ").strip()
        unit = raw[len(digits):].strip().lower() or "b"
        if unit not in _SIZE_UNITS:
            raise ValueError(
                f"{what}: unknown unit in {text!r}; use B, KB, MB, GB, TB (powers of 1000) or "
                "KiB, MiB, GiB, TiB (powers of 1024)"
            )
        try:
            amount = float(digits)
        except ValueError:
            raise ValueError(f"{what}: {text!r} is not a size like 80GB or 2MiB") from None
        value = round(amount * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{what}: must be > 0, got {text!r}")
    return value
