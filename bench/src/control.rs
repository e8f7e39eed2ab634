//! The agent's control plane with real maps, as the Kubernetes source runs it: the same index
//! (objects -> desired state, one Service at a time) and the same reconciler writing the same
//! pinned maps, timed in process so that only the control plane is measured (no HTTP; the
//! end-to-end section times the manifest source through `lb agent`).
//!
//! Cold programming: the list is complete; every Service and EndpointSlice goes into the index,
//! and every map entry is written. One endpoint change: the JSON of one EndpointSlice watch
//! event decoded, the index updated, the touched Service recomputed and its changes reconciled,
//! until its map writes are done.

use std::{path::Path, time::Instant};

use anyhow::ensure;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb::{
    dataplane::{
        Dataplane,
        maps::{Capacities, ServiceMaps},
    },
    desired::index::{Index, object_key},
    node::NodeConfig,
    reconcile::Reconciler,
};

use crate::{
    results::{ControlPlane, Sample, quantile},
    workload::{self, SyntheticService, Traffic},
};

const BPFFS: &str = "/sys/fs/bpf";

/// How much to measure.
#[derive(Clone, Debug)]
pub struct ControlPlan {
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub rounds: usize,
    /// Single endpoint changes per round.
    pub changes: usize,
}

/// Removes the pin directory on drop.
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = lb::dataplane::reset(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Programs `services` into fresh maps; returns the cold time and the change latencies, ms.
fn one_round(
    pin_dir: &Path,
    services: &[SyntheticService],
    changes: usize,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let _pins = PinGuard(pin_dir.to_owned());
    let _dataplane = Dataplane::load(pin_dir, &Capacities::default())?;
    let mut maps = ServiceMaps::open(pin_dir)?;
    let (mut reconciler, _) = Reconciler::from_store(&mut maps)?;
    let objects: Vec<Service> = services.iter().map(SyntheticService::service).collect();
    let slices: Vec<EndpointSlice> = services.iter().map(SyntheticService::slice).collect();

    let started = Instant::now();
    let mut index = Index::new(NodeConfig::default());
    for service in objects {
        index.set_service(object_key(&service.metadata), Some(service));
    }
    for slice in slices {
        index.set_slice(object_key(&slice.metadata), Some(slice));
    }
    let _ = index.flush();
    let summary = reconciler.reconcile(&index.desired(), &mut maps);
    let cold_ms = started.elapsed().as_secs_f64() * 1e3;
    ensure!(
        summary.errors.is_empty(),
        "programming: {:?}",
        summary.errors
    );
    ensure!(
        summary.added == services.len(),
        "{} of {} frontends programmed",
        summary.added,
        services.len()
    );

    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        // A rolling update: one endpoint of one Service replaced.
        let which = change * services.len() / changes.max(1);
        let mut changed = services[which].clone();
        let last = changed.endpoints.len() - 1;
        changed.endpoints[last] = std::net::Ipv4Addr::new(
            10,
            126,
            u8::try_from(change / 250)?,
            u8::try_from(change % 250 + 1)?,
        );
        let event = serde_json::to_vec(&changed.slice())?;
        let started = Instant::now();
        let slice: EndpointSlice = serde_json::from_slice(&event)?;
        index.set_slice(object_key(&slice.metadata), Some(slice));
        let changes = index.flush();
        let summary = reconciler.reconcile_changes(&changes, &mut maps);
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
        ensure!(
            summary.updated == 1 && summary.errors.is_empty(),
            "one endpoint change updated {} frontends ({:?})",
            summary.updated,
            summary.errors
        );
    }
    Ok((cold_ms, latencies))
}

/// Runs the control-plane plan.
pub fn run(
    plan: &ControlPlan,
    prefix: &str,
    progress: &dyn Fn(&str),
) -> anyhow::Result<Vec<ControlPlane>> {
    let mut rows = Vec::new();
    for &count in &plan.services {
        let services = workload::services(count, plan.endpoints, Traffic::Http);
        let mut cold = Vec::new();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for round in 0..plan.rounds {
            progress(&format!(
                "control plane: {count} Services x {} endpoints, round {}",
                plan.endpoints,
                round + 1
            ));
            let pin_dir = Path::new(BPFFS).join(format!("{prefix}-cp"));
            let (cold_ms, mut latencies) = one_round(&pin_dir, &services, plan.changes)?;
            cold.push(cold_ms);
            p50.push(quantile(&mut latencies, 0.5));
            p99.push(quantile(&mut latencies, 0.99));
        }
        rows.push(ControlPlane {
            services: count,
            endpoints_per_service: plan.endpoints,
            cold_program_ms: Sample::from_rounds(cold),
            change_p50_ms: Sample::from_rounds(p50),
            change_p99_ms: Sample::from_rounds(p99),
        });
    }
    Ok(rows)
}
