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

/// Live insert reservations (admitted by [`ADMIT_LUA`], not yet committed by [`COMMIT_LUA`]):
/// purge the expired ones from hash `key` (field = reservation nonce, value = `k:expiry_ms`)
/// and return the records the live ones hold.
const RESERVED_LUA: &str = r"
local function live_reserved(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local all = redis.call('HGETALL', key)
  local total = 0
  for i = 1, #all, 2 do
    local k, exp = string.match(all[i + 1], '^(%d+):(%d+)$')
    if k == nil or tonumber(exp) <= now then
      redis.call('HDEL', key, all[i])
    else
      total = total + tonumber(k)
    end
  end
  return total, now
end
";

/// Admit a batch (phase 1 of a batch insert; the payloads never pass through Lua): walk the
/// records in order, as [`INSERT_LUA`] would one by one, skipping a repeat of its producer's last
/// inserted key, up to the first one the capacity or the ratio limiter refuses; reserve the slots
/// of the records to add under the caller's nonce. Records reserved by other batches still in
/// flight count as in the stream (capacity) and as inserted (limiter). The limiter is asked once
/// for the whole batch (`insert_room`). A reservation lives `ARGV[4]` ms; the caller then sends,
/// in one MULTI/EXEC, the XADDs of the admitted records and [`COMMIT_LUA`], which releases it.
/// A retry (same nonce) replaces the reservation. Runs after [`limiter::LUA`], [`RESERVED_LUA`].
/// KEYS: stream, inserts, samples, last-seq hash, reservations hash. ARGV: capacity,
/// [`limiter::LuaBounds`]' spi and max_diff, reservation ttl (ms), records the caller still has
/// (sent or not), nonce, then one (producer, seq) pair per record sent.
/// Returns {status, stream length, records taken (to add or skipped), room for more now,
/// {1-based positions of the skipped records among those sent}}: status 'ok' (every sent record
/// taken), 'full' or 'limit'.
const ADMIT_LUA: &str = r"
redis.call('HDEL', KEYS[5], ARGV[6])
local reserved, now = live_reserved(KEYS[5])
local len = redis.call('XLEN', KEYS[1])
local cap, spi, max_diff = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local sent = (#ARGV - 6) / 2
local ins, smp = 0, 0
if spi > 0 then
  ins = tonumber(redis.call('GET', KEYS[2]) or '0')
  smp = tonumber(redis.call('GET', KEYS[3]) or '0')
end
local used = len + reserved
local allowed = insert_room(ins + reserved, smp, sent, spi, max_diff)
local last = {}
local taken, added, status = 0, 0, 'ok'
local skipped = {}
for i = 7, #ARGV, 2 do
  local p = ARGV[i]
  if last[p] == nil then last[p] = redis.call('HGET', KEYS[4], p) or false end
  if last[p] == ARGV[i + 1] then
    skipped[#skipped + 1] = taken + 1
  else
    if used >= cap then status = 'full' break end
    if added >= allowed then status = 'limit' break end
    last[p] = ARGV[i + 1]
    used = used + 1
    added = added + 1
  end
  taken = taken + 1
end
if added > 0 then
  redis.call('HSET', KEYS[5], ARGV[6], added .. ':' .. string.format('%d', now + tonumber(ARGV[4])))
end
local room = math.min(math.max(cap - used, 0), tonumber(ARGV[5]) - taken)
if room > 0 then room = insert_room(ins + reserved + added, smp, room, spi, max_diff) end
return {status, len, taken, room, skipped}
";

/// Commit a batch (phase 2, queued in one MULTI/EXEC right after the batch's XADDs, so the
/// entries and the counters appear together): count the records as inserted, set each
/// producer's last inserted seq and raise each producer stream's high-water mark (the caller
/// sends one pair per producer and per producer stream, not one per record: the last added
/// record's seq, and the stream's largest added seq), release the reservation, and leave a done
/// mark so that a retry after a lost reply sends nothing again. Runs after [`MARK_LUA`].
/// KEYS: inserts, last-seq hash, produced hash, reservations hash, done mark. ARGV: nonce,
/// done-mark ttl (ms), records taken, records added, number of (producer, last seq) pairs, the
/// pairs, then (producer, largest seq) pairs.
const COMMIT_LUA: &str = r"
local added, n_last = tonumber(ARGV[4]), tonumber(ARGV[5])
if added > 0 then redis.call('INCRBY', KEYS[1], added) end
local i = 6
for _ = 1, n_last do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i < #ARGV do
  mark_produced(KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[2])
return added
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
-- One HINCRBY per hand-out, as one HMGET and one HSET (the script is atomic). The pad field
-- (its value longer than hash-max-listpack-value) keeps the hash a hash table: as a listpack
-- (up to hash-max-listpack-entries fields, 128 or more) each field costs a scan of the list.
if #ARGV >= 6 then
  redis.call('HSETNX', KEYS[3], '~pad', string.rep('~', 1024))
  local ids, count = {}, {}
  for i = 6, #ARGV do
    if count[ARGV[i]] == nil then ids[#ids + 1] = ARGV[i]; count[ARGV[i]] = 0 end
    count[ARGV[i]] = count[ARGV[i]] + 1
  end
  -- In pages of 1000 ids (unpack's limit is a few thousand values).
  for from = 1, #ids, 1000 do
    local page = {}
    for j = from, math.min(from + 999, #ids) do page[#page + 1] = ids[j] end
    local cur = redis.call('HMGET', KEYS[3], unpack(page))
    local kv = {}
    for j, id in ipairs(page) do
      kv[#kv + 1] = id
      kv[#kv + 1] = tonumber(cur[j] or '0') + count[id]
    end
    redis.call('HSET', KEYS[3], unpack(kv))
  end
end
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
local ids, uses = {}, tonumber(ARGV[2])
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local spent = redis.call('HMGET', KEYS[2], unpack(ids))
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
local n, unused = 0, 0
for j, id in ipairs(ids) do
  if redis.call('XDEL', KEYS[1], id) == 1 then
    n = n + 1
    local s = tonumber(spent[j] or '0')
    if s < uses then unused = unused + uses - s end
  end
end
redis.call('HDEL', KEYS[2], unpack(ids))
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
    pub(super) admit: Script,
    /// The commit script's source: it runs inside MULTI/EXEC after the batch's XADDs, as EVAL
    /// (an EVALSHA refused there with NOSCRIPT would leave the XADDs without their commit).
    pub(super) commit: String,
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
            admit: Script::new(&format!("{}{RESERVED_LUA}{ADMIT_LUA}", limiter::LUA)),
            commit: format!("{MARK_LUA}{COMMIT_LUA}"),
            reserve: Script::new(&format!("{}{RESERVE_LUA}", limiter::LUA)),
            retire: Script::new(RETIRE_LUA),
            drop: Script::new(DROP_LUA),
            heartbeat: Script::new(HEARTBEAT_LUA),
        }
    }
}
