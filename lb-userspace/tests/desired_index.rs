//! The incremental desired state ([`Index`]) against the pure function ([`desired_state`]) on
//! random sequences of Service, EndpointSlice and node changes: after every flush, the changes
//! it hands over, applied to what was handed over before, must equal the full computation over
//! every object, notes included; and a reconciler fed only those changes must leave the maps as
//! one fed the full state each time.
//!
//! The objects are drawn from small pools of addresses and ports so that Services collide on
//! frontends and ClusterIPs, slices move between Services, and policies flip.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    ops::{Range, RangeInclusive},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb::{
    desired::{
        DesiredState, Note, ServiceId, desired_state,
        index::{Index, ObjectKey},
    },
    node::NodeConfig,
    reconcile::{MemoryStore, Reconciler},
};

/// Random sequences tried, and changes in each.
const SEQUENCES: u64 = 60;
const CHANGES_PER_SEQUENCE: usize = 120;

/// Object pools: small, so that objects collide.
const NAMESPACES: [&str; 2] = ["default", "shop"];
const SERVICE_NAMES: [&str; 4] = ["web", "api", "db", "dns"];
const SLICE_SUFFIXES: [&str; 3] = ["a", "b", "c"];
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
const ZONES: [&str; 2] = ["zone-1", "zone-2"];
const NODE_PORT_RANGE: RangeInclusive<u16> = 30_000..=32_767;

/// xorshift64*: reproducible without a dependency; the seed is printed on failure.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound).expect("small")).expect("small")
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn in_range(&mut self, range: Range<u8>) -> u8 {
        let width = usize::from(range.end - range.start);
        range.start + u8::try_from(self.below(width)).expect("small")
    }
}

fn service_yaml(random: &mut Random, namespace: &str, name: &str) -> String {
    let kind = *random.pick(&[
        "ClusterIP",
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
        "ExternalName",
    ]);
    let cluster_ip = if random.chance(10) {
        "None".to_owned()
    } else {
        format!("10.96.0.{}", random.in_range(1..4))
    };
    let mut spec = format!("  type: {kind}\n  clusterIP: \"{cluster_ip}\"\n");
    if random.chance(40) {
        spec += &format!("  externalIPs: [\"192.0.2.{}\"]\n", random.in_range(1..3));
    }
    for (field, percent) in [("externalTrafficPolicy", 40), ("internalTrafficPolicy", 30)] {
        if random.chance(percent) {
            spec += &format!("  {field}: {}\n", random.pick(&["Local", "Cluster"]));
        }
    }
    if random.chance(20) {
        spec += "  sessionAffinity: ClientIP\n";
    }
    if random.chance(20) {
        spec += "  loadBalancerSourceRanges: [\"198.51.100.0/24\"]\n";
    }
    spec += "  ports:\n";
    for port_name in ["http", "dns"] {
        if random.chance(60) {
            let protocol = random.pick(&["TCP", "UDP"]);
            let port = random.pick(&[80, 443]);
            let node_port = 30_080 + random.below(2);
            spec += &format!(
                "  - {{name: {port_name}, port: {port}, protocol: {protocol}, nodePort: \
                 {node_port}}}\n"
            );
        }
    }
    let status = if random.chance(60) {
        format!(
            "status:\n  loadBalancer:\n    ingress: [{{ip: \"203.0.113.{}\"}}]\n",
            random.in_range(1..3)
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: \
         {namespace}}}\nspec:\n{spec}{status}"
    )
}

fn slice_yaml(random: &mut Random, namespace: &str, name: &str) -> String {
    let service = random.pick(&SERVICE_NAMES);
    let address_type = if random.chance(90) { "IPv4" } else { "IPv6" };
    let mut endpoints = String::new();
    for _ in 0..random.below(4) {
        let flag = |random: &mut Random| *random.pick(&["true", "false"]);
        endpoints += &format!(
            "- addresses: [\"10.244.0.{}\"]\n  nodeName: {}\n  conditions: {{ready: {}, serving: \
             {}, terminating: {}}}\n",
            random.in_range(1..8),
            random.pick(&NODE_NAMES),
            flag(random),
            flag(random),
            flag(random)
        );
        let mut hints = Vec::new();
        if random.chance(60) {
            hints.push(format!("forZones: [{{name: {}}}]", random.pick(&ZONES)));
        }
        if random.chance(30) {
            hints.push(format!(
                "forNodes: [{{name: {}}}]",
                random.pick(&NODE_NAMES)
            ));
        }
        if !hints.is_empty() {
            endpoints += &format!("  hints: {{{}}}\n", hints.join(", "));
        }
    }
    let mut ports = String::new();
    for port_name in ["http", "dns"] {
        if random.chance(70) {
            ports += &format!(
                "- {{name: {port_name}, port: {}, protocol: {}}}\n",
                random.pick(&[8080, 53]),
                random.pick(&["TCP", "UDP"])
            );
        }
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: \
         {service}\naddressType: {address_type}\nports:\n{ports}endpoints:\n{endpoints}"
    )
    .replace("ports:\nendpoints", "ports: []\nendpoints")
    .replace("endpoints:\n\n", "endpoints: []\n")
    .trim_end()
    .to_owned()
        + "\n"
}

fn node(random: &mut Random) -> NodeConfig {
    let mut nodeport_addresses = vec![Ipv4Addr::new(172, 18, 0, 2)];
    if random.chance(50) {
        // The same address as an externalIP: a NodePort may collide with it.
        nodeport_addresses.push(Ipv4Addr::new(192, 0, 2, 1));
    }
    if random.chance(30) {
        // A ClusterIP that is the node's own address.
        nodeport_addresses.push(Ipv4Addr::new(10, 96, 0, 1));
    }
    NodeConfig {
        nodeport_addresses,
        node_port_range: NODE_PORT_RANGE,
        node_name: Some((*random.pick(&NODE_NAMES)).to_owned()),
        zone: random.chance(70).then(|| (*random.pick(&ZONES)).to_owned()),
        node_ips: Vec::new(),
    }
}

fn key(random: &mut Random, names: &[&str]) -> ObjectKey {
    (
        (*random.pick(&NAMESPACES)).to_owned(),
        (*random.pick(names)).to_owned(),
    )
}

/// The maps as the datapath sees them, without ids (which depend on the order of writes).
fn resolved(store: &MemoryStore) -> Vec<String> {
    let mut view: Vec<String> = store
        .services
        .iter()
        .map(|(key, value)| {
            format!(
                "{key:?} flags {} affinity {} -> {:?}",
                value.flags,
                value.affinity_timeout_s,
                store.resolve(key)
            )
        })
        .collect();
    view.push(format!("cluster ips {:?}", store.cluster_ips));
    view.push(format!(
        "entries: {} backends, {} slots, {} infos, {} source ranges",
        store.backends.len(),
        store.slots.len(),
        store.infos.len(),
        store.source_ranges.len()
    ));
    view
}

fn run_sequence(seed: u64) {
    let mut random = Random(seed);
    let slice_names: Vec<String> = SERVICE_NAMES
        .iter()
        .flat_map(|service| {
            SLICE_SUFFIXES
                .iter()
                .map(move |suffix| format!("{service}-{suffix}"))
        })
        .collect();
    let slice_names: Vec<&str> = slice_names.iter().map(String::as_str).collect();
    let mut index = Index::new(node(&mut random));
    // What the changes built up, and what the notes reported.
    let mut handed_over = DesiredState::default();
    let mut reported: BTreeMap<ServiceId, Vec<Note>> = BTreeMap::new();
    let reconciler = || {
        let mut store = MemoryStore::default();
        let (reconciler, _) = Reconciler::from_store(&mut store).expect("an empty store");
        (reconciler, store)
    };
    let mut partial = reconciler();
    let mut full = reconciler();
    for step in 0..CHANGES_PER_SEQUENCE {
        for _ in 0..=random.below(3) {
            match random.below(10) {
                0..=3 => {
                    let (namespace, name) = key(&mut random, &SERVICE_NAMES);
                    let service: Option<Service> = random.chance(80).then(|| {
                        serde_yaml_ng::from_str(&service_yaml(&mut random, &namespace, &name))
                            .expect("the generated Service parses")
                    });
                    index.set_service((namespace, name), service);
                }
                4..=8 => {
                    let (namespace, name) = key(&mut random, &slice_names);
                    let slice: Option<EndpointSlice> = random.chance(80).then(|| {
                        let yaml = slice_yaml(&mut random, &namespace, &name);
                        serde_yaml_ng::from_str(&yaml)
                            .unwrap_or_else(|error| panic!("{error}:\n{yaml}"))
                    });
                    index.set_slice((namespace, name), slice);
                }
                _ => {
                    index.set_node(node(&mut random));
                }
            }
        }
        let changes = index.flush();
        changes.apply_to(&mut handed_over);
        for (id, notes) in &changes.notes {
            if notes.is_empty() {
                reported.remove(id);
            } else {
                reported.insert(id.clone(), notes.clone());
            }
        }

        let (services, slices) = index.objects();
        let (expected, expected_notes) = desired_state(services, slices, index.node());
        let context = format!("seed {seed}, step {step}");
        assert_eq!(handed_over, expected, "{context}: the changes handed over");
        assert_eq!(index.desired(), expected, "{context}: Index::desired");
        assert_eq!(index.notes(), expected_notes, "{context}: Index::notes");
        let reported_notes: Vec<Note> = reported.values().flatten().cloned().collect();
        assert_eq!(
            reported_notes, expected_notes,
            "{context}: the notes reported"
        );

        let summary = partial.0.reconcile_changes(&changes, &mut partial.1);
        assert!(summary.errors.is_empty(), "{context}: {:?}", summary.errors);
        let summary = full.0.reconcile(&expected, &mut full.1);
        assert!(summary.errors.is_empty(), "{context}: {:?}", summary.errors);
        assert_eq!(
            resolved(&partial.1),
            resolved(&full.1),
            "{context}: the maps after the changes alone"
        );
    }
}

#[test]
fn the_index_hands_over_what_the_full_computation_says() {
    let first: u64 = std::env::var("LB_INDEX_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(0x5eed_1dea);
    for sequence in 0..SEQUENCES {
        run_sequence(first.wrapping_add(sequence).max(1));
    }
}

#[test]
fn a_relist_of_unchanged_objects_changes_nothing() {
    let mut random = Random(7);
    let mut index = Index::new(node(&mut random));
    let service: Service = serde_yaml_ng::from_str(&service_yaml(&mut random, "default", "web"))
        .expect("the generated Service parses");
    let id = ("default".to_owned(), "web".to_owned());
    assert!(index.set_service(id.clone(), Some(service.clone())));
    let _ = index.flush();
    assert!(!index.set_service(id, Some(service)));
    assert!(index.flush().is_empty());
}
