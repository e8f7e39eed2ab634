//! `lb services`: the Service frontends the pinned maps hold, one row each, with what
//! `LB_SVC_INFO` says they are (Service type, kind of address, traffic policies, the generation
//! programmed, endpoint counts) and the endpoints in their slots.

use std::path::Path;

use aya::maps::MapError;
use lb_common::{
    net::proto_name,
    service::{frontend_kind_name, policy_name, service_type_name},
};
use serde::Serialize;

use super::{endpoint_text, format_table, names_in, slotted, sort_by_frontend, when_empty};
use crate::{dataplane::maps::ServiceMaps, reconcile::Refusal};

/// One row of `lb services`: a Service frontend and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// `10.96.0.10:80`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The Service's `spec.type`: `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub service_type: &'static str,
    /// Which of the Service's addresses the frontend is: `ClusterIP`, `ExternalIP`,
    /// `LoadBalancer` (an ingress IP) or `NodePort` (a node address).
    pub frontend_kind: &'static str,
    /// `spec.internalTrafficPolicy` (`Cluster` or `Local`): ClusterIP frontends follow it.
    pub internal_traffic_policy: &'static str,
    /// `spec.externalTrafficPolicy`: every other frontend follows it.
    pub external_traffic_policy: &'static str,
    /// The Service's `metadata.generation` programmed (0: the object has none, as a manifest).
    pub generation: u64,
    /// Endpoints of the Service port, on every node, that are ready.
    pub ready: u32,
    /// ... that are serving (ready, or terminating and still serving).
    pub serving: u32,
    /// ... that are terminating.
    pub terminating: u32,
    /// `10.1.1.2:8080`, in slot order: the endpoints new flows are spread over.
    pub endpoints: Vec<String>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// With no endpoint: `reject` (ICMP port unreachable) or `drop` (a `Local` traffic policy
    /// and endpoints only on other nodes).
    pub when_empty: &'static str,
    /// Set when the agent could not program the frontend for lack of room in a map: which map,
    /// and whether the frontend is missing or kept its previous entries (from the agent's state
    /// directory).
    pub refused: Option<String>,
}

super::frontend_row!(ServiceRow);

/// What `lb services` says about a refused frontend.
fn refusal_text(refusal: &Refusal) -> String {
    format!(
        "{} full ({} entries): {}",
        refusal.map,
        refusal.capacity,
        if refusal.stale {
            "update refused, previous entries kept"
        } else {
            "not programmed"
        }
    )
}

/// The row of a frontend the maps lack because a map was full.
fn missing_row(refusal: &Refusal) -> ServiceRow {
    const UNKNOWN: &str = "-";
    let (frontend, protocol) = refusal
        .frontend
        .rsplit_once('/')
        .unwrap_or((&refusal.frontend, UNKNOWN));
    ServiceRow {
        namespace: refusal.namespace.clone(),
        name: refusal.name.clone(),
        port_name: refusal.port_name.clone(),
        frontend: frontend.to_owned(),
        protocol: protocol.to_owned(),
        service_type: UNKNOWN,
        frontend_kind: UNKNOWN,
        internal_traffic_policy: UNKNOWN,
        external_traffic_policy: UNKNOWN,
        generation: 0,
        ready: 0,
        serving: 0,
        terminating: 0,
        endpoints: Vec::new(),
        affinity_timeout_s: 0,
        when_empty: UNKNOWN,
        refused: Some(refusal_text(refusal)),
    }
}

/// Which Services `lb services` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFilter {
    /// `-n NAMESPACE`.
    pub namespace: Option<String>,
    /// The optional `NAME` argument.
    pub name: Option<String>,
}

impl ServiceFilter {
    fn admits(&self, row: &ServiceRow) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == row.namespace)
            && self.name.as_ref().is_none_or(|name| *name == row.name)
    }
}

/// The Service frontends the pinned maps hold that `filter` admits, sorted by namespace, name,
/// port name and frontend.
///
/// `refusals` are the frontends the agent reported it could not program for lack of room: the
/// rows of those the maps hold are flagged, and those they lack get a row of their own.
pub fn service_rows(
    pin_dir: &Path,
    filter: &ServiceFilter,
    refusals: &[Refusal],
) -> anyhow::Result<Vec<ServiceRow>> {
    let maps = ServiceMaps::open(pin_dir)?;
    let mut rows = Vec::new();
    for entry in maps.services.iter() {
        let (key, value) = entry?;
        let info = match maps.info.get(&value.service_id, 0) {
            Ok(info) => Some(info),
            Err(MapError::KeyNotFound) => None,
            Err(error) => return Err(error.into()),
        };
        let names = names_in(info.as_ref());
        let endpoints = slotted(&maps, &value)?
            .into_iter()
            .map(|(_, held)| match held {
                Some((_, backend)) => endpoint_text(backend.addr, backend.port),
                None => "<missing slot>".to_owned(),
            })
            .collect();
        let info = info.unwrap_or_default();
        let row = ServiceRow {
            namespace: names.namespace,
            name: names.name,
            port_name: names.port_name,
            frontend: endpoint_text(key.addr, key.port),
            protocol: proto_name(key.proto).to_owned(),
            service_type: service_type_name(info.service_type),
            frontend_kind: frontend_kind_name(info.frontend_kind),
            internal_traffic_policy: policy_name(info.internal_policy),
            external_traffic_policy: policy_name(info.external_policy),
            generation: info.generation,
            ready: info.ready,
            serving: info.serving,
            terminating: info.terminating,
            endpoints,
            affinity_timeout_s: value.affinity_timeout_s,
            when_empty: when_empty(value.flags),
            refused: None,
        };
        if filter.admits(&row) {
            rows.push(row);
        }
    }
    for refusal in refusals {
        let held = rows
            .iter_mut()
            .find(|row| format!("{}/{}", row.frontend, row.protocol) == refusal.frontend);
        match held {
            Some(row) => row.refused = Some(refusal_text(refusal)),
            None => {
                let row = missing_row(refusal);
                if filter.admits(&row) {
                    rows.push(row);
                }
            }
        }
    }
    sort_by_frontend(&mut rows);
    Ok(rows)
}

/// `lb services` as a table.
pub fn services_table(rows: &[ServiceRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.namespace.clone(),
                row.name.clone(),
                if row.port_name.is_empty() {
                    "-".to_owned()
                } else {
                    row.port_name.clone()
                },
                row.service_type.to_owned(),
                row.frontend_kind.to_owned(),
                format!("{}/{}", row.frontend, row.protocol),
                format!(
                    "{}/{}",
                    row.internal_traffic_policy, row.external_traffic_policy
                ),
                format!("{}/{}/{}", row.ready, row.serving, row.terminating),
                row.generation.to_string(),
                if row.endpoints.is_empty() {
                    format!("<none: {}>", row.when_empty)
                } else {
                    row.endpoints.join(",")
                },
                if row.affinity_timeout_s == 0 {
                    "-".to_owned()
                } else {
                    format!("ClientIP {}s", row.affinity_timeout_s)
                },
                row.refused.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    format_table(
        &[
            "NAMESPACE",
            "NAME",
            "PORT",
            "TYPE",
            "VIA",
            "FRONTEND",
            "POLICY(INT/EXT)",
            "READY/SERVING/TERM",
            "GEN",
            "ENDPOINTS",
            "AFFINITY",
            "FLAG",
        ],
        &cells,
    )
}
