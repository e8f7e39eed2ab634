//! What a run measured, as written to `results.json` and read by the report and the plots.
//! Every figure keeps its samples (one per round) next to their median.

use serde::Serialize;

/// A figure measured once per round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// The median of `rounds`.
    pub median: f64,
    /// One value per round, in the order measured.
    pub rounds: Vec<f64>,
}

impl Sample {
    pub fn from_rounds(rounds: Vec<f64>) -> Self {
        Self {
            median: median(&rounds),
            rounds,
        }
    }
}

/// The median (mean of the middle two for an even count); NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// The `q`-quantile (0..=1) of `values`, nearest rank; NaN for no values.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// The machine the run happened on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

/// One case of the per-packet benchmark at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct PacketCost {
    /// `no_service`, `tcp_new`, `tcp_established`, `tcp_reply`, `udp_established`, and
    /// `tcp_established_hot`, `tcp_reply_hot` (the same paths repeated on one buffer through a
    /// Service whose endpoint is itself, so caches are warm as in a NIC's poll loop).
    pub case: String,
    pub services: usize,
    /// Flows in the conntrack map before the case ran.
    pub tracked_flows: usize,
    /// `lb_xdp`'s cost, ns per packet.
    pub ns_per_packet: Sample,
    /// The floor program's cost in the same rounds, ns per packet.
    pub floor_ns: Sample,
    /// `ns_per_packet / floor_ns`, per round.
    pub ratio_to_floor: Sample,
    /// The kernel's own accounting of the same runs (`run_time_ns / run_cnt` with
    /// `BPF_ENABLE_STATS`): the program alone, without the test-run timer, for `lb_xdp` and the
    /// floor.
    pub in_situ_ns: Sample,
    pub in_situ_floor_ns: Sample,
    /// How it was measured: `repeat` (one syscall, many runs on one buffer) or `single`
    /// (one run per syscall, the floor's single-run cost subtracted and its repeat cost added).
    pub method: String,
}

/// Who moves the packets in an end-to-end run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Contender {
    /// Our XDP program, maps filled by `lb agent`.
    Lb,
    /// kube-proxy's iptables-mode layout, loaded with iptables-restore (legacy).
    Iptables,
    /// kube-proxy's nftables-mode layout, loaded with nft.
    Nftables,
    /// No load balancer: the client talks to a backend's address.
    Direct,
}

impl Contender {
    pub const ALL: [Self; 4] = [Self::Lb, Self::Iptables, Self::Nftables, Self::Direct];

    pub fn label(self) -> &'static str {
        match self {
            Self::Lb => "lb (XDP)",
            Self::Iptables => "iptables mode",
            Self::Nftables => "nftables mode",
            Self::Direct => "direct (no LB)",
        }
    }
}

/// One contender at one scale, end to end.
#[derive(Clone, Debug, Serialize)]
pub struct EndToEnd {
    pub contender: Contender,
    pub services: usize,
    /// New connections per second (connect, request, response, close).
    pub connections_per_second: Sample,
    /// Connection latency (connect to response), microseconds.
    pub latency_p50_us: Sample,
    pub latency_p99_us: Sample,
    /// Whole-machine CPU time per connection, microseconds: steadier than the rate when the
    /// two cores are saturated.
    pub cpu_us_per_connection: Sample,
    /// iperf3 throughput of one TCP stream, Gbit/s.
    pub iperf_gbps: Sample,
    /// `lb_xdp`'s in-situ cost from `kernel.bpf_stats_enabled` (run_time_ns / run_cnt); lb only.
    pub in_situ_ns_per_packet: Option<Sample>,
    /// Connections that failed (timed out or reset); the rate and latency count only the
    /// others, and the report names every contender with failures.
    pub failed_connections: u64,
    /// lb only: the datapath's drop counters that moved during the rounds, by name, so that
    /// a failure can be told apart from a drop.
    pub lb_drops: Vec<(String, u64)>,
}

/// Loading a rule set (or programming the maps) and changing one endpoint in it.
#[derive(Clone, Debug, Serialize)]
pub struct Programming {
    pub contender: Contender,
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Cold load of everything, milliseconds.
    pub load_ms: Sample,
    /// One endpoint of one Service replaced, milliseconds.
    pub change_ms: Sample,
}

/// The agent's control plane at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// From the objects in memory to every map entry written, milliseconds.
    pub cold_program_ms: Sample,
    /// One endpoint change, from the event to the map write: median and p99, milliseconds.
    pub change_p50_ms: Sample,
    pub change_p99_ms: Sample,
}

/// Memory at one scale, with `lb agent` running (the end-to-end section's lb).
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// The agent's resident set after programming, MiB.
    pub agent_rss_mib: f64,
    /// Sum of the pinned maps' `memlock` as `bpftool map show` reports it, MiB.
    pub map_memlock_mib: f64,
    /// Per map: name and memlock in MiB.
    pub maps: Vec<(String, f64)>,
}

/// Packet rate with a packet generator, one contender at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct PacketRate {
    pub contender: Contender,
    pub services: usize,
    /// Flows (client source ports) the generator cycles through.
    pub flows: usize,
    /// Frames per second the generator got out of the client's interface.
    pub sent_pps: Sample,
    /// Frames per second that reached the backends' interfaces.
    pub forwarded_pps: Sample,
}

/// Everything one `cargo xtask bench` run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    /// UTC, RFC 3339.
    pub started: String,
    pub quick: bool,
    pub rounds: usize,
    pub machine: Machine,
    pub packet: Vec<PacketCost>,
    pub end_to_end: Vec<EndToEnd>,
    pub programming: Vec<Programming>,
    pub control_plane: Vec<ControlPlane>,
    pub memory: Vec<Memory>,
    pub packet_rate: Vec<PacketRate>,
    /// Anything that did not go as planned (a contender skipped, a tool missing), said plainly.
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut values, 0.99), 99.0);
        assert_eq!(quantile(&mut values, 0.5), 50.0);
        assert_eq!(quantile(&mut values, 1.0), 100.0);
    }
}
