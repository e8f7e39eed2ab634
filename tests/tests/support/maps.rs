//! Edits of the pinned maps behind the agent's back, as a stray `bpftool map delete` would make
//! them, for the tests that check the drift is seen.

use std::path::Path;

use lb::dataplane::maps::ServiceMaps;
use lb_common::{
    net::{IPPROTO_TCP, addr_to_wire, port_to_wire},
    service::ServiceKey,
};
use lb_tests::echo::{CLUSTER_IP, TCP_PORT};

/// Removes the echo Service's TCP ClusterIP frontend from `LB_SERVICES` under `pin_dir`.
pub fn delete_echo_tcp_frontend(pin_dir: &Path) {
    let mut maps = ServiceMaps::open(pin_dir).expect("the pinned Service maps");
    let key = ServiceKey {
        addr: addr_to_wire(CLUSTER_IP),
        port: port_to_wire(TCP_PORT),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    maps.services.remove(&key).expect("the echo TCP frontend");
}
