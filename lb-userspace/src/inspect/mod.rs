//! Inspection commands. They read the pinned maps directly, like bpftool, so they answer while
//! the agent is down; human tables by default, JSON for scripts.

pub mod backends;
pub mod conntrack;
pub mod explain;
pub mod plan;
pub mod services;
pub mod traffic;

use aya::maps::MapError;
use lb_common::service::ServiceInfo;

use crate::dataplane::maps::ServiceMaps;

/// The text of a NUL-padded name field of `LB_SVC_INFO`.
pub(crate) fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Shown where the maps do not name a frontend (its `LB_SVC_INFO` entry is missing).
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
        Ok(info) => names_in(Some(&info)),
        Err(MapError::KeyNotFound) => names_in(None),
        Err(error) => return Err(error.into()),
    })
}

/// The names in a frontend's `LB_SVC_INFO` entry; [`UNKNOWN_NAME`] without one.
pub fn names_in(info: Option<&ServiceInfo>) -> FrontendNames {
    match info {
        Some(info) => FrontendNames {
            namespace: text(&info.namespace),
            name: text(&info.name),
            port_name: text(&info.port_name),
        },
        None => FrontendNames {
            namespace: UNKNOWN_NAME.to_owned(),
            name: UNKNOWN_NAME.to_owned(),
            port_name: String::new(),
        },
    }
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
