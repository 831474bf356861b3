"""Per-key rate limits: jobs per minute, and full denoising steps per minute.

`LESA_REQUESTS_PER_MINUTE_PER_KEY` counts the jobs an API key creates. `LESA_STEPS_PER_MINUTE_PER_KEY`
counts what they cost the GPUs: a job's full (computed) steps times its images, a video's frames
counting as images. Predicted steps are free, so a key's budget goes further at a higher
acceleration level: a 50-step image costs 50 at full compute and 10 at 5x.

Each limit is a GCRA bucket (the "generic cell rate algorithm"): a key may spend its whole minute at
once, and then earns it back evenly over the minute. The bucket is one number per key and limit,
the "theoretical arrival time" (TAT): when the key's spending so far will have been earned back.
A request of cost c moves it c x (60 s / limit) on; it is refused if that would put the TAT more
than a minute ahead of now, and then it moves nothing. With several limits a request is charged
on all or on none.

The TATs live where the job queue keeps its state (`JobQueue.spend`): in Redis, every API replica
sees one budget per key, timed by Redis's clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from service.queue import JobQueue, JobSpec

WINDOW_S = 60.0  # the limits are per minute, and a key may spend one minute's worth at once


@dataclass(frozen=True)
class LimitState:
    """One limit after a charge (or the refused attempt), for the response headers."""

    name: str  # "requests" | "steps": OpenAI's x-ratelimit-*-<name> headers
    limit: int  # units per minute
    remaining: int  # units the key could spend now
    reset_s: float  # until the whole minute's allowance is back
    retry_after_s: float  # refused: until this request would be allowed; 0 when allowed


@dataclass(frozen=True)
class Charge:
    allowed: bool
    limits: tuple[LimitState, ...]

    @property
    def retry_after_s(self) -> float:
        return max((s.retry_after_s for s in self.limits), default=0.0)

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers, one set per limit (`x-ratelimit-limit-requests`, ...)."""
        out: dict[str, str] = {}
        for state in self.limits:
            out[f"x-ratelimit-limit-{state.name}"] = str(state.limit)
            out[f"x-ratelimit-remaining-{state.name}"] = str(state.remaining)
            out[f"x-ratelimit-reset-{state.name}"] = f"{state.reset_s:.3f}s"
        return out


class RateLimiter:
    """The per-key limits of one deployment; `limits` maps a limit's name to its units per minute
    (0 = no such limit)."""

    def __init__(self, limits: Mapping[str, int], queue: JobQueue) -> None:
        self.limits = {name: per_minute for name, per_minute in limits.items() if per_minute > 0}
        self.queue = queue

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    async def charge(self, owner: str, costs: Mapping[str, float]) -> Charge:
        """Spend `costs` (per limit name) of `owner`'s budgets, on all limits or none. Raises
        `QueueUnavailable` when the queue's store cannot be reached."""
        names = [n for n in self.limits if n in costs]
        per_unit = [WINDOW_S / self.limits[n] for n in names]
        allowed, aheads = await self.queue.spend(
            [f"rate:{n}:{owner}" for n in names], per_unit, [float(costs[n]) for n in names], WINDOW_S
        )
        states = []
        for name, unit, tat_ahead in zip(names, per_unit, aheads, strict=True):
            spent = tat_ahead if allowed else tat_ahead - costs[name] * unit  # refused: where it was
            states.append(
                LimitState(
                    name=name,
                    limit=self.limits[name],
                    remaining=max(0, math.floor((WINDOW_S - spent) / unit + 1e-9)),
                    reset_s=max(0.0, spent),
                    retry_after_s=0.0 if allowed else max(0.0, tat_ahead - WINDOW_S),
                )
            )
        return Charge(allowed, tuple(states))

    async def refund(self, owner: str, costs: Mapping[str, float]) -> None:
        """Give back a charge whose request made no job (a replayed Idempotency-Key, a full queue)."""
        await self.charge(owner, {name: -cost for name, cost in costs.items()})


def job_costs(spec: JobSpec) -> dict[str, float]:
    """What a job spends: one request, and its full steps times its images (a video's frames)."""
    import lesa_core

    steps = spec.num_inference_steps
    full = steps if "none" in (spec.level, spec.method) else len(lesa_core.level_schedule(spec.level, steps).full_steps)
    return {"requests": 1.0, "steps": float(full * spec.n * (spec.num_frames or 1))}
