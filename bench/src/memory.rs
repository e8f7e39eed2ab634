//! Memory: the agent's resident set (/proc) and the kernel memory of the pinned maps (bpftool's
//! `memlock`, what the kernel charges for each map).

use std::path::Path;

use anyhow::Context as _;
use lb::dataplane::ALL_MAPS;

const BYTES_PER_MIB: f64 = 1024.0 * 1024.0;
const BYTES_PER_KIB: f64 = 1024.0;

/// Each pinned map's name and `memlock` in MiB.
pub fn pinned_maps(pin_dir: &Path) -> anyhow::Result<Vec<(String, f64)>> {
    ALL_MAPS
        .iter()
        .map(|name| {
            let path = pin_dir.join(name);
            let path = path.to_str().context("pin path is UTF-8")?;
            let output = lb_tests::netns::run("bpftool", &["-j", "map", "show", "pinned", path])?;
            let info: serde_json::Value = serde_json::from_slice(&output.stdout)?;
            let bytes = info["bytes_memlock"]
                .as_u64()
                .with_context(|| format!("bpftool reports no memlock for {name}"))?;
            Ok(((*name).to_owned(), bytes as f64 / BYTES_PER_MIB))
        })
        .collect()
}

/// A process's resident set size in MiB (`VmRSS`).
pub fn resident_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * BYTES_PER_KIB / BYTES_PER_MIB)
}
