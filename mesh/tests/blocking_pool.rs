//! Own process: counts the process's threads.

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// After a burst of blocking work, the pool shrinks back although the
/// configuration check keeps using it once a second.
#[test]
fn a_burst_of_blocking_threads_goes_away_under_a_check_each_second() {
    let rt = llm_egress_mesh::process::runtime(Some(1)).expect("runtime");
    let before = threads();
    rt.block_on(async {
        let burst = 8;
        let all_running = Arc::new(Barrier::new(burst + 1));
        let tasks: Vec<_> = (0..burst)
            .map(|_| {
                let all_running = all_running.clone();
                tokio::task::spawn_blocking(move || {
                    all_running.wait();
                })
            })
            .collect();
        // Every task holds a thread of its own until all are running.
        tokio::task::spawn_blocking({
            let all_running = all_running.clone();
            move || all_running.wait()
        })
        .await
        .expect("burst");
        for t in tasks {
            t.await.expect("blocking task");
        }
        assert!(threads() >= before + burst, "the burst made its threads");
        let deadline = Instant::now() + Duration::from_secs(40);
        // The binaries' rhythm: a small blocking task each second.
        while threads() > before + 2 {
            assert!(
                Instant::now() < deadline,
                "{} threads after 40 s of checks, {before} before the burst: idle blocking threads never expire",
                threads()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::spawn_blocking(|| ()).await.expect("check");
        }
    });
}
