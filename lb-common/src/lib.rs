//! Types and pure algorithms shared by the kernel program (`lb-ebpf`) and userspace
//! (`lb-userspace`).
//!
//! Invariants every type here keeps:
//! - `#[repr(C)]` and `bytemuck::Pod`: no implicit padding (the derive refuses it), explicit
//!   `_pad` fields, a `size_of` assertion per type, so the kernel and userspace agree on bytes.
//! - Addresses and ports are stored in **network byte order**, exactly as they sit in packets, so
//!   the datapath copies and compares them without swapping. [`net`] converts at the edges.
//! - No `bool`, `Option`, `usize` or data-carrying enums inside map types.
#![no_std]

pub mod checksum;
pub mod config;
pub mod conntrack;
pub mod explain;
pub mod iface;
pub mod limits;
pub mod net;
pub mod service;
pub mod stats;
