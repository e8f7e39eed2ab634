//! Privileged tests run for real as root; otherwise they say why they skip. Under CI
//! (`CI=true`) a skip would hide untested code, so it fails instead.

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when the privileged test `name` can run. Prints a skip line otherwise, and panics
/// when `CI` is set, since CI must run every tier.
pub fn require_root(name: &str) -> bool {
    if is_root() {
        return true;
    }
    let reason = "needs root for BPF, XDP and network namespaces";
    if std::env::var_os("CI").is_some_and(|value| !value.is_empty() && value != "false") {
        panic!("{name}: {reason}, and CI must run it: run the suite as root");
    }
    eprintln!("SKIP {name}: {reason} (run `sudo cargo xtask test`)");
    false
}
