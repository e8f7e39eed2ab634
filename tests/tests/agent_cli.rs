//! The agent's answers to a wrong start: one clear sentence saying what to do.

use std::process::{Command, Stdio};

use lb_tests::{
    agent::lb_binary,
    netns::{Netns, unique_prefix},
    privilege::require_root,
};

/// `nobody`, to run the agent without privileges.
const UNPRIVILEGED_UID: &str = "65534";

fn stderr_of(command: &mut Command) -> String {
    let output = command.stdin(Stdio::null()).output().expect("run lb agent");
    assert!(!output.status.success(), "lb agent must fail here");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn unknown_interface_is_named_with_advice() {
    if !require_root("unknown_interface_is_named_with_advice") {
        return;
    }
    let netns = Netns::create(&format!("{}-node", unique_prefix("lbt"))).expect("netns");
    let manifests = std::env::temp_dir();
    let stderr = stderr_of(
        netns
            .command(lb_binary().expect("lb"))
            .expect("command")
            .args(["agent", "--interfaces", "nosuch0", "--manifests"])
            .arg(&manifests),
    );
    assert!(
        stderr.contains("\"nosuch0\" does not exist in this network namespace")
            && stderr.contains("--interfaces"),
        "{stderr}"
    );
}

#[test]
fn missing_privileges_are_explained() {
    if !require_root("missing_privileges_are_explained") {
        return;
    }
    let stderr = stderr_of(
        Command::new("setpriv")
            .args([
                "--reuid",
                UNPRIVILEGED_UID,
                "--regid",
                UNPRIVILEGED_UID,
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(lb_binary().expect("lb"))
            .args(["agent", "--interfaces", "lo", "--manifests", "/"]),
    );
    assert!(
        stderr.contains("needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"),
        "{stderr}"
    );
}

#[test]
fn a_manifest_path_that_is_not_a_directory_is_explained() {
    if !require_root("a_manifest_path_that_is_not_a_directory_is_explained") {
        return;
    }
    let stderr = stderr_of(Command::new(lb_binary().expect("lb")).args([
        "agent",
        "--interfaces",
        "lo",
        "--manifests",
        "/nonexistent/manifests",
    ]));
    assert!(stderr.contains("not a directory"), "{stderr}");
}
