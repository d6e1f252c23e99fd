//! Spend budgets in money, shared by every gateway replica and every worker through one Redis:
//! the units, the periods, the Redis keys, and the scripts that reserve and settle.
//!
//! # What it promises
//! - **Money is counted in whole nano-dollars** ([`Nanos`], 10⁻⁹ USD) as integers, in Rust and in
//!   Redis alike: a call's cost is rounded to the nearest nano-dollar once ([`cost`]), then only
//!   added and subtracted, so totals are exact whatever the number of calls or replicas. Every
//!   quantity stays below 2⁵³ (9 million dollars per period), which Lua's doubles hold exactly.
//! - **A period is a calendar day or month in UTC** ([`Period`]), named by its date (`2026-12-03`,
//!   `2026-12`); the bucket of each period is a separate Redis key, so a new period starts at zero
//!   without a reset job. The period of a call is the one its reservation was taken in, by the
//!   reserving process's clock: a call reserved at 23:59:59 and settled after midnight is settled
//!   in the day it was reserved in.
//! - **Reserve, then settle, atomically**: [`RedisBudget::reserve`] checks every bucket of the call
//!   (the key's, and its team's) and takes the amount from all of them, or from none, in one
//!   script; [`RedisBudget::settle`] releases the reservation and adds the real cost to each, in one
//!   script, capped at the reservation (so a settlement never takes a bucket past its limit). A
//!   bucket's level is `spent` (settled) plus `held` (reserved by calls in flight); a reservation
//!   is refused when it would take a bucket's level past its limit.
//! - **Many in one script call, each as if alone**: [`RedisBudget::reserve_many`] and
//!   [`RedisBudget::settle_many`] run a batch of reservations (or settlements) in one script
//!   call, each in turn: a hold sees what the ones before it in the batch took, is all or nothing
//!   across its buckets, and has its own outcome, exactly as if the single calls had run one after
//!   another in that order. The script reads each bucket once and writes it once per batch (what
//!   the batch changed, summed): beyond the first, a hold on the same buckets costs Redis only the
//!   read and write of its own record. The single calls are batches of one. The caller bounds a
//!   batch's size.
//! - **Each reservation settles at most once**, whoever tries how often: it has an id, and its
//!   Redis record ([`hold_key`]) exists while it is held. Settling deletes it, so nothing of a call
//!   stays in Redis once it is settled (a record kept per call would grow Redis by about 100
//!   bytes a call for the whole period, and a full Redis evicts keys with a TTL: the buckets
//!   too). A settlement that finds no record changes no bucket and leaves a `void` record: so a
//!   settlement retried after a timeout (which may have been applied) is a no-op the second
//!   time, and a settlement that reaches Redis before its reservation (a reservation whose reply
//!   was lost, released by the caller) voids it, and the late reservation then takes nothing.
//!   This is what lets callers retry through a Redis outage without counting anything twice. A
//!   reservation is sent once: the same one sent again after its settlement would be taken anew.
//! - [`RedisBudget::add`] adds spend made elsewhere (a replica that decided alone while Redis was
//!   away) once per id, for the same reason.
//!
//! # What it does not
//! Health tracking, fallbacks, retries, clocks: those are the caller's (the gateway decides alone
//! while Redis is away and catches up after; a worker retries its settlement a few times). Redis
//! Cluster: the key's and the team's buckets are named apart (a key's spend must stay findable
//! when the key changes team), so the scripts need one Redis, which is what llmesh runs; a Cluster
//! would need both under one hash tag.
//!
//! # Redis layout
//! - `llmesh:budget:<period>:<date>:<key|team>:<name>`: hash `spent`, `held`, `limit` (nano-dollars;
//!   `limit` is the last one a reservation was checked against, -1 for none). Expires
//!   [`RETENTION`] after its period ends, so last month's spend stays readable for a while.
//! - `llmesh:budget:hold:<id>`: one reservation: its amount while held, deleted when settled;
//!   `void` when a settlement found none (rare: a lost reply, a retried settlement).
//! - `llmesh:budget:added:<id>`: marks an [`RedisBudget::add`] as applied.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::redis::{CONNECT_TIMEOUT, Failure, connection};

/// An amount of money in nano-dollars (10⁻⁹ USD).
pub type Nanos = u64;

const NANOS_PER_USD: f64 = 1e9;
/// Largest amount the scripts handle exactly (2⁵³ nano-dollars is about 9 million dollars).
pub const MAX_NANOS: Nanos = 1 << 53;
/// How long a period's buckets (and its reservations) are kept after the period ends.
pub const RETENTION: Duration = Duration::from_secs(35 * 24 * 3600);
const DAY_MS: u64 = 24 * 3600 * 1000;

/// `usd` as nano-dollars; `None` unless finite, not negative and below [`MAX_NANOS`].
pub fn usd_to_nanos(usd: f64) -> Option<Nanos> {
    let nanos = (usd * NANOS_PER_USD).round();
    (usd.is_finite() && usd >= 0.0 && nanos < MAX_NANOS as f64).then_some(nanos as Nanos)
}

pub fn nanos_to_usd(nanos: Nanos) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Dollars with six decimals (`12.345678`), as response metadata and the CLI show them.
pub fn format_usd(nanos: Nanos) -> String {
    format!("{}.{:06}", nanos / 1_000_000_000, (nanos % 1_000_000_000) / 1_000)
}

/// What a model costs, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// What `prompt` input and `completion` output tokens cost at `rate`, rounded to the nearest
/// nano-dollar (a dollar per million tokens is a thousand nano-dollars per token).
pub fn cost(prompt: u32, completion: u32, rate: Rate) -> Nanos {
    let nanos = (f64::from(prompt) * rate.input_per_million + f64::from(completion) * rate.output_per_million) * 1e3;
    if nanos.is_finite() && nanos > 0.0 { (nanos.round() as Nanos).min(MAX_NANOS) } else { 0 }
}

/// How long a budget lasts before it starts again at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A calendar day, from 00:00 UTC.
    Day,
    /// A calendar month, from the 1st at 00:00 UTC.
    #[default]
    Month,
}

/// One period: its name and its bounds (unix milliseconds, the end excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// `2026-12-03` for a day, `2026-12` for a month.
    pub date: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The period holding `now_ms` (unix milliseconds, UTC).
    pub fn window(self, now_ms: u64) -> Window {
        let days = i64::try_from(now_ms / DAY_MS).unwrap_or(i64::MAX / 2);
        let (year, month, day) = civil_from_days(days);
        let ms = |days: i64| u64::try_from(days).unwrap_or(0).saturating_mul(DAY_MS);
        match self {
            Self::Day => {
                Window { date: format!("{year:04}-{month:02}-{day:02}"), start_ms: ms(days), end_ms: ms(days + 1) }
            }
            Self::Month => {
                let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                Window {
                    date: format!("{year:04}-{month:02}"),
                    start_ms: ms(days_from_civil(year, month, 1)),
                    end_ms: ms(days_from_civil(next_year, next_month, 1)),
                }
            }
        }
    }
}

/// The date of the `days`-th day since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Days since 1970-01-01 of a date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Whose budget a bucket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One API key's (by its id).
    Key,
    /// A team's, shared by the keys that name it.
    Team,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Team => "team",
        }
    }
}

/// The Redis key of `name`'s bucket for `window` of `period`. Unambiguous whatever the name
/// holds: everything before it has a fixed shape.
pub fn bucket_key(period: Period, window: &Window, scope: Scope, name: &str) -> String {
    format!("llmesh:budget:{}:{}:{}:{name}", period.as_str(), window.date, scope.as_str())
}

/// The Redis key of one reservation.
pub fn hold_key(id: &str) -> String {
    format!("llmesh:budget:hold:{id}")
}

fn added_key(id: &str) -> String {
    format!("llmesh:budget:added:{id}")
}

/// One budget a reservation is checked against, in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Its Redis key ([`bucket_key`]).
    pub key: String,
    /// `None`: spend is counted, nothing is refused (a key without a budget of its own in a team
    /// that has one).
    pub limit: Option<Nanos>,
    /// When Redis may forget it (unix ms): its period's end plus [`RETENTION`].
    pub expire_at_ms: u64,
}

impl Bucket {
    /// `scope`'s bucket named `name`, for the period of `period` holding `now_ms`.
    pub fn new(period: Period, scope: Scope, name: &str, limit: Option<Nanos>, now_ms: u64) -> Self {
        let window = period.window(now_ms);
        let expire_at_ms = window.end_ms.saturating_add(RETENTION.as_millis() as u64);
        Self { key: bucket_key(period, &window, scope, name), limit, expire_at_ms }
    }
}

/// Money taken from one or more buckets before a call, to be settled with the real cost after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Unique per reservation: what makes settling it idempotent.
    pub id: String,
    pub amount: Nanos,
    /// The key's bucket first, then its team's (when it has one).
    pub buckets: Vec<Bucket>,
}

impl Hold {
    pub fn new(amount: Nanos, buckets: Vec<Bucket>) -> Self {
        Self { id: uuid::Uuid::now_v7().simple().to_string(), amount, buckets }
    }

    /// When the reservation's record may go: with the last of its buckets.
    fn expire_at_ms(&self) -> u64 {
        self.buckets.iter().map(|bucket| bucket.expire_at_ms).max().unwrap_or(0)
    }
}

/// A bucket's state, as a script saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Level {
    /// Settled spend in the period.
    pub spent: Nanos,
    /// Reserved by calls in flight.
    pub held: Nanos,
    pub limit: Option<Nanos>,
}

impl Level {
    /// What may still be reserved; `None` without a limit.
    pub fn remaining(&self) -> Option<Nanos> {
        self.limit.map(|limit| limit.saturating_sub(self.spent.saturating_add(self.held)))
    }
}

/// What a reservation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Taken from every bucket; their levels after it, in the hold's order.
    Taken(Vec<Level>),
    /// Over the limit of the bucket at `bucket` (an index into the hold's buckets); nothing taken.
    Refused { bucket: usize, levels: Vec<Level> },
    /// The reservation was already settled or voided (its caller gave it up): nothing taken.
    Void,
}

/// What a settlement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// False when the reservation was settled already, or never reached Redis (it is now void).
    pub applied: bool,
    /// The buckets' levels after it.
    pub levels: Vec<Level>,
}

/// For [`ADD`]: reads the levels of every bucket in KEYS[2..] (ARGV[3..] are their limits and
/// expiries).
/// Amounts go to Redis as the strings they came in: Lua would print a large number as `1e+15`,
/// which HINCRBY refuses.
const PRELUDE: &str = r"
local function levels_of(first_arg)
  local levels = {}
  for i = 2, #KEYS do
    local v = redis.call('HMGET', KEYS[i], 'spent', 'held')
    levels[i - 1] = {tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(ARGV[first_arg + 2 * (i - 2)])}
  end
  return levels
end

local function reply(status, which, levels)
  local out = {status, which}
  for _, level in ipairs(levels) do
    table.insert(out, level[1])
    table.insert(out, level[2])
    table.insert(out, level[3])
  end
  return out
end
";

/// What the batch scripts share: each hold of the batch in turn, and each bucket read once and
/// written once per batch.
///
/// KEYS: per hold, its record ([`hold_key`]) then its buckets. ARGV: per hold, its number of
/// buckets, its amount, its record's expiry (unix ms), then per bucket its limit (-1: none) and its
/// expiry. A hold sees what the holds before it in the batch did, exactly as if each ran alone in
/// that order: the bucket's level is kept in the script (read with the first hold that names it),
/// and the levels the batch left are written once at the end, in one HSET (`%d` keeps them exact
/// integers where Lua would print `1e+15`), with the limit only when it changed and the expiry
/// only when the bucket is new (a bucket's expiry follows from its period, so it never changes).
/// Returns, per hold, `{status, which, then spent, held, limit per bucket}`, the levels as that
/// hold left them.
const BATCH_PRELUDE: &str = r"
local buckets, order = {}, {}
local function bucket(key)
  local b = buckets[key]
  if not b then
    local v = redis.call('HMGET', key, 'spent', 'held', 'limit')
    b = {spent = tonumber(v[1] or '0'), held = tonumber(v[2] or '0'), stored_limit = v[3],
         existed = v[1] ~= false or v[2] ~= false or v[3] ~= false}
    buckets[key] = b
    order[#order + 1] = key
  end
  return b
end

local function each_hold(apply)
  local out, k, a = {}, 1, 1
  while a <= #ARGV do
    local n = tonumber(ARGV[a])
    local hold = {key = KEYS[k], amount = ARGV[a + 1], expiry = ARGV[a + 2], buckets = {}}
    for i = 1, n do
      hold.buckets[i] = {b = bucket(KEYS[k + i]), limit = ARGV[a + 1 + 2 * i], expiry = ARGV[a + 2 + 2 * i]}
    end
    local status, which = apply(hold)
    out[#out + 1] = status
    out[#out + 1] = which
    for _, hb in ipairs(hold.buckets) do
      out[#out + 1] = hb.b.spent
      out[#out + 1] = hb.b.held
      out[#out + 1] = tonumber(hb.limit)
    end
    k = k + 1 + n
    a = a + 3 + 2 * n
  end
  return out
end

local function flush()
  for _, key in ipairs(order) do
    local b = buckets[key]
    if b.expiry then
      local fields = {'spent', string.format('%d', b.spent), 'held', string.format('%d', b.held)}
      if b.limit and b.limit ~= b.stored_limit then
        fields[5] = 'limit'
        fields[6] = b.limit
      end
      redis.call('HSET', key, unpack(fields))
      if not b.existed then redis.call('PEXPIREAT', key, b.expiry) end
    end
  end
end
";

/// Reserves each hold of a batch (see [`BATCH_PRELUDE`]; the amount is the reservation's). Status
/// `1` taken from every bucket, `0` refused by bucket `which` (1-based) and nothing taken, `-1`
/// void (the hold's record exists: it was settled or voided already).
const RESERVE: &str = r"
local function reserve(hold)
  if redis.call('EXISTS', hold.key) == 1 then return -1, 0 end
  local amount = tonumber(hold.amount)
  for i, hb in ipairs(hold.buckets) do
    local limit = tonumber(hb.limit)
    if limit >= 0 and hb.b.spent + hb.b.held + amount > limit then return 0, i end
  end
  for _, hb in ipairs(hold.buckets) do
    hb.b.held = hb.b.held + amount
    hb.b.limit = hb.limit
    hb.b.expiry = hb.expiry
  end
  redis.call('SET', hold.key, hold.amount, 'PXAT', hold.expiry)
  return 1, 0
end
local out = each_hold(reserve)
flush()
return out
";

/// Settles each hold of a batch (see [`BATCH_PRELUDE`]; the amount is the real cost) and deletes
/// its record. Status `1` applied, `0` not (settled already, or voided: a hold with no record gets
/// a `void` one). Charges the real cost, but never more than the reservation: the reservation
/// fitted under every limit, so no settlement takes a bucket past one.
const SETTLE: &str = r"
local function settle(hold)
  local state = redis.call('GET', hold.key)
  if not state then
    redis.call('SET', hold.key, 'void', 'PXAT', hold.expiry)
    return 0, 0
  end
  if state == 'void' then return 0, 0 end
  local held, charge = tonumber(state), tonumber(hold.amount)
  if charge > held then charge = held end
  for _, hb in ipairs(hold.buckets) do
    hb.b.held = hb.b.held - held
    hb.b.spent = hb.b.spent + charge
    hb.b.expiry = hb.expiry
  end
  redis.call('DEL', hold.key)
  return 1, 0
end
local out = each_hold(settle)
flush()
return out
";

/// KEYS: the add's marker, then each bucket. ARGV: amount, marker expiry, then per bucket its
/// limit and expiry. Returns like SETTLE.
const ADD: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', ARGV[2]) then
  return reply(0, 0, levels_of(3))
end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
  redis.call('PEXPIREAT', KEYS[i], ARGV[2 + 2 * (i - 1)])
end
return reply(1, 0, levels_of(3))
";

/// Runs the budget scripts on one Redis. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisBudget {
    conn: ConnectionManager,
    reserve: redis::Script,
    settle: redis::Script,
    add: redis::Script,
    timeout: Duration,
}

impl std::fmt::Debug for RedisBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBudget").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl RedisBudget {
    /// A lazy connection to `url`: nothing is sent until the first call. Each call waits at most
    /// `timeout`. Needs a Tokio runtime. Fails only on a malformed URL (the error may hold the
    /// URL: callers name it redacted).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        let script = |prelude: &str, body: &str| redis::Script::new(&format!("{prelude}{body}"));
        Ok(Self {
            conn: connection(url, timeout)?,
            reserve: script(BATCH_PRELUDE, RESERVE),
            settle: script(BATCH_PRELUDE, SETTLE),
            add: script(PRELUDE, ADD),
            timeout: timeout.max(Duration::from_millis(1)),
        })
    }

    /// Connects and loads the scripts ahead of the first call, within the connect timeout.
    pub async fn warm_up(&self) -> Result<(), Failure> {
        let mut conn = self.conn.clone();
        let load = async {
            for script in [&self.reserve, &self.settle, &self.add] {
                script.prepare_invoke().load_async(&mut conn).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, load).await {
            Ok(result) => result.map_err(Failure::Redis),
            Err(_) => Err(Failure::Timeout(CONNECT_TIMEOUT)),
        }
    }

    /// Takes `hold.amount` from every bucket of `hold`, or nothing when one would go past its
    /// limit, atomically.
    pub async fn reserve(&self, hold: &Hold) -> Result<Reserved, Failure> {
        let mut reserved = self.reserve_many([hold]).await?;
        reserved.pop().ok_or(Failure::BudgetReply(Vec::new()))
    }

    /// [`Self::reserve`] for each of `holds`, in one script call: each in turn, as if alone in
    /// that order (a hold sees what the ones before it took), all or nothing per hold. The outcomes
    /// in the holds' order. The caller bounds the batch (its reply grows with it).
    pub async fn reserve_many<'a>(&self, holds: impl IntoIterator<Item = &'a Hold>) -> Result<Vec<Reserved>, Failure> {
        let holds: Vec<_> = holds.into_iter().map(|hold| (hold, hold.amount)).collect();
        let replies = self.run_many(&self.reserve, &holds).await?;
        Ok(replies
            .into_iter()
            .map(|(status, which, levels)| match status {
                1 => Reserved::Taken(levels),
                0 => Reserved::Refused { bucket: which.saturating_sub(1), levels },
                _ => Reserved::Void,
            })
            .collect())
    }

    /// Settles `hold` with what the call really cost (0 for a call that failed or was cancelled),
    /// at most once: see the module docs.
    pub async fn settle(&self, hold: &Hold, cost: Nanos) -> Result<Settled, Failure> {
        let mut settled = self.settle_many([(hold, cost)]).await?;
        settled.pop().ok_or(Failure::BudgetReply(Vec::new()))
    }

    /// [`Self::settle`] for each of `settlements` (a hold and its real cost), in one script call,
    /// in order. The outcomes in the same order. The caller bounds the batch.
    pub async fn settle_many<'a>(
        &self,
        settlements: impl IntoIterator<Item = (&'a Hold, Nanos)>,
    ) -> Result<Vec<Settled>, Failure> {
        let settlements: Vec<_> = settlements.into_iter().collect();
        let replies = self.run_many(&self.settle, &settlements).await?;
        Ok(replies.into_iter().map(|(status, _, levels)| Settled { applied: status == 1, levels }).collect())
    }

    /// Adds `amount` spent elsewhere to every bucket of `hold` (whose amount is ignored), once per
    /// `hold.id`.
    pub async fn add(&self, hold: &Hold, amount: Nanos) -> Result<Settled, Failure> {
        let (status, _, levels) = self.run(&self.add, &added_key(&hold.id), amount, hold).await?;
        Ok(Settled { applied: status == 1, levels })
    }

    /// A bucket's level (nothing spent: a bucket that does not exist).
    pub async fn read(&self, bucket: &str) -> Result<Level, Failure> {
        let mut conn = self.conn.clone();
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(bucket).arg(&["spent", "held", "limit"]);
        let values: (Option<i64>, Option<i64>, Option<i64>) =
            match tokio::time::timeout(self.timeout, hmget.query_async(&mut conn)).await {
                Ok(values) => values?,
                Err(_) => return Err(Failure::Timeout(self.timeout)),
            };
        let (spent, held, limit) = values;
        let nanos = |value: Option<i64>| value.and_then(|v| u64::try_from(v).ok());
        Ok(Level { spent: nanos(spent).unwrap_or(0), held: nanos(held).unwrap_or(0), limit: nanos(limit) })
    }

    /// Runs a batch script (`RESERVE` or `SETTLE`) over `holds`, each with its amount.
    async fn run_many(
        &self,
        script: &redis::Script,
        holds: &[(&Hold, Nanos)],
    ) -> Result<Vec<(i64, usize, Vec<Level>)>, Failure> {
        if holds.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = script.prepare_invoke();
        for (hold, amount) in holds {
            invocation.key(hold_key(&hold.id)).arg(hold.buckets.len()).arg(*amount).arg(hold.expire_at_ms());
            bucket_args(&mut invocation, hold);
        }
        let reply = self.invoke(&invocation).await?;
        parse_many(&reply, holds).ok_or(Failure::BudgetReply(reply))
    }

    async fn run(
        &self,
        script: &redis::Script,
        marker: &str,
        amount: Nanos,
        hold: &Hold,
    ) -> Result<(i64, usize, Vec<Level>), Failure> {
        let mut invocation = script.key(marker);
        invocation.arg(amount).arg(hold.expire_at_ms());
        bucket_args(&mut invocation, hold);
        let reply = self.invoke(&invocation).await?;
        parse_reply(&reply, hold.buckets.len()).ok_or(Failure::BudgetReply(reply))
    }

    /// Runs a prepared script within the timeout.
    async fn invoke(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, Failure> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(Failure::Timeout(self.timeout)),
        }
    }
}

/// A hold's buckets as the scripts take them: each its key, limit and expiry.
fn bucket_args(invocation: &mut redis::ScriptInvocation<'_>, hold: &Hold) {
    for bucket in &hold.buckets {
        invocation.key(&bucket.key).arg(limit_arg(bucket)).arg(bucket.expire_at_ms);
    }
}

/// A bucket's limit as the scripts take it: -1 for none.
fn limit_arg(bucket: &Bucket) -> i64 {
    bucket.limit.and_then(|limit| i64::try_from(limit).ok()).unwrap_or(-1)
}

/// One reply per hold, each `{status, which, (spent, held, limit) per bucket}`, one after another.
fn parse_many(reply: &[i64], holds: &[(&Hold, Nanos)]) -> Option<Vec<(i64, usize, Vec<Level>)>> {
    let mut rest = reply;
    let mut parsed = Vec::with_capacity(holds.len());
    for (hold, _) in holds {
        let len = 2 + 3 * hold.buckets.len();
        if rest.len() < len {
            return None;
        }
        let (one, tail) = rest.split_at(len);
        parsed.push(parse_reply(one, hold.buckets.len())?);
        rest = tail;
    }
    rest.is_empty().then_some(parsed)
}

/// `{status, which, (spent, held, limit) per bucket}`.
fn parse_reply(reply: &[i64], buckets: usize) -> Option<(i64, usize, Vec<Level>)> {
    let [status, which, rest @ ..] = reply else { return None };
    if rest.len() != 3 * buckets {
        return None;
    }
    let levels = rest
        .chunks_exact(3)
        .map(|level| {
            Some(Level {
                spent: u64::try_from(level[0]).unwrap_or(0),
                held: u64::try_from(level[1]).unwrap_or(0),
                limit: u64::try_from(level[2]).ok(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((*status, usize::try_from(*which).ok()?, levels))
}

/// A job's reservation as its record stores it (opaque to the queue: JSON in one field), so that
/// whoever ends the job settles it with the real usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredHold {
    pub hold: Hold,
    /// The price of the job's model when it was reserved.
    pub rate: Rate,
    /// Reserved in this gateway replica's memory (Redis was away): only it can settle it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_replica: Option<String>,
}

impl StoredHold {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEC_3_2026: u64 = 1_796_256_000_000; // 2026-12-03T00:00:00Z

    #[test]
    fn days_and_months_in_utc() {
        let noon = DEC_3_2026 + 12 * 3600 * 1000;
        let day = Period::Day.window(noon);
        assert_eq!(day, Window { date: "2026-12-03".into(), start_ms: DEC_3_2026, end_ms: DEC_3_2026 + DAY_MS });
        let month = Period::Month.window(noon);
        assert_eq!(month.date, "2026-12");
        assert_eq!(month.start_ms, DEC_3_2026 - 2 * DAY_MS);
        assert_eq!(month.end_ms, DEC_3_2026 + 29 * DAY_MS, "January the 1st");
        assert_eq!(Period::Month.window(month.end_ms).date, "2027-01");
        assert_eq!(Period::Month.window(month.end_ms - 1).date, "2026-12");
        // Leap years.
        let feb_29_2028 = days_from_civil(2028, 2, 29);
        assert_eq!(civil_from_days(feb_29_2028), (2028, 2, 29));
        assert_eq!(
            Period::Month.window(feb_29_2028 as u64 * DAY_MS).end_ms,
            days_from_civil(2028, 3, 1) as u64 * DAY_MS
        );
        for days in 0..80_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn costs_are_whole_nano_dollars() {
        let rate = Rate { input_per_million: 0.15, output_per_million: 0.6 };
        // 1000 × 0.15 µ$ + 500 × 0.6 µ$ = 150 + 300 µ$ = 450_000 n$.
        assert_eq!(cost(1_000, 500, rate), 450_000);
        assert_eq!(cost(0, 0, rate), 0);
        assert_eq!(cost(1, 0, Rate { input_per_million: 0.0001, output_per_million: 0.0 }), 0, "rounded");
        assert_eq!(cost(u32::MAX, u32::MAX, Rate { input_per_million: f64::MAX, output_per_million: 1.0 }), 0);
        assert_eq!(format_usd(450_000), "0.000450");
        assert_eq!(format_usd(12_345_678_901), "12.345678");
        assert_eq!(usd_to_nanos(0.5), Some(500_000_000));
        assert_eq!(usd_to_nanos(-1.0), None);
        assert_eq!(usd_to_nanos(f64::NAN), None);
        assert_eq!(usd_to_nanos(1e8), None, "over the exact range");
    }

    #[test]
    fn bucket_keys_name_the_period_and_whose() {
        let noon = DEC_3_2026 + 12 * 3600 * 1000;
        let bucket = Bucket::new(Period::Month, Scope::Team, "search:eu", Some(5), noon);
        assert_eq!(bucket.key, "llmesh:budget:month:2026-12:team:search:eu");
        assert_eq!(bucket.expire_at_ms, DEC_3_2026 + 29 * DAY_MS + RETENTION.as_millis() as u64);
        let bucket = Bucket::new(Period::Day, Scope::Key, "alice", None, noon);
        assert_eq!(bucket.key, "llmesh:budget:day:2026-12-03:key:alice");
    }

    #[test]
    fn replies_are_checked() {
        let (status, which, levels) = parse_reply(&[0, 2, 1, 2, -1, 3, 4, 10], 2).unwrap();
        assert_eq!((status, which), (0, 2));
        assert_eq!(levels[0], Level { spent: 1, held: 2, limit: None });
        assert_eq!(levels[1].remaining(), Some(3));
        assert_eq!(parse_reply(&[1, 0, 1, 2], 1), None);
        assert_eq!(parse_reply(&[1], 0), None);
    }

    #[test]
    fn batch_replies_are_checked_hold_by_hold() {
        let one = Hold::new(1, vec![Bucket::new(Period::Day, Scope::Key, "a", Some(9), 0)]);
        let two = Hold::new(2, vec![Bucket::new(Period::Day, Scope::Key, "a", None, 0); 2]);
        let holds = [(&one, 1), (&two, 2)];
        let parsed = parse_many(&[1, 0, 0, 1, 9, 0, 1, 0, 3, -1, 0, 3, -1], &holds).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0], (1, 0, vec![Level { spent: 0, held: 1, limit: Some(9) }]));
        assert_eq!((parsed[1].0, parsed[1].1, parsed[1].2.len()), (0, 1, 2));
        assert_eq!(parse_many(&[1, 0, 0, 1, 9, 0, 1, 0, 3, -1, 0, 3], &holds), None, "short");
        assert_eq!(parse_many(&[1, 0, 0, 1, 9, 0, 1, 0, 3, -1, 0, 3, -1, 7], &holds), None, "long");
        assert_eq!(parse_many(&[], &[]), Some(Vec::new()));
    }

    #[test]
    fn stored_holds_read_back() {
        let hold = Hold::new(7, vec![Bucket::new(Period::Day, Scope::Key, "a", Some(9), 0)]);
        let stored =
            StoredHold { hold, rate: Rate { input_per_million: 1.0, output_per_million: 2.0 }, local_replica: None };
        assert_eq!(StoredHold::decode(&stored.encode()).unwrap(), stored);
        assert!(StoredHold::decode("{").is_err());
    }
}
