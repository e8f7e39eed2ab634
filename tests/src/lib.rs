//! The harness shared by lb's privileged test suites and `cargo xtask demo`: network namespaces
//! built and torn down by RAII guards, small identity servers, the single-node topology, the echo
//! Service served across it, a handle on an `lb agent` process, and packet capture.
//!
//! Network rule: everything lives in namespaces this harness creates, named with a per-run prefix
//! (`lbt-<pid>-...` for tests, `lbd-<pid>-...` for the demo); addresses and routes exist only
//! inside them, nothing routes to the outside, and nothing is added to the root namespace.
//! Leftovers of earlier runs whose process is gone are removed (see [`leftovers`]); nothing else
//! is touched.

pub mod agent;
pub mod capture;
pub mod echo;
pub mod leftovers;
pub mod model;
pub mod netns;
pub mod privilege;
pub mod servers;
pub mod topology;
pub mod two_nodes;
