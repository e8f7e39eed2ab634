//! `cargo xtask test`: every tier, in order, each reported with its duration; exits non-zero if
//! any fails. Tiers after a failed build are skipped (they would only fail the same way).
//!
//! 1. lint: rustfmt, clippy on the host crates and on the eBPF crate (BPF target), warnings denied;
//! 2. build: `lb` and its embedded eBPF object, and the benchmark;
//! 3. host: unit and host tests (checksums, types, manifests, desired state, reconciler, the
//!    benchmark's rule sets and report, deploy/ against Kubernetes' schemas and lb's flags);
//! 4. fixtures (root): the XDP program under BPF_PROG_TEST_RUN, packet in, packet out;
//! 5. end to end (root): real TCP and UDP through a ClusterIP in network namespaces;
//! 6. demo (root): `cargo xtask demo`, the README's first command;
//! 7. benchmark smoke run (root): `cargo xtask bench`'s every path once, at the smallest size.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use lb_tests::{leftovers, privilege};

use crate::{cargo, run_command, setup, workspace_root};

struct Tier {
    name: &'static str,
    needs_root: bool,
    run: fn() -> anyhow::Result<()>,
}

fn lint() -> anyhow::Result<()> {
    run_command(cargo().args(["fmt", "--all", "--check"]))?;
    run_command(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel crate only builds for the BPF target, with nightly and build-std.
    run_command(
        std::process::Command::new("cargo")
            .current_dir(workspace_root())
            .args([
                "+nightly",
                "clippy",
                "-p",
                "lb-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

fn build() -> anyhow::Result<()> {
    run_command(cargo().args(["build", "-p", "lb-userspace", "-p", "lb-bench"]))?;
    // Default members only: lb-ebpf builds for the BPF target alone (through lb-userspace).
    run_command(cargo().args(["test", "--no-run", "--quiet"]))
}

fn host() -> anyhow::Result<()> {
    run_command(cargo().args(["test", "-p", "lb-common", "-p", "lb-userspace"]))?;
    run_command(cargo().args(["test", "-p", "lb-tests", "--lib"]))?;
    // Needs no root: the manifests are parsed and schema-checked, and `lb` only parses its flags.
    run_command(
        cargo()
            .args(["test", "-p", "lb-tests", "--test", "deploy"])
            .env("LB_BIN", lb_binary())
            .env("LB_KUBERNETES_VALIDATE", setup::kubernetes_validate()),
    )?;
    // The benchmark's own tests: workload, rule-set generators (loaded for real in a namespace
    // when root), report and plots.
    run_command(cargo().args(["test", "-p", "lb-bench"]))
}

/// The `lb` the build tier builds; the privileged tiers run it.
fn lb_binary() -> PathBuf {
    workspace_root().join("target/debug/lb")
}

fn privileged(test: &str) -> anyhow::Result<()> {
    run_command(
        cargo()
            .args(["test", "-p", "lb-tests", "--test", test])
            .env("LB_BIN", lb_binary()),
    )
}

/// Removes what killed test runs left (namespaces, pins, temporary files), so that the
/// privileged tiers start from a clean host. Only names of dead test processes are touched.
fn remove_test_leftovers() {
    let lb = lb_binary();
    let lb = lb.exists().then_some(lb.as_path());
    for stale in leftovers::remove(leftovers::TESTS, lb) {
        println!(
            "xtask: removed a killed test run's leftovers at {}",
            stale.display()
        );
    }
}

fn fixtures() -> anyhow::Result<()> {
    privileged("xdp_fixtures")?;
    // 10,000 random packets against the reference model (LB_DIFFERENTIAL_CASES for more).
    privileged("differential")
}

fn end_to_end() -> anyhow::Result<()> {
    privileged("netns_e2e")?;
    privileged("two_nodes")?;
    privileged("interfaces")?;
    // The Kubernetes API source against the API server fixture (one test waits out a minute's
    // outage).
    privileged("kubernetes")?;
    privileged("agent_cli")?;
    // lb services, lb backends and lb plan against a real agent.
    privileged("inspect")?;
    // What bpftool shows of the agent's maps and program (names, BTF, readable dumps).
    privileged("bpftool")
}

fn demo() -> anyhow::Result<()> {
    crate::demo::run()
}

/// `lb-bench --smoke`: every benchmark path once at the smallest size, every verdict checked,
/// so that `cargo xtask bench` cannot rot between runs. Its figures are not looked at.
fn bench_smoke() -> anyhow::Result<()> {
    let out = std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id()));
    let result = run_command(
        std::process::Command::new(workspace_root().join("target/debug/lb-bench"))
            .env("LB_BIN", lb_binary())
            .arg("--smoke")
            .arg("--out")
            .arg(&out),
    );
    let _ = std::fs::remove_dir_all(&out);
    result
}

const TIERS: [Tier; 7] = [
    Tier {
        name: "lint",
        needs_root: false,
        run: lint,
    },
    Tier {
        name: "build",
        needs_root: false,
        run: build,
    },
    Tier {
        name: "host tests",
        needs_root: false,
        run: host,
    },
    Tier {
        name: "XDP fixtures and model (BPF_PROG_TEST_RUN)",
        needs_root: true,
        run: fixtures,
    },
    Tier {
        name: "network-namespace end to end",
        needs_root: true,
        run: end_to_end,
    },
    Tier {
        name: "demo",
        needs_root: true,
        run: demo,
    },
    Tier {
        name: "benchmark smoke run",
        needs_root: true,
        run: bench_smoke,
    },
];

/// Runs every tier and prints a summary.
pub fn run() -> anyhow::Result<()> {
    // The benchmark's tools too: its tests and smoke run are part of every test run.
    setup::ensure_bench()?;
    let root = privilege::is_root();
    let mut results: Vec<(&str, &str, Duration)> = Vec::new();
    let mut failed = false;
    let mut build_failed = false;
    let mut leftovers_removed = false;
    for tier in TIERS {
        if tier.needs_root && !root {
            if privilege::in_ci() {
                results.push((tier.name, "FAILED (CI must run it as root)", Duration::ZERO));
                failed = true;
            } else {
                println!(
                    "xtask: SKIP {}: needs root (run `sudo cargo xtask test`)",
                    tier.name
                );
                results.push((tier.name, "skipped: not root", Duration::ZERO));
            }
            continue;
        }
        if build_failed {
            results.push((tier.name, "skipped: build failed", Duration::ZERO));
            continue;
        }
        if tier.needs_root && !leftovers_removed {
            remove_test_leftovers();
            leftovers_removed = true;
        }
        println!("\nxtask: ==== {} ====", tier.name);
        let started = Instant::now();
        let outcome = (tier.run)();
        let elapsed = started.elapsed();
        match outcome {
            Ok(()) => results.push((tier.name, "ok", elapsed)),
            Err(error) => {
                eprintln!("xtask: {} failed: {error:#}", tier.name);
                results.push((tier.name, "FAILED", elapsed));
                failed = true;
                build_failed |= tier.name == "build";
            }
        }
    }
    println!("\nxtask: test summary");
    for (name, outcome, elapsed) in &results {
        println!(
            "  {name:<36} {outcome:<32} {:>7.1} s",
            elapsed.as_secs_f64()
        );
    }
    if failed {
        bail!("some tiers failed");
    }
    Ok(())
}
