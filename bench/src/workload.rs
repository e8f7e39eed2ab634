//! The synthetic cluster every contender is given: `count` Services, each with one TCP port and
//! its endpoints, in creation order. The last Services created are the ones that carry traffic
//! (the worst case for rule sets that are walked in order), with the topology's real backends as
//! endpoints; the others point at pod addresses that do not exist, as a real cluster's other
//! Services would from this client's point of view.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use lb::desired::SERVICE_NAME_LABEL;
use lb_tests::topology::{BACKENDS, backend_addr};

/// ClusterIPs are handed out from 10.96.0.0/12 upwards, as the API server's allocator would.
const SERVICE_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// Pod addresses of the Services that carry no traffic: 10.128.0.0/9, away from the topology.
const IDLE_POD_BASE: u32 = u32::from_be_bytes([10, 128, 0, 1]);
/// Namespace of every synthetic Service.
pub const NAMESPACE: &str = "bench";
/// The Service port of every Service.
pub const SERVICE_PORT: u16 = 80;
/// The endpoints' port: where the backends' servers listen.
pub const TARGET_PORT: u16 = 8080;
/// The iperf3 Service's port and target port (iperf3's default).
pub const IPERF_PORT: u16 = 5201;
/// Protocol of a Service port, as kube-proxy and our maps name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    /// `tcp` / `udp`, as iptables and nftables spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// `TCP` / `UDP`, as Kubernetes spells it.
    pub fn upper(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// One Service port with its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticService {
    /// Creation order, from 0.
    pub index: usize,
    pub namespace: String,
    pub name: String,
    /// The Service port's name.
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Endpoint addresses, all listening on `target_port`.
    pub endpoints: Vec<Ipv4Addr>,
    pub target_port: u16,
}

impl SyntheticService {
    /// `namespace/name:port_name`, the name kube-proxy hashes into chain names.
    pub fn port_id(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// Which Services carry traffic, as they are the last ones created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// The last Service (TCP, [`SERVICE_PORT`] -> [`TARGET_PORT`]) goes to the topology's
    /// backends.
    Http,
    /// As `Http`; the Service before it is iperf3's ([`IPERF_PORT`]) with the first backend
    /// only (iperf3 opens a control and a data connection that must meet the same server), and
    /// the one before that is UDP ([`SERVICE_PORT`] -> [`TARGET_PORT`]) to the topology's
    /// backends, for the packet generator.
    All,
}

/// Names of the Services that carry traffic.
pub const HTTP_SERVICE: &str = "traffic";
pub const IPERF_SERVICE: &str = "iperf";
pub const UDP_SERVICE: &str = "datagrams";

/// The Service named `name` in `services`.
pub fn named<'a>(
    services: &'a [SyntheticService],
    name: &str,
) -> anyhow::Result<&'a SyntheticService> {
    services
        .iter()
        .rev()
        .find(|service| service.name == name)
        .ok_or_else(|| anyhow::anyhow!("no Service named {name}"))
}

/// The ClusterIP of the Service created `index`-th.
pub fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(SERVICE_BASE + u32::try_from(index).expect("fewer than 2^32 Services"))
}

/// `count` Services of `endpoints` endpoints each, the last ones carrying `traffic`.
pub fn services(count: usize, endpoints: usize, traffic: Traffic) -> Vec<SyntheticService> {
    assert!(count >= 1, "no Service to carry {traffic:?}");
    let idle = count - 1;
    let mut services: Vec<_> = (0..idle)
        .map(|index| {
            let first = IDLE_POD_BASE + u32::try_from(index * endpoints).expect("few pods");
            SyntheticService {
                index,
                namespace: NAMESPACE.to_owned(),
                name: format!("svc-{index}"),
                port_name: "http".to_owned(),
                cluster_ip: cluster_ip(index),
                port: SERVICE_PORT,
                protocol: Protocol::Tcp,
                endpoints: (0..endpoints)
                    .map(|offset| Ipv4Addr::from(first + offset as u32))
                    .collect(),
                target_port: TARGET_PORT,
            }
        })
        .collect();
    let real: Vec<Ipv4Addr> = (0..BACKENDS).map(backend_addr).collect();
    let mut extra = |(name, port_name): (&str, &str),
                     protocol: Protocol,
                     port: u16,
                     endpoints: Vec<Ipv4Addr>| {
        let index = services.len();
        services.push(SyntheticService {
            index,
            namespace: NAMESPACE.to_owned(),
            name: name.to_owned(),
            port_name: port_name.to_owned(),
            cluster_ip: cluster_ip(index),
            port,
            protocol,
            endpoints,
            target_port: if port == IPERF_PORT {
                IPERF_PORT
            } else {
                TARGET_PORT
            },
        });
    };
    if traffic == Traffic::All {
        extra(
            (UDP_SERVICE, "datagrams"),
            Protocol::Udp,
            SERVICE_PORT,
            real.clone(),
        );
        extra(
            (IPERF_SERVICE, "iperf"),
            Protocol::Tcp,
            IPERF_PORT,
            vec![real[0]],
        );
    }
    extra((HTTP_SERVICE, "http"), Protocol::Tcp, SERVICE_PORT, real);
    services
}

impl SyntheticService {
    /// The Service object `kubectl apply` would take (ClusterIP written out: standalone mode has
    /// no allocator).
    pub fn service(&self) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".to_owned()),
                cluster_ip: Some(self.cluster_ip.to_string()),
                cluster_ips: Some(vec![self.cluster_ip.to_string()]),
                ports: Some(vec![ServicePort {
                    name: Some(self.port_name.clone()),
                    protocol: Some(self.protocol.upper().to_owned()),
                    port: i32::from(self.port),
                    target_port: Some(IntOrString::Int(i32::from(self.target_port))),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// The EndpointSlice the EndpointSlice controller would build: every endpoint ready.
    pub fn slice(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{}-slice", self.name)),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_owned(),
                    self.name.clone(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".to_owned(),
            ports: Some(vec![EndpointPort {
                name: Some(self.port_name.clone()),
                protocol: Some(self.protocol.upper().to_owned()),
                port: Some(i32::from(self.target_port)),
                ..EndpointPort::default()
            }]),
            endpoints: Some(
                self.endpoints
                    .iter()
                    .map(|addr| Endpoint {
                        addresses: vec![addr.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
        }
    }
}

/// The manifests of `services` as one multi-document YAML file, as an operator would keep them.
pub fn manifests_yaml(services: &[SyntheticService]) -> anyhow::Result<String> {
    let mut yaml = String::new();
    for service in services {
        for document in [
            // k8s-openapi writes apiVersion and kind itself.
            serde_yaml_ng::to_string(&service.service())?,
            serde_yaml_ng::to_string(&service.slice())?,
        ] {
            yaml.push_str("---\n");
            yaml.push_str(&document);
        }
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traffic_services_are_created_last_and_addresses_are_unique() {
        let services = services(1_000, 3, Traffic::All);
        assert_eq!(services.len(), 1_002);
        assert_eq!(services[1_001].name, HTTP_SERVICE);
        assert_eq!(services[1_000].name, IPERF_SERVICE);
        assert_eq!(services[1_000].endpoints, vec![backend_addr(0)]);
        assert_eq!(services[1_000].target_port, IPERF_PORT);
        assert_eq!(services[999].name, UDP_SERVICE);
        assert_eq!(services[999].protocol, Protocol::Udp);
        assert_eq!(services[999].target_port, TARGET_PORT);
        assert_eq!(named(&services, UDP_SERVICE).expect("found").index, 999);
        let ips: std::collections::BTreeSet<_> = services.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), 1_002);
        let pods: std::collections::BTreeSet<_> =
            services.iter().flat_map(|s| s.endpoints.clone()).collect();
        // 999 idle Services x 3 endpoints, plus the 3 real backends.
        assert_eq!(pods.len(), 999 * 3 + 3);
        assert_eq!(super::services(1, 3, Traffic::Http).len(), 1);
        assert!(services.iter().enumerate().all(|(i, s)| s.index == i));
    }

    #[test]
    fn the_manifests_are_read_by_the_agent_s_own_reader_into_the_same_frontends() {
        let services = services(5, 3, Traffic::All);
        let dir = std::env::temp_dir().join(format!("lb-bench-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(
            dir.join("bench.yaml"),
            manifests_yaml(&services).expect("yaml"),
        )
        .expect("write");
        let load = lb::manifests::load_dir(&dir, &lb::manifests::Snapshot::default());
        std::fs::remove_dir_all(&dir).expect("cleanup");
        let load = load.expect("load");
        assert!(load.errors.is_empty(), "{:?}", load.errors);
        let (desired, notes) = lb::desired::desired_state(
            load.snapshot.services.values().map(|s| &s.object),
            load.snapshot.slices.values().map(|s| &s.object),
            &lb::node::NodeConfig::default(),
        );
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(desired.frontends.len(), 7);
        for service in &services {
            let frontend = desired
                .frontends
                .values()
                .find(|f| f.addr == service.cluster_ip)
                .expect("frontend");
            assert_eq!(frontend.port, service.port);
            assert_eq!(frontend.backends.len(), service.endpoints.len());
            assert!(
                frontend
                    .backends
                    .iter()
                    .all(|b| b.port == service.target_port)
            );
        }
    }
}
