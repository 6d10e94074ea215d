//! A token bucket: at most `burst` at once and `per_sec` a second on average; what it refuses
//! is counted and reported with the next one it allows.
//!
//! The responder takes a token for each 503 it would send to a connection the kernel has no
//! state for (`conn_table_full`), so those answers cannot be turned into a reflector; its log
//! lines have their own per-second sample (`responder::LogLimit`).
//!
//! ```
//! use filter_userspace::ratelimit::RateLimiter;
//! let limiter = RateLimiter::new(10, 20);
//! if let Some(refused_before) = limiter.allow() {
//!     tracing::info!(refused_before, "answered 503");
//! }
//! ```

use std::sync::Mutex;
use std::time::Instant;

/// A token bucket. `Sync`: share one behind an `Arc` or a `static`.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec: per_sec as f64,
            burst: burst.max(1) as f64,
            state: Mutex::new(State {
                tokens: burst.max(1) as f64,
                last: Instant::now(),
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` if a line may be logged now, where `n` lines were suppressed since the last
    /// one allowed (log it as a field); `None` if this line is to be suppressed.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = now;
        s.tokens = (s.tokens + elapsed * self.per_sec).min(self.burst);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }

    /// Lines suppressed and not yet reported.
    pub fn pending(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_limits_then_reports_what_it_suppressed() {
        let l = RateLimiter::new(2, 3);
        let t0 = Instant::now();
        let got: Vec<_> = (0..5).map(|_| l.allow_at(t0)).collect();
        assert_eq!(got, [Some(0), Some(0), Some(0), None, None]);
        assert_eq!(l.pending(), 2);
        // Half a second later one token is back.
        assert_eq!(l.allow_at(t0 + Duration::from_millis(500)), Some(2));
        assert_eq!(l.allow_at(t0 + Duration::from_millis(500)), None);
        // Never more than the burst, however long it was quiet.
        let later = t0 + Duration::from_secs(3600);
        let got: Vec<_> = (0..4).map(|_| l.allow_at(later)).collect();
        assert_eq!(got, [Some(1), Some(0), Some(0), None]);
    }
}
