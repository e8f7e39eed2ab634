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

#[test]
fn settings_that_break_the_stack_path_are_warned_about() {
    if !require_root("settings_that_break_the_stack_path_are_warned_about") {
        return;
    }
    let prefix = unique_prefix("lbt");
    let netns = Netns::create(&format!("{prefix}-node")).expect("netns");
    netns
        .ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .expect("veth (this kernel has no dummy driver)");
    netns.ip(&["link", "set", "d0", "up"]).expect("up");
    netns.sysctl("ipv4.ip_forward", "0").expect("sysctl");
    netns
        .sysctl("ipv4.conf.all.rp_filter", "1")
        .expect("sysctl");
    let workdir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(workdir.join("manifests")).expect("workdir");
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(&prefix);
    let lb = lb_binary().expect("lb");
    let mut agent = lb_tests::agent::Agent::start(
        &netns,
        &lb_tests::agent::AgentOptions {
            lb: &lb,
            pin_dir: &pin_dir,
            manifests: &workdir.join("manifests"),
            interfaces: &["d0".to_owned()],
            state_dir: &workdir.join("state"),
            log: &workdir.join("agent.log"),
            extra_args: &[],
        },
    )
    .expect("agent");
    let log = agent.log_text();
    agent.stop();
    let _ = lb_tests::agent::lb(&lb, &pin_dir, &["reset"]);
    let _ = std::fs::remove_dir_all(&workdir);
    assert!(log.contains("net.ipv4.ip_forward is 0"), "{log}");
    assert!(
        log.contains("strict reverse-path filtering (rp_filter=1) on d0"),
        "{log}"
    );
}
