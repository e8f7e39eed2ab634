//! Host tests of `desired_state`: Kubernetes Services and EndpointSlices in, frontends and notes
//! out, with kube-proxy's semantics.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb::{
    desired::{BackendAddr, DesiredState, Details, Frontend, Note, desired_state},
    manifests::{Snapshot, load_dir},
    node::NodeConfig,
};
use lb_common::service::{SERVICE_DROP_WHEN_EMPTY, SERVICE_SNAT_REMOTE, ServiceKey};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn fixture_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The Services and EndpointSlices of one manifest file, read the way the agent reads them.
fn load_file(dir: &Path, file: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let load = load_dir(dir, &Snapshot::default()).expect("the fixture directory is readable");
    let path = dir.join(file);
    let errors: Vec<_> = load.errors.iter().filter(|e| e.file == path).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let services = load
        .snapshot
        .services
        .into_values()
        .filter(|sourced| sourced.file == path)
        .map(|sourced| sourced.object)
        .collect();
    let slices = load
        .snapshot
        .slices
        .into_values()
        .filter(|sourced| sourced.file == path)
        .map(|sourced| sourced.object)
        .collect();
    (services, slices)
}

fn service(yaml: &str) -> Service {
    serde_yaml_ng::from_str(&format!("apiVersion: v1\nkind: Service\n{yaml}"))
        .expect("the test's Service parses")
}

fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml_ng::from_str(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n{yaml}"
    ))
    .expect("the test's EndpointSlice parses")
}

/// A ClusterIP Service `namespace/name` at `cluster_ip` with the given `ports:` list items.
fn cluster_ip_service(namespace: &str, name: &str, cluster_ip: &str, ports: &str) -> Service {
    service(&format!(
        "metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  clusterIP: \
         {cluster_ip}\n  ports:\n{ports}"
    ))
}

/// An IPv4 EndpointSlice of Service `namespace/service` with the given `ports` and ready
/// endpoints at `addresses`.
fn ready_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &str,
    addresses: &[&str],
) -> EndpointSlice {
    let endpoints: String = addresses
        .iter()
        .map(|address| format!("- addresses: [\"{address}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    slice(&format!(
        "metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    \
         kubernetes.io/service-name: {service}\naddressType: IPv4\nports: {ports}\nendpoints:\n\
         {endpoints}"
    ))
}

/// The expected map key, built from the wire layout rather than the library's helpers.
fn key(addr: [u8; 4], port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: u32::from_ne_bytes(addr),
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

fn backends(addresses: &[&str], port: u16) -> Vec<BackendAddr> {
    addresses
        .iter()
        .map(|address| BackendAddr {
            addr: address.parse().expect("an IPv4 address"),
            port,
            remote: false,
        })
        .collect()
}

fn frontend(
    (namespace, name, port_name): (&str, &str, &str),
    addr: [u8; 4],
    port: u16,
    proto: u8,
    backends: Vec<BackendAddr>,
) -> Frontend {
    Frontend {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port_name: port_name.to_owned(),
        addr: Ipv4Addr::from(addr),
        port,
        proto,
        backends,
        draining: Vec::new(),
        drop_when_empty: false,
        affinity_timeout_s: 0,
        source_ranges: None,
        snat_remote: false,
        details: Details::default(),
    }
}

fn desired(services: &[Service], slices: &[EndpointSlice]) -> (DesiredState, Vec<Note>) {
    desired_state(services, slices, &NodeConfig::default())
}

fn frontends(desired: &DesiredState) -> Vec<Frontend> {
    for (key, frontend) in &desired.frontends {
        assert_eq!(
            *key,
            frontend.key(),
            "{frontend:?} is filed under another key"
        );
    }
    // These tests are about where traffic goes; what the inspection commands are told about a
    // frontend (`details`) has tests of its own.
    let mut frontends: Vec<Frontend> = desired
        .frontends
        .values()
        .map(|frontend| Frontend {
            details: Details::default(),
            ..frontend.clone()
        })
        .collect();
    // Host order, so that the expected lists read naturally whatever the byte order.
    frontends.sort_by_key(|frontend| (frontend.addr, frontend.port, frontend.proto));
    frontends
}

/// The backends of the one frontend `desired` holds.
fn only_backends(desired: &DesiredState) -> Vec<BackendAddr> {
    assert_eq!(desired.frontends.len(), 1, "{desired:#?}");
    desired
        .frontends
        .values()
        .next()
        .expect("one frontend")
        .backends
        .clone()
}

fn note(object: &str, message: &str) -> Note {
    Note {
        object: object.to_owned(),
        message: message.to_owned(),
    }
}

#[test]
fn the_seeds_without_a_cluster_ip_give_no_frontends_and_say_why() {
    let dir = fixture_dir("tests/fixtures/seeds");
    let (mut services, slices) = load_file(&dir, "my-service.yaml");
    services.extend(load_file(&dir, "pgadmin.yaml").0);
    assert_eq!(services.len(), 2);

    let (state, notes) = desired(&services, &slices);
    assert!(state.frontends.is_empty(), "{state:#?}");
    let objects: Vec<&str> = notes.iter().map(|note| note.object.as_str()).collect();
    assert_eq!(
        objects,
        vec!["Service default/my-service", "Service postgresql/pgadmin"]
    );
    for note in &notes {
        assert!(
            note.message.contains("spec.clusterIP is not set"),
            "{note:?}"
        );
    }
}

#[test]
fn my_service_with_a_cluster_ip_and_its_controller_slice_gives_two_frontends() {
    let (services, slices) = load_file(
        &fixture_dir("tests/fixtures/host/my-service"),
        "my-service.yaml",
    );
    assert_eq!((services.len(), slices.len()), (1, 1));

    let (state, notes) = desired(&services, &slices);
    assert!(notes.is_empty(), "{notes:?}");
    let pods = ["10.244.1.5", "10.244.1.12", "10.244.2.7"];
    assert_eq!(
        frontends(&state),
        vec![
            frontend(
                ("default", "my-service", "http"),
                [10, 96, 0, 20],
                80,
                TCP,
                backends(&pods, 9080)
            ),
            frontend(
                ("default", "my-service", "https"),
                [10, 96, 0, 20],
                443,
                TCP,
                backends(&pods, 9433)
            ),
        ]
    );
    assert!(state.frontends.contains_key(&key([10, 96, 0, 20], 80, TCP)));
    assert!(
        state
            .frontends
            .contains_key(&key([10, 96, 0, 20], 443, TCP))
    );
}

#[test]
fn the_echo_example_resolves_the_named_target_port_through_the_slice() {
    let (services, slices) = load_file(&fixture_dir("examples"), "echo.yaml");
    let (state, notes) = desired(&services, &slices);
    assert!(notes.is_empty(), "{notes:?}");
    let pods = ["10.1.1.2", "10.1.2.2", "10.1.3.2"];
    assert_eq!(
        frontends(&state),
        vec![
            frontend(
                ("demo", "echo", "udp-echo"),
                [10, 96, 0, 10],
                53,
                UDP,
                backends(&pods, 5353)
            ),
            frontend(
                ("demo", "echo", "http"),
                [10, 96, 0, 10],
                80,
                TCP,
                backends(&pods, 8080)
            ),
        ]
    );
    assert!(state.frontends.contains_key(&key([10, 96, 0, 10], 80, TCP)));
    assert!(state.frontends.contains_key(&key([10, 96, 0, 10], 53, UDP)));
}

#[test]
fn only_ready_endpoints_are_backends_and_unknown_readiness_counts_as_ready() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - port: 80\n",
    )];
    let slices = [slice(
        "metadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
         - {addresses: [10.0.0.1], conditions: {ready: true}}\n\
         - {addresses: [10.0.0.2], conditions: {ready: false}}\n\
         - {addresses: [10.0.0.3]}\n\
         - {addresses: [10.0.0.4], conditions: {}}\n\
         - {addresses: [10.0.0.5], conditions: {ready: false, serving: true, terminating: true}}\n\
         - {addresses: [10.0.0.6], conditions: {serving: true}}\n",
    )];
    let (state, notes) = desired(&services, &slices);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        only_backends(&state),
        backends(&["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.6"], 8080)
    );
    // Listed but not ready (failing a probe, or terminating): draining, not gone.
    let frontend = state.frontends.values().next().expect("one frontend");
    assert_eq!(frontend.draining, backends(&["10.0.0.2", "10.0.0.5"], 8080));
}

#[test]
fn with_no_ready_endpoint_the_serving_terminating_ones_take_new_flows() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - port: 80\n",
    )];
    let with = |endpoints: &str| {
        slice(&format!(
            "metadata:\n  name: web-1\n  labels: {{kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
        ))
    };
    // A rolling update of one replica: the old pod terminates (still serving), the new one is
    // not ready yet, a third terminates and no longer serves.
    let slices = [with(
        "- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}\n\
         - {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: false}}\n\
         - {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}\n\
         - {addresses: [10.0.0.4], conditions: {ready: false, serving: true}}\n",
    )];
    let (state, notes) = desired(&services, &slices);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(only_backends(&state), backends(&["10.0.0.1"], 8080));
    let frontend = state.frontends.values().next().expect("one frontend");
    assert_eq!(
        frontend.draining,
        backends(&["10.0.0.2", "10.0.0.3", "10.0.0.4"], 8080)
    );

    // Once the new pod is ready, it alone takes new flows; the old one drains.
    let slices = [with(
        "- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}\n\
         - {addresses: [10.0.0.2], conditions: {ready: true, serving: true, terminating: false}}\n",
    )];
    let (state, _) = desired(&services, &slices);
    assert_eq!(only_backends(&state), backends(&["10.0.0.2"], 8080));
    let frontend = state.frontends.values().next().expect("one frontend");
    assert_eq!(frontend.draining, backends(&["10.0.0.1"], 8080));
}

#[test]
fn an_address_ready_in_one_slice_is_not_draining_because_of_another() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - port: 80\n",
    )];
    let slices = [
        slice(
            "metadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\n\
             addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - {addresses: [10.0.0.1], conditions: {ready: false}}\n\
             - {addresses: [10.0.0.2], conditions: {ready: false}}\n",
        ),
        slice(
            "metadata:\n  name: web-2\n  labels: {kubernetes.io/service-name: web}\n\
             addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - {addresses: [10.0.0.1], conditions: {ready: true}}\n",
        ),
    ];
    let (state, _) = desired(&services, &slices);
    let frontend = state.frontends.values().next().expect("one frontend");
    assert_eq!(frontend.backends, backends(&["10.0.0.1"], 8080));
    assert_eq!(frontend.draining, backends(&["10.0.0.2"], 8080));
}

#[test]
fn the_slices_of_a_service_are_merged_without_duplicates() {
    let services = [cluster_ip_service(
        "shop",
        "web",
        "10.96.0.1",
        "  - port: 80\n    targetPort: http\n",
    )];
    let ports = "[{port: 8080}]";
    let slices = [
        ready_slice("shop", "web-a", "web", ports, &["10.0.0.1", "10.0.0.2"]),
        ready_slice("shop", "web-b", "web", ports, &["10.0.0.2", "10.0.0.3"]),
        // A rollout that changed the target port: the same pod address at two ports is two
        // endpoints.
        ready_slice("shop", "web-c", "web", "[{port: 8081}]", &["10.0.0.1"]),
    ];
    let (state, _) = desired(&services, &slices);
    let mut expected = backends(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], 8080);
    expected.insert(1, backends(&["10.0.0.1"], 8081)[0]);
    assert_eq!(only_backends(&state), expected);
}

#[test]
fn slices_of_other_namespaces_and_other_services_are_ignored() {
    let services = [
        cluster_ip_service("shop", "web", "10.96.0.1", "  - port: 80\n"),
        service("metadata: {name: api}\nspec:\n  clusterIP: 10.96.0.2\n  ports:\n  - port: 9000\n"),
    ];
    let ports = "[{port: 8080}]";
    let slices = [
        ready_slice("shop", "web-1", "web", ports, &["10.0.0.1"]),
        ready_slice("other", "web-1", "web", ports, &["10.0.0.2"]),
        ready_slice("shop", "web2-1", "web2", ports, &["10.0.0.3"]),
        // Named like the Service's slices but not labelled for it.
        slice(
            "metadata: {name: web-x, namespace: shop}\naddressType: IPv4\n\
             ports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.4]}]\n",
        ),
        // No namespace on either side: both are in `default`.
        slice(
            "metadata:\n  name: api-1\n  labels: {kubernetes.io/service-name: api}\n\
             addressType: IPv4\nports: [{port: 9001}]\nendpoints: [{addresses: [10.0.0.5]}]\n",
        ),
    ];
    let (state, notes) = desired(&services, &slices);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        state.frontends[&key([10, 96, 0, 1], 80, TCP)].backends,
        backends(&["10.0.0.1"], 8080)
    );
    assert_eq!(
        state.frontends[&key([10, 96, 0, 2], 9000, TCP)].backends,
        backends(&["10.0.0.5"], 9001)
    );
    assert_eq!(state.frontends.len(), 2);
}

#[test]
fn ipv6_and_fqdn_slices_are_ignored() {
    let services = [service(
        "metadata: {name: web}\nspec:\n  clusterIP: 10.96.0.1\n  clusterIPs: [10.96.0.1, \
         fd00::1]\n  ipFamilies: [IPv4, IPv6]\n  ports:\n  - port: 80\n",
    )];
    let endpoints_of = |name: &str, address_type: &str, address: &str| {
        slice(&format!(
            "metadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: web}}\n\
             addressType: {address_type}\nports: [{{port: 8080}}]\n\
             endpoints: [{{addresses: [\"{address}\"]}}]\n"
        ))
    };
    let slices = [
        endpoints_of("web-v4", "IPv4", "10.0.0.1"),
        endpoints_of("web-v6", "IPv6", "fd00:10::1"),
        endpoints_of("web-fqdn", "FQDN", "web.example.com"),
    ];
    let (state, notes) = desired(&services, &slices);
    assert_eq!(only_backends(&state), backends(&["10.0.0.1"], 8080));
    assert_eq!(
        notes,
        vec![note(
            "Service default/web",
            "ClusterIP fd00::1: IPv6 is not supported yet"
        )]
    );
}

#[test]
fn headless_and_external_name_services_give_a_note_and_nothing_else() {
    let endpoints = |service: &str| {
        ready_slice(
            "default",
            &format!("{service}-1"),
            service,
            "[{port: 8080}]",
            &["10.0.0.1"],
        )
    };
    for spec in [
        "  clusterIP: None\n  ports: [{port: 80}]\n",
        "  clusterIP: None\n  clusterIPs: [None]\n  ports: [{port: 80}]\n",
    ] {
        let services = [service(&format!("metadata: {{name: db}}\nspec:\n{spec}"))];
        let (state, notes) = desired(&services, &[endpoints("db")]);
        assert!(state.frontends.is_empty(), "{state:#?}");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(notes[0].object, "Service default/db");
        assert!(notes[0].message.contains("headless"), "{notes:?}");
    }

    let services = [service(
        "metadata: {name: db}\nspec:\n  type: ExternalName\n  externalName: db.example.com\n  \
         ports: [{port: 80}]\n",
    )];
    let (state, notes) = desired(&services, &[endpoints("db")]);
    assert!(state.frontends.is_empty(), "{state:#?}");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].object, "Service default/db");
    assert!(notes[0].message.contains("ExternalName"), "{notes:?}");
}

#[test]
fn a_service_of_another_proxy_is_left_alone_with_a_note() {
    let services = [service(
        "metadata:\n  name: web\n  labels: {service.kubernetes.io/service-proxy-name: other}\n\
         spec:\n  clusterIP: 10.96.0.30\n  ports: [{port: 80, targetPort: 8080}]\n",
    )];
    let slices = [ready_slice(
        "default",
        "web-1",
        "web",
        "[{port: 8080}]",
        &["10.1.1.2"],
    )];
    let (state, notes) = desired(&services, &slices);
    assert!(state.frontends.is_empty(), "{state:#?}");
    assert!(state.cluster_ips.is_empty(), "{state:#?}");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].message.contains("\"other\""), "{notes:?}");
}

#[test]
fn an_sctp_port_is_noted_and_skipped() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - {name: http, port: 80}\n  - {name: sig, port: 9000, protocol: SCTP}\n",
    )];
    let slices = [ready_slice(
        "default",
        "web-1",
        "web",
        "[{name: http, port: 8080}, {name: sig, port: 9000, protocol: SCTP}]",
        &["10.0.0.1"],
    )];
    let (state, notes) = desired(&services, &slices);
    assert_eq!(
        frontends(&state),
        vec![frontend(
            ("default", "web", "http"),
            [10, 96, 0, 1],
            80,
            TCP,
            backends(&["10.0.0.1"], 8080)
        )]
    );
    assert_eq!(
        notes,
        vec![note(
            "Service default/web",
            "port 9000 (sig): protocol SCTP is not supported"
        )]
    );
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_service_by_namespace_and_name() {
    // Given in the opposite order to show the outcome does not depend on it.
    let services = [
        cluster_ip_service(
            "b",
            "web",
            "10.96.0.50",
            "  - {name: http, port: 80}\n  - {name: alt, port: 81}\n  - {name: udp, port: 80, \
             protocol: UDP}\n",
        ),
        cluster_ip_service("a", "web", "10.96.0.50", "  - port: 80\n"),
    ];
    let slices = [
        ready_slice("a", "web-1", "web", "[{port: 8080}]", &["10.0.0.1"]),
        ready_slice(
            "b",
            "web-1",
            "web",
            "[{name: http, port: 9090}, {name: alt, port: 9091}, {name: udp, port: 9092, \
             protocol: UDP}]",
            &["10.0.0.2"],
        ),
    ];
    let (state, notes) = desired(&services, &slices);
    assert_eq!(
        frontends(&state),
        vec![
            frontend(
                ("a", "web", ""),
                [10, 96, 0, 50],
                80,
                TCP,
                backends(&["10.0.0.1"], 8080)
            ),
            frontend(
                ("b", "web", "udp"),
                [10, 96, 0, 50],
                80,
                UDP,
                backends(&["10.0.0.2"], 9092)
            ),
            frontend(
                ("b", "web", "alt"),
                [10, 96, 0, 50],
                81,
                TCP,
                backends(&["10.0.0.2"], 9091)
            ),
        ]
    );
    assert_eq!(
        notes,
        vec![note(
            "Service b/web",
            "10.96.0.50:80 is already served by Service a/web; ignored here"
        )]
    );
}

#[test]
fn dual_stack_services_use_their_ipv4_cluster_ip() {
    let slices = [ready_slice(
        "default",
        "web-1",
        "web",
        "[{port: 8080}]",
        &["10.0.0.1"],
    )];
    for (primary, cluster_ips, v4, v6) in [
        (
            "fd00::10",
            "[fd00::10, 10.96.0.60]",
            [10, 96, 0, 60],
            "fd00::10",
        ),
        (
            "10.96.0.61",
            "[10.96.0.61, fd00::11]",
            [10, 96, 0, 61],
            "fd00::11",
        ),
    ] {
        let services = [service(&format!(
            "metadata: {{name: web}}\nspec:\n  clusterIP: {primary}\n  clusterIPs: \
             {cluster_ips}\n  ports: [{{port: 80}}]\n"
        ))];
        let (state, notes) = desired(&services, &slices);
        assert_eq!(
            frontends(&state),
            vec![frontend(
                ("default", "web", ""),
                v4,
                80,
                TCP,
                backends(&["10.0.0.1"], 8080)
            )]
        );
        assert_eq!(
            notes,
            vec![note(
                "Service default/web",
                &format!("ClusterIP {v6}: IPv6 is not supported yet")
            )]
        );
    }

    // IPv6 only: said once, and not mistaken for a missing clusterIP.
    let services = [service(
        "metadata: {name: web}\nspec:\n  clusterIP: fd00::12\n  ports: [{port: 80}]\n",
    )];
    let (state, notes) = desired(&services, &slices);
    assert!(state.frontends.is_empty(), "{state:#?}");
    assert_eq!(
        notes,
        vec![note(
            "Service default/web",
            "ClusterIP fd00::12: IPv6 is not supported yet"
        )]
    );
}

#[test]
fn an_unnamed_single_port_matches_the_unnamed_slice_port_only() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - port: 80\n    targetPort: 8080\n",
    )];
    for (ports, expected) in [
        ("[{port: 8080}]", backends(&["10.0.0.1"], 8080)),
        // The EndpointSlice controller writes the empty name out.
        ("[{name: \"\", port: 8080}]", backends(&["10.0.0.1"], 8080)),
        ("[{name: http, port: 8080}]", Vec::new()),
    ] {
        let slices = [ready_slice("default", "web-1", "web", ports, &["10.0.0.1"])];
        let (state, notes) = desired(&services, &slices);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            frontends(&state),
            vec![frontend(
                ("default", "web", ""),
                [10, 96, 0, 1],
                80,
                TCP,
                expected
            )],
            "slice ports {ports}"
        );
    }
}

#[test]
fn slice_ports_match_by_protocol_as_well_as_name() {
    let services = [cluster_ip_service(
        "default",
        "dns",
        "10.96.0.10",
        "  - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53}\n",
    )];
    // `dns` is offered over TCP only, `dns-tcp` with the protocol left to its default.
    let slices = [ready_slice(
        "default",
        "dns-1",
        "dns",
        "[{name: dns, port: 5353, protocol: TCP}, {name: dns-tcp, port: 5354}]",
        &["10.0.0.1"],
    )];
    let (state, _) = desired(&services, &slices);
    assert_eq!(
        state.frontends[&key([10, 96, 0, 10], 53, UDP)].backends,
        Vec::new()
    );
    assert_eq!(
        state.frontends[&key([10, 96, 0, 10], 53, TCP)].backends,
        backends(&["10.0.0.1"], 5354)
    );
}

#[test]
fn backends_are_sorted_by_address_then_port() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - port: 80\n",
    )];
    let slices = [
        ready_slice(
            "default",
            "web-1",
            "web",
            "[{port: 8080}]",
            &["10.0.0.100", "10.0.0.9", "9.0.0.1", "10.0.0.10"],
        ),
        ready_slice("default", "web-2", "web", "[{port: 80}]", &["10.0.0.10"]),
    ];
    let (state, _) = desired(&services, &slices);
    // Numeric order, not the order of the strings.
    let mut expected = backends(&["9.0.0.1", "10.0.0.9"], 8080);
    expected.extend(backends(&["10.0.0.10"], 80));
    expected.extend(backends(&["10.0.0.10", "10.0.0.100"], 8080));
    assert_eq!(only_backends(&state), expected);
}

#[test]
fn an_endpoint_is_reached_at_its_first_address() {
    let services = [cluster_ip_service(
        "default",
        "web",
        "10.96.0.1",
        "  - port: 80\n",
    )];
    let slices = [ready_slice(
        "default",
        "web-1",
        "web",
        "[{port: 8080}]",
        &["10.0.0.1"],
    )];
    let mut slices = slices.to_vec();
    slices[0].endpoints.as_mut().unwrap()[0]
        .addresses
        .push("10.0.0.2".to_owned());
    let (state, _) = desired(&services, &slices);
    assert_eq!(only_backends(&state), backends(&["10.0.0.1"], 8080));
}

#[test]
fn node_port_and_load_balancer_services_get_their_cluster_ip_frontend() {
    for service_type in ["NodePort", "LoadBalancer"] {
        let services = [service(&format!(
            "metadata: {{name: pgadmin, namespace: postgresql}}\nspec:\n  type: {service_type}\n  \
             clusterIP: 10.96.5.5\n  ports:\n  - {{name: padmin-port, nodePort: 30165, port: 80, \
             targetPort: 80}}\n"
        ))];
        let slices = [ready_slice(
            "postgresql",
            "pgadmin-1",
            "pgadmin",
            "[{name: padmin-port, port: 80}]",
            &["10.0.0.1"],
        )];
        let (state, notes) = desired(&services, &slices);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            frontends(&state),
            vec![frontend(
                ("postgresql", "pgadmin", "padmin-port"),
                [10, 96, 5, 5],
                80,
                TCP,
                backends(&["10.0.0.1"], 80)
            )]
        );
    }
}

#[test]
fn external_ips_and_load_balancer_ingress_ips_are_frontends_like_the_cluster_ip() {
    let services = [service(
        "metadata: {name: web, namespace: shop}\nspec:\n  type: LoadBalancer\n  clusterIP: \
         10.96.0.20\n  externalIPs: [198.51.100.7, 10.96.0.20, \"2001:db8::7\"]\n  ports:\n  - \
         {name: http, port: 80, targetPort: 8080}\nstatus:\n  loadBalancer:\n    ingress:\n    - \
         ip: 192.0.2.10\n    - hostname: lb.example.com\n    - {ip: 192.0.2.11, ipMode: Proxy}\n    \
         - {ip: 192.0.2.12, ipMode: VIP}\n",
    )];
    let slices = [ready_slice(
        "shop",
        "web-1",
        "web",
        "[{name: http, port: 8080}]",
        &["10.1.1.2", "10.1.2.2"],
    )];
    let (state, notes) = desired(&services, &slices);
    let ready = backends(&["10.1.1.2", "10.1.2.2"], 8080);
    let mut expected: Vec<Frontend> = [
        [10, 96, 0, 20],
        [198, 51, 100, 7],
        [192, 0, 2, 10],
        [192, 0, 2, 12],
    ]
    .into_iter()
    .map(|addr| Frontend {
        // External traffic under the default Cluster policy.
        snat_remote: addr != [10, 96, 0, 20],
        ..frontend(("shop", "web", "http"), addr, 80, TCP, ready.clone())
    })
    .collect();
    expected.sort_by_key(|frontend| frontend.addr);
    assert_eq!(frontends(&state), expected);
    // The IPv6 address and the proxying load balancer are said; the hostname is not an
    // address, and the externalIP equal to the ClusterIP is the same frontend.
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes.iter().all(|n| n.object == "Service shop/web"));
    assert!(notes[0].message.contains("2001:db8::7"), "{notes:?}");
    assert!(notes[1].message.contains("192.0.2.11"), "{notes:?}");
    assert!(notes[1].message.contains("Proxy"), "{notes:?}");

    // A ClusterIP Service's status is not a load balancer's: only its externalIPs count.
    let services = [service(
        "metadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - \
         {name: http, port: 80, targetPort: 8080}\nstatus:\n  loadBalancer:\n    ingress:\n    - \
         ip: 192.0.2.10\n",
    )];
    let (state, notes) = desired(&services, &slices);
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        frontends(&state),
        vec![frontend(
            ("shop", "web", "http"),
            [10, 96, 0, 20],
            80,
            TCP,
            ready
        )]
    );
}

#[test]
fn node_ports_are_frontends_on_every_nodeport_address_within_the_range() {
    let node = NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 1, 1, 254)],
        node_port_range: 30_000..=32_767,
        node_name: None,
        zone: None,
        node_ips: Vec::new(),
    };
    let services = [
        service(
            "metadata: {name: web, namespace: shop}\nspec:\n  type: NodePort\n  clusterIP: \
             10.96.0.20\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: \
             30080}\n  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: \
             30053}\n  - {name: admin, port: 81, targetPort: 8080, nodePort: 29999}\n  - {name: \
             metrics, port: 82, targetPort: 8080}\n",
        ),
        // A LoadBalancer Service gets its nodePorts too; one without them
        // (allocateLoadBalancerNodePorts: false) is not a mistake.
        service(
            "metadata: {name: edge, namespace: shop}\nspec:\n  type: LoadBalancer\n  clusterIP: \
             10.96.0.21\n  allocateLoadBalancerNodePorts: false\n  ports:\n  - {name: http, \
             port: 80, targetPort: 8080}\n",
        ),
        // A ClusterIP Service has no nodePort, whatever its ports say.
        service(
            "metadata: {name: inside, namespace: shop}\nspec:\n  clusterIP: 10.96.0.22\n  \
             ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30081}\n",
        ),
    ];
    let slices: Vec<EndpointSlice> = ["web", "edge", "inside"]
        .into_iter()
        .map(|name| {
            ready_slice(
                "shop",
                &format!("{name}-1"),
                name,
                "[{name: http, port: 8080}, {name: dns, protocol: UDP, port: 5353}]",
                &["10.1.1.2"],
            )
        })
        .collect();
    let (state, notes) = desired_state(&services, &slices, &node);
    let listening: Vec<(String, Ipv4Addr, u16, u8)> = frontends(&state)
        .into_iter()
        .map(|f| (f.name, f.addr, f.port, f.proto))
        .collect();
    let web = |addr: [u8; 4], port, proto| ("web".to_owned(), Ipv4Addr::from(addr), port, proto);
    let mut expected = vec![
        web([10, 0, 0, 1], 30053, UDP),
        web([10, 0, 0, 1], 30080, TCP),
        web([10, 1, 1, 254], 30053, UDP),
        web([10, 1, 1, 254], 30080, TCP),
        web([10, 96, 0, 20], 53, UDP),
        web([10, 96, 0, 20], 80, TCP),
        web([10, 96, 0, 20], 81, TCP),
        web([10, 96, 0, 20], 82, TCP),
        ("edge".to_owned(), Ipv4Addr::new(10, 96, 0, 21), 80, TCP),
        ("inside".to_owned(), Ipv4Addr::new(10, 96, 0, 22), 80, TCP),
    ];
    expected.sort_by_key(|(_, addr, port, proto)| (*addr, *port, *proto));
    assert_eq!(listening, expected);
    let node_port_frontend = state
        .frontends
        .values()
        .find(|f| f.addr == Ipv4Addr::new(10, 0, 0, 1) && f.port == 30080)
        .expect("the NodePort frontend");
    assert_eq!(node_port_frontend.backends, backends(&["10.1.1.2"], 8080));
    // The nodePort outside the range and the missing one are said, once each.
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].message.contains("29999"), "{notes:?}");
    assert!(notes[0].message.contains("30000-32767"), "{notes:?}");
    assert!(
        notes[1].message.contains("nodePort is not set"),
        "{notes:?}"
    );
    assert!(notes.iter().all(|n| n.object == "Service shop/web"));

    // Without NodePort addresses (or with another range), nothing listens on the node.
    let (state, _) = desired_state(&services, &slices, &NodeConfig::default());
    assert_eq!(state.frontends.len(), 6);
    let narrow = NodeConfig {
        node_port_range: 30_053..=30_053,
        ..node
    };
    let (state, notes) = desired_state(&services, &slices, &narrow);
    assert_eq!(state.frontends.len(), 8);
    assert_eq!(notes.len(), 3, "{notes:?}");
}

#[test]
fn local_traffic_policies_keep_each_kind_of_traffic_on_this_node_s_endpoints() {
    let node = NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        node_name: Some("node-a".to_owned()),
        ..NodeConfig::default()
    };
    let service_with = |policies: &str| {
        service(&format!(
            "metadata: {{name: web}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  \
             externalIPs: [198.51.100.7]\n{policies}  ports:\n  - {{port: 80, targetPort: \
             8080, nodePort: 30080}}\n"
        ))
    };
    let slices = [slice(
        "metadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
         - {addresses: [10.1.1.2], nodeName: node-a}\n\
         - {addresses: [10.1.2.2], nodeName: node-b}\n\
         - {addresses: [10.1.3.2], nodeName: node-a, conditions: {ready: false}}\n",
    )];
    let backends_at = |state: &DesiredState, addr: [u8; 4]| {
        state
            .frontends
            .values()
            .find(|f| f.addr == Ipv4Addr::from(addr))
            .map(|f| (f.backends.clone(), f.draining.clone()))
            .expect("the frontend")
    };
    // node-b's endpoint is remote from node-a.
    let mut everywhere = backends(&["10.1.1.2", "10.1.2.2"], 8080);
    everywhere[1].remote = true;
    let here = backends(&["10.1.1.2"], 8080);
    let draining = backends(&["10.1.3.2"], 8080);
    let snat_remote = |state: &DesiredState, addr: [u8; 4]| {
        state
            .frontends
            .values()
            .find(|f| f.addr == Ipv4Addr::from(addr))
            .map(|f| (f.snat_remote, f.flags() & SERVICE_SNAT_REMOTE != 0))
            .expect("the frontend")
    };

    // Cluster (the default) for both: every endpoint everywhere; external traffic to the remote
    // endpoint gets source NAT, ClusterIP traffic (from pods, routable) does not.
    let (state, notes) = desired_state(&[service_with("")], &slices, &node);
    assert!(notes.is_empty(), "{notes:?}");
    for addr in [[10, 96, 0, 20], [198, 51, 100, 7], [10, 0, 0, 1]] {
        assert_eq!(
            backends_at(&state, addr),
            (everywhere.clone(), draining.clone())
        );
    }
    assert_eq!(snat_remote(&state, [10, 96, 0, 20]), (false, false));
    assert_eq!(snat_remote(&state, [198, 51, 100, 7]), (true, true));
    assert_eq!(snat_remote(&state, [10, 0, 0, 1]), (true, true));

    // externalTrafficPolicy: Local: external addresses and nodePorts use this node's endpoints;
    // the ClusterIP keeps them all.
    let (state, _) = desired_state(
        &[service_with("  externalTrafficPolicy: Local\n")],
        &slices,
        &node,
    );
    assert_eq!(backends_at(&state, [10, 96, 0, 20]).0, everywhere);
    for addr in [[198, 51, 100, 7], [10, 0, 0, 1]] {
        assert_eq!(backends_at(&state, addr), (here.clone(), draining.clone()));
        // The client's address is kept.
        assert_eq!(snat_remote(&state, addr), (false, false));
    }

    // internalTrafficPolicy: Local: the reverse.
    let (state, _) = desired_state(
        &[service_with("  internalTrafficPolicy: Local\n")],
        &slices,
        &node,
    );
    assert_eq!(backends_at(&state, [10, 96, 0, 20]).0, here);
    assert_eq!(backends_at(&state, [10, 0, 0, 1]).0, everywhere);

    // On a node with no endpoint of its own, Local means no backend at all (the dataplane drops
    // and counts), never a fallback to other nodes.
    let elsewhere = NodeConfig {
        node_name: Some("node-c".to_owned()),
        ..node
    };
    let (state, _) = desired_state(
        &[service_with("  externalTrafficPolicy: Local\n")],
        &slices,
        &elsewhere,
    );
    assert_eq!(backends_at(&state, [10, 0, 0, 1]), (Vec::new(), Vec::new()));
    let mut all_remote = everywhere.clone();
    all_remote[0].remote = true;
    assert_eq!(backends_at(&state, [10, 96, 0, 20]).0, all_remote);
    // Dropped rather than rejected, as kube-proxy does: the Service does have endpoints.
    let drops = |state: &DesiredState, addr: [u8; 4]| {
        let frontend = state
            .frontends
            .values()
            .find(|f| f.addr == Ipv4Addr::from(addr))
            .expect("the frontend");
        frontend.flags() == SERVICE_DROP_WHEN_EMPTY
    };
    assert!(drops(&state, [10, 0, 0, 1]));
    assert!(drops(&state, [198, 51, 100, 7]));
    assert!(!drops(&state, [10, 96, 0, 20]));

    // A Service with no usable endpoint anywhere rejects, whatever its policy.
    let (state, _) = desired_state(
        &[service_with(
            "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n",
        )],
        &[],
        &elsewhere,
    );
    assert_eq!(state.frontends.len(), 3);
    for addr in [[10, 0, 0, 1], [198, 51, 100, 7], [10, 96, 0, 20]] {
        assert!(!drops(&state, addr));
    }
}

#[test]
fn cluster_ips_are_collected_for_undefined_port_rejects() {
    let node = NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        ..NodeConfig::default()
    };
    let services = [
        service(
            "metadata: {name: web}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  \
             externalIPs: [198.51.100.7]\n  ports:\n  - {port: 80, nodePort: 30080}\n\
             status: {loadBalancer: {ingress: [{ip: 203.0.113.9}]}}\n",
        ),
        service(
            "metadata: {name: dns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 53, protocol: UDP}]\n",
        ),
        service("metadata: {name: headless}\nspec:\n  clusterIP: None\n  ports: [{port: 80}]\n"),
        service("metadata: {name: odd}\nspec:\n  clusterIP: 10.0.0.1\n  ports: [{port: 80}]\n"),
    ];
    let (state, notes) = desired_state(&services, &[], &node);
    // Only ClusterIPs: not external, load balancer or node addresses, and never one of the
    // node's own addresses (rejecting its undefined ports would cut the node off).
    assert_eq!(
        state.cluster_ips.iter().copied().collect::<Vec<_>>(),
        vec![Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 20)]
    );
    assert!(
        notes.iter().any(|n| n.object == "Service default/odd"
            && n.message.contains("is an address of this node")),
        "{notes:?}"
    );
}

#[test]
fn client_ip_session_affinity_carries_its_timeout_to_every_frontend() {
    let node = NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        ..NodeConfig::default()
    };
    let with = |affinity: &str| {
        service(&format!(
            "metadata: {{name: web}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n\
             {affinity}  ports:\n  - {{port: 80, nodePort: 30080}}\n"
        ))
    };
    let timeouts = |service: Service| -> Vec<u32> {
        let (state, notes) = desired_state(&[service], &[], &node);
        assert!(notes.is_empty(), "{notes:?}");
        state
            .frontends
            .values()
            .map(|f| f.affinity_timeout_s)
            .collect()
    };
    assert_eq!(timeouts(with("")), vec![0, 0]);
    assert_eq!(timeouts(with("  sessionAffinity: None\n")), vec![0, 0]);
    // The API's default: three hours.
    assert_eq!(
        timeouts(with("  sessionAffinity: ClientIP\n")),
        vec![10_800, 10_800]
    );
    assert_eq!(
        timeouts(with(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n"
        )),
        vec![60, 60]
    );
}

#[test]
fn load_balancer_source_ranges_guard_only_the_load_balancer_ips() {
    let node = NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        ..NodeConfig::default()
    };
    let with = |extra: &str, annotations: &str| {
        service(&format!(
            "metadata: {{name: web{annotations}}}\nspec:\n  type: LoadBalancer\n  \
             clusterIP: 10.96.0.20\n  externalIPs: [198.51.100.7]\n{extra}  ports:\n  \
             - {{port: 80, nodePort: 30080}}\nstatus: {{loadBalancer: {{ingress: [{{ip: \
             203.0.113.9}}]}}}}\n"
        ))
    };
    let ranges_at = |service: Service| {
        let (state, notes) = desired_state(&[service], &[], &node);
        let by_addr: Vec<(Ipv4Addr, Option<Vec<String>>)> = frontends(&state)
            .into_iter()
            .map(|f| {
                let ranges = f
                    .source_ranges
                    .map(|ranges| ranges.iter().map(ToString::to_string).collect());
                (f.addr, ranges)
            })
            .collect();
        (by_addr, notes)
    };
    let (by_addr, notes) = ranges_at(with(
        "  loadBalancerSourceRanges: [192.0.2.77/24, 10.0.0.0/8, 10.0.0.0/8]\n",
        "",
    ));
    assert!(notes.is_empty(), "{notes:?}");
    let guarded = Some(vec!["10.0.0.0/8".to_owned(), "192.0.2.0/24".to_owned()]);
    assert_eq!(
        by_addr,
        vec![
            (Ipv4Addr::new(10, 0, 0, 1), None),
            (Ipv4Addr::new(10, 96, 0, 20), None),
            (Ipv4Addr::new(198, 51, 100, 7), None),
            (Ipv4Addr::new(203, 0, 113, 9), guarded.clone()),
        ]
    );

    // Spaces around an entry are trimmed, as kube-proxy does; the legacy annotation is for cloud
    // load balancers and is not read, as kube-proxy does not read it.
    let (by_addr, _) = ranges_at(with(
        "  loadBalancerSourceRanges: [' 192.0.2.0/24 ', 10.1.2.3/8]\n",
        ", annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: 198.51.100.0/24}",
    ));
    assert_eq!(by_addr[3], (Ipv4Addr::new(203, 0, 113, 9), guarded));
    let (by_addr, _) = ranges_at(with(
        "",
        ", annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: 198.51.100.0/24}",
    ));
    assert_eq!(by_addr[3], (Ipv4Addr::new(203, 0, 113, 9), None));

    // Only IPv6 ranges: no IPv4 client is admitted (closed, not open), and it is said.
    let (by_addr, notes) = ranges_at(with("  loadBalancerSourceRanges: ['2001:db8::/32']\n", ""));
    assert_eq!(
        by_addr[3],
        (Ipv4Addr::new(203, 0, 113, 9), Some(Vec::new()))
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
}

#[test]
fn a_service_whose_every_traffic_is_local_rejects_without_a_local_endpoint() {
    let node = NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        node_name: Some("node-c".to_owned()),
        ..NodeConfig::default()
    };
    let slices = [slice(
        "metadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
         - {addresses: [10.1.1.2], nodeName: node-a}\n",
    )];
    let flags = |spec: &str| -> Vec<u32> {
        let service = service(&format!(
            "metadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.20\n{spec}  ports:\n  - \
             {{port: 80, targetPort: 8080, nodePort: 30080}}\n"
        ));
        let (state, _) = desired_state(&[service], &slices, &node);
        frontends(&state).iter().map(Frontend::flags).collect()
    };
    // A ClusterIP Service with internalTrafficPolicy: Local uses no endpoint elsewhere: with
    // none here it has none at all and rejects, as kube-proxy does.
    assert_eq!(flags("  internalTrafficPolicy: Local\n"), vec![0]);
    // Both policies Local on a NodePort Service: the same.
    assert_eq!(
        flags("  type: NodePort\n  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local\n"),
        vec![0, 0]
    );
    // Only the external policy Local: the ClusterIP uses the endpoints elsewhere, so the
    // nodePort drops; the ClusterIP has its endpoint.
    assert_eq!(
        flags("  type: NodePort\n  externalTrafficPolicy: Local\n"),
        vec![SERVICE_DROP_WHEN_EMPTY, 0]
    );
}

#[test]
fn topology_hints_narrow_cluster_wide_traffic_to_this_zone_or_node() {
    let node = |zone: Option<&str>| NodeConfig {
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 0, 1)],
        node_name: Some("node-a".to_owned()),
        zone: zone.map(str::to_owned),
        ..NodeConfig::default()
    };
    let web = |policies: &str| {
        service(&format!(
            "metadata: {{name: web}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.30\n\
             {policies}  ports:\n  - {{port: 80, targetPort: 8080, nodePort: 30081}}\n"
        ))
    };
    // Three endpoints in two zones, as the EndpointSlice controller hints them for
    // `trafficDistribution: PreferClose`; `extra` is appended to the endpoint list.
    let slices = |extra: &str| {
        [slice(&format!(
            "metadata:\n  name: web-1\n  labels: {{kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n\
             - {{addresses: [10.1.1.2], nodeName: node-a, hints: {{forZones: [{{name: \
             zone-1}}]}}}}\n\
             - {{addresses: [10.1.2.2], nodeName: node-b, hints: {{forZones: [{{name: \
             zone-1}}]}}}}\n\
             - {{addresses: [10.1.3.2], nodeName: node-c, hints: {{forZones: [{{name: \
             zone-2}}]}}}}\n{extra}"
        ))]
    };
    let at = |state: &DesiredState, addr: [u8; 4]| {
        let frontend = state
            .frontends
            .values()
            .find(|f| f.addr == Ipv4Addr::from(addr))
            .expect("the frontend");
        let addrs = |list: &[BackendAddr]| -> Vec<String> {
            list.iter().map(|b| b.addr.to_string()).collect()
        };
        (addrs(&frontend.backends), addrs(&frontend.draining))
    };
    let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let cluster_ip = [10, 96, 0, 30];
    let node_port = [10, 0, 0, 1];

    // In zone-1: its two endpoints take new flows; zone-2's keeps the flows it has.
    let (state, notes) = desired_state(&[web("")], &slices(""), &node(Some("zone-1")));
    assert!(notes.is_empty(), "{notes:?}");
    for addr in [cluster_ip, node_port] {
        assert_eq!(
            at(&state, addr),
            (strings(&["10.1.1.2", "10.1.2.2"]), strings(&["10.1.3.2"]))
        );
    }
    // In zone-2: its own.
    let (state, _) = desired_state(&[web("")], &slices(""), &node(Some("zone-2")));
    assert_eq!(at(&state, cluster_ip).0, strings(&["10.1.3.2"]));
    // A zone no hint names, or a node without the zone label: hints are ignored.
    let everywhere = strings(&["10.1.1.2", "10.1.2.2", "10.1.3.2"]);
    for zone in [Some("zone-9"), None] {
        let (state, _) = desired_state(&[web("")], &slices(""), &node(zone));
        assert_eq!(at(&state, cluster_ip), (everywhere.clone(), Vec::new()));
    }
    // One ready endpoint without hints (the controller is catching up): all of them.
    let unhinted = "- {addresses: [10.1.4.2], nodeName: node-d}\n";
    let (state, _) = desired_state(&[web("")], &slices(unhinted), &node(Some("zone-1")));
    assert_eq!(at(&state, cluster_ip).0.len(), 4);
    // ... unless it is not ready: hints are judged over the ready endpoints.
    let not_ready = "- {addresses: [10.1.4.2], nodeName: node-d, conditions: {ready: false}}\n";
    let (state, _) = desired_state(&[web("")], &slices(not_ready), &node(Some("zone-1")));
    assert_eq!(at(&state, cluster_ip).0, strings(&["10.1.1.2", "10.1.2.2"]));

    // A `Local` policy is not narrowed further: this node's endpoint, hints aside.
    let (state, _) = desired_state(
        &[web("  externalTrafficPolicy: Local\n")],
        &slices(""),
        &node(Some("zone-2")),
    );
    assert_eq!(at(&state, node_port).0, strings(&["10.1.1.2"]));
    assert_eq!(at(&state, cluster_ip).0, strings(&["10.1.3.2"]));

    // Node hints (`trafficDistribution: PreferSameNode`) come first when every ready endpoint
    // has them and one names this node.
    let node_hinted = slice(
        "metadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
         - {addresses: [10.1.1.2], nodeName: node-a, hints: {forNodes: [{name: node-a}], \
         forZones: [{name: zone-1}]}}\n\
         - {addresses: [10.1.2.2], nodeName: node-b, hints: {forNodes: [{name: node-b}], \
         forZones: [{name: zone-1}]}}\n",
    );
    let (state, _) = desired_state(
        &[web("")],
        std::slice::from_ref(&node_hinted),
        &node(Some("zone-1")),
    );
    assert_eq!(
        at(&state, cluster_ip),
        (strings(&["10.1.1.2"]), strings(&["10.1.2.2"]))
    );
    // On a node none names: the zone hints decide.
    let other = NodeConfig {
        node_name: Some("node-z".to_owned()),
        ..node(Some("zone-1"))
    };
    let (state, _) = desired_state(&[web("")], std::slice::from_ref(&node_hinted), &other);
    assert_eq!(at(&state, cluster_ip).0, strings(&["10.1.1.2", "10.1.2.2"]));

    // With nothing ready, the serving terminating endpoints take new flows, hints aside.
    let terminating = slice(
        "metadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
         - {addresses: [10.1.1.2], nodeName: node-a, conditions: {ready: false, serving: true, \
         terminating: true}, hints: {forZones: [{name: zone-1}]}}\n\
         - {addresses: [10.1.3.2], nodeName: node-c, conditions: {ready: false, serving: true, \
         terminating: true}, hints: {forZones: [{name: zone-2}]}}\n",
    );
    let (state, _) = desired_state(&[web("")], &[terminating], &node(Some("zone-1")));
    assert_eq!(at(&state, cluster_ip).0, strings(&["10.1.1.2", "10.1.3.2"]));
}
