"""When to grow or shrink the pool (``--autoscale=max,min``). Pure decisions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AutoscalePolicy:
    maximum: int
    minimum: int
    keepalive: float = 5.0
    """Seconds a slot must stay unused before the pool gives it up."""

    def decide(self, *, size: int, backlog: int, idle_slots: int, idle_for: float) -> int:
        """How many processes to add (positive) or remove (negative) now."""
        if backlog > 0 and size < self.maximum:
            return min(backlog, self.maximum - size)
        if backlog == 0 and idle_slots > 0 and size > self.minimum and idle_for >= self.keepalive:
            return -min(idle_slots, size - self.minimum)
        return 0


def parse_autoscale(value: str) -> AutoscalePolicy:
    """``"max,min"`` as Celery spells it (``"10"`` alone means max 10, min 0→1)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--autoscale takes MAX,MIN whole numbers, not {value!r}") from None
    if not numbers or len(numbers) > 2:
        raise ValueError(f"--autoscale takes MAX,MIN, not {value!r}")
    maximum = numbers[0]
    minimum = numbers[1] if len(numbers) == 2 else 1
    maximum, minimum = max(maximum, minimum), min(maximum, minimum)
    minimum = max(minimum, 1)
    if maximum < 1:
        raise ValueError("--autoscale MAX must be at least 1")
    return AutoscalePolicy(maximum, minimum)
