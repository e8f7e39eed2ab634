//! A reference model of the XDP program's decisions, for the differential test: from the Service
//! table, the node's links and the packet, what must come out (action, frame, counters) and what
//! conntrack must then hold. Written from the Kubernetes semantics in the README ("Service
//! semantics") and the documented rules of each stage (parsing invariants, conntrack lifecycle,
//! forwarding conditions, reject format), not from the eBPF code: checksums in particular are
//! recomputed over whole headers here, where the program updates them incrementally.
//!
//! Scope: TCP and UDP to ClusterIP-like and load-balancer-like frontends (source ranges, empty
//! frontends that reject or drop), replies, service-CIDR and undefined-port handling, every
//! parse failure, VLAN tags, TTL, unresolved neighbours, first and later fragments, ICMP errors
//! about tracked flows, session affinity, source NAT (remote endpoints of external traffic, and
//! hairpins). Left to the table-driven fixtures: partial checksums,
//! affinity timeouts and draining, rate limits, frames over the MTU.
//! The model needs the frontends' backend sets to be disjoint (then no flow's tuple can collide
//! with another's) and the program's maps to start empty.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETHERTYPE_IPV4: u16 = 0x0800;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;
/// VLAN tags looked through.
const MAX_TAGS: usize = 2;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// IPv4 header offsets.
const IP_TOS: usize = 1;
const IP_TOT_LEN: usize = 2;
const IP_FRAG: usize = 6;
const IP_TTL: usize = 8;
const IP_PROTO: usize = 9;
const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// Mask of "more fragments" and the fragment offset.
const IP_FRAGMENT_MASK: u16 = 0x3fff;
/// Mask of the fragment offset alone.
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_CHECK: usize = 16;
const TCP_FLAGS: usize = 13;
const TCP_DOFF: usize = 12;
const UDP_LEN: usize = 4;
const UDP_CHECK: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// ICMP destination unreachable, port unreachable (RFC 792).
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_PORT_UNREACHABLE: u8 = 3;
/// ICMP types that quote a packet.
const ICMP_ERROR_TYPES: [u8; 3] = [3, 11, 12];
/// Bytes past the quoted IPv4 header an ICMP error quotes.
const QUOTED_L4_BYTES: usize = 8;
/// TOS of the program's ICMP errors: internetwork control plus the offending packet's TOS bits.
const ICMP_PRECEDENCE: u8 = 0xc0;
const TOS_BITS: u8 = 0x1e;
const ICMP_TTL: u8 = 64;
/// A forwarded packet needs a TTL of at least this to survive the hop.
const MIN_FORWARD_TTL: u8 = 2;

/// One Service frontend.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub backends: Vec<(Ipv4Addr, u16)>,
    /// Empty because a `Local` policy left no endpoint here: drop instead of reject.
    pub drop_when_empty: bool,
    /// `loadBalancerSourceRanges` (`None`: everyone).
    pub source_ranges: Option<Vec<(Ipv4Addr, u8)>>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// External traffic under `externalTrafficPolicy: Cluster`: flows to `remote` backends get
    /// source NAT.
    pub snat_remote: bool,
    /// The backends on other nodes.
    pub remote: Vec<(Ipv4Addr, u16)>,
}

/// The source ports of flows with source NAT (README, "Service semantics").
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;

/// A link of the node: where packets to its subnet leave, and the neighbours it knows.
#[derive(Clone, Debug)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub subnet: (Ipv4Addr, u8),
    /// The node's own addresses on the subnet, and its broadcast address: the kernel delivers
    /// or floods those, it does not forward them.
    pub local: Vec<Ipv4Addr>,
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
}

/// Everything the program is configured with.
#[derive(Clone, Debug)]
pub struct World {
    pub frontends: Vec<Frontend>,
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub service_cidrs: Vec<(Ipv4Addr, u8)>,
    pub links: Vec<Link>,
}

/// A conntrack entry's key, as the documented design lays it out: the packet's tuple and which
/// direction of its flow it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub proto: u8,
    pub reply: bool,
}

/// What an entry says: where to rewrite to, and the FIN/RST seen on its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub nat: (Ipv4Addr, u16),
    /// 1: a FIN was seen, 2: a RST (either direction), 4: a reply was seen (the flow is
    /// answered; until then it lives only as long as netfilter keeps an unanswered flow).
    pub closed: u8,
    /// Source NAT: on an original entry, the node address and port the flow leaves from; on a
    /// reply entry, the client to restore.
    pub snat: Option<(Ipv4Addr, u16)>,
}

const SEEN_FIN: u8 = 1;
const SEEN_REPLY: u8 = 4;
const SEEN_RST: u8 = 2;

/// One acceptable result of a packet.
#[derive(Clone, Debug)]
pub struct Expected {
    pub action: u32,
    pub frame: Vec<u8>,
    /// Offsets in `frame` of checksum fields, compared as one's-complement values (0 and 0xffff
    /// are the same number); `true` for a UDP checksum, which must not come out 0.
    pub checksums: Vec<(usize, bool)>,
    /// Counter deltas by name; every other counter stays.
    pub counters: BTreeMap<&'static str, u64>,
    /// The conntrack entries this result writes or deletes (`None`).
    pub effects: Vec<(EntryKey, Option<Entry>)>,
    /// A first fragment's translation, for the later fragments.
    pub fragment: Option<(FragmentId, Fragment)>,
    /// A first fragment refused (rejected or dropped): its later fragments are dropped.
    pub refuses_fragments: Option<FragmentId>,
    /// The backend a new flow of a frontend with session affinity went to, for its client.
    pub affinity: Option<(AffinityId, (Ipv4Addr, u16))>,
}

/// A client of a frontend (address, port, protocol), as session affinity remembers it.
pub type AffinityId = (Ipv4Addr, (Ipv4Addr, u16, u8));

impl Expected {
    /// `frame` leaving with `action`, one `counter` bumped, and nothing else changed.
    fn new(action: u32, frame: Vec<u8>, counter: &'static str) -> Self {
        Self {
            action,
            frame,
            checksums: Vec::new(),
            counters: BTreeMap::from([(counter, 1)]),
            effects: Vec::new(),
            fragment: None,
            refuses_fragments: None,
            affinity: None,
        }
    }
}

/// The model: the world and the conntrack entries it expects the program to hold.
pub struct Model {
    pub world: World,
    pub entries: BTreeMap<EntryKey, Entry>,
    /// Datagrams whose first fragment was translated: (source, destination, IPv4 id, protocol)
    /// as the fragments arrive -> how, and when.
    pub fragments: BTreeMap<FragmentId, (Fragment, Instant)>,
    /// Datagrams whose first fragment was refused, and when.
    pub refused: BTreeMap<FragmentId, Instant>,
    /// Session affinity: each client's last new flow's backend, per frontend (the timeout, hours,
    /// never passes during a run).
    pub affinity: BTreeMap<AffinityId, (Ipv4Addr, u16)>,
}

/// One end of a quoted packet that an ICMP error's translation changes: the old address and
/// port, the new ones, and the offsets of the address and the port in the frame.
type QuoteChange = ((Ipv4Addr, u16), (Ipv4Addr, u16), usize, usize);

/// A fragmented datagram's identity.
pub type FragmentId = (Ipv4Addr, Ipv4Addr, u16, u8);

/// How a datagram's first fragment was translated.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    /// The new source address, if it changed.
    pub src: Option<Ipv4Addr>,
    /// The new destination address, if it changed.
    pub dst: Option<Ipv4Addr>,
    /// A backend's reply (else a packet to a Service).
    pub reply: bool,
}

/// The source NAT port the program chose for the new flow with this original key, read from
/// its conntrack: any free port of `SNAT_PORTS` is right, so the model checks the one chosen.
pub type SnatPorts<'a> = &'a dyn Fn(&EntryKey) -> Option<u16>;

/// Linux's reassembly timeout, after which a datagram's later fragments are no longer followed;
/// within `FRAGMENT_CLOCK_SLACK` of it the model accepts either outcome (the program stamps the
/// entry a moment before the model does).
const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);
const FRAGMENT_CLOCK_SLACK: Duration = Duration::from_millis(500);

/// A parsed TCP or UDP packet.
struct Parsed {
    /// A first fragment (more fragments follow).
    first_fragment: bool,
    id: u16,
    l3: usize,
    l4: usize,
    ihl: usize,
    l4_len: usize,
    tagged: bool,
    proto: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    tcp_flags: u8,
}

enum Parse {
    Malformed,
    NotIpv4,
    NotTcpUdp,
    /// A later fragment: addresses, identity and link-layer facts only.
    LaterFragment {
        l3: usize,
        ihl: usize,
        tagged: bool,
        id: FragmentId,
    },
    Packet(Parsed),
    /// An ICMP error (RFC 792 types that quote a datagram) about a TCP or UDP packet.
    IcmpError(IcmpError),
}

/// What the model needs of an ICMP error.
struct IcmpError {
    l3: usize,
    ihl: usize,
    tagged: bool,
    /// The ICMP message: from its header to the end of the datagram.
    icmp: std::ops::Range<usize>,
    inner_l3: usize,
    inner_ihl: usize,
    inner_l4: usize,
    inner_proto: u8,
    inner_src: (Ipv4Addr, u16),
    inner_dst: (Ipv4Addr, u16),
}

/// An ICMP error quoting at least the ports of a TCP or UDP packet (the start of its datagram),
/// or someone else's ICMP message.
fn parse_icmp_error(frame: &[u8], l3: usize, ihl: usize, tagged: bool, end: usize) -> Parse {
    let l4 = l3 + ihl;
    if frame.len() < l4 + ICMP_HLEN || !is_icmp_error(frame[l4]) {
        return Parse::NotTcpUdp;
    }
    let inner_l3 = l4 + ICMP_HLEN;
    if frame.len() < inner_l3 + IPV4_MIN_HLEN {
        return Parse::NotTcpUdp;
    }
    let inner_ihl = usize::from(frame[inner_l3] & 0x0f) * 4;
    let inner_proto = frame[inner_l3 + IP_PROTO];
    let offset = be16(frame, inner_l3 + IP_FRAG) & IP_OFFSET_MASK;
    if frame[inner_l3] >> 4 != 4
        || inner_ihl < IPV4_MIN_HLEN
        || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
        || offset != 0
    {
        return Parse::NotTcpUdp;
    }
    let inner_l4 = inner_l3 + inner_ihl;
    if inner_l4 + QUOTED_L4_BYTES > end || inner_l4 + QUOTED_L4_BYTES > frame.len() {
        return Parse::NotTcpUdp;
    }
    Parse::IcmpError(IcmpError {
        l3,
        ihl,
        tagged,
        icmp: l4..end,
        inner_l3,
        inner_ihl,
        inner_l4,
        inner_proto,
        inner_src: (addr_at(frame, inner_l3 + IP_SRC), be16(frame, inner_l4)),
        inner_dst: (addr_at(frame, inner_l3 + IP_DST), be16(frame, inner_l4 + 2)),
    })
}

fn be16(frame: &[u8], offset: usize) -> u16 {
    u16::from_be_bytes([frame[offset], frame[offset + 1]])
}

fn addr_at(frame: &[u8], offset: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        frame[offset],
        frame[offset + 1],
        frame[offset + 2],
        frame[offset + 3],
    )
}

fn in_prefix(addr: Ipv4Addr, (network, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(network) & mask
}

/// The program's parse, from the documented invariants: what must be dropped as malformed,
/// what is not for it, and the fields of a TCP or UDP packet.
fn parse(frame: &[u8]) -> Parse {
    if frame.len() < ETH_HLEN {
        return Parse::Malformed;
    }
    let mut ether_type = be16(frame, ETH_HLEN - 2);
    let mut l3 = ETH_HLEN;
    let tagged = matches!(ether_type, TPID_8021Q | TPID_8021AD);
    for _ in 0..MAX_TAGS {
        if !matches!(ether_type, TPID_8021Q | TPID_8021AD) {
            break;
        }
        if frame.len() < l3 + VLAN_HLEN {
            return Parse::Malformed;
        }
        ether_type = be16(frame, l3 + 2);
        l3 += VLAN_HLEN;
    }
    if ether_type != ETHERTYPE_IPV4 {
        return Parse::NotIpv4;
    }
    if frame.len() < l3 + IPV4_MIN_HLEN {
        return Parse::Malformed;
    }
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    if frame[l3] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Parse::Malformed;
    }
    let tot_len = usize::from(be16(frame, l3 + IP_TOT_LEN));
    if tot_len < ihl || l3 + tot_len > frame.len() {
        return Parse::Malformed;
    }
    let proto = frame[l3 + IP_PROTO];
    let fragment = be16(frame, l3 + IP_FRAG) & IP_FRAGMENT_MASK != 0;
    let l4 = l3 + ihl;
    let l4_len = tot_len - ihl;
    if proto == IPPROTO_ICMP && !fragment {
        return parse_icmp_error(frame, l3, ihl, tagged, l3 + tot_len);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parse::NotTcpUdp;
    }
    let id = be16(frame, l3 + 4);
    let (src, dst) = (addr_at(frame, l3 + IP_SRC), addr_at(frame, l3 + IP_DST));
    let offset = be16(frame, l3 + IP_FRAG) & IP_OFFSET_MASK;
    if fragment && offset != 0 {
        return Parse::LaterFragment {
            l3,
            ihl,
            tagged,
            id: (src, dst, id, proto),
        };
    }
    let first_fragment = fragment;
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        if frame.len() < l4 + TCP_MIN_HLEN {
            return Parse::Malformed;
        }
        let doff = usize::from(frame[l4 + TCP_DOFF] >> 4) * 4;
        if doff < TCP_MIN_HLEN || doff > l4_len {
            return Parse::Malformed;
        }
        tcp_flags = frame[l4 + TCP_FLAGS];
    } else {
        if frame.len() < l4 + UDP_HLEN {
            return Parse::Malformed;
        }
        let udp_len = usize::from(be16(frame, l4 + UDP_LEN));
        // A first fragment's UDP length counts the whole datagram.
        if udp_len < UDP_HLEN || (udp_len > l4_len && !first_fragment) {
            return Parse::Malformed;
        }
    }
    Parse::Packet(Parsed {
        first_fragment,
        id,
        l3,
        l4,
        ihl,
        l4_len,
        tagged,
        proto,
        src: (addr_at(frame, l3 + IP_SRC), be16(frame, l4)),
        dst: (addr_at(frame, l3 + IP_DST), be16(frame, l4 + 2)),
        tcp_flags,
    })
}

/// The unfolded sum of 16-bit big-endian words.
fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut pairs = data.chunks_exact(2);
    for pair in &mut pairs {
        acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    sum(0, &src.octets()) + sum(0, &dst.octets()) + u64::from(proto) + len as u64
}

/// Sets the checksum at `field` (an offset into `data`) so that the sum over `extra` and `data`
/// is what `before` (the same sum before the change) was: a translation keeps whatever error a
/// sender's checksum had, and a correct one stays correct.
fn keep_sum(data: &mut [u8], field: usize, extra: u64, before: u16) {
    data[field..field + 2].fill(0);
    let rest = fold(sum(extra, data));
    // before = rest + check (one's complement), so check = before - rest.
    let check = fold(u64::from(before) + u64::from(!rest));
    data[field..field + 2].copy_from_slice(&check.to_be_bytes());
}

impl Model {
    pub fn new(world: World) -> Self {
        Self {
            world,
            entries: BTreeMap::new(),
            fragments: BTreeMap::new(),
            refused: BTreeMap::new(),
            affinity: BTreeMap::new(),
        }
    }

    /// Every acceptable result of `frame` arriving on `ingress`.
    pub fn expect(&self, frame: &[u8], ingress: u32, ports: SnatPorts) -> Vec<Expected> {
        let untouched =
            |counter: &'static str, action: u32| Expected::new(action, frame.to_vec(), counter);
        let packet = match parse(frame) {
            Parse::Malformed => return vec![untouched("drop_malformed", XDP_DROP)],
            Parse::NotIpv4 => return vec![untouched("pass_not_ipv4", XDP_PASS)],
            Parse::NotTcpUdp => return vec![untouched("pass_not_tcp_udp", XDP_PASS)],
            Parse::LaterFragment {
                l3,
                ihl,
                tagged,
                id,
            } => {
                return self.later_fragment(frame, ingress, l3, ihl, tagged, id);
            }
            Parse::IcmpError(error) => return self.icmp_error(frame, ingress, &error),
            Parse::Packet(packet) => packet,
        };
        let mut results = self.tcp_udp(frame, ingress, &packet, ports);
        if packet.first_fragment {
            // A refused first fragment takes its later fragments with it.
            let id = (packet.src.0, packet.dst.0, packet.id, packet.proto);
            for result in &mut results {
                let refused = result.action == XDP_DROP
                    || result
                        .counters
                        .keys()
                        .any(|name| name.starts_with("reject_"));
                if refused {
                    result.refuses_fragments = Some(id);
                }
            }
        }
        results
    }

    /// A TCP or UDP packet: to a frontend, a reply, or neither.
    fn tcp_udp(
        &self,
        frame: &[u8],
        ingress: u32,
        packet: &Parsed,
        ports: SnatPorts,
    ) -> Vec<Expected> {
        let untouched =
            |counter: &'static str, action: u32| Expected::new(action, frame.to_vec(), counter);
        if let Some(frontend) = self
            .world
            .frontends
            .iter()
            .find(|f| (f.addr, f.port, f.proto) == (packet.dst.0, packet.dst.1, packet.proto))
        {
            if let Some(ranges) = &frontend.source_ranges
                && !ranges.iter().any(|range| in_prefix(packet.src.0, *range))
            {
                return vec![untouched("drop_source_range", XDP_DROP)];
            }
            return self.to_service(frame, ingress, packet, frontend, ports);
        }

        let reply_key = EntryKey {
            src: packet.src,
            dst: packet.dst,
            proto: packet.proto,
            reply: true,
        };
        let mut effects = Vec::new();
        if let Some(entry) = self.entries.get(&reply_key) {
            let reopened = packet.tcp_flags & TCP_SYN != 0 && is_closed(entry.closed);
            if reopened {
                // The tuple now carries something else: forgotten, and the packet is not ours.
                // After source NAT the flow forgets its port with it: the original entry goes
                // too (another flow may claim the port next).
                effects.push((reply_key, None));
                if let Some(client) = entry.snat {
                    let original = EntryKey {
                        src: client,
                        dst: entry.nat,
                        proto: packet.proto,
                        reply: false,
                    };
                    if self
                        .entries
                        .get(&original)
                        .is_some_and(|flow| flow.snat == Some(packet.dst))
                    {
                        effects.push((original, None));
                    }
                }
            } else {
                // After source NAT the flow's client is the entry's, not this packet's
                // destination.
                let original = EntryKey {
                    src: entry.snat.unwrap_or(packet.dst),
                    dst: entry.nat,
                    proto: packet.proto,
                    reply: false,
                };
                effects.extend(self.touch(reply_key, *entry, original, packet.tcp_flags, true));
                let mut out = self.translate(frame, packet, Some(entry.nat), entry.snat, true);
                for result in &mut out {
                    result.effects.extend(effects.clone());
                }
                return self.forward(out, packet, ingress, Direction::Reply);
            }
        }
        let mut results = if self.world.cluster_ips.contains(&packet.dst.0) {
            self.reject(frame, packet, "reject_undefined_port")
        } else if self
            .world
            .service_cidrs
            .iter()
            .any(|cidr| in_prefix(packet.dst.0, *cidr))
        {
            vec![untouched("drop_unallocated_service_ip", XDP_DROP)]
        } else {
            vec![untouched("pass_no_service", XDP_PASS)]
        };
        for result in &mut results {
            result.effects.extend(effects.clone());
        }
        results
    }

    /// A packet to `frontend`'s address, port and protocol.
    fn to_service(
        &self,
        frame: &[u8],
        ingress: u32,
        packet: &Parsed,
        frontend: &Frontend,
        ports: SnatPorts,
    ) -> Vec<Expected> {
        let key = EntryKey {
            src: packet.src,
            dst: packet.dst,
            proto: packet.proto,
            reply: false,
        };
        let mut effects = Vec::new();
        let mut replacing = false;
        if let Some(entry) = self.entries.get(&key) {
            let new_connection = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let valid = frontend.backends.contains(&entry.nat);
            // The backend sees the flow from the client, or after source NAT from the node.
            let peer = EntryKey {
                src: entry.nat,
                dst: entry.snat.unwrap_or(packet.src),
                proto: packet.proto,
                reply: true,
            };
            if !(new_connection && is_closed(entry.closed)) && valid {
                effects.extend(self.touch(key, *entry, peer, packet.tcp_flags, false));
                let mut out = self.translate(frame, packet, entry.snat, Some(entry.nat), false);
                for result in &mut out {
                    result.effects.extend(effects.clone());
                }
                return self.forward(out, packet, ingress, Direction::Service);
            }
            // The old backend's reply entry goes (unless it is another flow's by now); the flow
            // gets a new one below.
            let ours = self.entries.get(&peer).is_some_and(|reply| {
                reply.nat == packet.dst && (entry.snat.is_none() || reply.snat == Some(packet.src))
            });
            if ours {
                effects.push((peer, None));
            }
            replacing = true;
        }
        if frontend.backends.is_empty() {
            let mut results = if frontend.drop_when_empty {
                vec![Expected::new(
                    XDP_DROP,
                    frame.to_vec(),
                    "drop_no_local_endpoint",
                )]
            } else {
                self.reject(frame, packet, "reject_no_endpoints")
            };
            for result in &mut results {
                result.effects.extend(effects.clone());
            }
            return results;
        }
        let closed = closing_bits(packet.tcp_flags);
        // Session affinity: the client's last new flow's backend, if it is still in the set.
        let affinity_id = (packet.src.0, (frontend.addr, frontend.port, frontend.proto));
        let remembered = (frontend.affinity_timeout_s != 0)
            .then(|| self.affinity.get(&affinity_id))
            .flatten()
            .filter(|backend| frontend.backends.contains(backend));
        let candidates: Vec<(Ipv4Addr, u16)> = match remembered {
            Some(backend) => vec![*backend],
            None => frontend.backends.clone(),
        };
        let mut all = Vec::new();
        for backend in &candidates {
            let remote = frontend.snat_remote && frontend.remote.contains(backend);
            let hairpin = packet.src.0 == backend.0;
            let snat = if remote || hairpin {
                let Some(source) = self.snat_source(backend.0) else {
                    let mut result = Expected::new(XDP_DROP, frame.to_vec(), "drop_snat_no_source");
                    if remembered.is_some() {
                        *result.counters.entry("affinity_hit").or_default() += 1;
                    }
                    result.effects.extend(effects.clone());
                    all.push(result);
                    continue;
                };
                // The program's choice, if it is free and in the range; else port 0, which no
                // result of the program can match.
                let port = ports(&key)
                    .filter(|port| SNAT_PORTS.contains(port))
                    .filter(|port| {
                        !self.entries.contains_key(&EntryKey {
                            src: *backend,
                            dst: (source, *port),
                            proto: packet.proto,
                            reply: true,
                        })
                    })
                    .unwrap_or(0);
                Some((source, port))
            } else {
                None
            };
            let mut out = self.translate(frame, packet, snat, Some(*backend), false);
            for result in &mut out {
                if frontend.affinity_timeout_s != 0 {
                    result.affinity = Some((affinity_id, *backend));
                }
                if remembered.is_some() {
                    *result.counters.entry("affinity_hit").or_default() += 1;
                }
                result.effects.extend(effects.clone());
                result.effects.push((
                    key,
                    Some(Entry {
                        nat: *backend,
                        closed,
                        snat,
                    }),
                ));
                result.effects.push((
                    EntryKey {
                        src: *backend,
                        dst: snat.unwrap_or(packet.src),
                        proto: packet.proto,
                        reply: true,
                    },
                    Some(Entry {
                        nat: packet.dst,
                        closed,
                        snat: snat.map(|_| packet.src),
                    }),
                ));
                *result.counters.entry("flow_created").or_default() += 1;
                if snat.is_some() {
                    *result.counters.entry("flow_snat").or_default() += 1;
                }
                if replacing {
                    *result.counters.entry("flow_reselected").or_default() += 1;
                }
            }
            all.extend(self.forward(out, packet, ingress, Direction::Service));
        }
        all
    }

    /// The address the node sends from towards `backend`: its own on the link whose subnet holds
    /// the backend (the lab has no other routes).
    fn snat_source(&self, backend: Ipv4Addr) -> Option<Ipv4Addr> {
        self.world
            .links
            .iter()
            .find(|link| in_prefix(backend, link.subnet))
            .and_then(|link| link.local.first().copied())
    }

    /// The FIN/RST a packet brings to a tracked flow, and a first reply, written to its entry and
    /// its peer's.
    fn touch(
        &self,
        key: EntryKey,
        entry: Entry,
        peer: EntryKey,
        tcp_flags: u8,
        reply: bool,
    ) -> Vec<(EntryKey, Option<Entry>)> {
        let answered = if reply { SEEN_REPLY } else { 0 };
        let closing = (closing_bits(tcp_flags) | answered) & !entry.closed;
        if closing == 0 {
            return Vec::new();
        }
        let mut effects = vec![(
            key,
            Some(Entry {
                closed: entry.closed | closing,
                ..entry
            }),
        )];
        if let Some(other) = self.entries.get(&peer) {
            effects.push((
                peer,
                Some(Entry {
                    closed: other.closed | entry.closed | closing,
                    ..*other
                }),
            ));
        }
        effects
    }

    /// `packet` with its source and destination rewritten to `src` and `dst` where given,
    /// checksums kept as they were.
    fn translate(
        &self,
        frame: &[u8],
        packet: &Parsed,
        src: Option<(Ipv4Addr, u16)>,
        dst: Option<(Ipv4Addr, u16)>,
        reply: bool,
    ) -> Vec<Expected> {
        let mut out = frame.to_vec();
        let (l3, l4) = (packet.l3, packet.l4);
        let ip_before = fold(sum(0, &frame[l3..l3 + packet.ihl]));
        // The checksum's data, reaching at least past the header's ports and checksum: a first
        // fragment's UDP header may lie beyond a datagram shorter than it (in the frame's
        // padding), and its words are changed all the same.
        let header = if packet.proto == IPPROTO_UDP {
            UDP_HLEN
        } else {
            TCP_MIN_HLEN
        };
        let segment = l4..l4 + packet.l4_len.max(header);
        let check = if packet.proto == IPPROTO_UDP {
            UDP_CHECK
        } else {
            TCP_CHECK
        };
        let l4_before = fold(sum(
            pseudo(packet.src.0, packet.dst.0, packet.proto, packet.l4_len),
            &frame[segment.clone()],
        ));
        for (to, addr_at, port_at) in [(src, l3 + IP_SRC, l4), (dst, l3 + IP_DST, l4 + 2)] {
            if let Some(to) = to {
                out[addr_at..addr_at + 4].copy_from_slice(&to.0.octets());
                out[port_at..port_at + 2].copy_from_slice(&to.1.to_be_bytes());
            }
        }
        keep_sum(&mut out[l3..l3 + packet.ihl], IP_CHECK, 0, ip_before);
        let mut checksums = vec![(l3 + IP_CHECK, false)];
        let udp = packet.proto == IPPROTO_UDP;
        if !(udp && be16(frame, l4 + check) == 0) {
            let new_src = src.map_or(packet.src.0, |to| to.0);
            let new_dst = dst.map_or(packet.dst.0, |to| to.0);
            let extra = pseudo(new_src, new_dst, packet.proto, packet.l4_len);
            keep_sum(&mut out[segment], check, extra, l4_before);
            checksums.push((l4 + check, udp));
        }
        let fragment = packet.first_fragment.then_some((
            (packet.src.0, packet.dst.0, packet.id, packet.proto),
            Fragment {
                src: src.map(|to| to.0),
                dst: dst.map(|to| to.0),
                reply,
            },
        ));
        vec![Expected {
            action: XDP_PASS,
            frame: out,
            checksums,
            counters: BTreeMap::new(),
            effects: Vec::new(),
            fragment,
            refuses_fragments: None,
            affinity: None,
        }]
    }

    /// A later fragment: translated as its datagram's first fragment was, if that is recorded
    /// and recent; else left alone.
    fn later_fragment(
        &self,
        frame: &[u8],
        ingress: u32,
        l3: usize,
        ihl: usize,
        tagged: bool,
        id: FragmentId,
    ) -> Vec<Expected> {
        let untouched = Expected::new(XDP_PASS, frame.to_vec(), "pass_fragment");
        if let Some(at) = self.refused.get(&id) {
            let age = at.elapsed();
            if age <= FRAGMENT_LIFETIME + FRAGMENT_CLOCK_SLACK {
                let mut results = vec![Expected::new(
                    XDP_DROP,
                    frame.to_vec(),
                    "drop_fragment_refused",
                )];
                if age > FRAGMENT_LIFETIME - FRAGMENT_CLOCK_SLACK {
                    results.push(untouched);
                }
                return results;
            }
            return vec![untouched];
        }
        let Some((fragment, at)) = self.fragments.get(&id) else {
            return vec![untouched];
        };
        let age = at.elapsed();
        if age > FRAGMENT_LIFETIME + FRAGMENT_CLOCK_SLACK {
            return vec![untouched];
        }
        let mut out = frame.to_vec();
        let before = fold(sum(0, &frame[l3..l3 + ihl]));
        for (addr, at_offset) in [(fragment.src, l3 + IP_SRC), (fragment.dst, l3 + IP_DST)] {
            if let Some(addr) = addr {
                out[at_offset..at_offset + 4].copy_from_slice(&addr.octets());
            }
        }
        keep_sum(&mut out[l3..l3 + ihl], IP_CHECK, 0, before);
        let translated = Expected {
            checksums: vec![(l3 + IP_CHECK, false)],
            ..Expected::new(XDP_PASS, out, "fragment_translated")
        };
        let packet = Parsed {
            first_fragment: false,
            id: id.2,
            l3,
            l4: l3 + ihl,
            ihl,
            l4_len: 0,
            tagged,
            proto: id.3,
            src: (id.0, 0),
            dst: (id.1, 0),
            tcp_flags: 0,
        };
        let direction = if fragment.reply {
            Direction::Reply
        } else {
            Direction::Service
        };
        let mut results = self.forward(vec![translated], &packet, ingress, direction);
        if age > FRAGMENT_LIFETIME - FRAGMENT_CLOCK_SLACK {
            results.push(untouched);
        }
        results
    }

    /// Sends translated packets on: XDP when the next hop is known and the packet may go,
    /// else the kernel stack with the reason.
    fn forward(
        &self,
        mut results: Vec<Expected>,
        packet: &Parsed,
        ingress: u32,
        direction: Direction,
    ) -> Vec<Expected> {
        for result in &mut results {
            let (redirect, tx, stack) = match direction {
                Direction::Service => ("redirect_service", "tx_service", "stack_service"),
                Direction::Reply => ("redirect_reply", "tx_reply", "stack_reply"),
            };
            let to_stack = |reason: &'static str, result: &mut Expected| {
                result.action = XDP_PASS;
                *result.counters.entry(stack).or_default() += 1;
                *result.counters.entry(reason).or_default() += 1;
            };
            if packet.tagged {
                to_stack("stack_vlan", result);
                continue;
            }
            let l3 = packet.l3;
            let dst = addr_at(&result.frame, l3 + IP_DST);
            let Some(link) = self
                .world
                .links
                .iter()
                .find(|link| in_prefix(dst, link.subnet) && !link.local.contains(&dst))
            else {
                to_stack("stack_no_route", result);
                continue;
            };
            let Some(neighbour) = link.neighbours.get(&dst) else {
                to_stack("stack_no_neighbour", result);
                continue;
            };
            let ttl = result.frame[l3 + IP_TTL];
            if ttl < MIN_FORWARD_TTL {
                to_stack("stack_ttl_exceeded", result);
                continue;
            }
            let before = fold(sum(0, &result.frame[l3..l3 + packet.ihl]));
            result.frame[l3 + IP_TTL] = ttl - 1;
            keep_sum(&mut result.frame[l3..l3 + packet.ihl], IP_CHECK, 0, before);
            result.frame[..6].copy_from_slice(neighbour);
            result.frame[6..12].copy_from_slice(&link.mac);
            let (action, counter) = if link.ifindex == ingress {
                (XDP_TX, tx)
            } else {
                (XDP_REDIRECT, redirect)
            };
            result.action = action;
            *result.counters.entry(counter).or_default() += 1;
        }
        results
    }

    /// ICMP port unreachable back to the sender, or a counted drop when it may not be answered.
    fn reject(&self, frame: &[u8], packet: &Parsed, counter: &'static str) -> Vec<Expected> {
        let first_octet = packet.src.0.octets()[0];
        let group_mac = frame[0] & 1 != 0;
        if first_octet == 0 || first_octet >= 224 || group_mac {
            return vec![Expected::new(
                XDP_DROP,
                frame.to_vec(),
                "drop_reject_not_unicast",
            )];
        }
        let l3 = packet.l3;
        let quote = &frame[l3..l3 + packet.ihl + QUOTED_L4_BYTES];
        let mut answer = frame[..l3].to_vec();
        answer[..6].copy_from_slice(&frame[6..12]);
        answer[6..12].copy_from_slice(&frame[..6]);
        let total = IPV4_MIN_HLEN + ICMP_HLEN + quote.len();
        let mut ip = [0u8; IPV4_MIN_HLEN];
        ip[0] = 0x45;
        ip[IP_TOS] = ICMP_PRECEDENCE | (frame[l3 + IP_TOS] & TOS_BITS);
        ip[IP_TOT_LEN..IP_TOT_LEN + 2].copy_from_slice(&(total as u16).to_be_bytes());
        ip[IP_TTL] = ICMP_TTL;
        ip[IP_PROTO] = IPPROTO_ICMP;
        ip[IP_SRC..IP_SRC + 4].copy_from_slice(&packet.dst.0.octets());
        ip[IP_DST..IP_DST + 4].copy_from_slice(&packet.src.0.octets());
        let ip_check = !fold(sum(0, &ip));
        ip[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check.to_be_bytes());
        let mut icmp = [0u8; ICMP_HLEN];
        icmp[0] = ICMP_DEST_UNREACHABLE;
        icmp[1] = ICMP_PORT_UNREACHABLE;
        let icmp_check = !fold(sum(sum(0, &icmp), quote));
        icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
        answer.extend_from_slice(&ip);
        answer.extend_from_slice(&icmp);
        answer.extend_from_slice(quote);
        let checksums = vec![(l3 + IP_CHECK, false), (l3 + IPV4_MIN_HLEN + 2, false)];
        // Every lab link is NIC-like: the answer leaves where the packet came in.
        vec![Expected {
            checksums,
            ..Expected::new(XDP_TX, answer, counter)
        }]
    }

    /// An ICMP error: about a packet of a tracked flow as it was translated, it is translated
    /// back (the quote as its receiver sent or got it, the error to the other end of the flow);
    /// about anything else, it is left alone. Conntrack does not change.
    fn icmp_error(&self, frame: &[u8], ingress: u32, error: &IcmpError) -> Vec<Expected> {
        let key = |reply| EntryKey {
            src: error.inner_dst,
            dst: error.inner_src,
            proto: error.inner_proto,
            reply,
        };
        // About a packet to a backend: its destination was the Service, and the error goes to
        // the client from the Service. About a reply: its source was the backend, and the error
        // goes to the backend. After source NAT the other end of the quote, and of the error,
        // changes too: the node's address and port become the client again, or the reverse.
        let (quote_src, quote_dst, outer_src, outer_dst, direction) =
            if let Some(entry) = self.entries.get(&key(true)) {
                (
                    entry.snat,
                    Some(entry.nat),
                    Some(entry.nat.0),
                    entry.snat.map(|client| client.0),
                    Direction::Reply,
                )
            } else if let Some(entry) = self.entries.get(&key(false)) {
                (
                    Some(entry.nat),
                    entry.snat,
                    entry.snat.map(|node| node.0),
                    Some(entry.nat.0),
                    Direction::Service,
                )
            } else {
                return vec![Expected::new(XDP_PASS, frame.to_vec(), "pass_not_tcp_udp")];
            };
        let mut out = frame.to_vec();
        let icmp_before = fold(sum(0, &frame[error.icmp.clone()]));
        let inner = error.inner_l3..error.inner_l3 + error.inner_ihl;
        let inner_before = fold(sum(0, &frame[inner.clone()]));
        let changes: Vec<QuoteChange> = [
            (
                error.inner_src,
                quote_src,
                error.inner_l3 + IP_SRC,
                error.inner_l4,
            ),
            (
                error.inner_dst,
                quote_dst,
                error.inner_l3 + IP_DST,
                error.inner_l4 + 2,
            ),
        ]
        .into_iter()
        .filter_map(|(old, new, addr_at, port_at)| new.map(|new| (old, new, addr_at, port_at)))
        .collect();
        let udp = error.inner_proto == IPPROTO_UDP;
        let check_at = error.inner_l4 + if udp { UDP_CHECK } else { TCP_CHECK };
        let mut checksums = vec![
            (error.l3 + IP_CHECK, false),
            (error.inner_l3 + IP_CHECK, false),
            (error.icmp.start + 2, false),
        ];
        // The quoted L4 checksum, where the quote holds it: only the addresses and ports it
        // covers changed; the rest of its data, which the quote may not hold, did not.
        let l4_check = (check_at + 2 <= error.icmp.end && check_at + 2 <= frame.len())
            .then(|| be16(frame, check_at))
            .filter(|check| !(udp && *check == 0));
        for (_, to, addr_at, port_at) in &changes {
            out[*addr_at..*addr_at + 4].copy_from_slice(&to.0.octets());
            out[*port_at..*port_at + 2].copy_from_slice(&to.1.to_be_bytes());
        }
        keep_sum(&mut out[inner], IP_CHECK, 0, inner_before);
        if let Some(before) = l4_check {
            // check = ~(rest + old words) before; ~(rest + new words) after.
            let mut rest = u64::from(!before);
            let mut added = 0;
            for (old, to, _, _) in &changes {
                rest += u64::from(!fold(sum(0, &old.0.octets()))) + u64::from(!old.1);
                added += sum(0, &to.0.octets()) + u64::from(to.1);
            }
            let after = !fold(u64::from(fold(rest)) + added);
            out[check_at..check_at + 2].copy_from_slice(&after.to_be_bytes());
            checksums.push((check_at, udp));
        }
        let icmp_check = error.icmp.start + 2;
        out[icmp_check..icmp_check + 2].fill(0);
        let rest = fold(sum(0, &out[error.icmp.clone()]));
        let check = fold(u64::from(icmp_before) + u64::from(!rest));
        out[icmp_check..icmp_check + 2].copy_from_slice(&check.to_be_bytes());
        let outer_before = fold(sum(0, &frame[error.l3..error.l3 + error.ihl]));
        for (to, at) in [(outer_src, IP_SRC), (outer_dst, IP_DST)] {
            if let Some(to) = to {
                out[error.l3 + at..error.l3 + at + 4].copy_from_slice(&to.octets());
            }
        }
        keep_sum(
            &mut out[error.l3..error.l3 + error.ihl],
            IP_CHECK,
            0,
            outer_before,
        );
        let translated = Expected {
            checksums,
            ..Expected::new(XDP_PASS, out, "icmp_error_translated")
        };
        let outer = Parsed {
            first_fragment: false,
            id: 0,
            l3: error.l3,
            l4: error.icmp.start,
            ihl: error.ihl,
            l4_len: 0,
            tagged: error.tagged,
            proto: IPPROTO_ICMP,
            src: (addr_at(frame, error.l3 + IP_SRC), 0),
            dst: (addr_at(frame, error.l3 + IP_DST), 0),
            tcp_flags: 0,
        };
        self.forward(vec![translated], &outer, ingress, direction)
    }

    /// Applies the effects of the result the program chose.
    pub fn commit(&mut self, result: &Expected) {
        if let Some((id, fragment)) = result.fragment {
            self.fragments.insert(id, (fragment, Instant::now()));
            self.refused.remove(&id);
        }
        if let Some((id, backend)) = result.affinity {
            self.affinity.insert(id, backend);
        }
        if let Some(id) = result.refuses_fragments {
            self.refused.insert(id, Instant::now());
            self.fragments.remove(&id);
        }
        for (key, entry) in &result.effects {
            match entry {
                Some(entry) => {
                    self.entries.insert(*key, *entry);
                }
                None => {
                    self.entries.remove(key);
                }
            }
        }
    }

    /// Whether `frame` is `expected`'s frame, checksums compared as numbers.
    pub fn same_frame(expected: &Expected, frame: &[u8]) -> bool {
        if frame.len() != expected.frame.len() {
            return false;
        }
        let checksum_at = |offset: usize| expected.checksums.iter().find(|(at, _)| *at == offset);
        let mut offset = 0;
        while offset < frame.len() {
            if let Some((_, udp)) = checksum_at(offset) {
                let (want, got) = (be16(&expected.frame, offset), be16(frame, offset));
                let zero = |value: u16| value == 0 || value == 0xffff;
                let same = want == got || (zero(want) && zero(got));
                if !same || (*udp && got == 0) {
                    return false;
                }
                offset += 2;
                continue;
            }
            if frame[offset] != expected.frame[offset] {
                return false;
            }
            offset += 1;
        }
        true
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Service,
    Reply,
}

/// Whether a FIN or a RST was seen on the flow.
fn is_closed(bits: u8) -> bool {
    bits & (SEEN_FIN | SEEN_RST) != 0
}

fn closing_bits(tcp_flags: u8) -> u8 {
    let mut bits = 0;
    if tcp_flags & TCP_FIN != 0 {
        bits |= SEEN_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        bits |= SEEN_RST;
    }
    bits
}

/// Whether `kind` is an ICMP type that quotes a packet (exported for the generator, which must
/// not send those: the model leaves their translation to the fixtures).
pub fn is_icmp_error(kind: u8) -> bool {
    ICMP_ERROR_TYPES.contains(&kind)
}
