//! Map names and capacities, shared so that the kernel object and every userspace reader agree.
//!
//! Names are at most 15 bytes (the kernel's `BPF_OBJ_NAME_LEN` minus the NUL) and are also the
//! file names under the pin directory.

/// Default directory (on bpffs) where every map and XDP link is pinned.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Subdirectory of the pin directory holding one pinned XDP link per attached interface.
pub const LINKS_SUBDIR: &str = "links";

/// Map: service frontends. See [`crate::service::ServiceKey`].
pub const MAP_SERVICES: &str = "LB_SERVICES";
/// Map: backend slots of each backend set. See [`crate::service::SlotKey`].
pub const MAP_SLOTS: &str = "LB_SLOTS";
/// Map: backends by id. See [`crate::service::Backend`].
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
/// Map: human names of services, for inspection only. See [`crate::service::ServiceInfo`].
pub const MAP_SERVICE_INFO: &str = "LB_SVC_INFO";
/// Map: connection tracking. See [`crate::conntrack::FlowKey`].
pub const MAP_CONNTRACK: &str = "LB_CONNTRACK";
/// Map: per-CPU counters. See [`crate::stats::Counter`].
pub const MAP_STATS: &str = "LB_STATS";
/// Map: interfaces the program may redirect to (ifindex -> ifindex).
pub const MAP_TX_PORTS: &str = "LB_TX_PORTS";
/// Map: what the agent knows about each attached interface. See [`crate::iface::IfaceConfig`].
pub const MAP_IFACES: &str = "LB_IFACES";
/// Map: the ClusterIPs of every Service, as a set. See [`crate::service::CLUSTER_IP_ALLOCATED`].
pub const MAP_CLUSTER_IPS: &str = "LB_CLUSTER_IPS";
/// Map: node-wide settings, one entry. See [`crate::config::DataplaneConfig`].
pub const MAP_CONFIG: &str = "LB_CONFIG";
/// Map: per-CPU reject rate windows. See [`crate::config::RejectWindow`].
pub const MAP_REJECT_RATE: &str = "LB_REJECT_RATE";
/// Map: `loadBalancerSourceRanges`, an LPM trie. See [`crate::service::SourceRangeKey`].
pub const MAP_SOURCE_RANGES: &str = "LB_SRC_RANGES";
/// Map: node sockets translated at `connect()`/`sendmsg()`. See
/// [`crate::service::SockRevNatKey`].
pub const MAP_SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
/// Map: fragmented datagrams in flight. See [`crate::conntrack::FragmentKey`].
pub const MAP_FRAGMENTS: &str = "LB_FRAGMENTS";
/// Map: session affinity, client and frontend -> last backend. See
/// [`crate::service::AffinityKey`].
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
/// Map: traffic of each Service frontend. See [`crate::stats::ServiceTraffic`].
pub const MAP_SERVICE_TRAFFIC: &str = "LB_SVC_TRAFFIC";
/// Map: traffic of each backend. See [`crate::stats::Traffic`].
pub const MAP_BACKEND_TRAFFIC: &str = "LB_BE_TRAFFIC";

/// Service frontends (one per Service address, port and protocol). 100,000 Services of a few
/// ports each fit, which is beyond what the Kubernetes scalability SLOs test (10,000).
pub const MAX_SERVICES: u32 = 1 << 18;
/// Backend slots across all live backend sets. A set switch briefly holds the old and the new set,
/// so this is sized at twice the backends.
pub const MAX_SLOTS: u32 = MAX_BACKENDS * 2;
/// Backends (one per Service frontend and endpoint). Ids index an array, 0 is never used.
pub const MAX_BACKENDS: u32 = 1 << 19;
/// Connection-tracking entries by default. Each flow takes two (original and reply direction), so
/// this holds 262,144 flows: what kube-proxy's default (`--conntrack-max-per-core` 32,768) allows
/// an 8-core node. The map is preallocated (about 59 MB) and an LRU: when it is full the least
/// recently used flows are forgotten, never new ones refused. `lb agent --conntrack-flows`
/// changes it at start-up.
pub const MAX_CONNTRACK: u32 = 1 << 19;
/// Session-affinity entries (client, frontend): an LRU, so the least recently used pairs are
/// forgotten when it is full, which only costs those clients their stickiness. kube-proxy's
/// iptables mode remembers 100 clients per endpoint, its nftables mode 65,535 per Service.
pub const MAX_AFFINITY: u32 = 1 << 17;
/// `loadBalancerSourceRanges` entries across all frontends (allocated as used).
pub const MAX_SOURCE_RANGES: u32 = 1 << 16;
/// Fragmented datagrams tracked at once (an LRU: the oldest are forgotten first). Linux keeps at
/// most 4 MiB of fragments queued per namespace, a few thousand datagrams.
pub const MAX_FRAGMENTS: u32 = 1 << 14;
/// Node sockets (and backends) the socket hooks remember (an LRU: the least recently used are
/// forgotten, which only shows a backend's address to a long-idle UDP socket).
pub const MAX_SOCK_REVNAT: u32 = 1 << 16;
/// Conntrack entries each flow takes: one per direction.
pub const CONNTRACK_ENTRIES_PER_FLOW: u32 = 2;
/// Interfaces the agent can attach to (and redirect to). A node's pods each add one veth;
/// Kubernetes' default is at most 110 pods per node.
pub const MAX_INTERFACES: u32 = 1024;
