//! The counters of `LB_STATS`, a per-CPU array of `u64` indexed by [`Counter`].
//!
//! Every packet the program sees bumps exactly one *verdict* counter (the `Pass*`, `Redirect*`,
//! `Tx*`, `Stack*Service/Reply`, `Drop*` and `Reject*` ones), so their sum is the number of packets
//! processed. *Event* counters say why or what else happened (a flow was created, a rewritten
//! packet went to the kernel stack because its neighbour is unresolved, ...) and may bump
//! alongside a verdict.

/// What a counter records; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// Exactly one per packet; the packet left the program with `XDP_PASS` untouched.
    Pass,
    /// Exactly one per packet; the packet was rewritten and left with `XDP_REDIRECT` or `XDP_TX`.
    Forward,
    /// Exactly one per packet; the packet was rewritten and left with `XDP_PASS` for the kernel
    /// to route.
    Stack,
    /// Exactly one per packet; the packet was dropped.
    Drop,
    /// Exactly one per packet; the packet was answered with an ICMP error built in its place and
    /// sent back out of the interface it came in on (`XDP_TX` or a redirect, else through the
    /// kernel stack: see `reject_via_stack`), as kube-proxy's REJECT does.
    Reject,
    /// Any number per packet.
    Event,
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $variant:ident = $index:literal, $name:literal, $kind:ident;)*) => {
        /// Index into `LB_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])* $variant = $index,)*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Stable snake_case name, used by the CLI and in metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }

            /// What the counter records.
            pub const fn kind(self) -> CounterKind {
                match self {
                    $(Counter::$variant => CounterKind::$kind,)*
                }
            }
        }
    };
}

counters! {
    /// Not IPv4 (ARP, IPv6, LLDP, ...).
    PassNotIpv4 = 0, "pass_not_ipv4", Pass;
    /// IPv4 but neither TCP nor UDP, nor an ICMP error about a translated flow (pings, ICMP
    /// errors about other traffic, other protocols).
    PassNotTcpUdp = 1, "pass_not_tcp_udp", Pass;
    /// A later IPv4 fragment (no ports) of a datagram whose first fragment this node did not
    /// translate in the last 30 s: not a Service's, or it arrived before its first fragment.
    PassFragment = 2, "pass_fragment", Pass;
    /// TCP/UDP to no Service and not a reply of a tracked flow.
    PassNoService = 3, "pass_no_service", Pass;
    /// To a Service: translated and redirected to another interface.
    RedirectService = 4, "redirect_service", Forward;
    /// A backend's reply: translated and redirected to another interface.
    RedirectReply = 5, "redirect_reply", Forward;
    /// To a Service: translated and sent back out of the interface it came in on.
    TxService = 6, "tx_service", Forward;
    /// A backend's reply: translated and sent back out of the interface it came in on.
    TxReply = 7, "tx_reply", Forward;
    /// To a Service: translated and handed to the kernel to route (see the `stack_*` events).
    StackService = 8, "stack_service", Stack;
    /// A backend's reply: translated and handed to the kernel to route.
    StackReply = 9, "stack_reply", Stack;
    /// Truncated or invalid Ethernet, IPv4, TCP or UDP header.
    DropMalformed = 10, "drop_malformed", Drop;
    /// To a frontend whose Service has endpoints, none of them on this node, under a `Local`
    /// traffic policy: dropped, as kube-proxy does (a Service with no endpoints at all rejects).
    DropNoLocalEndpoint = 11, "drop_no_local_endpoint", Drop;
    /// The Service's backend set points at a slot or backend that is not there (a set switch raced
    /// with the packet, or the maps were edited by hand).
    DropBackendMissing = 12, "drop_backend_missing", Drop;
    /// A new flow was recorded in conntrack.
    FlowCreated = 13, "flow_created", Event;
    /// A tracked flow got a new backend: its old one was removed, it expired, or a new TCP
    /// connection reused the tuple of a closed one. Counted only when the new choice is made.
    FlowReselected = 14, "flow_reselected", Event;
    /// Recording a new flow failed; the packet was still forwarded.
    FlowInsertFailed = 15, "flow_insert_failed", Event;
    /// A rewritten packet carried a partial checksum (sent by a local socket with offload): the
    /// kernel must finish it, so the packet was not redirected.
    StackPartialChecksum = 16, "stack_partial_checksum", Event;
    /// A rewritten packet was VLAN-tagged; the kernel routes those.
    StackVlan = 17, "stack_vlan", Event;
    /// The FIB had no forwarding route (local, unreachable, forwarding disabled, ...).
    StackNoRoute = 18, "stack_no_route", Event;
    /// The next hop's neighbour entry is not resolved yet; the kernel resolves it.
    StackNoNeighbour = 19, "stack_no_neighbour", Event;
    /// The packet is larger than the egress MTU without DF (or an ICMP error); the kernel
    /// fragments it.
    StackFragNeeded = 20, "stack_frag_needed", Event;
    /// TTL would expire; the kernel answers ICMP time exceeded.
    StackTtlExceeded = 21, "stack_ttl_exceeded", Event;
    /// The egress interface is not one the agent manages (not in `LB_TX_PORTS`).
    StackNotTxPort = 22, "stack_not_tx_port", Event;
    /// A new flow's translated tuple would have collided with another live flow (the same client
    /// port reaching the same endpoint through another Service) at every backend tried.
    DropTupleCollision = 23, "drop_tuple_collision", Drop;
    /// A new flow's first choice of backend collided with another live flow; another was chosen.
    FlowCollisionAvoided = 24, "flow_collision_avoided", Event;
    /// To a Service with no usable endpoint: answered with ICMP port unreachable.
    RejectNoEndpoints = 25, "reject_no_endpoints", Reject;
    /// To a ClusterIP on a port its Service does not define: answered with ICMP port
    /// unreachable (kube-proxy's nftables mode does the same).
    RejectUndefinedPort = 26, "reject_undefined_port", Reject;
    /// To an address inside a service CIDR (`lb agent --service-cidr`) that no Service holds.
    DropUnallocatedServiceIp = 27, "drop_unallocated_service_ip", Drop;
    /// A reject was due but this CPU had already sent its ICMP errors for the current second
    /// (`lb agent --reject-rate`): dropped instead, so the node cannot be made a reflector.
    DropRejectRateLimited = 28, "drop_reject_rate_limited", Drop;
    /// A reject was due but the packet came from a non-unicast source address or was sent to a
    /// link-layer group address: no ICMP error may answer those (RFC 1122 3.2.2), so dropped.
    DropRejectNotUnicast = 29, "drop_reject_not_unicast", Drop;
    /// A reject was due but the kernel refused to resize the frame for the ICMP error.
    DropRejectFailed = 30, "drop_reject_failed", Drop;
    /// An ICMP error was handed to the kernel to send back: it arrived on a veth that may not
    /// be sent back on directly (`IFACE_NO_XDP_TX`, and no redirect allowed).
    RejectViaStack = 31, "reject_via_stack", Event;
    /// A new flow went to its client's previous endpoint through session affinity.
    AffinityHit = 32, "affinity_hit", Event;
    /// Recording a session-affinity choice failed; the flow was still forwarded.
    AffinityInsertFailed = 33, "affinity_insert_failed", Event;
    /// To a load balancer IP from a client outside the Service's `loadBalancerSourceRanges`.
    DropSourceRange = 34, "drop_source_range", Drop;
    /// A translated packet with DF set was too big for its next hop: answered with ICMP
    /// fragmentation needed quoting it as its sender sent it, so path-MTU discovery works
    /// through the Service.
    RejectFragNeeded = 35, "reject_frag_needed", Reject;
    /// An ICMP error about a translated flow was translated back and sent on (its verdict is
    /// counted as a service packet's or a reply's).
    IcmpErrorTranslated = 36, "icmp_error_translated", Event;
    /// A later fragment followed its datagram's first fragment's translation (its verdict is
    /// counted as a service packet's or a reply's).
    FragmentTranslated = 37, "fragment_translated", Event;
    /// Recording a first fragment's translation failed: its later fragments will pass
    /// untranslated.
    FragmentInsertFailed = 38, "fragment_insert_failed", Event;
    /// A node socket's `connect()` or `sendmsg()` to a frontend went to a backend instead
    /// (socket hooks; no packet verdict).
    SockTranslated = 39, "sock_translated", Event;
    /// A node socket's `connect()` or `sendmsg()` to a frontend without endpoints was refused.
    SockRefused = 40, "sock_refused", Event;
    /// Recording a node socket's translation failed: it sees the backend as its peer.
    SockRevNatInsertFailed = 41, "sock_revnat_insert_failed", Event;
    /// A later fragment of a datagram whose first fragment was rejected or dropped.
    DropFragmentRefused = 42, "drop_fragment_refused", Drop;
    /// A new flow got source NAT: external traffic to an endpoint on another node
    /// (`externalTrafficPolicy: Cluster`), or a hairpin (an endpoint reaching itself through its
    /// Service).
    FlowSnat = 43, "flow_snat", Event;
    /// A new flow needing source NAT found no free port towards its endpoint among the tries
    /// (`SNAT_PORTS`, shared by the endpoint's flows from this node).
    DropSnatNoPort = 44, "drop_snat_no_port", Drop;
    /// A new flow needing source NAT found no route to its endpoint to take a source address
    /// from.
    DropSnatNoSource = 45, "drop_snat_no_source", Drop;
    /// A new flow with source NAT could not be recorded in conntrack (the insert failed, or
    /// another CPU's record of it vanished): dropped, since its replies could not be translated
    /// back; the client's retransmission starts it again.
    DropFlowUntracked = 46, "drop_flow_untracked", Drop;
}

/// Number of entries in `LB_STATS`.
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

/// Bits in `explain::Trace::events`: one per counter.
pub const EVENT_BITS: u32 = u64::BITS;
const _: () = assert!(
    COUNTER_COUNT <= EVENT_BITS,
    "a trace has one event bit per counter"
);

impl Counter {
    /// The counter with index `index`, if there is one.
    pub fn from_index(index: u32) -> Option<Counter> {
        Counter::ALL.get(index as usize).copied()
    }
}

/// Traffic through one backend (value of `LB_BE_TRAFFIC`, an array indexed by backend id), or
/// the translated part of a frontend's (inside [`ServiceTraffic`]). Shared by every CPU: the
/// program adds with atomic instructions, so the memory does not grow with the CPU count (a
/// per-CPU array of every possible backend would cost tens of MiB per CPU). Userspace zeroes an
/// id's entry when it frees the id, so a reused id starts from zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Traffic {
    /// Packets translated towards the backend (client to Service).
    pub packets: u64,
    /// Their bytes, IPv4 header included (as iptables counts), Ethernet excluded.
    pub bytes: u64,
    /// Replies from the backend translated back to the client.
    pub reply_packets: u64,
    /// Their bytes, IPv4 header included.
    pub reply_bytes: u64,
    /// New flows given to the backend (recorded in conntrack).
    pub flows: u64,
}

/// Value of `LB_SVC_TRAFFIC`, an array indexed by service id (`ServiceValue::service_id`): the
/// traffic of one frontend. Kept apart from the backends' so that a frontend's counters never go
/// backwards when one of its endpoints leaves. Shared by every CPU, added to atomically, zeroed
/// by userspace when it frees the id, like [`Traffic`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceTraffic {
    /// What was translated, both ways.
    pub traffic: Traffic,
    /// Packets to the frontend that were not translated: dropped or rejected (no endpoint, a
    /// `Local` policy with none here, outside the source ranges, no source NAT port...). The
    /// reasons are the node-wide drop and reject counters.
    pub refused: u64,
}

const _: () = {
    assert!(size_of::<Traffic>() == 40);
    assert!(size_of::<ServiceTraffic>() == 48);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]` and `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::ServiceTraffic {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (position, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as u32 as usize, position, "{counter:?}");
            for other in &Counter::ALL[position + 1..] {
                assert_ne!(counter.name(), other.name());
            }
        }
    }
}
