//! The Lua scripts behind every state change of a job.
//!
//! Each change touches several keys (the job hash, the stream and its consumer group, the delayed
//! set, the dead-letter stream) and must not be seen half done, nor done twice by two workers: a
//! script runs atomically. All times come from the Redis clock (`TIME`), so workers on hosts with
//! skewed clocks agree on when a retry is due.
//!
//! The scripts declare the keys they are given in KEYS, but derive some from their values: the
//! hash of an existing job found by idempotency key (`submit`), a job's idempotency record and
//! its owner's set of unfinished jobs (`expire_finished`), and the hashes of the oldest of those
//! (`submit`, at the owner's bound). Fine on the single Redis llmesh runs; a Redis Cluster would
//! need the keys of one queue under one hash tag.
//!
//! Ownership is checked in the scripts that change a job on a caller's behalf (`submit` finding
//! an earlier job, `cancel`), in the same atomic step as the change: another owner's job is
//! `missing`, exactly as one that does not exist. The scripts that make a job terminal (`complete`,
//! `give_up`, `cancel`) return its token reservation: they are the one step that can hand it
//! over, once (see `reservation`).

use std::sync::LazyLock;

use redis::Script;

use crate::{
    record::{LEGACY_OWNER, SNAPSHOT_FIELDS},
    reservation::RESERVATION_FIELDS,
};

/// Shared definitions, prepended to every script.
const PRELUDE: &str = r"
local QUEUED = 'JOB_STATE_QUEUED'
local RUNNING = 'JOB_STATE_RUNNING'
local SUCCEEDED = 'JOB_STATE_SUCCEEDED'
local DEAD_LETTERED = 'JOB_STATE_DEAD_LETTERED'
local CANCELLED = 'JOB_STATE_CANCELLED'
local TERMINAL = {
  JOB_STATE_SUCCEEDED = true, JOB_STATE_FAILED = true, JOB_STATE_DEAD_LETTERED = true, JOB_STATE_CANCELLED = true,
}

local function clock_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

local function ms_text(ms)
  return string.format('%.0f', ms)
end

local function snapshot(job)
  return redis.call('HMGET', job, unpack(SNAPSHOT_FIELDS))
end

-- Whether `owner` may see and change the job (a record from before owners is LEGACY_OWNER's).
local function owned_by(job, owner)
  return (redis.call('HGET', job, 'owner') or LEGACY_OWNER) == owner
end

-- The job's owner and token reservation, for the one step that ends the job to hand over.
local function reservation(job)
  return redis.call('HMGET', job, unpack(RESERVATION_FIELDS))
end

-- A finished job, and its idempotency record, stay readable for the result TTL only; it no
-- longer counts against its owner's unfinished jobs.
local function expire_finished(job, id, ttl_ms)
  redis.call('PEXPIRE', job, ttl_ms)
  local idempotency = redis.call('HGET', job, 'idempotency_key')
  if idempotency and idempotency ~= '' then
    redis.call('PEXPIRE', idempotency, ttl_ms)
  end
  local unfinished = redis.call('HGET', job, 'unfinished_set')
  if unfinished and unfinished ~= '' then
    redis.call('ZREM', unfinished, id)
  end
end

-- Done with one delivery: acknowledge it and drop the entry, so the stream holds only work to do.
local function settle(stream, group, entry)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
end
";

/// Creates a job and queues it, unless the idempotency record (the owner's: its key names the
/// owner) already names a live job of the owner, or the owner already has `max unfinished` jobs
/// that have not ended (0: no bound).
///
/// KEYS: job hash, stream, the owner's unfinished set, [idempotency record]. ARGV: job id,
/// encoded request, job key prefix, owner, tokens store ('' when nothing is reserved), tokens
/// reserved, tokens per minute, money reservation ('' when none), max unfinished.
/// Returns `{job id, 0 if created | 1 if it already existed | 2 if the owner has too many, snapshot}`.
const SUBMIT: &str = r"
local job, stream, unfinished, idempotency = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, request, job_prefix, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local tokens_store, tokens_reserved, tokens_per_minute, budget = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local max_unfinished = tonumber(ARGV[9])
if idempotency then
  local existing = redis.call('GET', idempotency)
  if existing then
    local existing_job = job_prefix .. existing
    if redis.call('EXISTS', existing_job) == 1 and owned_by(existing_job, owner) then
      return {existing, 1, snapshot(existing_job)}
    end
  end
end
if max_unfinished > 0 and redis.call('ZCARD', unfinished) >= max_unfinished then
  -- A job whose record went without ending (deleted, or evicted by Redis) would hold its place
  -- for ever: look at the oldest few, a bounded step however many the owner has.
  for _, old in ipairs(redis.call('ZRANGE', unfinished, 0, 15)) do
    local state = redis.call('HGET', job_prefix .. old, 'state')
    if not state or TERMINAL[state] then
      redis.call('ZREM', unfinished, old)
    end
  end
  if redis.call('ZCARD', unfinished) >= max_unfinished then
    return {'', 2, {}}
  end
end
if idempotency then
  redis.call('SET', idempotency, id)
end
local now_ms = clock_ms()
local now = ms_text(now_ms)
redis.call('HSET', job, 'state', QUEUED, 'attempts', 0, 'request', request, 'error', '',
  'created_at_ms', now, 'updated_at_ms', now, 'idempotency_key', idempotency or '', 'owner', owner,
  'unfinished_set', unfinished)
redis.call('ZADD', unfinished, now_ms, id)
if tokens_store ~= '' then
  redis.call('HSET', job, 'tokens_store', tokens_store, 'tokens_reserved', tokens_reserved,
    'tokens_per_minute', tokens_per_minute)
end
if budget and budget ~= '' then
  redis.call('HSET', job, 'budget', budget)
end
redis.call('XADD', stream, '*', 'job', id)
return {id, 0, snapshot(job)}
";

/// Cancels a job of the owner's that is waiting (queued, or waiting for a retry). Its stream
/// entry, if any, stays: the worker that reads it finds the job CANCELLED and only acknowledges
/// it. Another owner's job is `missing`, and untouched.
///
/// KEYS: job hash, delayed set. ARGV: job id, result TTL (ms), owner.
/// Returns `{'cancelled' | 'refused' | 'missing', snapshot, reservation}` (the snapshot and
/// reservation empty when missing, the reservation empty unless cancelled).
const CANCEL: &str = r"
local job, delayed = KEYS[1], KEYS[2]
local id, ttl_ms, owner = ARGV[1], ARGV[2], ARGV[3]
local state = redis.call('HGET', job, 'state')
if not state or not owned_by(job, owner) then
  return {'missing', {}, {}}
end
if state ~= QUEUED then
  return {'refused', snapshot(job), {}}
end
redis.call('HSET', job, 'state', CANCELLED, 'updated_at_ms', ms_text(clock_ms()))
redis.call('ZREM', delayed, id)
expire_finished(job, id, ttl_ms)
return {'cancelled', snapshot(job), reservation(job)}
";

/// Starts an attempt at a delivered job: RUNNING, one more attempt, `started_at_ms` the
/// attempt's start (so the latest attempt's, once a job is retried). A job that is finished (or
/// gone) is only acknowledged: whatever happened before (a worker that died between storing
/// its result and acknowledging), it never runs again. A job whose last allowed attempt was
/// lost with its worker is left to the caller to dead-letter.
///
/// KEYS: job hash, stream. ARGV: group, entry id, max attempts.
/// Returns `{'run' | 'finished' | 'gone' | 'exhausted', state, attempts, request or nil, ms from
/// the job's creation to this start (0 unless run)}`.
const BEGIN_ATTEMPT: &str = r"
local job, stream = KEYS[1], KEYS[2]
local group, entry, max_attempts = ARGV[1], ARGV[2], tonumber(ARGV[3])
local state = redis.call('HGET', job, 'state')
if not state then
  settle(stream, group, entry)
  return {'gone', '', 0, false, 0}
end
local attempts = tonumber(redis.call('HGET', job, 'attempts'))
if TERMINAL[state] then
  settle(stream, group, entry)
  return {'finished', state, attempts, false, 0}
end
if attempts >= max_attempts then
  return {'exhausted', state, attempts, false, 0}
end
attempts = attempts + 1
local now_ms = clock_ms()
local now = ms_text(now_ms)
redis.call('HSET', job, 'state', RUNNING, 'attempts', attempts, 'started_at_ms', now, 'updated_at_ms', now)
local created_ms = tonumber(redis.call('HGET', job, 'created_at_ms')) or now_ms
return {'run', RUNNING, attempts, redis.call('HGET', job, 'request'), math.max(0, now_ms - created_ms)}
";

/// Checks shared by the scripts that end an attempt. Returns nil when the attempt may be ended,
/// or the reply to give: `gone`, or the terminal state the job already has (the first result
/// wins; the delivery is acknowledged), or `stale` when another worker has since started a newer
/// attempt (it owns the delivery now; nothing is touched).
const END_ATTEMPT_CHECKS: &str = r"
local function refuse_end(job, stream, group, entry, attempt, stale_matters)
  local state = redis.call('HGET', job, 'state')
  if not state then
    settle(stream, group, entry)
    return 'gone'
  end
  if TERMINAL[state] then
    settle(stream, group, entry)
    return state
  end
  if stale_matters and redis.call('HGET', job, 'attempts') ~= attempt then
    return 'stale'
  end
  return nil
end
";

/// Stores a result: SUCCEEDED and the result together, then the acknowledgement, in one step.
/// A success from an attempt that is no longer the newest is still taken if the job has no
/// result yet: a result is a result.
///
/// KEYS: job hash, stream, delayed set. ARGV: group, entry id, job id, attempt, encoded result,
/// result TTL (ms). Returns `{'applied' | 'gone' | <terminal state>, reservation if applied}`.
const COMPLETE: &str = r"
local job, stream, delayed = KEYS[1], KEYS[2], KEYS[3]
local group, entry, id, attempt, result, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local refused = refuse_end(job, stream, group, entry, attempt, false)
if refused then
  return {refused, {}}
end
redis.call('HSET', job, 'state', SUCCEEDED, 'result', result, 'error', '', 'updated_at_ms', ms_text(clock_ms()))
redis.call('ZREM', delayed, id)
expire_finished(job, id, ttl_ms)
settle(stream, group, entry)
return {'applied', reservation(job)}
";

/// Puts a failed job back to wait for its retry: QUEUED with the error, in the delayed set until
/// it is due, and the delivery acknowledged.
///
/// KEYS: job hash, stream, delayed set. ARGV: group, entry id, job id, attempt, delay (ms), error.
/// Returns `{'applied' | 'gone' | 'stale' | <terminal state>, {}}` (not terminal: nothing to settle).
const SCHEDULE_RETRY: &str = r"
local job, stream, delayed = KEYS[1], KEYS[2], KEYS[3]
local group, entry, id, attempt, delay_ms, error = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local refused = refuse_end(job, stream, group, entry, attempt, true)
if refused then
  return {refused, {}}
end
local now = clock_ms()
redis.call('HSET', job, 'state', QUEUED, 'error', error, 'updated_at_ms', ms_text(now))
redis.call('ZADD', delayed, now + delay_ms, id)
settle(stream, group, entry)
return {'applied', {}}
";

/// Gives up on a job: FAILED or DEAD_LETTERED with the error; a dead-lettered job also goes to
/// the dead-letter stream.
///
/// KEYS: job hash, stream, dead-letter stream. ARGV: group, entry id, job id, attempt, final
/// state, error, result TTL (ms). Returns `{'applied' | 'gone' | 'stale' | <terminal state>,
/// reservation if applied}`.
const GIVE_UP: &str = r"
local job, stream, dead = KEYS[1], KEYS[2], KEYS[3]
local group, entry, id, attempt, final_state, error, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local refused = refuse_end(job, stream, group, entry, attempt, true)
if refused then
  return {refused, {}}
end
redis.call('HSET', job, 'state', final_state, 'error', error, 'updated_at_ms', ms_text(clock_ms()))
expire_finished(job, id, ttl_ms)
if final_state == DEAD_LETTERED then
  redis.call('XADD', dead, '*', 'job', id, 'error', error, 'attempts', attempt)
end
settle(stream, group, entry)
return {'applied', reservation(job)}
";

/// Gives back deliveries a worker holds but will not run (it read them ahead, see `worker`): each
/// is acknowledged, dropped from the stream and queued again at its end, for any worker to take.
/// A job the worker had started (RUNNING at the attempt it began) is first put back as it was,
/// QUEUED with that attempt uncounted. A delivery no longer pending (another worker took it over)
/// is left alone; a job that has finished meanwhile, or is gone, is not queued again.
///
/// KEYS: stream, then the job hash of each delivery. ARGV: group, then per delivery: entry id,
/// job id, the attempt the worker began ('0' if none). Returns how many were queued again.
const GIVE_BACK: &str = r"
local stream, group = KEYS[1], ARGV[1]
local queued = 0
for i = 2, #KEYS do
  local job, at = KEYS[i], (i - 2) * 3 + 2
  local entry, id, begun = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  if redis.call('XACK', stream, group, entry) == 1 then
    redis.call('XDEL', stream, entry)
    local state = redis.call('HGET', job, 'state')
    if state == RUNNING and begun ~= '0' and redis.call('HGET', job, 'attempts') == begun then
      redis.call('HSET', job, 'state', QUEUED, 'attempts', tonumber(begun) - 1)
      state = QUEUED
    end
    if state and not TERMINAL[state] then
      redis.call('XADD', stream, '*', 'job', id)
      queued = queued + 1
    end
  end
end
return queued
";

/// Moves retries that are due from the delayed set back onto the stream. Atomic, so two workers
/// running it at once cannot queue one job twice.
///
/// KEYS: delayed set, stream. ARGV: most to move. Returns `{moved, ms until the next is due or -1}`.
const PROMOTE_DUE: &str = r"
local delayed, stream = KEYS[1], KEYS[2]
local now = clock_ms()
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  redis.call('ZREM', delayed, id)
  redis.call('XADD', stream, '*', 'job', id)
end
local next_due = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local wait_ms = -1
if next_due[2] then
  wait_ms = math.max(0, math.ceil(tonumber(next_due[2]) - now))
end
return {#due, wait_ms}
";

/// Counts, in one consistent look. A stream without its group (Redis restarted empty) counts
/// nothing as pending.
///
/// KEYS: stream, delayed set, dead-letter stream. ARGV: group.
/// Returns `{entries in the stream, delivered and unacknowledged, delayed, dead-lettered}`.
const STATS: &str = r"
local stream, delayed, dead = KEYS[1], KEYS[2], KEYS[3]
local pending = 0
local summary = redis.pcall('XPENDING', stream, ARGV[1])
if type(summary) == 'table' and not summary.err then
  pending = summary[1]
end
return {redis.call('XLEN', stream), pending, redis.call('ZCARD', delayed), redis.call('XLEN', dead)}
";

fn script(parts: &[&str]) -> Script {
    let quoted = |fields: &[&str]| fields.iter().map(|field| format!("'{field}'")).collect::<Vec<_>>().join(", ");
    let mut source = format!(
        "local SNAPSHOT_FIELDS = {{{}}}\nlocal RESERVATION_FIELDS = {{{}}}\nlocal LEGACY_OWNER = '{LEGACY_OWNER}'\n{PRELUDE}",
        quoted(&SNAPSHOT_FIELDS),
        quoted(&RESERVATION_FIELDS),
    );
    for part in parts {
        source.push_str(part);
    }
    Script::new(&source)
}

/// What `submit` answers: a job created, or an earlier one returned (anything else: the owner
/// has too many unfinished jobs).
pub(crate) const SUBMIT_CREATED: u8 = 0;
pub(crate) const SUBMIT_EXISTING: u8 = 1;

pub(crate) static SUBMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[SUBMIT]));
pub(crate) static CANCEL_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[CANCEL]));
pub(crate) static BEGIN_ATTEMPT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[BEGIN_ATTEMPT]));
pub(crate) static COMPLETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[END_ATTEMPT_CHECKS, COMPLETE]));
pub(crate) static SCHEDULE_RETRY_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[END_ATTEMPT_CHECKS, SCHEDULE_RETRY]));
pub(crate) static GIVE_UP_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[END_ATTEMPT_CHECKS, GIVE_UP]));
pub(crate) static GIVE_BACK_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[GIVE_BACK]));
pub(crate) static PROMOTE_DUE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[PROMOTE_DUE]));
pub(crate) static STATS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[STATS]));
