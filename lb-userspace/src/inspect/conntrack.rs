//! `lb conntrack`: the flows `LB_CONNTRACK` tracks, as an operator asks about them ("which
//! backend did this client get, since when, is it closing"), and `lb conntrack flush` for the
//! flows of one Service or backend (as `conntrack -D` does for kube-proxy's flows).
//!
//! Each flow has two entries: the original direction (client → frontend, holding the backend)
//! and the reply direction (backend → client or the source NAT address, holding the frontend).
//! A row is one flow, read from its original entry; entries past their lifetime are not flows
//! any more (the datapath ignores them) and are not listed.

use std::{net::Ipv4Addr, path::Path, str::FromStr};

use anyhow::{Context as _, bail};
use lb_common::{
    conntrack::{
        DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey, FlowState, SEEN_FIN, SEEN_REPLY, SEEN_RST,
        is_expired, lifetime_ns,
    },
    net::{IPPROTO_TCP, addr_from_wire, port_from_wire, proto_name},
    service::ServiceInfo,
};
use serde::Serialize;

use super::{format_table, text};
use crate::dataplane::maps::{ServiceMaps, open_conntrack};

/// Nanoseconds per second, for ages shown in seconds.
const NS_PER_SECOND: u64 = 1_000_000_000;

/// One tracked flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The Service the flow reached (`namespace/name`), `<unknown>` once its frontend is gone.
    pub service: String,
    /// The client, as it sent the flow: `10.0.0.2:40312`.
    pub client: String,
    /// The frontend it sent to: `10.96.0.10:80`.
    pub frontend: String,
    /// Where the flow's packets reach the backend from: the client, or the node's address and
    /// port under source NAT.
    pub source: String,
    /// The backend the flow was given: `10.1.1.2:8080`.
    pub backend: String,
    /// `unreplied`, `established`, `closing` (FIN seen), `reset` (RST seen), or for UDP
    /// `unreplied` / `replied`.
    pub state: &'static str,
    /// Seconds since the flow's first packet.
    pub age_s: u64,
    /// Seconds since its last packet (as the datapath refreshes it: at most once a second).
    pub idle_s: u64,
    /// Seconds of idleness left before it is forgotten.
    pub expires_in_s: u64,
}

/// Which flows a command is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// `namespace/name` of the Service.
    pub service: Option<String>,
    /// The backend's address, and port if given.
    pub backend: Option<BackendFilter>,
}

/// `--backend IP[:PORT]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendFilter {
    pub addr: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for BackendFilter {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let (addr, port) = match text.rsplit_once(':') {
            Some((addr, port)) => (
                addr,
                Some(
                    port.parse()
                        .with_context(|| format!("{text}: the port is not a number"))?,
                ),
            ),
            None => (text, None),
        };
        let addr = addr
            .parse()
            .with_context(|| format!("{text}: not an IPv4 address (IP or IP:PORT)"))?;
        Ok(Self { addr, port })
    }
}

impl FlowFilter {
    fn admits(&self, row: &FlowRow, backend: (Ipv4Addr, u16)) -> bool {
        self.service
            .as_ref()
            .is_none_or(|service| *service == row.service)
            && self.backend.is_none_or(|wanted| {
                wanted.addr == backend.0 && wanted.port.is_none_or(|port| port == backend.1)
            })
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, which stamps the entries.
fn monotonic_ns() -> anyhow::Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        bail!(
            "reading CLOCK_MONOTONIC: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(u64::try_from(now.tv_sec)? * NS_PER_SECOND + u64::try_from(now.tv_nsec)?)
}

fn state_name(proto: u8, flags: u8) -> &'static str {
    if flags & SEEN_REPLY == 0 {
        "unreplied"
    } else if proto != IPPROTO_TCP {
        "replied"
    } else if flags & SEEN_RST != 0 {
        "reset"
    } else if flags & SEEN_FIN != 0 {
        "closing"
    } else {
        "established"
    }
}

/// The reply entry's key of the flow whose original entry is `key` / `state`.
fn reply_key(key: &FlowKey, state: &FlowState) -> FlowKey {
    let to = if state.snat_addr != 0 {
        (state.snat_addr, state.snat_port)
    } else {
        (key.src_addr, key.src_port)
    };
    FlowKey::new(
        (state.nat_addr, state.nat_port),
        to,
        key.proto,
        DIRECTION_REPLY,
    )
}

/// A flow: its original entry, its row, and its backend.
struct Flow {
    key: FlowKey,
    state: FlowState,
    row: FlowRow,
    backend: (Ipv4Addr, u16),
}

/// Every live flow of the pinned conntrack map.
fn live_flows(pin_dir: &Path) -> anyhow::Result<Vec<Flow>> {
    let conntrack = open_conntrack(pin_dir)?;
    let maps = ServiceMaps::open(pin_dir)?;
    let now = monotonic_ns()?;
    let mut flows = Vec::new();
    for entry in conntrack.iter() {
        // An entry evicted while we walk the map ends the walk's view of it, not the command.
        let Ok((key, state)) = entry else { continue };
        if key.direction != DIRECTION_ORIGINAL || is_expired(&state, key.proto, now) {
            continue;
        }
        let reply = conntrack.get(&reply_key(&key, &state), 0).ok();
        let last_seen = reply
            .map_or(state.last_seen_ns, |reply| reply.last_seen_ns)
            .max(state.last_seen_ns);
        let idle = now.saturating_sub(last_seen);
        let service = maps
            .info
            .get(&state.service_id, 0)
            .map(|info: ServiceInfo| format!("{}/{}", text(&info.namespace), text(&info.name)))
            .unwrap_or_else(|_| "<unknown>".to_owned());
        let backend = (
            addr_from_wire(state.nat_addr),
            port_from_wire(state.nat_port),
        );
        let source = if state.snat_addr == 0 {
            (addr_from_wire(key.src_addr), port_from_wire(key.src_port))
        } else {
            (
                addr_from_wire(state.snat_addr),
                port_from_wire(state.snat_port),
            )
        };
        let endpoint = |(addr, port): (Ipv4Addr, u16)| format!("{addr}:{port}");
        let row = FlowRow {
            protocol: proto_name(key.proto).to_owned(),
            service,
            client: endpoint((addr_from_wire(key.src_addr), port_from_wire(key.src_port))),
            frontend: endpoint((addr_from_wire(key.dst_addr), port_from_wire(key.dst_port))),
            source: endpoint(source),
            backend: endpoint(backend),
            state: state_name(key.proto, state.tcp_flags),
            age_s: now.saturating_sub(state.created_ns) / NS_PER_SECOND,
            idle_s: idle / NS_PER_SECOND,
            expires_in_s: lifetime_ns(key.proto, state.tcp_flags).saturating_sub(idle)
                / NS_PER_SECOND,
        };
        flows.push(Flow {
            key,
            state,
            row,
            backend,
        });
    }
    flows.sort_by(|a, b| {
        (&a.row.service, &a.row.frontend, &a.row.client).cmp(&(
            &b.row.service,
            &b.row.frontend,
            &b.row.client,
        ))
    });
    Ok(flows)
}

/// Live flows by backend id and backend address and port (see [`live_flow_counts`]).
pub type FlowCounts = std::collections::BTreeMap<(u32, (Ipv4Addr, u16)), usize>;

/// The number of live flows on each backend, by backend id and the address and port the flows
/// were translated to: a flow counts for a backend entry only while that entry still holds its
/// address, as the datapath honours it only then (an id freed and reused names another
/// endpoint).
pub fn live_flow_counts(pin_dir: &Path) -> anyhow::Result<FlowCounts> {
    let mut counts = std::collections::BTreeMap::new();
    for flow in live_flows(pin_dir)? {
        *counts
            .entry((flow.state.backend_id, flow.backend))
            .or_default() += 1;
    }
    Ok(counts)
}

/// The live flows `filter` admits, sorted by Service, frontend and client.
pub fn flow_rows(pin_dir: &Path, filter: &FlowFilter) -> anyhow::Result<Vec<FlowRow>> {
    Ok(live_flows(pin_dir)?
        .into_iter()
        .filter(|flow| filter.admits(&flow.row, flow.backend))
        .map(|flow| flow.row)
        .collect())
}

/// Forgets the flows `filter` admits (both entries of each); returns how many. Their next packet
/// is a new flow: a TCP connection then usually breaks, as with `conntrack -D`. An empty filter
/// is refused: flushing every flow is `lb reset`'s business.
pub fn flush(pin_dir: &Path, filter: &FlowFilter) -> anyhow::Result<usize> {
    if filter.service.is_none() && filter.backend.is_none() {
        bail!("say which flows to forget: --service NAMESPACE/NAME and/or --backend IP[:PORT]");
    }
    let mut conntrack = open_conntrack(pin_dir)?;
    let mut flushed = 0;
    for flow in live_flows(pin_dir)? {
        if !filter.admits(&flow.row, flow.backend) {
            continue;
        }
        // Reply entry first: a packet between the two deletes then finds no half flow that
        // would translate replies of a flow whose originals start afresh.
        let _ = conntrack.remove(&reply_key(&flow.key, &flow.state));
        let _ = conntrack.remove(&flow.key);
        flushed += 1;
    }
    Ok(flushed)
}

/// `lb conntrack` as a table.
pub fn flows_table(rows: &[FlowRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.service.clone(),
                row.protocol.clone(),
                row.client.clone(),
                row.frontend.clone(),
                if row.source == row.client {
                    "-".to_owned()
                } else {
                    row.source.clone()
                },
                row.backend.clone(),
                row.state.to_owned(),
                format!("{}s", row.age_s),
                format!("{}s", row.idle_s),
            ]
        })
        .collect();
    format_table(
        &[
            "SERVICE", "PROTO", "CLIENT", "FRONTEND", "SNAT", "BACKEND", "STATE", "AGE", "IDLE",
        ],
        &cells,
    )
}
