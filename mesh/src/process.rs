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

/// How long an idle blocking-pool thread lives (tokio's default is 10 s).
/// Both binaries check their configuration on the blocking pool once a
/// second, and an idle thread is woken oldest first: with 10 s, every
/// thread a burst ever made (DNS lookups, a slow reload) was woken before
/// it could expire and stayed for good, with its stack and arena. With
/// 2 s about two stay.
pub const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// A multi-threaded runtime with `workers` threads (default: one per CPU).
/// On small nodes one worker avoids cross-thread wake-ups, which dominate a
/// proxy's profile there.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    let workers = workers
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    b.worker_threads(workers);
    b.thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE);
    bound_allocator_arenas(workers + 1);
    b.enable_all().build()
}

/// Caps glibc's malloc arenas at `arenas`. By default every thread that
/// allocates may get its own arena, up to eight per CPU, and an arena never
/// goes away: a burst of blocking-pool threads (DNS lookups for new
/// upstream connections, configuration reloads) left a proxy carrying
/// megabytes of half-empty arenas after the threads had exited. One arena
/// per worker (and one for the rest) keeps workers from contending.
pub fn bound_allocator_arenas(arenas: usize) {
    let arenas = i32::try_from(arenas.max(1)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes
    // effect for arenas created from now on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
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
