//! `lb plan`: the difference between what the objects ask for and what the pinned maps hold,
//! per Service frontend (missing, extra, stale, and why), and in `LB_CLUSTER_IPS`.
//!
//! Both sides come from the agent's own code, so the plan is what the agent's next
//! reconciliation would write: the desired state from [`desired_state`] (the agent's pure
//! function) on the objects of the agent's source, and the maps read back by
//! [`Reconciler::read`] and compared by [`Reconciler::drift`] (the comparison the reconciler
//! decides its writes with).
//!
//! The desired state depends on the node as well as the objects (its name, NodePort addresses,
//! node port range, zone). The agent records the settings it computes with in its state
//! directory ([`NodeSettings`], `node.json`) at start and whenever they change, and `lb plan`
//! reads them from there: the addresses are the agent's, whichever network namespace `lb plan`
//! runs in, and they are there while the agent is down. Flags override each setting, and
//! `--manifests` / `--kubeconfig` the source; without a recorded file, the node is described
//! by the flags alone.

use std::{net::Ipv4Addr, ops::RangeInclusive, path::PathBuf};

use anyhow::{Context as _, bail};
use lb_common::net::{addr_from_wire, port_from_wire, proto_name};
use serde::Serialize;
use tracing::warn;

use super::{format_table, sort_by_frontend};
use crate::{
    agent::SNAPSHOT_FILE,
    dataplane::maps::ServiceMaps,
    desired::{DesiredState, desired_state},
    manifests::{Snapshot, load_dir},
    node::{NodeConfig, NodeSettings, SourceSetting},
    reconcile::{Drift, DriftKind, Reconciler},
};

/// What `lb plan` compares, from its flags.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// The agent's state directory: its node settings and last good objects.
    pub state_dir: PathBuf,
    /// Objects from this manifest directory instead of the agent's source.
    pub manifests: Option<PathBuf>,
    /// Objects from the API server of this kubeconfig instead of the agent's source.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides of the recorded node settings.
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub nodeport_addresses: Option<Vec<Ipv4Addr>>,
    pub node_port_range: Option<RangeInclusive<u16>>,
}

/// One frontend that drifted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DriftRow {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// `10.96.0.10:80`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `missing` (the objects ask for it, the maps lack it), `extra` (the maps hold it, nothing
    /// asks for it) or `stale` (both, with differences).
    pub drift: &'static str,
    /// Why, one line per difference.
    pub reasons: Vec<String>,
}

super::frontend_row!(DriftRow);

/// The whole comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Nothing drifted: the agent's next reconciliation would write nothing.
    pub in_sync: bool,
    /// Where the objects were read: `manifests /etc/lb` or `kubernetes ...`.
    pub source: String,
    /// The node settings the desired state was computed with.
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub nodeport_addresses: Vec<Ipv4Addr>,
    pub node_port_range: String,
    /// Frontends the objects ask for.
    pub desired_frontends: usize,
    pub frontends: Vec<DriftRow>,
    /// ClusterIPs the objects have that `LB_CLUSTER_IPS` lacks (undefined ports not rejected).
    pub missing_cluster_ips: Vec<Ipv4Addr>,
    /// ClusterIPs `LB_CLUSTER_IPS` holds that no Service has.
    pub extra_cluster_ips: Vec<Ipv4Addr>,
    /// Entries no frontend references (interrupted or failed writes): the agent deletes them.
    pub stray_entries: usize,
    /// Objects that could not be read (manifest errors), as the agent would report them.
    pub warnings: Vec<String>,
}

/// The rows of `drift`, in the order a reader looks for them (namespace, name, port, frontend).
pub fn drift_rows(drift: &[Drift]) -> Vec<DriftRow> {
    let mut rows: Vec<DriftRow> = drift
        .iter()
        .map(|drift| DriftRow {
            namespace: drift.namespace.clone(),
            name: drift.name.clone(),
            port_name: drift.port_name.clone(),
            frontend: format!(
                "{}:{}",
                addr_from_wire(drift.key.addr),
                port_from_wire(drift.key.port)
            ),
            protocol: proto_name(drift.key.proto).to_owned(),
            drift: match drift.kind {
                DriftKind::Missing => "missing",
                DriftKind::Extra => "extra",
                DriftKind::Stale => "stale",
            },
            reasons: drift.reasons.clone(),
        })
        .collect();
    sort_by_frontend(&mut rows);
    rows
}

/// Compares `reconciler`'s view of the maps with `desired`.
pub fn compare(reconciler: &Reconciler, desired: &DesiredState, node: &NodeConfig) -> Plan {
    let frontends = drift_rows(&reconciler.drift(desired));
    let (missing_cluster_ips, extra_cluster_ips) = reconciler.cluster_ip_drift(desired);
    let stray_entries = reconciler.stray_entries();
    Plan {
        in_sync: frontends.is_empty()
            && missing_cluster_ips.is_empty()
            && extra_cluster_ips.is_empty()
            && stray_entries == 0,
        source: String::new(),
        node_name: node.node_name.clone(),
        zone: node.zone.clone(),
        nodeport_addresses: node.nodeport_addresses.clone(),
        node_port_range: format!(
            "{}-{}",
            node.node_port_range.start(),
            node.node_port_range.end()
        ),
        desired_frontends: desired.frontends.len(),
        frontends,
        missing_cluster_ips,
        extra_cluster_ips,
        stray_entries,
        warnings: Vec::new(),
    }
}

/// The source and node `options` describe: the recorded settings, overridden by the flags; and
/// whether the agent had recorded any.
fn settings(options: &PlanOptions) -> anyhow::Result<(SourceSetting, NodeConfig, bool)> {
    let recorded = NodeSettings::load(&options.state_dir)?;
    let source = match (&options.manifests, &options.kubeconfig, &recorded) {
        (Some(dir), _, _) => SourceSetting::Manifests(dir.clone()),
        (None, Some(kubeconfig), _) => SourceSetting::Kubernetes {
            kubeconfig: Some(kubeconfig.clone()),
        },
        (None, None, Some(recorded)) => recorded.source.clone(),
        (None, None, None) => bail!(
            "no node settings in {} (the agent records them there at start): give the agent's \
             --state-dir, or --manifests DIR / --kubeconfig FILE with the node's settings \
             (--node-name, --nodeport-addresses, --service-node-port-range, --zone)",
            options.state_dir.display()
        ),
    };
    let mut node = match &recorded {
        Some(recorded) => recorded.node()?,
        None => NodeConfig::default(),
    };
    if let Some(name) = &options.node_name {
        node.node_name = Some(name.clone());
    }
    if let Some(zone) = &options.zone {
        node.zone = Some(zone.clone());
    }
    if let Some(addresses) = &options.nodeport_addresses {
        node.nodeport_addresses = addresses.clone();
    }
    if let Some(range) = &options.node_port_range {
        node.node_port_range = range.clone();
    }
    Ok((source, node, recorded.is_some()))
}

/// `lb plan`: reads the objects and the maps under `pin_dir` and compares them.
pub fn plan(pin_dir: &std::path::Path, options: &PlanOptions) -> anyhow::Result<Plan> {
    let (source, mut node, recorded) = settings(options)?;
    let mut warnings = Vec::new();
    let (desired, described) = match &source {
        SourceSetting::Manifests(dir) => {
            // The agent's last good objects stand in for broken ones, as they do for the agent.
            let snapshot_file = options.state_dir.join(SNAPSHOT_FILE);
            let previous = match std::fs::read_to_string(&snapshot_file) {
                Ok(json) => Snapshot::from_json(&json).unwrap_or_default(),
                Err(_) => Snapshot::default(),
            };
            let load = load_dir(dir, &previous)?;
            warnings.extend(load.errors.iter().map(ToString::to_string));
            let (desired, _notes) = desired_state(
                load.snapshot
                    .services
                    .values()
                    .map(|sourced| &sourced.object),
                load.snapshot.slices.values().map(|sourced| &sourced.object),
                &node,
            );
            (desired, format!("manifests {}", dir.display()))
        }
        SourceSetting::Kubernetes { kubeconfig } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (services, slices, node_object, server) = runtime.block_on(async {
                let (client, server) = crate::kubernetes::client(kubeconfig.as_deref()).await?;
                let (services, slices) = crate::kubernetes::list_once(&client).await?;
                let node_object = match node.node_name.as_deref() {
                    Some(name) => Some(crate::kubernetes::get_node(&client, name).await),
                    None => None,
                };
                anyhow::Ok((services, slices, node_object, server))
            })?;
            match node_object {
                // The zone as the agent takes it: from the Node now (none when it does not
                // exist), unless given as a flag.
                Some(Ok(node_object)) => {
                    let (zone, node_ips) = crate::kubernetes::node_facts(node_object.as_ref());
                    if options.zone.is_none() {
                        node.zone = zone;
                    }
                    node.node_ips = node_ips;
                }
                // The agent does without the Node when it may not read it (a role without the
                // permission): it serves without a zone rather than not at all, and so does
                // the plan, with what the agent recorded (or the flags).
                Some(Err(error)) => warn!(
                    "{error:#}; comparing without it, as the agent does: zone {}, InternalIPs {:?} \
                     ({})",
                    node.zone.as_deref().unwrap_or("none"),
                    node.node_ips,
                    match (options.zone.is_some(), recorded) {
                        (true, _) => "the zone from --zone",
                        (false, true) => "as the agent recorded them",
                        (false, false) => "the agent recorded none",
                    }
                ),
                None => {}
            }
            let (desired, _notes) = desired_state(&services, &slices, &node);
            (desired, format!("kubernetes {server}"))
        }
    };
    let maps = ServiceMaps::open(pin_dir)?;
    let (reconciler, _) = Reconciler::read(&maps).context("reading the pinned Service maps")?;
    let mut plan = compare(&reconciler, &desired, &node);
    plan.source = described;
    plan.warnings = warnings;
    Ok(plan)
}

/// `lb plan` as text: one row per drifted frontend and reason, then a verdict.
pub fn plan_table(plan: &Plan) -> String {
    let mut out = String::new();
    for warning in &plan.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    if !plan.frontends.is_empty() {
        let mut cells = Vec::new();
        for row in &plan.frontends {
            for (index, reason) in row.reasons.iter().enumerate() {
                let first = index == 0;
                let cell = |text: String| if first { text } else { String::new() };
                cells.push(vec![
                    cell(row.namespace.clone()),
                    cell(row.name.clone()),
                    cell(if row.port_name.is_empty() {
                        "-".to_owned()
                    } else {
                        row.port_name.clone()
                    }),
                    cell(format!("{}/{}", row.frontend, row.protocol)),
                    cell(row.drift.to_owned()),
                    reason.clone(),
                ]);
            }
        }
        out.push_str(&format_table(
            &["NAMESPACE", "NAME", "PORT", "FRONTEND", "DRIFT", "WHY"],
            &cells,
        ));
    }
    let list = |addrs: &[Ipv4Addr]| {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !plan.missing_cluster_ips.is_empty() {
        out.push_str(&format!(
            "LB_CLUSTER_IPS lacks {}\n",
            list(&plan.missing_cluster_ips)
        ));
    }
    if !plan.extra_cluster_ips.is_empty() {
        out.push_str(&format!(
            "LB_CLUSTER_IPS holds {}, which no Service has\n",
            list(&plan.extra_cluster_ips)
        ));
    }
    if plan.stray_entries > 0 {
        out.push_str(&format!(
            "{} stray map entries (no frontend references them)\n",
            plan.stray_entries
        ));
    }
    let count = |kind: &str| {
        plan.frontends
            .iter()
            .filter(|row| row.drift == kind)
            .count()
    };
    if plan.in_sync {
        out.push_str(&format!(
            "in sync: the maps hold the {} frontends the objects ask for ({})\n",
            plan.desired_frontends, plan.source
        ));
    } else {
        out.push_str(&format!(
            "drift: {} missing, {} extra, {} stale of {} frontends ({})\n",
            count("missing"),
            count("extra"),
            count("stale"),
            plan.desired_frontends,
            plan.source
        ));
    }
    out
}
