//! Packet rate, what pktgen would show on a real node: trafgen (netsniff-ng's generator, from
//! Debian) in the client namespace sends minimum-size UDP datagrams of many flows to a Service
//! for a bounded time, and the figure is the datagrams per second the backends' interfaces
//! receive. The generator, the node's forwarding and the backends share the machine's cores, so
//! the figures compare contenders with each other; they are not a NIC's line rate.
//!
//! The frames are written out byte for byte (checksums included) into trafgen's configuration,
//! one per flow, and sent round robin: the generator spends nothing per frame on building it.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use etherparse::PacketBuilder;
use lb_tests::{
    netns::Netns,
    topology::{CLIENT_ADDR, NODE_CLIENT_INTERFACE, PEER_INTERFACE, SingleNode},
};

use crate::link;

/// Flows (client source ports) the generator cycles through: many flows, as a node's real
/// traffic has, yet few enough that every one is tracked in every contender's conntrack.
pub const FLOWS: u16 = 1_024;
/// The first client source port; the flows take the next [`FLOWS`] ports.
const FIRST_SOURCE_PORT: u16 = 20_000;
/// UDP payload that makes a 60-byte frame, Ethernet's minimum (64 bytes on a wire with the
/// FCS, the size packet-rate figures are usually quoted for).
const PAYLOAD: [u8; 18] = *b"lb-bench-pkt-rate!";
/// TTL of the generated datagrams.
const TTL: u8 = 64;
/// A run sends at most this many frames, whatever its time bound.
const MAX_FRAMES: u64 = 500_000_000;
/// Sending starts this long before the counters are read, so the figure is the steady state
/// (every flow already tracked, the generator's ring full).
const WARMUP: Duration = Duration::from_millis(300);
/// How long a stopped generator may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The check before any measurement: every flow twice, at a rate no contender drops.
const CHECK_FRAMES: u64 = 2 * FLOWS as u64;
const CHECK_RATE: &str = "20000pps";
/// How long the check may take, and how long frames in flight get to arrive after it.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const CHECK_SETTLE: Duration = Duration::from_millis(300);
/// Frames a backend may receive besides the generator's (ARP and the like) during a check.
const CHECK_SLACK: u64 = 16;

/// What one timed run saw, frames per second.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// What left the client's interface.
    pub offered_pps: f64,
    /// What the backends' interfaces received.
    pub forwarded_pps: f64,
}

/// A generator set up for one contender's topology: its configuration is written, the backends
/// have a socket on the target port (so a delivered datagram is queued and dropped cheaply
/// instead of answered with an ICMP error).
pub struct Generator {
    config: PathBuf,
    _sinks: Vec<UdpSocket>,
}

/// A running trafgen, killed on drop. trafgen forks one sender per CPU it is given, so it runs
/// in a process group of its own and signals go to the whole group, as a terminal's Ctrl-C
/// would.
struct Running(Child);

impl Running {
    /// Signals trafgen's process group.
    fn signal(&self, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: the group of our own child, which has not been reaped yet.
            unsafe { libc::kill(-pid, signal) };
        }
    }

    /// Stops the generator with SIGINT (trafgen's clean exit), killing it if it lingers.
    fn stop(mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.0.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("trafgen did not stop within {STOP_TIMEOUT:?}")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The senders may outlive their parent: kill the group whatever the parent's state.
        self.signal(libc::SIGKILL);
        let _ = self.0.wait();
    }
}

/// One frame per flow, from the client to `target`, as bytes.
fn frames(
    client_mac: [u8; 6],
    node_mac: [u8; 6],
    target: SocketAddrV4,
) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..FLOWS)
        .map(|flow| {
            let builder = PacketBuilder::ethernet2(client_mac, node_mac)
                .ipv4(CLIENT_ADDR.octets(), target.ip().octets(), TTL)
                .udp(FIRST_SOURCE_PORT + flow, target.port());
            let mut frame = Vec::with_capacity(builder.size(PAYLOAD.len()));
            builder.write(&mut frame, &PAYLOAD)?;
            Ok(frame)
        })
        .collect()
}

/// trafgen's configuration language: one `{ bytes }` block per frame.
fn config_text(frames: &[Vec<u8>]) -> String {
    let mut text = String::from("# lb-bench packet rate: one frame per flow, sent round robin\n");
    for frame in frames {
        text.push_str("{ ");
        let bytes: Vec<String> = frame.iter().map(|byte| format!("0x{byte:02x}")).collect();
        let _ = write!(text, "{}", bytes.join(", "));
        text.push_str(" }\n");
    }
    text
}

/// The sum of the backends' received-frame counters.
fn backends_rx(topology: &SingleNode) -> anyhow::Result<Vec<u64>> {
    topology
        .backends
        .iter()
        .map(|backend| Ok(link::read(backend, PEER_INTERFACE)?.rx_packets))
        .collect()
}

impl Generator {
    /// Writes the configuration for traffic to `target` from `topology`'s client, and opens a
    /// socket on `sink_port` in every backend.
    pub fn new(
        topology: &SingleNode,
        target: SocketAddrV4,
        sink_port: u16,
        workdir: &Path,
    ) -> anyhow::Result<Self> {
        let client_mac = link::read(&topology.client, PEER_INTERFACE)?.mac;
        let node_mac = link::read(&topology.node, NODE_CLIENT_INTERFACE)?.mac;
        let config = workdir.join("trafgen.cfg");
        std::fs::write(&config, config_text(&frames(client_mac, node_mac, target)?))
            .with_context(|| format!("writing {}", config.display()))?;
        let sinks = topology
            .backends
            .iter()
            .map(|backend| {
                backend
                    .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, sink_port)))?
                    .context("binding a backend's UDP sink")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            _sinks: sinks,
        })
    }

    /// Starts trafgen in the client namespace on one CPU, leaving the machine's socket memory
    /// and interrupt affinities alone.
    fn start(&self, client: &Netns, extra: &[&str]) -> anyhow::Result<Running> {
        let mut command = client.command("trafgen")?;
        command
            .arg("--dev")
            .arg(PEER_INTERFACE)
            .arg("--conf")
            .arg(&self.config)
            .args([
                "--cpus",
                "1",
                "--no-sock-mem",
                "--notouch-irq",
                "--no-cpu-stats",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. A killed benchmark must not leave the generator
        // running: the kernel kills it when the thread that started it exits.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Running(client.spawn(&mut command)?))
    }

    /// Fails with trafgen's own words if it has exited.
    fn still_running(running: &mut Running) -> anyhow::Result<()> {
        if let Some(status) = running.0.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = running.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            bail!("trafgen exited early ({status}): {}", stderr.trim());
        }
        Ok(())
    }

    /// Sends every flow twice at a gentle rate and checks that every frame reached a backend,
    /// and that `backends` of them received some: a contender that drops, misroutes or fails to
    /// spread the flows cannot pass as fast.
    pub fn check(&self, topology: &SingleNode, backends: usize) -> anyhow::Result<()> {
        let before = backends_rx(topology)?;
        let count = CHECK_FRAMES.to_string();
        let mut running = self.start(&topology.client, &["--num", &count, "--rate", CHECK_RATE])?;
        let started = Instant::now();
        loop {
            if let Some(status) = running.0.try_wait()? {
                ensure!(status.success(), "trafgen's check run failed: {status}");
                break;
            }
            ensure!(
                started.elapsed() < CHECK_TIMEOUT,
                "trafgen did not send {CHECK_FRAMES} frames within {CHECK_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(CHECK_SETTLE);
        let after = backends_rx(topology)?;
        let received: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let total: u64 = received.iter().sum();
        ensure!(
            (CHECK_FRAMES..=CHECK_FRAMES + CHECK_SLACK).contains(&total),
            "the backends received {total} frames of the {CHECK_FRAMES} sent ({received:?})"
        );
        // A backend counts as reached past the slack: the link also carries the odd frame of
        // its own (IPv6 neighbour discovery, ARP), which is no flow of the check's.
        let reached = received
            .iter()
            .filter(|count| **count > CHECK_SLACK)
            .count();
        ensure!(
            reached == backends,
            "{reached} backends received frames, {backends} should have ({received:?})"
        );
        Ok(())
    }

    /// Sends as fast as one CPU can for `duration` (after a warm-up) and reads the rates off the
    /// interfaces' counters.
    pub fn measure(&self, topology: &SingleNode, duration: Duration) -> anyhow::Result<Rate> {
        let count = MAX_FRAMES.to_string();
        let mut running = self.start(&topology.client, &["--num", &count])?;
        std::thread::sleep(WARMUP);
        Self::still_running(&mut running)?;
        let sent_before = link::read(&topology.client, PEER_INTERFACE)?.tx_packets;
        let received_before: u64 = backends_rx(topology)?.iter().sum();
        let started = Instant::now();
        std::thread::sleep(duration);
        let sent_after = link::read(&topology.client, PEER_INTERFACE)?.tx_packets;
        let received_after: u64 = backends_rx(topology)?.iter().sum();
        let elapsed = started.elapsed().as_secs_f64();
        Self::still_running(&mut running)?;
        running.stop()?;
        Ok(Rate {
            offered_pps: (sent_after - sent_before) as f64 / elapsed,
            forwarded_pps: (received_after - received_before) as f64 / elapsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_minimum_size_valid_udp_one_per_flow() {
        let target = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);
        let frames = frames([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], target).expect("frames");
        assert_eq!(frames.len(), usize::from(FLOWS));
        let mut ports = std::collections::BTreeSet::new();
        for frame in &frames {
            assert_eq!(frame.len(), 60);
            let headers = etherparse::SlicedPacket::from_ethernet(frame).expect("parses");
            let Some(etherparse::NetSlice::Ipv4(ip)) = headers.net else {
                panic!("not IPv4");
            };
            assert_eq!(ip.header().destination_addr(), *target.ip());
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            let Some(etherparse::TransportSlice::Udp(udp)) = headers.transport else {
                panic!("not UDP");
            };
            assert_eq!(udp.destination_port(), 80);
            let checksum = udp
                .to_header()
                .calc_checksum_ipv4_raw(
                    ip.header().source(),
                    ip.header().destination(),
                    udp.payload(),
                )
                .expect("checksum");
            assert_eq!(checksum, udp.checksum());
            ports.insert(udp.source_port());
        }
        assert_eq!(ports.len(), usize::from(FLOWS));
        let text = config_text(&frames);
        assert_eq!(text.matches('{').count(), usize::from(FLOWS));
        assert!(
            text.lines()
                .nth(1)
                .expect("a frame")
                .starts_with("{ 0x02, 0x00")
        );
    }
}
