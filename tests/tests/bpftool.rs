//! What bpftool shows of a real agent's objects (issue #6: "`bpftool map show` and `bpftool prog
//! show` list our objects with clear names and BTF, so `bpftool map dump name LB_SERVICES` prints
//! readable keys and values"): every pinned map under its own name with BTF (but the devmap,
//! which the kernel refuses BTF for), `LB_SERVICES` dumped with the field names of
//! `ServiceKey`/`ServiceValue` and the values `lb services` shows, and the XDP program `lb_xdp`
//! with BTF.
//!
//! The agent runs in a namespace of its own, on a veth pair inside it, with a pin directory of its
//! own; nothing is added to the root namespace. Dropping the scratch state, panics included,
//! stops the agent, resets the pins and removes the rest.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use lb::dataplane::{ALL_MAPS, PROGRAM_NAME};
use lb_common::net::{addr_from_wire, port_from_wire, proto_name};
use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH, lb, lb_binary, pin_dir},
    echo::EXAMPLE_MANIFEST,
    leftovers::{self, remove_test_leftovers_once},
    netns::{Netns, unique_prefix},
    privilege::{in_ci, require_root},
};
use serde_json::Value;

/// The veth the agent attaches to, and its peer, both inside the test's namespace.
const INTERFACE: &str = "d0";
const INTERFACE_PEER: &str = "d1";
/// The bpftool command (`cargo xtask setup` installs the Debian package of that name).
const BPFTOOL: &str = "bpftool";
/// Map types the kernel refuses BTF for (`map_check_no_btf` in `kernel/bpf/devmap.c`): their
/// keys and values are plain interface indexes, dumped as bytes.
const NO_BTF_MAP_TYPES: [&str; 2] = ["devmap", "devmap_hash"];
/// The longest object name the kernel keeps (`BPF_OBJ_NAME_LEN` less its NUL): every map name
/// must fit whole, or bpftool would show a truncated one.
const MAX_OBJECT_NAME: usize = 15;

/// Whether the privileged test `name` can run: root, and bpftool installed. Prints a skip line
/// otherwise, and panics under CI, which must run every test.
fn runnable(name: &str) -> bool {
    if !require_root(name) {
        return false;
    }
    let installed = Command::new(BPFTOOL)
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|output| output.status.success());
    if !installed {
        let reason = "bpftool is not installed (`cargo xtask setup` installs it)";
        if in_ci() {
            panic!("{name}: {reason}, and CI must run it");
        }
        eprintln!("SKIP {name}: {reason}");
        return false;
    }
    remove_test_leftovers_once();
    true
}

/// `bpftool -j args...`, parsed.
fn bpftool(args: &[&str]) -> Value {
    let output = Command::new(BPFTOOL)
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running bpftool");
    assert!(
        output.status.success(),
        "bpftool {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "bpftool {}: no JSON ({error}): {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// `bpftool -j command pinned <path>`.
fn bpftool_pinned(command: &[&str], path: &Path) -> Value {
    let path = path.to_str().expect("a UTF-8 path");
    let mut args = command.to_vec();
    args.extend(["pinned", path]);
    bpftool(&args)
}

/// A test's namespace (with the veth pair), pin directory and work directory (the example
/// manifest), and the agent serving it.
struct Scratch {
    agent: Option<Agent>,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    netns: Netns,
}

impl Scratch {
    fn start() -> anyhow::Result<Self> {
        let prefix = unique_prefix(leftovers::TESTS);
        let netns = Netns::create(&format!("{prefix}-node"))?;
        let mut scratch = Self {
            agent: None,
            lb: lb_binary()?,
            pin_dir: pin_dir(&prefix),
            workdir: std::env::temp_dir().join(&prefix),
            netns,
        };
        let manifests = scratch.workdir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::copy(
            workspace.join(EXAMPLE_MANIFEST),
            manifests.join("echo.yaml"),
        )?;
        scratch.netns.ip(&[
            "link",
            "add",
            INTERFACE,
            "type",
            "veth",
            "peer",
            "name",
            INTERFACE_PEER,
        ])?;
        scratch.netns.ip(&["link", "set", INTERFACE, "up"])?;
        scratch.netns.ip(&["link", "set", INTERFACE_PEER, "up"])?;
        // Veth redirects allowed, so that the devmap holds an entry to dump (no traffic flows).
        scratch.agent = Some(Agent::start(
            &scratch.netns,
            &AgentOptions {
                lb: &scratch.lb,
                pin_dir: &scratch.pin_dir,
                manifests: &manifests,
                interfaces: &[INTERFACE.to_owned()],
                state_dir: &scratch.workdir.join("state"),
                log: &scratch.workdir.join("agent.log"),
                extra_args: &[REDIRECT_VETH],
            },
        )?);
        Ok(scratch)
    }

    fn lb(&self, args: &[&str]) -> String {
        lb(&self.lb, &self.pin_dir, args).expect("lb command")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
        let _ = lb(&self.lb, &self.pin_dir, &["reset"]);
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// `value[field]` as an unsigned integer.
fn number(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field} in {value}"))
}

/// A `formatted` byte array of bpftool (a Rust `[u8; N]` name field) as the NUL-terminated text.
fn text(bytes: &Value) -> String {
    let bytes: Vec<u8> = bytes
        .as_array()
        .unwrap_or_else(|| panic!("not a byte array: {bytes}"))
        .iter()
        .map(|byte| u8::try_from(byte.as_u64().expect("a byte")).expect("a byte"))
        .take_while(|byte| *byte != 0)
        .collect();
    String::from_utf8(bytes).expect("UTF-8 text")
}

#[test]
fn bpftool_shows_every_map_and_the_program_by_name_with_btf() {
    let name = "bpftool_shows_every_map_and_the_program_by_name_with_btf";
    if !runnable(name) {
        return;
    }
    let scratch = Scratch::start().expect("scratch namespace and agent");

    // Every map the agent pins: its own name, whole, and BTF unless the kernel refuses it.
    let mut map_ids = BTreeMap::new();
    let mut without_btf = Vec::new();
    for map in ALL_MAPS {
        assert!(map.len() <= MAX_OBJECT_NAME, "{map}: too long a name");
        let shown = bpftool_pinned(&["map", "show"], &scratch.pin_dir.join(map));
        assert_eq!(shown["name"], map, "{shown}");
        let kind = shown["type"].as_str().expect("a map type");
        if NO_BTF_MAP_TYPES.contains(&kind) {
            // If a kernel starts accepting BTF for devmaps, the agent should describe it too.
            assert!(
                shown.get("btf_id").is_none(),
                "{map} ({kind}) now has BTF: drop it from NO_BTF_MAP_TYPES: {shown}"
            );
            without_btf.push(map);
        } else {
            assert!(shown["btf_id"].as_u64().is_some(), "{map}: no BTF: {shown}");
        }
        map_ids.insert(number(&shown, "id"), map);
    }
    println!("maps without BTF (the kernel refuses it for devmaps): {without_btf:?}");
    assert_eq!(without_btf, ["LB_TX_PORTS"]);
    // The devmap's entries are raw bytes: the interface index of the veth on both sides.
    let tx_ports = bpftool_pinned(&["map", "dump"], &scratch.pin_dir.join("LB_TX_PORTS"));
    let entries = tx_ports.as_array().expect("LB_TX_PORTS entries");
    assert_eq!(entries.len(), 1, "{tx_ports}");
    assert!(entries[0].get("formatted").is_none(), "{tx_ports}");

    // The program: attached through the pinned link, listed by `prog show` as lb_xdp with BTF,
    // using exactly the maps above.
    let link = bpftool_pinned(
        &["link", "show"],
        &scratch.pin_dir.join("links").join(INTERFACE),
    );
    let prog_id = number(&link, "prog_id");
    let programs = bpftool(&["prog", "show"]);
    let program = programs
        .as_array()
        .expect("programs")
        .iter()
        .find(|program| program["id"].as_u64() == Some(prog_id))
        .unwrap_or_else(|| panic!("program {prog_id} not in `bpftool prog show`: {programs}"));
    assert_eq!(program["name"], PROGRAM_NAME, "{program}");
    assert_eq!(program["type"], "xdp", "{program}");
    assert!(program["btf_id"].as_u64().is_some(), "{program}");
    for id in program["map_ids"].as_array().expect("map_ids") {
        let id = id.as_u64().expect("a map id");
        assert!(
            map_ids.contains_key(&id),
            "lb_xdp uses map {id}, which is not pinned: {program}"
        );
    }
}

#[test]
fn bpftool_dumps_lb_services_with_field_names_and_lb_services_values() {
    let name = "bpftool_dumps_lb_services_with_field_names_and_lb_services_values";
    if !runnable(name) {
        return;
    }
    let scratch = Scratch::start().expect("scratch namespace and agent");
    let dump = |map: &str| bpftool_pinned(&["map", "dump"], &scratch.pin_dir.join(map));
    let services = dump("LB_SERVICES");
    let slots = dump("LB_SLOTS");
    let backends = dump("LB_BACKENDS");
    let info = dump("LB_SVC_INFO");
    let rows: Vec<Value> =
        serde_json::from_str(&scratch.lb(&["services", "-o", "json"])).expect("lb services JSON");
    let entries = services.as_array().expect("LB_SERVICES entries");
    assert_eq!(entries.len(), rows.len(), "{services:#}\n{rows:#?}");
    assert!(!rows.is_empty());

    // `formatted` entries, by the key's fields, with ServiceKey's and ServiceValue's field names.
    let key_fields = ["addr", "port", "proto", "_pad"];
    let value_fields = [
        "service_id",
        "backend_set",
        "backend_count",
        "flags",
        "affinity_timeout_s",
    ];
    // Slot (set, position) -> backend id, and backend id -> its entry, as bpftool formats them.
    let slot_of: BTreeMap<(u64, u64), u64> = slots
        .as_array()
        .expect("LB_SLOTS entries")
        .iter()
        .map(|entry| {
            let formatted = &entry["formatted"];
            (
                (
                    number(&formatted["key"], "backend_set"),
                    number(&formatted["key"], "slot"),
                ),
                formatted["value"].as_u64().expect("a backend id"),
            )
        })
        .collect();
    let backend_of: BTreeMap<u64, &Value> = backends
        .as_array()
        .expect("LB_BACKENDS entries")
        .iter()
        .map(|entry| {
            let formatted = &entry["formatted"];
            (
                formatted["key"].as_u64().expect("a backend id"),
                &formatted["value"],
            )
        })
        .collect();
    let info_of: BTreeMap<u64, &Value> = info
        .as_array()
        .expect("LB_SVC_INFO entries")
        .iter()
        .map(|entry| {
            let formatted = &entry["formatted"];
            (
                formatted["key"].as_u64().expect("a service id"),
                &formatted["value"],
            )
        })
        .collect();

    for entry in entries {
        let formatted = entry
            .get("formatted")
            .unwrap_or_else(|| panic!("no BTF-formatted entry: {entry}"));
        let (key, value) = (&formatted["key"], &formatted["value"]);
        let names = |object: &Value| -> Vec<String> {
            object
                .as_object()
                .unwrap_or_else(|| panic!("not a struct: {object}"))
                .keys()
                .cloned()
                .collect()
        };
        let mut expected_key: Vec<String> = key_fields.iter().map(|f| (*f).to_owned()).collect();
        expected_key.sort();
        let mut key_names = names(key);
        key_names.sort();
        assert_eq!(key_names, expected_key, "{formatted}");
        let mut expected_value: Vec<String> =
            value_fields.iter().map(|f| (*f).to_owned()).collect();
        expected_value.sort();
        let mut value_names = names(value);
        value_names.sort();
        assert_eq!(value_names, expected_value, "{formatted}");

        // The key's fields in network byte order decode to the frontend lb services lists.
        let addr = addr_from_wire(u32::try_from(number(key, "addr")).expect("a u32"));
        let port = port_from_wire(u16::try_from(number(key, "port")).expect("a u16"));
        let protocol = proto_name(u8::try_from(number(key, "proto")).expect("a u8"));
        let frontend = format!("{addr}:{port}");
        let row = rows
            .iter()
            .find(|row| row["frontend"] == frontend.as_str() && row["protocol"] == protocol)
            .unwrap_or_else(|| panic!("{frontend}/{protocol} not in lb services: {rows:#?}"));

        // The value: its slots lead to the endpoints lb services shows, in slot order, its
        // service id to the names, and the affinity is the same.
        let endpoints: Vec<String> = (0..number(value, "backend_count"))
            .map(|slot| {
                let id = slot_of
                    .get(&(number(value, "backend_set"), slot))
                    .unwrap_or_else(|| panic!("{frontend}: no slot {slot}: {slots}"));
                let backend = backend_of[id];
                format!(
                    "{}:{}",
                    addr_from_wire(u32::try_from(number(backend, "addr")).expect("a u32")),
                    port_from_wire(u16::try_from(number(backend, "port")).expect("a u16"))
                )
            })
            .collect();
        let listed: Vec<String> = row["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|endpoint| endpoint.as_str().expect("an endpoint").to_owned())
            .collect();
        assert_eq!(endpoints, listed, "{frontend}/{protocol}");
        assert_eq!(
            value["affinity_timeout_s"], row["affinity_timeout_s"],
            "{frontend}"
        );
        let service_info = info_of
            .get(&number(value, "service_id"))
            .unwrap_or_else(|| panic!("{frontend}: no LB_SVC_INFO entry: {info}"));
        assert_eq!(
            text(&service_info["namespace"]),
            row["namespace"],
            "{frontend}"
        );
        assert_eq!(text(&service_info["name"]), row["name"], "{frontend}");
        assert_eq!(
            text(&service_info["port_name"]),
            row["port_name"],
            "{frontend}"
        );
    }
}
