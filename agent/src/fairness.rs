//! A per-workload share of the node's tunnel: one pod may hold at most
//! `max` captured connections at once, so a pod opening connections in a
//! loop cannot use up the streams (one HTTP/2 connection per gateway, at
//! most `uplink::MAX_STREAMS`) that every other pod of the node shares.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

pub struct WorkloadLimit {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One held connection; released when dropped.
pub struct Slot {
    limit: Arc<WorkloadLimit>,
    key: String,
}

impl WorkloadLimit {
    pub fn new(max: usize) -> Arc<WorkloadLimit> {
        Arc::new(WorkloadLimit {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for `workload` (namespace/pod), or `None` at its limit.
    pub fn try_acquire(self: &Arc<Self>, workload: &str) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(workload.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            limit: self.clone(),
            key: workload.to_string(),
        })
    }

    /// Connections `workload` holds now.
    #[cfg(test)]
    pub fn held(&self, workload: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(workload)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_workload_at_its_limit_leaves_the_others_their_share() {
        let limit = WorkloadLimit::new(2);
        let a1 = limit.try_acquire("team-a/greedy").unwrap();
        let _a2 = limit.try_acquire("team-a/greedy").unwrap();
        assert!(limit.try_acquire("team-a/greedy").is_none());
        let _b = limit
            .try_acquire("team-b/sleep")
            .expect("another pod still gets a slot");
        drop(a1);
        assert_eq!(limit.held("team-a/greedy"), 1);
        assert!(limit.try_acquire("team-a/greedy").is_some());
        assert_eq!(limit.held("nobody"), 0);
    }
}
