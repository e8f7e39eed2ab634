//! Standalone source: a directory of Kubernetes manifests, the same files `kubectl apply -f DIR`
//! takes (multi-document YAML or JSON, `v1 List`s included), read into the k8s-openapi types.
//!
//! Only Services and EndpointSlices matter to the load balancer; other kinds are skipped. Each
//! object is checked the way the API server would check the fields we use, and a failure is
//! reported with the file, the object and the field. A broken object keeps its last good
//! version (so its map entries stay as they were); a file that is not even valid YAML keeps every
//! object last loaded from it.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;
use serde_yaml_ng::Value;

use crate::node::Ipv4Cidr;

/// The kinds the load balancer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

/// Identity of an object: kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// An object and the file it came from.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sourced<T> {
    pub file: PathBuf,
    pub object: T,
}

/// Every valid object of the directory (or its last good version).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: BTreeMap<ObjectKey, Sourced<Service>>,
    pub slices: BTreeMap<ObjectKey, Sourced<EndpointSlice>>,
}

/// The on-disk form of a [`Snapshot`].
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedSnapshot {
    services: Vec<Sourced<Service>>,
    slices: Vec<Sourced<EndpointSlice>>,
}

fn object_key(
    kind: Kind,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name: metadata.name.clone().unwrap_or_default(),
    }
}

impl Snapshot {
    /// The snapshot as JSON, to be kept across agent restarts: the last good version of an
    /// object that is broken when the agent starts comes from there.
    pub fn to_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string(&SavedSnapshot {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
        })?)
    }

    /// Reads back what [`Snapshot::to_json`] wrote.
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        let saved: SavedSnapshot = serde_json::from_str(json)?;
        let mut snapshot = Snapshot::default();
        for sourced in saved.services {
            let key = object_key(Kind::Service, &sourced.object.metadata);
            snapshot.services.insert(key, sourced);
        }
        for sourced in saved.slices {
            let key = object_key(Kind::EndpointSlice, &sourced.object.metadata);
            snapshot.slices.insert(key, sourced);
        }
        Ok(snapshot)
    }

    fn insert(&mut self, key: ObjectKey, file: &Path, object: Object) {
        let file = file.to_owned();
        match object {
            Object::Service(object) => {
                self.services.insert(
                    key,
                    Sourced {
                        file,
                        object: *object,
                    },
                );
            }
            Object::EndpointSlice(object) => {
                self.slices.insert(
                    key,
                    Sourced {
                        file,
                        object: *object,
                    },
                );
            }
        }
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.services.contains_key(key) || self.slices.contains_key(key)
    }

    /// Copies `key`'s object from `previous`, if it had one; returns whether it did.
    fn keep(&mut self, previous: &Snapshot, key: &ObjectKey) -> bool {
        if let Some(kept) = previous.services.get(key) {
            self.services.insert(key.clone(), kept.clone());
            true
        } else if let Some(kept) = previous.slices.get(key) {
            self.slices.insert(key.clone(), kept.clone());
            true
        } else {
            false
        }
    }

    /// Copies every object `previous` loaded from `file`; returns how many.
    fn keep_file(&mut self, previous: &Snapshot, file: &Path) -> usize {
        let keys: Vec<ObjectKey> = previous
            .services
            .iter()
            .filter(|(_, sourced)| sourced.file == file)
            .map(|(key, _)| key.clone())
            .chain(
                previous
                    .slices
                    .iter()
                    .filter(|(_, sourced)| sourced.file == file)
                    .map(|(key, _)| key.clone()),
            )
            .collect();
        keys.iter().filter(|key| self.keep(previous, key)).count()
    }
}

/// A problem in one manifest, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Service default/web`, when the object's identity could be read.
    pub object: Option<String>,
    /// The field path, e.g. `spec.ports[1].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// The result of reading the directory once.
#[derive(Debug, Default)]
pub struct Load {
    pub snapshot: Snapshot,
    pub errors: Vec<ManifestError>,
    /// Objects carried over from the previous snapshot because their new version is broken.
    pub kept: usize,
}

/// A parsed object on its way into the snapshot (boxed: the two types differ a lot in size).
enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// File extensions `kubectl apply -f DIR` reads.
const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];
/// Namespace of objects that name none, as `kubectl apply` assumes.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest object name, namespace or Service port name (a DNS label), as `LB_SVC_INFO` stores it.
const MAX_NAME_LEN: usize = lb_common::service::MAX_LABEL_LEN;
/// Longest named container port a targetPort may refer to (an IANA service name).
const MAX_PORT_NAME_LEN: usize = 15;

/// The manifest files of `dir`, sorted; not recursive, like `kubectl apply -f DIR`.
pub fn manifest_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("reading the directory {}", dir.display()))?
    {
        let path = entry?.path();
        let wanted = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| MANIFEST_EXTENSIONS.contains(&ext));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest of `dir`. `previous` supplies the last good version of objects that are
/// now broken. Fails only when the directory itself cannot be read.
pub fn load_dir(dir: &Path, previous: &Snapshot) -> anyhow::Result<Load> {
    let mut load = Load::default();
    for file in manifest_files(dir)? {
        load_file(&file, previous, &mut load);
    }
    Ok(load)
}

/// Keeps every object `previous` loaded from `file`, which cannot be trusted as a whole, and
/// says why (`problem`) and how many objects were kept.
fn keep_whole_file(file: &Path, problem: String, previous: &Snapshot, load: &mut Load) {
    let kept = load.snapshot.keep_file(previous, file);
    load.kept += kept;
    load.errors.push(ManifestError {
        file: file.to_owned(),
        object: None,
        field: None,
        message: format!("{problem}{}", kept_note(kept)),
    });
}

fn load_file(file: &Path, previous: &Snapshot, load: &mut Load) {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) => {
            keep_whole_file(file, format!("cannot read: {error}"), previous, load);
            return;
        }
    };
    // Check every document before using any: a syntax error anywhere makes the file's meaning
    // uncertain, so the whole file keeps its last good objects. The check builds nothing; the
    // second pass then holds one document's tree at a time, not the whole file's (a file of
    // 10,000 Services would otherwise hold about 90 MB of YAML trees at once).
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        if let Err(error) = serde::de::IgnoredAny::deserialize(document) {
            keep_whole_file(file, format!("not valid YAML: {error}"), previous, load);
            return;
        }
    }
    let (errors_before, kept_before) = (load.errors.len(), load.kept);
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        match Value::deserialize(document) {
            Ok(value) => load_document(file, value, previous, load),
            Err(error) => {
                // The tree builder rejected what the check accepted (the check catches every
                // case the tests know, repeated keys included): undo what the file's earlier
                // documents did, and keep the file as above.
                load.snapshot
                    .services
                    .retain(|_, sourced| sourced.file != file);
                load.snapshot
                    .slices
                    .retain(|_, sourced| sourced.file != file);
                load.errors.truncate(errors_before);
                load.kept = kept_before;
                keep_whole_file(file, format!("not valid YAML: {error}"), previous, load);
                return;
            }
        }
    }
}

fn kept_note(kept: usize) -> String {
    if kept == 0 {
        String::new()
    } else {
        format!("; keeping the {kept} object(s) last loaded from it")
    }
}

fn str_field<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut current = value;
    for key in path {
        current = current.get(*key)?;
    }
    current.as_str()
}

fn load_document(file: &Path, mut document: Value, previous: &Snapshot, load: &mut Load) {
    if document.is_null() {
        return; // An empty document, e.g. after a trailing `---`.
    }
    // `<<: *anchor` merge keys, which kubectl honours.
    if let Err(error) = document.apply_merge() {
        load.errors.push(ManifestError {
            file: file.to_owned(),
            object: None,
            field: None,
            message: format!("invalid YAML merge key: {error}"),
        });
        return;
    }
    let api_version = str_field(&document, &["apiVersion"])
        .unwrap_or_default()
        .to_owned();
    let kind_name = str_field(&document, &["kind"])
        .unwrap_or_default()
        .to_owned();
    // `v1 List` (kubectl get -o yaml) and typed lists (`ServiceList`, as the API returns them,
    // whose items carry no apiVersion or kind of their own).
    if let Some(item_kind) = kind_name.strip_suffix("List") {
        if let Some(items) = document.get("items").and_then(Value::as_sequence) {
            for item in items.clone() {
                let mut item = item;
                if let Value::Mapping(fields) = &mut item
                    && !item_kind.is_empty()
                {
                    for (key, value) in [
                        ("apiVersion", &api_version),
                        ("kind", &item_kind.to_owned()),
                    ] {
                        fields
                            .entry(Value::from(key))
                            .or_insert_with(|| Value::from(value.as_str()));
                    }
                }
                load_document(file, item, previous, load);
            }
        }
        return;
    }
    let (group, _version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let kind = match (kind_name.as_str(), group) {
        ("Service", "") => Kind::Service,
        ("EndpointSlice", "discovery.k8s.io") => Kind::EndpointSlice,
        // Deployments, Pods, Ingresses, Knative's serving.knative.dev Service, ...: not ours,
        // exactly as kube-proxy ignores them.
        _ => return,
    };
    let name = str_field(&document, &["metadata", "name"])
        .unwrap_or_default()
        .to_owned();
    let namespace = str_field(&document, &["metadata", "namespace"])
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned();
    let key = ObjectKey {
        kind,
        namespace,
        name: name.clone(),
    };
    let object_label = if name.is_empty() {
        format!("{kind:?} (unnamed)")
    } else {
        key.to_string()
    };
    let supported = match kind {
        Kind::Service => api_version == "v1",
        Kind::EndpointSlice => api_version == "discovery.k8s.io/v1",
    };
    let mut unknown_fields = Vec::new();
    let parsed = if !supported {
        Err(field_error(
            "apiVersion",
            format!("unsupported apiVersion {api_version:?} for {kind_name}"),
        ))
    } else {
        match kind {
            Kind::Service => {
                parse_typed::<Service>(document, &mut unknown_fields).and_then(|service| {
                    validate_service(&service).map(|()| Object::Service(Box::new(service)))
                })
            }
            Kind::EndpointSlice => parse_typed::<EndpointSlice>(document, &mut unknown_fields)
                .and_then(|slice| {
                    validate_slice(&slice).map(|()| Object::EndpointSlice(Box::new(slice)))
                }),
        }
    };
    let already_defined = load.snapshot.contains(&key);
    match parsed {
        Ok(_) if already_defined => load.errors.push(ManifestError {
            file: file.to_owned(),
            object: Some(object_label),
            field: Some("metadata.name".to_owned()),
            message: "defined more than once; the first definition is used".to_owned(),
        }),
        Ok(object) => {
            // Like kubectl's field validation: almost always a typo (`clusterIp`), which would
            // otherwise silently leave the intended field unset. The rest of the object applies.
            for field in unknown_fields {
                load.errors.push(ManifestError {
                    file: file.to_owned(),
                    object: Some(object_label.clone()),
                    field: Some(field),
                    message: "unknown field, ignored".to_owned(),
                });
            }
            load.snapshot.insert(key, file, object);
        }
        Err((field, message)) => {
            // A broken duplicate must not displace the valid first definition.
            let kept = !name.is_empty() && !already_defined && load.snapshot.keep(previous, &key);
            if kept {
                load.kept += 1;
            }
            load.errors.push(ManifestError {
                file: file.to_owned(),
                object: Some(object_label),
                field: Some(field),
                message: if kept {
                    format!("{message}; keeping its last good version")
                } else {
                    message
                },
            });
        }
    }
}

type FieldError = (String, String);

fn parse_typed<T: serde::de::DeserializeOwned>(
    document: Value,
    unknown_fields: &mut Vec<String>,
) -> Result<T, FieldError> {
    let mut record = |path: serde_ignored::Path<'_>| unknown_fields.push(field_path(&path));
    let tracked = serde_ignored::Deserializer::new(document, &mut record);
    serde_path_to_error::deserialize(tracked).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." {
            "(document)".to_owned()
        } else {
            path
        };
        (field, error.into_inner().to_string())
    })
}

/// A field path as `serde_path_to_error` writes it (`spec.ports[0].name`), so every error names
/// fields the same way.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

/// The API server's name formats.
#[derive(Clone, Copy)]
enum NameFormat {
    /// RFC 1035 label (Service names): lowercase alphanumerics and '-', starting with a letter.
    Dns1035Label,
    /// RFC 1123 label (namespaces): lowercase alphanumerics and '-'.
    Dns1123Label,
    /// RFC 1123 subdomain (most object names): labels joined by '.', at most 253 characters.
    Dns1123Subdomain,
    /// IANA service name (port names): at most 15 lowercase alphanumerics and '-', with a
    /// letter, no leading, trailing or double '-'.
    IanaServiceName,
}

impl NameFormat {
    const fn max_len(self) -> usize {
        match self {
            NameFormat::Dns1035Label | NameFormat::Dns1123Label => MAX_NAME_LEN,
            NameFormat::Dns1123Subdomain => MAX_SUBDOMAIN_LEN,
            NameFormat::IanaServiceName => MAX_PORT_NAME_LEN,
        }
    }

    fn valid(self, name: &str) -> bool {
        let label = |label: &str| {
            !label.is_empty()
                && label.len() <= MAX_NAME_LEN
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        match self {
            NameFormat::Dns1035Label => {
                label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
            }
            NameFormat::Dns1123Label => label(name),
            NameFormat::Dns1123Subdomain => name.split('.').all(label),
            NameFormat::IanaServiceName => {
                label(name) && !name.contains("--") && name.bytes().any(|b| b.is_ascii_lowercase())
            }
        }
    }

    const fn describe(self) -> &'static str {
        match self {
            NameFormat::Dns1035Label => {
                "must be lowercase letters, digits and '-', start with a letter and end with a \
                 letter or digit (RFC 1035 label)"
            }
            NameFormat::Dns1123Label => {
                "must be lowercase letters, digits and '-', and start and end with a letter or \
                 digit (RFC 1123 label)"
            }
            NameFormat::Dns1123Subdomain => {
                "must be lowercase RFC 1123 labels separated by '.' (RFC 1123 subdomain)"
            }
            NameFormat::IanaServiceName => {
                "must be lowercase letters, digits and '-' with at least one letter, no leading, \
                 trailing or doubled '-' (IANA service name)"
            }
        }
    }
}

/// Longest RFC 1123 subdomain.
const MAX_SUBDOMAIN_LEN: usize = 253;

fn check_name(field: &str, name: Option<&str>, format: NameFormat) -> Result<(), FieldError> {
    match name {
        None | Some("") => Err(field_error(field, "is required")),
        Some(name) if name.len() > format.max_len() => Err(field_error(
            field,
            format!(
                "must be at most {} characters, got {}",
                format.max_len(),
                name.len()
            ),
        )),
        Some(name) if !format.valid(name) => Err(field_error(
            field,
            format!("{name:?} {}", format.describe()),
        )),
        Some(_) => Ok(()),
    }
}

fn check_port(field: &str, port: i32) -> Result<(), FieldError> {
    if (1..=i32::from(u16::MAX)).contains(&port) {
        Ok(())
    } else {
        Err(field_error(
            field,
            format!("must be between 1 and 65535, got {port}"),
        ))
    }
}

/// Bits in an IPv6 address, the longest prefix of an IPv6 range.
const IPV6_BITS: u8 = 128;

/// An IPv4 or IPv6 prefix (`10.0.0.0/8`, `2001:db8::/32`), as the API server accepts in
/// `loadBalancerSourceRanges`.
fn check_cidr(field: &str, text: &str) -> Result<(), FieldError> {
    let valid = match text.split_once('/') {
        Some((addr, len)) if addr.contains(':') => {
            addr.parse::<std::net::Ipv6Addr>().is_ok()
                && len.parse::<u8>().is_ok_and(|len| len <= IPV6_BITS)
        }
        Some(_) => text.parse::<Ipv4Cidr>().is_ok(),
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(field_error(
            field,
            format!("{text:?} is not an IP range such as 10.0.0.0/8"),
        ))
    }
}

fn check_protocol(field: &str, protocol: Option<&str>) -> Result<(), FieldError> {
    match protocol {
        None | Some("TCP" | "UDP" | "SCTP") => Ok(()),
        Some(other) => Err(field_error(
            field,
            format!("must be TCP, UDP or SCTP, got {other:?}"),
        )),
    }
}

/// Service types the API server accepts.
const SERVICE_TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
/// `spec.sessionAffinity` values the API server accepts.
const SESSION_AFFINITIES: [&str; 2] = ["None", "ClientIP"];
/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy` values the API server accepts.
const TRAFFIC_POLICIES: [&str; 2] = ["Cluster", "Local"];
/// The longest session-affinity timeout the API server accepts: one day.
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;
/// `spec.clusterIP` of a headless Service.
pub const CLUSTER_IP_NONE: &str = "None";

fn validate_service(service: &Service) -> Result<(), FieldError> {
    check_name(
        "metadata.name",
        service.metadata.name.as_deref(),
        NameFormat::Dns1035Label,
    )?;
    if let Some(namespace) = &service.metadata.namespace {
        check_name(
            "metadata.namespace",
            Some(namespace),
            NameFormat::Dns1123Label,
        )?;
    }
    let spec = service
        .spec
        .as_ref()
        .ok_or_else(|| field_error("spec", "is required"))?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !SERVICE_TYPES.contains(&service_type) {
        return Err(field_error(
            "spec.type",
            format!("must be one of {SERVICE_TYPES:?}, got {service_type:?}"),
        ));
    }
    if service_type == "ExternalName" {
        return Ok(()); // A DNS alias: no address, no ports to program.
    }
    let check_ip = |field: String, ip: &str| -> Result<(), FieldError> {
        if ip.is_empty() || ip == CLUSTER_IP_NONE || ip.parse::<IpAddr>().is_ok() {
            Ok(())
        } else {
            Err(field_error(field, format!("{ip:?} is not an IP address")))
        }
    };
    if let Some(ip) = &spec.cluster_ip {
        check_ip("spec.clusterIP".to_owned(), ip)?;
    }
    for (index, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        check_ip(format!("spec.clusterIPs[{index}]"), ip)?;
    }
    let check_address = |field: String, ip: &str| -> Result<(), FieldError> {
        if ip.parse::<IpAddr>().is_ok() {
            Ok(())
        } else {
            Err(field_error(field, format!("{ip:?} is not an IP address")))
        }
    };
    for (index, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_address(format!("spec.externalIPs[{index}]"), ip)?;
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|status| status.ingress.as_ref());
    for (index, entry) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) {
            check_address(format!("status.loadBalancer.ingress[{index}].ip"), ip)?;
        }
    }
    let one_of = |field: &str, value: Option<&str>, allowed: &[&str]| match value {
        Some(value) if !allowed.contains(&value) => Err(field_error(
            field,
            format!("must be one of {allowed:?}, got {value:?}"),
        )),
        _ => Ok(()),
    };
    one_of(
        "spec.sessionAffinity",
        spec.session_affinity.as_deref(),
        &SESSION_AFFINITIES,
    )?;
    one_of(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        &TRAFFIC_POLICIES,
    )?;
    one_of(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        &TRAFFIC_POLICIES,
    )?;
    for (index, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        // The API server accepts (and kube-proxy trims) surrounding spaces.
        check_cidr(
            &format!("spec.loadBalancerSourceRanges[{index}]"),
            range.trim(),
        )?;
    }
    let affinity_timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|config| config.client_ip.as_ref())
        .and_then(|client_ip| client_ip.timeout_seconds);
    if let Some(seconds) = affinity_timeout
        && !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&seconds)
    {
        return Err(field_error(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("must be between 1 and {MAX_AFFINITY_TIMEOUT_S}, got {seconds}"),
        ));
    }
    if let (Some(ip), Some(first)) = (
        &spec.cluster_ip,
        spec.cluster_ips.as_ref().and_then(|ips| ips.first()),
    ) && !ip.is_empty()
        && ip != first
    {
        return Err(field_error(
            "spec.clusterIPs[0]",
            format!("must equal spec.clusterIP {ip:?}, got {first:?}"),
        ));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    for (index, port) in ports.iter().enumerate() {
        let field = |name: &str| format!("spec.ports[{index}].{name}");
        check_port(&field("port"), port.port)?;
        check_protocol(&field("protocol"), port.protocol.as_deref())?;
        if ports.len() > 1 {
            check_name(
                &field("name"),
                port.name.as_deref(),
                NameFormat::Dns1123Label,
            )?;
        } else if let Some(name) = port.name.as_deref().filter(|name| !name.is_empty()) {
            check_name(&field("name"), Some(name), NameFormat::Dns1123Label)?;
        }
        match &port.target_port {
            Some(IntOrString::Int(target)) => check_port(&field("targetPort"), *target)?,
            Some(IntOrString::String(target)) => check_name(
                &field("targetPort"),
                Some(target),
                NameFormat::IanaServiceName,
            )?,
            None => {}
        }
        if let Some(node_port) = port.node_port
            && node_port != 0
        {
            check_port(&field("nodePort"), node_port)?;
        }
        let same = |other: &&k8s_openapi::api::core::v1::ServicePort| {
            other.port == port.port
                && other.protocol.as_deref().unwrap_or("TCP")
                    == port.protocol.as_deref().unwrap_or("TCP")
        };
        if ports[..index].iter().any(|other| same(&other)) {
            return Err(field_error(
                format!("spec.ports[{index}]"),
                format!("duplicate port {} for the same protocol", port.port),
            ));
        }
        if let Some(name) = &port.name
            && ports[..index]
                .iter()
                .any(|other| other.name.as_deref() == Some(name))
        {
            return Err(field_error(
                field("name"),
                format!("duplicate name {name:?}"),
            ));
        }
    }
    Ok(())
}

/// Address types of EndpointSlices.
const ADDRESS_TYPES: [&str; 3] = ["IPv4", "IPv6", "FQDN"];

fn validate_slice(slice: &EndpointSlice) -> Result<(), FieldError> {
    check_name(
        "metadata.name",
        slice.metadata.name.as_deref(),
        NameFormat::Dns1123Subdomain,
    )?;
    if let Some(namespace) = &slice.metadata.namespace {
        check_name(
            "metadata.namespace",
            Some(namespace),
            NameFormat::Dns1123Label,
        )?;
    }
    if !ADDRESS_TYPES.contains(&slice.address_type.as_str()) {
        return Err(field_error(
            "addressType",
            format!(
                "must be one of {ADDRESS_TYPES:?}, got {:?}",
                slice.address_type
            ),
        ));
    }
    for (index, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        if endpoint.addresses.is_empty() {
            return Err(field_error(
                format!("endpoints[{index}].addresses"),
                "must hold at least one address",
            ));
        }
        if slice.address_type == "IPv4" {
            for (position, address) in endpoint.addresses.iter().enumerate() {
                if address.parse::<Ipv4Addr>().is_err() {
                    return Err(field_error(
                        format!("endpoints[{index}].addresses[{position}]"),
                        format!("{address:?} is not an IPv4 address"),
                    ));
                }
            }
        }
    }
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            check_port(&format!("ports[{index}].port"), number)?;
        }
        check_protocol(
            &format!("ports[{index}].protocol"),
            port.protocol.as_deref(),
        )?;
    }
    Ok(())
}
