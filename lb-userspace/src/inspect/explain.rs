//! `lb explain`: runs the live program (the one attached to an interface, through its pinned
//! link) on a synthesized packet with `BPF_PROG_TEST_RUN`, against the live maps, and says what it
//! decided. The packet carries an explain request in its XDP metadata, so the program writes
//! nothing: no conntrack or affinity entry, no counter (see `lb_common::explain`).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    str::FromStr,
};

use anyhow::{Context as _, bail};
use aya::maps::MapError;
use lb_common::{
    checksum::checksum,
    explain::{
        EXPLAIN_DONE, NO_ID, STEP_FRONTEND, STEP_RANDOM, STEP_REPLY, STEP_SOURCE_ALLOWED,
        STEP_STALE_ENTRY, STEP_TRACKED, TRACE_LEN, Trace,
    },
    limits::LINKS_SUBDIR,
    net::{IPPROTO_TCP, IPPROTO_UDP, addr_to_wire, port_to_wire},
    service::{
        BACKEND_DRAINING, BACKEND_REMOTE, BACKEND_TERMINATING, FRONTEND_CLUSTER_IP,
        SERVICE_SNAT_REMOTE, SERVICE_SOURCE_RANGES, ServiceInfo, ServiceKey, frontend_kind_name,
        policy_name,
    },
    stats::Counter,
};
use serde::Serialize;

use crate::{
    dataplane::{attached_interfaces, maps::ServiceMaps, system},
    inspect::{endpoint_text, format_table, frontend_names, service_label, slotted, when_empty},
};

/// The client port of a synthesized packet when `--from` gives none: the top of Linux's default
/// ephemeral range, where a real client's port of a new flow would come from.
pub const DEFAULT_CLIENT_PORT: u16 = 60_999;
/// The source MAC of a synthesized frame: locally administered, so it names no real machine.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// IPv4 version 4, five 32-bit words of header.
const VERSION_IHL: u8 = 0x45;
/// Don't fragment, as TCP stacks send.
const IP_DF: u16 = 0x4000;
/// TTL of a packet fresh from its sender.
const CLIENT_TTL: u8 = 64;
/// A TCP header of five 32-bit words, in the data offset's high nibble.
const TCP_DATA_OFFSET: u8 = 5 << 4;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// A common initial window.
const TCP_WINDOW: u16 = 64_240;
/// Room for a program that grows the packet (a reject adds headers in front).
const OUTPUT_SLACK: usize = 256;
/// XDP actions (`enum xdp_action`).
const XDP_ACTIONS: [&str; 5] = [
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_TX",
    "XDP_REDIRECT",
];
const IPPROTO_ICMP: u8 = 1;

/// `--to IP:PORT/PROTO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: SocketAddrV4,
    pub proto: u8,
}

impl FromStr for Destination {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (addr, proto) = text.rsplit_once('/').unwrap_or((text, "tcp"));
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            other => bail!("protocol {other:?}: lb translates tcp and udp"),
        };
        let addr = addr
            .parse()
            .with_context(|| format!("{addr:?} is not an IPv4 address and port (10.96.0.10:80)"))?;
        Ok(Self { addr, proto })
    }
}

/// `--from IP[:PORT]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client(pub SocketAddrV4);

impl FromStr for Client {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        if let Ok(addr) = text.parse::<SocketAddrV4>() {
            return Ok(Self(addr));
        }
        let addr: Ipv4Addr = text
            .parse()
            .with_context(|| format!("{text:?} is not an IPv4 address, with or without a port"))?;
        Ok(Self(SocketAddrV4::new(addr, DEFAULT_CLIENT_PORT)))
    }
}

/// What to explain.
#[derive(Clone, Debug)]
pub struct Request {
    pub from: SocketAddrV4,
    pub to: Destination,
    /// The interface the packet arrives on; default: the attached one on the client's subnet,
    /// else the first attached one.
    pub interface: Option<String>,
    /// A TCP packet of an established connection (ACK) rather than its first (SYN).
    pub established: bool,
}

/// An endpoint new flows may be given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub slot: u32,
    pub backend_id: u32,
    /// `10.1.1.2:8080`.
    pub endpoint: String,
    /// On another node.
    pub remote: bool,
    /// Terminating (and still serving): in the slots only because no endpoint is ready.
    pub terminating: bool,
}

/// The frontend a packet matched, and its policies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub service: String,
    pub service_id: u32,
    /// `10.96.0.10:80/TCP`.
    pub frontend: String,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without.
    pub affinity_timeout_s: u32,
    /// Only clients inside `loadBalancerSourceRanges` are admitted.
    pub source_ranges: bool,
    /// External traffic to endpoints on other nodes gets source NAT (`externalTrafficPolicy:
    /// Cluster`).
    pub snat_remote: bool,
    /// With no endpoint here: `reject` or `drop` (a `Local` policy with endpoints elsewhere).
    pub when_empty: &'static str,
    /// Which of the Service's addresses this is: `ClusterIP`, `NodePort`, `LoadBalancer`,
    /// `ExternalIP`.
    pub via: &'static str,
    /// The traffic policy this frontend follows (`internalTrafficPolicy` for a ClusterIP,
    /// `externalTrafficPolicy` for the others): `Cluster` or `Local` (only this node's
    /// endpoints).
    pub traffic_policy: &'static str,
    /// No endpoint is ready: the serving terminating ones take new flows (KEP-1669).
    pub terminating_fallback: bool,
    /// The slots of its current backend set.
    pub candidates: Vec<Candidate>,
}

/// What the program decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub interface: String,
    /// `TCP 10.0.0.2:40000 -> 10.96.0.10:80 SYN`.
    pub packet: String,
    pub frontend: Option<Matched>,
    /// How the backend was found: `new flow, random among N`, `tracked flow`, `session
    /// affinity`, `reply of a tracked flow`, or nothing.
    pub decision: Option<String>,
    /// The backend chosen or followed.
    pub backend: Option<String>,
    pub backend_id: Option<u32>,
    /// The packet as the program sent it on: `TCP 10.0.0.2:40000 -> 10.1.1.3:8080`, or the ICMP
    /// error built in its place.
    pub rewritten: Option<String>,
    /// The counter the packet would be counted under (`redirect_service`, `drop_source_range`,
    /// `reject_no_endpoints`, ...).
    pub verdict: &'static str,
    /// The XDP action.
    pub action: &'static str,
    /// Every other counter that would have moved.
    pub events: Vec<&'static str>,
    /// The branches taken (`frontend`, `source range admitted`, `tracked`, ...).
    pub steps: Vec<&'static str>,
}

/// Steps in the order the program takes them, with their names.
const STEPS: [(u32, &str); 6] = [
    (STEP_FRONTEND, "frontend matched"),
    (STEP_SOURCE_ALLOWED, "source range admitted the client"),
    (STEP_TRACKED, "followed the flow's conntrack entry"),
    (
        STEP_STALE_ENTRY,
        "conntrack entry no longer valid: new choice",
    ),
    (STEP_RANDOM, "random choice among the slots"),
    (STEP_REPLY, "reply of a tracked flow"),
];

/// What `getifaddrs` says about an interface of this network namespace.
#[derive(Clone, Debug, Default)]
struct Interface {
    mac: Option<[u8; 6]>,
    /// Its IPv4 addresses with their prefix lengths.
    networks: Vec<(Ipv4Addr, u32)>,
}

/// Every interface of the calling thread's network namespace, by name (sysfs may show another
/// namespace's).
fn interfaces() -> anyhow::Result<std::collections::BTreeMap<String, Interface>> {
    let mut found = std::collections::BTreeMap::<String, Interface>::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let current = unsafe { &*entry };
        entry = current.ifa_next;
        if current.ifa_addr.is_null() || current.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(current.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let interface = found.entry(name).or_default();
        // SAFETY: `ifa_addr` is non-null, and its family says which sockaddr it is.
        unsafe {
            match i32::from((*current.ifa_addr).sa_family) {
                libc::AF_PACKET => {
                    let link = &*(current.ifa_addr as *const libc::sockaddr_ll);
                    if usize::from(link.sll_halen) == 6 {
                        let mut mac = [0u8; 6];
                        mac.copy_from_slice(&link.sll_addr[..6]);
                        interface.mac = Some(mac);
                    }
                }
                libc::AF_INET if !current.ifa_netmask.is_null() => {
                    let addr = &*(current.ifa_addr as *const libc::sockaddr_in);
                    let mask = &*(current.ifa_netmask as *const libc::sockaddr_in);
                    interface.networks.push((
                        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                        u32::from_be(mask.sin_addr.s_addr).count_ones(),
                    ));
                }
                _ => {}
            }
        }
    }
    // SAFETY: the list getifaddrs returned, not used after this.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// Whether `addr` lies in `network`/`prefix`.
fn contains((network, prefix): (Ipv4Addr, u32), addr: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(network) & mask == u32::from(addr) & mask
}

/// The interface a packet from `client` arrives on: the attached one on the client's subnet,
/// else the first attached one.
fn ingress_for(
    attached: &[String],
    interfaces: &std::collections::BTreeMap<String, Interface>,
    client: Ipv4Addr,
) -> Option<String> {
    attached
        .iter()
        .find(|name| {
            interfaces.get(*name).is_some_and(|interface| {
                interface
                    .networks
                    .iter()
                    .any(|network| contains(*network, client))
            })
        })
        .or_else(|| attached.first())
        .cloned()
}

/// An Ethernet frame carrying the first packet of a flow (`established`: a later one) from
/// `from` to `to`, with valid checksums.
pub fn synthesize(
    from: SocketAddrV4,
    to: Destination,
    dst_mac: [u8; 6],
    established: bool,
) -> Vec<u8> {
    let l4_len = if to.proto == IPPROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    let mut frame = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + l4_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&ETH_P_IPV4.to_be_bytes());

    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = VERSION_IHL;
    ip[2..4].copy_from_slice(&((IPV4_HLEN + l4_len) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = CLIENT_TTL;
    ip[9] = to.proto;
    ip[12..16].copy_from_slice(&from.ip().octets());
    ip[16..20].copy_from_slice(&to.addr.ip().octets());
    let ip_check = checksum(0, &ip);
    ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    frame.extend_from_slice(&ip);

    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&from.port().to_be_bytes());
    l4[2..4].copy_from_slice(&to.addr.port().to_be_bytes());
    if to.proto == IPPROTO_TCP {
        l4[12] = TCP_DATA_OFFSET;
        l4[13] = if established { TCP_ACK } else { TCP_SYN };
        l4[14..16].copy_from_slice(&TCP_WINDOW.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    let mut pseudo = Vec::with_capacity(12 + l4_len);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.addr.ip().octets());
    pseudo.extend_from_slice(&[0, to.proto]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let l4_check = checksum(0, &pseudo);
    let check_offset = if to.proto == IPPROTO_TCP { 16 } else { 6 };
    l4[check_offset..check_offset + 2].copy_from_slice(&l4_check.to_ne_bytes());
    frame.extend_from_slice(&l4);
    frame
}

/// `TCP 10.0.0.2:40000 -> 10.1.1.3:8080`, or what the frame holds instead, as the program left
/// it.
fn describe(frame: &[u8]) -> Option<String> {
    let ip = frame.get(ETH_HLEN..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let proto = *ip.get(9)?;
    let src = Ipv4Addr::new(*ip.get(12)?, ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(*ip.get(16)?, ip[17], ip[18], ip[19]);
    let l4 = ip.get(ihl..)?;
    let port = |offset: usize| Some(u16::from_be_bytes([*l4.get(offset)?, *l4.get(offset + 1)?]));
    Some(match proto {
        IPPROTO_TCP | IPPROTO_UDP => format!(
            "{} {src}:{} -> {dst}:{}",
            if proto == IPPROTO_TCP { "TCP" } else { "UDP" },
            port(0)?,
            port(2)?
        ),
        IPPROTO_ICMP => format!(
            "ICMP type {} code {} from {src} to {dst}",
            l4.first()?,
            l4.get(1)?
        ),
        other => format!("IP protocol {other} {src} -> {dst}"),
    })
}

/// The frontend `to` names in the maps, if any, with its candidates.
fn matched(maps: &ServiceMaps, key: &ServiceKey) -> anyhow::Result<Option<Matched>> {
    let value = match maps.services.get(key, 0) {
        Ok(value) => value,
        Err(MapError::KeyNotFound) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let names = frontend_names(maps, value.service_id)?;
    let candidates: Vec<Candidate> = slotted(maps, &value)?
        .into_iter()
        .filter_map(|(slot, held)| {
            let (id, backend) = held?;
            (backend.flags & BACKEND_DRAINING == 0).then(|| Candidate {
                slot,
                backend_id: id,
                endpoint: endpoint_text(backend.addr, backend.port),
                remote: backend.flags & BACKEND_REMOTE != 0,
                terminating: backend.flags & BACKEND_TERMINATING != 0,
            })
        })
        .collect();
    let info = match maps.info.get(&value.service_id, 0) {
        Ok(info) => info,
        Err(MapError::KeyNotFound) => ServiceInfo::default(),
        Err(error) => return Err(error.into()),
    };
    let policy = if info.frontend_kind == FRONTEND_CLUSTER_IP {
        info.internal_policy
    } else {
        info.external_policy
    };
    Ok(Some(Matched {
        service: service_label(&names.namespace, &names.name, &names.port_name),
        service_id: value.service_id,
        frontend: format!(
            "{}/{}",
            endpoint_text(key.addr, key.port),
            lb_common::net::proto_name(key.proto)
        ),
        affinity_timeout_s: value.affinity_timeout_s,
        source_ranges: value.flags & SERVICE_SOURCE_RANGES != 0,
        snat_remote: value.flags & SERVICE_SNAT_REMOTE != 0,
        when_empty: when_empty(value.flags),
        via: frontend_kind_name(info.frontend_kind),
        traffic_policy: policy_name(policy),
        terminating_fallback: !candidates.is_empty()
            && candidates.iter().all(|candidate| candidate.terminating),
        candidates,
    }))
}

/// The endpoint backend `id` holds.
fn backend_endpoint(maps: &ServiceMaps, id: u32) -> anyhow::Result<String> {
    let backend = maps.backends.get(&id, 0)?;
    Ok(endpoint_text(backend.addr, backend.port))
}

/// Runs the live program on the packet `request` describes; see the module documentation.
pub fn explain(pin_dir: &Path, request: &Request) -> anyhow::Result<Explanation> {
    let interfaces = interfaces()?;
    let interface = match &request.interface {
        Some(interface) => interface.clone(),
        None => ingress_for(
            &attached_interfaces(pin_dir)?,
            &interfaces,
            *request.from.ip(),
        )
        .with_context(|| {
            format!(
                "the program is attached to no interface under {}: start `lb agent` first",
                pin_dir.display()
            )
        })?,
    };
    let link = pin_dir.join(LINKS_SUBDIR).join(&interface);
    if !link.exists() {
        bail!(
            "the program is not attached to {interface} (no link pinned at {})",
            link.display()
        );
    }
    let program_id = system::pinned_link_program_id(&link)?;
    let program = system::program_by_id(program_id)
        .with_context(|| format!("opening program {program_id} (needs root: CAP_SYS_ADMIN)"))?;
    let ifindex = system::interface_index(&interface)?;

    let frame = synthesize(
        request.from,
        request.to,
        interfaces
            .get(&interface)
            .and_then(|interface| interface.mac)
            .with_context(|| format!("{interface} has no Ethernet address"))?,
        request.established,
    );
    let mut data = bytemuck::bytes_of(&Trace::request()).to_vec();
    data.extend_from_slice(&frame);
    let (action, output) = system::test_run_xdp_with_metadata(
        &program,
        &data,
        TRACE_LEN as u32,
        ifindex,
        data.len() + OUTPUT_SLACK,
    )?;
    let trace: Trace = bytemuck::pod_read_unaligned(
        output
            .get(..TRACE_LEN)
            .context("the program returned no metadata")?,
    );
    if trace.magic != EXPLAIN_DONE {
        bail!(
            "program {program_id} on {interface} did not answer the explain request (an lb build \
             older than `lb explain` is attached?): it ran as on a real packet, which may have \
             recorded a flow; restart the agent with this build"
        );
    }

    let maps = ServiceMaps::open(pin_dir)?;
    let key = ServiceKey {
        addr: addr_to_wire(*request.to.addr.ip()),
        port: port_to_wire(request.to.addr.port()),
        proto: request.to.proto,
        _pad: 0,
    };
    let frontend = if trace.steps & STEP_FRONTEND != 0 {
        matched(&maps, &key)?
    } else {
        None
    };
    let backend_id = (trace.backend_id != NO_ID).then_some(trace.backend_id);
    let backend = backend_id
        .map(|id| backend_endpoint(&maps, id))
        .transpose()?;
    let affinity = trace.events & (1 << Counter::AffinityHit as u32) != 0;
    let decision = if trace.steps & STEP_REPLY != 0 {
        Some("reply of a tracked flow: back to its client".to_owned())
    } else if trace.steps & STEP_TRACKED != 0 {
        Some("tracked flow: follows its conntrack entry".to_owned())
    } else if affinity {
        Some("session affinity: the client's last endpoint".to_owned())
    } else if trace.steps & STEP_RANDOM != 0 {
        Some(format!("new flow: random among {} slots", trace.candidates))
    } else {
        None
    };
    let verdict = Counter::from_index(trace.verdict)
        .with_context(|| format!("the program returned verdict {}", trace.verdict))?;
    let events = Counter::ALL
        .iter()
        .filter(|counter| **counter != verdict && trace.events & (1 << **counter as u32) != 0)
        .map(|counter| counter.name())
        .collect();
    let steps = STEPS
        .iter()
        .filter(|(bit, _)| trace.steps & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    let rewritten = match verdict.kind() {
        lb_common::stats::CounterKind::Drop | lb_common::stats::CounterKind::Pass => None,
        _ => describe(&output[TRACE_LEN..]),
    };
    Ok(Explanation {
        interface,
        packet: format!(
            "{}{}",
            describe(&frame).unwrap_or_default(),
            match (request.to.proto, request.established) {
                (IPPROTO_TCP, false) => " SYN",
                (IPPROTO_TCP, true) => " ACK",
                _ => "",
            }
        ),
        frontend,
        decision,
        backend,
        backend_id,
        rewritten,
        verdict: verdict.name(),
        action: XDP_ACTIONS
            .get(action as usize)
            .copied()
            .unwrap_or("unknown"),
        events,
        steps,
    })
}

/// `lb explain` for people: one line per finding.
pub fn explanation_text(explanation: &Explanation) -> String {
    let mut rows: Vec<Vec<String>> = vec![vec![
        "packet".to_owned(),
        format!("{} on {}", explanation.packet, explanation.interface),
    ]];
    match &explanation.frontend {
        Some(frontend) => {
            rows.push(vec![
                "service".to_owned(),
                format!(
                    "{} ({} via {}, id {})",
                    frontend.service, frontend.frontend, frontend.via, frontend.service_id
                ),
            ]);
            let mut policies = vec![
                format!("traffic policy {}", frontend.traffic_policy),
                format!("when empty: {}", frontend.when_empty),
            ];
            if frontend.terminating_fallback {
                policies.push(
                    "terminating fallback: no endpoint is ready, serving terminating ones take \
                     new flows"
                        .to_owned(),
                );
            }
            if frontend.affinity_timeout_s > 0 {
                policies.push(format!(
                    "affinity ClientIP {}s",
                    frontend.affinity_timeout_s
                ));
            }
            if frontend.source_ranges {
                policies.push("loadBalancerSourceRanges".to_owned());
            }
            if frontend.snat_remote {
                policies.push("source NAT to remote endpoints".to_owned());
            }
            rows.push(vec!["policies".to_owned(), policies.join(", ")]);
            let candidates: Vec<String> = frontend
                .candidates
                .iter()
                .map(|candidate| {
                    format!(
                        "{}{}{}",
                        candidate.endpoint,
                        if candidate.remote { " (remote)" } else { "" },
                        if candidate.terminating {
                            " (terminating)"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            rows.push(vec![
                "candidates".to_owned(),
                if candidates.is_empty() {
                    "none".to_owned()
                } else {
                    candidates.join(", ")
                },
            ]);
        }
        None if explanation.steps.contains(&"reply of a tracked flow") => {}
        None => rows.push(vec!["service".to_owned(), "none matched".to_owned()]),
    }
    for step in &explanation.steps {
        rows.push(vec!["step".to_owned(), (*step).to_owned()]);
    }
    if let Some(decision) = &explanation.decision {
        rows.push(vec!["decision".to_owned(), decision.clone()]);
    }
    if let Some(backend) = &explanation.backend {
        rows.push(vec!["backend".to_owned(), backend.clone()]);
    }
    if let Some(rewritten) = &explanation.rewritten {
        rows.push(vec!["sent as".to_owned(), rewritten.clone()]);
    }
    rows.push(vec![
        "verdict".to_owned(),
        format!("{} ({})", explanation.verdict, explanation.action),
    ]);
    if !explanation.events.is_empty() {
        rows.push(vec!["events".to_owned(), explanation.events.join(", ")]);
    }
    rows.push(vec![
        "live state".to_owned(),
        "unchanged (no conntrack or affinity entry, no counter)".to_owned(),
    ]);
    // The header line of `format_table` is dropped: these are labelled lines, not a table.
    format_table(&["", ""], &rows)
        .split_once('\n')
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_default()
}
