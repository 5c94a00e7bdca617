//! The Lua scripts of the Redis backend: each runs atomically, and each is safe to run twice (a
//! retry after a lost reply).

use redis::Script;

use crate::replay::limiter;

/// Accounting (prepended to the insert scripts): raise producer stream `producer`:`generation`'s
/// high-water mark in the hash `key` to `seq`'s count above the stream's base
/// (`seq - generation * 2^40 + 1`), in the same script as the XADD, so it is exact even when a
/// producer dies right after inserting, and written again by the next insert after Redis comes
/// back empty. Sequence numbers stay below 2^53, so Lua's doubles hold them exactly.
const MARK_LUA: &str = r"
local function mark_produced(key, producer, seq)
  local s = tonumber(seq)
  local gen = math.floor(s / 1099511627776)
  local field = producer .. ':' .. string.format('%d', gen)
  local n = s - gen * 1099511627776 + 1
  local cur = tonumber(redis.call('HGET', key, field) or '0')
  if n > cur then redis.call('HSET', key, field, string.format('%d', n)) end
end
";

/// Insert one record unless the stream is full, the ratio limiter forbids it, or it repeats the
/// producer's last inserted key (a retry of an insert whose reply was lost). Runs after
/// [`limiter::LUA`] and [`MARK_LUA`]. KEYS: stream, inserts, samples, last-seq hash, produced
/// hash. ARGV: payload, producer, seq, capacity, then [`limiter::LuaBounds`]' spi and max_diff.
/// Returns {status, stream length}.
const INSERT_LUA: &str = r"
if redis.call('HGET', KEYS[4], ARGV[2]) == ARGV[3] then
  return {'dup', redis.call('XLEN', KEYS[1])}
end
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[4]) then return {'full', len} end
local spi = tonumber(ARGV[5])
if spi > 0 then
  local ins = tonumber(redis.call('GET', KEYS[2]) or '0')
  local smp = tonumber(redis.call('GET', KEYS[3]) or '0')
  if not can_insert(ins, smp, spi, tonumber(ARGV[6])) then return {'limit', len} end
end
redis.call('XADD', KEYS[1], '*', 'r', ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
mark_produced(KEYS[5], ARGV[2], ARGV[3])
return {'ok', len + 1}
";

/// Insert a batch: the records in order, each as [`INSERT_LUA`] would (a repeat of its
/// producer's last inserted key is skipped), up to the first one the capacity or the ratio
/// limiter refuses. The limiter is asked once for the whole batch (`insert_room`, the shared
/// formula for k records at once). Runs after [`limiter::LUA`]. A nonce key makes a retry after
/// a lost reply a no-op that answers how many records the first run took.
/// Also runs after [`MARK_LUA`].
/// KEYS: stream, inserts, samples, last-seq hash, nonce, produced hash. ARGV: capacity, [`limiter::LuaBounds`]'
/// spi and max_diff, nonce ttl (ms), records the caller still has (sent or not), then one
/// (producer, seq, payload) triple per record sent.
/// Returns {status, stream length, records taken (inserted or skipped), room for more now}:
/// status 'ok' (every sent record taken), 'full', 'limit' or 'replay'.
const INSERT_MANY_LUA: &str = r"
local len = redis.call('XLEN', KEYS[1])
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {'replay', len, tonumber(redis.call('GET', KEYS[5])), 0}
end
local cap, spi, max_diff = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local sent = (#ARGV - 5) / 3
local ins, smp = 0, 0
if spi > 0 then
  ins = tonumber(redis.call('GET', KEYS[2]) or '0')
  smp = tonumber(redis.call('GET', KEYS[3]) or '0')
end
local allowed = insert_room(ins, smp, sent, spi, max_diff)
local taken, added, status = 0, 0, 'ok'
for i = 6, #ARGV, 3 do
  if redis.call('HGET', KEYS[4], ARGV[i]) ~= ARGV[i + 1] then
    if len >= cap then status = 'full' break end
    if added >= allowed then status = 'limit' break end
    redis.call('XADD', KEYS[1], '*', 'r', ARGV[i + 2])
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
    mark_produced(KEYS[6], ARGV[i], ARGV[i + 1])
    len = len + 1
    added = added + 1
  end
  taken = taken + 1
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
if taken > 0 then redis.call('SET', KEYS[5], taken, 'PX', ARGV[4]) end
local room = math.min(math.max(cap - len, 0), tonumber(ARGV[5]) - taken)
if room > 0 then room = insert_room(ins + added, smp, room, spi, max_diff) end
return {status, len, taken, room}
";

/// Reserve `counted` samples if the limiter allows, and count one hand-out per listed entry (an
/// uncounted hand-out, `counted` = 0, needs no permission). Runs after [`limiter::LUA`].
/// KEYS: inserts, samples, uses hash, nonce. ARGV: [`limiter::LuaBounds`]' min_size, spi and
/// min_diff, counted, nonce ttl (ms), entry ids (one per hand-out).
/// Returns {granted 0/1, inserts, samples} (-1 = replayed).
const RESERVE_LUA: &str = r"
if redis.call('EXISTS', KEYS[4]) == 1 then return {1, -1, -1} end
local ins = tonumber(redis.call('GET', KEYS[1]) or '0')
local smp = tonumber(redis.call('GET', KEYS[2]) or '0')
local m = tonumber(ARGV[4])
if m > 0 then
  local min_size, spi, min_diff = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  if not can_sample(ins, smp, m, min_size, spi, min_diff) then return {0, ins, smp} end
  redis.call('INCRBY', KEYS[2], m)
end
for i = 6, #ARGV do redis.call('HINCRBY', KEYS[3], ARGV[i], 1) end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
return {1, ins, smp + m}
";

/// Retire applied (or duplicate) entries: XACK + XDEL together, so an entry is never left
/// acknowledged but present, nor deleted but pending. An entry deleted now that got fewer than
/// `U` counted hand-outs (a duplicate thrown away by the key filter gets none) has the rest
/// counted as sampled: the limiter's budget `inserts * U - samples` is the uses left in the
/// stream, and uses that will never be handed out must leave it, or enough duplicates stall
/// inserts (waiting for samples) and samples (nothing left to sample) for good.
/// KEYS: stream, uses hash, evicted, samples. ARGV: group, U, ids.
/// Returns {entries deleted now, stream length}.
const RETIRE_LUA: &str = r"
local n, unused, uses = 0, 0, tonumber(ARGV[2])
for i = 3, #ARGV do
  local spent = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  local d = redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  if d == 1 then
    n = n + 1
    if spent < uses then unused = unused + uses - spent end
  end
end
if n > 0 then redis.call('INCRBY', KEYS[3], n) end
if unused > 0 then redis.call('INCRBY', KEYS[4], unused) end
return {n, redis.call('XLEN', KEYS[1])}
";

/// Record entries as dropped (deleted while pending, or unreadable) for one reason and clear them
/// out. The first time an entry is recorded, its reason is counted and its unspent counted uses
/// are counted as sampled (as in [`RETIRE_LUA`]: they will never be handed out).
/// KEYS: stream, dropped set, uses hash, samples, dropped-by-reason hash. ARGV: group, U,
/// reason, ids. Returns the number dropped so far.
const DROP_LUA: &str = r"
local n, unused, uses = 0, 0, tonumber(ARGV[2])
for i = 4, #ARGV do
  local spent = tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or '0')
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    n = n + 1
    if spent < uses then unused = unused + uses - spent end
  end
end
if unused > 0 then redis.call('INCRBY', KEYS[4], unused) end
if n > 0 then redis.call('HINCRBY', KEYS[5], ARGV[3], n) end
return redis.call('SCARD', KEYS[2])
";

/// Reset the idle time of entries this consumer still owns, so no one claims them while they are
/// in use; return the ids it no longer owns. KEYS: stream. ARGV: group, consumer, ids.
const HEARTBEAT_LUA: &str = r"
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
";

pub(super) struct Scripts {
    pub(super) insert: Script,
    pub(super) insert_many: Script,
    pub(super) reserve: Script,
    pub(super) retire: Script,
    pub(super) drop: Script,
    pub(super) heartbeat: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            // The limiter's decisions come from its one definition, transcribed in limiter::LUA.
            insert: Script::new(&format!("{}{MARK_LUA}{INSERT_LUA}", limiter::LUA)),
            insert_many: Script::new(&format!("{}{MARK_LUA}{INSERT_MANY_LUA}", limiter::LUA)),
            reserve: Script::new(&format!("{}{RESERVE_LUA}", limiter::LUA)),
            retire: Script::new(RETIRE_LUA),
            drop: Script::new(DROP_LUA),
            heartbeat: Script::new(HEARTBEAT_LUA),
        }
    }
}
