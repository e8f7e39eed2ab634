//! `lb backends NAMESPACE/NAME`: every backend entry the pinned maps hold for a Service, frontend
//! by frontend: its slot (or draining), the endpoint's conditions, whether it is on this node,
//! and how many live flows it carries. Read with the reconciler's own reader
//! ([`Reconciler::read`]), so the slots and the draining set are what the agent sees.

use std::path::Path;

use anyhow::Context as _;
use lb_common::{
    net::{addr_from_wire, port_from_wire, proto_name},
    service::{
        BACKEND_DRAINING, BACKEND_READY, BACKEND_REMOTE, BACKEND_SERVING, BACKEND_TERMINATING,
    },
};
use serde::Serialize;

use super::{conntrack::live_flow_counts, format_table, text};
use crate::{dataplane::maps::ServiceMaps, reconcile::Reconciler};

/// One backend entry of one frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// `10.96.0.10:80`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The endpoint: `10.1.1.2:8080`.
    pub backend: String,
    /// Its `LB_BACKENDS` id, which conntrack entries name.
    pub id: u32,
    /// Its slot in the frontend's backend set; `null` while it drains (no new flows).
    pub slot: Option<u32>,
    /// `ready`, `terminating` (serving or not, see `serving`) or `not-ready`: the endpoint's
    /// EndpointSlice conditions when programmed.
    pub state: &'static str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Listed, but new flows never get it (the datapath's draining flag).
    pub draining: bool,
    /// `local` (on this node) or `remote`: external traffic to a remote endpoint gets source NAT
    /// under `externalTrafficPolicy: Cluster`.
    pub node: &'static str,
    /// Live flows (original conntrack entries, not expired) translated to it.
    pub live_flows: usize,
}

/// The condition summary of `flags`.
fn state(flags: u8) -> &'static str {
    if flags & BACKEND_TERMINATING != 0 {
        "terminating"
    } else if flags & BACKEND_READY != 0 {
        "ready"
    } else {
        "not-ready"
    }
}

/// The backend entries of the Service `service` (`NAMESPACE/NAME`), sorted by frontend, then
/// slotted ones in slot order before draining ones. Fails when the maps hold no frontend of it.
pub fn backend_rows(pin_dir: &Path, service: &str) -> anyhow::Result<Vec<BackendRow>> {
    let (namespace, name) = service
        .split_once('/')
        .with_context(|| format!("{service:?}: give the Service as NAMESPACE/NAME"))?;
    let maps = ServiceMaps::open(pin_dir)?;
    let (reconciler, _) = Reconciler::read(&maps)?;
    let flows = live_flow_counts(pin_dir)?;
    let mut rows = Vec::new();
    let mut found = false;
    for frontend in reconciler.held() {
        let Some(info) = frontend.info else { continue };
        if text(&info.namespace) != namespace || text(&info.name) != name {
            continue;
        }
        found = true;
        let address = format!(
            "{}:{}",
            addr_from_wire(frontend.key.addr),
            port_from_wire(frontend.key.port)
        );
        for held in &frontend.backends {
            let endpoint = (held.backend.addr, held.backend.port);
            rows.push(BackendRow {
                port_name: text(&info.port_name),
                frontend: address.clone(),
                protocol: proto_name(frontend.key.proto).to_owned(),
                backend: format!("{}:{}", held.backend.addr, held.backend.port),
                id: held.id,
                slot: held.slot,
                state: state(held.flags),
                ready: held.flags & BACKEND_READY != 0,
                serving: held.flags & BACKEND_SERVING != 0,
                terminating: held.flags & BACKEND_TERMINATING != 0,
                draining: held.flags & BACKEND_DRAINING != 0,
                node: if held.flags & BACKEND_REMOTE != 0 {
                    "remote"
                } else {
                    "local"
                },
                live_flows: flows.get(&(held.id, endpoint)).copied().unwrap_or(0),
            });
        }
    }
    if !found {
        anyhow::bail!(
            "the maps hold no frontend of Service {namespace}/{name} (see `lb services`)"
        );
    }
    // `held` is sorted by key, in wire order: sort by what the reader sees.
    rows.sort_by(|a, b| {
        (
            &a.port_name,
            &a.frontend,
            a.slot.is_none(),
            a.slot,
            &a.backend,
        )
            .cmp(&(
                &b.port_name,
                &b.frontend,
                b.slot.is_none(),
                b.slot,
                &b.backend,
            ))
    });
    Ok(rows)
}

/// `lb backends` as a table.
pub fn backends_table(rows: &[BackendRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let state = if row.terminating && row.serving {
                "terminating,serving".to_owned()
            } else {
                row.state.to_owned()
            };
            vec![
                if row.port_name.is_empty() {
                    "-".to_owned()
                } else {
                    row.port_name.clone()
                },
                format!("{}/{}", row.frontend, row.protocol),
                row.backend.clone(),
                row.id.to_string(),
                row.slot
                    .map_or_else(|| "draining".to_owned(), |slot| slot.to_string()),
                state,
                row.node.to_owned(),
                row.live_flows.to_string(),
            ]
        })
        .collect();
    format_table(
        &[
            "PORT", "FRONTEND", "BACKEND", "ID", "SLOT", "STATE", "NODE", "FLOWS",
        ],
        &cells,
    )
}
