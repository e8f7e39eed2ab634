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
#[derive(Clone, Debug)]
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

impl Snapshot {
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
/// Longest object name or namespace (an RFC 1123 label).
const MAX_NAME_LEN: usize = 63;
/// Longest port name (an IANA service name).
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

fn load_file(file: &Path, previous: &Snapshot, load: &mut Load) {
    let file_error = |message: String| ManifestError {
        file: file.to_owned(),
        object: None,
        field: None,
        message,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) => {
            let kept = load.snapshot.keep_file(previous, file);
            load.kept += kept;
            load.errors.push(file_error(format!(
                "cannot read: {error}{}",
                kept_note(kept)
            )));
            return;
        }
    };
    // Parse every document before using any: a syntax error anywhere makes the file's meaning
    // uncertain, so the whole file keeps its last good objects.
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        match Value::deserialize(document) {
            Ok(value) => documents.push(value),
            Err(error) => {
                let kept = load.snapshot.keep_file(previous, file);
                load.kept += kept;
                load.errors.push(file_error(format!(
                    "not valid YAML: {error}{}",
                    kept_note(kept)
                )));
                return;
            }
        }
    }
    for document in documents {
        load_document(file, document, previous, load);
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

fn load_document(file: &Path, document: Value, previous: &Snapshot, load: &mut Load) {
    if document.is_null() {
        return; // An empty document, e.g. after a trailing `---`.
    }
    let api_version = str_field(&document, &["apiVersion"]).unwrap_or_default();
    let kind_name = str_field(&document, &["kind"]).unwrap_or_default();
    let kind = match (api_version, kind_name) {
        ("v1", "List") => {
            if let Some(items) = document.get("items").and_then(Value::as_sequence) {
                for item in items.clone() {
                    load_document(file, item, previous, load);
                }
            }
            return;
        }
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        (_, "Service" | "EndpointSlice") => {
            load.errors.push(ManifestError {
                file: file.to_owned(),
                object: Some(kind_name.to_owned()),
                field: Some("apiVersion".to_owned()),
                message: format!("unsupported apiVersion {api_version:?} for {kind_name}"),
            });
            return;
        }
        // Deployments, Pods, Ingresses, ...: not ours, exactly as kube-proxy ignores them.
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
    let parsed = match kind {
        Kind::Service => parse_typed::<Service>(document).and_then(|service| {
            validate_service(&service).map(|()| Object::Service(Box::new(service)))
        }),
        Kind::EndpointSlice => parse_typed::<EndpointSlice>(document).and_then(|slice| {
            validate_slice(&slice).map(|()| Object::EndpointSlice(Box::new(slice)))
        }),
    };
    let object_label = if name.is_empty() {
        format!("{kind:?} (unnamed)")
    } else {
        key.to_string()
    };
    match parsed {
        Ok(_) if load.snapshot.contains(&key) => load.errors.push(ManifestError {
            file: file.to_owned(),
            object: Some(object_label),
            field: Some("metadata.name".to_owned()),
            message: "defined more than once; the first definition is used".to_owned(),
        }),
        Ok(object) => load.snapshot.insert(key, file, object),
        Err((field, message)) => {
            let kept = !name.is_empty() && load.snapshot.keep(previous, &key);
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

fn parse_typed<T: serde::de::DeserializeOwned>(document: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(document).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." {
            "(document)".to_owned()
        } else {
            path
        };
        (field, error.into_inner().to_string())
    })
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

fn check_name(field: &str, name: Option<&str>, max: usize) -> Result<(), FieldError> {
    match name {
        None | Some("") => Err(field_error(field, "is required")),
        Some(name) if name.len() > max => Err(field_error(
            field,
            format!("must be at most {max} characters, got {}", name.len()),
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
/// `spec.clusterIP` of a headless Service.
pub const CLUSTER_IP_NONE: &str = "None";

fn validate_service(service: &Service) -> Result<(), FieldError> {
    check_name(
        "metadata.name",
        service.metadata.name.as_deref(),
        MAX_NAME_LEN,
    )?;
    if let Some(namespace) = &service.metadata.namespace {
        check_name("metadata.namespace", Some(namespace), MAX_NAME_LEN)?;
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
            check_name(&field("name"), port.name.as_deref(), MAX_PORT_NAME_LEN)?;
        } else if let Some(name) = &port.name
            && name.len() > MAX_PORT_NAME_LEN
        {
            check_name(&field("name"), Some(name), MAX_PORT_NAME_LEN)?;
        }
        match &port.target_port {
            Some(IntOrString::Int(target)) => check_port(&field("targetPort"), *target)?,
            Some(IntOrString::String(target)) => {
                check_name(&field("targetPort"), Some(target), MAX_PORT_NAME_LEN)?
            }
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
    check_name("metadata.name", slice.metadata.name.as_deref(), usize::MAX)?;
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
