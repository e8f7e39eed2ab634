//! The one pure function from Kubernetes objects to what the Service maps should hold. Both
//! sources (a manifest directory today, the API server later) feed it, so they cannot drift.
//!
//! Semantics follow kube-proxy: a Service frontend is (address, port, protocol), for each of the
//! Service's addresses: its ClusterIP, its `externalIPs`, and for a LoadBalancer Service the
//! ingress IPs in its status (except those with `ipMode: Proxy`, whose load balancer delivers to
//! the nodes itself, so kube-proxy leaves them alone too), and for a NodePort or LoadBalancer
//! Service (node address, nodePort, protocol) for each of the node's NodePort addresses. Its
//! backends are the *ready* endpoints of the EndpointSlices labelled `kubernetes.io/service-name`
//! with the Service's name in its namespace, at the slice port whose name and protocol match the
//! Service port (the EndpointSlice controller has already resolved `targetPort` there, named
//! ports included). An endpoint whose readiness is unknown counts as ready, as the API documents.
//! When none is ready, the endpoints that are terminating but still serving take new flows
//! (KEP-1669, as kube-proxy does), so a rolling update of a one-replica Deployment does not drop
//! traffic while the old pod finishes.
//!
//! A frontend with no endpoint to give a new flow rejects it (ICMP port unreachable, kube-proxy's
//! REJECT), except when the Service has usable endpoints and only a `Local` traffic policy keeps
//! them from this node: then it drops, as kube-proxy does. A packet to a ClusterIP on a port the
//! Service does not define is rejected too.
//!
//! An endpoint still listed but not used for new flows (failing its probe, or terminating) is
//! *draining*: new flows do not get it, but flows already on it keep it, as they do with
//! kube-proxy's conntrack. Only an endpoint that leaves the slices is gone for its established
//! flows too.

pub mod index;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{
    net::{IPPROTO_TCP, IPPROTO_UDP, addr_to_wire, port_to_wire},
    service::{
        BACKEND_READY, BACKEND_SERVING, BACKEND_TERMINATING, FRONTEND_CLUSTER_IP,
        FRONTEND_EXTERNAL_IP, FRONTEND_LOAD_BALANCER_IP, FRONTEND_NODE_PORT, POLICY_CLUSTER,
        SERVICE_DROP_WHEN_EMPTY, SERVICE_SNAT_REMOTE, SERVICE_SOURCE_RANGES,
        SERVICE_TYPE_CLUSTER_IP, SERVICE_TYPE_LOAD_BALANCER, SERVICE_TYPE_NODE_PORT, ServiceKey,
    },
};

use crate::{
    manifests::{CLUSTER_IP_NONE, DEFAULT_NAMESPACE},
    node::{Ipv4Cidr, NodeConfig},
};

/// `status.loadBalancer.ingress[].ipMode` of a load balancer that proxies to the nodes.
const IP_MODE_PROXY: &str = "Proxy";

/// The label that hands a Service to another proxy: kube-proxy, and lb, leave such Services
/// alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A backend endpoint of one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// On another node (`BACKEND_REMOTE`): external traffic reaches it with source NAT when its
    /// frontend says so (`Frontend::snat_remote`).
    pub remote: bool,
}

/// One Service frontend as the maps should hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" for an unnamed single port).
    pub port_name: String,
    pub addr: Ipv4Addr,
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Endpoints new flows are spread over: the ready ones, or when none is ready the serving
    /// terminating ones. Sorted and without duplicates, so equal sets compare equal.
    pub backends: Vec<BackendAddr>,
    /// Listed but not taking new flows: established flows keep them. Sorted, without
    /// duplicates, and disjoint from `backends`.
    pub draining: Vec<BackendAddr>,
    /// `backends` is empty only because a `Local` traffic policy left no endpoint on this node
    /// (the Service has some elsewhere): drop, as kube-proxy does, rather than reject.
    pub drop_when_empty: bool,
    /// `sessionAffinity: ClientIP`: its timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` (load balancer IPs only): the IPv4 clients admitted, host bits
    /// cleared, sorted, without duplicates; `None` admits every client. A Service whose ranges
    /// are all IPv6 admits no IPv4 client (`Some` of nothing).
    pub source_ranges: Option<Vec<Ipv4Cidr>>,
    /// External traffic under `externalTrafficPolicy: Cluster`: flows to `remote` backends get
    /// source NAT to the node's address (`SERVICE_SNAT_REMOTE`).
    pub snat_remote: bool,
    /// What the inspection commands show about the frontend; the datapath never reads it.
    pub details: Details,
}

/// What a frontend is, for the inspection commands (`LB_SVC_INFO`, and the informational
/// `Backend::flags` bits): written with the frontend so that `lb services`, `lb backends` and
/// `lb plan` answer from the maps alone, while the agent is down too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Details {
    /// `ServiceInfo::service_type`: a `SERVICE_TYPE_*` code.
    pub service_type: u8,
    /// `ServiceInfo::frontend_kind`: a `FRONTEND_*` code.
    pub frontend_kind: u8,
    /// `ServiceInfo::internal_policy`: a `POLICY_*` code.
    pub internal_policy: u8,
    /// `ServiceInfo::external_policy`: a `POLICY_*` code.
    pub external_policy: u8,
    /// The Service's `metadata.generation` (0 when unset).
    pub generation: u64,
    /// Endpoints of the Service port, on every node, by condition.
    pub counts: EndpointCounts,
    /// The conditions of every endpoint in `backends` and `draining`, as `BACKEND_READY`,
    /// `BACKEND_SERVING` and `BACKEND_TERMINATING` bits. Kept apart from [`BackendAddr`]: a
    /// condition change must not give an endpoint a new backend id (its flows would move).
    pub conditions: BTreeMap<BackendAddr, u8>,
}

/// How many endpoints of a Service port are ready, serving and terminating (an endpoint listed
/// in several slices counts once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    pub ready: u32,
    pub serving: u32,
    pub terminating: u32,
}

impl Frontend {
    /// The `LB_SERVICES` key of this frontend.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: addr_to_wire(self.addr),
            port: port_to_wire(self.port),
            proto: self.proto,
            _pad: 0,
        }
    }

    /// The `ServiceValue::flags` of this frontend.
    pub fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.drop_when_empty && self.backends.is_empty() {
            flags |= SERVICE_DROP_WHEN_EMPTY;
        }
        if self.source_ranges.is_some() {
            flags |= SERVICE_SOURCE_RANGES;
        }
        if self.snat_remote {
            flags |= SERVICE_SNAT_REMOTE;
        }
        flags
    }
}

/// Every frontend the maps should hold, by key, and every ClusterIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// The ClusterIPs of the programmed Services: a packet to one on a port no frontend serves is
    /// rejected.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
}

/// Why (part of) an object is not programmed. Not an error: headless and ExternalName Services,
/// for instance, are meant to be left alone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    /// `Service default/web`.
    pub object: String,
    pub message: String,
}

fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        _ => None,
    }
}

/// Service types with a nodePort on every port.
const NODE_PORT_TYPES: [&str; 2] = ["NodePort", "LoadBalancer"];

/// A Service's identity: its namespace (the default one when unset, as in a manifest applied
/// without one) and name.
pub type ServiceId = (String, String);

/// The identity of `service`.
pub fn service_id(service: &Service) -> ServiceId {
    (
        service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        service.metadata.name.clone().unwrap_or_default(),
    )
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label, in its
/// namespace), if it serves IPv4 endpoints of one: IPv6 and FQDN slices serve other address
/// families.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceId> {
    if slice.address_type != "IPv4" {
        return None;
    }
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))?;
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    Some((namespace, service_name.clone()))
}

/// What one Service asks for, computed from it and its own slices alone: its frontends (in the
/// order they claim their keys; a key claimed twice within the Service is kept once, with a
/// note), its ClusterIPs and its notes. [`desired_state`] and the incremental [`index`] both
/// build on it, so a full and an incremental computation cannot differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePart {
    pub frontends: Vec<Frontend>,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub notes: Vec<Note>,
}

impl ServicePart {
    /// The frontend this Service wants at `key`.
    pub fn frontend(&self, key: &ServiceKey) -> Option<&Frontend> {
        self.frontends
            .iter()
            .find(|frontend| frontend.key() == *key)
    }
}

/// The note a Service gets for a frontend another Service (first by namespace/name) holds.
pub fn conflict_note(loser: &Frontend, owner: &Frontend) -> Note {
    Note {
        object: format!("Service {}/{}", loser.namespace, loser.name),
        message: format!(
            "{}:{} is already served by Service {}/{}; ignored here",
            loser.addr, loser.port, owner.namespace, owner.name
        ),
    }
}

/// Computes the desired map contents from every Service and EndpointSlice, on the node `node`
/// describes.
pub fn desired_state<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeConfig,
) -> (DesiredState, Vec<Note>) {
    let mut slices_by_service: BTreeMap<ServiceId, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if let Some(service) = slice_service(slice) {
            slices_by_service.entry(service).or_default().push(slice);
        }
    }
    let mut services: Vec<(ServiceId, &Service)> = services
        .into_iter()
        .map(|service| (service_id(service), service))
        .collect();
    // Deterministic: when two Services claim one frontend, the first by namespace/name wins.
    services.sort_by(|a, b| a.0.cmp(&b.0));

    let mut desired = DesiredState::default();
    let mut notes = Vec::new();
    for (id, service) in services {
        let slices = slices_by_service
            .get(&id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let part = service_part(service, slices, node);
        notes.extend(part.notes);
        desired.cluster_ips.extend(part.cluster_ips);
        for frontend in part.frontends {
            match desired.frontends.entry(frontend.key()) {
                std::collections::btree_map::Entry::Occupied(owner) => {
                    notes.push(conflict_note(&frontend, owner.get()));
                }
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(frontend);
                }
            }
        }
    }
    (desired, notes)
}

/// What `service` asks for given its `slices` (those labelled with its name in its namespace);
/// see [`ServicePart`].
pub fn service_part(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeConfig,
) -> ServicePart {
    let mut part = ServicePart::default();
    let (namespace, name) = service_id(service);
    let object = format!("Service {namespace}/{name}");
    let mut notes = Vec::new();
    let mut note = |message: String| {
        notes.push(Note {
            object: object.clone(),
            message,
        })
    };

    fill_part(
        service,
        slices,
        node,
        &mut part.frontends,
        &mut part.cluster_ips,
        &mut note,
    );
    part.notes = notes;
    part
}

/// The body of [`service_part`]: returns early for a Service with nothing to program.
fn fill_part(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeConfig,
    frontends: &mut Vec<Frontend>,
    cluster_ips_out: &mut Vec<Ipv4Addr>,
    note: &mut impl FnMut(String),
) {
    let (namespace, name) = service_id(service);
    if let Some(proxy) = service
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
    {
        note(format!(
            "served by the proxy named {proxy:?} ({SERVICE_PROXY_NAME_LABEL}): left to it, \
             as kube-proxy does"
        ));
        return;
    }
    let Some(spec) = &service.spec else { return };
    if spec.type_.as_deref() == Some("ExternalName") {
        note("ExternalName Service: a DNS alias, nothing to load-balance".to_owned());
        return;
    }
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if cluster_ips.contains(&CLUSTER_IP_NONE) {
        note("headless Service (clusterIP: None): clients resolve endpoints by DNS".to_owned());
        return;
    }
    let mut addrs: Vec<Ipv4Addr> = cluster_ips
        .iter()
        .filter(|ip| !ip.is_empty())
        .filter_map(|ip| ipv4("ClusterIP", ip, note))
        .collect();
    if addrs.is_empty() && cluster_ips.iter().all(|ip| ip.is_empty()) {
        note(
            "spec.clusterIP is not set: in standalone mode nothing allocates one, so set it \
             in the manifest"
                .to_owned(),
        );
        return;
    }
    let mut more: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ipv4("externalIP", ip, note))
        .collect();
    let mut lb_ips = Vec::new();
    let mut source_ranges = None;
    if spec.type_.as_deref() == Some("LoadBalancer") {
        lb_ips = load_balancer_ips(service, note);
        more.extend(lb_ips.iter().copied());
        source_ranges = load_balancer_source_ranges(service, note);
    }
    // Addresses before this index are ClusterIPs (internal traffic); the others, and the
    // node's addresses for nodePorts, receive external traffic.
    let cluster_ip_count = addrs.len();
    for addr in more {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    for addr in &addrs[..cluster_ip_count] {
        if node.nodeport_addresses.contains(addr) {
            note(format!(
                "ClusterIP {addr} is an address of this node: not treated as a ClusterIP \
                 (undefined ports are not rejected there)"
            ));
        } else {
            cluster_ips_out.push(*addr);
        }
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        Some(AFFINITY_CLIENT_IP) => spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds)
            .and_then(|seconds| u32::try_from(seconds).ok())
            .filter(|seconds| *seconds > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
        _ => 0,
    };
    let local_only = |policy: Option<&String>| policy.map(String::as_str) == Some(POLICY_LOCAL);
    let internal_local = local_only(spec.internal_traffic_policy.as_ref());
    let external_local = local_only(spec.external_traffic_policy.as_ref());
    // kube-proxy's notion: the Service's endpoints on other nodes are used by some of its
    // traffic. Only then does a `Local` frontend without a local endpoint drop; when nothing
    // uses them (every kind of traffic is `Local`), the Service has no endpoint here at all
    // and rejects.
    let externally_reachable = addrs.len() > cluster_ip_count
        || NODE_PORT_TYPES.contains(&spec.type_.as_deref().unwrap_or_default());
    let uses_cluster_endpoints = !internal_local || (externally_reachable && !external_local);
    let policy_code = |local: bool| {
        if local {
            lb_common::service::POLICY_LOCAL
        } else {
            POLICY_CLUSTER
        }
    };
    let service_type = match spec.type_.as_deref() {
        Some("NodePort") => SERVICE_TYPE_NODE_PORT,
        Some("LoadBalancer") => SERVICE_TYPE_LOAD_BALANCER,
        _ => SERVICE_TYPE_CLUSTER_IP,
    };
    let generation = service
        .metadata
        .generation
        .and_then(|generation| u64::try_from(generation).ok())
        .unwrap_or(0);
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(proto) = protocol_number(port.protocol.as_deref()) else {
            note(format!(
                "port {} ({}): protocol {} is not supported",
                port.port,
                port_name,
                port.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue; // Rejected by validation; unreachable for checked objects.
        };
        let candidates = endpoints(slices, &port_name, proto, node);
        let internal = choose(&candidates, internal_local, uses_cluster_endpoints);
        let external = choose(&candidates, external_local, uses_cluster_endpoints);
        let (counts, conditions) = conditions(&candidates);
        let details = |frontend_kind: u8, sets: &EndpointSets| Details {
            service_type,
            frontend_kind,
            internal_policy: policy_code(internal_local),
            external_policy: policy_code(external_local),
            generation,
            counts,
            conditions: sets
                .backends
                .iter()
                .chain(&sets.draining)
                .map(|backend| (*backend, conditions.get(backend).copied().unwrap_or(0)))
                .collect(),
        };
        let no_ranges = &None;
        // External traffic reaching another node's endpoint is masqueraded (only `Cluster`
        // sends it there); ClusterIP traffic comes from pods, whose addresses route.
        let snat_remote = !external_local;
        let mut listeners: Vec<Listener> = addrs
            .iter()
            .enumerate()
            .map(|(index, addr)| {
                if index < cluster_ip_count {
                    let kind = FRONTEND_CLUSTER_IP;
                    (*addr, service_port, &internal, no_ranges, false, kind)
                } else if lb_ips.contains(addr) {
                    let kind = FRONTEND_LOAD_BALANCER_IP;
                    (
                        *addr,
                        service_port,
                        &external,
                        &source_ranges,
                        snat_remote,
                        kind,
                    )
                } else {
                    let kind = FRONTEND_EXTERNAL_IP;
                    (*addr, service_port, &external, no_ranges, snat_remote, kind)
                }
            })
            .collect();
        if NODE_PORT_TYPES.contains(&spec.type_.as_deref().unwrap_or_default()) {
            let node_port = port
                .node_port
                .filter(|port| *port != 0)
                .and_then(|port| u16::try_from(port).ok());
            match node_port {
                Some(node_port) if node.node_port_range.contains(&node_port) => {
                    listeners.extend(node.nodeport_addresses.iter().map(|addr| {
                        let kind = FRONTEND_NODE_PORT;
                        (*addr, node_port, &external, no_ranges, snat_remote, kind)
                    }))
                }
                Some(node_port) => note(format!(
                    "port {} ({port_name}): nodePort {node_port} is outside the node port \
                     range {}-{}; not served on the node's addresses",
                    port.port,
                    node.node_port_range.start(),
                    node.node_port_range.end()
                )),
                // A LoadBalancer Service may do without (allocateLoadBalancerNodePorts).
                None if spec.type_.as_deref() == Some("NodePort") => note(format!(
                    "port {} ({port_name}): spec.ports[].nodePort is not set: in standalone \
                     mode nothing allocates one, so set it in the manifest",
                    port.port
                )),
                None => {}
            }
        }
        for (addr, listen_port, sets, ranges, snat_remote, kind) in listeners {
            let frontend = Frontend {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name: port_name.clone(),
                addr,
                port: listen_port,
                proto,
                backends: sets.backends.clone(),
                draining: sets.draining.clone(),
                drop_when_empty: sets.drop_when_empty,
                affinity_timeout_s,
                source_ranges: ranges.clone(),
                snat_remote,
                details: details(kind, sets),
            };
            let key = frontend.key();
            if frontends.iter().any(|claimed| claimed.key() == key) {
                note(format!(
                    "{addr}:{listen_port} is already served by Service {namespace}/{name}; \
                     ignored here"
                ));
                continue;
            }
            frontends.push(frontend);
        }
    }
}

/// The ingress IPs of a LoadBalancer Service's status that this node serves. Hostname-only
/// entries (a cloud load balancer known by DNS name) and `ipMode: Proxy` entries are not
/// addresses traffic arrives at here.
fn load_balancer_ips(service: &Service, note: &mut impl FnMut(String)) -> Vec<Ipv4Addr> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|status| status.ingress.as_ref());
    let mut addrs = Vec::new();
    for entry in ingress.into_iter().flatten() {
        let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if entry.ip_mode.as_deref() == Some(IP_MODE_PROXY) {
            note(format!(
                "load balancer ingress {ip} has ipMode Proxy: the load balancer delivers to the \
                 nodes itself, nothing to program for it"
            ));
            continue;
        }
        addrs.extend(ipv4("load balancer ingress", ip, note));
    }
    addrs
}

/// A LoadBalancer Service's `loadBalancerSourceRanges`, trimmed as kube-proxy trims them, as
/// IPv4 prefixes with the host bits cleared, sorted and without duplicates; `None` when it sets
/// none. IPv6 prefixes are noted and skipped: they admit no IPv4 client. (The legacy
/// `service.beta.kubernetes.io/load-balancer-source-ranges` annotation is for cloud load
/// balancers; kube-proxy does not read it, and neither does lb.)
fn load_balancer_source_ranges(
    service: &Service,
    note: &mut impl FnMut(String),
) -> Option<Vec<Ipv4Cidr>> {
    let texts: Vec<&str> = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten()
        .map(|text| text.trim())
        .filter(|text| !text.is_empty())
        .collect();
    if texts.is_empty() {
        return None;
    }
    let mut ranges = Vec::new();
    for text in texts {
        if text.contains(':') {
            note(format!(
                "load balancer source range {text}: IPv6 is not supported yet"
            ));
            continue;
        }
        match text.parse::<Ipv4Cidr>() {
            Ok(cidr) => ranges.push(cidr.network()),
            Err(error) => note(format!("load balancer source range: {error:#}")),
        }
    }
    ranges.sort();
    ranges.dedup();
    Some(ranges)
}

/// `ip` as an IPv4 address, or a note saying why it is not programmed (`what` names the field).
fn ipv4(what: &str, ip: &str, note: &mut impl FnMut(String)) -> Option<Ipv4Addr> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(addr)) => Some(addr),
        Ok(IpAddr::V6(_)) => {
            note(format!("{what} {ip}: IPv6 is not supported yet"));
            None
        }
        Err(_) => {
            note(format!("{what} {ip:?} is not an IP address"));
            None
        }
    }
}

/// `spec.sessionAffinity` value asking for per-client stickiness.
const AFFINITY_CLIENT_IP: &str = "ClientIP";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset: three hours, as the API defaults.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A frontend being built: address, port, endpoints, source ranges, source NAT to remote
/// endpoints, and which kind of address it is (`FRONTEND_*`).
type Listener<'a> = (
    Ipv4Addr,
    u16,
    &'a EndpointSets,
    &'a Option<Vec<Ipv4Cidr>>,
    bool,
    u8,
);

/// `internalTrafficPolicy` / `externalTrafficPolicy` value keeping traffic on this node.
const POLICY_LOCAL: &str = "Local";

/// One endpoint of a Service port, with what decides whether new flows may get it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    backend: BackendAddr,
    ready: bool,
    /// Terminating but still serving: used for new flows when none is ready (KEP-1669).
    serving_terminating: bool,
    /// The `serving` condition (unset: as `ready`).
    serving: bool,
    /// The `terminating` condition.
    terminating: bool,
    /// On this node (its `nodeName` is this node's, or the node's name is unknown).
    local: bool,
    /// The endpoint's `hints.forNodes`: none, or whether they name this node.
    node_hint: Hint,
    /// The endpoint's `hints.forZones`: none, or whether they name this node's zone.
    zone_hint: Hint,
}

/// A topology hint of one endpoint, as seen from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hint {
    /// The endpoint carries no hint of this kind.
    Absent,
    /// It carries some; `true` when one names this node (or its zone).
    Present(bool),
}

impl Hint {
    fn of<'a>(hints: Option<impl IntoIterator<Item = &'a str>>, this: Option<&str>) -> Self {
        let Some(hints) = hints else {
            return Self::Absent;
        };
        let mut hints = hints.into_iter().peekable();
        if hints.peek().is_none() {
            return Self::Absent;
        }
        Self::Present(this.is_some_and(|this| hints.any(|hint| hint == this)))
    }
}

/// Which endpoints topology-aware routing leaves to this node's cluster-wide traffic, as
/// kube-proxy decides it from the EndpointSlice controller's hints (`trafficDistribution`,
/// `service.kubernetes.io/topology-mode: Auto`): when every ready endpoint carries node hints
/// and one names this node, the endpoints hinted for this node (`PreferSameNode`); else when
/// every ready endpoint carries zone hints and one names this node's zone, those
/// (`PreferSameZone`); else all. Hints that leave this node nothing are ignored, so that a
/// stale hint never turns a working Service into an empty one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Any,
    SameNode,
    SameZone,
}

impl Topology {
    fn of(candidates: &[Candidate]) -> Self {
        let ready = || candidates.iter().filter(|candidate| candidate.ready);
        let chosen = |hint: fn(&Candidate) -> Hint| {
            ready().all(|candidate| hint(candidate) != Hint::Absent)
                && ready().any(|candidate| hint(candidate) == Hint::Present(true))
        };
        if chosen(|candidate| candidate.node_hint) {
            Self::SameNode
        } else if chosen(|candidate| candidate.zone_hint) {
            Self::SameZone
        } else {
            Self::Any
        }
    }

    fn admits(self, candidate: &Candidate) -> bool {
        match self {
            Self::Any => true,
            Self::SameNode => candidate.node_hint == Hint::Present(true),
            Self::SameZone => candidate.zone_hint == Hint::Present(true),
        }
    }
}

/// The endpoints for new flows and the draining ones among `candidates`, only this node's when
/// `local_only`: the ready ones (of them, only those topology-aware routing leaves to this node
/// when not `local_only`, as kube-proxy applies hints to cluster-wide traffic only), or when none
/// is ready the serving terminating ones (hints aside, as kube-proxy does); the rest drain. An
/// address ready in one slice and not in another counts as ready. An empty local-only set drops
/// (rather than rejects) when the Service's endpoints elsewhere serve some of its traffic
/// (`uses_cluster_endpoints`).
fn choose(
    candidates: &[Candidate],
    local_only: bool,
    uses_cluster_endpoints: bool,
) -> EndpointSets {
    let topology = if local_only {
        Topology::Any
    } else {
        Topology::of(candidates)
    };
    let mut ready = BTreeSet::new();
    let mut fallback = BTreeSet::new();
    let mut draining = BTreeSet::new();
    for candidate in candidates.iter().filter(|c| c.local || !local_only) {
        if candidate.ready && topology.admits(candidate) {
            ready.insert(candidate.backend);
        } else if candidate.ready {
            // Healthy, but hinted for other nodes or zones: flows already on it stay.
            draining.insert(candidate.backend);
        } else {
            if candidate.serving_terminating {
                fallback.insert(candidate.backend);
            }
            draining.insert(candidate.backend);
        }
    }
    let chosen = if ready.is_empty() { fallback } else { ready };
    let usable_elsewhere = candidates.iter().any(|c| c.ready || c.serving_terminating);
    EndpointSets {
        draining: draining.difference(&chosen).copied().collect(),
        drop_when_empty: local_only
            && chosen.is_empty()
            && uses_cluster_endpoints
            && usable_elsewhere,
        backends: chosen.into_iter().collect(),
    }
}

/// The endpoint counts of a Service port and each endpoint's condition bits, from its
/// `candidates`. An address listed in several slices merges its conditions (any slice saying
/// ready makes it ready, as [`choose`] reads it) and counts once.
fn conditions(candidates: &[Candidate]) -> (EndpointCounts, BTreeMap<BackendAddr, u8>) {
    let mut bits: BTreeMap<BackendAddr, u8> = BTreeMap::new();
    for candidate in candidates {
        let mut flags = 0;
        if candidate.ready {
            flags |= BACKEND_READY;
        }
        if candidate.serving {
            flags |= BACKEND_SERVING;
        }
        if candidate.terminating {
            flags |= BACKEND_TERMINATING;
        }
        *bits.entry(candidate.backend).or_default() |= flags;
    }
    let count = |bit: u8| bits.values().filter(|flags| *flags & bit != 0).count() as u32;
    let counts = EndpointCounts {
        ready: count(BACKEND_READY),
        serving: count(BACKEND_SERVING),
        terminating: count(BACKEND_TERMINATING),
    };
    (counts, bits)
}

/// A frontend's endpoints, as [`Frontend::backends`], [`Frontend::draining`] and
/// [`Frontend::drop_when_empty`] hold them.
struct EndpointSets {
    backends: Vec<BackendAddr>,
    draining: Vec<BackendAddr>,
    drop_when_empty: bool,
}

/// Every endpoint of `slices` at the slice port named `port_name` with protocol `proto`.
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: u8,
    node: &NodeConfig,
) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().flatten().find_map(|port| {
            let same_name = port.name.as_deref().unwrap_or_default() == port_name;
            let same_proto = protocol_number(port.protocol.as_deref()) == Some(proto);
            (same_name && same_proto)
                .then_some(port.port)
                .flatten()
                .and_then(|number| u16::try_from(number).ok())
        }) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            let is_ready = conditions
                .and_then(|conditions| conditions.ready)
                .unwrap_or(true);
            // The API: an unset `serving` defers to `ready`; an unset `terminating` is not
            // terminating.
            let is_serving = conditions
                .and_then(|conditions| conditions.serving)
                .unwrap_or(is_ready);
            let is_terminating = conditions
                .and_then(|conditions| conditions.terminating)
                .unwrap_or(false);
            // kube-proxy uses the first address; the API says the others are fungible.
            let Some(addr) = endpoint
                .addresses
                .first()
                .and_then(|address| address.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let local = match &node.node_name {
                Some(this) => endpoint.node_name.as_ref() == Some(this),
                None => true,
            };
            let hints = endpoint.hints.as_ref();
            let node_hint = Hint::of(
                hints
                    .and_then(|hints| hints.for_nodes.as_ref())
                    .map(|nodes| nodes.iter().map(|node| node.name.as_str())),
                node.node_name.as_deref(),
            );
            let zone_hint = Hint::of(
                hints
                    .and_then(|hints| hints.for_zones.as_ref())
                    .map(|zones| zones.iter().map(|zone| zone.name.as_str())),
                node.zone.as_deref(),
            );
            candidates.push(Candidate {
                backend: BackendAddr {
                    addr,
                    port: target,
                    remote: !local,
                },
                ready: is_ready,
                serving_terminating: is_serving && is_terminating,
                serving: is_serving,
                terminating: is_terminating,
                local,
                node_hint,
                zone_hint,
            });
        }
    }
    candidates
}
