//! The agent's Prometheus metrics (OpenMetrics text at `GET /metrics` on `--metrics-address`,
//! 127.0.0.1:10249 by default: kube-proxy's metrics port, free on a node that runs lb instead).
//!
//! - `lb_datapath_packets_total{counter}`: every datapath counter of `LB_STATS` (verdicts, drop
//!   and reject reasons, events), summed over CPUs, read from the pinned map at each scrape;
//! - `lb_map_entries{map}` / `lb_map_capacity{map}`: how full each map with a variable number
//!   of entries is (a full `LB_SERVICES` refuses Services; a full `LB_CONNTRACK` forgets flows
//!   early), counted at each scrape;
//! - `lb_sync_duration_seconds`: from a change seen (a watch event, a manifest change, a resync)
//!   to its map writes done, for every programming pass that wrote something;
//! - `lb_sync_errors_total`: map writes that failed (each is retried);
//! - `lb_map_full_errors_total{map}`: frontends refused because a map had no room (each counted
//!   once per refusal, not per retry); `lb_map_refused_frontends{map}`: how many are refused now;
//! - `lb_service_packets_total`, `lb_service_bytes_total{direction}`,
//!   `lb_service_flows_total`, `lb_service_refused_packets_total`: each frontend's traffic
//!   (`LB_SVC_TRAFFIC`), labelled by namespace, service, port name and frontend;
//! - `lb_endpoint_packets_total`, `lb_endpoint_bytes_total{direction}`, `lb_endpoint_flows_total`:
//!   the same per endpoint of each frontend (`LB_BE_TRAFFIC`; endpoints taking new flows).
//!
//! Scrapes read the maps with system calls, so they are answered off the agent's event loop.

use std::{path::PathBuf, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};
use prometheus_client::{
    collector::Collector,
    encoding::EncodeLabelSet,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tracing::debug;

use crate::{
    dataplane::maps::{occupancy, read_counters},
    health::{Answer, Reply},
    inspect::traffic::{FrontendTraffic, TrafficCounts, frontend_traffic},
    reconcile::{MapFull, Reconciler, Summary},
};

/// The default `--metrics-address`.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:10249";

/// The content type of OpenMetrics text, which Prometheus scrapes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `lb_sync_duration_seconds` buckets: 100 µs doubling up to about 6.5 s.
const SYNC_BUCKET_START_S: f64 = 0.000_1;
const SYNC_BUCKET_FACTOR: f64 = 2.0;
const SYNC_BUCKET_COUNT: u16 = 17;

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_errors: Counter,
    map_full_errors: Family<MapLabel, Counter>,
    refused_frontends: Family<MapLabel, Gauge>,
}

/// The `map` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

impl Metrics {
    /// Metrics of the dataplane pinned in `pin_dir`.
    pub fn new(pin_dir: PathBuf) -> Arc<Self> {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(
            SYNC_BUCKET_START_S,
            SYNC_BUCKET_FACTOR,
            SYNC_BUCKET_COUNT,
        ));
        registry.register(
            "lb_sync_duration_seconds",
            "From a change seen (watch event, manifest change, resync) to its map writes done",
            sync_duration.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "lb_sync_errors",
            "Map writes that failed (each is retried)",
            sync_errors.clone(),
        );
        let map_full_errors = Family::<MapLabel, Counter>::default();
        registry.register(
            "lb_map_full_errors",
            "Frontends refused because a map had no room (once per refusal, not per retry)",
            map_full_errors.clone(),
        );
        let refused_frontends = Family::<MapLabel, Gauge>::default();
        registry.register(
            "lb_map_refused_frontends",
            "Frontends not programmed (or left with their old entries) for lack of room in a map",
            refused_frontends.clone(),
        );
        registry.register_collector(Box::new(Datapath { pin_dir }));
        Arc::new(Self {
            registry,
            sync_duration,
            sync_errors,
            map_full_errors,
            refused_frontends,
        })
    }

    /// Records one programming pass that took `took`, and what `reconciler` could not program
    /// for lack of room.
    pub fn observe_sync(&self, took: Duration, summary: &Summary, reconciler: &Reconciler) {
        if summary.writes > 0 {
            self.sync_duration.observe(took.as_secs_f64());
        }
        self.sync_errors
            .inc_by(u64::try_from(summary.errors.len()).unwrap_or(u64::MAX));
        for error in &summary.errors {
            if let Some(full) = error.downcast_ref::<MapFull>() {
                self.map_full_errors
                    .get_or_create(&MapLabel {
                        map: full.map.to_owned(),
                    })
                    .inc();
            }
        }
        let mut refused = std::collections::BTreeMap::<String, i64>::new();
        for refusal in reconciler.refused() {
            *refused.entry(refusal.map.clone()).or_default() += 1;
        }
        // A map no longer refusing anything reads 0 rather than vanishing.
        self.refused_frontends.clear();
        for name in crate::dataplane::ALL_MAPS {
            let count = refused.get(name).copied().unwrap_or(0);
            self.refused_frontends
                .get_or_create(&MapLabel {
                    map: name.to_owned(),
                })
                .set(count);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Answers `GET /metrics`.
    pub fn answer(self: Arc<Self>) -> Answer {
        Arc::new(move |method, path| match (method, path) {
            (&Method::GET | &Method::HEAD, "/metrics") => match self.render() {
                Ok(body) => Reply {
                    status: StatusCode::OK,
                    content_type: OPENMETRICS,
                    body,
                },
                Err(error) => Reply {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    content_type: "text/plain",
                    body: format!("encoding the metrics: {error}\n"),
                },
            },
            _ => Reply {
                status: StatusCode::NOT_FOUND,
                content_type: "text/plain",
                body: "not found: the metrics are at /metrics\n".to_owned(),
            },
        })
    }
}

/// The metrics read from the pinned maps at each scrape.
#[derive(Debug)]
struct Datapath {
    pin_dir: PathBuf,
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // A map that cannot be read leaves its metrics out of this scrape (the absence shows on
        // a dashboard) rather than failing the others.
        match read_counters(&self.pin_dir) {
            Ok(counters) => {
                let mut family = encoder.encode_descriptor(
                    "lb_datapath_packets",
                    "Packets and events of the XDP program by counter (verdicts, drop and reject \
                     reasons, events), summed over CPUs.",
                    None,
                    MetricType::Counter,
                )?;
                for (counter, value) in counters {
                    ConstCounter::new(value)
                        .encode(family.encode_family(&[("counter", counter.name())])?)?;
                }
            }
            Err(error) => debug!("metrics: reading the counters: {error:#}"),
        }
        match occupancy(&self.pin_dir) {
            Ok(maps) => {
                let mut entries = encoder.encode_descriptor(
                    "lb_map_entries",
                    "Entries of each map whose entries come and go.",
                    None,
                    MetricType::Gauge,
                )?;
                for map in &maps {
                    ConstGauge::new(i64::try_from(map.entries).unwrap_or(i64::MAX))
                        .encode(entries.encode_family(&[("map", map.name)])?)?;
                }
                let mut capacity = encoder.encode_descriptor(
                    "lb_map_capacity",
                    "The most entries each of those maps holds.",
                    None,
                    MetricType::Gauge,
                )?;
                for map in &maps {
                    ConstGauge::new(i64::from(map.capacity))
                        .encode(capacity.encode_family(&[("map", map.name)])?)?;
                }
            }
            Err(error) => debug!("metrics: counting the maps' entries: {error:#}"),
        }
        match frontend_traffic(&self.pin_dir) {
            Ok(frontends) => encode_traffic(&mut encoder, &frontends)?,
            Err(error) => debug!("metrics: reading the traffic counters: {error:#}"),
        }
        Ok(())
    }
}

/// `direction` label values.
const TO_BACKEND: &str = "to_backend";
const REPLY: &str = "reply";

/// Label names and values of one series.
type Labels<'a> = Vec<(&'a str, &'a str)>;

/// Encodes one counter family, a value per label set.
fn encode_counters<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (Labels<'a>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The per-frontend and per-endpoint traffic families.
fn encode_traffic(
    encoder: &mut DescriptorEncoder<'_>,
    frontends: &[FrontendTraffic],
) -> Result<(), std::fmt::Error> {
    let frontend_labels: Vec<(Labels<'_>, &FrontendTraffic, String)> = frontends
        .iter()
        .map(|row| {
            (
                vec![
                    ("namespace", row.namespace.as_str()),
                    ("service", row.name.as_str()),
                    ("port", row.port_name.as_str()),
                ],
                row,
                format!("{}/{}", row.frontend, row.protocol),
            )
        })
        .collect();
    let labelled = |direction: Option<&'static str>| {
        frontend_labels.iter().map(move |(labels, row, frontend)| {
            let mut labels = labels.clone();
            labels.push(("frontend", frontend.as_str()));
            if let Some(direction) = direction {
                labels.push(("direction", direction));
            }
            (labels, *row)
        })
    };
    let pick = |field: fn(&TrafficCounts) -> u64, direction| {
        labelled(direction).map(move |(labels, row)| (labels, field(&row.traffic)))
    };
    encode_counters(
        encoder,
        "lb_service_packets",
        "Packets of each Service frontend translated, towards its endpoints or back from them.",
        pick(|traffic| traffic.packets, Some(TO_BACKEND))
            .chain(pick(|traffic| traffic.reply_packets, Some(REPLY))),
    )?;
    encode_counters(
        encoder,
        "lb_service_bytes",
        "Bytes (IPv4 and up) of those packets.",
        pick(|traffic| traffic.bytes, Some(TO_BACKEND))
            .chain(pick(|traffic| traffic.reply_bytes, Some(REPLY))),
    )?;
    encode_counters(
        encoder,
        "lb_service_flows",
        "New flows of each Service frontend.",
        pick(|traffic| traffic.flows, None),
    )?;
    encode_counters(
        encoder,
        "lb_service_refused_packets",
        "Packets to each Service frontend dropped or rejected (reasons: lb_datapath_packets).",
        labelled(None).map(|(labels, row)| (labels, row.refused)),
    )?;

    let endpoints: Vec<(Labels<'_>, TrafficCounts)> = frontend_labels
        .iter()
        .flat_map(|(labels, row, frontend)| {
            row.endpoints.iter().map(move |endpoint| {
                let mut labels = labels.clone();
                labels.push(("frontend", frontend.as_str()));
                labels.push(("endpoint", endpoint.endpoint.as_str()));
                (labels, endpoint.traffic)
            })
        })
        .collect();
    let per_endpoint = |field: fn(&TrafficCounts) -> u64, direction: Option<&'static str>| {
        endpoints.iter().map(move |(labels, traffic)| {
            let mut labels = labels.clone();
            if let Some(direction) = direction {
                labels.push(("direction", direction));
            }
            (labels, field(traffic))
        })
    };
    encode_counters(
        encoder,
        "lb_endpoint_packets",
        "Packets translated towards each endpoint of each frontend, or back from it.",
        per_endpoint(|traffic| traffic.packets, Some(TO_BACKEND))
            .chain(per_endpoint(|traffic| traffic.reply_packets, Some(REPLY))),
    )?;
    encode_counters(
        encoder,
        "lb_endpoint_bytes",
        "Bytes (IPv4 and up) of those packets.",
        per_endpoint(|traffic| traffic.bytes, Some(TO_BACKEND))
            .chain(per_endpoint(|traffic| traffic.reply_bytes, Some(REPLY))),
    )?;
    encode_counters(
        encoder,
        "lb_endpoint_flows",
        "New flows given to each endpoint of each frontend.",
        per_endpoint(|traffic| traffic.flows, None),
    )
}
