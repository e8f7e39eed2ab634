//! Host tests of the manifest directory reader: what it reads, what it skips, how it names
//! problems, and what it keeps when a file or an object breaks.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb::manifests::{
    DEFAULT_NAMESPACE, Kind, Load, ManifestError, ObjectKey, Snapshot, load_dir, manifest_files,
};

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(relative)
}

/// A directory of its own under the system temp directory, removed when dropped (also when the
/// test panics, so failed runs leave nothing behind).
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-manifests-test-{}-{label}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("creating the scratch directory");
        Self { dir }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, text).expect("writing a manifest");
        path
    }

    fn load(&self, previous: &Snapshot) -> Load {
        load_dir(&self.dir, previous).expect("the scratch directory is readable")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn service_key(namespace: &str, name: &str) -> ObjectKey {
    key(Kind::Service, namespace, name)
}

fn slice_key(namespace: &str, name: &str) -> ObjectKey {
    key(Kind::EndpointSlice, namespace, name)
}

fn keys<T>(map: &BTreeMap<ObjectKey, T>) -> Vec<ObjectKey> {
    map.keys().cloned().collect()
}

fn cluster_ip(snapshot: &Snapshot, key: &ObjectKey) -> Option<String> {
    snapshot.services[key]
        .object
        .spec
        .as_ref()
        .and_then(|spec| spec.cluster_ip.clone())
}

/// Loads one file holding `yaml` with no previous snapshot.
fn load_single(yaml: &str) -> (Scratch, PathBuf, Load) {
    let scratch = Scratch::new("single");
    let file = scratch.write("objects.yaml", yaml);
    let load = scratch.load(&Snapshot::default());
    (scratch, file, load)
}

/// Asserts that `load` holds exactly one error and that it names `file`, `object` and `field`,
/// both in its fields and in its message, and that the message says each of `says`.
fn assert_single_error(
    load: &Load,
    file: &Path,
    object: Option<&str>,
    field: Option<&str>,
    says: &[&str],
) -> ManifestError {
    assert_eq!(load.errors.len(), 1, "errors: {:#?}", load.errors);
    let error = load.errors[0].clone();
    assert_eq!(error.file, file);
    assert_eq!(error.object.as_deref(), object);
    assert_eq!(error.field.as_deref(), field);
    let shown = error.to_string();
    assert!(shown.starts_with(&file.display().to_string()), "{shown}");
    for part in object.into_iter().chain(field).chain(says.iter().copied()) {
        assert!(shown.contains(part), "{shown:?} does not say {part:?}");
    }
    error
}

const WEB_HEADER: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n";

/// A Service `default/web` with the given `spec` body (indented two spaces).
fn web_service(spec: &str) -> String {
    format!("{WEB_HEADER}spec:\n{spec}")
}

#[test]
fn reads_multi_document_yaml_lists_and_json_and_skips_everything_else() {
    let dir = fixture("host/mixed");
    let load = load_dir(&dir, &Snapshot::default()).unwrap();

    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert_eq!(load.kept, 0);
    assert_eq!(
        keys(&load.snapshot.services),
        vec![
            service_key("default", "api"),
            service_key("kube-system", "dns"),
            service_key("shop", "web"),
        ]
    );
    assert_eq!(
        keys(&load.snapshot.slices),
        vec![
            slice_key("default", "api-1"),
            slice_key("shop", "web-abc12")
        ]
    );

    let source = |key: &ObjectKey| {
        let sourced = load.snapshot.services.get(key).map(|s| s.file.clone());
        sourced.unwrap_or_else(|| load.snapshot.slices[key].file.clone())
    };
    assert_eq!(
        source(&service_key("shop", "web")),
        dir.join("01-multi.yaml")
    );
    assert_eq!(
        source(&slice_key("shop", "web-abc12")),
        dir.join("01-multi.yaml")
    );
    assert_eq!(
        source(&service_key("default", "api")),
        dir.join("02-list.yaml")
    );
    assert_eq!(
        source(&slice_key("default", "api-1")),
        dir.join("02-list.yaml")
    );
    assert_eq!(
        source(&service_key("kube-system", "dns")),
        dir.join("03-dns.json")
    );

    // The typed objects are complete, not just identified.
    let dns = load.snapshot.services[&service_key("kube-system", "dns")]
        .object
        .spec
        .clone()
        .unwrap();
    let ports: Vec<_> = dns
        .ports
        .unwrap()
        .into_iter()
        .map(|port| (port.name.unwrap(), port.protocol.unwrap(), port.port))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("dns".to_owned(), "UDP".to_owned(), 53),
            ("dns-tcp".to_owned(), "TCP".to_owned(), 53)
        ]
    );
    let web_slice = &load.snapshot.slices[&slice_key("shop", "web-abc12")].object;
    assert_eq!(web_slice.address_type, "IPv4");
    assert_eq!(
        web_slice.endpoints.as_ref().unwrap()[0].addresses,
        vec!["10.1.0.1".to_owned()]
    );
}

#[test]
fn only_manifest_files_directly_in_the_directory_are_read() {
    let dir = fixture("host/mixed");
    // Not .txt, .bak or .md, not a directory named like a manifest, not subdirectories.
    assert_eq!(
        manifest_files(&dir).unwrap(),
        vec![
            dir.join("01-multi.yaml"),
            dir.join("02-list.yaml"),
            dir.join("03-dns.json"),
            dir.join("04-other-kinds.yml"),
        ]
    );
}

#[test]
fn other_kinds_are_skipped_silently() {
    let (_scratch, _file, load) = load_single(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 1}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0}\nspec: {containers: []}\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web}\n\
         spec: {rules: []}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: b}\n",
    );
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert!(load.snapshot.services.is_empty());
    assert!(load.snapshot.slices.is_empty());
}

#[test]
fn objects_without_a_namespace_are_in_default() {
    assert_eq!(DEFAULT_NAMESPACE, "default");
    let (_scratch, _file, load) = load_single(&format!(
        "{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n\
         addressType: IPv4\nendpoints: []\n---\napiVersion: v1\nkind: Service\nmetadata:\n  \
         name: web\n  namespace: prod\nspec:\n  ports: [{{port: 80}}]\n",
        web_service("  ports: [{port: 80}]\n")
    ));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert_eq!(
        keys(&load.snapshot.services),
        vec![service_key("default", "web"), service_key("prod", "web")]
    );
    assert_eq!(
        keys(&load.snapshot.slices),
        vec![slice_key("default", "web-1")]
    );
}

#[test]
fn json_indented_with_tabs_is_read() {
    // `kubectl get -o json` indents with spaces, but Go's json.MarshalIndent(v, "", "\t") and
    // `jq --tab` use tabs, and JSON allows them.
    let scratch = Scratch::new("tabs");
    scratch.write(
        "tabs.json",
        "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Service\",\n\t\"metadata\": {\n\t\t\"name\": \
         \"web\"\n\t},\n\t\"spec\": {\n\t\t\"ports\": [\n\t\t\t{\"port\": 80}\n\t\t]\n\t}\n}\n",
    );
    let load = scratch.load(&Snapshot::default());
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert_eq!(
        keys(&load.snapshot.services),
        vec![service_key("default", "web")]
    );
}

#[test]
fn a_wrong_type_names_the_field_path() {
    let (_scratch, file, load) = load_single(&web_service(
        "  ports:\n  - name: http\n    port: 80\n  - name: https\n    port: \"eighty\"\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.ports[1].port"),
        &["eighty"],
    );
    assert!(load.snapshot.services.is_empty());
}

#[test]
fn ports_outside_1_to_65535_are_rejected() {
    for (port, says) in [("0", "got 0"), ("70000", "got 70000"), ("-1", "got -1")] {
        let (_scratch, file, load) = load_single(&web_service(&format!(
            "  ports:\n  - name: a\n    port: 80\n  - name: b\n    port: {port}\n"
        )));
        assert_single_error(
            &load,
            &file,
            Some("Service default/web"),
            Some("spec.ports[1].port"),
            &["between 1 and 65535", says],
        );
        assert!(load.snapshot.services.is_empty(), "port {port}");
    }
    for (field, yaml) in [
        (
            "spec.ports[0].targetPort",
            "  ports:\n  - port: 80\n    targetPort: 0\n",
        ),
        (
            "spec.ports[0].nodePort",
            "  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 70000\n",
        ),
    ] {
        let (_scratch, file, load) = load_single(&web_service(yaml));
        assert_single_error(
            &load,
            &file,
            Some("Service default/web"),
            Some(field),
            &["between 1 and 65535"],
        );
    }
}

#[test]
fn an_unknown_protocol_is_rejected() {
    let (_scratch, file, load) =
        load_single(&web_service("  ports:\n  - port: 80\n    protocol: HTTP\n"));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.ports[0].protocol"),
        &["\"HTTP\""],
    );
    // Kubernetes protocol names are case-sensitive.
    let (_scratch, file, load) =
        load_single(&web_service("  ports:\n  - port: 80\n    protocol: tcp\n"));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.ports[0].protocol"),
        &["\"tcp\""],
    );
}

#[test]
fn a_cluster_ip_that_is_not_an_address_is_rejected() {
    let (_scratch, file, load) = load_single(&web_service(
        "  clusterIP: 10.96.0.300\n  ports:\n  - port: 80\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.clusterIP"),
        &["\"10.96.0.300\"", "not an IP address"],
    );
    let (_scratch, file, load) = load_single(&web_service(
        "  clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.30, fd00::zz]\n  ports:\n  - port: 80\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.clusterIPs[1]"),
        &["fd00::zz"],
    );
    let (_scratch, file, load) = load_single(&web_service(
        "  clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.31]\n  ports:\n  - port: 80\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.clusterIPs[0]"),
        &["10.96.0.30", "10.96.0.31"],
    );
}

#[test]
fn every_port_of_a_multi_port_service_needs_a_name() {
    let (_scratch, file, load) = load_single(&web_service(
        "  ports:\n  - name: http\n    port: 80\n  - port: 443\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.ports[1].name"),
        &["required"],
    );
    // A single port may stay unnamed.
    let (_scratch, _file, load) = load_single(&web_service("  ports:\n  - port: 80\n"));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert_eq!(load.snapshot.services.len(), 1);
}

#[test]
fn duplicate_ports_and_port_names_are_rejected() {
    let (_scratch, file, load) = load_single(&web_service(
        "  ports:\n  - name: a\n    port: 80\n  - name: b\n    port: 81\n  - name: c\n    \
         port: 80\n    protocol: TCP\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.ports[2]"),
        &["duplicate port 80"],
    );
    let (_scratch, file, load) = load_single(&web_service(
        "  ports:\n  - name: a\n    port: 80\n  - name: a\n    port: 81\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.ports[1].name"),
        &["duplicate name \"a\""],
    );
    // The same number for two protocols is two ports (DNS does this).
    let (_scratch, _file, load) = load_single(&web_service(
        "  ports:\n  - name: dns\n    port: 53\n    protocol: UDP\n  - name: dns-tcp\n    \
         port: 53\n",
    ));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert_eq!(load.snapshot.services.len(), 1);
}

#[test]
fn an_endpoint_slice_address_that_is_not_ipv4_is_rejected() {
    let (_scratch, file, load) = load_single(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  \
         namespace: shop\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- addresses: \
         [10.1.0.1]\n- addresses: [10.1.0.400]\n",
    );
    assert_single_error(
        &load,
        &file,
        Some("EndpointSlice shop/web-abc"),
        Some("endpoints[1].addresses[0]"),
        &["\"10.1.0.400\"", "IPv4"],
    );
    assert!(load.snapshot.slices.is_empty());

    let (_scratch, file, load) = load_single(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n\
         addressType: IPv5\nendpoints: []\n",
    );
    assert_single_error(
        &load,
        &file,
        Some("EndpointSlice default/web-abc"),
        Some("addressType"),
        &["IPv5"],
    );

    let (_scratch, file, load) = load_single(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n\
         addressType: IPv4\nports: [{port: 8080}, {name: x, port: 0}]\nendpoints: []\n",
    );
    assert_single_error(
        &load,
        &file,
        Some("EndpointSlice default/web-abc"),
        Some("ports[1].port"),
        &["between 1 and 65535"],
    );
}

#[test]
fn an_unsupported_api_version_is_reported() {
    let (_scratch, file, load) = load_single(
        "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n\
         addressType: IPv4\nendpoints: []\n---\n\
         apiVersion: v2\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: [{port: 80}]\n",
    );
    assert_eq!(load.errors.len(), 2, "{:#?}", load.errors);
    for (error, version) in load
        .errors
        .iter()
        .zip(["discovery.k8s.io/v1beta1", "\"v2\""])
    {
        assert_eq!(error.file, file);
        assert_eq!(error.field.as_deref(), Some("apiVersion"));
        assert!(error.to_string().contains(version), "{error}");
    }
    assert!(load.errors[0].to_string().contains("EndpointSlice"));
    assert!(load.errors[1].to_string().contains("Service"));
    assert!(load.snapshot.services.is_empty());
    assert!(load.snapshot.slices.is_empty());
}

#[test]
fn a_second_definition_of_an_object_is_reported_and_the_first_used() {
    let scratch = Scratch::new("duplicates");
    scratch.write(
        "a.yaml",
        &format!(
            "{}---\n{}",
            web_service("  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n"),
            web_service("  clusterIP: 10.96.0.2\n  ports: [{port: 80}]\n"),
        ),
    );
    let b = scratch.write(
        "b.yaml",
        &web_service("  clusterIP: 10.96.0.3\n  ports: [{port: 80}]\n"),
    );
    let load = scratch.load(&Snapshot::default());
    let web = service_key("default", "web");
    assert_eq!(keys(&load.snapshot.services), vec![web.clone()]);
    assert_eq!(
        cluster_ip(&load.snapshot, &web).as_deref(),
        Some("10.96.0.1")
    );
    assert_eq!(
        load.snapshot.services[&web].file,
        scratch.dir.join("a.yaml")
    );
    assert_eq!(load.errors.len(), 2, "{:#?}", load.errors);
    for (error, file) in load.errors.iter().zip([scratch.dir.join("a.yaml"), b]) {
        assert_eq!(error.file, file);
        assert_eq!(error.object.as_deref(), Some("Service default/web"));
        assert_eq!(error.field.as_deref(), Some("metadata.name"));
        assert!(error.message.contains("more than once"), "{error}");
    }
    // The same name in another kind or namespace is another object.
    let scratch = Scratch::new("not-duplicates");
    scratch.write(
        "a.yaml",
        &format!(
            "{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web\n\
             addressType: IPv4\nendpoints: []\n---\napiVersion: v1\nkind: Service\nmetadata:\n  \
             name: web\n  namespace: other\nspec:\n  ports: [{{port: 80}}]\n",
            web_service("  ports: [{port: 80}]\n")
        ),
    );
    let load = scratch.load(&Snapshot::default());
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert_eq!(load.snapshot.services.len(), 2);
    assert_eq!(load.snapshot.slices.len(), 1);
}

#[test]
fn a_broken_object_keeps_its_last_good_version_while_the_others_update() {
    let scratch = Scratch::new("keep-object");
    let api = |cluster_ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  clusterIP: \
             {cluster_ip}\n  ports: [{{port: 9000}}]\n"
        )
    };
    let file = scratch.write(
        "services.yaml",
        &format!(
            "{}---\n{}",
            web_service("  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n"),
            api("10.96.0.2")
        ),
    );
    let first = scratch.load(&Snapshot::default());
    assert!(first.errors.is_empty(), "{:#?}", first.errors);

    // web breaks (and would move), api moves.
    scratch.write(
        "services.yaml",
        &format!(
            "{}---\n{}",
            web_service("  clusterIP: 10.96.0.11\n  ports: [{port: 0}]\n"),
            api("10.96.0.12")
        ),
    );
    let second = scratch.load(&first.snapshot);
    let web = service_key("default", "web");
    let api_key = service_key("default", "api");
    let error = assert_single_error(
        &second,
        &file,
        Some("Service default/web"),
        Some("spec.ports[0].port"),
        &["keeping its last good version"],
    );
    assert!(error.message.contains("got 0"), "{error}");
    assert_eq!(second.kept, 1);
    assert_eq!(
        second.snapshot.services[&web].object,
        first.snapshot.services[&web].object
    );
    assert_eq!(
        cluster_ip(&second.snapshot, &api_key).as_deref(),
        Some("10.96.0.12")
    );

    // Still broken on the next read: the same last good version, not nothing.
    let third = scratch.load(&second.snapshot);
    assert_eq!(third.kept, 1);
    assert_eq!(
        cluster_ip(&third.snapshot, &web).as_deref(),
        Some("10.96.0.1")
    );

    // Without a previous version there is nothing to keep.
    let fresh = scratch.load(&Snapshot::default());
    assert_eq!(fresh.kept, 0);
    assert_eq!(keys(&fresh.snapshot.services), vec![api_key.clone()]);
    assert!(!fresh.errors[0].message.contains("keeping"));

    // Fixed: the new version replaces the kept one.
    scratch.write(
        "services.yaml",
        &format!(
            "{}---\n{}",
            web_service("  clusterIP: 10.96.0.11\n  ports: [{port: 80}]\n"),
            api("10.96.0.12")
        ),
    );
    let fixed = scratch.load(&third.snapshot);
    assert!(fixed.errors.is_empty(), "{:#?}", fixed.errors);
    assert_eq!(fixed.kept, 0);
    assert_eq!(
        cluster_ip(&fixed.snapshot, &web).as_deref(),
        Some("10.96.0.11")
    );
}

#[test]
fn a_file_that_is_not_valid_yaml_keeps_every_object_last_loaded_from_it() {
    let scratch = Scratch::new("keep-file");
    let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
                 labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n- \
                 addresses: [10.1.0.1]\n";
    let broken_file = scratch.write(
        "web.yaml",
        &format!(
            "{}---\n{slice}",
            web_service("  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n")
        ),
    );
    let other = |cluster_ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: other\nspec:\n  clusterIP: \
             {cluster_ip}\n  ports: [{{port: 80}}]\n"
        )
    };
    scratch.write("other.yaml", &other("10.96.0.5"));
    let first = scratch.load(&Snapshot::default());
    assert!(first.errors.is_empty(), "{:#?}", first.errors);
    assert_eq!(first.snapshot.services.len(), 2);

    // The first document changes validly, the second is cut short: neither is trusted.
    scratch.write(
        "web.yaml",
        &format!(
            "{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \
             web-1\naddressType: IPv4\nendpoints: [{{addresses: [10.1.0.1]\n",
            web_service("  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n")
        ),
    );
    scratch.write("other.yaml", &other("10.96.0.6"));
    let second = scratch.load(&first.snapshot);
    let error = assert_single_error(&second, &broken_file, None, None, &["not valid YAML"]);
    assert!(
        error
            .message
            .contains("keeping the 2 object(s) last loaded from it"),
        "{error}"
    );
    assert_eq!(second.kept, 2);
    let web = service_key("default", "web");
    assert_eq!(
        second.snapshot.services[&web].object,
        first.snapshot.services[&web].object
    );
    let web_slice = slice_key("default", "web-1");
    assert_eq!(
        second.snapshot.slices[&web_slice].object,
        first.snapshot.slices[&web_slice].object
    );
    assert_eq!(
        cluster_ip(&second.snapshot, &service_key("default", "other")).as_deref(),
        Some("10.96.0.6")
    );

    // A document giving a key twice is not valid YAML either, and the file's other documents
    // are not trusted (the first is broken in a way of its own: no error from it is shown).
    scratch.write(
        "web.yaml",
        &format!(
            "{}---
{slice}addressType: IPv4
",
            web_service(
                "  clusterIP: 10.96.0.9
  ports: [{port: 0}]
"
            )
        ),
    );
    let repeated = scratch.load(&first.snapshot);
    let error = assert_single_error(&repeated, &broken_file, None, None, &["not valid YAML"]);
    assert!(
        error
            .message
            .contains("keeping the 2 object(s) last loaded from it"),
        "{error}"
    );
    assert_eq!(repeated.kept, 2);
    assert_eq!(
        repeated.snapshot.services[&web].object,
        first.snapshot.services[&web].object
    );

    // A valid file that no longer holds an object drops it: only broken files keep objects.
    scratch.write(
        "web.yaml",
        &web_service("  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n"),
    );
    let third = scratch.load(&second.snapshot);
    assert!(third.errors.is_empty(), "{:#?}", third.errors);
    assert!(third.snapshot.slices.is_empty());
    assert_eq!(
        cluster_ip(&third.snapshot, &web).as_deref(),
        Some("10.96.0.9")
    );
}

#[test]
fn a_file_that_is_not_text_keeps_every_object_last_loaded_from_it() {
    let scratch = Scratch::new("keep-unreadable");
    let file = scratch.write(
        "web.yaml",
        &web_service("  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n"),
    );
    let first = scratch.load(&Snapshot::default());
    assert!(first.errors.is_empty(), "{:#?}", first.errors);
    // Half-written by an editor, or a binary dropped in by mistake.
    fs::write(&file, b"apiVersion: v1\nkind: Service\n\xff\xfe\n").unwrap();
    let second = scratch.load(&first.snapshot);
    let error = assert_single_error(&second, &file, None, None, &["cannot read"]);
    assert!(error.message.contains("keeping the 1 object(s)"), "{error}");
    assert_eq!(second.kept, 1);
    assert_eq!(
        cluster_ip(&second.snapshot, &service_key("default", "web")).as_deref(),
        Some("10.96.0.1")
    );
}

#[test]
fn the_seeds_parse_with_their_fields() {
    let dir = fixture("seeds");
    let load = load_dir(&dir, &Snapshot::default()).unwrap();
    let seeds: Vec<_> = load
        .errors
        .iter()
        .filter(|error| error.file.starts_with(&dir))
        .collect();
    assert!(seeds.is_empty(), "{seeds:#?}");

    let my_service = &load.snapshot.services[&service_key("default", "my-service")];
    assert_eq!(my_service.file, dir.join("my-service.yaml"));
    assert_eq!(my_service.object.metadata.namespace, None);
    let spec = my_service.object.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.cluster_ip, None);
    assert_eq!(
        spec.selector,
        Some(BTreeMap::from([("app".to_owned(), "MyApp".to_owned())]))
    );
    let ports: Vec<_> = spec
        .ports
        .unwrap()
        .into_iter()
        .map(|port| {
            (
                port.name.unwrap(),
                port.protocol.unwrap(),
                port.port,
                port.target_port.unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        vec![
            (
                "http".to_owned(),
                "TCP".to_owned(),
                80,
                IntOrString::Int(9080)
            ),
            (
                "https".to_owned(),
                "TCP".to_owned(),
                443,
                IntOrString::Int(9433)
            ),
        ]
    );

    let pgadmin = &load.snapshot.services[&service_key("postgresql", "pgadmin")];
    assert_eq!(pgadmin.file, dir.join("pgadmin.yaml"));
    assert_eq!(
        pgadmin.object.metadata.labels,
        Some(BTreeMap::from([("app".to_owned(), "pgadmin".to_owned())]))
    );
    let spec = pgadmin.object.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.cluster_ip, None);
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("padmin-port"));
    assert_eq!(ports[0].port, 80);
    assert_eq!(ports[0].node_port, Some(30165));
    assert_eq!(ports[0].protocol, None);
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(80)));
}

// The tests below demonstrate library bugs: they fail today and are ignored so that the suite
// stays green. Run them with `--ignored`.

#[test]
fn an_unsupported_api_version_keeps_the_last_good_version() {
    let scratch = Scratch::new("keep-api-version");
    let good = web_service("  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n");
    scratch.write("web.yaml", &good);
    let first = scratch.load(&Snapshot::default());
    assert!(first.errors.is_empty(), "{:#?}", first.errors);
    scratch.write(
        "web.yaml",
        &good.replacen("apiVersion: v1", "apiVersion: v2", 1),
    );
    let second = scratch.load(&first.snapshot);
    assert_eq!(second.errors.len(), 1, "{:#?}", second.errors);
    assert_eq!(
        keys(&second.snapshot.services),
        vec![service_key("default", "web")]
    );
    assert_eq!(second.kept, 1);
}

#[test]
fn an_unsupported_api_version_error_names_the_object() {
    let (_scratch, file, load) = load_single(&web_service("  ports: [{port: 80}]\n").replacen(
        "apiVersion: v1",
        "apiVersion: v2",
        1,
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("apiVersion"),
        &["\"v2\""],
    );
}

#[test]
fn a_broken_duplicate_does_not_override_the_first_definition() {
    let scratch = Scratch::new("broken-duplicate");
    scratch.write(
        "web.yaml",
        &web_service("  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n"),
    );
    let first = scratch.load(&Snapshot::default());
    assert!(first.errors.is_empty(), "{:#?}", first.errors);
    scratch.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            web_service("  clusterIP: 10.96.0.2\n  ports: [{port: 80}]\n"),
            web_service("  clusterIP: 10.96.0.3\n  ports: [{port: 0}]\n"),
        ),
    );
    let second = scratch.load(&first.snapshot);
    assert_eq!(second.errors.len(), 1, "{:#?}", second.errors);
    // "The first definition is used": the valid 10.96.0.2, not the previous 10.96.0.1.
    assert_eq!(
        cluster_ip(&second.snapshot, &service_key("default", "web")).as_deref(),
        Some("10.96.0.2")
    );
    assert_eq!(second.kept, 0);
}

#[test]
fn yaml_merge_keys_are_applied_like_kubectl_does() {
    let (_scratch, _file, load) = load_single(&web_service(
        "  ports:\n  - &dns {name: dns, port: 53, protocol: UDP}\n  - <<: *dns\n    name: alt\n    \
         port: 5353\n",
    ));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    let spec = load.snapshot.services[&service_key("default", "web")]
        .object
        .spec
        .clone()
        .unwrap();
    let ports = spec.ports.unwrap();
    assert_eq!(ports[1].name.as_deref(), Some("alt"));
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
}

#[test]
fn an_unknown_field_is_reported_and_the_rest_of_the_object_applies() {
    // `clusterIp` is a typo of `clusterIP`: kubectl's field validation would flag it.
    let (_scratch, file, load) = load_single(&web_service(
        "  clusterIp: 10.96.0.9\n  ports: [{port: 80}]\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.clusterIp"),
        &["unknown field"],
    );
    let service = &load
        .snapshot
        .services
        .values()
        .next()
        .expect("applied")
        .object;
    assert_eq!(
        service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        None
    );
}

#[test]
fn typed_lists_as_the_api_returns_them_are_read() {
    // Items of a ServiceList carry neither apiVersion nor kind.
    let (_scratch, _file, load) = load_single(
        "apiVersion: v1
kind: ServiceList
items:
- metadata: {name: a, namespace: x}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- metadata: {name: b, namespace: x}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 81}]}
",
    );
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    let names: Vec<&str> = load
        .snapshot
        .services
        .keys()
        .map(|key| key.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn a_service_kind_of_another_api_group_is_not_ours() {
    let (_scratch, _file, load) = load_single(
        "apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello}
spec:
  template:
    spec:
      containers: [{image: example/hello}]
",
    );
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
    assert!(load.snapshot.services.is_empty());
}

#[test]
fn names_follow_the_api_server_formats() {
    for (spec_or_name, field) in [
        ("Web_1", "metadata.name"),
        ("1web", "metadata.name"),
        ("web-", "metadata.name"),
    ] {
        let yaml = web_service("  ports: [{port: 80}]\n")
            .replace("name: web", &format!("name: {spec_or_name}"));
        let (_scratch, file, load) = load_single(&yaml);
        assert_eq!(load.errors.len(), 1, "{spec_or_name}: {:#?}", load.errors);
        assert_eq!(
            load.errors[0].field.as_deref(),
            Some(field),
            "{spec_or_name}"
        );
        assert_eq!(load.errors[0].file, file);
        assert!(
            load.snapshot.services.is_empty(),
            "{spec_or_name} must be rejected"
        );
    }
    for (target, ok) in [
        ("http", true),
        ("8080", false),
        ("web--port", false),
        ("-http", false),
    ] {
        let (_scratch, _file, load) = load_single(&web_service(&format!(
            "  ports: [{{port: 80, targetPort: \"{target}\"}}]\n"
        )));
        assert_eq!(
            load.errors.is_empty(),
            ok,
            "targetPort {target}: {:#?}",
            load.errors
        );
        if !ok {
            assert_eq!(
                load.errors[0].field.as_deref(),
                Some("spec.ports[0].targetPort")
            );
        }
    }
}

#[test]
fn external_and_load_balancer_addresses_must_be_ip_addresses() {
    for (extra, field) in [
        (
            "  externalIPs: [198.51.100.7, example.com]\n",
            "spec.externalIPs[1]",
        ),
        (
            "status:\n  loadBalancer:\n    ingress: [{hostname: lb.example.com}, {ip: 192.0.2}]\n",
            "status.loadBalancer.ingress[1].ip",
        ),
    ] {
        let spec = "  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n";
        let yaml = if extra.starts_with("status") {
            format!("{}{extra}", web_service(spec))
        } else {
            web_service(&format!("{spec}{extra}"))
        };
        let (_scratch, file, load) = load_single(&yaml);
        assert_single_error(
            &load,
            &file,
            Some("Service default/web"),
            Some(field),
            &["is not an IP address"],
        );
    }
    // Hostnames, IPv6 and valid IPv4 addresses are accepted.
    let (_scratch, _file, load) = load_single(&format!(
        "{}status:\n  loadBalancer:\n    ingress: [{{hostname: lb.example.com}}, {{ip: \
         192.0.2.10}}, {{ip: \"2001:db8::1\"}}]\n",
        web_service(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  externalIPs: [198.51.100.7]\n  \
             ports: [{port: 80}]\n"
        )
    ));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
}

#[test]
fn session_affinity_and_traffic_policies_are_checked_like_the_api_server() {
    let cases = [
        (
            "  sessionAffinity: Sticky\n  ports:\n  - port: 80\n",
            "spec.sessionAffinity",
            "got \"Sticky\"",
        ),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n  ports:\n  - port: 80\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "between 1 and 86400, got 86401",
        ),
        (
            "  externalTrafficPolicy: Nearby\n  ports:\n  - port: 80\n",
            "spec.externalTrafficPolicy",
            "got \"Nearby\"",
        ),
        (
            "  internalTrafficPolicy: local\n  ports:\n  - port: 80\n",
            "spec.internalTrafficPolicy",
            "got \"local\"",
        ),
    ];
    for (spec, field, message) in cases {
        let (_scratch, file, load) = load_single(&web_service(spec));
        assert_single_error(
            &load,
            &file,
            Some("Service default/web"),
            Some(field),
            &[message],
        );
    }
    let (_scratch, _file, load) = load_single(&web_service(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}\n  \
         externalTrafficPolicy: Local\n  internalTrafficPolicy: Cluster\n  ports:\n  - port: 80\n",
    ));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
}

#[test]
fn load_balancer_source_ranges_must_be_ip_ranges() {
    let (_scratch, file, load) = load_single(&web_service(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/8, 10.0.0.0]\n  ports:\n  - port: 80\n",
    ));
    assert_single_error(
        &load,
        &file,
        Some("Service default/web"),
        Some("spec.loadBalancerSourceRanges[1]"),
        &["\"10.0.0.0\" is not an IP range"],
    );
    let (_scratch, _file, load) = load_single(&web_service(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/8, '2001:db8::/32']\n  ports:\n  - port: 80\n",
    ));
    assert!(load.errors.is_empty(), "{:#?}", load.errors);
}
