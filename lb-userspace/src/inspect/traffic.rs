//! `lb stats`: the datapath's counters, and the traffic of every Service frontend and endpoint
//! (`LB_SVC_TRAFFIC`, `LB_BE_TRAFFIC`), once or as rates (`--watch`).

use std::{collections::BTreeMap, path::Path, time::Duration};

use lb_common::{
    net::proto_name,
    stats::{Counter, CounterKind, ServiceTraffic, Traffic},
};
use serde::Serialize;

use crate::{
    dataplane::maps::{ServiceMaps, read_counters},
    inspect::{
        endpoint_text, format_table, frontend_names, service_label, slotted, sort_by_frontend,
    },
};

/// The traffic of one endpoint of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointTraffic {
    /// `10.1.1.2:8080`.
    pub endpoint: String,
    /// Its `LB_BACKENDS` id.
    pub backend_id: u32,
    #[serde(flatten)]
    pub traffic: TrafficCounts,
}

/// Counts of [`Traffic`], named for JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficCounts {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub flows: u64,
}

impl From<Traffic> for TrafficCounts {
    fn from(traffic: Traffic) -> Self {
        Self {
            packets: traffic.packets,
            bytes: traffic.bytes,
            reply_packets: traffic.reply_packets,
            reply_bytes: traffic.reply_bytes,
            flows: traffic.flows,
        }
    }
}

/// The traffic of one Service frontend and of the endpoints new flows go to (draining endpoints
/// are left out; their traffic still counts in the frontend's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendTraffic {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// `10.96.0.10:80`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    #[serde(flatten)]
    pub traffic: TrafficCounts,
    /// Packets dropped or rejected (reasons: the node-wide counters).
    pub refused: u64,
    /// In slot order.
    pub endpoints: Vec<EndpointTraffic>,
}

super::frontend_row!(FrontendTraffic);

/// Everything `lb stats` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Every datapath counter by name.
    pub counters: BTreeMap<&'static str, u64>,
    /// Frontends sorted by namespace, name, port and frontend.
    pub services: Vec<FrontendTraffic>,
}

/// Reads the counters and the traffic of every frontend from the pinned maps.
pub fn read_stats(pin_dir: &Path) -> anyhow::Result<Stats> {
    let counters = read_counters(pin_dir)?
        .into_iter()
        .map(|(counter, value)| (counter.name(), value))
        .collect();
    Ok(Stats {
        counters,
        services: frontend_traffic(pin_dir)?,
    })
}

/// The traffic of every frontend the pinned maps hold.
pub fn frontend_traffic(pin_dir: &Path) -> anyhow::Result<Vec<FrontendTraffic>> {
    let maps = ServiceMaps::open(pin_dir)?;
    let mut rows = Vec::new();
    for entry in maps.services.iter() {
        let (key, value) = entry?;
        let names = frontend_names(&maps, value.service_id)?;
        let service: ServiceTraffic = maps.service_traffic.get(&value.service_id, 0)?;
        let mut endpoints = Vec::new();
        for (id, backend) in slotted(&maps, &value)?
            .into_iter()
            .filter_map(|(_, held)| held)
        {
            endpoints.push(EndpointTraffic {
                endpoint: endpoint_text(backend.addr, backend.port),
                backend_id: id,
                traffic: maps.backend_traffic.get(&id, 0)?.into(),
            });
        }
        rows.push(FrontendTraffic {
            namespace: names.namespace,
            name: names.name,
            port_name: names.port_name,
            frontend: endpoint_text(key.addr, key.port),
            protocol: proto_name(key.proto).to_owned(),
            traffic: service.traffic.into(),
            refused: service.refused,
            endpoints,
        });
    }
    sort_by_frontend(&mut rows);
    Ok(rows)
}

/// `lb stats` as tables: the frontends' traffic, then every counter.
pub fn stats_table(stats: &Stats) -> String {
    let services: Vec<Vec<String>> = stats
        .services
        .iter()
        .map(|row| {
            vec![
                service_label(&row.namespace, &row.name, &row.port_name),
                format!("{}/{}", row.frontend, row.protocol),
                row.traffic.packets.to_string(),
                row.traffic.bytes.to_string(),
                row.traffic.reply_packets.to_string(),
                row.traffic.reply_bytes.to_string(),
                row.traffic.flows.to_string(),
                row.refused.to_string(),
            ]
        })
        .collect();
    let counters: Vec<Vec<String>> = stats
        .counters
        .iter()
        .map(|(name, value)| vec![(*name).to_owned(), value.to_string()])
        .collect();
    format!(
        "{}\n{}",
        format_table(
            &[
                "SERVICE",
                "FRONTEND",
                "PACKETS",
                "BYTES",
                "REPLIES",
                "REPLY-BYTES",
                "FLOWS",
                "REFUSED",
            ],
            &services,
        ),
        format_table(&["COUNTER", "PACKETS"], &counters)
    )
}

/// Per-second rates between two readings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds between the readings.
    pub interval_s: f64,
    /// Counters that moved, per second.
    pub counters: BTreeMap<&'static str, f64>,
    /// Frontends whose traffic moved, per second.
    pub services: Vec<FrontendRates>,
}

/// One frontend's rates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontendRates {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub frontend: String,
    pub protocol: String,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub reply_packets_per_s: f64,
    pub reply_bytes_per_s: f64,
    pub flows_per_s: f64,
    pub refused_per_s: f64,
}

/// The rates from `before` to `after`, `interval` apart. A frontend absent from `before` (just
/// added) is measured from zero, which its counters start from.
pub fn rates(before: &Stats, after: &Stats, interval: Duration) -> Rates {
    let seconds = interval.as_secs_f64().max(f64::EPSILON);
    let per_second = |new: u64, old: u64| new.saturating_sub(old) as f64 / seconds;
    let counters = after
        .counters
        .iter()
        .filter_map(|(name, value)| {
            let old = before.counters.get(name).copied().unwrap_or(0);
            (*value != old).then(|| (*name, per_second(*value, old)))
        })
        .collect();
    let key = |row: &FrontendTraffic| {
        (
            row.namespace.clone(),
            row.name.clone(),
            row.port_name.clone(),
            row.frontend.clone(),
            row.protocol.clone(),
        )
    };
    let earlier: BTreeMap<_, &FrontendTraffic> =
        before.services.iter().map(|row| (key(row), row)).collect();
    let services = after
        .services
        .iter()
        .filter_map(|row| {
            let (old, refused) = earlier
                .get(&key(row))
                .map_or((TrafficCounts::default(), 0), |old| {
                    (old.traffic, old.refused)
                });
            let moved = row.traffic != old || row.refused != refused;
            moved.then(|| FrontendRates {
                namespace: row.namespace.clone(),
                name: row.name.clone(),
                port_name: row.port_name.clone(),
                frontend: row.frontend.clone(),
                protocol: row.protocol.clone(),
                packets_per_s: per_second(row.traffic.packets, old.packets),
                bytes_per_s: per_second(row.traffic.bytes, old.bytes),
                reply_packets_per_s: per_second(row.traffic.reply_packets, old.reply_packets),
                reply_bytes_per_s: per_second(row.traffic.reply_bytes, old.reply_bytes),
                flows_per_s: per_second(row.traffic.flows, old.flows),
                refused_per_s: per_second(row.refused, refused),
            })
        })
        .collect();
    Rates {
        interval_s: seconds,
        counters,
        services,
    }
}

/// `lb stats --watch` as tables: what moved, per second; drops and rejects by reason.
pub fn rates_table(rates: &Rates) -> String {
    let services: Vec<Vec<String>> = rates
        .services
        .iter()
        .map(|row| {
            vec![
                service_label(&row.namespace, &row.name, &row.port_name),
                format!("{}/{}", row.frontend, row.protocol),
                format!("{:.1}", row.packets_per_s),
                format!("{:.0}", row.bytes_per_s),
                format!("{:.1}", row.reply_packets_per_s),
                format!("{:.0}", row.reply_bytes_per_s),
                format!("{:.1}", row.flows_per_s),
                format!("{:.1}", row.refused_per_s),
            ]
        })
        .collect();
    let refusals: Vec<Vec<String>> = rates
        .counters
        .iter()
        .filter(|(name, _)| {
            Counter::ALL.iter().any(|counter| {
                counter.name() == **name
                    && matches!(counter.kind(), CounterKind::Drop | CounterKind::Reject)
            })
        })
        .map(|(name, rate)| vec![(*name).to_owned(), format!("{rate:.1}")])
        .collect();
    format!(
        "every {:.1} s\n{}{}",
        rates.interval_s,
        format_table(
            &[
                "SERVICE",
                "FRONTEND",
                "PACKETS/S",
                "BYTES/S",
                "REPLIES/S",
                "REPLY-BYTES/S",
                "FLOWS/S",
                "REFUSED/S",
            ],
            &services,
        ),
        if refusals.is_empty() {
            "no drops or rejects\n".to_owned()
        } else {
            format_table(&["DROP/REJECT REASON", "PACKETS/S"], &refusals)
        }
    )
}
