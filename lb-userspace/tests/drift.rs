//! What `lb plan` and `lb services` rest on, on the host: the details the desired state gives each
//! frontend (type, kind of address, policies, generation, endpoint counts and conditions), and
//! the drift the reconciler reports between the maps and the objects, which must be empty exactly
//! when a reconciliation writes nothing.

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb::{
    desired::{DesiredState, desired_state},
    node::NodeConfig,
    reconcile::{DriftKind, MemoryStore, Reconciler},
};
use lb_common::service::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_READY, BACKEND_SERVING, BACKEND_TERMINATING,
    FRONTEND_CLUSTER_IP, FRONTEND_NODE_PORT, POLICY_CLUSTER, POLICY_LOCAL, SERVICE_TYPE_NODE_PORT,
};
use std::net::Ipv4Addr;

/// The node address NodePorts are served on.
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn node() -> NodeConfig {
    NodeConfig {
        nodeport_addresses: vec![NODE_ADDR],
        node_name: Some("node-a".to_owned()),
        ..NodeConfig::default()
    }
}

/// A NodePort Service `web` at `generation` with `externalTrafficPolicy: Local`.
fn service(generation: i64) -> Service {
    serde_yaml_ng::from_str(&format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop, generation: {generation}}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, nodePort: 30080}}]
"
    ))
    .expect("Service YAML")
}

/// The slice of `web`: `endpoints` is YAML list items.
fn slice(endpoints: &str) -> EndpointSlice {
    serde_yaml_ng::from_str(&format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"
    ))
    .expect("EndpointSlice YAML")
}

/// One ready, one not ready, one terminating but serving: all on this node.
const THREE: &str = "- {addresses: [10.1.1.2], nodeName: node-a}
- {addresses: [10.1.1.3], nodeName: node-a, conditions: {ready: false}}
- {addresses: [10.1.1.4], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
";

fn desired(generation: i64, endpoints: &str) -> DesiredState {
    desired_state(&[service(generation)], &[slice(endpoints)], &node()).0
}

#[test]
fn frontends_carry_their_type_policies_generation_and_endpoint_conditions() {
    let state = desired(7, THREE);
    assert_eq!(state.frontends.len(), 2, "{state:#?}");
    let by_addr = |addr: Ipv4Addr| {
        state
            .frontends
            .values()
            .find(|frontend| frontend.addr == addr)
            .expect("frontend")
    };
    let cluster_ip = by_addr(Ipv4Addr::new(10, 96, 0, 20));
    let node_port = by_addr(NODE_ADDR);
    assert_eq!(cluster_ip.details.frontend_kind, FRONTEND_CLUSTER_IP);
    assert_eq!(node_port.details.frontend_kind, FRONTEND_NODE_PORT);
    for frontend in [cluster_ip, node_port] {
        let details = &frontend.details;
        assert_eq!(details.service_type, SERVICE_TYPE_NODE_PORT);
        assert_eq!(details.internal_policy, POLICY_CLUSTER);
        assert_eq!(details.external_policy, POLICY_LOCAL);
        assert_eq!(details.generation, 7);
        assert_eq!(
            (
                details.counts.ready,
                details.counts.serving,
                details.counts.terminating
            ),
            (1, 2, 1)
        );
        let conditions: Vec<(String, u8)> = details
            .conditions
            .iter()
            .map(|(backend, bits)| (backend.addr.to_string(), *bits))
            .collect();
        assert_eq!(
            conditions,
            vec![
                ("10.1.1.2".to_owned(), BACKEND_READY | BACKEND_SERVING),
                ("10.1.1.3".to_owned(), 0),
                ("10.1.1.4".to_owned(), BACKEND_SERVING | BACKEND_TERMINATING),
            ]
        );
    }
}

/// A reconciler reading `store` afresh, as `lb plan` does.
fn read(store: &MemoryStore) -> Reconciler {
    Reconciler::read(store).expect("read").0
}

#[test]
fn drift_names_missing_extra_and_stale_frontends_and_is_empty_when_nothing_would_be_written() {
    let mut store = MemoryStore::default();
    let (mut reconciler, _) = Reconciler::from_store(&mut store).expect("empty store");
    let first = desired(1, THREE);
    assert!(reconciler.reconcile(&first, &mut store).errors.is_empty());
    assert!(read(&store).drift(&first).is_empty());
    assert_eq!(read(&store).cluster_ip_drift(&first), (vec![], vec![]));
    assert_eq!(read(&store).stray_entries(), 0);

    // The entries carry the conditions; the datapath bits are what they were.
    let flags: Vec<u8> = store
        .backends
        .values()
        .map(|backend| backend.flags)
        .collect();
    assert!(flags.contains(&(BACKEND_ACTIVE | BACKEND_READY | BACKEND_SERVING)));

    // A frontend deleted behind the agent's back: missing.
    let node_port_key = first
        .frontends
        .values()
        .find(|frontend| frontend.addr == NODE_ADDR)
        .expect("NodePort frontend")
        .key();
    let mut tampered = store.clone();
    tampered.services.remove(&node_port_key);
    let drift = read(&tampered).drift(&first);
    assert_eq!(drift.len(), 1, "{drift:#?}");
    assert_eq!(drift[0].kind, DriftKind::Missing);
    assert_eq!(drift[0].key, node_port_key);
    assert_eq!(
        (drift[0].namespace.as_str(), drift[0].name.as_str()),
        ("shop", "web")
    );

    // The Service gone from the objects: both frontends extra, named from LB_SVC_INFO, and the
    // ClusterIP extra in LB_CLUSTER_IPS.
    let nothing = DesiredState::default();
    let drift = read(&store).drift(&nothing);
    assert_eq!(drift.len(), 2, "{drift:#?}");
    assert!(drift.iter().all(|drift| drift.kind == DriftKind::Extra
        && drift.name == "web"
        && drift.port_name == "http"));
    assert_eq!(
        read(&store).cluster_ip_drift(&nothing),
        (vec![], vec![Ipv4Addr::new(10, 96, 0, 20)])
    );

    // An endpoint replaced, a condition changed, a new generation: stale, with each reason.
    let changed = desired(
        2,
        "- {addresses: [10.1.1.5], nodeName: node-a}
- {addresses: [10.1.1.3], nodeName: node-a, conditions: {ready: false}}
- {addresses: [10.1.1.4], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}
",
    );
    let drift = read(&store).drift(&changed);
    assert_eq!(drift.len(), 2, "{drift:#?}");
    for frontend in &drift {
        assert_eq!(frontend.kind, DriftKind::Stale);
        let reasons = frontend.reasons.join("\n");
        assert!(
            reasons.contains("endpoints for new flows: the maps hold [10.1.1.2:8080]")
                && reasons.contains("the objects give [10.1.1.5:8080]"),
            "{reasons}"
        );
        assert!(
            reasons.contains("generation: the maps hold 1, the objects give 2"),
            "{reasons}"
        );
    }

    // The reconciler writes exactly that, and then nothing drifts.
    let summary = reconciler.reconcile(&changed, &mut store);
    assert!(summary.errors.is_empty());
    assert_eq!(summary.updated, 2);
    assert!(read(&store).drift(&changed).is_empty());
    assert!(!reconciler.reconcile(&changed, &mut store).changed());
}

#[test]
fn a_condition_change_alone_rewrites_the_entry_in_place() {
    let mut store = MemoryStore::default();
    let (mut reconciler, _) = Reconciler::from_store(&mut store).expect("empty store");
    let serving = "- {addresses: [10.1.1.4], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}\n";
    let not_serving = "- {addresses: [10.1.1.4], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}\n";
    let before = desired(1, serving);
    assert!(reconciler.reconcile(&before, &mut store).errors.is_empty());
    let ids: Vec<u32> = store.backends.keys().copied().collect();
    // The terminating endpoint serves new flows while none is ready; once it stops serving it
    // drains, keeping its id: the conditions ride along, the identity does not change.
    let after = desired(1, not_serving);
    let drift = read(&store).drift(&after);
    assert_eq!(drift.len(), 2, "{drift:#?}");
    for frontend in &drift {
        let reasons = frontend.reasons.join("\n");
        assert!(
            reasons.contains(
                "endpoint 10.1.1.4:8080 (backend 1): the maps hold active+serving+terminating, \
                 the objects give active+draining+terminating"
            ) || reasons.contains(
                "endpoint 10.1.1.4:8080 (backend 2): the maps hold active+serving+terminating, \
                 the objects give active+draining+terminating"
            ),
            "{reasons}"
        );
    }
    assert!(reconciler.reconcile(&after, &mut store).errors.is_empty());
    assert_eq!(store.backends.keys().copied().collect::<Vec<_>>(), ids);
    assert!(
        store
            .backends
            .values()
            .all(|backend| backend.flags == BACKEND_ACTIVE | BACKEND_DRAINING | BACKEND_TERMINATING)
    );
    assert!(read(&store).drift(&after).is_empty());
}
