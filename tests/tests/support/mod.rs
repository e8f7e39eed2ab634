//! Fixtures shared by integration tests that need more than the harness library (kept out of
//! the library so that xtask, which builds it first, does not compile an HTTP server).

pub mod apiserver;
pub mod maps;
