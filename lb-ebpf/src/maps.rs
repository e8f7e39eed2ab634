//! Every map the program uses. Capacities and names come from `lb_common::limits`; userspace pins
//! each map under the pin directory by its name, so an agent restart keeps them all.
//!
//! These are BTF-described maps: `bpftool map dump name LB_SERVICES` prints typed keys and values.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use lb_common::{
    config::{DataplaneConfig, RejectWindow},
    conntrack::{FlowKey, FlowState, FragmentKey, FragmentValue},
    iface::{IFACE_LOCAL_SENDERS, IFACE_NO_XDP_TX, IfaceConfig},
    limits::{
        MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_FRAGMENTS, MAX_INTERFACES, MAX_SERVICES,
        MAX_SLOTS, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES,
    },
    service::{
        AffinityKey, AffinityValue, Backend, SOURCE_RANGE_KEY_BITS, ServiceInfo, ServiceKey,
        ServiceValue, SlotKey, SockRevNatKey, SockRevNatValue, SourceRangeKey,
    },
    stats::{COUNTER_COUNT, ServiceTraffic, Traffic},
};

/// Maps written only by userspace allocate on insert: memory follows the cluster's size rather
/// than the capacity.
const USER_WRITTEN: usize = BPF_F_NO_PREALLOC as usize;

/// Service frontends: `ServiceKey` (VIP, port, protocol) -> `ServiceValue`. Userspace writes;
/// the program reads.
#[btf_map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }, USER_WRITTEN> =
    HashMap::new();

/// Backend slots: `SlotKey` (backend set, slot) -> backend id. Userspace writes; the program
/// reads.
#[btf_map]
pub static LB_SLOTS: HashMap<SlotKey, u32, { MAX_SLOTS as usize }, USER_WRITTEN> = HashMap::new();

/// Backends: backend id -> `Backend` (address, port, flags). Userspace writes; the program reads.
#[btf_map]
pub static LB_BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// What the Service frontends are: service id -> `ServiceInfo` (names, type, policies,
/// generation, endpoint counts). Userspace writes it for the
/// inspection commands; the program never reads it.
#[btf_map]
pub static LB_SVC_INFO: HashMap<u32, ServiceInfo, { MAX_SERVICES as usize }, USER_WRITTEN> =
    HashMap::new();

/// Connection tracking: `FlowKey` -> `FlowState`, two entries per flow (original and reply).
/// The program writes; userspace reads and may delete.
#[btf_map]
pub static LB_CONNTRACK: LruHashMap<FlowKey, FlowState, { MAX_CONNTRACK as usize }> =
    LruHashMap::new();

/// Session affinity: `AffinityKey` (client, frontend) -> `AffinityValue` (backend, when its
/// last new flow started). The program writes on every new flow of a frontend with affinity;
/// userspace reads.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// `loadBalancerSourceRanges`: LPM trie of (service id, client prefix) -> `SOURCE_RANGE_ALLOWED`.
/// Userspace writes the ranges of every frontend flagged `SERVICE_SOURCE_RANGES`; the program
/// looks the client up.
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRangeKey, u32, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Fragmented datagrams in flight: `FragmentKey` (source, destination, IPv4 id, protocol) ->
/// how the first fragment was translated. The program writes at each first fragment and reads
/// at the later ones; userspace only reads.
#[btf_map]
pub static LB_FRAGMENTS: LruHashMap<FragmentKey, FragmentValue, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// Node sockets translated by the socket hooks: `SockRevNatKey` (socket cookie, backend) ->
/// the frontend to report as the peer. The socket programs write and read; userspace only reads.
#[btf_map]
pub static LB_SOCK_REVNAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { MAX_SOCK_REVNAT as usize },
> = LruHashMap::new();

/// Counters: `Counter` index -> packets, per CPU. The program writes; userspace sums the CPUs.
#[btf_map]
pub static LB_STATS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// Traffic of each frontend: service id -> `ServiceTraffic` (packets and bytes both ways, new
/// flows, refusals). Shared by every CPU (atomic adds). The program writes; userspace reads, and
/// zeroes an id's entry when it frees the id.
#[btf_map]
pub static LB_SVC_TRAFFIC: Array<ServiceTraffic, { MAX_SERVICES as usize }> = Array::new();

/// Traffic of each backend: backend id -> `Traffic`. Shared by every CPU (atomic adds). The
/// program writes; userspace reads, and zeroes an id's entry when it frees the id.
#[btf_map]
pub static LB_BE_TRAFFIC: Array<Traffic, { MAX_BACKENDS as usize }> = Array::new();

/// Interfaces the program may redirect to: ifindex -> ifindex. Userspace writes the interfaces
/// it attached to; a FIB result outside this set goes to the kernel stack instead.
#[btf_map]
pub static LB_TX_PORTS: DevMapHash<{ MAX_INTERFACES as usize }> = DevMapHash::new();

/// Attached interfaces: ifindex -> `IfaceConfig`. Userspace writes one entry per interface it
/// attaches to; the program reads it only for a rewritten packet whose checksum looks partial.
#[btf_map]
pub static LB_IFACES: HashMap<u32, IfaceConfig, { MAX_INTERFACES as usize }, USER_WRITTEN> =
    HashMap::new();

/// ClusterIPs: address (network byte order) -> `CLUSTER_IP_ALLOCATED`. Userspace writes one entry
/// per Service ClusterIP; the program reads it for packets that match no frontend, to reject
/// those sent to a port the Service does not define.
#[btf_map]
pub static LB_CLUSTER_IPS: HashMap<u32, u32, { MAX_SERVICES as usize }, USER_WRITTEN> =
    HashMap::new();

/// Node-wide settings, one entry (key 0): `DataplaneConfig`. Userspace writes it at start-up;
/// the program reads it.
#[btf_map]
pub static LB_CONFIG: Array<DataplaneConfig, 1> = Array::new();

/// Per-CPU reject rate windows, one entry (key 0): `RejectWindow`. The program writes; userspace
/// only reads.
#[btf_map]
pub static LB_REJECT_RATE: PerCpuArray<RejectWindow, 1> = PerCpuArray::new();

/// Copies the frontend's value out of the map (a concurrent userspace update replaces the element
/// rather than writing into it, so the copy is consistent).
#[inline(always)]
pub fn lookup_service(key: &ServiceKey) -> Option<ServiceValue> {
    LB_SERVICES.get_ptr(key).map(|value| unsafe { *value })
}

/// Looks up the live backend `id`; `None` when the id is unused.
#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    let backend = unsafe { *LB_BACKENDS.get_ptr(id)? };
    (backend.flags & lb_common::service::BACKEND_ACTIVE != 0).then_some(backend)
}

/// The `IFACE_*` flags of `ifindex`; 0 (a NIC) for interfaces the agent did not describe.
#[inline(always)]
fn iface_flags(ifindex: u32) -> u32 {
    match LB_IFACES.get_ptr(ifindex) {
        Some(config) => unsafe { (*config).flags },
        None => 0,
    }
}

/// Whether packets arriving on `ifindex` may come from local sockets (and so carry partial
/// checksums). Unknown interfaces are treated as NICs.
#[inline(always)]
pub fn has_local_senders(ifindex: u32) -> bool {
    iface_flags(ifindex) & IFACE_LOCAL_SENDERS != 0
}

/// Whether `XDP_TX` on `ifindex` can be trusted to reach the other end (see `IFACE_NO_XDP_TX`).
#[inline(always)]
pub fn xdp_tx_works(ifindex: u32) -> bool {
    iface_flags(ifindex) & IFACE_NO_XDP_TX == 0
}

/// Whether `addr` (network byte order) is a Service's ClusterIP.
#[inline(always)]
pub fn is_cluster_ip(addr: u32) -> bool {
    LB_CLUSTER_IPS.get_ptr(addr).is_some()
}

/// The node-wide settings; all zero when the agent has not written them.
#[inline(always)]
pub fn config() -> DataplaneConfig {
    match LB_CONFIG.get_ptr(0) {
        Some(config) => unsafe { *config },
        None => DataplaneConfig::default(),
    }
}

/// Whether `client` (network byte order) lies in one of the source ranges of frontend
/// `service_id`.
#[inline(always)]
pub fn source_allowed(service_id: u32, client: u32) -> bool {
    let key = Key::new(
        SOURCE_RANGE_KEY_BITS,
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: client,
        },
    );
    LB_SRC_RANGES.get(&key).is_some()
}
