//! Inspection commands. They read the pinned maps directly, like bpftool, so they answer while
//! the agent is down; human tables by default, JSON for scripts.

pub mod conntrack;
pub mod explain;
pub mod traffic;

use std::{collections::BTreeMap, path::Path};

use aya::maps::MapError;
use lb_common::{
    net::{addr_from_wire, port_from_wire, proto_name},
    service::{SERVICE_DROP_WHEN_EMPTY, ServiceInfo, SlotKey},
};
use serde::Serialize;

use crate::dataplane::maps::{ServiceMaps, read_counters};

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
    /// `10.1.1.2:8080`, in slot order.
    pub endpoints: Vec<String>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// With no endpoint: `reject` (ICMP port unreachable) or `drop` (a `Local` traffic policy
    /// and endpoints only on other nodes).
    pub when_empty: &'static str,
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

const UNKNOWN_NAME: &str = "<unnamed>";

/// Which Service port a frontend belongs to, from `LB_SVC_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendNames {
    pub namespace: String,
    pub name: String,
    /// "" when unnamed.
    pub port_name: String,
}

/// The names `LB_SVC_INFO` holds for frontend `service_id`; [`UNKNOWN_NAME`] when it holds none.
pub fn frontend_names(maps: &ServiceMaps, service_id: u32) -> anyhow::Result<FrontendNames> {
    Ok(match maps.info.get(&service_id, 0) {
        Ok(info) => FrontendNames {
            namespace: text(&info.namespace),
            name: text(&info.name),
            port_name: text(&info.port_name),
        },
        Err(MapError::KeyNotFound) => FrontendNames {
            namespace: UNKNOWN_NAME.to_owned(),
            name: UNKNOWN_NAME.to_owned(),
            port_name: String::new(),
        },
        Err(error) => return Err(error.into()),
    })
}

/// `namespace/name`, or `namespace/name:port` for a named port: how tables name a frontend's
/// Service port.
pub fn service_label(namespace: &str, name: &str, port_name: &str) -> String {
    if port_name.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port_name}")
    }
}

/// The Service frontends the pinned maps hold, sorted by namespace, name and frontend.
pub fn service_rows(pin_dir: &Path) -> anyhow::Result<Vec<ServiceRow>> {
    let maps = ServiceMaps::open(pin_dir)?;
    let mut rows = Vec::new();
    for entry in maps.services.iter() {
        let (key, value) = entry?;
        let info = match maps.info.get(&value.service_id, 0) {
            Ok(info) => Some(info),
            Err(MapError::KeyNotFound) => None,
            Err(error) => return Err(error.into()),
        };
        let name_of = |field: fn(&ServiceInfo) -> &[u8]| {
            info.as_ref()
                .map(|info| text(field(info)))
                .unwrap_or_else(|| UNKNOWN_NAME.to_owned())
        };
        let mut endpoints = Vec::new();
        for slot in 0..value.backend_count {
            let slot_key = SlotKey {
                backend_set: value.backend_set,
                slot,
            };
            let endpoint = match maps.slots.get(&slot_key, 0) {
                Ok(id) => {
                    let backend = maps.backends.get(&id, 0)?;
                    format!(
                        "{}:{}",
                        addr_from_wire(backend.addr),
                        port_from_wire(backend.port)
                    )
                }
                Err(MapError::KeyNotFound) => "<missing slot>".to_owned(),
                Err(error) => return Err(error.into()),
            };
            endpoints.push(endpoint);
        }
        rows.push(ServiceRow {
            namespace: name_of(|info| &info.namespace[..]),
            name: name_of(|info| &info.name[..]),
            port_name: info.map(|info| text(&info.port_name)).unwrap_or_default(),
            frontend: format!("{}:{}", addr_from_wire(key.addr), port_from_wire(key.port)),
            protocol: proto_name(key.proto).to_owned(),
            endpoints,
            affinity_timeout_s: value.affinity_timeout_s,
            when_empty: if value.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
                "drop"
            } else {
                "reject"
            },
        });
    }
    rows.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.port_name, &a.frontend).cmp(&(
            &b.namespace,
            &b.name,
            &b.port_name,
            &b.frontend,
        ))
    });
    Ok(rows)
}

/// Left-aligned columns separated by three spaces, like `kubectl get`.
pub fn format_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
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
                format!("{}/{}", row.frontend, row.protocol),
                row.endpoints.len().to_string(),
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
            ]
        })
        .collect();
    format_table(
        &[
            "NAMESPACE",
            "NAME",
            "PORT",
            "FRONTEND",
            "COUNT",
            "ENDPOINTS",
            "AFFINITY",
        ],
        &cells,
    )
}

/// The counters of `LB_STATS` by name.
pub fn counters(pin_dir: &Path) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    Ok(read_counters(pin_dir)?
        .into_iter()
        .map(|(counter, value)| (counter.name(), value))
        .collect())
}
