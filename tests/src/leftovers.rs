//! What killed runs left behind, and its removal.
//!
//! A run names everything it creates `<kind>-<pid>-<n>...` (see [`crate::netns::unique_prefix`]):
//! namespaces in /run/netns, pin directories on bpffs, work directories and files in the temp
//! directory. A SIGKILL or a crash skips the guards that remove them, so runs remove the
//! leftovers of earlier ones at their start. Only names of that form whose process is gone are
//! touched: a live run's names, and anything named otherwise, are left alone.

use std::{
    path::{Path, PathBuf},
    sync::Once,
};

use crate::{
    agent::{BPFFS, lb, lb_binary},
    netns::{NETNS_DIR, run},
};

/// The kind of the test suites' names.
pub const TESTS: &str = "lbt";
/// The kind of `cargo xtask demo`'s names.
pub const DEMO: &str = "lbd";
/// The kind of `cargo xtask bench`'s names.
pub const BENCH: &str = "lbb";

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid embedded in a `<kind>-<pid>-...` name, if `name` has that shape.
fn owner_pid(kind: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(kind)?.strip_prefix('-')?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Entries of `dir` named `<kind>-<pid>-...` whose process is gone.
fn dead_entries(kind: &str, dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            owner_pid(kind, &entry.file_name().to_string_lossy()).is_some_and(|pid| !pid_alive(pid))
        })
        .map(|entry| entry.path())
        .collect()
}

/// Where a cgroup v2 hierarchy may be mounted (unified and hybrid hosts).
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// Removes the leftovers of dead runs of `kind`: their namespaces, their pin directories (with
/// `lb reset`, which needs the `lb` binary; without it they stay), their cgroups and their
/// temporary files. Returns the pin directories reset.
pub fn remove(kind: &str, lb_path: Option<&Path>) -> Vec<PathBuf> {
    for namespace in dead_entries(kind, Path::new(NETNS_DIR)) {
        if let Some(name) = namespace.file_name().and_then(|name| name.to_str()) {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
    let mut reset = Vec::new();
    for pin_dir in dead_entries(kind, Path::new(BPFFS)) {
        let Some(lb_path) = lb_path else {
            eprintln!(
                "lb_tests: leaving {} (no lb binary to reset it with)",
                pin_dir.display()
            );
            continue;
        };
        match lb(lb_path, &pin_dir, &["reset"]) {
            Ok(_) => reset.push(pin_dir),
            Err(error) => eprintln!(
                "lb_tests: could not reset the leftover {}: {error:#}",
                pin_dir.display()
            ),
        }
    }
    // Cgroups a socket-hook test made (removable once the pins above are reset, which detaches
    // the hooks, and their processes are gone).
    for root in CGROUP_ROOTS {
        for cgroup in dead_entries(kind, Path::new(root)) {
            let _ = std::fs::remove_dir(&cgroup);
        }
    }
    for path in dead_entries(kind, &std::env::temp_dir()) {
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    reset
}

/// Removes the test suites' leftovers once per test process; every privileged test calls it
/// first, and the other tests of the process wait until it is done.
pub fn remove_test_leftovers_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let lb_path = lb_binary()
            .inspect_err(|error| eprintln!("lb_tests: {error:#}"))
            .ok();
        for pin_dir in remove(TESTS, lb_path.as_deref()) {
            eprintln!(
                "lb_tests: reset the leftover pin directory {}",
                pin_dir.display()
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("lbt", "lbt-1234-0-node"), Some(1234));
        assert_eq!(owner_pid("lbt", "lbt-1234-0"), Some(1234));
        assert_eq!(owner_pid("lbt", "lbd-1234-0-node"), None);
        assert_eq!(owner_pid("lbt", "lbtx-1234-0"), None);
        assert_eq!(owner_pid("lbt", "lbt-1234"), None);
        assert_eq!(owner_pid("lbt", "lbt-12x4-0"), None);
        assert_eq!(owner_pid("lbt", "someone-else"), None);
    }

    #[test]
    fn only_dead_owners_are_leftovers() {
        let dir = std::env::temp_dir().join(format!("lb-leftovers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        // No process has the largest pid the kernel can never hand out (pid_max <= 2^22).
        let dead = format!("lbt-{}-0-node", u32::MAX);
        let alive = format!("lbt-{}-0-node", std::process::id());
        for name in [dead.as_str(), alive.as_str(), "lbt-notapid-0", "other"] {
            std::fs::write(dir.join(name), "").expect("entry");
        }
        let found = dead_entries(TESTS, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, vec![dir.join(dead)]);
    }
}
