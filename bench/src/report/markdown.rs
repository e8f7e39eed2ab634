//! `report.md`: a table per measurement, the ratios to each peer and to the floor, the targets
//! with where the run stands, the machine and the method.

use std::fmt::Write as _;

use crate::results::{Contender, EndToEnd, PacketCost, PacketRate, Results};

/// The targets, as ratios in the same run.
const TARGET_ESTABLISHED_VS_FLOOR: f64 = 2.5;
const TARGET_NEW_FLOW_VS_FLOOR: f64 = 4.0;
/// Per-packet cost may grow at most this much from the smallest to the largest scale.
const TARGET_FLAT_GROWTH: f64 = 0.10;
const TARGET_RATE_VS_DIRECT: f64 = 0.9;
const TARGET_LATENCY_VS_DIRECT: f64 = 1.1;
const TARGET_RATE_VS_IPTABLES_10K: f64 = 1.4;
const TARGET_RATE_VS_NFTABLES_10K: f64 = 1.1;
const TARGET_LATENCY_VS_IPTABLES_10K: f64 = 0.65;
const TARGET_RATE_VS_IPTABLES_30K: f64 = 2.5;
const TARGET_COLD_10K_MS: f64 = 1_000.0;
const TARGET_CHANGE_P99_MS: f64 = 10.0;
const TARGET_AGENT_RSS_10K_MIB: f64 = 64.0;
const TEN_THOUSAND: usize = 10_000;
const THIRTY_THOUSAND: usize = 30_000;

fn figure(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "–".to_owned()
    }
}

fn ratio(value: f64, base: f64) -> String {
    if value.is_finite() && base.is_finite() && base > 0.0 {
        format!("{:.2}x", value / base)
    } else {
        "–".to_owned()
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

fn packet_section(out: &mut String, rows: &[PacketCost]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Per-packet cost (BPF_PROG_TEST_RUN)\n\n\
         `lb_xdp` against the floor program (parse Ethernet, IPv4, TCP; `XDP_PASS`), same rounds. \
         `single`: one run per syscall, the floor's single-run cost subtracted and its repeated \
         cost added (the kernel reruns a repeated call on the same, already rewritten, buffer). \
         In situ: the kernel's own `run_time_ns / run_cnt` over the same runs (program only, no \
         test-run timer; single runs start with cold caches, which a NIC's busy poll loop would \
         not).\n"
    );
    let _ = writeln!(
        out,
        "| case | Services | tracked flows | lb ns/pkt | floor ns/pkt | ratio | in-situ lb ns | in-situ floor ns | method |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.case,
            row.services,
            row.tracked_flows,
            figure(row.ns_per_packet.median, 1),
            figure(row.floor_ns.median, 1),
            figure(row.ratio_to_floor.median, 2),
            figure(row.in_situ_ns.median, 1),
            figure(row.in_situ_floor_ns.median, 1),
            row.method
        );
    }
    out.push('\n');
}

fn e2e_row(rows: &[EndToEnd], contender: Contender, services: usize) -> Option<&EndToEnd> {
    rows.iter()
        .find(|row| row.contender == contender && row.services == services)
}

fn e2e_section(out: &mut String, rows: &[EndToEnd]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## End to end (network namespaces)\n\n\
         client -> node -> 3 backends, to the last-created Service's ClusterIP (direct: to one \
         backend's address). Connections: connect, one request line, the reply, close, from \
         concurrent clients for a bounded time. CPU: the whole machine's busy time per \
         connection (client, node and backends share the 2 cores). iperf3: one TCP stream to a \
         one-endpoint Service.\n"
    );
    let _ = writeln!(
        out,
        "| Services | contender | conn/s | vs direct | vs iptables | vs nftables | p50 µs | p99 µs | CPU µs/conn | iperf3 Gbit/s | failed | in-situ ns/pkt |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut sizes: Vec<usize> = rows.iter().map(|row| row.services).collect();
    sizes.dedup();
    for services in sizes {
        let base = |contender| {
            e2e_row(rows, contender, services)
                .map_or(f64::NAN, |row| row.connections_per_second.median)
        };
        for contender in Contender::ALL {
            let Some(row) = e2e_row(rows, contender, services) else {
                continue;
            };
            let rate = row.connections_per_second.median;
            let _ = writeln!(
                out,
                "| {services} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                contender.label(),
                figure(rate, 0),
                ratio(rate, base(Contender::Direct)),
                ratio(rate, base(Contender::Iptables)),
                ratio(rate, base(Contender::Nftables)),
                figure(row.latency_p50_us.median, 0),
                figure(row.latency_p99_us.median, 0),
                figure(row.cpu_us_per_connection.median, 0),
                figure(row.iperf_gbps.median, 2),
                row.failed_connections,
                row.in_situ_ns_per_packet
                    .as_ref()
                    .map_or("–".to_owned(), |sample| figure(sample.median, 0)),
            );
        }
    }
    out.push('\n');
}

fn rate_section(out: &mut String, rows: &[PacketRate]) {
    let Some(first) = rows.first() else {
        return;
    };
    let _ = writeln!(
        out,
        "## Packet rate (trafgen)\n\n\
         trafgen in the client namespace sends 60-byte UDP frames of {} flows round robin, as \
         fast as one CPU can, to a UDP Service's ClusterIP (direct: to one backend); the figure \
         is the frames per second the backends' interfaces received, after a warm-up that \
         tracks every flow. Each contender first passes a check: every flow twice at a gentle \
         rate, every frame delivered, every endpoint reached. The generator, the node and the \
         backends share the 2 cores, so these are relative figures, not a NIC's rate: a \
         contender that costs more CPU per packet leaves the generator less.\n",
        first.flows
    );
    let _ = writeln!(
        out,
        "| Services | contender | forwarded kpps | sent kpps | delivered | vs iptables | vs nftables | vs direct |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut sizes: Vec<usize> = rows.iter().map(|row| row.services).collect();
    sizes.dedup();
    for services in sizes {
        let base = |contender| {
            rows.iter()
                .find(|row| row.contender == contender && row.services == services)
                .map_or(f64::NAN, |row| row.forwarded_pps.median)
        };
        for row in rows.iter().filter(|row| row.services == services) {
            let forwarded = row.forwarded_pps.median;
            let sent = row.sent_pps.median;
            let _ = writeln!(
                out,
                "| {services} | {} | {} | {} | {} | {} | {} | {} |",
                row.contender.label(),
                figure(forwarded / 1e3, 0),
                figure(sent / 1e3, 0),
                if sent > 0.0 {
                    format!("{:.0}%", 100.0 * forwarded / sent)
                } else {
                    "–".to_owned()
                },
                ratio(forwarded, base(Contender::Iptables)),
                ratio(forwarded, base(Contender::Nftables)),
                ratio(forwarded, base(Contender::Direct)),
            );
        }
    }
    out.push('\n');
}

fn programming_section(out: &mut String, results: &Results) {
    if results.programming.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Loading the Services, changing one endpoint\n\n\
         Loads are cold (whatever an earlier load left is removed first, untimed), repeated \
         and interleaved between contenders; the figure is their median (`loads` says how \
         many; nftables mode is loaded once above 10,000 Services, where one load takes \
         minutes). lb: `lb agent` start to ready (reading the YAML included; polled every \
         50 ms); a change is a manifest file rewritten until the map serves the new endpoint \
         (the agent waits 100 ms for editors to settle, then re-reads the directory). iptables: \
         `iptables-legacy-restore` of the whole rule set; a change is kube-proxy's partial sync \
         (`--noflush`, KUBE-SERVICES rewritten in full). nftables: `nft -f`, at most 1,000 \
         Services per transaction; a change is one transaction.\n"
    );
    let _ = writeln!(
        out,
        "| Services | contender | load ms | loads | one endpoint change ms |\n|---:|---|---:|---:|---:|"
    );
    for row in &results.programming {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.services,
            row.contender.label(),
            figure(row.load_ms.median, 1),
            row.load_ms.rounds.len(),
            figure(row.change_ms.median, 1)
        );
    }
    out.push('\n');
}

fn control_section(out: &mut String, results: &Results) {
    if !results.control_plane.is_empty() {
        let _ = writeln!(
            out,
            "## Control plane\n\nIn process, real pinned maps: Services and EndpointSlices -> \
             the agent's desired-state function -> the reconciler's map writes. A change \
             replaces one EndpointSlice (one endpoint swapped) and runs the same path (today the \
             whole desired state is recomputed and diffed per change).\n\n\
             | Services | endpoints each | cold programming ms | change p50 ms | change p99 ms |\n\
             |---:|---:|---:|---:|---:|"
        );
        for row in &results.control_plane {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                row.services,
                row.endpoints_per_service,
                figure(row.cold_program_ms.median, 1),
                figure(row.change_p50_ms.median, 2),
                figure(row.change_p99_ms.median, 2)
            );
        }
        out.push('\n');
    }
    if !results.memory.is_empty() {
        let _ = writeln!(
            out,
            "## Memory\n\n`lb agent` running with the end-to-end Services: its resident set, \
             and the kernel memory of the pinned maps (`bpftool map show` memlock; conntrack is \
             preallocated).\n\n\
             | Services | agent RSS MiB | maps MiB | largest maps |\n|---:|---:|---:|---|"
        );
        for row in &results.memory {
            let mut maps = row.maps.clone();
            maps.sort_by(|a, b| b.1.total_cmp(&a.1));
            let largest: Vec<String> = maps
                .iter()
                .take(3)
                .map(|(name, mib)| format!("{name} {mib:.1}"))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                row.services,
                figure(row.agent_rss_mib, 1),
                figure(row.map_memlock_mib, 1),
                largest.join(", ")
            );
        }
        out.push('\n');
    }
}

/// The worst ratio of `case` to the floor over every scale.
fn worst_packet_ratio(rows: &[PacketCost], case: &str) -> Option<f64> {
    rows.iter()
        .filter(|row| row.case == case)
        .map(|row| row.ratio_to_floor.median)
        .filter(|value| value.is_finite())
        .reduce(f64::max)
}

/// How much `case`'s cost grows from its cheapest to its dearest scale.
fn packet_growth(rows: &[PacketCost], case: &str) -> Option<f64> {
    let costs: Vec<f64> = rows
        .iter()
        .filter(|row| row.case == case)
        .map(|row| row.ns_per_packet.median)
        .filter(|value| value.is_finite())
        .collect();
    let min = costs.iter().copied().reduce(f64::min)?;
    let max = costs.iter().copied().reduce(f64::max)?;
    Some(max / min - 1.0)
}

fn targets_section(out: &mut String, results: &Results) {
    let packet = &results.packet;
    let e2e = &results.end_to_end;
    let mut lines: Vec<(String, String, Option<bool>)> = Vec::new();
    let established = worst_packet_ratio(packet, "tcp_established");
    lines.push((
        format!("established flow ≤ {TARGET_ESTABLISHED_VS_FLOOR}x floor"),
        established.map_or("–".to_owned(), |r| format!("{r:.2}x (worst scale)")),
        established.map(|r| r <= TARGET_ESTABLISHED_VS_FLOOR),
    ));
    let new = worst_packet_ratio(packet, "tcp_new");
    lines.push((
        format!("first packet of a flow ≤ {TARGET_NEW_FLOW_VS_FLOOR}x floor"),
        new.map_or("–".to_owned(), |r| format!("{r:.2}x (worst scale)")),
        new.map(|r| r <= TARGET_NEW_FLOW_VS_FLOOR),
    ));
    for case in ["tcp_established", "tcp_new"] {
        let growth = packet_growth(packet, case);
        lines.push((
            format!("{case} flat across Services and tracked flows (≤ 10% growth)"),
            growth.map_or("–".to_owned(), |g| format!("{:.1}%", g * 100.0)),
            growth.map(|g| g <= TARGET_FLAT_GROWTH),
        ));
    }
    let mut sizes: Vec<usize> = e2e.iter().map(|row| row.services).collect();
    sizes.dedup();
    for services in sizes {
        let get = |contender| e2e_row(e2e, contender, services);
        if let (Some(lb), Some(direct)) = (get(Contender::Lb), get(Contender::Direct)) {
            let rate = lb.connections_per_second.median / direct.connections_per_second.median;
            lines.push((
                format!("{services} Services: conn/s ≥ {TARGET_RATE_VS_DIRECT}x direct"),
                format!("{rate:.2}x"),
                Some(rate >= TARGET_RATE_VS_DIRECT),
            ));
            let latency = lb.latency_p50_us.median / direct.latency_p50_us.median;
            lines.push((
                format!("{services} Services: median latency ≤ {TARGET_LATENCY_VS_DIRECT}x direct"),
                format!("{latency:.2}x"),
                Some(latency <= TARGET_LATENCY_VS_DIRECT),
            ));
        }
        let lb = get(Contender::Lb);
        if services == TEN_THOUSAND {
            if let (Some(lb), Some(ipt)) = (lb, get(Contender::Iptables)) {
                let rate = lb.connections_per_second.median / ipt.connections_per_second.median;
                lines.push((
                    format!("10,000 Services: conn/s ≥ {TARGET_RATE_VS_IPTABLES_10K}x iptables"),
                    format!("{rate:.2}x"),
                    Some(rate >= TARGET_RATE_VS_IPTABLES_10K),
                ));
                let latency = lb.latency_p50_us.median / ipt.latency_p50_us.median;
                lines.push((
                    format!(
                        "10,000 Services: median latency ≤ {TARGET_LATENCY_VS_IPTABLES_10K}x iptables"
                    ),
                    format!("{latency:.2}x"),
                    Some(latency <= TARGET_LATENCY_VS_IPTABLES_10K),
                ));
            }
            if let (Some(lb), Some(nft)) = (lb, get(Contender::Nftables)) {
                let rate = lb.connections_per_second.median / nft.connections_per_second.median;
                lines.push((
                    format!("10,000 Services: conn/s ≥ {TARGET_RATE_VS_NFTABLES_10K}x nftables"),
                    format!("{rate:.2}x"),
                    Some(rate >= TARGET_RATE_VS_NFTABLES_10K),
                ));
            }
        }
        if services == THIRTY_THOUSAND
            && let (Some(lb), Some(ipt)) = (lb, get(Contender::Iptables))
        {
            let rate = lb.connections_per_second.median / ipt.connections_per_second.median;
            lines.push((
                format!("30,000 Services: conn/s ≥ {TARGET_RATE_VS_IPTABLES_30K}x iptables"),
                format!("{rate:.2}x"),
                Some(rate >= TARGET_RATE_VS_IPTABLES_30K),
            ));
        }
    }
    if let Some(row) = results
        .control_plane
        .iter()
        .find(|row| row.services == TEN_THOUSAND)
    {
        let cold = row.cold_program_ms.median;
        lines.push((
            format!(
                "10,000 Services x {} endpoints programmed < {TARGET_COLD_10K_MS} ms",
                row.endpoints_per_service
            ),
            format!("{cold:.0} ms"),
            Some(cold < TARGET_COLD_10K_MS),
        ));
    }
    if let Some(worst) = results
        .control_plane
        .iter()
        .map(|row| row.change_p99_ms.median)
        .reduce(f64::max)
    {
        lines.push((
            format!("one endpoint change p99 < {TARGET_CHANGE_P99_MS} ms (every size)"),
            format!("{worst:.2} ms (worst size)"),
            Some(worst < TARGET_CHANGE_P99_MS),
        ));
    }
    if let Some(row) = results
        .memory
        .iter()
        .find(|row| row.services == TEN_THOUSAND)
    {
        lines.push((
            format!("agent memory < {TARGET_AGENT_RSS_10K_MIB} MiB at 10,000 Services"),
            format!("{:.1} MiB", row.agent_rss_mib),
            Some(row.agent_rss_mib < TARGET_AGENT_RSS_10K_MIB),
        ));
    }
    let _ = writeln!(out, "## Targets\n\n| target | measured | |\n|---|---:|---|");
    for (target, measured, met) in lines {
        let _ = writeln!(out, "| {target} | {measured} | {} |", verdict(met));
    }
    out.push('\n');
}

/// The whole report.
pub fn render(results: &Results) -> String {
    let mut out = String::new();
    let machine = &results.machine;
    let _ = writeln!(
        out,
        "# lb benchmark report\n\n\
         Run {} ({}, {} rounds per figure, medians). Machine: {}, {} cores, {:.0} GiB, Linux {}.\n\
         Client, node, backends and load generator share the machine's cores: figures are \
         relative, compare them within this run.\n",
        results.started,
        if results.quick {
            "quick set"
        } else {
            "full set"
        },
        results.rounds,
        machine.cpu,
        machine.cores,
        machine.memory_gib,
        machine.kernel,
    );
    targets_section(&mut out, results);
    packet_section(&mut out, &results.packet);
    e2e_section(&mut out, &results.end_to_end);
    rate_section(&mut out, &results.packet_rate);
    programming_section(&mut out, results);
    control_section(&mut out, results);
    if !results.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for note in &results.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Sample;

    fn rate(contender: Contender, forwarded: f64) -> PacketRate {
        PacketRate {
            contender,
            services: 1,
            flows: 1_024,
            sent_pps: Sample::from_rounds(vec![forwarded]),
            forwarded_pps: Sample::from_rounds(vec![forwarded]),
        }
    }

    #[test]
    fn the_packet_rate_table_has_ratios_and_its_prose_stays_one_paragraph() {
        let results = Results {
            packet_rate: vec![
                rate(Contender::Lb, 600_000.0),
                rate(Contender::Iptables, 400_000.0),
                rate(Contender::Nftables, 500_000.0),
                rate(Contender::Direct, 800_000.0),
            ],
            ..Results::default()
        };
        let report = render(&results);
        assert!(
            report.contains("| 1 | lb (XDP) | 600 | 600 | 100% | 1.50x | 1.20x | 0.75x |"),
            "{report}"
        );
        assert!(report.contains("of 1024 flows"), "{report}");
        // A string continuation gone wrong leaves runs of indentation inside the prose.
        assert!(report.lines().all(|line| !line.contains("   ")), "{report}");
    }
}
