//! The Reverb-style samples-per-insert rate limiter both backends apply, defined once: pure
//! predicates on the run's totals (records inserted, records sampled). The Redis backend must
//! decide next to its counters, atomically, inside Lua scripts: it runs [`LUA`], the line-by-line
//! transcription of the two predicates below, on the bounds computed here ([`LuaBounds`]).

use super::ReplayConfig;

/// Reverb's `SampleToInsertRatio(samples_per_insert, min_size_to_sample, error_buffer)`, blocking
/// rather than dropping, with samples counted in records.
///
/// With `spi = samples_per_insert`, `min_diff = min_size * spi - error_buffer` and
/// `max_diff = min_size * spi + error_buffer`:
/// - an insert may proceed iff `(inserted + 1) * spi - sampled <= max_diff`;
/// - a sample of `n` records may proceed iff `inserted >= min_size` and
///   `inserted * spi - (sampled + n) >= min_diff`.
///
/// `inserted` and `sampled` are totals since the start (so `min_size` counts inserts, not the
/// current depth). With `spi == 0` there is no ratio limit: inserts always may, and sampling needs
/// only `min_size` inserts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimiter {
    spi: f64,
    min_size: u64,
    error_buffer: f64,
    min_diff: f64,
    max_diff: f64,
}

impl RateLimiter {
    /// The limiter of `[replay]` (`min_size`, `samples_per_insert`, `error_buffer`).
    pub fn new(cfg: &ReplayConfig) -> Self {
        let offset = cfg.min_size as f64 * cfg.samples_per_insert;
        Self {
            spi: cfg.samples_per_insert,
            min_size: cfg.min_size as u64,
            error_buffer: cfg.error_buffer,
            min_diff: offset - cfg.error_buffer,
            max_diff: offset + cfg.error_buffer,
        }
    }

    /// May one more record be inserted after `inserted` inserts and `sampled` sampled records?
    pub fn can_insert(&self, inserted: u64, sampled: u64) -> bool {
        self.spi == 0.0 || (inserted + 1) as f64 * self.spi - sampled as f64 <= self.max_diff
    }

    /// How many of `k` more records may be inserted, one after the other, after `inserted`
    /// inserts and `sampled` sampled records: the largest `j <= k` with `can_insert` true for
    /// each of `inserted`, ..., `inserted + j - 1`. [`LUA`]'s `insert_room` is its transcription.
    pub fn insert_room(&self, inserted: u64, sampled: u64, k: u64) -> u64 {
        if self.spi == 0.0 {
            return k;
        }
        let mut j = 0;
        while j < k && self.can_insert(inserted + j, sampled) {
            j += 1;
        }
        j
    }

    /// May `n` more records be sampled after `inserted` inserts and `sampled` sampled records?
    pub fn can_sample(&self, inserted: u64, sampled: u64, n: u64) -> bool {
        inserted >= self.min_size
            && (self.spi == 0.0
                || inserted as f64 * self.spi - (sampled + n) as f64 >= self.min_diff)
    }

    /// Lower bound of `inserted * spi - sampled` after a sample: `min_size * spi - error_buffer`.
    pub fn min_diff(&self) -> f64 {
        self.min_diff
    }

    /// Upper bound of `inserted * spi - sampled` after an insert: `min_size * spi + error_buffer`.
    pub fn max_diff(&self) -> f64 {
        self.max_diff
    }

    /// Refuse a call for `n` records with `n + spi > 2 * error_buffer`: then a waiting insert and
    /// a waiting sample can block each other for good (the insert needs a sample to pass, the
    /// sample needs more inserts than the insert bound allows). The message names the keys.
    pub fn check_batch(&self, n: usize) -> std::result::Result<(), String> {
        let spi = self.spi;
        if spi > 0.0 && n as f64 + spi > 2.0 * self.error_buffer {
            return Err(format!(
                "a sample of {n} records with replay.samples_per_insert = {spi} needs \
                 replay.error_buffer >= {} (it is {}); otherwise inserts and samples can block \
                 each other forever",
                (n as f64 + spi) / 2.0,
                self.error_buffer
            ));
        }
        Ok(())
    }

    /// The bounds as Lua script arguments for [`LUA`]'s functions.
    pub fn lua_bounds(&self) -> LuaBounds {
        // `Display` of an f64 is the shortest decimal that parses back to the same f64, and
        // Redis' Lua `tonumber` (strtod) parses it back exactly: the script compares against the
        // very numbers `can_insert` / `can_sample` use.
        LuaBounds {
            spi: self.spi.to_string(),
            min_size: self.min_size.to_string(),
            min_diff: self.min_diff.to_string(),
            max_diff: self.max_diff.to_string(),
        }
    }
}

/// [`RateLimiter`]'s numbers as script arguments (`tonumber(ARGV[i])` gives back the exact f64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaBounds {
    /// `samples_per_insert`.
    pub spi: String,
    /// `min_size`.
    pub min_size: String,
    /// `min_size * spi - error_buffer`.
    pub min_diff: String,
    /// `min_size * spi + error_buffer`.
    pub max_diff: String,
}

/// [`RateLimiter::can_insert`] and [`RateLimiter::can_sample`] in Lua 5.1 (Redis' script engine),
/// to be prepended to a script that decides next to the counters. Lua numbers are IEEE doubles
/// like the `f64`s above and each expression does the same operations in the same order (the
/// integer sums are exact below 2^53), so both sides decide alike; `limiter_lua_agrees_with_rust`
/// checks it on a grid against a real Redis.
pub const LUA: &str = r"
local function can_insert(ins, smp, spi, max_diff)
  return spi == 0 or (ins + 1) * spi - smp <= max_diff
end
local function insert_room(ins, smp, k, spi, max_diff)
  if spi == 0 then return k end
  local j = 0
  while j < k and can_insert(ins + j, smp, spi, max_diff) do j = j + 1 end
  return j
end
local function can_sample(ins, smp, n, min_size, spi, min_diff)
  return ins >= min_size and (spi == 0 or ins * spi - (smp + n) >= min_diff)
end
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::testutil::cfg;
    use crate::replay::Sampler;

    #[test]
    fn limiter_matches_hand_computation() {
        // spi = 1, min_size = 10, error_buffer = 5: min_diff = 10 - 5 = 5, max_diff = 10 + 5 = 15.
        let l = RateLimiter::new(&cfg(100, 10, 1.0, 5.0, Sampler::Uniform));
        assert_eq!((l.min_diff, l.max_diff), (5.0, 15.0));
        // Insert iff inserts + 1 - samples <= 15.
        assert!(l.can_insert(14, 0));
        assert!(!l.can_insert(15, 0));
        assert!(l.can_insert(15, 1));
        // Room for a batch: 15 - 10 = 5 of 8 after 10 inserts; none at the bound; all of 3.
        assert_eq!(l.insert_room(10, 0, 8), 5);
        assert_eq!(l.insert_room(15, 0, 8), 0);
        assert_eq!(l.insert_room(15, 2, 8), 2);
        assert_eq!(l.insert_room(0, 0, 3), 3);
        // Sample n iff inserts >= 10 and inserts - samples - n >= 5.
        assert!(!l.can_sample(9, 0, 1));
        assert!(l.can_sample(10, 0, 5));
        assert!(!l.can_sample(10, 0, 6));
        assert!(l.can_sample(15, 3, 7));
        assert!(!l.can_sample(15, 3, 8));
        // spi = 0: no ratio limit, only min_size.
        let free = RateLimiter::new(&cfg(100, 10, 0.0, 0.0, Sampler::Uniform));
        assert!(free.can_insert(1_000_000, 0));
        assert_eq!(free.insert_room(1_000_000, 0, 1 << 40), 1 << 40);
        assert!(!free.can_sample(9, 0, 1));
        assert!(free.can_sample(10, 1_000_000, 1_000_000));
    }

    #[test]
    fn limiter_fractional_ratio_by_hand() {
        // spi = 0.5, min_size = 4, error_buffer = 2: offset = 4 * 0.5 = 2, min_diff = 0,
        // max_diff = 4.
        let l = RateLimiter::new(&cfg(100, 4, 0.5, 2.0, Sampler::Uniform));
        assert_eq!((l.min_diff(), l.max_diff()), (0.0, 4.0));
        // Insert iff (ins + 1) * 0.5 - smp <= 4: with smp = 0, ins + 1 <= 8, so ins = 7 may and
        // ins = 8 may not; one sample buys two more inserts (ins = 9: 5 - 1 = 4).
        assert!(l.can_insert(7, 0));
        assert!(!l.can_insert(8, 0));
        assert!(l.can_insert(9, 1));
        assert!(!l.can_insert(10, 1));
        // Sample n iff ins >= 4 and ins * 0.5 - (smp + n) >= 0: ins = 4 allows 2 records (2 - 2),
        // not 3; ins = 5 gives 2.5, still 2.
        assert!(l.can_sample(4, 0, 2));
        assert!(!l.can_sample(4, 0, 3));
        assert!(!l.can_sample(5, 0, 3));
        assert!(l.can_sample(6, 1, 2));
        assert!(!l.can_sample(3, 0, 1));
    }

    #[test]
    fn check_batch_bounds_n_by_twice_the_error_buffer() {
        // spi = 1, error_buffer = 5: n + 1 <= 10 allows n <= 9.
        let l = RateLimiter::new(&cfg(100, 10, 1.0, 5.0, Sampler::Uniform));
        assert_eq!(l.check_batch(9), Ok(()));
        let e = l.check_batch(10).err().unwrap_or_default();
        assert!(e.contains("replay.error_buffer >= 5.5 (it is 5)"), "{e}");
        // No ratio limit: any batch.
        let free = RateLimiter::new(&cfg(100, 10, 0.0, 0.0, Sampler::Uniform));
        assert_eq!(free.check_batch(1 << 20), Ok(()));
    }

    #[test]
    fn lua_bounds_parse_back_exactly() {
        // 0.1 * 7 = 0.7000000000000001 in f64; the strings must carry every bit.
        let l = RateLimiter::new(&cfg(100, 7, 0.1, 1.0, Sampler::Uniform));
        let b = l.lua_bounds();
        assert_eq!(b.spi.parse::<f64>().map(f64::to_bits), Ok(0.1f64.to_bits()));
        assert_eq!(b.min_size, "7");
        assert_eq!(
            b.min_diff.parse::<f64>().map(f64::to_bits),
            Ok(l.min_diff.to_bits())
        );
        assert_eq!(
            b.max_diff.parse::<f64>().map(f64::to_bits),
            Ok(l.max_diff.to_bits())
        );
    }

    /// Every decision of `can_insert` and `can_sample` on a grid of `(inserted, sampled)` around
    /// the bounds of several configs, against [`LUA`] evaluated by a redis-server of the test's
    /// own (one EVAL per config and batch size).
    #[tokio::test]
    async fn limiter_lua_agrees_with_rust() -> std::result::Result<(), Box<dyn std::error::Error>> {
        const GRID: &str = r"
local spi, min_size = tonumber(ARGV[1]), tonumber(ARGV[2])
local min_diff, max_diff = tonumber(ARGV[3]), tonumber(ARGV[4])
local n, ins0, smp0, w = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local out = {}
for ins = ins0, ins0 + w do
  for smp = smp0, smp0 + w do
    local d = 0
    if can_insert(ins, smp, spi, max_diff) then d = d + 1 end
    if can_sample(ins, smp, n, min_size, spi, min_diff) then d = d + 2 end
    d = d + 4 * insert_room(ins, smp, n, spi, max_diff)
    out[#out + 1] = d
  end
end
return out
";
        let script = ::redis::Script::new(&format!("{LUA}{GRID}"));
        let server = crate::replay::testutil::RedisServer::start();
        let client = ::redis::Client::open(server.url())?;
        let mut con = client.get_multiplexed_async_connection().await?;
        // (min_size, spi, error_buffer, first inserted, first sampled): each grid crosses a bound.
        // 0.1 and 1.5 make the products inexact in binary.
        let configs: [(usize, f64, f64, u64, u64); 7] = [
            (10, 1.0, 5.0, 0, 0),
            (10, 0.0, 0.0, 0, 0),
            (4, 0.5, 2.0, 0, 0),
            (7, 0.1, 1.0, 0, 0),
            (3, 1.5, 4.0, 0, 0),
            // The defaults (spi = 4, min_size = 1024, error_buffer = 4096: min_diff = 0,
            // max_diff = 8192): the insert bound (4 * 2048 - 0 = 8192), then min_size and the
            // sample bound (4 * 1024 - 4096 = 0).
            (1024, 4.0, 4096.0, 2030, 0),
            (1024, 4.0, 4096.0, 1010, 4060),
        ];
        const W: u64 = 40;
        let cells = ((W + 1) * (W + 1)) as i64;
        let mut checked = 0;
        // Whether some grid crossed the insert bound, and some the sample bound.
        let mut crossed = [false; 2];
        for (min_size, spi, eb, ins0, smp0) in configs {
            let mut seen = [false; 4];
            let l = RateLimiter::new(&cfg(1 << 20, min_size, spi, eb, Sampler::Uniform));
            let b = l.lua_bounds();
            for n in [1u64, 3, 16] {
                let lua: Vec<i64> = script
                    .arg(&b.spi)
                    .arg(&b.min_size)
                    .arg(&b.min_diff)
                    .arg(&b.max_diff)
                    .arg(n)
                    .arg(ins0)
                    .arg(smp0)
                    .arg(W)
                    .invoke_async(&mut con)
                    .await?;
                let mut i = 0;
                let (mut ins_yes, mut smp_yes) = (0, 0);
                for ins in ins0..=ins0 + W {
                    for smp in smp0..=smp0 + W {
                        let rust = i64::from(l.can_insert(ins, smp))
                            + 2 * i64::from(l.can_sample(ins, smp, n))
                            + 4 * l.insert_room(ins, smp, n) as i64;
                        assert_eq!(
                            lua.get(i).copied(),
                            Some(rust),
                            "min_size {min_size}, spi {spi}, error_buffer {eb}, n {n}, \
                             inserted {ins}, sampled {smp}"
                        );
                        ins_yes += rust & 1;
                        smp_yes += (rust >> 1) & 1;
                        i += 1;
                    }
                }
                assert_eq!(lua.len(), i);
                checked += i;
                seen[0] |= ins_yes > 0;
                seen[1] |= ins_yes < cells;
                seen[2] |= smp_yes > 0;
                seen[3] |= smp_yes < cells;
            }
            // Both answers occur for at least one of the two predicates on this grid.
            assert!(
                (seen[0] && seen[1]) || (seen[2] && seen[3]),
                "grid of min_size {min_size}, spi {spi} crosses no bound: {seen:?}"
            );
            crossed[0] |= seen[0] && seen[1];
            crossed[1] |= seen[2] && seen[3];
        }
        assert_eq!(checked, 7 * 3 * 41 * 41);
        assert_eq!(crossed, [true, true]);
        Ok(())
    }
}
