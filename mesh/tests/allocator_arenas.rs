//! Own process: the arena cap is process-wide and applies to arenas made
//! after it is set.

use std::sync::{Arc, Barrier};

/// Arenas glibc has now, from `malloc_info`'s XML (one `<heap nr=…>` each).
fn arenas() -> usize {
    let path = std::env::temp_dir().join(format!("malloc-info-{}.xml", std::process::id()));
    let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes()).expect("temp path has no NUL");
    // SAFETY: a FILE opened for writing, handed to malloc_info, then closed.
    unsafe {
        let f = libc::fopen(c_path.as_ptr(), c"w".as_ptr());
        assert!(!f.is_null(), "cannot open {}", path.display());
        assert_eq!(libc::malloc_info(0, f), 0);
        libc::fclose(f);
    }
    let xml = std::fs::read_to_string(&path).expect("malloc_info output");
    let _ = std::fs::remove_file(&path);
    xml.matches("<heap nr=").count()
}

#[test]
fn threads_that_allocate_at_once_share_the_capped_arenas() {
    llm_egress_mesh::process::bound_allocator_arenas(2);
    let threads = 8;
    let all_allocated = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (all_allocated, release) = (all_allocated.clone(), release.clone());
            std::thread::spawn(move || {
                // Held while every other thread allocates too.
                let held: Vec<Vec<u8>> = (0..64).map(|j| vec![(i + j) as u8; 4096]).collect();
                all_allocated.wait();
                release.wait();
                held.len()
            })
        })
        .collect();
    all_allocated.wait();
    let n = arenas();
    release.wait();
    for h in handles {
        assert_eq!(h.join().expect("allocating thread"), 64);
    }
    assert!(
        (1..=2).contains(&n),
        "{n} arenas for {threads} allocating threads with a cap of 2"
    );
}
