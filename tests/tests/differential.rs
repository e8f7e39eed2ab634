//! Differential test: random Service tables and random or mutated packets, each run through the
//! loaded XDP program (`BPF_PROG_TEST_RUN`, live maps) and through the reference model
//! (`lb_tests::model`); any difference in action, output frame, counters or conntrack contents
//! fails the test with a reproducer: the seed, the table, and the packets of the failing flow.
//!
//! `LB_DIFFERENTIAL_CASES` sets the number of packets (default 10,000), `LB_DIFFERENTIAL_SEED`
//! replays a run (the seed is printed). The lab is one network namespace with two NIC-like
//! links (clients on one, backends on the other), static neighbours, and no route out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use etherparse::{
    EtherType, Ethernet2Header, IpDscp, IpNumber, Ipv4Header, SingleVlanHeader, TcpHeader,
    UdpHeader, VlanId, VlanPcp,
};
use lb::{
    dataplane::{
        Dataplane,
        maps::{Capacities, ServiceMaps, open_conntrack, open_tx_ports, read_counters},
    },
    desired::{BackendAddr, DesiredState, Details, Frontend as DesiredFrontend},
    node::{Ipv4Cidr, dataplane_config},
    reconcile::Reconciler,
};
use lb_common::conntrack::{DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey};
use lb_tests::{
    model::{
        EntryKey, Expected, Frontend, IPPROTO_TCP, IPPROTO_UDP, Link, Model, TCP_ACK, TCP_FIN,
        TCP_RST, TCP_SYN, World,
    },
    netns::{Netns, mac_text, unique_prefix, veth},
    privilege::require_root,
};

const BPFFS: &str = "/sys/fs/bpf";
const DEFAULT_CASES: usize = 10_000;
/// Outcomes a run of `DEFAULT_CASES` or more must reach.
const EVERY_RUN_REACHES: [&str; 22] = [
    "redirect_service",
    "redirect_reply",
    "stack_vlan",
    "stack_ttl_exceeded",
    "stack_no_neighbour",
    "flow_created",
    "flow_reselected",
    "reject_no_endpoints",
    "reject_undefined_port",
    "drop_no_local_endpoint",
    "drop_unallocated_service_ip",
    "drop_source_range",
    "drop_malformed",
    "pass_no_service",
    "pass_not_ipv4",
    "pass_not_tcp_udp",
    "pass_fragment",
    "fragment_translated",
    "icmp_error_translated",
    "drop_fragment_refused",
    "affinity_hit",
    "flow_snat",
];
/// How long a run goes before both sides forget their flows: well inside the shortest lifetime
/// of a flow (30 s, an unanswered UDP one), which the model does not follow.
const CONNTRACK_EPOCH: Duration = Duration::from_secs(20);
/// Conntrack is compared whole this often (and at the end).
const CONNTRACK_CHECK_EVERY: usize = 500;

const IN_IF: &str = "in0";
const OUT_IF: &str = "out0";
const NODE_CLIENT_SIDE: &str = "10.0.0.1/24";
const NODE_BACKEND_SIDE: &str = "10.1.1.1/24";
const CLIENT_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 0, 0), 24);
const BACKEND_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 1, 1, 0), 24);
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Clients with a neighbour entry, and one without.
const CLIENTS: std::ops::RangeInclusive<u8> = 2..=9;
const UNRESOLVED_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
/// Backend hosts with a neighbour entry, and one without.
const BACKEND_HOSTS: std::ops::RangeInclusive<u8> = 2..=13;
const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 40);
/// Client source ports: few, so that flows repeat and come back closed.
const CLIENT_PORTS: std::ops::Range<u16> = 40_000..40_008;
const FRONTENDS: usize = 10;
const MAX_BACKENDS_PER_FRONTEND: usize = 3;
/// Backend ports are this plus the frontend's index: backend sets never overlap.
const BACKEND_PORT_BASE: u16 = 8000;
const SERVICE_PORTS: [u16; 3] = [80, 443, 8080];
const DNS_PORT: u16 = 53;
/// A ClusterIP with no frontend, and an address of the service CIDR no Service holds.
const BARE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 200);
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
/// Outside every subnet and range the node knows.
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const DEFAULT_TTL: u8 = 64;
/// Session affinity's default timeout: it never passes during a run.
const AFFINITY_TIMEOUT_S: u32 = 10_800;
const ETH_HLEN: usize = 14;
const MAX_PAYLOAD: usize = 32;

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn mac_of(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0, a, b, c, d]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lab's links, neighbours included.
fn build_lab(netns: &Netns) -> Vec<Link> {
    let mut links = Vec::new();
    for (name, cidr, subnet, hosts, base) in [
        (
            IN_IF,
            NODE_CLIENT_SIDE,
            CLIENT_SUBNET,
            CLIENTS,
            CLIENT_SUBNET.0,
        ),
        (
            OUT_IF,
            NODE_BACKEND_SIDE,
            BACKEND_SUBNET,
            BACKEND_HOSTS,
            BACKEND_SUBNET.0,
        ),
    ] {
        veth(netns, name, netns, &format!("{name}p")).expect("veth");
        netns
            .ip(&["addr", "add", cidr, "dev", name])
            .expect("address");
        let mut neighbours = BTreeMap::new();
        for host in hosts {
            let addr = Ipv4Addr::from(u32::from(base) | u32::from(host));
            let mac = mac_of(addr);
            netns
                .ip(&[
                    "neigh",
                    "add",
                    &addr.to_string(),
                    "lladdr",
                    &mac_text(mac),
                    "dev",
                    name,
                    "nud",
                    "permanent",
                ])
                .expect("neighbour");
            neighbours.insert(addr, mac);
        }
        let (ifindex, mac) = netns.link(name).expect("the lab's link");
        let node: Ipv4Addr = cidr
            .split_once('/')
            .and_then(|(addr, _)| addr.parse().ok())
            .expect("node address");
        let host_bits = u32::MAX >> subnet.1;
        let broadcast = Ipv4Addr::from(u32::from(subnet.0) | host_bits);
        links.push(Link {
            ifindex,
            mac,
            subnet,
            local: vec![node, broadcast],
            neighbours,
        });
    }
    netns.sysctl("ipv4.ip_forward", "1").expect("ip_forward");
    netns
        .sysctl("ipv4.conf.all.forwarding", "1")
        .expect("forwarding");
    links
}

/// A random Service table over the lab.
fn random_world(rng: &mut Rng, links: Vec<Link>) -> World {
    let source_ranges = [
        (Ipv4Addr::new(10, 0, 0, 0), 29),
        (Ipv4Addr::new(10, 0, 0, 8), 30),
        (Ipv4Addr::new(10, 0, 0, 3), 32),
        (Ipv4Addr::new(192, 0, 2, 0), 24),
    ];
    let mut frontends = Vec::new();
    let mut cluster_ips = BTreeSet::from([BARE_CLUSTER_IP]);
    for index in 0..FRONTENDS {
        let host = 10 + index as u8;
        let load_balancer = rng.chance(30);
        let addr = if load_balancer {
            Ipv4Addr::new(203, 0, 113, host)
        } else {
            Ipv4Addr::new(10, 96, 0, host)
        };
        if !load_balancer {
            cluster_ips.insert(addr);
        }
        let udp = rng.chance(35);
        let (port, proto) = if udp {
            (DNS_PORT, IPPROTO_UDP)
        } else {
            (*rng.pick(&SERVICE_PORTS), IPPROTO_TCP)
        };
        let count = rng.below(MAX_BACKENDS_PER_FRONTEND + 1);
        let mut backends = BTreeSet::new();
        for _ in 0..count {
            let host = if rng.chance(10) {
                UNRESOLVED_BACKEND
            } else {
                let host = *BACKEND_HOSTS.start() + rng.below(BACKEND_HOSTS.len()) as u8;
                Ipv4Addr::from(u32::from(BACKEND_SUBNET.0) | u32::from(host))
            };
            backends.insert((host, BACKEND_PORT_BASE + index as u16));
        }
        let ranges = (load_balancer && rng.chance(60)).then(|| {
            let mut ranges: Vec<(Ipv4Addr, u8)> = source_ranges
                .iter()
                .filter(|_| rng.chance(50))
                .copied()
                .collect();
            ranges.sort();
            ranges
        });
        // Load-balancer-like frontends take external traffic: under a Cluster policy, their
        // endpoints on other nodes get source NAT.
        let remote = backends
            .iter()
            .filter(|_| rng.chance(50))
            .copied()
            .collect();
        frontends.push(Frontend {
            snat_remote: load_balancer && rng.chance(70),
            remote,
            addr,
            port,
            proto,
            backends: backends.into_iter().collect(),
            drop_when_empty: rng.chance(30),
            source_ranges: ranges,
            affinity_timeout_s: if rng.chance(25) {
                AFFINITY_TIMEOUT_S
            } else {
                0
            },
        });
    }
    // A few shapes every table has, so that every outcome is reached whatever the seed.
    let resolved = |host: u8, index: usize| {
        (
            Ipv4Addr::from(u32::from(BACKEND_SUBNET.0) | u32::from(host)),
            BACKEND_PORT_BASE + index as u16,
        )
    };
    frontends[0].backends = vec![resolved(2, 0), resolved(3, 0)];
    frontends[0].affinity_timeout_s = AFFINITY_TIMEOUT_S;
    // Open to every client: source ranges admitting nobody would leave affinity unreached.
    frontends[0].source_ranges = None;
    frontends[1].backends.clear();
    frontends[1].drop_when_empty = false;
    frontends[2].backends.clear();
    frontends[2].drop_when_empty = true;
    for frontend in &mut frontends[1..=2] {
        frontend.source_ranges = None;
    }
    frontends[3].addr = Ipv4Addr::new(203, 0, 113, 13);
    frontends[3].source_ranges = Some(vec![(Ipv4Addr::new(10, 0, 0, 0), 29)]);
    frontends[3].backends = vec![resolved(4, 3)];
    // Source NAT to a remote endpoint: on the address every table has.
    frontends[3].snat_remote = true;
    frontends[3].remote = frontends[3].backends.clone();
    cluster_ips.remove(&Ipv4Addr::new(10, 96, 0, 13));
    World {
        frontends,
        cluster_ips,
        service_cidrs: vec![(Ipv4Addr::new(10, 96, 0, 0), 12)],
        links,
    }
}

/// The world's table as the agent would program it.
fn desired(world: &World) -> DesiredState {
    let mut state = DesiredState {
        cluster_ips: world.cluster_ips.clone(),
        ..DesiredState::default()
    };
    for (index, frontend) in world.frontends.iter().enumerate() {
        let desired = DesiredFrontend {
            namespace: "differential".to_owned(),
            name: format!("svc-{index}"),
            port_name: String::new(),
            addr: frontend.addr,
            port: frontend.port,
            proto: frontend.proto,
            backends: frontend
                .backends
                .iter()
                .map(|(addr, port)| BackendAddr {
                    addr: *addr,
                    port: *port,
                    remote: frontend.remote.contains(&(*addr, *port)),
                })
                .collect(),
            draining: Vec::new(),
            drop_when_empty: frontend.drop_when_empty,
            affinity_timeout_s: frontend.affinity_timeout_s,
            source_ranges: frontend.source_ranges.as_ref().map(|ranges| {
                ranges
                    .iter()
                    .map(|(addr, prefix_len)| Ipv4Cidr {
                        addr: *addr,
                        prefix_len: *prefix_len,
                    })
                    .collect()
            }),
            snat_remote: frontend.snat_remote,
            details: Details::default(),
        };
        state.frontends.insert(desired.key(), desired);
    }
    state
}

/// What a generated packet carries above IPv4.
enum Upper {
    Tcp {
        flags: u8,
    },
    Udp {
        zero_checksum: bool,
    },
    /// Another protocol, with an opaque payload.
    Other(u8),
}

struct Spec {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    upper: Upper,
    ttl: u8,
    tos: u8,
    tags: Vec<u16>,
    payload: Vec<u8>,
    ip_options: bool,
    padding: usize,
    ether_type: u16,
    /// Sent as a fragment: more fragments follow, offset in 8-byte units.
    fragment: Option<(bool, u16)>,
}

fn build(spec: &Spec, eth: ([u8; 6], [u8; 6])) -> Vec<u8> {
    let (proto, mut l4) = match spec.upper {
        Upper::Tcp { flags } => {
            let mut tcp = TcpHeader::new(spec.src.1, spec.dst.1, 0x1000_0000, 64_240);
            tcp.fin = flags & TCP_FIN != 0;
            tcp.syn = flags & TCP_SYN != 0;
            tcp.rst = flags & TCP_RST != 0;
            tcp.ack = flags & TCP_ACK != 0;
            tcp.checksum = tcp
                .calc_checksum_ipv4_raw(spec.src.0.octets(), spec.dst.0.octets(), &spec.payload)
                .expect("TCP checksum");
            (IPPROTO_TCP, tcp.to_bytes().to_vec())
        }
        Upper::Udp { zero_checksum } => {
            let mut udp = UdpHeader {
                source_port: spec.src.1,
                destination_port: spec.dst.1,
                length: (8 + spec.payload.len()) as u16,
                checksum: 0,
            };
            if !zero_checksum {
                udp.checksum = udp
                    .calc_checksum_ipv4_raw(spec.src.0.octets(), spec.dst.0.octets(), &spec.payload)
                    .expect("UDP checksum");
            }
            (IPPROTO_UDP, udp.to_bytes().to_vec())
        }
        Upper::Other(proto) => (proto, Vec::new()),
    };
    l4.extend_from_slice(&spec.payload);
    let options: &[u8] = if spec.ip_options { &[1, 1, 1, 0] } else { &[] };
    let mut ip = Ipv4Header {
        dscp: IpDscp::try_new(spec.tos >> 2).expect("DSCP"),
        total_len: (20 + options.len() + l4.len()) as u16,
        identification: 0x1234,
        dont_fragment: spec.fragment.is_none(),
        more_fragments: spec.fragment.is_some_and(|(more, _)| more),
        fragment_offset: etherparse::IpFragOffset::try_new(
            spec.fragment.map_or(0, |(_, offset)| offset),
        )
        .expect("offset"),
        time_to_live: spec.ttl,
        protocol: IpNumber(proto),
        source: spec.src.0.octets(),
        destination: spec.dst.0.octets(),
        options: options.try_into().expect("options"),
        ..Ipv4Header::default()
    };
    ip.header_checksum = ip.calc_header_checksum();
    let mut types: Vec<u16> = spec.tags.clone();
    types.push(spec.ether_type);
    let mut frame = Ethernet2Header {
        source: eth.0,
        destination: eth.1,
        ether_type: EtherType(types[0]),
    }
    .to_bytes()
    .to_vec();
    for (index, _) in spec.tags.iter().enumerate() {
        let tag = SingleVlanHeader {
            pcp: VlanPcp::ZERO,
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(100 + index as u16).expect("VLAN id"),
            ether_type: EtherType(types[index + 1]),
        };
        frame.extend_from_slice(&tag.to_bytes());
    }
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&l4);
    frame.extend(std::iter::repeat_n(0u8, spec.padding));
    frame
}

/// An ICMP message frame: type and code `kind`, an unused word, then `payload`.
fn icmp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    tags: &[u16],
    ttl: u8,
    (kind, code): (u8, u8),
    payload: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(payload);
    let mut acc: u32 = 0;
    for pair in icmp.chunks(2) {
        acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let check = !(acc as u16);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = Ipv4Header {
        total_len: (20 + icmp.len()) as u16,
        identification: 0x4321,
        time_to_live: ttl,
        protocol: IpNumber(1),
        source: src.octets(),
        destination: dst.octets(),
        ..Ipv4Header::default()
    };
    ip.header_checksum = ip.calc_header_checksum();
    let mut types: Vec<u16> = tags.to_vec();
    types.push(0x0800);
    let mut frame = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: EtherType(types[0]),
    }
    .to_bytes()
    .to_vec();
    for (index, _) in tags.iter().enumerate() {
        let tag = SingleVlanHeader {
            pcp: VlanPcp::ZERO,
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(100 + index as u16).expect("VLAN id"),
            ether_type: EtherType(types[index + 1]),
        };
        frame.extend_from_slice(&tag.to_bytes());
    }
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&icmp);
    frame
}

/// One random packet and the interface it arrives on.
fn random_packet(rng: &mut Rng, model: &Model) -> (Vec<u8>, u32) {
    let world = &model.world;
    let (in0, out0) = (&world.links[0], &world.links[1]);
    let pick_client = |rng: &mut Rng| {
        if rng.chance(5) {
            UNRESOLVED_CLIENT
        } else {
            Ipv4Addr::new(10, 0, 0, *CLIENTS.start() + rng.below(CLIENTS.len()) as u8)
        }
    };
    let tcp_flags = [
        TCP_SYN,
        TCP_ACK,
        TCP_ACK | TCP_FIN,
        TCP_RST,
        TCP_SYN | TCP_ACK,
        TCP_ACK | 0x08,
    ];
    let upper_for = |rng: &mut Rng, proto: u8| match proto {
        IPPROTO_TCP => Upper::Tcp {
            flags: *rng.pick(&tcp_flags),
        },
        _ => Upper::Udp {
            zero_checksum: rng.chance(10),
        },
    };
    let mut spec = Spec {
        src: (
            pick_client(rng),
            CLIENT_PORTS.start + rng.below(CLIENT_PORTS.len()) as u16,
        ),
        dst: (ELSEWHERE, 80),
        upper: Upper::Other(47),
        ttl: if rng.chance(5) { 1 } else { DEFAULT_TTL },
        tos: (rng.below(64) as u8) << 2,
        tags: match rng.below(100) {
            0..=3 => vec![0x8100],
            4..=5 => vec![0x88a8, 0x8100],
            _ => Vec::new(),
        },
        payload: (0..rng.below(MAX_PAYLOAD + 1))
            .map(|_| rng.next() as u8)
            .collect(),
        ip_options: rng.chance(5),
        padding: if rng.chance(5) { 1 + rng.below(8) } else { 0 },
        ether_type: 0x0800,
        fragment: None,
    };
    let replies: Vec<(&EntryKey, _)> = model.entries.iter().filter(|(key, _)| key.reply).collect();
    let ingress = match rng.below(100) {
        // To a frontend.
        0..=49 => {
            let frontend = rng.pick(&world.frontends);
            spec.dst = (frontend.addr, frontend.port);
            spec.upper = upper_for(rng, frontend.proto);
            // Now and then one of its endpoints calling the Service (a hairpin when it is
            // chosen).
            if !frontend.backends.is_empty() && rng.chance(8) {
                spec.src.0 = rng.pick(&frontend.backends).0;
                out0
            } else {
                in0
            }
        }
        // A backend's reply to a tracked flow, now and then the first fragment of a datagram.
        50..=74 if !replies.is_empty() => {
            let (key, _) = *rng.pick(&replies);
            spec.src = key.src;
            spec.dst = key.dst;
            spec.upper = upper_for(rng, key.proto);
            if rng.chance(10) {
                spec.fragment = Some((true, 0));
            }
            out0
        }
        // A fragment: the first of a datagram to a frontend, or a later one (to a frontend, or
        // from a backend), which follows only a translated first one.
        75..=82 => {
            let later = rng.chance(60);
            let offset = if later { 1 + rng.below(4) as u16 } else { 0 };
            let more = !later || rng.chance(50);
            spec.fragment = Some((more, offset));
            let from_backend = later && !replies.is_empty() && rng.chance(40);
            if from_backend {
                let (key, _) = *rng.pick(&replies);
                spec.src = key.src;
                spec.dst = key.dst;
                spec.upper = Upper::Other(key.proto);
                out0
            } else {
                let frontend = rng.pick(&world.frontends);
                spec.dst = (frontend.addr, frontend.port);
                spec.upper = if later {
                    Upper::Other(frontend.proto)
                } else {
                    upper_for(rng, frontend.proto)
                };
                in0
            }
        }
        // A backend's packet to a client nothing tracks.
        50..=74 => {
            let frontend = rng.pick(&world.frontends);
            let backend = frontend
                .backends
                .first()
                .copied()
                .unwrap_or((Ipv4Addr::new(10, 1, 1, 2), 9999));
            spec.dst = spec.src;
            spec.src = backend;
            spec.upper = upper_for(rng, frontend.proto);
            out0
        }
        // Addresses that are no frontend.
        83..=91 => {
            let addr = *rng.pick(&[
                BARE_CLUSTER_IP,
                UNALLOCATED,
                ELSEWHERE,
                world.frontends[0].addr,
            ]);
            let proto = *rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
            spec.dst = (addr, 1 + rng.below(1024) as u16);
            spec.upper = upper_for(rng, proto);
            in0
        }
        // An ICMP error about a packet of a tracked flow (or of none), from either side.
        92..=95 if !model.entries.is_empty() => {
            let keys: Vec<&EntryKey> = model.entries.keys().collect();
            let key = *rng.pick(&keys);
            // The quoted packet as it was on the wire: towards the backend (for a reply entry)
            // or towards the client (for an original one).
            let (quoted_src, quoted_dst, outer_src, outer_dst, ingress) = if key.reply {
                (key.dst, key.src, key.src.0, key.dst.0, out0)
            } else {
                (key.dst, key.src, key.src.0, key.dst.0, in0)
            };
            let untracked = rng.chance(20);
            let quoted = Spec {
                src: if untracked {
                    (ELSEWHERE, 9)
                } else {
                    quoted_src
                },
                dst: quoted_dst,
                upper: upper_for(rng, key.proto),
                ttl: DEFAULT_TTL - 1,
                tos: 0,
                tags: Vec::new(),
                payload: spec.payload.clone(),
                ip_options: rng.chance(10),
                padding: 0,
                ether_type: 0x0800,
                fragment: None,
            };
            let inner = build(&quoted, ([0; 6], [0; 6]));
            let ihl = usize::from(inner[ETH_HLEN] & 0x0f) * 4;
            let quote_len = if rng.chance(50) {
                ihl + 8
            } else {
                inner.len() - ETH_HLEN
            };
            let quote = &inner[ETH_HLEN..ETH_HLEN + quote_len];
            let kind = *rng.pick(&[(3u8, 3u8), (3, 4), (11, 0), (12, 0)]);
            let mut frame = icmp_frame(
                (mac_of(outer_src), ingress.mac),
                (outer_src, outer_dst),
                &spec.tags,
                spec.ttl,
                kind,
                quote,
            );
            if rng.chance(20) {
                mutate(rng, &mut frame);
            }
            return (frame, ingress.ifindex);
        }
        // Other protocols and EtherTypes.
        _ => {
            spec.dst = (world.frontends[0].addr, 0);
            match rng.below(3) {
                0 => spec.upper = Upper::Other(47),
                1 => spec.ether_type = 0x86dd,
                _ => spec.ether_type = 0x0806,
            }
            in0
        }
    };
    let mut frame = build(&spec, (mac_of(spec.src.0), ingress.mac));
    if rng.chance(20) {
        mutate(rng, &mut frame);
    }
    (frame, ingress.ifindex)
}

/// Truncates the frame or overwrites a header byte. The IPv4 fragment field is left alone: the
/// model leaves fragments to the fixtures.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    if rng.chance(40) {
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (so do NICs).
        let keep = ETH_HLEN + rng.below(frame.len() - ETH_HLEN);
        frame.truncate(keep);
        return;
    }
    // Header bytes of an untagged frame: EtherType, IPv4 (not the fragment field), L4 start.
    let candidates: Vec<usize> = (12..14)
        .chain(14..20)
        .chain(22..34)
        .chain(34..54)
        .filter(|offset| *offset < frame.len())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let offset = *rng.pick(&candidates);
    frame[offset] = rng.next() as u8;
}

/// The kernel's conntrack, in the model's terms (timestamps and ids aside).
fn kernel_entries(pin_dir: &Path) -> BTreeMap<EntryKey, Compared> {
    let map = open_conntrack(pin_dir).expect("opening LB_CONNTRACK");
    let mut entries = BTreeMap::new();
    for item in map.iter() {
        let (key, state) = item.expect("reading LB_CONNTRACK");
        let key: FlowKey = key;
        let model_key = EntryKey {
            src: (
                lb_common::net::addr_from_wire(key.src_addr),
                u16::from_be(key.src_port),
            ),
            dst: (
                lb_common::net::addr_from_wire(key.dst_addr),
                u16::from_be(key.dst_port),
            ),
            proto: key.proto,
            reply: key.direction == DIRECTION_REPLY,
        };
        assert!(key.direction == DIRECTION_ORIGINAL || key.direction == DIRECTION_REPLY);
        entries.insert(
            model_key,
            (
                lb_common::net::addr_from_wire(state.nat_addr),
                u16::from_be(state.nat_port),
                state.tcp_flags,
                (state.snat_addr != 0).then(|| {
                    (
                        lb_common::net::addr_from_wire(state.snat_addr),
                        u16::from_be(state.snat_port),
                    )
                }),
            ),
        );
    }
    entries
}

fn model_entries(model: &Model) -> BTreeMap<EntryKey, Compared> {
    model
        .entries
        .iter()
        .map(|(key, entry)| (*key, (entry.nat.0, entry.nat.1, entry.closed, entry.snat)))
        .collect()
}

/// What the conntrack comparison looks at: the translation, the close state and the source
/// NAT of each entry.
type Compared = (Ipv4Addr, u16, u8, Option<(Ipv4Addr, u16)>);

/// The packets of the run that share an address and port with `frame`'s: the failing flow's
/// history, which replays the failure on a fresh lab with the same table.
fn related(history: &[(usize, Vec<u8>, u32)], frame: &[u8]) -> Vec<String> {
    let endpoints = |frame: &[u8]| -> BTreeSet<(Vec<u8>, Vec<u8>)> {
        let mut set = BTreeSet::new();
        if frame.len() >= 38 {
            set.insert((frame[26..30].to_vec(), frame[34..36].to_vec()));
            set.insert((frame[30..34].to_vec(), frame[36..38].to_vec()));
        }
        set
    };
    let wanted = endpoints(frame);
    history
        .iter()
        .filter(|(_, earlier, _)| !endpoints(earlier).is_disjoint(&wanted))
        .map(|(case, earlier, ingress)| {
            format!("  case {case} on ifindex {ingress}: {}", hex(earlier))
        })
        .collect()
}

/// The entries only one side holds, and every packet of the run (with what the program made of
/// it) that carried one of their endpoints in or out.
fn conntrack_difference(
    kernel: &BTreeMap<EntryKey, Compared>,
    model: &BTreeMap<EntryKey, Compared>,
    history: &[(usize, Vec<u8>, u32)],
    outputs: &BTreeMap<usize, (u32, Vec<u8>)>,
) -> String {
    let mut text = String::new();
    let mut wanted = BTreeSet::new();
    for (side, ours, theirs) in [("program", kernel, model), ("model", model, kernel)] {
        for (key, value) in ours {
            if theirs.get(key) != Some(value) {
                text.push_str(&format!("only the {side}: {key:?} -> {value:?}\n"));
                // The flow's own endpoints: the client, and the node's source NAT port (a
                // backend's address and port are shared by many flows).
                if key.reply {
                    wanted.insert(key.dst);
                } else {
                    wanted.insert(key.src);
                }
                wanted.extend(value.3);
            }
        }
    }
    let endpoints = |frame: &[u8]| -> Vec<(Ipv4Addr, u16)> {
        // Past any VLAN tags; IPv4 options are rare enough to miss.
        let mut l3 = ETH_HLEN;
        while frame.len() >= l3 && matches!(frame[l3 - 2..l3], [0x81, 0x00] | [0x88, 0xa8]) {
            l3 += 4;
        }
        if frame.len() < l3 + 24 {
            return Vec::new();
        }
        let addr =
            |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        vec![
            (addr(l3 + 12), port(l3 + 20)),
            (addr(l3 + 16), port(l3 + 22)),
        ]
    };
    text.push_str("packets with those endpoints, in and out:\n");
    for (case, frame, ingress) in history {
        let (action, out) = &outputs[case];
        let touches = endpoints(frame)
            .into_iter()
            .chain(endpoints(out))
            .any(|endpoint| wanted.contains(&endpoint));
        if touches {
            text.push_str(&format!(
                "  case {case} on ifindex {ingress}: {}\n    action {action}: {}\n",
                hex(frame),
                hex(out)
            ));
        }
    }
    text
}

#[test]
fn the_program_agrees_with_the_reference_model_on_random_traffic() {
    if !require_root("the_program_agrees_with_the_reference_model_on_random_traffic") {
        return;
    }
    let cases: usize = std::env::var("LB_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let seed: u64 = std::env::var("LB_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                | 1
        });
    println!("differential: {cases} cases, LB_DIFFERENTIAL_SEED={seed}");
    let name = unique_prefix("lbt");
    let netns = Netns::create(&name).expect("namespace");
    let pin_dir = Path::new(BPFFS).join(&name);
    let netns_ref = &netns;
    netns
        .run(move || {
            let _pins = PinGuard(pin_dir.clone());
            let links = build_lab(netns_ref);
            let mut rng = Rng(seed);
            let world = random_world(&mut rng, links);
            let mut dataplane =
                Dataplane::load(&pin_dir, &Capacities::default()).expect("loading the program");
            let mut tx_ports = open_tx_ports(&pin_dir).expect("LB_TX_PORTS");
            for link in &world.links {
                tx_ports
                    .insert(link.ifindex, link.ifindex, None, 0)
                    .expect("TX port");
            }
            let cidr: Ipv4Cidr = SERVICE_CIDR.parse().expect("CIDR");
            dataplane
                .configure(&dataplane_config(&[cidr], 0).expect("config"))
                .expect("configuring");
            let mut maps = ServiceMaps::open(&pin_dir).expect("service maps");
            let (mut reconciler, _) = Reconciler::from_store(&mut maps).expect("reconciler");
            let summary = reconciler.reconcile(&desired(&world), &mut maps);
            assert!(summary.errors.is_empty(), "{:?}", summary.errors);
            let table = format!("{:#?}", world.frontends);
            let mut model = Model::new(world);
            let mut history = Vec::new();
            let mut outputs: BTreeMap<usize, (u32, Vec<u8>)> = BTreeMap::new();
            let mut counters = read_counters(&pin_dir).expect("counters");
            let mut conntrack = open_conntrack(&pin_dir).expect("opening LB_CONNTRACK");
            let mut epoch = std::time::Instant::now();
            let mut tally: BTreeMap<&'static str, u64> = BTreeMap::new();
            for case in 0..cases {
                // The model does not age flows: before the shortest lifetime could pass, both
                // sides forget every flow and start over on the same table.
                if epoch.elapsed() > CONNTRACK_EPOCH {
                    let keys: Vec<FlowKey> = conntrack
                        .keys()
                        .collect::<Result<_, _>>()
                        .expect("reading LB_CONNTRACK");
                    for key in keys {
                        conntrack.remove(&key).expect("emptying LB_CONNTRACK");
                    }
                    model.entries.clear();
                    epoch = std::time::Instant::now();
                }
                let (frame, ingress) = random_packet(&mut rng, &model);
                history.push((case, frame.clone(), ingress));
                let run = dataplane.test_run(&frame, ingress).expect("test run");
                let snat_port = |key: &EntryKey| {
                    let key = FlowKey::new(
                        (lb_common::net::addr_to_wire(key.src.0), key.src.1.to_be()),
                        (lb_common::net::addr_to_wire(key.dst.0), key.dst.1.to_be()),
                        key.proto,
                        DIRECTION_ORIGINAL,
                    );
                    conntrack
                        .get(&key, 0)
                        .ok()
                        .filter(|state| state.snat_addr != 0)
                        .map(|state| u16::from_be(state.snat_port))
                };
                let expected = model.expect(&frame, ingress, &snat_port);
                let after = read_counters(&pin_dir).expect("counters");
                let deltas: BTreeMap<&'static str, u64> = after
                    .iter()
                    .zip(&counters)
                    .map(|((counter, now), (_, before))| (counter.name(), now - before))
                    .filter(|(_, delta)| *delta != 0)
                    .collect();
                counters = after;
                let matching = expected.iter().find(|result: &&Expected| {
                    result.action == run.action
                        && result.counters == deltas
                        && Model::same_frame(result, &run.packet)
                });
                let Some(result) = matching else {
                    panic!(
                        "case {case} differs (seed {seed}).\ninput on ifindex {ingress}: {}\n\
                         program: action {} counters {deltas:?}\n  {}\nmodel accepts:\n{}\n\
                         reproducer (this flow's packets so far, in order):\n{}\ntable:\n{table}",
                        hex(&frame),
                        run.action,
                        hex(&run.packet),
                        expected
                            .iter()
                            .map(|e| format!(
                                "  action {} counters {:?}\n  {}",
                                e.action,
                                e.counters,
                                hex(&e.frame)
                            ))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        related(&history, &frame).join("\n"),
                    );
                };
                for (name, delta) in &result.counters {
                    *tally.entry(*name).or_default() += delta;
                }
                model.commit(result);
                outputs.insert(case, (run.action, run.packet.clone()));
                if (case + 1) % CONNTRACK_CHECK_EVERY == 0 || case + 1 == cases {
                    let (kernel, expected) = (kernel_entries(&pin_dir), model_entries(&model));
                    if kernel != expected {
                        panic!(
                            "conntrack differs after case {case} (seed {seed})\n{}",
                            conntrack_difference(&kernel, &expected, &history, &outputs)
                        );
                    }
                }
            }
            println!("differential: outcomes {tally:?}");
            // A generator that stopped reaching an outcome would make this test pass vacuously.
            if cases >= DEFAULT_CASES {
                for outcome in EVERY_RUN_REACHES {
                    assert!(
                        tally.get(outcome).copied().unwrap_or(0) > 0,
                        "no case reached {outcome} (seed {seed}): {tally:?}"
                    );
                }
            }
        })
        .expect("the differential run failed inside the namespace (see the panic above)");
}
