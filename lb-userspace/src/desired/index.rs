//! The desired state kept up to date one Service at a time, for the Kubernetes source: a watch
//! event recomputes only the Services it touches ([`service_part`], the function
//! [`desired_state`] is built from), and hands the reconciler only the frontends whose owner or
//! contents may have changed ([`Changes`]). On a cluster of 10,000 Services one endpoint change
//! costs one Service's work, not the cluster's.
//!
//! Two Services may claim one frontend (an externalIP or load balancer IP on the same port);
//! as in [`desired_state`], the first by namespace/name holds it and the others get a note. The
//! index keeps every claimant of every frontend, so when the holder lets go the next one takes
//! over.
//!
//! [`desired_state`]: super::desired_state

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::service::ServiceKey;

use super::{
    DesiredState, Frontend, Note, ServiceId, ServicePart, conflict_note, service_part,
    slice_service,
};
use crate::{manifests::DEFAULT_NAMESPACE, node::NodeConfig};

/// An object's namespace and name.
pub type ObjectKey = (String, String);

/// The key of the object `metadata` describes; the default namespace when none is set, as for
/// [`ServiceId`]s, so that a Service and its slices meet.
pub fn object_key(metadata: &ObjectMeta) -> ObjectKey {
    (
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// What a batch of object changes does to the desired state: the frontends that may differ from
/// what was handed over before (`None`: the frontend is gone), and the ClusterIPs that appeared
/// (`true`) or disappeared (`false`). Frontends listed may also be unchanged; the reconciler
/// then writes nothing for them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub frontends: BTreeMap<ServiceKey, Option<Frontend>>,
    pub cluster_ips: BTreeMap<Ipv4Addr, bool>,
    /// The Services whose notes changed, with their notes now (empty: none any more).
    pub notes: BTreeMap<ServiceId, Vec<Note>>,
}

impl Changes {
    /// Whether nothing may have changed.
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.cluster_ips.is_empty() && self.notes.is_empty()
    }

    /// Applies these changes to a full desired state (what the reconciler's maps then hold).
    pub fn apply_to(&self, desired: &mut DesiredState) {
        for (key, frontend) in &self.frontends {
            match frontend {
                Some(frontend) => {
                    desired.frontends.insert(*key, frontend.clone());
                }
                None => {
                    desired.frontends.remove(key);
                }
            }
        }
        for (addr, present) in &self.cluster_ips {
            if *present {
                desired.cluster_ips.insert(*addr);
            } else {
                desired.cluster_ips.remove(addr);
            }
        }
    }
}

/// The Services and EndpointSlices of the cluster, and what each Service asks for.
#[derive(Debug, Default)]
pub struct Index {
    node: NodeConfig,
    services: BTreeMap<ServiceId, Service>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// The slices of each Service (by its `kubernetes.io/service-name` label).
    slices_of: BTreeMap<ServiceId, BTreeSet<ObjectKey>>,
    /// What each Service asks for, as last computed.
    parts: BTreeMap<ServiceId, ServicePart>,
    /// Every Service claiming each frontend; the first holds it.
    claims: BTreeMap<ServiceKey, BTreeSet<ServiceId>>,
    /// How many Services hold each ClusterIP.
    cluster_ips: BTreeMap<Ipv4Addr, usize>,
    /// The notes last reported for each Service.
    notes: BTreeMap<ServiceId, Vec<Note>>,
    /// Services to recompute at the next [`Index::flush`].
    dirty: BTreeSet<ServiceId>,
}

impl Index {
    pub fn new(node: NodeConfig) -> Self {
        Self {
            node,
            ..Self::default()
        }
    }

    /// The node the frontends are computed for.
    pub fn node(&self) -> &NodeConfig {
        &self.node
    }

    /// Every Service's identity.
    pub fn service_ids(&self) -> impl Iterator<Item = &ServiceId> {
        self.services.keys()
    }

    /// Every EndpointSlice's key.
    pub fn slice_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.slices.keys()
    }

    /// Every Service and every EndpointSlice.
    pub fn objects(
        &self,
    ) -> (
        impl Iterator<Item = &Service>,
        impl Iterator<Item = &EndpointSlice>,
    ) {
        (self.services.values(), self.slices.values())
    }

    /// Sets (`Some`) or removes (`None`) the Service `id`. Returns whether it changed.
    pub fn set_service(&mut self, id: ServiceId, service: Option<Service>) -> bool {
        if self.services.get(&id) == service.as_ref() {
            return false;
        }
        match service {
            Some(service) => self.services.insert(id.clone(), service),
            None => self.services.remove(&id),
        };
        self.dirty.insert(id);
        true
    }

    /// Sets (`Some`) or removes (`None`) the EndpointSlice `key`. Returns whether it changed.
    pub fn set_slice(&mut self, key: ObjectKey, slice: Option<EndpointSlice>) -> bool {
        let old = self.slices.get(&key);
        if old == slice.as_ref() {
            return false;
        }
        if let Some(service) = old.and_then(slice_service) {
            if let Some(keys) = self.slices_of.get_mut(&service) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
        match slice {
            Some(slice) => {
                if let Some(service) = slice_service(&slice) {
                    self.slices_of
                        .entry(service.clone())
                        .or_default()
                        .insert(key.clone());
                    self.dirty.insert(service);
                }
                self.slices.insert(key, slice);
            }
            None => {
                self.slices.remove(&key);
            }
        }
        true
    }

    /// Sets the node (its NodePort addresses, name, ...). Returns whether it changed; every
    /// Service is then recomputed.
    pub fn set_node(&mut self, node: NodeConfig) -> bool {
        if node == self.node {
            return false;
        }
        self.node = node;
        self.dirty.extend(self.services.keys().cloned());
        true
    }

    /// Recomputes the Services changed since the last flush; returns what that changes.
    pub fn flush(&mut self) -> Changes {
        let mut changes = Changes::default();
        let mut affected_keys = BTreeSet::new();
        let mut renote = BTreeSet::new();
        for id in std::mem::take(&mut self.dirty) {
            let part = self.services.get(&id).map(|service| {
                let slices: Vec<&EndpointSlice> = self
                    .slices_of
                    .get(&id)
                    .into_iter()
                    .flatten()
                    .filter_map(|key| self.slices.get(key))
                    .collect();
                service_part(service, &slices, &self.node)
            });
            if self.parts.get(&id) == part.as_ref() {
                continue;
            }
            renote.insert(id.clone());
            if let Some(old) = self.parts.remove(&id) {
                for frontend in &old.frontends {
                    let key = frontend.key();
                    affected_keys.insert(key);
                    if let Some(claimants) = self.claims.get_mut(&key) {
                        claimants.remove(&id);
                        if claimants.is_empty() {
                            self.claims.remove(&key);
                        }
                    }
                }
                for addr in &old.cluster_ips {
                    if let Some(count) = self.cluster_ips.get_mut(addr) {
                        *count -= 1;
                        if *count == 0 {
                            self.cluster_ips.remove(addr);
                            changes.cluster_ips.insert(*addr, false);
                        }
                    }
                }
            }
            if let Some(new) = part {
                for frontend in &new.frontends {
                    let key = frontend.key();
                    affected_keys.insert(key);
                    self.claims.entry(key).or_default().insert(id.clone());
                }
                for addr in &new.cluster_ips {
                    let count = self.cluster_ips.entry(*addr).or_default();
                    *count += 1;
                    if *count == 1 {
                        // Gone and back within the batch: no change at all.
                        if changes.cluster_ips.remove(addr).is_none() {
                            changes.cluster_ips.insert(*addr, true);
                        }
                    }
                }
                self.parts.insert(id, new);
            }
        }
        for key in affected_keys {
            let holder = self.holder(&key);
            if let Some(claimants) = self.claims.get(&key) {
                renote.extend(claimants.iter().cloned());
            }
            changes.frontends.insert(key, holder.cloned());
        }
        for id in renote {
            let notes = self.notes_of(&id);
            if self.notes.get(&id).unwrap_or(&Vec::new()) != &notes {
                if notes.is_empty() {
                    self.notes.remove(&id);
                } else {
                    self.notes.insert(id.clone(), notes.clone());
                }
                changes.notes.insert(id, notes);
            }
        }
        changes
    }

    /// The frontend at `key` as the maps should hold it: the first claimant's.
    fn holder(&self, key: &ServiceKey) -> Option<&Frontend> {
        let first = self.claims.get(key)?.first()?;
        self.parts.get(first)?.frontend(key)
    }

    /// The notes of Service `id`: its own, and one for each frontend another Service holds.
    fn notes_of(&self, id: &ServiceId) -> Vec<Note> {
        let Some(part) = self.parts.get(id) else {
            return Vec::new();
        };
        let mut notes = part.notes.clone();
        for frontend in &part.frontends {
            if let Some(holder) = self.holder(&frontend.key())
                && (holder.namespace.as_str(), holder.name.as_str())
                    != (id.0.as_str(), id.1.as_str())
            {
                notes.push(conflict_note(frontend, holder));
            }
        }
        notes
    }

    /// The whole desired state as of the last flush.
    pub fn desired(&self) -> DesiredState {
        let mut desired = DesiredState::default();
        for key in self.claims.keys() {
            if let Some(frontend) = self.holder(key) {
                desired.frontends.insert(*key, frontend.clone());
            }
        }
        desired.cluster_ips = self.cluster_ips.keys().copied().collect();
        desired
    }

    /// Every note as of the last flush, in the order [`desired_state`](super::desired_state)
    /// gives them.
    pub fn notes(&self) -> Vec<Note> {
        self.parts.keys().flat_map(|id| self.notes_of(id)).collect()
    }
}
