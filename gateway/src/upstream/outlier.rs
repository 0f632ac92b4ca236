//! Outlier detection per provider: after `threshold` consecutive failures
//! (connect errors, 5xx, 429, timeouts before the first byte) a provider is
//! ejected for `ejection`; a 429 with `Retry-After` ejects it for that long.
//! Ejected providers are skipped while another candidate remains, and come
//! back by themselves when the time is up.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Default)]
struct State {
    consecutive: u32,
    ejected_until: Option<Instant>,
}

pub struct Outliers {
    threshold: u32,
    ejection: Duration,
    state: Mutex<HashMap<String, State>>,
}

impl Outliers {
    pub fn new(threshold: u32, ejection: Duration) -> Outliers {
        Outliers {
            threshold: threshold.max(1),
            ejection,
            state: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_ejected(&self, provider: &str) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .get(provider)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| until > Instant::now())
    }

    pub fn success(&self, provider: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = state.get_mut(provider) {
            s.consecutive = 0;
        }
    }

    /// Records a failure; true when it ejects the provider now.
    pub fn failure(&self, provider: &str, retry_after: Option<Duration>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = state.entry(provider.to_string()).or_default();
        s.consecutive = s.consecutive.saturating_add(1);
        let now = Instant::now();
        let already = s.ejected_until.is_some_and(|u| u > now);
        let eject_for = match retry_after {
            Some(d) => Some(d),
            None if s.consecutive >= self.threshold => Some(self.ejection),
            None => None,
        };
        match eject_for {
            Some(d) => {
                s.ejected_until = Some(now + d);
                s.consecutive = 0;
                !already
            }
            None => false,
        }
    }
}

/// `Retry-After` as seconds (an HTTP date is not honoured: providers send
/// seconds), capped at an hour.
pub fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejected_after_consecutive_failures_and_back_when_the_time_is_up() {
        let o = Outliers::new(2, Duration::from_millis(50));
        assert!(!o.failure("a", None));
        o.success("a");
        assert!(!o.failure("a", None), "a success resets the count");
        assert!(o.failure("a", None));
        assert!(o.is_ejected("a") && !o.is_ejected("b"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!o.is_ejected("a"));
    }

    #[test]
    fn retry_after_ejects_at_once_for_that_long() {
        let o = Outliers::new(5, Duration::from_secs(30));
        assert!(o.failure("a", Some(Duration::from_millis(30))));
        assert!(o.is_ejected("a"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!o.is_ejected("a"));
        let mut h = hyper::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
