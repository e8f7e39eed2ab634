//! Service, backend-set and backend map types.
//!
//! Lookup chain in the datapath (the layout Katran and Cilium converge on):
//! `LB_SERVICES[ServiceKey] -> ServiceValue{backend_set, backend_count}`,
//! `LB_SLOTS[SlotKey{backend_set, slot}] -> backend id`, `LB_BACKENDS[id] -> Backend`.
//!
//! A Service's backends are switched in one write (make-before-break): userspace writes the
//! slots of a fresh `backend_set` first, then the `ServiceValue` pointing at it, and only then
//! deletes the old set's slots. A packet never sees half a set.

use bytemuck::{Pod, Zeroable};

/// Key of `LB_SERVICES`: one Service frontend. Written by userspace, read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Virtual IPv4 address (ClusterIP), network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// IP protocol number (`IPPROTO_TCP` or `IPPROTO_UDP`).
    pub proto: u8,
    /// Always zero: keys are compared bytewise.
    pub _pad: u8,
}

/// Value of `LB_SERVICES`. Written by userspace, read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Stable id of this frontend, `< MAX_SERVICES`; keys `LB_SVC_INFO` and is copied into
    /// conntrack entries.
    pub service_id: u32,
    /// Id of the backend set in `LB_SLOTS` currently serving this frontend. Changes on every
    /// backend-set switch; 0 exactly when `backend_count` is 0 (no set).
    pub backend_set: u32,
    /// Number of slots (`0..backend_count`) in the backend set. 0 means no endpoints.
    pub backend_count: u32,
    /// `SERVICE_*` policy bits.
    pub flags: u32,
    /// `sessionAffinity: ClientIP`: a client's new flows go to the endpoint its last new flow
    /// got, for this many seconds after that flow started (`timeoutSeconds`, 10800 by
    /// default), through `LB_AFFINITY`. 0: no affinity.
    pub affinity_timeout_s: u32,
}

/// `ServiceValue::flags`: the frontend has no backends because a `Local` traffic policy left
/// none on this node, though the Service has endpoints elsewhere: packets are dropped, as
/// kube-proxy drops them. Without it, a frontend with no backends rejects: the client gets ICMP
/// port unreachable and fails at once instead of timing out.
pub const SERVICE_DROP_WHEN_EMPTY: u32 = 1;

/// `ServiceValue::flags`: the frontend only accepts clients inside its Service's
/// `loadBalancerSourceRanges`, listed in `LB_SOURCE_RANGES` under its service id; packets from
/// other sources are dropped. Set on load balancer ingress IPs only, as kube-proxy does.
pub const SERVICE_SOURCE_RANGES: u32 = 2;

/// `ServiceValue::flags`: external traffic (NodePort, load balancer IP, externalIP) with
/// `externalTrafficPolicy: Cluster`: a flow sent to an endpoint on another node leaves with the
/// node's address as its source (`BACKEND_REMOTE`), so that the endpoint's replies come back
/// through this node to be translated, as kube-proxy masquerades them. The client's address is
/// lost to that endpoint; `Local` keeps it.
pub const SERVICE_SNAT_REMOTE: u32 = 4;

/// The data of an `LB_SOURCE_RANGES` key (after the LPM prefix length): the frontend, matched
/// in full, then the client address, matched over the range's prefix. The key's prefix length is
/// therefore `SOURCE_RANGE_ID_BITS` plus the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// The frontend (`ServiceValue::service_id`), network byte order so that the trie matches
    /// its bytes in significance order like the address's.
    pub service_id_be: u32,
    /// The range's network address (lookups: the client's address), network byte order.
    pub addr: u32,
}

/// Bits of `SourceRangeKey` before the address: the service id, always matched whole.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;
/// Bits of a whole `SourceRangeKey`: the prefix length of a lookup.
pub const SOURCE_RANGE_KEY_BITS: u32 = 64;
/// Value of `LB_SOURCE_RANGES`: the range admits its clients. (The trie is a set.)
pub const SOURCE_RANGE_ALLOWED: u32 = 1;

/// Value of `LB_CLUSTER_IPS` (key: the ClusterIP, network byte order): the ClusterIP belongs to
/// a Service, so a TCP or UDP packet to it on a port with no frontend is rejected rather than
/// passed to a stack that has no such address. Written by userspace, read by the datapath.
pub const CLUSTER_IP_ALLOCATED: u32 = 1;

/// Key of `LB_SLOTS`. Written by userspace, read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SlotKey {
    /// The backend set this slot belongs to (`ServiceValue::backend_set`).
    pub backend_set: u32,
    /// Position in the set, `0..backend_count`.
    pub slot: u32,
}

/// `Backend::flags`: the entry describes a live backend. Cleared entries are all zero.
pub const BACKEND_ACTIVE: u8 = 1;
/// `Backend::flags`: the endpoint is listed but takes no new flows (not ready, or terminating
/// while others are ready): it has no slot, its established flows continue, and session
/// affinity no longer leads to it.
pub const BACKEND_DRAINING: u8 = 2;
/// `Backend::flags`: the endpoint runs on another node (its EndpointSlice `nodeName` is not this
/// node's, or is unset; never set when the agent has no node name): external traffic to it gets
/// source NAT where the frontend says so (`SERVICE_SNAT_REMOTE`).
pub const BACKEND_REMOTE: u8 = 4;
/// `Backend::flags`, informational (the datapath never reads it; `lb backends` does): the
/// endpoint's EndpointSlice condition `ready` (unset counts as ready, as the API documents), so
/// that the conditions behind a backend's slot or draining state show while the agent is down.
pub const BACKEND_READY: u8 = 8;
/// `Backend::flags`, informational like `BACKEND_READY`: the condition `serving` (unset: as
/// `ready`).
pub const BACKEND_SERVING: u8 = 16;
/// `Backend::flags`, informational like `BACKEND_READY`: the condition `terminating`.
pub const BACKEND_TERMINATING: u8 = 32;
/// The informational `Backend::flags` bits: the endpoint's conditions.
pub const BACKEND_CONDITIONS: u8 = BACKEND_READY | BACKEND_SERVING | BACKEND_TERMINATING;

/// Value of `LB_BACKENDS` (an array indexed by backend id). Written by userspace, read by the
/// datapath. A backend belongs to exactly one Service frontend, so removing an endpoint from one
/// Service never disturbs another Service that happens to share the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend {
    /// Endpoint IPv4 address, network byte order.
    pub addr: u32,
    /// Endpoint port (the resolved targetPort), network byte order.
    pub port: u16,
    /// `BACKEND_*` bits: `BACKEND_ACTIVE` when in use.
    pub flags: u8,
    /// Always zero.
    pub _pad: u8,
    /// The frontend this backend serves (`ServiceValue::service_id`), for inspection.
    pub service_id: u32,
}

/// Longest DNS label Kubernetes allows in a namespace, Service or Service port name.
pub const MAX_LABEL_LEN: usize = 63;
/// Size of a name field in `ServiceInfo`: a label plus a NUL.
pub const NAME_LEN: usize = MAX_LABEL_LEN + 1;
/// Size of the port-name field: Service port names are DNS labels too.
pub const PORT_NAME_LEN: usize = NAME_LEN;

/// Value of `LB_SVC_INFO` (key: `service_id`). Written by userspace for inspection commands, so
/// that `lb services` and `lb plan` can describe what the maps hold even while the agent is down
/// (the objects it came from may be gone or changed since). The datapath never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceInfo {
    /// Namespace, NUL-padded UTF-8.
    pub namespace: [u8; NAME_LEN],
    /// Service name, NUL-padded UTF-8.
    pub name: [u8; NAME_LEN],
    /// Service port name (may be empty), NUL-padded UTF-8.
    pub port_name: [u8; PORT_NAME_LEN],
    /// The Service's `metadata.generation` this frontend was programmed from (0: not set, as in
    /// a manifest): tells whether the agent has caught up with the latest spec.
    pub generation: u64,
    /// Endpoints of the Service port that are ready, across all nodes, when programmed.
    pub ready: u32,
    /// Endpoints of the Service port that are serving (ready, or terminating but still able to
    /// serve), across all nodes.
    pub serving: u32,
    /// Endpoints of the Service port that are terminating, across all nodes.
    pub terminating: u32,
    /// `SERVICE_TYPE_*`: the Service's `spec.type`, which decides which frontends it has.
    pub service_type: u8,
    /// `FRONTEND_*`: which of the Service's addresses this frontend is, which decides the
    /// traffic policy that applies to it.
    pub frontend_kind: u8,
    /// `POLICY_*` of `spec.internalTrafficPolicy` (ClusterIP frontends follow it).
    pub internal_policy: u8,
    /// `POLICY_*` of `spec.externalTrafficPolicy` (every other frontend follows it).
    pub external_policy: u8,
}

/// `ServiceInfo::service_type`: `ClusterIP` (also the value when `spec.type` is unset).
pub const SERVICE_TYPE_CLUSTER_IP: u8 = 1;
/// `ServiceInfo::service_type`: `NodePort`.
pub const SERVICE_TYPE_NODE_PORT: u8 = 2;
/// `ServiceInfo::service_type`: `LoadBalancer`.
pub const SERVICE_TYPE_LOAD_BALANCER: u8 = 3;

/// `ServiceInfo::frontend_kind`: a ClusterIP (internal traffic).
pub const FRONTEND_CLUSTER_IP: u8 = 1;
/// `ServiceInfo::frontend_kind`: one of `spec.externalIPs`.
pub const FRONTEND_EXTERNAL_IP: u8 = 2;
/// `ServiceInfo::frontend_kind`: a load balancer ingress IP of the Service's status.
pub const FRONTEND_LOAD_BALANCER_IP: u8 = 3;
/// `ServiceInfo::frontend_kind`: a nodePort on one of the node's addresses.
pub const FRONTEND_NODE_PORT: u8 = 4;

/// `ServiceInfo::internal_policy` / `external_policy`: `Cluster` (also the value when unset).
pub const POLICY_CLUSTER: u8 = 1;
/// `ServiceInfo::internal_policy` / `external_policy`: `Local`.
pub const POLICY_LOCAL: u8 = 2;

/// The Kubernetes name of a `SERVICE_TYPE_*` code.
pub fn service_type_name(code: u8) -> &'static str {
    match code {
        SERVICE_TYPE_CLUSTER_IP => "ClusterIP",
        SERVICE_TYPE_NODE_PORT => "NodePort",
        SERVICE_TYPE_LOAD_BALANCER => "LoadBalancer",
        _ => "unknown",
    }
}

/// The name of a `FRONTEND_*` code, as `lb services` shows it.
pub fn frontend_kind_name(code: u8) -> &'static str {
    match code {
        FRONTEND_CLUSTER_IP => "ClusterIP",
        FRONTEND_EXTERNAL_IP => "ExternalIP",
        FRONTEND_LOAD_BALANCER_IP => "LoadBalancer",
        FRONTEND_NODE_PORT => "NodePort",
        _ => "unknown",
    }
}

/// The Kubernetes name of a `POLICY_*` code.
pub fn policy_name(code: u8) -> &'static str {
    match code {
        POLICY_CLUSTER => "Cluster",
        POLICY_LOCAL => "Local",
        _ => "unknown",
    }
}

impl Default for ServiceInfo {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

const _: () = {
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 20);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<SourceRangeKey>() == 8);
    assert!(size_of::<SockRevNatKey>() == 16);
    assert!(size_of::<SockRevNatValue>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SlotKey>() == 8);
    assert!(size_of::<Backend>() == 12);
    // No padding: the names fill 192 bytes, so the generation is 8-byte aligned and the
    // counts and codes after it end on a multiple of 8.
    assert!(size_of::<ServiceInfo>() == 2 * NAME_LEN + PORT_NAME_LEN + 8 + 3 * 4 + 4);
};

/// Key of `LB_AFFINITY`: a client of one frontend. Written by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    /// The client's IPv4 address, network byte order.
    pub client_addr: u32,
    /// The frontend (`ServiceValue::service_id`).
    pub service_id: u32,
}

/// Value of `LB_AFFINITY`: where the client's last new flow to the frontend went, and when.
/// Written by the datapath on every new flow of a frontend with affinity; userspace reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityValue {
    /// The backend chosen (an `LB_BACKENDS` id of this frontend).
    pub backend_id: u32,
    /// Always zero.
    pub _pad: u32,
    /// When that flow started, `bpf_ktime_get_ns` time.
    pub last_flow_ns: u64,
}

/// Key of `LB_SOCK_REVNAT`: a node socket translated by the socket hooks, and the backend it was
/// sent to. Written by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockRevNatKey {
    /// The socket's cookie (`bpf_get_socket_cookie`), unique while the socket lives.
    pub cookie: u64,
    /// The backend address, network byte order.
    pub addr: u32,
    /// The backend port, network byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

/// Value of `LB_SOCK_REVNAT`: the frontend the socket asked for, reported back as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatValue {
    /// Frontend address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
}

/// Nanoseconds per second, for `ServiceValue::affinity_timeout_s`.
pub const NS_PER_SECOND: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]` and `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::ServiceInfo {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNatValue {}
    unsafe impl aya::Pod for super::AffinityValue {}
}
