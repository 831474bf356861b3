"""Memory-aware batching: cap the work per pipeline call, and split a batch instead of failing it on OOM.

Activation memory of a DiT pipeline grows with batch x pixels x frames (the token count is
proportional to pixels x frames, the VAE decode likewise), so that product is the one number a
node operator caps. When the cap is still too optimistic, an out-of-memory error splits the
failing chunk in halves down to single samples: one sample that does not fit fails alone
instead of taking its batch-mates with it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


def sample_cost(height: int, width: int, num_frames: int | None) -> int:
    """Pixels x frames of one sample: the unit `max_batch_pixels` is counted in."""
    return int(height) * int(width) * max(1, int(num_frames or 1))


def plan_chunks(batch_size: int, cost: int, max_batch_pixels: int | None) -> list[int]:
    """Chunk sizes (in order, summing to batch_size) so that each chunk's size x cost <= the cap.

    A single sample over the cap still runs alone: the cap bounds batching, it does not refuse
    requests (the API's size and frame limits do that).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not max_batch_pixels or max_batch_pixels <= 0:
        return [batch_size]
    per_chunk = max(1, int(max_batch_pixels) // max(1, cost))
    full, rest = divmod(batch_size, per_chunk)
    return [per_chunk] * full + ([rest] if rest else [])


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA (and MPS / CPU allocator) out-of-memory errors, which torch raises as RuntimeError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory() -> None:
    """Drop what the failed attempt left allocated before retrying smaller."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_split(
    indices: Sequence[int],
    run: Callable[[list[int]], list[T]],
    on_split: Callable[[list[int], BaseException], None] | None = None,
) -> list[T]:
    """`run(indices)` -> one result per index; on OOM, run each half separately (recursively).

    Any other error propagates unchanged (cancellation included), and so does an OOM on a single
    sample: there is nothing left to split.
    """
    chunk = list(indices)
    try:
        return run(chunk)
    except Exception as error:  # noqa: BLE001 - filtered just below; everything else is re-raised
        if not is_out_of_memory(error) or len(chunk) == 1:
            raise
        # Keep the traceback out of the retries: it pins the failed attempt's tensors in memory.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        del error
    free_memory()
    half = len(chunk) // 2
    logger.warning("out of memory on a batch of %d (%s): retrying as %d + %d", len(chunk), message, half,
                   len(chunk) - half)  # fmt: skip
    if on_split is not None:
        on_split(chunk, RuntimeError(message))
    return run_with_oom_split(chunk[:half], run, on_split) + run_with_oom_split(chunk[half:], run, on_split)
