//! `lb-bench`, run by `cargo xtask bench`: per-packet cost against a floor program, end to end
//! against kube-proxy's iptables and nftables layouts and no load balancer, control-plane speed,
//! memory and packet rate, interleaved in one run, written to a results directory.

mod bpfstats;
mod control;
mod e2e;
mod link;
mod memory;
mod packet;
mod rate;
mod report;
mod results;
mod rules;
mod workload;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

use crate::results::{Contender, Machine, Results};

/// Benchmarks of lb; see `cargo xtask bench --help`.
#[derive(Parser)]
struct Cli {
    /// A reduced set (fewer sizes and rounds), under 5 minutes.
    #[arg(long)]
    quick: bool,
    /// The smallest run that still takes every path and checks every verdict (one Service,
    /// one round): what `cargo xtask test` runs so the benchmark cannot rot. Its figures mean
    /// nothing.
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Where results.json, report.md and the plots go.
    #[arg(long)]
    out: PathBuf,
    /// Only these sections (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Per-packet cost with BPF_PROG_TEST_RUN.
    Packet,
    /// Connection rate, latency, iperf3 and packet rate through each contender in
    /// namespaces; rule-set load and change times; the agent's memory.
    E2e,
    /// Cold programming and single endpoint changes through the reconciler and real maps.
    Control,
}

/// Rounds of every measurement; the figures are their medians.
const ROUNDS: usize = 5;
/// Concurrent clients in the connection-rate runs: enough to keep two cores busy.
const E2E_CLIENTS: usize = 4;
/// The smoke run's sizes: enough runs and flows to take every path, no more.
const SMOKE_RUNS: u32 = 200;
const SMOKE_FLOWS: usize = 1_000;
const SMOKE_LOAD: Duration = Duration::from_millis(300);
const SMOKE_CONTROL_SERVICES: usize = 100;
const SMOKE_CHANGES: usize = 10;
/// nftables mode is loaded once above this many Services (one load of 30,000 takes about two
/// minutes here).
const NFT_REPEATED_LOADS_MAX_SERVICES: usize = 10_000;
/// Endpoints per Service in the control-plane section, as the scenario has it.
const CONTROL_ENDPOINTS: usize = 10;
/// Single endpoint changes per round: enough for a p99.
const CONTROL_CHANGES: usize = 200;

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or_default();
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        kernel,
        memory_gib,
    }
}

fn now_rfc3339() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output();
    output
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let wanted = |section: Section| cli.only.is_empty() || cli.only.contains(&section);
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let started = Instant::now();
    let progress = |message: &str| {
        eprintln!(
            "bench [{:>6.1} s] {message}",
            started.elapsed().as_secs_f64()
        );
    };
    let lb_bin = lb_tests::agent::lb_binary_from_env()?;
    // A killed run skips its clean-up; its namespaces, pins and files go now.
    for stale in lb_tests::leftovers::remove(lb_tests::leftovers::BENCH, Some(&lb_bin)) {
        progress(&format!(
            "removed a killed run's leftovers at {}",
            stale.display()
        ));
    }
    let prefix = lb_tests::netns::unique_prefix(lb_tests::leftovers::BENCH);
    let mut results = Results {
        started: now_rfc3339(),
        quick: cli.quick || cli.smoke,
        rounds: ROUNDS,
        machine: machine(),
        ..Results::default()
    };

    if wanted(Section::Packet) {
        let plan = if cli.smoke {
            packet::PacketPlan {
                services: vec![1],
                tracked_flows: vec![0, SMOKE_FLOWS],
                rounds: 1,
                single_runs: SMOKE_RUNS,
                repeat: SMOKE_RUNS,
                new_flows: SMOKE_RUNS,
            }
        } else if cli.quick {
            packet::PacketPlan {
                services: vec![1, 10_000],
                tracked_flows: vec![0, 100_000],
                rounds: ROUNDS,
                single_runs: 2_000,
                repeat: 100_000,
                new_flows: 1_000,
            }
        } else {
            packet::PacketPlan {
                services: vec![1, 1_000, 10_000, 100_000],
                tracked_flows: vec![0, 1_000_000],
                rounds: ROUNDS,
                single_runs: 20_000,
                repeat: 1_000_000,
                new_flows: 10_000,
            }
        };
        results.packet = packet::run(&plan, &prefix, &progress)?;
    }

    if wanted(Section::E2e) {
        let plan = if cli.smoke {
            e2e::E2ePlan {
                services: vec![1],
                contenders: Contender::ALL.to_vec(),
                rounds: 1,
                load_duration: SMOKE_LOAD,
                clients: E2E_CLIENTS,
                iperf_seconds: 1,
                changes: 1,
                rate_services: vec![1],
                rate_duration: SMOKE_LOAD,
                loads: 2,
                nft_repeated_loads_max_services: NFT_REPEATED_LOADS_MAX_SERVICES,
            }
        } else if cli.quick {
            e2e::E2ePlan {
                services: vec![1, 1_000],
                contenders: Contender::ALL.to_vec(),
                rounds: ROUNDS,
                load_duration: Duration::from_secs(1),
                clients: E2E_CLIENTS,
                iperf_seconds: 1,
                changes: ROUNDS,
                rate_services: vec![1, 1_000],
                rate_duration: Duration::from_secs(1),
                loads: ROUNDS,
                nft_repeated_loads_max_services: NFT_REPEATED_LOADS_MAX_SERVICES,
            }
        } else {
            e2e::E2ePlan {
                services: vec![1, 1_000, 10_000, 30_000],
                contenders: Contender::ALL.to_vec(),
                rounds: ROUNDS,
                load_duration: Duration::from_secs(3),
                clients: E2E_CLIENTS,
                iperf_seconds: 2,
                changes: ROUNDS,
                rate_services: vec![1, 10_000],
                rate_duration: Duration::from_secs(2),
                loads: ROUNDS,
                nft_repeated_loads_max_services: NFT_REPEATED_LOADS_MAX_SERVICES,
            }
        };
        let measured = e2e::run(&plan, &prefix, &lb_bin, &progress)?;
        results.end_to_end = measured.end_to_end;
        results.programming = measured.programming;
        results.memory = measured.memory;
        results.packet_rate = measured.packet_rate;
    }

    if wanted(Section::Control) {
        let plan = control::ControlPlan {
            services: if cli.smoke {
                vec![SMOKE_CONTROL_SERVICES]
            } else if cli.quick {
                vec![1_000, 10_000]
            } else {
                vec![1_000, 10_000, 30_000]
            },
            endpoints: CONTROL_ENDPOINTS,
            rounds: if cli.smoke { 1 } else { ROUNDS },
            changes: if cli.smoke {
                SMOKE_CHANGES
            } else {
                CONTROL_CHANGES
            },
        };
        results.control_plane = control::run(&plan, &prefix, &progress)?;
    }

    for row in &results.end_to_end {
        if row.failed_connections > 0 {
            results.notes.push(format!(
                "{} at {} Services: {} connections failed; its rate and latency count only the \
                 others",
                row.contender.label(),
                row.services,
                row.failed_connections
            ));
        }
        if !row.lb_drops.is_empty() {
            let drops: Vec<String> = row
                .lb_drops
                .iter()
                .map(|(name, count)| format!("{name} {count}"))
                .collect();
            results.notes.push(format!(
                "lb's drop counters at {} Services during the end-to-end rounds: {}",
                row.services,
                drops.join(", ")
            ));
        }
    }
    for file in report::write(&results, &cli.out)? {
        progress(&format!("wrote {}", file.display()));
    }
    for row in &results.packet {
        println!(
            "{:<16} {:>7} svc {:>8} flows  {:>7.1} ns  floor {:>5.1} ns  x{:.2}  in-situ {:>6.1} / floor {:>5.1}",
            row.case,
            row.services,
            row.tracked_flows,
            row.ns_per_packet.median,
            row.floor_ns.median,
            row.ratio_to_floor.median,
            row.in_situ_ns.median,
            row.in_situ_floor_ns.median
        );
    }
    for row in &results.end_to_end {
        println!(
            "{:<16} {:>7} svc  {:>8.0} conn/s  p50 {:>6.0} us  p99 {:>6.0} us  cpu {:>5.0} us/conn  {:>5.2} Gbit/s  failed {}  in-situ {:?}",
            row.contender.label(),
            row.services,
            row.connections_per_second.median,
            row.latency_p50_us.median,
            row.latency_p99_us.median,
            row.cpu_us_per_connection.median,
            row.iperf_gbps.median,
            row.failed_connections,
            row.in_situ_ns_per_packet.as_ref().map(|s| s.median)
        );
    }
    for row in &results.packet_rate {
        println!(
            "packet rate {:<16} {:>7} svc  forwarded {:>8.0} pps  sent {:>8.0} pps",
            row.contender.label(),
            row.services,
            row.forwarded_pps.median,
            row.sent_pps.median
        );
    }
    for row in &results.control_plane {
        println!(
            "control plane {:>6} svc x {}  cold {:>8.1} ms  change p50 {:>6.2} ms  p99 {:>6.2} ms",
            row.services,
            row.endpoints_per_service,
            row.cold_program_ms.median,
            row.change_p50_ms.median,
            row.change_p99_ms.median
        );
    }
    for row in &results.memory {
        println!(
            "memory {:>6} svc  agent RSS {:>6.1} MiB  maps {:>7.1} MiB",
            row.services, row.agent_rss_mib, row.map_memlock_mib
        );
    }
    for row in &results.programming {
        println!(
            "{:<16} {:>7} svc  load {:>9.1} ms  change {:>8.1} ms",
            row.contender.label(),
            row.services,
            row.load_ms.median,
            row.change_ms.median
        );
    }
    Ok(())
}
