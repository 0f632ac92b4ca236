//! Process plumbing both binaries share: logging and shutdown signals.

/// Logs to stderr with `tracing`, filtered by `RUST_LOG` (default `info`);
/// JSON lines when asked, colours only on a terminal.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => std::future::pending().await,
    }
}

/// A multi-threaded runtime with `workers` threads (default: one per CPU).
/// On small nodes one worker avoids cross-thread wake-ups, which dominate a
/// proxy's profile there.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers.filter(|n| *n > 0) {
        b.worker_threads(n);
    }
    b.enable_all().build()
}

/// Gives freed heap back to the kernel every few seconds. glibc keeps freed
/// memory in its per-thread arenas otherwise, so a proxy's RSS would stay
/// at its peak (and the agent's at what loading the eBPF programs and the
/// kernel's BTF took); trimming is a few milliseconds of work, at most
/// once per period.
pub async fn release_freed_memory() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The first tick completes at once.
        tick.tick().await;
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
