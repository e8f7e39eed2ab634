//! The kernel's own accounting of BPF program run time (`run_time_ns` / `run_cnt`), enabled for
//! as long as a [`RunTimeStats`] lives (`BPF_ENABLE_STATS`, released with its descriptor, so a
//! crashed run leaves nothing switched on), read with bpftool.

use std::os::fd::OwnedFd;

use anyhow::Context as _;

/// Keeps run-time statistics enabled while alive.
pub struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> anyhow::Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
        Ok(Self { _fd: fd })
    }
}

/// A program's cumulative run time and run count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    pub time_ns: u64,
    pub count: u64,
}

impl Runs {
    /// Mean ns per run between `earlier` and `self`; `None` without runs.
    pub fn ns_per_run_since(&self, earlier: &Runs) -> Option<f64> {
        let count = self.count.checked_sub(earlier.count)?;
        let time = self.time_ns.checked_sub(earlier.time_ns)?;
        (count > 0).then(|| time as f64 / count as f64)
    }
}

/// The run statistics of the program with id `id`.
pub fn program_runs(id: u32) -> anyhow::Result<Runs> {
    let output = lb_tests::netns::run("bpftool", &["-j", "prog", "show", "id", &id.to_string()])?;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(Runs {
        // Absent until the program has run with statistics on.
        time_ns: info["run_time_ns"].as_u64().unwrap_or_default(),
        count: info["run_cnt"].as_u64().unwrap_or_default(),
    })
}

/// The id of the program attached through the pinned link at `link`.
pub fn linked_program_id(link: &std::path::Path) -> anyhow::Result<u32> {
    let path = link.to_str().context("link path is UTF-8")?;
    let output = lb_tests::netns::run("bpftool", &["-j", "link", "show", "pinned", path])?;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let id = info["prog_id"]
        .as_u64()
        .context("the link names no program")?;
    Ok(u32::try_from(id)?)
}
