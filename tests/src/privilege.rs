//! Privileged tests run for real as root; otherwise they say why they skip. Under CI
//! (see [`in_ci`]) a skip would hide untested code, so it fails instead.

use std::ffi::OsStr;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a value of `CI` means "this is CI". CI services set `CI=true`; an empty value or
/// `false` is how a developer turns an inherited `CI` off without unsetting it.
fn means_ci(value: &OsStr) -> bool {
    !value.is_empty() && !value.eq_ignore_ascii_case("false")
}

/// Whether this runs under CI, where every tier must run and a skip is a failure. The single
/// definition for the test suites and `cargo xtask test`.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| means_ci(&value))
}

/// Returns true when the privileged test `name` can run. Prints a skip line otherwise, and panics
/// under CI, since CI must run every tier.
pub fn require_root(name: &str) -> bool {
    if is_root() {
        return true;
    }
    let reason = "needs root for BPF, XDP and network namespaces";
    if in_ci() {
        panic!("{name}: {reason}, and CI must run it: run the suite as root");
    }
    eprintln!("SKIP {name}: {reason} (run `sudo cargo xtask test`)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        for value in ["true", "1", "yes", "TRUE"] {
            assert!(means_ci(OsStr::new(value)), "{value}");
        }
        for value in ["", "false", "False"] {
            assert!(!means_ci(OsStr::new(value)), "{value:?}");
        }
    }
}
