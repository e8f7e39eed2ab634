//! Connection-tracking map types and the pure expiry rule both sides apply.
//!
//! Every translated flow has two entries in one LRU map: the *original* entry keyed by the
//! client's tuple towards the Service (client -> VIP), giving the chosen backend; and the *reply*
//! entry keyed by the backend's tuple towards the client (backend -> client), giving the VIP and
//! port to restore as the reply's source. Each direction refreshes its own entry, so the LRU keeps
//! exactly the flows that carry traffic.
//!
//! A flow with source NAT (a remote endpoint of external traffic, or a hairpin) also rewrites the
//! client's side: the original entry gives the node address and port the packet leaves from, and
//! the reply entry, keyed by the backend's tuple towards that address and port, gives the client
//! to restore as the reply's destination.

use bytemuck::{Pod, Zeroable};

use crate::net::IPPROTO_TCP;

/// `FlowKey::direction` of the client -> Service entry.
pub const DIRECTION_ORIGINAL: u8 = 0;
/// `FlowKey::direction` of the backend -> client entry.
pub const DIRECTION_REPLY: u8 = 1;

/// Key of `LB_CONNTRACK`. Written by the datapath (new flows), read by both sides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FlowKey {
    /// Source address as seen in the packet, network byte order.
    pub src_addr: u32,
    /// Destination address as seen in the packet, network byte order.
    pub dst_addr: u32,
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `DIRECTION_ORIGINAL` or `DIRECTION_REPLY`.
    pub direction: u8,
    /// Always zero: keys are compared bytewise.
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key of a packet from `src:src_port` to `dst:dst_port` (all in network byte order).
    #[inline(always)]
    pub const fn new(
        (src_addr, src_port): (u32, u16),
        (dst_addr, dst_port): (u32, u16),
        proto: u8,
        direction: u8,
    ) -> Self {
        FlowKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            direction,
            _pad: [0; 2],
        }
    }
}

/// `FlowState::tcp_flags`: a FIN was seen in either direction (both entries of a flow carry it).
pub const SEEN_FIN: u8 = 1;
/// `FlowState::tcp_flags`: a RST was seen in either direction.
pub const SEEN_RST: u8 = 2;
/// `FlowState::tcp_flags` (for UDP too): a packet of the reply direction was seen. Until then
/// the flow lives only as long as netfilter keeps an unanswered one, so that traffic nobody
/// answers (a SYN flood, a scan) cannot hold conntrack entries, and source NAT ports, for a day.
pub const SEEN_REPLY: u8 = 4;

/// Value of `LB_CONNTRACK`. Written by the datapath; userspace only reads (and may delete).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowState {
    /// Original entry: the backend address to rewrite the destination to. Reply entry: the
    /// Service address to rewrite the source to. Network byte order.
    pub nat_addr: u32,
    /// The port counterpart of `nat_addr`, network byte order.
    pub nat_port: u16,
    /// `SEEN_FIN` / `SEEN_RST` / `SEEN_REPLY` bits of the flow, in either direction (see
    /// `lb-ebpf`'s `select` module: both entries of a flow are kept in step).
    pub tcp_flags: u8,
    /// Always zero.
    pub _pad: u8,
    /// Backend chosen for the flow; an original entry is only honoured while `LB_BACKENDS` still
    /// holds this id with the same address and port.
    pub backend_id: u32,
    /// Service frontend of the flow (`ServiceValue::service_id`).
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the flow's last packet in either direction, refreshed at most
    /// every `REFRESH_INTERVAL_NS`.
    pub last_seen_ns: u64,
    /// Source NAT. Original entry: the node address to rewrite the source to. Reply entry: the
    /// client address to restore as the destination. 0: the flow keeps the client's address.
    /// Network byte order.
    pub snat_addr: u32,
    /// The port counterpart of `snat_addr` (a port in `SNAT_PORTS` on the original entry),
    /// network byte order.
    pub snat_port: u16,
    /// Always zero.
    pub _pad2: u16,
}

/// Source ports a flow with source NAT may leave the node from (host order): above Linux's
/// default ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999) and the NodePort range,
/// so that a translated flow's replies do not take the port of a node socket's connection (a
/// socket bound there explicitly, or a widened ephemeral range, still could: the agent warns
/// about the latter). The port is unique per backend tuple, so each backend takes this many flows
/// per protocol.
pub const SNAT_PORTS: core::ops::RangeInclusive<u16> = 61_000..=65_535;

/// Key of `LB_FRAGMENTS`: one IPv4 datagram in fragments, as reassembly identifies it (RFC 791),
/// with the addresses its fragments carry on arrival. Written by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FragmentKey {
    /// Source address, network byte order.
    pub src_addr: u32,
    /// Destination address, network byte order.
    pub dst_addr: u32,
    /// The IPv4 identification, as in the packet.
    pub id: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Always zero: keys are compared bytewise.
    pub _pad: u8,
}

/// `FragmentValue::kind`: the datagram goes to a Service (towards a backend).
pub const FRAGMENT_SERVICE: u8 = 0;
/// `FragmentValue::kind`: the datagram is a backend's reply.
pub const FRAGMENT_REPLY: u8 = 1;
/// `FragmentValue::kind`: the first fragment was rejected or dropped, and so are the later ones
/// (addresses unused): left to the stack, they would be routed on still addressed to the Service.
pub const FRAGMENT_REFUSED: u8 = 2;

/// Value of `LB_FRAGMENTS`: how the datagram's first fragment was translated, for the later
/// fragments (which carry no ports) to follow. Written by the datapath; userspace only reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragmentValue {
    /// The address the first fragment's source was rewritten to; 0: kept. Network byte order.
    pub src_addr: u32,
    /// The address the first fragment's destination was rewritten to; 0: kept. Network byte
    /// order.
    pub dst_addr: u32,
    /// `FRAGMENT_SERVICE`, `FRAGMENT_REPLY` or `FRAGMENT_REFUSED`.
    pub kind: u8,
    /// Always zero.
    pub _pad: [u8; 7],
    /// `bpf_ktime_get_ns()` when the first fragment passed.
    pub created_ns: u64,
}

/// How long after its first fragment a datagram's later fragments are still translated: Linux's
/// reassembly timeout (`net.ipv4.ipfrag_time`, 30 s). An IPv4 identification reused after that is
/// another datagram.
pub const FRAGMENT_LIFETIME_NS: u64 = 30 * NS_PER_SEC;

const _: () = {
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<FlowState>() == 40);
    assert!(size_of::<FragmentKey>() == 12);
    assert!(size_of::<FragmentValue>() == 24);
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Idle lifetime of an established TCP flow: kube-proxy's `--conntrack-tcp-timeout-established`
/// default (24 h).
pub const TCP_ESTABLISHED_LIFETIME_NS: u64 = 86_400 * NS_PER_SEC;
/// Idle lifetime of a TCP flow after a FIN or RST (netfilter's TIME_WAIT, 120 s).
pub const TCP_CLOSING_LIFETIME_NS: u64 = 120 * NS_PER_SEC;
/// Idle lifetime of a UDP flow (netfilter's `nf_conntrack_udp_timeout_stream`, 120 s).
pub const UDP_LIFETIME_NS: u64 = 120 * NS_PER_SEC;
/// Idle lifetime of a TCP flow no reply has been seen for (netfilter's SYN_SENT, 120 s).
pub const TCP_UNREPLIED_LIFETIME_NS: u64 = 120 * NS_PER_SEC;
/// Idle lifetime of a UDP flow no reply has been seen for (netfilter's
/// `nf_conntrack_udp_timeout`, 30 s).
pub const UDP_UNREPLIED_LIFETIME_NS: u64 = 30 * NS_PER_SEC;
/// `last_seen_ns` is rewritten at most this often, so that a busy flow does not dirty its cache
/// line on every packet from every CPU.
pub const REFRESH_INTERVAL_NS: u64 = NS_PER_SEC;

/// How long an entry may stay idle before it no longer pins its flow.
#[inline(always)]
pub const fn lifetime_ns(proto: u8, tcp_flags: u8) -> u64 {
    if tcp_flags & SEEN_REPLY == 0 {
        if proto == IPPROTO_TCP {
            TCP_UNREPLIED_LIFETIME_NS
        } else {
            UDP_UNREPLIED_LIFETIME_NS
        }
    } else if proto == IPPROTO_TCP {
        if tcp_flags & (SEEN_FIN | SEEN_RST) != 0 {
            TCP_CLOSING_LIFETIME_NS
        } else {
            TCP_ESTABLISHED_LIFETIME_NS
        }
    } else {
        UDP_LIFETIME_NS
    }
}

/// Whether an entry has been idle longer than its lifetime at `now_ns`.
#[inline(always)]
pub const fn is_expired(state: &FlowState, proto: u8, now_ns: u64) -> bool {
    now_ns.saturating_sub(state.last_seen_ns) > lifetime_ns(proto, state.tcp_flags)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]` and `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::IPPROTO_UDP;

    #[test]
    fn lifetimes_follow_protocol_and_tcp_state() {
        let mut state = FlowState {
            last_seen_ns: 10 * NS_PER_SEC,
            ..FlowState::default()
        };
        let after = |secs: u64| 10 * NS_PER_SEC + secs * NS_PER_SEC + 1;
        // Unanswered: netfilter's short lifetimes.
        assert!(!is_expired(&state, IPPROTO_UDP, after(29)));
        assert!(is_expired(&state, IPPROTO_UDP, after(30)));
        assert!(!is_expired(&state, IPPROTO_TCP, after(119)));
        assert!(is_expired(&state, IPPROTO_TCP, after(120)));
        state.tcp_flags = SEEN_REPLY;
        assert!(!is_expired(&state, IPPROTO_UDP, after(119)));
        assert!(is_expired(&state, IPPROTO_UDP, after(120)));
        assert!(!is_expired(&state, IPPROTO_TCP, after(86_399)));
        assert!(is_expired(&state, IPPROTO_TCP, after(86_400)));
        state.tcp_flags = SEEN_REPLY | SEEN_FIN;
        assert!(is_expired(&state, IPPROTO_TCP, after(120)));
        // A clock that seems to run backwards (entry written on another CPU a moment later)
        // never expires an entry.
        assert!(!is_expired(&state, IPPROTO_TCP, 0));
    }
}
