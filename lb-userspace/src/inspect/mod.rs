//! Inspection commands. They read the pinned maps directly, like bpftool, so they answer while
//! the agent is down; human tables by default, JSON for scripts.

pub mod backends;
pub mod conntrack;
pub mod explain;
pub mod plan;
pub mod services;
pub mod traffic;

use aya::maps::MapError;
use lb_common::{
    net::{addr_from_wire, port_from_wire},
    service::{Backend, SERVICE_DROP_WHEN_EMPTY, ServiceInfo, ServiceValue, SlotKey},
};

use crate::dataplane::maps::ServiceMaps;

/// `10.1.1.2:8080`: an address and port as the maps hold them (network byte order).
pub fn endpoint_text(addr: u32, port: u16) -> String {
    format!("{}:{}", addr_from_wire(addr), port_from_wire(port))
}

/// What a frontend of `flags` (`ServiceValue::flags`) does without endpoints: `drop` (a `Local`
/// traffic policy with endpoints only elsewhere) or `reject` (ICMP port unreachable).
pub fn when_empty(flags: u32) -> &'static str {
    if flags & SERVICE_DROP_WHEN_EMPTY != 0 {
        "drop"
    } else {
        "reject"
    }
}

/// A slot of a backend set: its position, and its backend's id and entry (`None`: the slot is
/// gone, a set switch raced with the read).
pub type Slot = (u32, Option<(u32, Backend)>);

/// The slots of the frontend `value`'s current backend set, in slot order.
pub fn slotted(maps: &ServiceMaps, value: &ServiceValue) -> anyhow::Result<Vec<Slot>> {
    let mut slots = Vec::with_capacity(value.backend_count as usize);
    for slot in 0..value.backend_count {
        let key = SlotKey {
            backend_set: value.backend_set,
            slot,
        };
        let held = match maps.slots.get(&key, 0) {
            Ok(id) => Some((id, maps.backends.get(&id, 0)?)),
            Err(MapError::KeyNotFound) => None,
            Err(error) => return Err(error.into()),
        };
        slots.push((slot, held));
    }
    Ok(slots)
}

/// A row naming a Service frontend, sorted the way a reader looks for it.
pub trait FrontendRow {
    /// Namespace, name, port name, frontend (`10.96.0.10:80`) and protocol.
    fn frontend_order(&self) -> [&str; 5];
}

/// Sorts `rows` by namespace, name, port name, frontend and protocol.
pub fn sort_by_frontend<T: FrontendRow>(rows: &mut [T]) {
    rows.sort_by(|a, b| a.frontend_order().cmp(&b.frontend_order()));
}

/// Implements [`FrontendRow`] for a row type with the usual fields.
macro_rules! frontend_row {
    ($row:ty) => {
        impl $crate::inspect::FrontendRow for $row {
            fn frontend_order(&self) -> [&str; 5] {
                [
                    &self.namespace,
                    &self.name,
                    &self.port_name,
                    &self.frontend,
                    &self.protocol,
                ]
            }
        }
    };
}
pub(crate) use frontend_row;

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
