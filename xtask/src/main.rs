//! `cargo xtask`: the project's entry points. Each installs what is missing first.
//!
//! - `cargo xtask demo`: build, then load-balance real traffic in network namespaces.
//! - `cargo xtask test`: every test tier; exits non-zero on any failure.
//! - `cargo xtask bench [--quick]`: lb against the floor, kube-proxy's layouts and no load
//!   balancer; writes a report with plots.
//! - `cargo xtask setup`: only install what is missing.

mod bench;
mod demo;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb's set-up, demo and test runner")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, the nightly rust-src component, bpf-linker).
    Setup,
    /// Build lb and show it balancing a ClusterIP across three backends in network namespaces.
    Demo,
    /// Run every test tier: lints, host tests, BPF_PROG_TEST_RUN fixtures, network-namespace
    /// end-to-end tests, and the demo.
    Test,
    /// Benchmarks: per-packet cost against a floor program, end to end against kube-proxy's
    /// iptables and nftables layouts and no load balancer. Reports to target/bench/.
    Bench {
        /// A reduced set, under 5 minutes (the full set stays under 30).
        #[arg(long)]
        quick: bool,
        /// Only these sections, comma separated (packet, e2e, control).
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::ensure(),
        Task::Demo => demo::run(),
        Task::Test => test::run(),
        Task::Bench { quick, only } => bench::run(&bench::BenchOptions { quick, only }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command to completion, echoing it, and fails unless it succeeds.
pub fn run_command(command: &mut Command) -> anyhow::Result<()> {
    println!("xtask: $ {}", display(command));
    let status = command
        .status()
        .with_context(|| format!("starting {}", display(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(command));
    }
    Ok(())
}

/// A command as a shell-like line, for messages.
pub fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo` as invoked by the user (respects `$CARGO`).
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}
