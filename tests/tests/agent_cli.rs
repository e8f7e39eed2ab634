//! The agent's answers to a wrong start: one clear sentence saying what to do.
//!
//! Every agent here runs inside a namespace of its own, with a pin directory of its own: a
//! regression that attached or pinned anyway must not reach the host's interfaces or lb's default
//! pin directory.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use lb_tests::{
    agent::{Agent, AgentOptions, lb, lb_binary, pin_dir},
    leftovers::{self, remove_test_leftovers_once},
    netns::{Netns, unique_prefix},
    privilege::require_root,
};

/// `nobody`, to run the agent without privileges.
const UNPRIVILEGED_UID: &str = "65534";
/// The veth the agents attach to, and its peer (the kernel running the tests may have no dummy
/// driver).
const INTERFACE: &str = "d0";
const INTERFACE_PEER: &str = "d1";

/// Whether the privileged test `name` runs; removes leftovers of killed runs first.
fn privileged(name: &str) -> bool {
    if !require_root(name) {
        return false;
    }
    remove_test_leftovers_once();
    true
}

/// A test's own namespace (with an up veth [`INTERFACE`]), pin directory and work directory.
/// Dropping it, panics included, stops its agents, resets the pins and removes the rest.
struct Scratch {
    agents: Vec<Agent>,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    netns: Netns,
}

impl Scratch {
    fn new() -> Self {
        let prefix = unique_prefix(leftovers::TESTS);
        let netns = Netns::create(&format!("{prefix}-node")).expect("netns");
        let scratch = Self {
            agents: Vec::new(),
            lb: lb_binary().expect("lb"),
            pin_dir: pin_dir(&prefix),
            workdir: std::env::temp_dir().join(&prefix),
            netns,
        };
        std::fs::create_dir_all(scratch.manifests()).expect("workdir");
        scratch
            .netns
            .ip(&[
                "link",
                "add",
                INTERFACE,
                "type",
                "veth",
                "peer",
                "name",
                INTERFACE_PEER,
            ])
            .expect("veth");
        scratch
            .netns
            .ip(&["link", "set", INTERFACE, "up"])
            .expect("up");
        scratch
    }

    fn manifests(&self) -> PathBuf {
        self.workdir.join("manifests")
    }

    /// `lb --pin-dir <ours> agent --interfaces <interface> --manifests <manifests>`, to run in
    /// the namespace.
    fn agent_command(&self, interface: &str, manifests: &Path) -> Command {
        let mut command = self.netns.command(&self.lb).expect("command");
        command
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["agent", "--interfaces", interface, "--manifests"])
            .arg(manifests)
            .arg("--state-dir")
            .arg(self.workdir.join("state"))
            // The socket hooks would apply to the whole host's cgroup.
            .arg(lb_tests::agent::NO_SOCKET_HOOKS);
        command
    }

    /// Starts an agent on [`INTERFACE`] with the scratch manifests; `name` keeps its log and
    /// state apart from other agents'.
    fn start_agent(&mut self, name: &str) -> anyhow::Result<&mut Agent> {
        self.start_agent_with(name, &[])
    }

    /// [`Scratch::start_agent`] with more `lb agent` flags.
    fn start_agent_with(&mut self, name: &str, extra_args: &[&str]) -> anyhow::Result<&mut Agent> {
        let agent = Agent::start(
            &self.netns,
            &AgentOptions {
                lb: &self.lb,
                pin_dir: &self.pin_dir,
                manifests: &self.manifests(),
                interfaces: &[INTERFACE.to_owned()],
                state_dir: &self.workdir.join(format!("{name}-state")),
                log: &self.workdir.join(format!("{name}.log")),
                extra_args,
            },
        )?;
        self.agents.push(agent);
        Ok(self.agents.last_mut().expect("just pushed"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.stop();
        }
        let _ = lb(&self.lb, &self.pin_dir, &["reset"]);
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

fn stderr_of(command: &mut Command) -> String {
    let output = command.stdin(Stdio::null()).output().expect("run lb agent");
    assert!(!output.status.success(), "lb agent must fail here");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A refused start must leave nothing behind: no pins, so no program on any interface.
fn assert_nothing_pinned(scratch: &Scratch) {
    assert!(
        !scratch.pin_dir.exists(),
        "a refused start pinned {}",
        scratch.pin_dir.display()
    );
}

#[test]
fn unknown_interface_is_named_with_advice() {
    if !privileged("unknown_interface_is_named_with_advice") {
        return;
    }
    let scratch = Scratch::new();
    let stderr = stderr_of(&mut scratch.agent_command("nosuch0", &scratch.manifests()));
    assert!(
        stderr.contains("\"nosuch0\" does not exist in this network namespace")
            && stderr.contains("--interfaces"),
        "{stderr}"
    );
    assert_nothing_pinned(&scratch);
}

#[test]
fn missing_privileges_are_explained() {
    if !privileged("missing_privileges_are_explained") {
        return;
    }
    let scratch = Scratch::new();
    let mut command = scratch.netns.command("setpriv").expect("command");
    command
        .args([
            "--reuid",
            UNPRIVILEGED_UID,
            "--regid",
            UNPRIVILEGED_UID,
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&scratch.lb)
        .arg("--pin-dir")
        .arg(&scratch.pin_dir)
        .args(["agent", "--interfaces", INTERFACE, "--manifests"])
        .arg(scratch.manifests());
    let stderr = stderr_of(&mut command);
    assert!(
        stderr.contains("needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"),
        "{stderr}"
    );
    assert_nothing_pinned(&scratch);
}

#[test]
fn a_manifest_path_that_is_not_a_directory_is_explained() {
    if !privileged("a_manifest_path_that_is_not_a_directory_is_explained") {
        return;
    }
    let scratch = Scratch::new();
    // The usual mistake: the manifest file itself instead of its directory.
    let file = scratch.manifests().join("echo.yaml");
    std::fs::write(&file, "").expect("manifest file");
    let stderr = stderr_of(&mut scratch.agent_command(INTERFACE, &file));
    assert!(stderr.contains("not a directory"), "{stderr}");
    assert_nothing_pinned(&scratch);
}

#[test]
fn settings_that_break_the_stack_path_are_warned_about() {
    if !privileged("settings_that_break_the_stack_path_are_warned_about") {
        return;
    }
    let mut scratch = Scratch::new();
    scratch
        .netns
        .sysctl("ipv4.ip_forward", "0")
        .expect("sysctl");
    scratch
        .netns
        .sysctl("ipv4.conf.all.rp_filter", "1")
        .expect("sysctl");
    let log = scratch.start_agent("agent").expect("agent").log_text();
    assert!(log.contains("net.ipv4.ip_forward is 0"), "{log}");
    assert!(
        log.contains(&format!(
            "strict reverse-path filtering (rp_filter=1) on {INTERFACE}"
        )),
        "{log}"
    );
}

#[test]
fn a_second_agent_on_the_same_pin_directory_is_refused() {
    if !privileged("a_second_agent_on_the_same_pin_directory_is_refused") {
        return;
    }
    let mut scratch = Scratch::new();
    scratch.start_agent("first").expect("first agent");
    let error = match scratch.start_agent("second") {
        Ok(_) => panic!("a second agent started on the pin directory of a running one"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains(&format!(
            "another lb agent is using {}",
            scratch.pin_dir.display()
        )),
        "{error}"
    );
    // The refused agent changed nothing: the first one still runs, and its program is still on
    // the interface.
    assert!(scratch.agents[0].running(), "the first agent stopped");
    let link = scratch
        .netns
        .exec("ip", &["link", "show", INTERFACE])
        .expect("ip link");
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "{INTERFACE} lost its XDP program: {}",
        String::from_utf8_lossy(&link.stdout)
    );
}

#[test]
fn reset_refuses_to_empty_the_pin_directory_of_a_running_agent() {
    if !privileged("reset_refuses_to_empty_the_pin_directory_of_a_running_agent") {
        return;
    }
    let mut scratch = Scratch::new();
    scratch.start_agent("running").expect("agent");
    let error = lb(&scratch.lb, &scratch.pin_dir, &["reset"])
        .expect_err("reset must refuse while the agent runs");
    assert!(
        format!("{error:#}").contains("an lb agent is running on"),
        "{error:#}"
    );
    assert!(
        scratch.pin_dir.join("LB_SERVICES").exists(),
        "the maps were deleted from under the agent"
    );
    assert!(scratch.agents[0].running(), "the agent stopped");
}

/// The conntrack entries the map pinned in `scratch` was created with.
fn pinned_conntrack_entries(scratch: &Scratch) -> u32 {
    let path = scratch.pin_dir.join(lb_common::limits::MAP_CONNTRACK);
    aya::maps::MapData::from_pin(&path)
        .and_then(|map| map.info())
        .map(|info| info.max_entries())
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

#[test]
fn the_conntrack_size_is_chosen_at_start_and_a_new_size_needs_a_reset() {
    if !privileged("the_conntrack_size_is_chosen_at_start_and_a_new_size_needs_a_reset") {
        return;
    }
    const FLOWS: u32 = 1_000;
    const OTHER_FLOWS: u32 = 2_000;
    let mut scratch = Scratch::new();
    let flows = FLOWS.to_string();
    scratch
        .start_agent_with("sized", &["--conntrack-flows", &flows])
        .expect("agent");
    assert_eq!(
        pinned_conntrack_entries(&scratch),
        FLOWS * lb_common::limits::CONNTRACK_ENTRIES_PER_FLOW
    );
    scratch.agents[0].stop();

    // Another size would mean recreating the map and forgetting every flow: refused, with the
    // way out named, and the pinned map left as it was. A map missing from the pins (unpinned
    // here by hand, as after an upgrade that adds one) is not pinned by the refused start.
    let affinity = scratch.pin_dir.join(lb_common::limits::MAP_AFFINITY);
    std::fs::remove_file(&affinity).expect("unpinning LB_AFFINITY");
    let mut resized = scratch.agent_command(INTERFACE, &scratch.manifests());
    let other = OTHER_FLOWS.to_string();
    resized.args(["--conntrack-flows", &other]);
    let stderr = stderr_of(&mut resized);
    assert!(
        stderr.contains("holds 2000 entries but 4000 were asked for")
            && stderr.contains("lb reset"),
        "{stderr}"
    );
    assert_eq!(
        pinned_conntrack_entries(&scratch),
        FLOWS * lb_common::limits::CONNTRACK_ENTRIES_PER_FLOW
    );
    assert!(
        !affinity.exists(),
        "the refused start pinned LB_AFFINITY at the sizes it refused"
    );
}
