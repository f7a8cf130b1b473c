//! The memory budget: how many bytes of message bodies the sidecar may hold at once.
//!
//! A delivery's body is held from its arrival until it is settled (a backoff included); it
//! is shared, never copied, on the way to the worker. Nothing else bounds the sum: eight
//! consumers with 15 MiB messages hold 120 MiB. The budget is `memory.limit_bytes`, or by
//! default the container's cgroup memory limit less [`BASELINE_HEADROOM`] for the sidecar's
//! own baseline (measured: 25–30 MB resident at 64 consumers with small messages), and no
//! budget without a cgroup limit. [`crate::capacity`] admits deliveries within it.
//!
//! cgroup v2: `/sys/fs/cgroup/memory.max` (`max` when unlimited). cgroup v1:
//! `/sys/fs/cgroup/memory/memory.limit_in_bytes` (a number near `i64::MAX`, rounded to the
//! page size, when unlimited). <https://docs.kernel.org/admin-guide/cgroup-v2.html#memory-interface-files>

use std::path::Path;

/// Memory kept for the sidecar itself when the budget comes from the cgroup limit: its
/// baseline (25–30 MB resident, see BENCHMARKS.md) with room to spare. 48 MiB.
pub const BASELINE_HEADROOM: u64 = 48 * 1024 * 1024;

/// Where the cgroup files are.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A cgroup v1 limit at or above this (2^60 bytes) means no limit.
const UNLIMITED_V1: u64 = 1 << 60;

/// Where the container's memory limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// `memory.limit_bytes` in the config.
    Config,
    /// The cgroup v2 `memory.max`.
    CgroupV2,
    /// The cgroup v1 `memory.limit_in_bytes`.
    CgroupV1,
}

/// The effective budget, in bytes, of message bodies held at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes of bodies that may be held at once.
    pub bytes: u64,
    /// Where it came from.
    pub source: LimitSource,
}

/// Parses a cgroup v2 `memory.max`: a byte count, or `max` (no limit: `None`).
#[must_use]
pub fn parse_v2(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        n => n.parse().ok(),
    }
}

/// Parses a cgroup v1 `memory.limit_in_bytes`; a value near `i64::MAX` is no limit.
#[must_use]
pub fn parse_v1(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&n: &u64| n < UNLIMITED_V1)
}

/// The container's memory limit from the cgroup files under `root` (normally
/// `/sys/fs/cgroup`): v2 first, then v1. `None` without a limit.
#[must_use]
pub fn cgroup_limit(root: &Path) -> Option<(u64, LimitSource)> {
    if let Ok(text) = std::fs::read_to_string(root.join("memory.max")) {
        return parse_v2(&text).map(|n| (n, LimitSource::CgroupV2));
    }
    let text = std::fs::read_to_string(root.join("memory").join("memory.limit_in_bytes")).ok()?;
    parse_v1(&text).map(|n| (n, LimitSource::CgroupV1))
}

/// The budget: `limit_bytes` when set, else the cgroup limit under `cgroup_root` less
/// [`BASELINE_HEADROOM`] (at least half the limit is kept for bodies, for a small
/// container); `None` when neither is set (no budget).
#[must_use]
pub fn budget(limit_bytes: Option<u64>, cgroup_root: &Path) -> Option<Budget> {
    if let Some(bytes) = limit_bytes {
        return Some(Budget {
            bytes,
            source: LimitSource::Config,
        });
    }
    let (limit, source) = cgroup_limit(cgroup_root)?;
    let bytes = limit.saturating_sub(BASELINE_HEADROOM).max(limit / 2);
    Some(Budget { bytes, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_values() {
        assert_eq!(parse_v2("max\n"), None);
        assert_eq!(parse_v2("134217728\n"), Some(134_217_728));
        assert_eq!(parse_v2("junk"), None);
    }

    #[test]
    fn cgroup_v1_values() {
        assert_eq!(parse_v1("9223372036854771712\n"), None, "unlimited");
        assert_eq!(parse_v1("134217728\n"), Some(134_217_728));
        assert_eq!(parse_v1(""), None);
    }

    fn root_with(files: &[(&str, &str)]) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("amqp-sidecar-cgroup-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let file = root.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
            std::fs::write(file, text).expect("write");
        }
        root
    }

    #[test]
    fn the_budget_comes_from_config_then_v2_then_v1() {
        const MIB: u64 = 1024 * 1024;
        let v2 = root_with(&[("memory.max", "134217728\n")]);
        assert_eq!(
            budget(None, &v2),
            Some(Budget {
                bytes: 128 * MIB - BASELINE_HEADROOM,
                source: LimitSource::CgroupV2
            })
        );
        assert_eq!(
            budget(Some(64 * MIB), &v2).map(|b| (b.bytes, b.source)),
            Some((64 * MIB, LimitSource::Config))
        );
        let unlimited_v2 = root_with(&[
            ("memory.max", "max\n"),
            ("memory/memory.limit_in_bytes", "134217728"),
        ]);
        assert_eq!(budget(None, &unlimited_v2), None, "v2 says max: no budget");
        let v1 = root_with(&[("memory/memory.limit_in_bytes", "67108864\n")]);
        assert_eq!(
            budget(None, &v1),
            Some(Budget {
                bytes: 32 * MIB,
                source: LimitSource::CgroupV1
            }),
            "a small limit keeps half for bodies"
        );
        let unlimited_v1 = root_with(&[("memory/memory.limit_in_bytes", "9223372036854771712")]);
        assert_eq!(budget(None, &unlimited_v1), None);
        assert_eq!(budget(None, &root_with(&[])), None, "no cgroup files");
    }
}
