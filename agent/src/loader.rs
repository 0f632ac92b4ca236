//! Loads the kernel programs, attaches them to the cgroup root and pins maps
//! and links under bpffs, or reuses what an earlier agent pinned there.
//!
//! Layout under the pin directory:
//!   maps/{TARGETS,ENROLLED,PENDING,ORIG_DST,CONFIG,COUNTERS}
//!   links/{connect4,connect6,sock_ops}
//! Pinned links keep the programs attached while no agent runs, so captured
//! destinations are refused (the proxy address has no listener), never
//! reached directly.

use std::{
    collections::HashMap as StdHashMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SockOps,
    },
    Ebpf, EbpfLoader,
};
use llm_egress_common::*;

/// The compiled kernel programs (built by build.rs through aya-build).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/llm-egress-bpf"));

const LINK_CONNECT4: &str = "connect4";
const LINK_CONNECT6: &str = "connect6";
const LINK_SOCK_OPS: &str = "sock_ops";
const LINKS: [&str; 3] = [LINK_CONNECT4, LINK_CONNECT6, LINK_SOCK_OPS];
const MAPS: [&str; 6] = [
    MAP_TARGETS,
    MAP_ENROLLED,
    MAP_PENDING,
    MAP_ORIG_DST,
    MAP_CONFIG,
    MAP_COUNTERS,
];

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF program {name}: link: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("removing {path}: {source}")]
    Unpin { path: PathBuf, source: std::io::Error },
}

/// Whether this start attached the programs or found them already attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attachment {
    Attached,
    Reused,
}

/// Typed handles on the pinned maps. Each access is one bpf(2) syscall; the
/// mutex serialises them because aya's map handles need `&mut` to write.
pub struct Maps {
    targets: HashMap<MapData, SockKey, u8>,
    enrolled: HashMap<MapData, u64, u8>,
    pending: HashMap<MapData, u64, OrigDst>,
    orig_dst: HashMap<MapData, SockKey, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
}

pub struct Capture {
    pub attachment: Attachment,
    pub pin_dir: PathBuf,
    maps: Mutex<Maps>,
    // Keeps the loaded object (and its map fds) alive for the agent's life.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("pin_dir", &self.pin_dir).finish()
    }
}

/// Makes a map used as a set hold exactly `want`. Stale keys go first, so
/// that a full map still loses what is no longer wanted; every key that
/// fits is written even when some do not (the first failure is returned).
fn sync_set<K: aya::Pod + Copy + Eq + std::hash::Hash>(
    map: &mut HashMap<MapData, K, u8>,
    want: &[K],
    present: u8,
    name: &'static str,
) -> Result<(), LoaderError> {
    let have: Vec<K> = map.keys().filter_map(Result::ok).collect();
    let (remove, add) = sync_plan(&have, want);
    let mut first_error = None;
    for key in remove {
        if let Err(e) = map.remove(&key) {
            first_error.get_or_insert(map_err(name)(e));
        }
    }
    for key in add {
        if let Err(e) = map.insert(key, present, 0) {
            first_error.get_or_insert(map_err(name)(e));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What to remove from and add to a map holding `have` so that it holds
/// `want` (sets: order and repeats do not matter).
fn sync_plan<K: Copy + Eq + std::hash::Hash>(have: &[K], want: &[K]) -> (Vec<K>, Vec<K>) {
    let have_set: std::collections::HashSet<K> = have.iter().copied().collect();
    let want_set: std::collections::HashSet<K> = want.iter().copied().collect();
    let remove = have.iter().copied().filter(|k| !want_set.contains(k)).collect();
    let mut seen = std::collections::HashSet::new();
    let add = want
        .iter()
        .copied()
        .filter(|k| !have_set.contains(k) && seen.insert(*k))
        .collect();
    (remove, add)
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> LoaderError {
    move |source| LoaderError::Program { name, source }
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, LoaderError> {
    let map = ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))?;
    HashMap::try_from(map).map_err(map_err(name))
}

impl Capture {
    /// Attaches (or reuses) the programs on `cgroup_root` and programs the
    /// proxy address workloads are redirected to.
    pub fn install(
        cgroup_root: &Path,
        pin_dir: &Path,
        proxy_v4: Option<SocketAddr>,
        proxy_v6: Option<SocketAddr>,
    ) -> Result<Capture, LoaderError> {
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [pin_dir, &maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| LoaderError::PinDir {
                path: dir.to_owned(),
                source,
            })?;
        }

        // Links reference the maps they were loaded with. If any map pin has
        // gone missing, reusing the links would leave the agent writing to
        // maps the programs never read: start over instead.
        let maps_complete = MAPS.iter().all(|m| maps_dir.join(m).exists());
        if !maps_complete {
            for link in LINKS {
                remove_if_exists(&links_dir.join(link))?;
            }
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(BPF_OBJECT)?;

        let cgroup = fs::File::open(cgroup_root).map_err(|source| LoaderError::Cgroup {
            path: cgroup_root.to_owned(),
            source,
        })?;

        // On kernels with bpf_link (5.7+, which aya uses) cgroup links always
        // coexist with other programs; link_create rejects any attach flag,
        // so `Single` (no flag) is the mode to pass.
        let mut attached_any = false;
        for (link_name, prog_name) in [
            (LINK_CONNECT4, PROG_CONNECT4),
            (LINK_CONNECT6, PROG_CONNECT6),
            (LINK_SOCK_OPS, PROG_SOCK_OPS),
        ] {
            let pin = links_dir.join(link_name);
            if pin.exists() {
                match PinnedLink::from_pin(&pin) {
                    Ok(_) => continue, // still attached: nothing to do
                    Err(e) => {
                        tracing::warn!(path = %pin.display(), error = %e, "stale link pin; re-attaching");
                        remove_if_exists(&pin)?;
                    }
                }
            }
            attached_any = true;
            let program = ebpf.program_mut(prog_name).ok_or(LoaderError::Program {
                name: prog_name_static(prog_name),
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let fd_link: FdLink = if link_name == LINK_SOCK_OPS {
                let p: &mut SockOps = program.try_into().map_err(prog_err(PROG_SOCK_OPS))?;
                p.load().map_err(prog_err(PROG_SOCK_OPS))?;
                let id = p
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(prog_err(PROG_SOCK_OPS))?;
                let link = p.take_link(id).map_err(prog_err(PROG_SOCK_OPS))?;
                FdLink::try_from(link).map_err(|source| LoaderError::Link {
                    name: PROG_SOCK_OPS,
                    source,
                })?
            } else {
                let name = prog_name_static(prog_name);
                let p: &mut CgroupSockAddr = program.try_into().map_err(prog_err(name))?;
                p.load().map_err(prog_err(name))?;
                let id = p
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(prog_err(name))?;
                let link = p.take_link(id).map_err(prog_err(name))?;
                FdLink::try_from(link).map_err(|source| LoaderError::Link { name, source })?
            };
            fd_link.pin(&pin).map_err(|source| LoaderError::Pin {
                path: pin.clone(),
                source,
            })?;
        }

        let mut config: Array<MapData, ProxyConfig> = Array::try_from(
            ebpf.take_map(MAP_CONFIG)
                .ok_or(LoaderError::MissingMap(MAP_CONFIG))?,
        )
        .map_err(map_err(MAP_CONFIG))?;
        config
            .set(0, ProxyConfig::new(proxy_v4, proxy_v6), 0)
            .map_err(map_err(MAP_CONFIG))?;

        let maps = Maps {
            targets: take_hash(&mut ebpf, MAP_TARGETS)?,
            enrolled: take_hash(&mut ebpf, MAP_ENROLLED)?,
            pending: take_hash(&mut ebpf, MAP_PENDING)?,
            orig_dst: take_hash(&mut ebpf, MAP_ORIG_DST)?,
            counters: PerCpuArray::try_from(
                ebpf.take_map(MAP_COUNTERS)
                    .ok_or(LoaderError::MissingMap(MAP_COUNTERS))?,
            )
            .map_err(map_err(MAP_COUNTERS))?,
        };
        Ok(Capture {
            attachment: if attached_any {
                Attachment::Attached
            } else {
                Attachment::Reused
            },
            pin_dir: pin_dir.to_owned(),
            maps: Mutex::new(maps),
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps half-written
        // (each call is one syscall), so a poisoned lock is safe to reuse.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the capture record of an accepted connection by its peer address.
    pub fn take_orig_dst(&self, peer: SocketAddr) -> Option<OrigDst> {
        let key = SockKey::from_socket_addr(peer);
        let mut maps = self.maps();
        let orig = maps.orig_dst.get(&key, 0).ok()?;
        let _ = maps.orig_dst.remove(&key);
        Some(orig)
    }

    /// Makes TARGETS equal `want`.
    pub fn sync_targets(&self, want: &[SockKey]) -> Result<(), LoaderError> {
        sync_set(&mut self.maps().targets, want, TARGET_PRESENT, MAP_TARGETS)
    }

    /// Makes ENROLLED equal `want`.
    pub fn sync_enrolled(&self, want: &[u64]) -> Result<(), LoaderError> {
        sync_set(&mut self.maps().enrolled, want, ENROLLED_PRESENT, MAP_ENROLLED)
    }

    /// Sums of the per-CPU counters, in `COUNTER_NAMES` order.
    pub fn counters(&self) -> [u64; COUNTERS_LEN as usize] {
        let maps = self.maps();
        let mut out = [0u64; COUNTERS_LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = maps.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Entry counts per map (walks the keys; the maps are bounded).
    pub fn map_sizes(&self) -> StdHashMap<&'static str, usize> {
        let maps = self.maps();
        StdHashMap::from([
            (MAP_TARGETS, maps.targets.keys().count()),
            (MAP_ENROLLED, maps.enrolled.keys().count()),
            (MAP_PENDING, maps.pending.keys().count()),
            (MAP_ORIG_DST, maps.orig_dst.keys().count()),
        ])
    }
}

fn prog_name_static(name: &str) -> &'static str {
    [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCK_OPS]
        .into_iter()
        .find(|p| *p == name)
        .unwrap_or("unknown")
}

fn remove_if_exists(path: &Path) -> Result<(), LoaderError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoaderError::Unpin {
            path: path.to_owned(),
            source,
        }),
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub links: usize,
    pub maps: usize,
}

/// Detaches the programs (by removing the link pins, which hold the last
/// reference) and removes the map pins and directories.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, LoaderError> {
    let remove_all = |sub: &str, names: &[&str]| -> Result<usize, LoaderError> {
        let mut removed = 0;
        for name in names {
            let path = pin_dir.join(sub).join(name);
            if path.exists() {
                remove_if_exists(&path)?;
                removed += 1;
            }
        }
        let _ = fs::remove_dir(pin_dir.join(sub));
        Ok(removed)
    };
    // Links first: once they are gone nothing is captured any more.
    let links = remove_all("links", &LINKS)?;
    let maps = remove_all("maps", &MAPS)?;
    let _ = fs::remove_dir(pin_dir);
    Ok(Uninstalled { links, maps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_removes_what_is_not_wanted_and_adds_each_missing_key_once() {
        let (remove, add) = sync_plan(&[1, 2, 3], &[3, 4, 4, 5, 3]);
        assert_eq!(remove, [1, 2]);
        assert_eq!(add, [4, 5]);
        let (remove, add) = sync_plan::<u32>(&[], &[]);
        assert!(remove.is_empty() && add.is_empty());
    }
}
