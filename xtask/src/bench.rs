//! `cargo xtask bench`: builds lb and the benchmark in release mode and runs it as root. The
//! results (results.json, report.md, PNG plots) go to `target/bench/<UTC time>/`, and
//! `target/bench/latest` points at the newest. Figures are reported, never judged: a benchmark
//! does not fail on a number, only when a measurement could not be made or checked.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{cargo, run_command, setup, workspace_root};

/// Options passed through to `lb-bench`.
pub struct BenchOptions {
    pub quick: bool,
    pub only: Option<String>,
}

fn utc_stamp() -> anyhow::Result<String> {
    let output = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

pub fn run(options: &BenchOptions) -> anyhow::Result<()> {
    setup::ensure_bench()?;
    if !lb_tests::privilege::is_root() {
        bail!(
            "the benchmark needs root (network namespaces, BPF programs, rule sets): run `sudo -E \
             cargo xtask bench`"
        );
    }
    // Release builds: a debug agent or load generator would measure the compiler's settings.
    run_command(cargo().args(["build", "--release", "-p", "lb-userspace", "-p", "lb-bench"]))?;
    let release = workspace_root().join("target").join("release");
    let bench_root = workspace_root().join("target").join("bench");
    let out: PathBuf = bench_root.join(utc_stamp()?);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut command = Command::new(release.join("lb-bench"));
    command
        .env("LB_BIN", release.join("lb"))
        .arg("--out")
        .arg(&out);
    if options.quick {
        command.arg("--quick");
    }
    if let Some(only) = &options.only {
        command.args(["--only", only]);
    }
    run_command(&mut command)?;
    let latest = bench_root.join("latest");
    let _ = std::fs::remove_file(&latest);
    std::os::unix::fs::symlink(&out, &latest)
        .with_context(|| format!("linking {}", latest.display()))?;
    println!(
        "xtask: benchmark report: {}",
        out.join("report.md").display()
    );
    Ok(())
}
