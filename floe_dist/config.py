"""Small helpers for the typed settings dataclasses (one help text per field)."""
from __future__ import annotations

from dataclasses import field
from typing import Any

# What a setting means for resuming work saved under another value (floe_dist/resume.py); a setting marked with
# none of these shapes the result, so changing it refuses a resume.
RESUME_KINDS = {
    "runs": "how or where the work runs, never what it computes: any resume may change it",
    "length": "how long training or a search goes and how often it saves: a resume continues to the new end",
    "layout": "how a global batch is split over ranks and memory: a resume through a portable checkpoint may change it",
    "observes": "what is logged, not what is trained: any resume may change it",
    "campaign": "read by the campaign alone: a stage run alone ignores it",
}


def arg(default: Any, help: str, resume: str | None = None) -> Any:
    """A dataclass field whose help text becomes the CLI's ``--help`` line (a list or dict default: a fresh copy
    for each instance) and whose ``resume`` kind (RESUME_KINDS) the resume tables are derived from."""
    if resume is not None and resume not in RESUME_KINDS:
        raise ValueError(f"resume must be one of {sorted(RESUME_KINDS)}, got {resume!r}")
    metadata = {"help": help, **({"resume": resume} if resume else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: a setting that names several things."""
    return [t.strip() for t in text.split(",") if t.strip()]


def below_one(obj: Any, names: tuple[str, ...], prefix: str = "") -> list[str]:
    """``section.name must be >= 1`` (a tool's options: ``--flag-name``) for each named count field below 1."""
    key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: "--" + n.replace("_", "-"))
    return [f"{key(n)} must be >= 1, got {getattr(obj, n)}" for n in names if getattr(obj, n) < 1]


DURATION_FORMS = "seconds (900), 900s, 45m, 2h, 1h30m or Slurm's H:MM:SS and D-HH:MM:SS"


def duration_seconds(text: str, key: str) -> float:
    """``"1h30m"`` -> 5400.0: a wall-clock duration in the forms people write (``DURATION_FORMS``)."""
    import re

    value = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if re.fullmatch(r"\d+(:\d\d){1,2}", value):  # Slurm's --time: M:SS or H:MM:SS
        return float(sum(int(p) * 60 ** i for i, p in enumerate(reversed(value.split(":")))))
    days = re.fullmatch(r"(\d+)-(\d+)((?::\d\d){0,2})", value)  # Slurm's D-H, D-H:MM, D-H:MM:SS (squeue's %L)
    if days:
        rest = [int(p) for p in days.group(3).split(":")[1:]]
        return float(int(days.group(1)) * 86400 + int(days.group(2)) * 3600 + sum(
            p * 60 ** (1 - i) for i, p in enumerate(rest)))
    number = r"(\d+(?:\.\d+)?)\s*"
    match = re.fullmatch(rf"(?:{number}h\s*)?(?:{number}m\s*)?(?:{number}s)?", value)
    if not value or match is None:
        raise ValueError(f"{key}: {text!r} is not a duration; write {DURATION_FORMS}")
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


# ------------------------------------------------------------------------------------- compact settings
def short_float(value: float) -> str:
    """2e-4 -> "2e-4" (not "0.0002"): YAML's [2.0e-4, 3.0e-3] gives the string people write on the command line."""
    mantissa, exponent = f"{float(value):e}".split("e")
    written, plain = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}", repr(float(value))
    forms = (written, plain) if int(exponent) < 0 else (plain, written)  # the first of equal length wins
    return min((w for w in forms if float(w) == float(value)), key=len)


def integers(value: Any) -> bool:
    """A YAML list of integers (booleans are not counts)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def strings(value: Any, separator: str) -> bool:
    """A YAML list of strings none of which holds the compact form's separator."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and separator not in v for v in value)


class Compact(str):
    """A setting people write as YAML (a list, a pair, a map or a number) or, on the command line and in older
    recipes, as one compact string; the recipe holds the compact string, so what reads it, what resumes compare
    and the recipe.yaml a stage writes stay one form. ``parse`` turns either into that string, or raises a
    ValueError that says what the setting accepts; the recipe's checks (``problems``) judge the string."""

    accepts = "a string"

    @classmethod
    def parse(cls, value: Any) -> str:
        written = value if isinstance(value, str) else cls.join(value)
        if written is None:
            raise ValueError(f"expected {cls.accepts}, got {value!r}")
        return written

    @staticmethod
    def join(value: Any) -> str | None:
        """The compact string of a YAML value, or None when the value has another shape."""
        return None


class Names(Compact):
    accepts = "a list of names ([q_proj, v_proj]) or 'q_proj,v_proj'"
    join = staticmethod(lambda v: ",".join(v) if strings(v, ",") else None)


class Ranks(Compact):
    accepts = "a list of integers >= 1 ([2, 4, 8]) or '2,4,8'"
    join = staticmethod(lambda v: ",".join(map(str, v)) if integers(v) else None)


class LearningRates(Compact):
    accepts = "a range [LO, HI] searched on a log scale (or 'LO:HI'), or one value, each > 0 and LO <= HI"

    @staticmethod
    def join(value):
        if number(value):
            return short_float(value)
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value)):
            return f"{short_float(value[0])}:{short_float(value[1])}"
        return None


class Pairs(Compact):
    accepts = "a map ({instruction: question}) or 'instruction=question,...'"
    join = staticmethod(lambda v: ",".join(f"{k}={x}" for k, x in v.items())
                        if isinstance(v, dict) and strings([*v, *v.values()], ",") else None)


class StopStrings(Compact):
    accepts = "a list of strings ([\"\\n\", \"###\"]) or strings separated by '||'"
    # a newline as the string form writes it
    join = staticmethod(lambda v: "||".join(x.replace("\n", "\\n") for x in v) if strings(v, "||") else None)


class Schedule(Compact):
    accepts = "per-group counts as a list ([2, 4, 6, 8]) or digits ('2468'), or 'uniform'"
    join = staticmethod(lambda v: "".join(map(str, v)) if v and integers(v) and all(1 <= x <= 9 for x in v)
                        else None)


class ZeroConfig(Compact):
    accepts = "a ZeRO stage (0, 2, 3) or a DeepSpeed JSON path"
    join = staticmethod(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else None)


class Duration(Compact):
    accepts = DURATION_FORMS
    join = staticmethod(lambda v: f"{v:g}" if number(v) and v > 0 else None)


def register_compact_types() -> None:
    """Let jsonargparse parse every Compact setting with its own ``parse`` (idempotent)."""
    from jsonargparse.typing import register_type

    for cls in Compact.__subclasses__():
        register_type(cls, serializer=str, deserializer=cls.parse)
