//! The Kubernetes manifests of `deploy/`, checked offline (the project's machines have no API
//! server and no container engine): every document is a Kubernetes object with only fields that
//! exist (a typed round trip, and Kubernetes' own JSON schemas in strict mode), the objects fit
//! together (namespace, service account, role, binding), the probes ask the agent's health
//! address, the host paths the agent's flags name are mounted from the host, and the real `lb`
//! accepts the DaemonSet's command line.
//!
//! Needs no root. The schema check runs kubernetes-validate (PyPI), which `cargo xtask setup`
//! installs and `cargo xtask test` passes as `LB_KUBERNETES_VALIDATE`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, PodSpec, Probe, ServiceAccount, Volume, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_tests::{agent::lb_binary, privilege::in_ci};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The Kubernetes releases whose schemas the manifests must pass: the oldest and the newest that
/// k8s-openapi (and so lb's API types) supports.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];
/// What kubernetes-validate prints for each object that passed.
const VALIDATE_PASSED: &str = "passed for resource";
/// The verbs the agent may use: it only reads.
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];
/// What the agent may read, as (API group, resource).
const READABLE: [(&str, &str); 3] = [
    ("", "services"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
];
/// A node name standing in for `$(NODE_NAME)` when the command line is tried.
const EXAMPLE_NODE_NAME: &str = "node-a";
/// Where the host's bpffs and cgroup v2 hierarchy are.
const HOST_BPFFS: &str = "/sys/fs/bpf";
const HOST_CGROUP: &str = "/sys/fs/cgroup";
/// How the bpffs mount must propagate: a bpffs the agent mounts reaches the host.
const BIDIRECTIONAL: &str = "Bidirectional";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// The files `kubectl apply -f deploy/` reads.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|entry| entry.expect("a readable entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    files
}

/// One document of a manifest file, as JSON.
struct Document {
    file: String,
    value: Value,
}

impl Document {
    fn is<T: Resource>(&self) -> bool {
        self.value["apiVersion"] == T::API_VERSION && self.value["kind"] == T::KIND
    }
}

fn documents() -> Vec<Document> {
    let mut documents = Vec::new();
    for path in manifest_files() {
        let file = path
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("a readable manifest");
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{file}: not YAML: {error}"));
            // An empty document (a trailing `---`) is no object; kubectl skips it too.
            if !value.is_null() {
                documents.push(Document {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    documents
}

/// `value` without the nulls of its objects (`key:` with nothing after it), which the typed
/// round trip drops.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, value)| !value.is_null())
                .map(|(key, value)| (key, without_nulls(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// Where `typed` (the round trip) differs from `written` (the file), one line each.
fn differences(path: &str, written: &Value, typed: &Value, found: &mut Vec<String>) {
    match (written, typed) {
        (Value::Object(written), Value::Object(typed)) => {
            for (key, value) in written {
                let path = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed) => differences(&path, value, typed, found),
                    None => found.push(format!(
                        "{path}: no such field in Kubernetes' type (misspelled or misplaced?)"
                    )),
                }
            }
            for key in typed.keys().filter(|key| !written.contains_key(*key)) {
                found.push(format!("{path}.{key}: appeared in the round trip"));
            }
        }
        (Value::Array(written), Value::Array(typed)) if written.len() == typed.len() => {
            for (index, (written, typed)) in written.iter().zip(typed).enumerate() {
                differences(&format!("{path}[{index}]"), written, typed, found);
            }
        }
        _ if written == typed => {}
        _ => found.push(format!("{path}: {written} became {typed}")),
    }
}

/// The document as `T`, failing unless every field of the file survives the round trip: serde
/// ignores unknown fields, so a misspelled one would otherwise vanish without a word.
fn typed<T: Resource + DeserializeOwned + Serialize>(document: &Document) -> Result<T, String> {
    let what = format!(
        "{}: {} {}",
        document.file,
        T::KIND,
        document.value["metadata"]["name"]
    );
    let object: T = serde_json::from_value(document.value.clone())
        .map_err(|error| format!("{what}: not a valid {}: {error}", T::KIND))?;
    let round_trip = serde_json::to_value(&object).map_err(|error| format!("{what}: {error}"))?;
    let mut found = Vec::new();
    differences(
        "",
        &without_nulls(document.value.clone()),
        &without_nulls(round_trip),
        &mut found,
    );
    if found.is_empty() {
        Ok(object)
    } else {
        Err(format!("{what}:\n  {}", found.join("\n  ")))
    }
}

/// Every object of deploy/, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

fn push<T: Resource + DeserializeOwned + Serialize>(
    document: &Document,
    into: &mut Vec<T>,
) -> Result<(), String> {
    into.push(typed(document)?);
    Ok(())
}

impl Manifests {
    /// Panics with every problem of every document at once.
    fn load() -> Self {
        let mut manifests = Self::default();
        let mut errors = Vec::new();
        for document in documents() {
            let result = if document.is::<Namespace>() {
                push(&document, &mut manifests.namespaces)
            } else if document.is::<ServiceAccount>() {
                push(&document, &mut manifests.service_accounts)
            } else if document.is::<ClusterRole>() {
                push(&document, &mut manifests.cluster_roles)
            } else if document.is::<ClusterRoleBinding>() {
                push(&document, &mut manifests.bindings)
            } else if document.is::<DaemonSet>() {
                push(&document, &mut manifests.daemon_sets)
            } else {
                Err(format!(
                    "{}: {} {} is not one of the kinds lb deploys (a file here that is no \
                     Kubernetes object would break `kubectl apply -f deploy/`)",
                    document.file, document.value["apiVersion"], document.value["kind"]
                ))
            };
            if let Err(error) = result {
                errors.push(error);
            }
        }
        assert!(errors.is_empty(), "{}", errors.join("\n"));
        manifests
    }

    fn namespace(&self) -> &str {
        let [namespace] = self.namespaces.as_slice() else {
            panic!("deploy/ must hold exactly one Namespace");
        };
        namespace
            .metadata
            .name
            .as_deref()
            .expect("a named Namespace")
    }

    fn service_account(&self) -> &ServiceAccount {
        let [account] = self.service_accounts.as_slice() else {
            panic!("deploy/ must hold exactly one ServiceAccount");
        };
        account
    }

    fn cluster_role(&self) -> &ClusterRole {
        let [role] = self.cluster_roles.as_slice() else {
            panic!("deploy/ must hold exactly one ClusterRole");
        };
        role
    }

    fn binding(&self) -> &ClusterRoleBinding {
        let [binding] = self.bindings.as_slice() else {
            panic!("deploy/ must hold exactly one ClusterRoleBinding");
        };
        binding
    }

    fn daemon_set(&self) -> &DaemonSet {
        let [daemon_set] = self.daemon_sets.as_slice() else {
            panic!("deploy/ must hold exactly one DaemonSet");
        };
        daemon_set
    }

    fn pod(&self) -> &PodSpec {
        self.daemon_set()
            .spec
            .template
            .spec
            .as_ref()
            .expect("the DaemonSet has a pod template")
    }

    fn agent(&self) -> &Container {
        let [agent] = self.pod().containers.as_slice() else {
            panic!("the DaemonSet's pod must run exactly one container, the agent");
        };
        agent
    }
}

/// The agent's command: `lb agent <flags>`.
fn agent_command(agent: &Container) -> &[String] {
    let command = agent
        .command
        .as_deref()
        .expect("the agent container names its command");
    assert!(
        command.len() >= 2 && command[0] == "lb" && command[1] == "agent",
        "the container must run `lb agent ...`, runs {command:?}"
    );
    assert!(
        agent.args.is_none(),
        "the whole command line belongs in `command` (one place to read it)"
    );
    command
}

/// The value of `--flag` in `command` (`--flag=value` or `--flag value`).
fn flag<'a>(command: &'a [String], name: &str) -> Option<&'a str> {
    command.iter().enumerate().find_map(|(index, arg)| {
        if let Some(value) = arg
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
        {
            Some(value)
        } else if arg == name {
            command.get(index + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// `arg` with the `$(NAME)` references Kubernetes expands replaced by example values; panics on
/// a reference to a variable the container does not define (Kubernetes would leave it as is).
fn expand(arg: &str, agent: &Container) -> String {
    let mut expanded = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        expanded.push_str(&rest[..start]);
        let end = rest[start..]
            .find(')')
            .map(|end| start + end)
            .unwrap_or_else(|| panic!("unterminated $( in {arg:?}"));
        let name = &rest[start + 2..end];
        let variable = agent
            .env
            .iter()
            .flatten()
            .find(|variable| variable.name == name)
            .unwrap_or_else(|| panic!("{arg:?} refers to $({name}), which env does not define"));
        let field = variable
            .value_from
            .as_ref()
            .and_then(|source| source.field_ref.as_ref())
            .map(|field| field.field_path.as_str());
        match (&variable.value, field) {
            (Some(value), _) => expanded.push_str(value),
            (None, Some("spec.nodeName")) => expanded.push_str(EXAMPLE_NODE_NAME),
            (None, other) => panic!("no example value for $({name}) (from {other:?})"),
        }
        rest = &rest[end + 1..];
    }
    expanded.push_str(rest);
    expanded
}

#[test]
fn every_document_is_a_kubernetes_object_with_only_known_fields() {
    let manifests = Manifests::load();
    assert_eq!(manifests.namespace(), "lb-system");
}

#[test]
fn a_misspelled_field_fails_the_round_trip() {
    let document = Document {
        file: "inline".to_owned(),
        value: serde_json::json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "lb", "namespce": "lb-system"},
        }),
    };
    let error = typed::<ServiceAccount>(&document).expect_err("a typo must not pass");
    assert!(error.contains(".metadata.namespce"), "{error}");
}

#[test]
fn the_role_only_reads_services_endpointslices_and_nodes() {
    let manifests = Manifests::load();
    let role = manifests.cluster_role();
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(READ_VERBS), "verbs of {rule:?}");
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}: whole resources only"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert((group.as_str(), resource.as_str()));
            }
        }
    }
    assert_eq!(granted, BTreeSet::from(READABLE));
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated role would take in other roles' rules"
    );
}

#[test]
fn the_agent_runs_as_the_bound_service_account_in_the_namespace() {
    let manifests = Manifests::load();
    let namespace = manifests.namespace();
    let account = manifests.service_account();
    let account_name = account.metadata.name.as_deref().expect("a named account");
    assert_eq!(account.metadata.namespace.as_deref(), Some(namespace));
    let daemon_set = manifests.daemon_set();
    assert_eq!(daemon_set.metadata.namespace.as_deref(), Some(namespace));
    assert_eq!(
        manifests.pod().service_account_name.as_deref(),
        Some(account_name)
    );
    let binding = manifests.binding();
    assert_eq!(binding.role_ref.kind, ClusterRole::KIND);
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some(ClusterRole::GROUP)
    );
    assert_eq!(
        Some(&binding.role_ref.name),
        manifests.cluster_role().metadata.name.as_ref()
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects
            .iter()
            .any(|subject| subject.kind == ServiceAccount::KIND
                && subject.name == account_name
                && subject.namespace.as_deref() == Some(namespace)),
        "the binding must name {namespace}/{account_name}: {subjects:?}"
    );
}

#[test]
fn the_daemon_set_runs_on_every_node_in_its_network_namespace() {
    let manifests = Manifests::load();
    let pod = manifests.pod();
    assert_eq!(pod.host_network, Some(true));
    assert!(
        pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists")
                && toleration.key.is_none()
                && toleration.effect.is_none()
        }),
        "one toleration must match every taint, as kube-proxy's"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let spec = &manifests.daemon_set().spec;
    let selected = spec.selector.match_labels.as_ref().expect("match labels");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.labels.as_ref())
        .expect("template labels");
    for (key, value) in selected {
        assert_eq!(
            labels.get(key),
            Some(value),
            "the selector must match {key}"
        );
    }
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|strategy| strategy.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "two agents cannot share a node's pin directory"
    );
}

fn assert_probes(probe: Option<&Probe>, what: &str, path: &str, health: SocketAddr) {
    let get = probe
        .and_then(|probe| probe.http_get.as_ref())
        .unwrap_or_else(|| panic!("the agent needs an HTTP {what} probe"));
    assert_eq!(get.path.as_deref(), Some(path), "{what} probe");
    assert_eq!(
        get.port,
        IntOrString::Int(health.port().into()),
        "{what} probe port"
    );
    assert_eq!(
        get.host.as_deref(),
        Some(health.ip().to_string().as_str()),
        "{what} probe host: the agent listens on {health} only"
    );
    assert!(
        get.scheme.as_deref().is_none_or(|scheme| scheme == "HTTP"),
        "{what} probe: the agent serves plain HTTP"
    );
}

#[test]
fn probes_ask_the_agent_s_health_address() {
    let manifests = Manifests::load();
    let agent = manifests.agent();
    let command = agent_command(agent);
    let health: SocketAddr = flag(command, "--health-address")
        .expect("the command names --health-address, which the probes must match")
        .parse()
        .expect("a socket address");
    assert_probes(
        agent.liveness_probe.as_ref(),
        "liveness",
        "/healthz",
        health,
    );
    assert_probes(
        agent.readiness_probe.as_ref(),
        "readiness",
        "/readyz",
        health,
    );
    if let Some(startup) = &agent.startup_probe {
        // A startup probe on /readyz would restart an agent that cannot list the API server,
        // which restarting does not fix.
        assert_probes(Some(startup), "startup", "/healthz", health);
    }
}

/// The volume mounted at the longest mount path that holds `path`, and that mount.
fn mount_of<'a>(
    pod: &'a PodSpec,
    agent: &'a Container,
    path: &str,
) -> (&'a VolumeMount, &'a Volume) {
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .filter(|mount| Path::new(path).starts_with(&mount.mount_path))
        .max_by_key(|mount| mount.mount_path.len())
        .unwrap_or_else(|| panic!("nothing is mounted at {path}"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    (mount, volume)
}

/// The host path behind the agent's `path`, which must come from a hostPath volume.
fn host_path(pod: &PodSpec, agent: &Container, path: &str) -> PathBuf {
    let (mount, volume) = mount_of(pod, agent, path);
    let host = volume
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("{path} must be the host's (a hostPath volume)"));
    let inside = Path::new(path)
        .strip_prefix(&mount.mount_path)
        .expect("the mount holds the path");
    Path::new(&host.path).join(inside)
}

#[test]
fn the_agent_s_paths_are_the_host_s() {
    let manifests = Manifests::load();
    let pod = manifests.pod();
    let agent = manifests.agent();
    let command = agent_command(agent);

    let pin_dir = flag(command, "--pin-dir").expect("the command names --pin-dir");
    assert!(
        host_path(pod, agent, pin_dir).starts_with(HOST_BPFFS),
        "the pins must outlive the pod on the host's bpffs"
    );
    let (bpffs, _) = mount_of(pod, agent, pin_dir);
    assert_eq!(bpffs.mount_propagation.as_deref(), Some(BIDIRECTIONAL));
    assert_eq!(
        agent
            .security_context
            .as_ref()
            .and_then(|context| context.privileged),
        Some(true),
        "Bidirectional mount propagation is only allowed in privileged containers"
    );

    let state_dir = flag(command, "--state-dir").expect("the command names --state-dir");
    host_path(pod, agent, state_dir);

    if !command.iter().any(|arg| arg == "--no-socket-hooks") {
        // The container's own /sys/fs/cgroup is its cgroup namespace's view: hooks there would
        // only see the pod.
        let cgroup = flag(command, "--socket-cgroup")
            .expect("with socket hooks the command must name the host's cgroup");
        assert!(host_path(pod, agent, cgroup).starts_with(HOST_CGROUP));
    }
}

#[test]
fn lb_accepts_the_agent_s_command_line() {
    let manifests = Manifests::load();
    let agent = manifests.agent();
    let args: Vec<String> = agent_command(agent)[1..]
        .iter()
        .map(|arg| expand(arg, agent))
        .collect();
    let lb = lb_binary().expect("the lb binary");
    // clap parses and checks every flag and value before `--help`, then prints help instead of
    // running: the agent's flags are checked without privileges or side effects.
    let run = |extra: &[&str]| {
        Command::new(&lb)
            .args(&args)
            .args(extra)
            .arg("--help")
            .output()
            .expect("running lb")
    };
    let output = run(&[]);
    assert!(
        output.status.success(),
        "lb {} rejects the DaemonSet's command line:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    // The check itself: an unknown flag before --help must fail the same way.
    assert!(!run(&["--no-such-flag"]).status.success());
}

/// The `<name>` value in the first line of `text` that starts with `prefix` and ends in `suffix`.
fn pinned<'a>(text: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(prefix)?.strip_suffix(suffix))
}

#[test]
fn the_image_builds_with_the_bpf_linker_xtask_installs() {
    let setup = std::fs::read_to_string(workspace_root().join("xtask/src/setup.rs"))
        .expect("xtask/src/setup.rs");
    let containerfile =
        std::fs::read_to_string(deploy_dir().join("Containerfile")).expect("deploy/Containerfile");
    let xtask = pinned(&setup, "const BPF_LINKER_VERSION: &str = \"", "\";")
        .expect("xtask pins bpf-linker");
    let image = pinned(&containerfile, "ARG BPF_LINKER_VERSION=", "")
        .expect("the Containerfile pins bpf-linker");
    assert_eq!(
        image, xtask,
        "the image and xtask must build the same linker"
    );
}

/// kubernetes-validate: `$LB_KUBERNETES_VALIDATE`, else where `cargo xtask setup` installs it
/// (`target/python-venv`, beside this test's `target/<profile>`).
fn kubernetes_validate() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LB_KUBERNETES_VALIDATE") {
        let path = PathBuf::from(path);
        assert!(
            path.is_absolute() && path.exists(),
            "LB_KUBERNETES_VALIDATE={} does not exist (`cargo xtask setup` installs it)",
            path.display()
        );
        return Some(path);
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    let path = target.join("python-venv/bin/kubernetes-validate");
    path.exists().then_some(path)
}

#[test]
fn manifests_pass_kubernetes_schemas_strictly() {
    let name = "manifests_pass_kubernetes_schemas_strictly";
    let Some(validate) = kubernetes_validate() else {
        let reason = "kubernetes-validate is not installed (`cargo xtask setup` installs it; or \
                      set LB_KUBERNETES_VALIDATE)";
        if in_ci() {
            panic!("{name}: {reason}, and CI must run it");
        }
        eprintln!("SKIP {name}: {reason}");
        return;
    };
    let objects = documents().len();
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validate)
            .arg("--strict")
            .args(["--kubernetes-version", version])
            .args(manifest_files())
            .output()
            .expect("running kubernetes-validate");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "Kubernetes {version}'s schemas reject deploy/:\n{report}"
        );
        // A kind the tool has no schema for is only a warning: every object must have passed.
        assert_eq!(
            report.matches(VALIDATE_PASSED).count(),
            objects,
            "Kubernetes {version}: not every object was checked:\n{report}"
        );
    }
}
