//! Per-packet cost of `lb_xdp` with `BPF_PROG_TEST_RUN`, against the floor program (`lb_floor`:
//! parse Ethernet, IPv4 and TCP, return `XDP_PASS`) measured in the same rounds.
//!
//! The kernel runs every repetition of one `BPF_PROG_TEST_RUN` call on the same buffer, so a
//! program that rewrites the packet sees its own output from the second repetition on. Cases
//! whose packet is rewritten therefore run once per syscall: their cost is the floor's repeated
//! cost plus the difference between the two programs' single-run costs, which cancels the
//! per-call timer and setup the kernel includes in a single run's duration. The untouched case
//! (no Service) runs repeated, like the floor. Every run's verdict and output are checked, and
//! the counters must move by exactly the number of runs, so a wrong path cannot pass as fast.
//!
//! The program runs in a namespace of its own (veths whose both ends live in it, static
//! neighbours, forwarding on), so that its FIB lookups find the backends and it redirects, as on
//! a node.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use aya::{EbpfLoader, programs::Xdp};
use etherparse::PacketBuilder;
use lb::{
    dataplane::{
        self, Dataplane, FLOOR_OBJECT, FLOOR_PROGRAM_NAME, TestRun,
        maps::{
            Capacities, ServiceMaps, open_conntrack, open_ifaces, open_tx_ports, read_counters,
        },
    },
    desired::desired_state,
    node::NodeConfig,
    reconcile::Reconciler,
};
use lb_common::{
    conntrack::{DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey, FlowState},
    iface::IfaceConfig,
    stats::Counter,
};
use lb_tests::netns::{Netns, veth};

use crate::{
    bpfstats::{self, RunTimeStats},
    results::{PacketCost, Sample},
    workload::{self, SyntheticService, TARGET_PORT, Traffic},
};

// XDP actions (linux/bpf.h `enum xdp_action`).
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// Endpoints per Service, as the scenario has it.
const ENDPOINTS: usize = 3;
/// The UDP port added to the traffic Service, and its target.
const UDP_PORT: u16 = 53;
const UDP_TARGET_PORT: u16 = 5353;

// The namespace: the node's client-side and backend-side links, both ends inside it.
const IN_IF: &str = "in0";
const IN_PEER: &str = "in0p";
const IN_CIDR: &str = "10.0.0.1/24";
const OUT_IF: &str = "out0";
const OUT_PEER: &str = "out0p";
/// Covers the topology's backends (10.1.N.2).
const OUT_CIDR: &str = "10.1.0.1/16";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Backend `i`'s MAC is this with `i + 1` as the last byte.
const BACKEND_MAC_PREFIX: [u8; 5] = [0x02, 0, 0, 0, 0x10];
/// A Service whose only endpoint is its own address and port: translating its packets changes
/// nothing but the MACs and the TTL, so the kernel's repeated runs on one buffer take the same
/// path every time and measure the established-flow path with warm caches.
const IDENTITY: Ipv4Addr = Ipv4Addr::new(10, 1, 200, 1);
const IDENTITY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
/// Runs per call on the identity Service: every run decrements the TTL, and from
/// [`HOT_TTL`] it stays forwardable for this many runs.
const HOT_REPEAT: u32 = 200;
const HOT_TTL: u8 = 255;
/// Calls of [`HOT_REPEAT`] runs per round. Few: every repeated call makes the kernel swap the
/// XDP dispatcher's program twice, each time waiting for an RCU grace period (tens of ms).
const HOT_CALLS: u32 = 10;
/// A destination no Service has.
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const TTL: u8 = 64;
const WINDOW: u16 = 64_240;
const CLIENT_PORT: u16 = 40_000;
/// New flows take their source ports from here up, their source addresses from
/// [`NEW_FLOW_SOURCES`] (so a run never repeats a tuple).
const NEW_FLOW_FIRST_PORT: u16 = 1_024;
const NEW_FLOW_SOURCES: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
/// Pre-filled flows come from 192.168.0.0/16 (and any port), towards the traffic Service.
const FILL_SOURCES: u32 = u32::from_be_bytes([192, 168, 0, 0]);
const FILL_PORTS: u32 = 60_000;
const FILL_FIRST_PORT: u32 = 1_024;
/// Conntrack room beyond the pre-filled flows, for the flows the cases create.
const CONNTRACK_HEADROOM_FLOWS: u32 = 250_000;
/// Payload of the data packets: a small request.
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const BPFFS: &str = "/sys/fs/bpf";

/// How much to measure.
#[derive(Clone, Debug)]
pub struct PacketPlan {
    pub services: Vec<usize>,
    pub tracked_flows: Vec<usize>,
    pub rounds: usize,
    /// Syscalls per case and round for the single-run cases.
    pub single_runs: u32,
    /// Runs in one syscall for the repeated cases.
    pub repeat: u32,
    /// New flows per round (each creates two conntrack entries).
    pub new_flows: u32,
}

/// A case of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    NoService,
    TcpNew,
    TcpEstablished,
    TcpReply,
    UdpEstablished,
    /// `TcpEstablished` and `TcpReply` on the identity Service, repeated on one buffer.
    TcpEstablishedHot,
    TcpReplyHot,
}

impl Case {
    const ALL: [Self; 7] = [
        Self::NoService,
        Self::TcpNew,
        Self::TcpEstablished,
        Self::TcpReply,
        Self::UdpEstablished,
        Self::TcpEstablishedHot,
        Self::TcpReplyHot,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::NoService => "no_service",
            Self::TcpNew => "tcp_new",
            Self::TcpEstablished => "tcp_established",
            Self::TcpReply => "tcp_reply",
            Self::UdpEstablished => "udp_established",
            Self::TcpEstablishedHot => "tcp_established_hot",
            Self::TcpReplyHot => "tcp_reply_hot",
        }
    }

    /// The counters one run of the case must bump, each by one.
    fn counters(self) -> &'static [Counter] {
        match self {
            Self::NoService => &[Counter::PassNoService],
            Self::TcpNew => &[Counter::RedirectService, Counter::FlowCreated],
            Self::TcpEstablished | Self::UdpEstablished | Self::TcpEstablishedHot => {
                &[Counter::RedirectService]
            }
            Self::TcpReply | Self::TcpReplyHot => &[Counter::RedirectReply],
        }
    }
}

/// An interface of the namespace.
#[derive(Clone, Copy, Debug)]
struct Iface {
    index: u32,
    mac: [u8; 6],
}

fn interface(netns: &Netns, name: &str) -> anyhow::Result<Iface> {
    let link = crate::link::read(netns, name)?;
    Ok(Iface {
        index: link.index,
        mac: link.mac,
    })
}

fn backend_mac(index: usize) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac[..5].copy_from_slice(&BACKEND_MAC_PREFIX);
    mac[5] = u8::try_from(index + 1).expect("few backends");
    mac
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// Builds the namespace's links, addresses and static neighbours.
fn build_namespace(netns: &Netns, backends: &[Ipv4Addr]) -> anyhow::Result<()> {
    for (name, peer, cidr) in [(IN_IF, IN_PEER, IN_CIDR), (OUT_IF, OUT_PEER, OUT_CIDR)] {
        veth(netns, name, netns, peer)?;
        netns.ip(&["addr", "add", cidr, "dev", name])?;
    }
    netns.sysctl("ipv4.ip_forward", "1")?;
    netns.sysctl("ipv4.conf.all.forwarding", "1")?;
    let neighbours = [
        (CLIENT, CLIENT_MAC, IN_IF),
        (IDENTITY, IDENTITY_MAC, OUT_IF),
    ]
    .into_iter()
    .chain(
        backends
            .iter()
            .enumerate()
            .map(|(index, addr)| (*addr, backend_mac(index), OUT_IF)),
    );
    for (addr, mac, dev) in neighbours {
        netns.ip(&[
            "neigh",
            "add",
            &addr.to_string(),
            "lladdr",
            &mac_text(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// Removes the pin directory on drop, after the map handles that point into it.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = dataplane::reset(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The loaded programs and maps for one scale.
struct Lab {
    dataplane: Dataplane,
    floor: lb_floor::Floor,
    pin_dir: PathBuf,
    in0: Iface,
    out0: Iface,
    traffic: SyntheticService,
    /// The next new flow's index.
    next_new_flow: u32,
    _pins: PinGuard,
}

/// The floor program, loaded on its own (no maps).
mod lb_floor {
    use super::*;

    pub struct Floor {
        ebpf: aya::Ebpf,
    }

    impl Floor {
        pub fn load() -> anyhow::Result<Self> {
            let mut ebpf = EbpfLoader::new()
                .load(FLOOR_OBJECT)
                .context("loading the floor object")?;
            let program: &mut Xdp = ebpf
                .program_mut(FLOOR_PROGRAM_NAME)
                .context("the floor object has no program")?
                .try_into()?;
            program.load().context("loading the floor program")?;
            Ok(Self { ebpf })
        }

        pub fn id(&self) -> anyhow::Result<u32> {
            let program: &Xdp = self
                .ebpf
                .program(FLOOR_PROGRAM_NAME)
                .context("the floor program vanished")?
                .try_into()?;
            Ok(program.info()?.id())
        }

        pub fn run(&self, packet: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<TestRun> {
            let program: &Xdp = self
                .ebpf
                .program(FLOOR_PROGRAM_NAME)
                .context("the floor program vanished")?
                .try_into()?;
            let run = dataplane::test_run_xdp(program, packet, ingress, repeat)?;
            ensure!(
                run.action == XDP_PASS && run.packet == packet,
                "the floor program must pass the packet untouched"
            );
            Ok(run)
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or_default() * 1_000_000_000
        + u64::try_from(now.tv_nsec).unwrap_or_default()
}

fn wire(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn tcp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, src_port): (Ipv4Addr, u16),
    (dst, dst_port): (Ipv4Addr, u16),
    syn: bool,
) -> anyhow::Result<Vec<u8>> {
    tcp_frame_ttl(
        (src_mac, dst_mac),
        (src, src_port),
        (dst, dst_port),
        syn,
        TTL,
    )
}

fn tcp_frame_ttl(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, src_port): (Ipv4Addr, u16),
    (dst, dst_port): (Ipv4Addr, u16),
    syn: bool,
    ttl: u8,
) -> anyhow::Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), ttl)
        .tcp(src_port, dst_port, 1, WINDOW);
    let (builder, payload) = if syn {
        (builder.syn(), &[][..])
    } else {
        (builder.ack(1), PAYLOAD)
    };
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload)?;
    Ok(frame)
}

fn udp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, src_port): (Ipv4Addr, u16),
    (dst, dst_port): (Ipv4Addr, u16),
) -> anyhow::Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), TTL)
        .udp(src_port, dst_port);
    let mut frame = Vec::with_capacity(builder.size(PAYLOAD.len()));
    builder.write(&mut frame, PAYLOAD)?;
    Ok(frame)
}

// Offsets in an untagged Ethernet + 20-byte IPv4 frame.
const ETH_DST: std::ops::Range<usize> = 0..6;
const ETH_SRC: std::ops::Range<usize> = 6..12;
const IP_START: usize = 14;
const IP_HLEN: usize = 20;
const IP_SRC: std::ops::Range<usize> = 26..30;
const IP_DST: std::ops::Range<usize> = 30..34;
const L4_SRC_PORT: std::ops::Range<usize> = 34..36;
const L4_DST_PORT: std::ops::Range<usize> = 36..38;

/// The RFC 1071 sum of the IPv4 header must fold to 0xffff: the program kept it right.
fn ipv4_header_ok(frame: &[u8]) -> bool {
    let header = &frame[IP_START..IP_START + IP_HLEN];
    let mut sum: u32 = header
        .chunks_exact(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Whether the frame's TCP or UDP checksum is right for its (translated) addresses, recomputed
/// from scratch by etherparse.
fn l4_checksum_ok(frame: &[u8]) -> anyhow::Result<bool> {
    let headers = etherparse::PacketHeaders::from_ethernet_slice(frame)?;
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = &headers.net else {
        bail!("not IPv4");
    };
    let payload = headers.payload.slice();
    Ok(match &headers.transport {
        Some(etherparse::TransportHeader::Tcp(tcp)) => {
            tcp.calc_checksum_ipv4(ip, payload)? == tcp.checksum
        }
        Some(etherparse::TransportHeader::Udp(udp)) => {
            udp.calc_checksum_ipv4(ip, payload)? == udp.checksum
        }
        _ => bail!("neither TCP nor UDP"),
    })
}

fn addr_at(frame: &[u8], range: std::ops::Range<usize>) -> Ipv4Addr {
    Ipv4Addr::new(
        frame[range.start],
        frame[range.start + 1],
        frame[range.start + 2],
        frame[range.start + 3],
    )
}

fn port_at(frame: &[u8], range: std::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([frame[range.start], frame[range.start + 1]])
}

impl Lab {
    fn new(netns: &Netns, pin_dir: PathBuf, services: usize, flows: usize) -> anyhow::Result<Self> {
        let pins = PinGuard(pin_dir.clone());
        let flows_u32 = u32::try_from(flows)?;
        let capacities = Capacities::for_flows(
            (flows_u32 + CONNTRACK_HEADROOM_FLOWS).max(Capacities::default().conntrack_entries / 2),
        )?;
        let dataplane = Dataplane::load(&pin_dir, &capacities)?;
        let floor = lb_floor::Floor::load()?;

        let mut synthetic = workload::services(services, ENDPOINTS, Traffic::Http);
        let traffic = synthetic.last().context("at least one Service")?.clone();
        let mut service_objects: Vec<_> = synthetic.iter().map(SyntheticService::service).collect();
        let mut slices: Vec<_> = synthetic.iter().map(SyntheticService::slice).collect();
        // The traffic Service also serves UDP (as kube-dns does on 53).
        let mut udp = traffic.clone();
        udp.name.push_str("-udp");
        udp.port = UDP_PORT;
        udp.target_port = UDP_TARGET_PORT;
        udp.protocol = workload::Protocol::Udp;
        service_objects.push(udp.service());
        slices.push(udp.slice());
        let identity = SyntheticService {
            index: usize::MAX,
            namespace: workload::NAMESPACE.to_owned(),
            name: "identity".to_owned(),
            port_name: "http".to_owned(),
            cluster_ip: IDENTITY,
            port: traffic.port,
            protocol: workload::Protocol::Tcp,
            endpoints: vec![IDENTITY],
            target_port: traffic.port,
        };
        service_objects.push(identity.service());
        slices.push(identity.slice());
        synthetic.clear();
        let (desired, notes) = desired_state(&service_objects, &slices, &NodeConfig::default());
        ensure!(notes.is_empty(), "unexpected notes: {notes:?}");
        let mut maps = ServiceMaps::open(&pin_dir)?;
        let (mut reconciler, _) = Reconciler::from_store(&mut maps)?;
        let summary = reconciler.reconcile(&desired, &mut maps);
        ensure!(
            summary.errors.is_empty(),
            "programming: {:?}",
            summary.errors
        );

        let in0 = interface(netns, IN_IF)?;
        let out0 = interface(netns, OUT_IF)?;
        let mut tx_ports = open_tx_ports(&pin_dir)?;
        let mut ifaces = open_ifaces(&pin_dir)?;
        for iface in [in0, out0] {
            tx_ports.insert(iface.index, iface.index, None, 0)?;
            // As on a NIC: frames arrive with complete checksums.
            ifaces.insert(iface.index, IfaceConfig { flags: 0 }, 0)?;
        }
        let lab = Self {
            dataplane,
            floor,
            pin_dir,
            in0,
            out0,
            traffic,
            next_new_flow: 0,
            _pins: pins,
        };
        lab.fill_conntrack(flows_u32)?;
        Ok(lab)
    }

    /// Writes `flows` live flows (both entries) to the traffic Service.
    fn fill_conntrack(&self, flows: u32) -> anyhow::Result<()> {
        if flows == 0 {
            return Ok(());
        }
        let mut conntrack = open_conntrack(&self.pin_dir)?;
        let now = monotonic_ns();
        let vip = wire(self.traffic.cluster_ip);
        let vip_port = self.traffic.port.to_be();
        for flow in 0..flows {
            let client = wire(Ipv4Addr::from(FILL_SOURCES + flow / FILL_PORTS));
            let client_port = u16::try_from(FILL_FIRST_PORT + flow % FILL_PORTS)?.to_be();
            let backend = self.traffic.endpoints[flow as usize % self.traffic.endpoints.len()];
            let backend_port = TARGET_PORT.to_be();
            let state = FlowState {
                nat_addr: wire(backend),
                nat_port: backend_port,
                created_ns: now,
                last_seen_ns: now,
                ..FlowState::default()
            };
            conntrack.insert(
                FlowKey::new(
                    (client, client_port),
                    (vip, vip_port),
                    6,
                    DIRECTION_ORIGINAL,
                ),
                state,
                0,
            )?;
            conntrack.insert(
                FlowKey::new(
                    (wire(backend), backend_port),
                    (client, client_port),
                    6,
                    DIRECTION_REPLY,
                ),
                FlowState {
                    nat_addr: vip,
                    nat_port: vip_port,
                    ..state
                },
                0,
            )?;
        }
        let held = conntrack.keys().count();
        ensure!(
            held >= flows as usize * 2,
            "conntrack holds {held} entries after writing {} (evicted?)",
            flows * 2
        );
        Ok(())
    }
}

/// What one run of a case must produce.
struct Expected {
    action: u32,
    /// The destination MAC the program must have written (the next hop's).
    eth_dst: [u8; 6],
    /// The source after translation, if the case rewrites it.
    src: Option<(Ipv4Addr, u16)>,
    /// The destinations the packet may be rewritten to (one of the Service's endpoints), if the
    /// case rewrites the destination.
    dst_in: Option<Vec<(Ipv4Addr, u16)>>,
}

impl Lab {
    fn tcp_endpoints(&self) -> Vec<(Ipv4Addr, u16)> {
        self.traffic
            .endpoints
            .iter()
            .map(|addr| (*addr, TARGET_PORT))
            .collect()
    }

    fn client_frame_to(&self, dst: (Ipv4Addr, u16), syn: bool) -> anyhow::Result<Vec<u8>> {
        tcp_frame((CLIENT_MAC, self.in0.mac), (CLIENT, CLIENT_PORT), dst, syn)
    }

    fn backend_index(&self, addr: Ipv4Addr) -> anyhow::Result<usize> {
        self.traffic
            .endpoints
            .iter()
            .position(|endpoint| *endpoint == addr)
            .with_context(|| format!("{addr} is not an endpoint of the traffic Service"))
    }

    /// Opens the flows the established and reply cases use, and returns the case's packet,
    /// ingress and expected result. For `TcpNew` the packet is a template: each run gets its
    /// own source ([`Lab::new_flow_frame`]).
    fn prepare(&mut self, case: Case) -> anyhow::Result<(Vec<u8>, u32, Expected)> {
        let vip = (self.traffic.cluster_ip, self.traffic.port);
        let to_backend = |lab: &Self| Expected {
            action: XDP_REDIRECT,
            eth_dst: [0; 6], // Checked against the chosen backend's MAC.
            src: None,
            dst_in: Some(lab.tcp_endpoints()),
        };
        Ok(match case {
            Case::NoService => (
                self.client_frame_to((NOT_A_SERVICE, self.traffic.port), false)?,
                self.in0.index,
                Expected {
                    action: XDP_PASS,
                    eth_dst: self.in0.mac,
                    src: None,
                    dst_in: None,
                },
            ),
            Case::TcpNew => (
                self.client_frame_to(vip, true)?,
                self.in0.index,
                to_backend(self),
            ),
            Case::TcpEstablished => {
                // The SYN opens the flow; the data segment is what gets measured.
                let syn = self.client_frame_to(vip, true)?;
                let opened = self.dataplane.test_run(&syn, self.in0.index)?;
                ensure!(opened.action == XDP_REDIRECT, "the SYN was not forwarded");
                (
                    self.client_frame_to(vip, false)?,
                    self.in0.index,
                    to_backend(self),
                )
            }
            Case::TcpReply => {
                let syn = self.client_frame_to(vip, true)?;
                let opened = self.dataplane.test_run(&syn, self.in0.index)?;
                ensure!(opened.action == XDP_REDIRECT, "the SYN was not forwarded");
                let backend = addr_at(&opened.packet, IP_DST);
                let index = self.backend_index(backend)?;
                let reply = tcp_frame(
                    (backend_mac(index), self.out0.mac),
                    (backend, TARGET_PORT),
                    (CLIENT, CLIENT_PORT),
                    false,
                )?;
                (
                    reply,
                    self.out0.index,
                    Expected {
                        action: XDP_REDIRECT,
                        eth_dst: CLIENT_MAC,
                        src: Some(vip),
                        dst_in: Some(vec![(CLIENT, CLIENT_PORT)]),
                    },
                )
            }
            Case::TcpEstablishedHot | Case::TcpReplyHot => {
                let identity = (IDENTITY, self.traffic.port);
                let client = (CLIENT, CLIENT_PORT);
                let syn = self.client_frame_to(identity, true)?;
                let opened = self.dataplane.test_run(&syn, self.in0.index)?;
                ensure!(opened.action == XDP_REDIRECT, "the SYN was not forwarded");
                if case == Case::TcpEstablishedHot {
                    (
                        tcp_frame_ttl(
                            (CLIENT_MAC, self.in0.mac),
                            client,
                            identity,
                            false,
                            HOT_TTL,
                        )?,
                        self.in0.index,
                        Expected {
                            action: XDP_REDIRECT,
                            eth_dst: IDENTITY_MAC,
                            src: None,
                            dst_in: Some(vec![identity]),
                        },
                    )
                } else {
                    (
                        tcp_frame_ttl(
                            (IDENTITY_MAC, self.out0.mac),
                            identity,
                            client,
                            false,
                            HOT_TTL,
                        )?,
                        self.out0.index,
                        Expected {
                            action: XDP_REDIRECT,
                            eth_dst: CLIENT_MAC,
                            src: Some(identity),
                            dst_in: Some(vec![client]),
                        },
                    )
                }
            }
            Case::UdpEstablished => {
                let frame = udp_frame(
                    (CLIENT_MAC, self.in0.mac),
                    (CLIENT, CLIENT_PORT),
                    (self.traffic.cluster_ip, UDP_PORT),
                )?;
                let opened = self.dataplane.test_run(&frame, self.in0.index)?;
                ensure!(
                    opened.action == XDP_REDIRECT,
                    "the first datagram was not forwarded"
                );
                let endpoints = self
                    .traffic
                    .endpoints
                    .iter()
                    .map(|addr| (*addr, UDP_TARGET_PORT))
                    .collect();
                (
                    frame,
                    self.in0.index,
                    Expected {
                        action: XDP_REDIRECT,
                        eth_dst: [0; 6],
                        src: None,
                        dst_in: Some(endpoints),
                    },
                )
            }
        })
    }

    /// The next never-used tuple's SYN to the traffic Service.
    fn new_flow_frame(&mut self) -> anyhow::Result<Vec<u8>> {
        let ports = u32::from(u16::MAX - NEW_FLOW_FIRST_PORT) + 1;
        let flow = self.next_new_flow;
        self.next_new_flow += 1;
        let source = Ipv4Addr::from(u32::from(NEW_FLOW_SOURCES) + flow / ports);
        let port = NEW_FLOW_FIRST_PORT + u16::try_from(flow % ports)?;
        tcp_frame(
            (CLIENT_MAC, self.in0.mac),
            (source, port),
            (self.traffic.cluster_ip, self.traffic.port),
            true,
        )
    }

    fn check(
        &self,
        case: Case,
        input: &[u8],
        run: &TestRun,
        expected: &Expected,
    ) -> anyhow::Result<()> {
        ensure!(
            run.action == expected.action,
            "{}: action {} instead of {}",
            case.name(),
            run.action,
            expected.action
        );
        let output = &run.packet;
        if expected.action == XDP_PASS {
            ensure!(
                output == input,
                "{}: a passed packet was changed",
                case.name()
            );
            return Ok(());
        }
        ensure!(
            output.len() == input.len(),
            "{}: length changed",
            case.name()
        );
        ensure!(ipv4_header_ok(output), "{}: bad IPv4 checksum", case.name());
        ensure!(
            l4_checksum_ok(output)?,
            "{}: bad L4 checksum after translation",
            case.name()
        );
        // Replies leave towards the client (in0), everything else towards the backends (out0).
        let egress_mac = if expected.src.is_some() {
            self.in0.mac
        } else {
            self.out0.mac
        };
        ensure!(
            output[ETH_SRC] == egress_mac,
            "{}: the frame does not leave from the egress interface's MAC",
            case.name()
        );
        let dst = (addr_at(output, IP_DST), port_at(output, L4_DST_PORT));
        if let Some(allowed) = &expected.dst_in {
            ensure!(
                allowed.contains(&dst),
                "{}: rewritten to {dst:?}",
                case.name()
            );
        }
        let src = (addr_at(output, IP_SRC), port_at(output, L4_SRC_PORT));
        let want_src = expected
            .src
            .unwrap_or((addr_at(input, IP_SRC), port_at(input, L4_SRC_PORT)));
        ensure!(
            src == want_src,
            "{}: source {src:?}, want {want_src:?}",
            case.name()
        );
        let want_mac = if expected.eth_dst == [0; 6] {
            backend_mac(self.backend_index(dst.0)?)
        } else {
            expected.eth_dst
        };
        ensure!(
            output[ETH_DST] == want_mac,
            "{}: next hop MAC {:02x?}",
            case.name(),
            &output[ETH_DST]
        );
        Ok(())
    }

    fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        read_counters(&self.pin_dir)
    }

    /// Runs `case` `runs` times on lb (checking every run) and on the floor, alternating;
    /// returns the kernel-reported total durations of lb's and the floor's runs, seconds.
    fn single_runs(
        &mut self,
        case: Case,
        (packet, ingress, expected): (&[u8], u32, &Expected),
        runs: u32,
    ) -> anyhow::Result<(f64, f64)> {
        let mut lb_total = 0.0;
        let mut floor_total = 0.0;
        for _ in 0..runs {
            let frame = if case == Case::TcpNew {
                self.new_flow_frame()?
            } else {
                packet.to_vec()
            };
            let run = self.dataplane.test_run(&frame, ingress)?;
            self.check(case, &frame, &run, expected)?;
            lb_total += run.duration.as_secs_f64();
            floor_total += self.floor.run(&frame, ingress, 1)?.duration.as_secs_f64();
        }
        Ok((lb_total, floor_total))
    }

    /// `calls` calls of [`HOT_REPEAT`] runs each on one buffer, checking each call's final
    /// output; returns the total run time, seconds.
    fn hot_calls(
        &mut self,
        case: Case,
        (packet, ingress, expected): (&[u8], u32, &Expected),
        calls: u32,
    ) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for _ in 0..calls {
            let run = self
                .dataplane
                .test_run_repeated(packet, ingress, HOT_REPEAT)?;
            self.check(case, packet, &run, expected)?;
            total += run.duration.as_secs_f64() * f64::from(HOT_REPEAT);
        }
        Ok(total)
    }

    /// One round of `case`: lb's and the floor's ns per packet, measured back to back, then
    /// the same runs again with the kernel's run-time statistics on (they add two clock reads
    /// per run, so they stay off for the main figure).
    fn round(&mut self, case: Case, plan: &PacketPlan) -> anyhow::Result<Round> {
        let (packet, ingress, expected) = self.prepare(case)?;
        let hot = matches!(case, Case::TcpEstablishedHot | Case::TcpReplyHot);
        let hot_calls = HOT_CALLS;
        let runs = match case {
            Case::NoService => plan.repeat,
            Case::TcpNew => plan.new_flows,
            _ if hot => hot_calls * HOT_REPEAT,
            _ => plan.single_runs,
        };
        let before = self.counters()?;
        // The floor parses the case's packet, on the same ingress.
        let floor_ns = self
            .floor
            .run(&packet, ingress, plan.repeat)?
            .duration
            .as_secs_f64()
            * 1e9;
        let (lb_ns, method) = if case == Case::NoService {
            let run = self.dataplane.test_run_repeated(&packet, ingress, runs)?;
            self.check(case, &packet, &run, &expected)?;
            (run.duration.as_secs_f64() * 1e9, "repeat")
        } else if hot {
            let total = self.hot_calls(case, (&packet, ingress, &expected), hot_calls)?;
            (total / f64::from(runs) * 1e9, "repeat, identity backend")
        } else {
            let (lb_total, floor_total) =
                self.single_runs(case, (&packet, ingress, &expected), runs)?;
            let single_difference = (lb_total - floor_total) / f64::from(runs) * 1e9;
            (floor_ns + single_difference, "single")
        };

        let (lb_id, floor_id) = (self.dataplane.program_id()?, self.floor.id()?);
        let stats = RunTimeStats::enable()?;
        let (lb_before, floor_before) = (
            bpfstats::program_runs(lb_id)?,
            bpfstats::program_runs(floor_id)?,
        );
        if case == Case::NoService {
            let run = self.dataplane.test_run_repeated(&packet, ingress, runs)?;
            self.check(case, &packet, &run, &expected)?;
            self.floor.run(&packet, ingress, runs)?;
        } else if hot {
            self.hot_calls(case, (&packet, ingress, &expected), hot_calls)?;
            self.floor.run(&packet, ingress, runs)?;
        } else {
            self.single_runs(case, (&packet, ingress, &expected), runs)?;
        }
        let (lb_after, floor_after) = (
            bpfstats::program_runs(lb_id)?,
            bpfstats::program_runs(floor_id)?,
        );
        drop(stats);
        let in_situ = lb_after
            .ns_per_run_since(&lb_before)
            .context("lb_xdp did not run")?;
        let in_situ_floor = floor_after
            .ns_per_run_since(&floor_before)
            .context("the floor did not run")?;

        // Both passes' runs, each bumping exactly the case's counters.
        let total_runs = 2 * u64::from(runs);
        let after = self.counters()?;
        for (counter, value) in &after {
            let was = before
                .iter()
                .find(|(c, _)| c == counter)
                .map(|(_, v)| *v)
                .unwrap_or_default();
            let want = if case.counters().contains(counter) {
                total_runs
            } else {
                0
            };
            if value - was != want {
                bail!(
                    "{}: counter {} moved by {} over {total_runs} runs, want {want}",
                    case.name(),
                    counter.name(),
                    value - was
                );
            }
        }
        Ok(Round {
            lb_ns,
            floor_ns,
            in_situ,
            in_situ_floor,
            method,
        })
    }
}

/// One round of one case.
struct Round {
    lb_ns: f64,
    floor_ns: f64,
    in_situ: f64,
    in_situ_floor: f64,
    method: &'static str,
}

/// Runs the per-packet plan; each scale in a namespace and pin directory of its own.
pub fn run(
    plan: &PacketPlan,
    prefix: &str,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Vec<PacketCost>> {
    let mut results = Vec::new();
    for &services in &plan.services {
        for &flows in &plan.tracked_flows {
            progress(&format!(
                "per-packet: {services} Services, {flows} tracked flows"
            ));
            let name = format!("{prefix}-pkt");
            let netns = Netns::create(&name)?;
            let backends: Vec<Ipv4Addr> = (0..lb_tests::topology::BACKENDS)
                .map(lb_tests::topology::backend_addr)
                .collect();
            build_namespace(&netns, &backends)?;
            let pin_dir = Path::new(BPFFS).join(&name);
            let rows = netns.run(|| -> anyhow::Result<Vec<PacketCost>> {
                let mut lab = Lab::new(&netns, pin_dir, services, flows)?;
                let mut rounds: Vec<Vec<Round>> = Case::ALL.iter().map(|_| Vec::new()).collect();
                // Interleaved: every case once per round, so drift hits them all alike.
                for _ in 0..plan.rounds {
                    for (index, case) in Case::ALL.iter().enumerate() {
                        rounds[index].push(lab.round(*case, plan)?);
                    }
                }
                Ok(Case::ALL
                    .iter()
                    .zip(rounds)
                    .map(|(case, rounds)| {
                        let series = |f: fn(&Round) -> f64| rounds.iter().map(f).collect();
                        PacketCost {
                            case: case.name().to_owned(),
                            services,
                            tracked_flows: flows,
                            ns_per_packet: Sample::from_rounds(series(|r| r.lb_ns)),
                            floor_ns: Sample::from_rounds(series(|r| r.floor_ns)),
                            ratio_to_floor: Sample::from_rounds(series(|r| r.lb_ns / r.floor_ns)),
                            in_situ_ns: Sample::from_rounds(series(|r| r.in_situ)),
                            in_situ_floor_ns: Sample::from_rounds(series(|r| r.in_situ_floor)),
                            method: rounds.first().map_or("", |r| r.method).to_owned(),
                        }
                    })
                    .collect())
            })??;
            results.extend(rows);
        }
    }
    Ok(results)
}
