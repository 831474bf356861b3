"""`JobQueue` on Redis Streams: one API tier feeding any number of worker processes on any nodes.

Layout (every key starts with `prefix`, default `lesa`, so several deployments or test runs can
share one Redis):

* `<p>:jobs:<model>` — one stream per model. One entry per job (`id=<job id>`), consumed by the
  group `<p>-workers` (`XREADGROUP`). Jobs of priority "high" / "low" go to the model's
  `<p>:jobs-high:<model>` / `<p>:jobs-low:<model>` instead: a worker takes the head of the highest
  class that has one (see "Priority" below), so every stream stays plain FIFO. A worker reads
  only the streams of the models it has loaded, so pools that serve different models (one model
  per GPU) share one Redis without taking each other's jobs, and each model's lag is its own
  autoscaling signal. An entry stays in the group's pending list (PEL) from delivery until the
  job's result is stored; results and `XACK` are written by one Lua script, so a job is
  acknowledged exactly when its result exists.
* `<p>:models` — set of the models that have a stream (what a worker without a model list, the
  metrics and the housekeeping walk).
* `<p>:job:<id>` — hash with the job record (spec JSON, status, progress, timestamps, attempts,
  error/result JSON, stream and entry id). Unfinished jobs live `job_ttl_s`; finished ones until
  `expires_at` (`result_ttl_s`).
* `<p>:partial:<id>` — partial images of a streamed job while it runs (index -> bytes; the job
  hash counts them in `partials`), expiring with the job.
* `<p>:art:<id>` / `<p>:files:<id>` — outputs: small ones inline in Redis, larger ones
  (> `inline_max_bytes`) as files under `output_dir` (a volume shared by API and workers), the
  hash holding the path.
* `<p>:queued:<model>` — sorted set of a model's job ids not yet started: `depth()` and the
  backlog limit, per model (a model no worker serves fills its own backlog, not the others').
  Scored in the order workers take them (creation time, offset by priority class), so a job's
  rank is its `queue_position`.
* `<p>:index`, `<p>:index:<kind>` — sorted sets by creation time for `list()`.
* `<p>:idem:<sha256>` — Idempotency-Key -> job id, kept as long as the job.
* `<p>:live:<owner>` — sorted set of an owner's (API key's) live jobs by creation time: the
  `max_jobs_per_owner` limit, checked and filled by the submit script, emptied by the scripts that
  end a job (the job hash names its set in `live`).
* `<p>:workers`, `<p>:workers:<model>` — sorted sets worker id -> last heartbeat, of all workers
  and of those serving a model (live worker count; a model's Retry-After).
* `<p>:quality:<model>:<level>` — list of the latest shadow-check PSNRs of a LESA level (newest
  first, `QUALITY_WINDOW` at most; expires a week after the last check): what "auto" judges the
  level by once it has enough (`record_quality`, `live_quality`).
* `<p>:events` — pub/sub channel: job ids that became terminal (wakes `wait()` at once).
* `<p>:outbox` — stream of job ends for the webhook senders (`outbox` set: written by the same
  script that records the end), consumed by the same group name; a sender acknowledges an event
  once delivered or given up, and a dead sender's events are reclaimed after their lease.

Every state change that must not race is one Lua script (status only moves forward; the first
`complete`/`fail` wins and later ones only acknowledge), so two workers that both ran a
re-delivered job still leave exactly one result.

Crash recovery: a worker that dies leaves its entries in the PEL. Live workers `XAUTOCLAIM`
entries idle longer than `visibility_timeout_s`; running workers keep theirs fresh with an
`XCLAIM` heartbeat from `set_progress` (once per denoising step at most every quarter timeout),
so only dead or hung workers lose jobs. A job delivered `max_deliveries` times without finishing is
marked failed with the last error.

Batching: `XREADGROUP` hands out entries in stream order whatever their shape, so a worker keeps
incompatible entries it has read in a small local carry-over list (bounded by `max_batch`) and
starts them first in its next batch. They stay in the PEL meanwhile: if the worker dies, or is
slower than the visibility timeout, another worker takes them (the start script checks the worker
still owns an entry, so nobody runs a job that was handed to someone else). On shutdown the
carry-over is released for other workers at once. The `max_wait_ms` window for compatible late
arrivals opens only under concurrency (previous batch held several jobs, or others were waiting),
so a lone client never pays it.

Priority: a worker reads its models' streams of every class. Whatever it holds or peeks at is
ordered by `line_time` (class, then entry age; with `priority_aging_s`, age in seconds against
class), so it starts the entry that comes first of all, and tops its batch up from that entry's
stream only (a batch holds one class: `JobSpec.batch_key`).

Not supported: Redis Cluster (the scripts touch a few keys they derive instead of declare).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.queue import (
    PRIORITIES,
    QUALITY_WINDOW,
    Job,
    JobError,
    JobEvent,
    JobKind,
    JobQueue,
    JobResult,
    JobSpec,
    JobStatus,
    Priority,
    QueueFull,
    QueueUnavailable,
    TooManyJobs,
    UnknownCursor,
    line_time,
    new_job_id,
)

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")
QUALITY_TTL_S = 7 * 24 * 3600  # a level's shadow-check figures outlive restarts, not a week without checks


class RedisQueueSettings(BaseSettings):
    """Redis queue and `lesa worker` settings (env `LESA_*`, like `service.settings.Settings`).

    Kept here rather than in `Settings` so the API settings stay about the API; both read the same
    environment, and `Settings` ignores these names.
    """

    # allow_inf_nan=False: "nan" or "inf" in a number would pass every bound and then mean nothing
    model_config = SettingsConfigDict(env_prefix="LESA_", env_file=".env", extra="ignore", allow_inf_nan=False)

    redis_url: str | None = Field(None, description="redis://host:port/db; unset = in-process queue")
    redis_prefix: str = Field("lesa", description="key prefix; streams `<p>:jobs:<model>`, group `<p>-workers`")
    redis_output_dir: Path = Field(
        Path("outputs/redis"), description="shared directory for outputs above redis_inline_max_bytes"
    )
    redis_inline_max_bytes: int = Field(1_000_000, ge=0, description="larger outputs go to redis_output_dir")
    redis_visibility_timeout_s: float = Field(
        300.0, gt=0, description="a delivered job with no heartbeat for this long is re-delivered"
    )
    redis_max_deliveries: int = Field(3, ge=1, description="deliveries before a job that never finishes fails")
    redis_job_ttl_s: float = Field(86400.0, gt=0, description="how long an unfinished job record is kept")
    redis_socket_timeout_s: float = Field(
        3.0, gt=0, description="a Redis call not answered in this long is a 503 (must exceed the workers' 1 s reads)"
    )
    max_backlog: int = Field(256, ge=1, description="queued jobs of one model beyond which its requests get 429")
    priority_aging_s: float | None = Field(
        None, gt=0, description="seconds a job's class is worth in the take order (`Settings.priority_aging_s`)"
    )
    result_ttl_s: float = Field(3600.0, gt=0)
    # (LESA_MAX_BATCH / LESA_MAX_WAIT_MS: `Settings` holds them, for the embedded and standalone workers alike.)
    # `lesa worker` only:
    worker_name: str | None = Field(None, description="consumer name (default: host-pid-random)")
    worker_metrics_host: str = Field("0.0.0.0", description="where the worker's /metrics server listens")
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="0 = no metrics server")
    worker_engine: str | None = Field(
        None,
        description="`module:callable(settings) -> engine` used instead of Engine.load (tests and "
        "benchmarks that need a cheaper pipeline than the reference models)",
    )


# ---- Lua ------------------------------------------------------------------------------------
# Status strings are compared literally; keep in sync with JobStatus.

# Put in front of the scripts that end a job (_START's give-up, _FINISH, _CANCEL, _FAIL_QUEUED).
# outbox_add keeps the end as a webhook event (a sender that never comes cannot fill Redis: the
# stream is capped); live_done takes the job off its owner's live set (max_jobs_per_owner);
# drop_uploads forgets an image job's uploads.
_JOB_END = """
local function outbox_add(outbox, job_key, id, status, at)
  local kind = cjson.decode(redis.call('HGET', job_key, 'spec'))['kind']
  redis.call('XADD', outbox, 'MAXLEN', '~', '100000', '*', 'job', id, 'kind', kind, 'status', status, 'at', at)
end
local function live_done(job_key, id)
  local live = redis.call('HGET', job_key, 'live')
  if live and live ~= '' then redis.call('ZREM', live, id) end
end
-- An ended image job's uploads are of no more use (only videos are remixed, with their first frame),
-- and a photo's are MBs: kept for the job's result TTL they would fill Redis.
local function drop_uploads(job_key)
  local spec = redis.call('HGET', job_key, 'spec')
  if spec and cjson.decode(spec)['kind'] ~= 'video' then redis.call('HDEL', job_key, 'uploads') end
end
"""

_SUBMIT = """
-- KEYS: job, stream (the model's), queued (the model's), index, kind index, idempotency key, models set,
--       owner's live set
-- ARGV: id, spec, created_at, idempotency key ('' = none), max_backlog, job_ttl_s, job key prefix, model,
--       max jobs per owner ('0' = no limit), owner ('1' = the job has one), backlog score (the
--       job's `line_time`: the order workers take the model's jobs in),
--       stats field (job_s:<the model's normal stream>: seconds per job of the model, any class),
--       uploads (the spec's JobSpec.UPLOADS as JSON, '' = none: a field `get` does not read)
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing and redis.call('EXISTS', ARGV[7] .. existing) == 1 then
    return {'existing', existing}
  end
end
local depth = redis.call('ZCARD', KEYS[3])
if depth >= tonumber(ARGV[5]) then
  return {'full', tostring(depth)}
end
local owned = ARGV[10] == '1'
if owned then
  -- members whose record expired unfinished (no worker ever took them) no longer count
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[6]))
  local live = redis.call('ZCARD', KEYS[8])
  if ARGV[9] ~= '0' and live >= tonumber(ARGV[9]) then
    return {'owner_full', tostring(live)}
  end
  redis.call('ZADD', KEYS[8], ARGV[3], ARGV[1])
  redis.call('EXPIRE', KEYS[8], ARGV[6])
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'status', 'queued', 'progress', '0', 'created_at', ARGV[3],
  'attempts', '0', 'stream', KEYS[2], 'queued', KEYS[3], 'entry', entry, 'idem', ARGV[4],
  'live', owned and KEYS[8] or '', 'score', ARGV[11], 'stats', ARGV[12])
if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'uploads', ARGV[13]) end
redis.call('SADD', KEYS[7], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[11], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[6], ARGV[1], 'EX', ARGV[6])
end
return {'new', entry, tostring(redis.call('ZRANK', KEYS[3], ARGV[1]))}
"""

_START = """
-- Start one delivered job on this worker, or tell why not.
-- KEYS: job, stream, queued, partial, outbox
-- ARGV: id, entry, consumer, now, max_deliveries, group, result_ttl_s, events channel, visibility_s, worker id,
--       outbox ('1' = keep an event for a job given up on), job_ttl_s
local function ack()
  redis.call('XACK', KEYS[2], ARGV[6], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
-- Only the consumer that owns the entry may start it (another worker may have reclaimed it).
local owned = redis.call('XPENDING', KEYS[2], ARGV[6], ARGV[2], ARGV[2], 1, ARGV[3])
if #owned == 0 then return 'lost' end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then ack() return 'gone' end
if status == 'completed' or status == 'failed' or status == 'cancelled' then ack() return 'terminal' end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if status == 'in_progress' then
  local prev = redis.call('HGET', KEYS[1], 'consumer') or '?'
  redis.call('HSET', KEYS[1], 'last_error', 'delivery ' .. attempts .. ' (worker ' .. prev ..
    ') was abandoned: no heartbeat for ' .. ARGV[9] .. ' s (the worker crashed, was killed or hung)')
end
if attempts >= tonumber(ARGV[5]) then
  local last = redis.call('HGET', KEYS[1], 'last_error') or 'unknown'
  local err = cjson.encode({code = 'max_deliveries_exceeded',
    message = 'gave up after ' .. attempts .. ' deliveries; last error: ' .. last})
  local now = tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'completed_at', ARGV[4],
    'expires_at', tostring(now + tonumber(ARGV[7])))
  local ttl = math.ceil(tonumber(ARGV[7]) * 1000)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
  local idem = redis.call('HGET', KEYS[1], 'idem')
  if idem and idem ~= '' then redis.call('PEXPIRE', idem, ttl) end
  ack()
  live_done(KEYS[1], ARGV[1])
  drop_uploads(KEYS[1])
  if ARGV[11] == '1' then outbox_add(KEYS[5], KEYS[1], ARGV[1], 'failed', ARGV[4]) end
  redis.call('PUBLISH', ARGV[8], ARGV[1])
  return 'dead'
end
-- progress restarts at 0: a re-delivered job runs again from its first step (and partial images)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'started_at', ARGV[4], 'worker_id', ARGV[10],
  'consumer', ARGV[3], 'attempts', tostring(attempts + 1), 'progress', '0', 'partials', '0')
redis.call('ZREM', KEYS[3], ARGV[1])
-- The delivery's lease starts now, however long the entry waited in this worker's carry-over
-- (else another worker could reclaim a job that is running well).
redis.call('XCLAIM', KEYS[2], ARGV[6], ARGV[3], 0, ARGV[2], 'JUSTID')
-- And the record lives job_ttl_s from its start, not from its submit: a job that waited long must
-- not expire while it runs (its result would have nowhere to go).
local job_ttl = math.ceil(tonumber(ARGV[12]) * 1000)
redis.call('PEXPIRE', KEYS[1], job_ttl)
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and idem ~= '' then redis.call('PEXPIRE', idem, job_ttl) end
return 'ok'
"""

_UNSTART = """
-- Undo _START for a job this consumer started but will not run (its claim was cancelled).
-- KEYS: job, queued; ARGV: id, consumer
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' or redis.call('HGET', KEYS[1], 'consumer') ~= ARGV[2] then
  return 0
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', tostring(math.max(0, attempts - 1)))
redis.call('HDEL', KEYS[1], 'started_at', 'worker_id', 'consumer')
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'score') or redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return 1
"""

_HEARTBEAT = """
-- Reset the idle time of entries this worker still owns (never steal one back).
-- KEYS: stream; ARGV: group, worker, entry...
local kept = 0
for i = 3, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""

_RELEASE = """
-- Make entries this worker still owns idle past the visibility timeout, so another worker takes
-- them now; never one another worker has reclaimed since (it runs it). KEYS: stream;
-- ARGV: group, worker, idle ms, entry...
local released = 0
for i = 4, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    released = released + 1
  end
end
return released
"""

_PROGRESS = """
-- KEYS: job; ARGV: progress. Forward only, running jobs only.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'progress') or '0')
if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'progress', ARGV[1]) end
return 1
"""

_GET = """
-- A job's record and, while it is queued, its place in its model's backlog: one round trip (the
-- SSE streams and pollers read a waiting job over and over). KEYS: job; ARGV: id, the record's
-- fields (_RECORD_FIELDS: not its uploads, which can be MBs)
local record = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
local rank = false
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  local queued = redis.call('HGET', KEYS[1], 'queued')
  if queued then rank = redis.call('ZRANK', queued, ARGV[1]) end
end
return {record, rank}
"""

_PARTIAL = """
-- KEYS: job, partial; ARGV: index, bytes. Running jobs only; the partials expire with the job.
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local count = tonumber(redis.call('HGET', KEYS[1], 'partials') or '0')
if tonumber(ARGV[1]) + 1 > count then redis.call('HSET', KEYS[1], 'partials', tostring(tonumber(ARGV[1]) + 1)) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

_PEEK = """
-- KEYS: streams; ARGV: group. Per stream, the id of its first entry not yet delivered to the group
-- ('' if none, or no stream). Delivers nothing: the entries stay free for any worker. A stream
-- without the group (Redis restarted without its data, and a submit made the stream again) waits
-- from its start, as the read that recreates the group from id 0 will see it.
local out = {}
for i, stream in ipairs(KEYS) do
  out[i] = ''
  if redis.call('EXISTS', stream) == 1 then
    local last = '0-0'
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local fields = {}
      for j = 1, #group, 2 do fields[group[j]] = group[j + 1] end
      if fields['name'] == ARGV[1] then last = fields['last-delivered-id'] end
    end
    local first = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
    if #first > 0 then out[i] = first[1][1] end
  end
end
return out
"""

_FINISH = """
-- Store a result (or error), mark terminal and acknowledge, atomically. A job that is already
-- terminal (cancelled, or finished by another delivery) is only acknowledged: first writer wins.
-- KEYS: job, art, files, stats, partial, outbox (the stream and queued set are the ones the job hash names)
-- ARGV: id, group, status, payload json, now, result_ttl_s, events channel, outbox ('1' = keep an event),
--       n_inline, name, bytes, ..., n_files, name, path, ...
local stream, entry = unpack(redis.call('HMGET', KEYS[1], 'stream', 'entry'))
if stream and entry then
  redis.call('XACK', stream, ARGV[2], entry)
  redis.call('XDEL', stream, entry)
end
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'completed' or status == 'failed' or status == 'cancelled' then
  return 0
end
local now = tonumber(ARGV[5])
local ttl = math.ceil(tonumber(ARGV[6]) * 1000)  -- milliseconds: sub-second TTLs expire on time
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'completed_at', ARGV[5], 'expires_at', tostring(now + tonumber(ARGV[6])))
if ARGV[3] == 'completed' then
  redis.call('HSET', KEYS[1], 'result', ARGV[4], 'progress', '100')
else
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
local i = 10
local n_inline = tonumber(ARGV[9])
for _ = 1, n_inline do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n_files = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_files do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('PEXPIRE', KEYS[1], ttl)
if n_inline > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
if n_files > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
redis.call('PEXPIRE', KEYS[5], ttl)
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and idem ~= '' then redis.call('PEXPIRE', idem, ttl) end
local queued = redis.call('HGET', KEYS[1], 'queued')
if queued then redis.call('ZREM', queued, ARGV[1]) end
-- Smoothed seconds per job (start to finish) of the job's model (field job_s:<its normal stream>),
-- for the Retry-After estimate: a video model's minutes must not stretch an image model's wait.
local started = tonumber(redis.call('HGET', KEYS[1], 'started_at') or '')
if started then
  local d = now - started
  local field = redis.call('HGET', KEYS[1], 'stats') or ('job_s:' .. (redis.call('HGET', KEYS[1], 'stream') or ''))
  local old = tonumber(redis.call('HGET', KEYS[4], field) or tostring(d))
  redis.call('HSET', KEYS[4], field, tostring(0.8 * old + 0.2 * d))
end
live_done(KEYS[1], ARGV[1])
drop_uploads(KEYS[1])
if ARGV[8] == '1' then outbox_add(KEYS[6], KEYS[1], ARGV[1], ARGV[3], ARGV[5]) end
redis.call('PUBLISH', ARGV[7], ARGV[1])
return 1
"""

_CANCEL = """
-- KEYS: job, partial; ARGV: id, now, result_ttl_s, events channel
-- Returns 1 if this call cancelled the job, 0 if it was unknown or already terminal (so that of
-- two racing cancels only one is counted).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return 0 end
local now = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'completed_at', ARGV[2], 'expires_at', tostring(now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[3]) * 1000))
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and idem ~= '' then redis.call('PEXPIRE', idem, math.ceil(tonumber(ARGV[3]) * 1000)) end
-- The stream entry stays: the worker that reads it (or is running it) acknowledges it. (Deleting an
-- unread entry would make Redis report the group's lag as unknown until a worker reads past it:
-- the autoscaler's and LesaModelUnserved's signal.)
local queued = redis.call('HGET', KEYS[1], 'queued')
if queued then redis.call('ZREM', queued, ARGV[1]) end
live_done(KEYS[1], ARGV[1])
drop_uploads(KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""

_FAIL_QUEUED = """
-- Fail a job no worker has started: its queue deadline passed (the API saw it first).
-- KEYS: job, partial, outbox; ARGV: id, now, result_ttl_s, events channel, error json, outbox ('1' = keep an event)
-- Returns 1 if this call failed it, 0 if it was unknown, started or ended meanwhile.
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local now = tonumber(ARGV[2])
local ttl = math.ceil(tonumber(ARGV[3]) * 1000)
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[5], 'completed_at', ARGV[2],
  'expires_at', tostring(now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and idem ~= '' then redis.call('PEXPIRE', idem, ttl) end
-- The stream entry stays, as for a cancelled job (see _CANCEL).
local queued = redis.call('HGET', KEYS[1], 'queued')
if queued then redis.call('ZREM', queued, ARGV[1]) end
live_done(KEYS[1], ARGV[1])
drop_uploads(KEYS[1])
if ARGV[6] == '1' then outbox_add(KEYS[3], KEYS[1], ARGV[1], 'failed', ARGV[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""


_SPEND = """
-- `spend`: move every budget's TAT or none. KEYS: one TAT per budget; ARGV: window_s, then per budget
-- seconds per unit and cost (a negative cost refunds: always applied). Returns 1 or 0, then per budget
-- how far its TAT is (would be, if refused) ahead of now, in seconds. Timed by Redis's clock, which every
-- API replica shares.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local window = tonumber(ARGV[1])
local ok = 1
local tats = {}
local ahead = {}
for i, key in ipairs(KEYS) do
  local per_unit, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  tats[i] = tat + cost * per_unit
  ahead[i] = tostring(tats[i] - now)
  if cost > 0 and tats[i] - now > window + 1e-6 then ok = 0 end  -- float sums miss by ~1e-7
end
if ok == 1 then
  for i, key in ipairs(KEYS) do
    local ms = math.ceil((tats[i] - now) * 1000)
    if ms > 0 then redis.call('SET', key, tostring(tats[i]), 'PX', ms) else redis.call('DEL', key) end
  end
end
return {ok, ahead}
"""


# Redis up but refusing writes: failing to save (MISCONF), or over maxmemory as a script reports it
# (a plain command's OOM is redis-py's OutOfMemoryError).
_REDIS_REFUSES_WRITES = re.compile(r"\bOOM command not allowed|\bMISCONF\b")

P = ParamSpec("P")
T = TypeVar("T")


def _translate_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Map "Redis cannot be reached" or "cannot take writes now" (out of memory, failing to save)
    to `QueueUnavailable` (-> 503 with Retry-After), with where and why."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        # Builtin ConnectionError / TimeoutError: socket-level failures redis-py lets through.
        # Not OSError at large: a full output disk is not "Redis unavailable".
        except (
            RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError, ConnectionError, TimeoutError
        ) as error:  # fmt: skip
            failure: Exception = error
        except ResponseError as error:
            if not _REDIS_REFUSES_WRITES.search(str(error)):
                raise
            failure = error
        queue = args[0]
        assert isinstance(queue, RedisJobQueue)
        raise QueueUnavailable(f"the job queue (Redis at {queue.where}) is unavailable: {failure}") from failure

    return wrapper


@dataclass
class _Entry:
    """A stream entry this worker has been delivered but not started yet."""

    stream: str
    entry_id: str
    job_id: str
    spec: JobSpec


@dataclass
class _Active:
    """A job this worker started: where its entry is, and when its delivery was last kept alive."""

    consumer: str
    stream: str
    entry_id: str
    heartbeat: float


# the stream name's kind per priority class ("jobs" for "normal": the streams of before priorities)
_STREAM_KINDS: dict[str, str] = {"high": "jobs-high", "normal": "jobs", "low": "jobs-low"}


def _id_age(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _take_order(priority: Priority, entry_id: str, aging_s: float | None) -> tuple[float, int]:
    """The order workers take entries in: `line_time` of the entry's creation (entry ids are
    millisecond times), then its sequence number within that millisecond."""
    ms, seq = _id_age(entry_id)
    return line_time(priority, ms / 1000.0, aging_s), seq


def _by_stream(entries: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(stream, entry id) pairs -> entry ids per stream (stream commands take one stream each)."""
    out: dict[str, list[str]] = {}
    for stream, entry_id in entries:
        out.setdefault(stream, []).append(entry_id)
    return out


def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _f(value: bytes | None) -> float | None:
    return None if value in (None, b"") else float(value)  # type: ignore[arg-type]


def _take_compatible(
    carry: list[_Entry], chosen: list[_Entry], key: tuple[Any, ...], samples: int, max_batch: int
) -> int:
    """Add carried entries with the head's batch key to `chosen`, in order; return the sample count."""
    for entry in carry:
        if samples >= max_batch:
            break
        if entry in chosen or entry.spec.batch_key() != key or samples + entry.spec.n > max_batch:
            continue
        chosen.append(entry)
        samples += entry.spec.n
    return samples


# The job hash's fields a record is made of (`_job_from_hash`): every read of a job but a worker's
# claim and `get_uploads` leaves out `uploads`.
_RECORD_FIELDS = (
    "spec", "status", "progress", "created_at", "started_at", "completed_at", "expires_at", "error", "result",
    "idem_key", "worker_id", "attempts", "partials",
)  # fmt: skip


def _record(values: Sequence[bytes | None]) -> dict[bytes, bytes | None]:
    """An HMGET of `_RECORD_FIELDS` as the hash `_job_from_hash` reads."""
    return {name.encode(): value for name, value in zip(_RECORD_FIELDS, values, strict=True)}


def _safe_name(name: str) -> str:
    # Output names come from our worker ("0.png", "video.mp4"), but they become file paths.
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise ValueError(f"invalid output name {name!r}")
    return name


class RedisJobQueue(JobQueue):
    """Redis Streams backend of `JobQueue`; see the module docstring for the design."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "lesa",
        max_backlog: int = 256,
        result_ttl_s: float = 3600.0,
        job_ttl_s: float = 86400.0,
        visibility_timeout_s: float = 300.0,
        max_deliveries: int = 3,
        max_jobs_per_owner: int = 0,
        priority_aging_s: float | None = None,
        inline_max_bytes: int = 1_000_000,
        output_dir: str | Path = "outputs/redis",
        socket_timeout_s: float = 3.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.max_backlog = max_backlog
        self.result_ttl_s = result_ttl_s
        self.job_ttl_s = job_ttl_s
        self.visibility_timeout_s = visibility_timeout_s
        self.max_deliveries = max_deliveries
        self.max_jobs_per_owner = max_jobs_per_owner
        self.priority_aging_s = priority_aging_s
        self.inline_max_bytes = inline_max_bytes
        self.output_dir = Path(output_dir)
        parts = urlsplit(url)
        # Never echo credentials in an error message.
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"

        # One quick retry re-dials a pooled socket that a Redis restart killed; more retries would
        # only delay the 503 a client should get while Redis is really down. Connection errors only,
        # not timeouts (redis-py retries both by default): a hung Redis (stopped, swapping, a stuck
        # disk) answers a retry no sooner, so each call waited two to four socket timeouts; and a
        # timed-out script may still have run (a retried submit could enqueue a job twice). A call
        # thus waits at most `socket_timeout_s`: 3 s by default, above the workers' blocking reads
        # (1 s slices) and the time a large result takes to write.
        self._redis: aioredis.Redis = aioredis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=15,
        )
        self.group = f"{prefix}-workers"
        self.k_models = f"{prefix}:models"
        self.k_index = f"{prefix}:index"
        self.k_workers = f"{prefix}:workers"
        self.k_stats = f"{prefix}:stats"
        self.channel = f"{prefix}:events"
        self.k_outbox = f"{prefix}:outbox"
        self._outbox_cursor = "0-0"  # where the next reclaim of expired event leases looks
        self._submit = self._redis.register_script(_SUBMIT)
        self._start = self._redis.register_script(_JOB_END + _START)
        self._unstart_script = self._redis.register_script(_UNSTART)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._release = self._redis.register_script(_RELEASE)
        self._progress = self._redis.register_script(_PROGRESS)
        self._get = self._redis.register_script(_GET)
        self._finish = self._redis.register_script(_JOB_END + _FINISH)
        self._cancel = self._redis.register_script(_JOB_END + _CANCEL)
        self._fail_queued = self._redis.register_script(_JOB_END + _FAIL_QUEUED)
        self._partial = self._redis.register_script(_PARTIAL)
        self._peek = self._redis.register_script(_PEEK)
        self._spend = self._redis.register_script(_SPEND)

        # Consumer names get a per-instance suffix: two processes that pass the same worker id
        # (e.g. "embedded" in two API replicas) must never share one pending-entries list, or the
        # ownership checks that prevent double starts could not tell them apart.
        self._instance = secrets.token_hex(3)
        self.draining = False  # set on shutdown: claim_batch stops taking work
        self._groups_ready: set[str] = set()  # streams whose consumer group this instance has made sure of
        self._carry: dict[str, list[_Entry]] = {}  # worker id -> delivered, not started
        self._read_streams: dict[str, set[str]] = {}  # consumer -> streams it has read (release() looks there)
        self._active: dict[str, _Active] = {}  # job id -> its delivery
        self._unstored: set[str] = set()  # jobs whose outcome could not be stored (`_settle` hands them on)
        self._last_reclaim = 0.0
        self._last_batch: dict[str, int] = {}  # consumer -> jobs in its previous batch
        self._last_seen: dict[str, float] = {}  # consumer -> last heartbeat written to <p>:workers
        self._last_housekeeping = 0.0
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any = None, **overrides: Any) -> RedisJobQueue:
        """Build from `service.settings.Settings` (what `lesa serve` has) or `RedisQueueSettings`.

        Fields the given object lacks (the `redis_*` tuning knobs) come from the environment via
        `RedisQueueSettings`, so `LESA_REDIS_VISIBILITY_TIMEOUT_S=...` works for both commands.
        """
        env = RedisQueueSettings()

        def pick(name: str) -> Any:
            value = getattr(settings, name, None) if settings is not None else None
            return getattr(env, name) if value is None else value

        url = overrides.pop("url", None) or pick("redis_url")
        if not url:
            raise ValueError("LESA_REDIS_URL is not set")
        kwargs: dict[str, Any] = dict(
            prefix=pick("redis_prefix"),
            max_backlog=pick("max_backlog"),
            result_ttl_s=pick("result_ttl_s"),
            job_ttl_s=pick("redis_job_ttl_s"),
            visibility_timeout_s=pick("redis_visibility_timeout_s"),
            max_deliveries=pick("redis_max_deliveries"),
            max_jobs_per_owner=getattr(settings, "max_jobs_per_key", 0) or 0,  # the API's setting
            priority_aging_s=pick("priority_aging_s"),
            inline_max_bytes=pick("redis_inline_max_bytes"),
            output_dir=pick("redis_output_dir"),
            socket_timeout_s=pick("redis_socket_timeout_s"),
        )
        kwargs.update(overrides)
        return cls(url, **kwargs)

    # ---- keys -------------------------------------------------------------------------------

    def stream_for(self, model: str, priority: Priority = "normal") -> str:
        """The stream that holds `model`'s jobs of one priority class (KEDA's `stream`s for that
        model's worker pool: `streams_of`)."""
        return f"{self.prefix}:{_STREAM_KINDS[priority]}:{model}"

    def streams_of(self, model: str) -> list[str]:
        """All of `model`'s streams, highest priority first."""
        return [self.stream_for(model, p) for p in PRIORITIES]

    def _k_queued(self, model: str) -> str:
        return f"{self.prefix}:queued:{model}"

    def _k_workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"  # live workers serving `model` -> last heartbeat

    def _model_of(self, stream: str) -> str:
        return stream.removeprefix(f"{self.prefix}:").split(":", 1)[1]

    def _stream_priority(self, stream: str) -> Priority:
        """The priority class of a stream's entries, read off its name."""
        kind = stream.removeprefix(f"{self.prefix}:").split(":", 1)[0]
        return next(p for p in PRIORITIES if _STREAM_KINDS[p] == kind)

    def _entry_order(self, entry: _Entry) -> tuple[float, int]:
        return _take_order(entry.spec.priority, entry.entry_id, self.priority_aging_s)

    def _k_job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _k_quality(self, model: str, level: str) -> str:
        return f"{self.prefix}:quality:{model}:{level}"

    def _k_art(self, job_id: str) -> str:
        return f"{self.prefix}:art:{job_id}"

    def _k_files(self, job_id: str) -> str:
        return f"{self.prefix}:files:{job_id}"

    def _k_partial(self, job_id: str) -> str:
        return f"{self.prefix}:partial:{job_id}"

    def _k_live(self, owner: str | None) -> str:
        """The owner's live jobs (queued or running), by creation time: `max_jobs_per_owner`."""
        return f"{self.prefix}:live:{owner or '-'}"

    def _k_idem(self, key: str) -> str:
        # Hashed: the header is client-chosen text of any length.
        return f"{self.prefix}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    # ---- helpers ----------------------------------------------------------------------------

    async def _ensure_groups(self, streams: Iterable[str], *, force: bool = False) -> None:
        for stream in streams:
            if stream in self._groups_ready and not force:
                continue
            try:
                # From id 0: entries added before any worker existed are delivered too.
                await self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            self._groups_ready.add(stream)

    async def _with_groups(self, streams: Collection[str], call: Callable[[], Awaitable[T]]) -> T:
        """Run a stream command; if Redis lost a group (restart without persistence), recreate it."""
        await self._ensure_groups(streams)
        try:
            return await call()
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            await self._ensure_groups(streams, force=True)
            return await call()

    async def _models(self) -> list[str]:
        """Every model that has a stream (jobs were submitted for it), sorted."""
        return sorted(m.decode() for m in await self._redis.smembers(self.k_models))

    def _job_from_hash(self, job_id: str, h: dict[bytes, bytes | None]) -> Job | None:
        if h.get(b"spec") is None or h.get(b"status") is None:
            return None
        error = h.get(b"error")
        result = h.get(b"result")
        return Job(
            id=job_id,
            spec=JobSpec.model_validate_json(h[b"spec"]),
            status=JobStatus(h[b"status"].decode()),
            progress=int(h.get(b"progress") or 0),
            created_at=float(h[b"created_at"]),
            started_at=_f(h.get(b"started_at")),
            completed_at=_f(h.get(b"completed_at")),
            expires_at=_f(h.get(b"expires_at")),
            error=JobError.model_validate_json(error) if error else None,
            result=JobResult.model_validate_json(result) if result else None,
            idempotency_key=_s(h.get(b"idem_key")) or None,
            worker_id=_s(h.get(b"worker_id")),
            attempts=int(h.get(b"attempts") or 0),
            partials=int(h.get(b"partials") or 0),
        )

    async def _get_many(self, job_ids: list[str]) -> list[Job | None]:
        if not job_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self._k_job(job_id), *_RECORD_FIELDS)
            rows = await pipe.execute()
        return [self._job_from_hash(j, _record(row)) for j, row in zip(job_ids, rows, strict=True)]

    async def _housekeeping(self) -> None:
        """Bound the index sets and delete output directories of expired jobs (once a minute)."""
        now = time.time()
        if now - self._last_housekeeping < 60:
            return
        self._last_housekeeping = now
        horizon = now - self.job_ttl_s - self.result_ttl_s
        worker_sets = [self.k_workers, *(self._k_workers(m) for m in await self._models())]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in (self.k_index, f"{self.k_index}:image", f"{self.k_index}:video"):
                pipe.zremrangebyscore(key, "-inf", horizon)
            for key in worker_sets:
                pipe.zremrangebyscore(key, "-inf", now - 3600)
            await pipe.execute()
        await self.prune_consumers()
        await self._prune_queued()
        stale = await asyncio.to_thread(self._stale_output_dirs, now - self.result_ttl_s)
        if stale:
            exists = await self._get_many([d.name for d in stale])
            for directory, job in zip(stale, exists, strict=True):
                if job is None:
                    await asyncio.to_thread(shutil.rmtree, directory, True)

    def _stale_output_dirs(self, before: float) -> list[Path]:
        """Output directories not touched since `before` (candidates: their job may live on)."""
        stale = []
        try:
            for directory in self.output_dir.iterdir():
                try:
                    if directory.is_dir() and directory.stat().st_mtime < before:
                        stale.append(directory)
                except FileNotFoundError:
                    pass  # deleted meanwhile (a DELETE, another API replica's housekeeping)
        except FileNotFoundError:
            pass
        return stale

    async def _prune_queued(self) -> None:
        """Drop backlog members whose job record is gone: a job that expired while queued (no worker
        served its model for `job_ttl_s`) is removed only when a worker reads its entry."""
        for model in await self._models():
            key = self._k_queued(model)
            job_ids = [j.decode() for j in await self._redis.zrange(key, 0, -1)]
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for job_id in chunk:
                        pipe.exists(self._k_job(job_id))
                    alive = await pipe.execute()
                gone = [j for j, n in zip(chunk, alive, strict=True) if not n]
                if gone:
                    await self._redis.zrem(key, *gone)

    async def prune_consumers(self, idle_s: float | None = None) -> None:
        """Forget consumers of workers long gone: every worker start adds one to the group, and
        with autoscaling the list would grow without end. Only consumers with nothing pending and
        idle for `idle_s` (default an hour; a live worker reads every second) are deleted: deleting
        one with pending entries would drop them from re-delivery. Runs with the API's housekeeping."""
        stale_ms = (max(3600.0, 10 * self.visibility_timeout_s) if idle_s is None else idle_s) * 1000
        for stream in [*(s for m in await self._models() for s in self.streams_of(m)), self.k_outbox]:
            try:
                consumers = await self._redis.xinfo_consumers(stream, self.group)
            except ResponseError:  # no group yet
                continue
            for consumer in consumers:
                if int(consumer["pending"]) == 0 and int(consumer["idle"]) > stale_ms:
                    await self._redis.xgroup_delconsumer(stream, self.group, consumer["name"])

    # ---- API side ---------------------------------------------------------------------------

    @_translate_errors
    async def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> Job:
        stream = self.stream_for(spec.model, spec.priority)
        await self._ensure_groups([stream])
        job_id = new_job_id()
        created_at = time.time()
        idem_key = self._k_idem(idempotency_key) if idempotency_key is not None else f"{self.prefix}:idem:-"
        kind, value, *rest = await self._submit(
            keys=[
                self._k_job(job_id),
                stream,
                self._k_queued(spec.model),
                self.k_index,
                f"{self.k_index}:{spec.kind}",
                idem_key,
                self.k_models,
                self._k_live(spec.owner),
            ],
            args=[
                job_id,
                spec.without_uploads().model_dump_json(),
                repr(created_at),
                idem_key if idempotency_key is not None else "",
                self.max_backlog,
                math.ceil(self.job_ttl_s),
                f"{self.prefix}:job:",
                spec.model,
                self.max_jobs_per_owner,
                "1" if spec.owner is not None else "0",
                repr(line_time(spec.priority, created_at, self.priority_aging_s)),
                f"job_s:{self.stream_for(spec.model)}",
                json.dumps(spec.uploads()) if spec.uploads() else "",
            ],
        )
        kind = kind.decode()
        if kind == "existing":
            existing = await self.get(value.decode())
            if existing is not None:
                return existing
            return await self.submit(spec, idempotency_key=idempotency_key)  # expired in between
        if kind == "full":
            raise QueueFull(await self._retry_after(int(value), spec.model))
        if kind == "owner_full":
            raise TooManyJobs(
                await self._retry_after(1, spec.model), f"{int(value)} jobs of this API key are queued or running"
            )
        if idempotency_key is not None:
            # The original header, for the record (the key name only holds its hash).
            await self._redis.hset(self._k_job(job_id), "idem_key", idempotency_key)
        try:
            await self._housekeeping()
        except Exception as error:  # noqa: BLE001 - the job is queued: its client must hear so
            log.warning("housekeeping after a submit failed (retried in a minute): %s: %s", type(error).__name__, error)
        ahead = int(rest[0])  # its model's queued jobs that workers take before it
        return Job(
            id=job_id,
            spec=spec.without_uploads(),
            created_at=created_at,
            idempotency_key=idempotency_key,
            queue_position=ahead,
        )

    async def _retry_after(self, depth: int, model: str) -> int:
        """Seconds until the model's backlog should have drained: its depth x its seconds per job /
        the live workers serving it."""
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.k_stats, f"job_s:{self.stream_for(model)}")
            pipe.zcount(self._k_workers(model), now - 30, "+inf")
            job_s, workers = await pipe.execute()
        per_job = float(job_s) if job_s else 1.0
        return max(1, min(600, math.ceil(depth * per_job / max(1, int(workers)))))

    @_translate_errors
    async def get(self, job_id: str) -> Job | None:
        record, rank = await self._get(keys=[self._k_job(job_id)], args=[job_id, *_RECORD_FIELDS])
        job = self._job_from_hash(job_id, _record(record))
        if job is None or rank is None:
            return job
        return job.model_copy(update={"queue_position": int(rank)})

    async def _positioned(self, jobs: list[Job]) -> list[Job]:
        """The queued ones with their place in line: their rank in their model's backlog set."""
        queued = [j for j in jobs if j.status == JobStatus.queued]
        if not queued:
            return jobs
        async with self._redis.pipeline(transaction=False) as pipe:
            for job in queued:
                pipe.zrank(self._k_queued(job.spec.model), job.id)
            ranks = dict(zip((j.id for j in queued), await pipe.execute(), strict=True))
        return [
            j.model_copy(update={"queue_position": ranks[j.id]}) if ranks.get(j.id) is not None else j for j in jobs
        ]

    async def _listen(self) -> None:
        """Wake `wait()` callers when their job turns terminal (pub/sub; polling covers gaps)."""
        while not self._closed:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        for event in self._waiters.get(message["data"].decode(), ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)  # Redis down: retry; wait() keeps polling meanwhile
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass  # the connection is already broken

    @_translate_errors
    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        job = await self.get(job_id)
        if job is None or job.status.terminal or timeout_s <= 0:
            return job
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    # Re-read at least every second: a message published while the listener was
                    # (re)connecting is lost, the job record is not.
                    await asyncio.wait_for(event.wait(), max(0.0, min(remaining, 1.0)))
                except TimeoutError:
                    pass
                event.clear()
                job = await self.get(job_id)
                if job is None or job.status.terminal or time.monotonic() >= deadline:
                    return job
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    @_translate_errors
    async def list(
        self,
        *,
        kind: JobKind | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        owner: str | None = None,
    ) -> tuple[list[Job], bool]:
        index = self.k_index if kind is None else f"{self.k_index}:{kind}"
        desc = order == "desc"
        start = 0
        if after is not None:
            # Rank lookups are O(log n): pages never read the whole index.
            rank = await (self._redis.zrevrank if desc else self._redis.zrank)(index, after)
            if rank is None:  # deleted, or expired and pruned (an expired job still indexed keeps its place)
                raise UnknownCursor(after)
            (cursor,) = await self._get_many([after])
            if cursor is not None and cursor.spec.owner != owner:  # the index is shared; positions are not
                raise UnknownCursor(after)
            start = rank + 1
        page: list[Job] = []
        gone: list[str] = []
        # Fetch in chunks: some ids may have expired (their hashes are gone; pruned below), others
        # belong to other owners (skipped: the index is shared, which is fine at this scale).
        while len(page) <= limit:
            chunk = [i.decode() for i in await self._redis.zrange(index, start, start + limit, desc=desc)]
            if not chunk:
                break
            start += len(chunk)
            for job_id, job in zip(chunk, await self._get_many(chunk), strict=True):
                if job is None:
                    gone.append(job_id)
                elif len(page) <= limit and job.spec.owner == owner:
                    page.append(job)
        if gone:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in (self.k_index, f"{self.k_index}:image", f"{self.k_index}:video"):
                    pipe.zrem(key, *gone)
                await pipe.execute()
        return await self._positioned(page[:limit]), len(page) > limit

    @_translate_errors
    async def cancel(self, job_id: str) -> bool:
        cancelled = await self._cancel(
            keys=[self._k_job(job_id), self._k_partial(job_id)],
            args=[job_id, repr(time.time()), self.result_ttl_s, self.channel],
        )
        return bool(cancelled)

    @_translate_errors
    async def fail_queued(self, job_id: str, error: JobError) -> bool:
        failed = await self._fail_queued(
            keys=[self._k_job(job_id), self._k_partial(job_id), self.k_outbox],
            args=[job_id, repr(time.time()), self.result_ttl_s, self.channel, error.model_dump_json(),
                  "1" if self.outbox else "0"],
        )  # fmt: skip
        return bool(failed)

    @_translate_errors
    async def delete(self, job_id: str) -> bool:
        job = await self.get(job_id)
        if job is None or not job.status.terminal:
            return False
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._k_job(job_id), self._k_art(job_id), self._k_files(job_id), self._k_partial(job_id))
            for key in (self.k_index, f"{self.k_index}:image", f"{self.k_index}:video"):
                pipe.zrem(key, job_id)
            await pipe.execute()
        if job.idempotency_key is not None:
            idem = self._k_idem(job.idempotency_key)
            if _s(await self._redis.get(idem)) == job_id:
                await self._redis.delete(idem)
        await asyncio.to_thread(shutil.rmtree, self.output_dir / job_id, True)
        return True

    @_translate_errors
    async def spend(
        self, budgets: Sequence[str], per_unit_s: Sequence[float], costs: Sequence[float], window_s: float
    ) -> tuple[bool, list[float]]:
        args: list[Any] = [repr(float(window_s))]
        for unit, cost in zip(per_unit_s, costs, strict=True):
            args += [repr(float(unit)), repr(float(cost))]
        spent, ahead = await self._spend(keys=[f"{self.prefix}:{b}" for b in budgets], args=args)
        return bool(spent), [float(a) for a in ahead]

    @_translate_errors
    async def get_uploads(self, job_id: str) -> dict[str, str]:
        uploads = await self._redis.hget(self._k_job(job_id), "uploads")
        return json.loads(uploads) if uploads else {}

    @_translate_errors
    async def get_partial(self, job_id: str, index: int) -> bytes | None:
        return await self._redis.hget(self._k_partial(job_id), str(int(index)))

    @_translate_errors
    async def get_artifact(self, job_id: str, name: str) -> bytes | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._k_art(job_id), name)
            pipe.hget(self._k_files(job_id), name)
            inline, path = await pipe.execute()
        if inline is not None:
            return inline
        if path is None:
            return None
        file = self.output_dir / path.decode()
        try:
            return await asyncio.to_thread(file.read_bytes)
        except FileNotFoundError:
            return None

    @_translate_errors
    async def depth(self, models: Collection[str] | None = None) -> int:
        models = sorted(models) if models is not None else await self._models()
        if not models:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(self._k_queued(model))
            return sum(int(n) for n in await pipe.execute())

    @_translate_errors
    async def ping(self) -> None:
        await self._redis.ping()

    @_translate_errors
    async def stream_stats(self, models: Collection[str] | None = None) -> dict[str, dict[str, int | None]]:
        """Per model (default: every model with a stream): the consumer group's `pending`
        (delivered, not yet acknowledged) and `lag` (not yet delivered to any worker: KEDA's
        scaling signal). Where Redis cannot tell the lag (entries deleted ahead of the group's
        last read), the model's backlog stands in for it: the alerts on it must not go blind."""
        stats: dict[str, dict[str, int | None]] = {}
        for model in sorted(models) if models is not None else await self._models():
            pending, lag = 0, 0
            for stream in self.streams_of(model):  # its priority classes, added up
                try:
                    groups = await self._redis.xinfo_groups(stream)
                except ResponseError as error:
                    if "no such key" not in str(error).lower():
                        raise
                    self._groups_ready.discard(stream)  # Redis lost the stream (restart without persistence)
                    continue
                group = next((g for g in groups if _s(g["name"]) == self.group), None)
                if group is None:
                    continue  # not this deployment's group
                pending += int(group["pending"])
                lag = None if lag is None or group.get("lag") is None else lag + int(group["lag"])
            if lag is None:
                lag = int(await self._redis.zcard(self._k_queued(model)))
            stats[model] = {"pending": pending, "lag": lag}
        return stats

    async def live_workers(self, within_s: float = 30.0) -> int:
        """Workers that heartbeated within `within_s` (they do so on every claim loop turn)."""
        return int(await self._redis.zcount(self.k_workers, time.time() - within_s, "+inf"))

    # ---- worker side ------------------------------------------------------------------------

    def consumer(self, worker_id: str) -> str:
        """The stream consumer name used for `worker_id` by this queue instance."""
        return f"{worker_id}@{self._instance}"

    def _deliveries(self, stream: str, raw: Any) -> list[tuple[str, str, str]]:
        """(stream, entry id, job id) triples from an XREADGROUP / XAUTOCLAIM reply."""
        out: list[tuple[str, str, str]] = []
        for entry_id, fields in raw or []:
            if fields is None:
                continue  # entry deleted after delivery (Redis < 7 reports it like this)
            job_id = fields.get(b"id")
            if job_id is not None:
                out.append((stream, entry_id.decode(), job_id.decode()))
        return out

    async def _load(self, carry: list[_Entry], delivered: list[tuple[str, str, str]]) -> int:
        """Append delivered entries to the carry-over; acknowledge ones with nothing left to do."""
        if not delivered:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, _, job_id in delivered:
                pipe.hmget(self._k_job(job_id), "spec", "status", "uploads")
            rows = await pipe.execute()
        added = 0
        dead: list[tuple[str, str, str]] = []
        known = {(e.stream, e.entry_id) for e in carry}
        for (stream, entry_id, job_id), (spec, status, uploads) in zip(delivered, rows, strict=True):
            if spec is None or (status is not None and status.decode() in TERMINAL):
                dead.append((stream, entry_id, job_id))  # expired, deleted or cancelled while queued
            elif (stream, entry_id) not in known:
                try:
                    parsed = JobSpec.model_validate_json(spec)
                    if uploads:
                        parsed = JobSpec.model_validate({**parsed.model_dump(), **json.loads(uploads)})
                except (ValueError, TypeError) as error:  # a ValidationError, or uploads cut short
                    # Failed, not raised: it would come back with every read and hold up the jobs
                    # delivered with it (an API of another version wrote it, during an upgrade).
                    log.error("job %s: unreadable spec, failed: %s", job_id, error)
                    message = "this job's record cannot be read by the workers (written by another version of the API?)"
                    await self._store(
                        job_id, "failed", JobError(code="unreadable_job", message=message).model_dump_json(), {}
                    )
                    continue
                carry.append(_Entry(stream, entry_id, job_id, parsed))
                added += 1
        if dead:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, entry_ids in _by_stream((s, e) for s, e, _ in dead).items():
                    pipe.xack(stream, self.group, *entry_ids)
                    pipe.xdel(stream, *entry_ids)
                for stream, job_ids in _by_stream((s, j) for s, _, j in dead).items():
                    pipe.zrem(self._k_queued(self._model_of(stream)), *job_ids)
                await pipe.execute()
        return added

    async def _read_new(
        self, consumer: str, streams: list[str], carry: list[_Entry], count: int, block_s: float | None
    ) -> int:
        if not streams:  # no model has a stream yet: nothing to block on in Redis
            if block_s:
                await asyncio.sleep(block_s)
            return 0
        block_ms = None if block_s is None or block_s < 0.001 else max(1, int(block_s * 1000))
        raw = await self._with_groups(
            streams,
            lambda: self._redis.xreadgroup(
                self.group, consumer, dict.fromkeys(streams, ">"), count=count, block=block_ms
            ),
        )
        delivered: list[tuple[str, str, str]] = []
        for stream, entries in raw or []:
            delivered += self._deliveries(stream.decode() if isinstance(stream, bytes) else stream, entries)
        return await self._load(carry, delivered)

    async def _heartbeat_worker(self, consumer: str, models: list[str], now: float) -> None:
        """This worker is alive and serves `models` (Retry-After's worker counts); the models join
        `<p>:models`, so the housekeeping prunes their worker sets even before their first job."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in (self.k_workers, *(self._k_workers(m) for m in models)):
                pipe.zadd(key, {consumer: now})
            if models:
                pipe.sadd(self.k_models, *models)
            await pipe.execute()
        self._last_seen[consumer] = now

    async def _read_oldest(self, consumer: str, streams: list[str], carry: list[_Entry]) -> bool:
        """Read one entry from the stream whose oldest undelivered entry comes first of all (its
        `_take_order`: highest class, then oldest), if it comes before everything in the carry-over;
        say whether any entry was waiting. The peek (`_PEEK`, one round trip for every stream)
        delivers nothing, so the other streams' entries stay free for any worker."""
        if not streams:
            return False
        firsts = await self._peek(keys=streams, args=[self.group])
        waiting = {
            stream: _take_order(self._stream_priority(stream), _s(first), self.priority_aging_s)
            for stream, first in zip(streams, firsts, strict=True)
            if first
        }
        if not waiting:
            return False
        stream = min(waiting, key=waiting.__getitem__)
        if not carry or waiting[stream] < min(self._entry_order(e) for e in carry):
            await self._read_new(consumer, [stream], carry, count=1, block_s=None)
        return True

    async def _reclaim(self, consumer: str, streams: list[str], carry: list[_Entry], limit: int) -> None:
        """Take over entries whose worker stopped heartbeating (at most every visibility/4 s)."""
        now = time.monotonic()
        if now - self._last_reclaim < min(5.0, self.visibility_timeout_s / 4):
            return
        self._last_reclaim = now
        delivered: list[tuple[str, str, str]] = []
        for stream in streams:
            start = "0-0"
            while len(delivered) < limit:
                reply = await self._with_groups(
                    [stream],
                    lambda s=start, stream=stream, room=limit - len(delivered): self._redis.xautoclaim(
                        stream,
                        self.group,
                        consumer,
                        min_idle_time=int(self.visibility_timeout_s * 1000),
                        start_id=s,
                        count=room,
                    ),
                )
                next_start, entries = reply[0], reply[1]
                delivered += self._deliveries(stream, entries)
                start = next_start.decode() if isinstance(next_start, bytes) else str(next_start)
                if start == "0-0":
                    break
        await self._load(carry, delivered)  # older than anything unread: claim_batch sorts them first

    async def _streams(self, models: Collection[str] | None) -> list[str]:
        """The streams a worker for `models` reads (None: every model's, for single-pool setups)."""
        return [s for m in (sorted(models) if models is not None else await self._models()) for s in self.streams_of(m)]

    @_translate_errors
    async def claim_batch(
        self,
        worker_id: str,
        *,
        max_batch: int,
        max_wait_ms: float,
        timeout_s: float,
        models: Collection[str] | None = None,
    ) -> list[Job]:
        display_id = worker_id
        worker_id = self.consumer(worker_id)
        await self._settle(worker_id)
        carry = self._carry.setdefault(worker_id, [])
        deadline = time.monotonic() + timeout_s
        streams = await self._streams(models)
        self._read_streams.setdefault(worker_id, set()).update(streams)
        while True:
            if self.draining:
                await self.release(worker_id, consumer=True)
                return []
            now = time.time()
            if now - self._last_seen.get(worker_id, 0.0) >= 1.0:  # liveness for Retry-After; 1/s is plenty
                if models is None:  # jobs for a model never seen before may have arrived
                    streams = await self._streams(None)
                    self._read_streams[worker_id].update(streams)
                await self._heartbeat_worker(worker_id, sorted({self._model_of(s) for s in streams}), now)
            await self._reclaim(worker_id, streams, carry, limit=max_batch)
            if streams and (carry or time.monotonic() < deadline):
                # A worker reads several streams (each model's priority classes, maybe several
                # models): it takes the first waiting entry of any of them (`_take_order`: highest
                # class, then oldest: FIFO across models, none starves behind another's backlog), and reads only
                # that one: an entry it took and does not run now would wait for its batch while an
                # idle peer could run it. The head's stream tops the batch up below.
                if await self._read_oldest(worker_id, streams, carry) and not carry:
                    continue  # it was cancelled, or a peer took it first: look again, not block on all

            if not carry:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                # Block in slices of <= 1 s so reclaim and the worker heartbeat keep running (COUNT 1
                # per stream: entries landing in two at once are the only hoard; the head's stream
                # tops the batch up below).
                await self._read_new(worker_id, streams, carry, count=1, block_s=min(remaining, 1.0))
                await self._housekeeping()
                continue
            # Highest priority first, then oldest (`_take_order`: entry ids are millisecond times;
            # reclaimed entries are older still).
            carry.sort(key=self._entry_order)

            head = carry[0]
            key = head.spec.batch_key()
            chosen = [head]
            samples = head.spec.n

            samples = _take_compatible(carry, chosen, key, samples, max_batch)
            # Entries already in the stream join for free (one non-blocking read), within room and
            # without hoarding: besides the batch the carry-over keeps at most max_batch entries plus
            # one per other stream; others may run the rest. Only the head's stream: compatible jobs
            # share its model and priority class.
            if samples < max_batch and len(carry) - len(chosen) < max_batch + len(streams) - 1:
                await self._read_new(worker_id, [head.stream], carry, count=max_batch - samples, block_s=None)
                samples = _take_compatible(carry, chosen, key, samples, max_batch)
            # The max_wait_ms window opens only when there is concurrency to exploit (as the
            # in-process queue does): this consumer's previous batch held several jobs, or other
            # jobs were waiting with this one. A lone client never pays the window.
            concurrent = self._last_batch.get(worker_id, 0) > 1 or len(carry) > 1
            wait_until = time.monotonic() + (max_wait_ms / 1000.0 if concurrent else 0.0)
            while samples < max_batch and len(carry) - len(chosen) < max_batch + len(streams) - 1:
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                # <= 1 s per read, like the idle wait: a long LESA_MAX_WAIT_MS must not outlast the socket timeout
                await self._read_new(
                    worker_id, [head.stream], carry, count=max_batch - samples, block_s=min(remaining, 1.0)
                )
                samples = _take_compatible(carry, chosen, key, samples, max_batch)

            if self.draining:
                continue  # shutdown began while we gathered: the loop top hands everything back
            jobs = await self._start_batch(worker_id, display_id, chosen, carry)
            if jobs:
                self._last_batch[worker_id] = len(jobs)
                return jobs
            if time.monotonic() >= deadline and not carry:
                return []

    async def _start_batch(
        self, consumer: str, display_id: str, chosen: list[_Entry], carry: list[_Entry]
    ) -> list[Job]:
        """Start the chosen entries (each may turn out lost, gone or dead instead) and return their jobs.

        A claim cancelled meanwhile (SIGTERM while a batch was being started) must not strand the
        jobs it had started: nobody would run them until the visibility timeout. They are put back
        to queued and into the carry-over, which the shutdown's `release` hands to other workers.
        """
        for entry in chosen:
            carry.remove(entry)
        started: list[str] = []
        mine: list[_Entry] = []  # started by this claim, and the one whose start is in flight
        settled: list[_Entry] = []  # lost, gone, terminal or dead: someone else's business now
        try:
            for entry in chosen:
                mine.append(entry)
                outcome = await self._start(
                    keys=[
                        self._k_job(entry.job_id),
                        entry.stream,
                        self._k_queued(entry.spec.model),
                        self._k_partial(entry.job_id),
                        self.k_outbox,
                    ],
                    args=[
                        entry.job_id,
                        entry.entry_id,
                        consumer,
                        repr(time.time()),
                        self.max_deliveries,
                        self.group,
                        self.result_ttl_s,
                        self.channel,
                        self.visibility_timeout_s,
                        display_id,
                        "1" if self.outbox else "0",
                        self.job_ttl_s,
                    ],
                )
                if outcome == b"ok":
                    started.append(entry.job_id)
                    self._active[entry.job_id] = _Active(consumer, entry.stream, entry.entry_id, time.monotonic())
                else:
                    mine.remove(entry)
                    settled.append(entry)
                    if outcome == b"dead" and self.on_gave_up is not None:  # failed by the script just now
                        gave_up = await self.get(entry.job_id)
                        if gave_up is not None:
                            self.on_gave_up(gave_up)
            specs = {e.job_id: e.spec for e in mine}  # read with their uploads, which records leave out
            jobs = [j for j in await self._get_many(started) if j is not None]
            return [j.model_copy(update={"spec": specs[j.id]}) for j in jobs]
        except asyncio.CancelledError:
            # The entry whose start was in flight is undone too if it started (the script checks).
            # Entries never tried go back as they are. Back in the carry-over first: a second
            # cancel (a second SIGTERM) may interrupt the wait below, not the undo.
            carry[:0] = [e for e in chosen if e not in settled]
            await asyncio.shield(self._unstart(consumer, mine))
            raise

    async def _unstart(self, consumer: str, entries: list[_Entry]) -> None:
        for entry in entries:
            self._active.pop(entry.job_id, None)
            await self._unstart_script(
                keys=[self._k_job(entry.job_id), self._k_queued(entry.spec.model)], args=[entry.job_id, consumer]
            )

    @_translate_errors
    async def set_progress(self, job_id: str, progress: int) -> None:
        await self._progress(keys=[self._k_job(job_id)], args=[min(100, max(0, int(progress)))])
        active = self._active.get(job_id)
        if active is not None:
            wall = time.time()
            if wall - self._last_seen.get(active.consumer, 0.0) >= 1.0:  # busy, not gone: still counted
                await self._heartbeat_worker(active.consumer, [self._model_of(active.stream)], wall)
            now = time.monotonic()
            if now - active.heartbeat >= self.visibility_timeout_s / 4:
                # Proof of life for this delivery: keeps other workers from reclaiming it.
                await self._heartbeat(keys=[active.stream], args=[self.group, active.consumer, active.entry_id])
                active.heartbeat = now

    @_translate_errors
    async def add_partial(self, job_id: str, index: int, data: bytes) -> None:
        await self._partial(keys=[self._k_job(job_id), self._k_partial(job_id)], args=[int(index), data])

    @_translate_errors
    async def is_cancelled(self, job_id: str) -> bool:
        status = _s(await self._redis.hget(self._k_job(job_id), "status"))
        return status is None or status == JobStatus.cancelled.value  # None: deleted after its cancel

    async def _store(self, job_id: str, status: str, payload: str, artifacts: dict[str, bytes]) -> bool:
        inline: dict[str, bytes] = {}
        files: dict[str, str] = {}
        # A fresh sub-directory per delivery: a losing (second) writer never overwrites the
        # winner's files, and deletes its own afterwards.
        attempt_dir = self.output_dir / job_id / secrets.token_hex(6)
        for name, data in artifacts.items():
            name = _safe_name(name)
            if len(data) > self.inline_max_bytes:
                files[name] = str((attempt_dir / name).relative_to(self.output_dir))
            else:
                inline[name] = data
        if files:

            def write() -> None:
                attempt_dir.mkdir(parents=True, exist_ok=True)
                for name in files:
                    tmp = attempt_dir / f".{name}.tmp"
                    tmp.write_bytes(artifacts[name])
                    os.replace(tmp, attempt_dir / name)

            await asyncio.to_thread(write)
        args: list[Any] = [
            job_id,
            self.group,
            status,
            payload,
            repr(time.time()),
            self.result_ttl_s,
            self.channel,
            "1" if self.outbox else "0",
            len(inline),
        ]
        for name, data in inline.items():
            args += [name, data]
        args.append(len(files))
        for name, path in files.items():
            args += [name, path]
        stored = await self._finish(
            keys=[
                self._k_job(job_id),
                self._k_art(job_id),
                self._k_files(job_id),
                self.k_stats,
                self._k_partial(job_id),
                self.k_outbox,
            ],
            args=args,
        )
        self._active.pop(job_id, None)
        if not stored and files:
            await asyncio.to_thread(shutil.rmtree, attempt_dir, True)
        return bool(stored)

    @_translate_errors
    async def complete(self, job_id: str, result: JobResult, artifacts: dict[str, bytes]) -> bool:
        with self._handed_on_if_unstored(job_id):
            return await self._store(job_id, JobStatus.completed.value, result.model_dump_json(), artifacts)

    @_translate_errors
    async def fail(self, job_id: str, error: JobError) -> bool:
        with self._handed_on_if_unstored(job_id):
            return await self._store(job_id, JobStatus.failed.value, error.model_dump_json(), {})

    @contextlib.contextmanager
    def _handed_on_if_unstored(self, job_id: str) -> Iterator[None]:
        """A job whose outcome could not be stored (Redis unreachable) is run again: the worker's next
        claim hands it on at once (`_settle`), not after the visibility timeout."""
        try:
            yield
        except Exception:
            self._unstored.add(job_id)
            raise

    async def _settle(self, consumer: str) -> None:
        """Settle the jobs of this consumer's previous batch that the worker dropped.

        The worker calls neither `complete` nor `fail` for a job cancelled while it ran (it just
        drops the outputs), and a job whose outcome could not be stored (the queue was down) is
        not finished, so their entries would sit in the PEL until some worker reclaims them after
        the visibility timeout. By the time the same consumer claims again, that batch is over:
        acknowledge what is terminal, and hand the unstored ones on at once (the next XAUTOCLAIM,
        this worker's included).
        """
        leftovers = [(j, a) for j, a in self._active.items() if a.consumer == consumer]
        if not leftovers:
            return
        for job_id, _ in leftovers:
            del self._active[job_id]
        statuses = await self._get_many([j for j, _ in leftovers])
        done = [(a.stream, a.entry_id) for (_, a), job in zip(leftovers, statuses, strict=True)
                if job is None or job.status.terminal]  # fmt: skip
        if done:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, entry_ids in _by_stream(done).items():
                    pipe.xack(stream, self.group, *entry_ids)
                    pipe.xdel(stream, *entry_ids)
                await pipe.execute()
        dropped = [(a.stream, a.entry_id) for (job_id, a), job in zip(leftovers, statuses, strict=True)
                   if job is not None and not job.status.terminal and job_id in self._unstored]  # fmt: skip
        self._unstored.difference_update(job_id for job_id, _ in leftovers)
        for stream, entry_ids in _by_stream(dropped).items():
            await self._release(keys=[stream], args=[self.group, consumer, self._handed_on_idle_ms, *entry_ids])
        if dropped:
            self._last_reclaim = 0.0  # this claim's reclaim takes them if no other worker did first

    @property
    def _handed_on_idle_ms(self) -> int:
        """An idle time past the visibility timeout: an entry given it is reclaimed at the next XAUTOCLAIM."""
        return int(self.visibility_timeout_s * 1000) + 1000

    # ---- outbox -----------------------------------------------------------------------------

    @_translate_errors
    async def next_events(self, consumer: str, *, limit: int, timeout_s: float, lease_s: float) -> list[JobEvent]:
        name = self.consumer(consumer)

        async def take() -> list[tuple[bytes, dict | None]]:
            # First the events whose lease ran out (their sender died), then new ones.
            cursor, entries, *_ = await self._redis.xautoclaim(
                self.k_outbox, self.group, name, int(lease_s * 1000), self._outbox_cursor, count=limit
            )
            self._outbox_cursor = _s(cursor) or "0-0"
            if entries:
                return entries
            reply = await self._redis.xreadgroup(
                self.group, name, {self.k_outbox: ">"}, count=limit, block=max(1, int(timeout_s * 1000))
            )
            return reply[0][1] if reply else []

        events = []
        for entry_id, fields in await self._with_groups([self.k_outbox], take):
            if not fields:  # deleted meanwhile
                await self._redis.xack(self.k_outbox, self.group, entry_id)
                continue
            f = {k.decode(): v.decode() for k, v in fields.items()}
            events.append(JobEvent(f["job"], f["kind"], f["status"], float(f["at"]), receipt=entry_id.decode()))
        return events

    @_translate_errors
    async def ack_event(self, event: JobEvent) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.k_outbox, self.group, event.receipt)
            pipe.xdel(self.k_outbox, event.receipt)
            await pipe.execute()

    @_translate_errors
    async def record_quality(self, model: str, level: str, psnrs: Sequence[float]) -> None:
        if not psnrs:
            return
        key = self._k_quality(model, level)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, *(repr(float(p)) for p in psnrs))
            pipe.ltrim(key, 0, QUALITY_WINDOW - 1)
            pipe.expire(key, QUALITY_TTL_S)
            await pipe.execute()

    @_translate_errors
    async def live_quality(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], list[float]]:
        keys = list(keys)
        if not keys:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for model, level in keys:
                pipe.lrange(self._k_quality(model, level), 0, -1)
            kept = await pipe.execute()
        return {key: [float(v) for v in values] for key, values in zip(keys, kept, strict=True) if values}

    async def release(self, worker_id: str, *, consumer: bool = False) -> None:
        """Hand every entry this worker holds and has not finished to other workers now. Call it once
        the worker has stopped (between batches, or on the way out): a job it still ran would run twice.

        Setting their idle time past the visibility timeout makes them eligible for any other
        worker's next XAUTOCLAIM, instead of waiting out the timeout. Also drops the worker from
        the live-worker set. `consumer=True`: `worker_id` is already a consumer name.
        """
        if not consumer:
            worker_id = self.consumer(worker_id)
        carry = self._carry.pop(worker_id, [])
        streams = self._read_streams.pop(worker_id, set()) | {e.stream for e in carry}
        try:
            # Nothing runs any more: finished jobs are acknowledged, every other one is handed on
            # (a job dropped for a queue outage, or one a cancelled undo had not reached yet).
            await self._settle(worker_id)
            for stream in sorted(streams):
                # What Redis says this consumer holds, not only the carry-over: a claim cancelled
                # between a read and its carry-over holds entries no list here knows of.
                try:
                    held = await self._redis.xpending_range(
                        stream, self.group, "-", "+", 10_000, consumername=worker_id
                    )
                except ResponseError as error:
                    if "NOGROUP" not in str(error):
                        raise
                    continue  # a priority class nobody has submitted to: no stream, nothing held
                entry_ids = [_s(h["message_id"]) for h in held]
                if entry_ids:
                    await self._release(
                        keys=[stream], args=[self.group, worker_id, self._handed_on_idle_ms, *entry_ids]
                    )
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in (
                    self.k_workers,
                    *(self._k_workers(m) for m in sorted({self._model_of(s) for s in streams})),
                ):
                    pipe.zrem(key, worker_id)
                await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError):
            pass  # Redis is gone: the entries come back after the visibility timeout anyway

    async def close(self) -> None:
        self._closed = True
        for consumer in list(self._carry):
            await self.release(consumer, consumer=True)
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
        await self._redis.aclose()


def default_worker_name() -> str:
    """Unique per process: a consumer name shared by two live processes would mix their PELs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
