//! `lb`: an eBPF/XDP Service load balancer for Kubernetes, userspace side.
//!
//! - [`manifests`] reads Services and EndpointSlices from a directory of YAML, [`kubernetes`]
//!   watches them in the API server;
//! - [`node`] finds the node's NodePort addresses;
//! - [`desired`] turns them into what the maps should hold (one pure function);
//! - [`reconcile`] writes the difference into the maps, make-before-break;
//! - [`dataplane`] loads and attaches the XDP program and opens the pinned maps;
//! - [`inspect`] reads the pinned maps back for the CLI;
//! - [`agent`] ties them together in `lb agent`, with [`health`] endpoints and [`metrics`].

pub mod agent;
pub mod dataplane;
pub mod desired;
pub mod health;
pub mod inspect;
pub mod kubernetes;
pub mod manifests;
pub mod metrics;
pub mod node;
pub mod reconcile;
