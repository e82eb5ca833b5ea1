//! Properties of the object store over random sequences of writes on a few resources and
//! names, each checked against a model written here rather than against the store itself.

use super::*;
use crate::selectors::Selectors;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeMap;

const CASES: u32 = 1000;
const NAMES: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 2] = ["x", "y"];
const LABEL_KEYS: [&str; 3] = ["app", "tier", "zone"];
const LABEL_VALUES: [&str; 4] = ["web", "db", "", "x"];
const FINALIZERS: [&str; 2] = ["x.dev/a", "x.dev/b"];

/// Three resources with different facts: a custom resource (namespaced, status
/// subresource, generation on content), a config map (no generation) and a cluster-scoped
/// resource with generation on spec.
fn resources() -> [(ResourceKey, ResourceInfo); 3] {
    [
        (
            ResourceKey::new("multisite.dev", "v1alpha1", "replicas"),
            ResourceInfo::new("Replica", true)
                .with_status_subresource()
                .with_generation(GenerationPolicy::Content),
        ),
        (
            ResourceKey::new("", "v1", "configmaps"),
            ResourceInfo::new("ConfigMap", true),
        ),
        (
            ResourceKey::new("example.dev", "v1", "clusterthings"),
            ResourceInfo::new("ClusterThing", false)
                .with_status_subresource()
                .with_generation(GenerationPolicy::Spec),
        ),
    ]
}

fn resource(index: usize) -> ResourceKey {
    resources()[index].0.clone()
}

fn namespace_for(res: usize, ns: usize) -> &'static str {
    if res == 2 { "" } else { NAMESPACES[ns] }
}

fn model_key(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    model_key(
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or(""),
    )
}

fn version_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn finalizer_list(object: &Value) -> Vec<String> {
    object["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn is_deleting(object: &Value) -> bool {
    object["metadata"].get("deletionTimestamp").is_some()
}

#[derive(Clone, Copy, Debug)]
enum Version {
    Current,
    Stale,
    Absent,
}

#[derive(Clone, Debug)]
struct Target {
    res: usize,
    ns: usize,
    name: usize,
}

impl Target {
    fn namespace(&self) -> &'static str {
        namespace_for(self.res, self.ns)
    }

    fn name(&self) -> &'static str {
        NAMES[self.name]
    }

    fn key(&self) -> String {
        model_key(self.namespace(), self.name())
    }
}

#[derive(Clone, Debug)]
struct Content {
    labels: BTreeMap<String, String>,
    spec: u8,
    extra: u8,
    status: u8,
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        target: Target,
        content: Content,
        finalizers: Vec<String>,
        /// 0: no owner, 1: an owner that does not exist, else an existing object.
        owner: u8,
        pick: Index,
    },
    Update {
        target: Target,
        content: Content,
        finalizers: Option<Vec<String>>,
        version: Version,
    },
    UpdateStatus {
        target: Target,
        status: u8,
        version: Version,
    },
    Delete {
        target: Target,
        precondition: bool,
    },
    RemoveFinalizers {
        target: Target,
    },
    AddFinalizer {
        target: Target,
    },
    CollectGarbage,
}

fn arb_target() -> impl Strategy<Value = Target> {
    (0..3usize, 0..2usize, 0..3usize).prop_map(|(res, ns, name)| Target { res, ns, name })
}

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(LABEL_KEYS.to_vec()).prop_map(String::from),
        prop::sample::select(LABEL_VALUES.to_vec()).prop_map(String::from),
        0..3,
    )
}

fn arb_content() -> impl Strategy<Value = Content> {
    (arb_labels(), 0..3u8, 0..2u8, 0..2u8).prop_map(|(labels, spec, extra, status)| Content {
        labels,
        spec,
        extra,
        status,
    })
}

fn arb_finalizers() -> impl Strategy<Value = Vec<String>> {
    prop::sample::subsequence(FINALIZERS.to_vec(), 0..=2)
        .prop_map(|f| f.into_iter().map(String::from).collect())
}

fn arb_version() -> impl Strategy<Value = Version> {
    prop_oneof![
        4 => Just(Version::Current),
        1 => Just(Version::Stale),
        2 => Just(Version::Absent),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (arb_target(), arb_content(), arb_finalizers(), 0..4u8, any::<Index>()).prop_map(
            |(target, content, finalizers, owner, pick)| Op::Create {
                target,
                content,
                finalizers,
                owner,
                pick
            }
        ),
        4 => (
            arb_target(),
            arb_content(),
            prop::option::of(arb_finalizers()),
            arb_version()
        )
            .prop_map(|(target, content, finalizers, version)| Op::Update {
                target,
                content,
                finalizers,
                version
            }),
        2 => (arb_target(), 0..3u8, arb_version())
            .prop_map(|(target, status, version)| Op::UpdateStatus { target, status, version }),
        3 => (arb_target(), any::<bool>())
            .prop_map(|(target, precondition)| Op::Delete { target, precondition }),
        2 => arb_target().prop_map(|target| Op::RemoveFinalizers { target }),
        1 => arb_target().prop_map(|target| Op::AddFinalizer { target }),
        1 => Just(Op::CollectGarbage),
    ]
}

fn arb_ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(arb_op(), 0..max)
}

fn body(target: &Target, content: &Content) -> Value {
    let mut body = json!({
        "metadata": {"name": target.name(), "labels": content.labels},
        "spec": {"v": content.spec},
    });
    if content.extra > 0 {
        body["extra"] = json!(content.extra);
    }
    if content.status > 0 {
        body["status"] = json!({"s": content.status});
    }
    body
}

fn set_version(body: &mut Value, current: &Value, version: Version) {
    let meta = body["metadata"]
        .as_object_mut()
        .expect("bodies have metadata");
    match version {
        Version::Current => {
            meta.insert(
                "resourceVersion".into(),
                current["metadata"]["resourceVersion"].clone(),
            );
        }
        Version::Stale => {
            let stale = version_of(current).saturating_sub(1);
            meta.insert("resourceVersion".into(), json!(stale.to_string()));
        }
        Version::Absent => {
            meta.remove("resourceVersion");
        }
    }
}

/// The store under test, with one incremental watcher per resource whose events are logged.
struct Harness {
    store: Store,
    logs: Vec<Vec<WatchEvent>>,
    positions: Vec<u64>,
    clock: i64,
}

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(1_795_000_000 + second).expect("a valid time")
}

impl Harness {
    fn new(window: usize) -> Self {
        let mut store = Store::new(window);
        for (key, info) in resources() {
            store.register(key, info);
        }
        // A first write, so that watchers resume from a real version and never from "0".
        store
            .create(
                &resource(1),
                "z",
                json!({"metadata": {"name": "seed"}}),
                &WriteOptions::default(),
                at(0),
            )
            .expect("the seed is valid");
        let mut logs = Vec::new();
        let mut positions = Vec::new();
        for (key, _) in resources() {
            let batch = store
                .watch_from(&key, None, &Selectors::everything(), None)
                .expect("a served resource");
            logs.push(batch.events);
            positions.push(batch.resource_version);
        }
        Self {
            store,
            logs,
            positions,
            clock: 0,
        }
    }

    fn poll(&mut self) {
        for (i, (key, _)) in resources().iter().enumerate() {
            let batch = self
                .store
                .watch_from(
                    key,
                    None,
                    &Selectors::everything(),
                    Some(&self.positions[i].to_string()),
                )
                .expect("the watcher keeps up with the window");
            self.logs[i].extend(batch.events);
            self.positions[i] = batch.resource_version;
        }
    }

    fn current(&self, target: &Target) -> Option<Value> {
        self.store
            .get(&resource(target.res), target.namespace(), target.name())
            .ok()
    }

    fn all_objects(&self) -> BTreeMap<(usize, String), Value> {
        let mut all = BTreeMap::new();
        for (i, (key, _)) in resources().iter().enumerate() {
            for object in self
                .store
                .list(key, None, &ListOptions::default())
                .expect("a served resource")
                .items
            {
                all.insert((i, key_of(&object)), object);
            }
        }
        all
    }

    /// Applies an operation (refusals are part of the game); returns the object an update
    /// tried to strip of its finalizers, if any.
    fn apply(&mut self, op: &Op) -> Option<(usize, String)> {
        self.clock += 1;
        let now = at(self.clock);
        let write = WriteOptions::default();
        let mut stripped = None;
        match op {
            Op::Create {
                target,
                content,
                finalizers,
                owner,
                pick,
            } => {
                let mut b = body(target, content);
                b["metadata"]["finalizers"] = json!(finalizers);
                let uids: Vec<String> = self
                    .all_objects()
                    .values()
                    .map(|o| o["metadata"]["uid"].as_str().unwrap_or("").to_string())
                    .collect();
                let owner_uid = match owner {
                    0 => None,
                    1 => Some("no-such-owner".to_string()),
                    _ if uids.is_empty() => None,
                    _ => Some(uids[pick.index(uids.len())].clone()),
                };
                if let Some(uid) = owner_uid {
                    b["metadata"]["ownerReferences"] =
                        json!([{"apiVersion": "v1", "kind": "Owner", "name": "o", "uid": uid}]);
                }
                let _ =
                    self.store
                        .create(&resource(target.res), target.namespace(), b, &write, now);
            }
            Op::Update {
                target,
                content,
                finalizers,
                version,
            } => {
                let mut b = body(target, content);
                let current = self.current(target).unwrap_or_else(|| json!({}));
                let kept = current["metadata"]["finalizers"].clone();
                b["metadata"]["finalizers"] = match finalizers {
                    Some(list) => json!(list),
                    None => kept,
                };
                // Owners are kept, or every update would orphan its object.
                b["metadata"]["ownerReferences"] = current["metadata"]["ownerReferences"].clone();
                set_version(&mut b, &current, *version);
                if finalizer_list(&b).is_empty() {
                    stripped = Some((target.res, target.key()));
                }
                let _ = self.store.update(
                    &resource(target.res),
                    target.namespace(),
                    target.name(),
                    b,
                    &write,
                );
            }
            Op::UpdateStatus {
                target,
                status,
                version,
            } => {
                if let Some(mut b) = self.current(target) {
                    b["status"] = json!({"s": status});
                    let current = b.clone();
                    set_version(&mut b, &current, *version);
                    let _ = self.store.update_status(
                        &resource(target.res),
                        target.namespace(),
                        target.name(),
                        b,
                        &write,
                    );
                }
            }
            Op::Delete {
                target,
                precondition,
            } => {
                let mut options = DeleteOptions::default();
                if *precondition {
                    options.preconditions.resource_version = self.current(target).map(|o| {
                        o["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or("")
                            .to_string()
                    });
                }
                let _ = self.store.delete(
                    &resource(target.res),
                    target.namespace(),
                    target.name(),
                    &options,
                    now,
                );
            }
            Op::RemoveFinalizers { target } => {
                if let Some(mut b) = self.current(target) {
                    b["metadata"]["finalizers"] = json!([]);
                    stripped = Some((target.res, target.key()));
                    let _ = self.store.update(
                        &resource(target.res),
                        target.namespace(),
                        target.name(),
                        b,
                        &write,
                    );
                }
            }
            Op::AddFinalizer { target } => {
                if let Some(mut b) = self.current(target) {
                    let mut list = finalizer_list(&b);
                    list.push("x.dev/late".to_string());
                    b["metadata"]["finalizers"] = json!(list);
                    let _ = self.store.update(
                        &resource(target.res),
                        target.namespace(),
                        target.name(),
                        b,
                        &write,
                    );
                }
            }
            Op::CollectGarbage => {
                self.store.collect_garbage(now);
            }
        }
        self.poll();
        stripped
    }
}

/// Applies logged events to a map of objects, as a client cache does.
fn replay(events: &[WatchEvent]) -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for event in events {
        match event.event_type {
            EventType::Added | EventType::Modified => {
                objects.insert(key_of(&event.object), event.object.clone());
            }
            EventType::Deleted => {
                objects.remove(&key_of(&event.object));
            }
            EventType::Bookmark | EventType::Error => {}
        }
    }
    objects
}

/// What raises the generation of resource `res`, written out independently of the store.
fn generation_content(res: usize, object: &Value) -> Value {
    match res {
        0 => {
            let mut content = object.as_object().cloned().unwrap_or_default();
            for field in ["metadata", "apiVersion", "kind", "status"] {
                content.remove(field);
            }
            Value::Object(content)
        }
        2 => object.get("spec").cloned().unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn generation(object: &Value) -> Option<i64> {
    object["metadata"]["generation"].as_i64()
}

/// The label requirements of the model selector, rendered to text and matched here.
#[derive(Clone, Debug)]
enum LabelTerm {
    Equals(&'static str, &'static str, bool),
    NotEquals(&'static str, &'static str),
    In(&'static str, Vec<&'static str>),
    NotIn(&'static str, Vec<&'static str>),
    Exists(&'static str),
    DoesNotExist(&'static str),
}

impl LabelTerm {
    fn render(&self) -> String {
        match self {
            Self::Equals(k, v, true) => format!("{k}=={v}"),
            Self::Equals(k, v, false) => format!("{k}={v}"),
            Self::NotEquals(k, v) => format!("{k} != {v}"),
            Self::In(k, vs) => format!("{k} in ({})", vs.join(", ")),
            Self::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
            Self::Exists(k) => k.to_string(),
            Self::DoesNotExist(k) => format!("!{k}"),
        }
    }

    fn selects(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Self::Equals(k, v, _) => get(k) == Some(v),
            Self::NotEquals(k, v) => get(k) != Some(v),
            Self::In(k, vs) => get(k).is_some_and(|have| vs.contains(&have)),
            Self::NotIn(k, vs) => !get(k).is_some_and(|have| vs.contains(&have)),
            Self::Exists(k) => get(k).is_some(),
            Self::DoesNotExist(k) => get(k).is_none(),
        }
    }
}

fn arb_label_term() -> impl Strategy<Value = LabelTerm> {
    let key = prop::sample::select(LABEL_KEYS.to_vec());
    let value = prop::sample::select(LABEL_VALUES.to_vec());
    let set = prop::sample::subsequence(vec!["web", "db", "x"], 1..=3);
    prop_oneof![
        (key.clone(), value.clone(), any::<bool>())
            .prop_map(|(k, v, d)| LabelTerm::Equals(k, v, d)),
        (key.clone(), value).prop_map(|(k, v)| LabelTerm::NotEquals(k, v)),
        (key.clone(), set.clone()).prop_map(|(k, vs)| LabelTerm::In(k, vs)),
        (key.clone(), set).prop_map(|(k, vs)| LabelTerm::NotIn(k, vs)),
        key.clone().prop_map(LabelTerm::Exists),
        key.prop_map(LabelTerm::DoesNotExist),
    ]
}

/// A field requirement on the name or the namespace: (field, negated, value).
fn arb_field_term() -> impl Strategy<Value = (&'static str, bool, &'static str)> {
    prop_oneof![
        (
            Just("metadata.name"),
            any::<bool>(),
            prop::sample::select(NAMES.to_vec())
        ),
        (
            Just("metadata.namespace"),
            any::<bool>(),
            prop::sample::select(NAMESPACES.to_vec())
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Every write takes the next resourceVersion: the log holds each version from the seed
    /// to the head exactly once, in order, and no stored object is ahead of the head.
    #[test]
    fn resource_versions_strictly_increase(ops in arb_ops(60)) {
        let mut h = Harness::new(100_000);
        let mut head = h.store.resource_version();
        for op in &ops {
            h.apply(op);
            prop_assert!(h.store.resource_version() >= head);
            head = h.store.resource_version();
            for object in h.all_objects().values() {
                prop_assert!(version_of(object) <= head);
            }
        }
        for log in &h.logs {
            let versions: Vec<u64> = log.iter().map(WatchEvent::resource_version).collect();
            prop_assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        }
        let mut all: Vec<u64> = h
            .logs
            .iter()
            .flatten()
            .map(WatchEvent::resource_version)
            .collect();
        all.sort_unstable();
        let expected: Vec<u64> = (1..=head).collect();
        prop_assert_eq!(all, expected);
    }

    /// A client that applies ADDED/MODIFIED/DELETED in order ends with exactly the store's
    /// objects.
    #[test]
    fn replaying_the_event_log_reproduces_the_store(ops in arb_ops(60)) {
        let mut h = Harness::new(100_000);
        for op in &ops {
            h.apply(op);
        }
        for (i, (key, _)) in resources().iter().enumerate() {
            let stored: BTreeMap<String, Value> = h
                .store
                .list(key, None, &ListOptions::default())
                .expect("served")
                .items
                .into_iter()
                .map(|o| (key_of(&o), o))
                .collect();
            prop_assert_eq!(replay(&h.logs[i]), stored);
        }
    }

    /// With a small window, a watch from any version still kept yields exactly the events
    /// the incremental watcher saw after it; older versions are 410 Expired.
    #[test]
    fn a_watch_from_any_retained_version_yields_exactly_the_events_after_it(ops in arb_ops(80)) {
        let mut h = Harness::new(16);
        for op in &ops {
            h.apply(op);
        }
        let oldest = h.store.oldest_resource_version();
        for (i, (key, _)) in resources().iter().enumerate() {
            for version in 1..=h.store.resource_version() {
                let got = h
                    .store
                    .watch_from(key, None, &Selectors::everything(), Some(&version.to_string()));
                if version < oldest {
                    let err = got.expect_err("too old");
                    prop_assert_eq!(err.code(), 410);
                    prop_assert_eq!(err.reason(), Some("Expired"));
                } else {
                    let got = got.expect("retained").events;
                    let want: Vec<WatchEvent> = h.logs[i]
                        .iter()
                        .filter(|e| e.resource_version() > version)
                        .cloned()
                        .collect();
                    prop_assert_eq!(got, want);
                }
            }
        }
    }

    /// Generation starts at 1, and each modification raises it by one exactly when the
    /// content its resource counts changed or deletion started; a resource without
    /// generation never shows one.
    #[test]
    fn generation_only_rises_and_only_on_spec_changes(ops in arb_ops(60)) {
        let mut h = Harness::new(100_000);
        for op in &ops {
            h.apply(op);
        }
        for (i, log) in h.logs.iter().enumerate() {
            let mut last: BTreeMap<String, Value> = BTreeMap::new();
            for event in log {
                let object = &event.object;
                let key = key_of(object);
                match event.event_type {
                    EventType::Added => {
                        let want = if i == 1 { None } else { Some(1) };
                        prop_assert_eq!(generation(object), want);
                    }
                    EventType::Modified => {
                        let before = &last[&key];
                        if i == 1 {
                            prop_assert_eq!(generation(object), None);
                        } else {
                            let changed = generation_content(i, before) != generation_content(i, object);
                            let deletion_started = !is_deleting(before) && is_deleting(object);
                            let rise = i64::from(changed || deletion_started);
                            prop_assert_eq!(
                                generation(object),
                                generation(before).map(|g| g + rise),
                                "{} -> {}", before, object
                            );
                        }
                    }
                    EventType::Deleted => {
                        prop_assert_eq!(generation(object), generation(&last[&key]));
                    }
                    EventType::Bookmark | EventType::Error => {}
                }
                last.insert(key, object.clone());
            }
        }
    }

    /// An object with finalizers is never gone until an update empties them (on an object
    /// being deleted); and no object stays being deleted without finalizers.
    #[test]
    fn an_object_with_finalizers_is_never_gone_before_they_are_emptied(ops in arb_ops(60)) {
        let mut h = Harness::new(100_000);
        for op in &ops {
            let before = h.all_objects();
            let stripped = h.apply(op);
            let after = h.all_objects();
            for (id, object) in &before {
                if finalizer_list(object).is_empty() || after.contains_key(id) {
                    continue;
                }
                prop_assert!(
                    stripped.as_ref() == Some(id) && is_deleting(object),
                    "{:?} vanished with finalizers after {:?}", id, op
                );
            }
            for object in after.values() {
                prop_assert!(!is_deleting(object) || !finalizer_list(object).is_empty());
            }
        }
    }

    /// Pages taken with limit and continue, with writes in between, concatenate to the full
    /// list as it was when the first page was taken.
    #[test]
    fn list_pages_concatenate_to_the_full_list_in_order(
        ops in arb_ops(50),
        between in arb_ops(12),
        res in 0..3usize,
        limit in 1..5u64,
        namespace in prop::option::of(0..2usize),
        term in prop::option::of(arb_label_term()),
    ) {
        let mut h = Harness::new(100_000);
        for op in &ops {
            h.apply(op);
        }
        let key = resource(res);
        let namespace = if res == 2 { None } else { namespace.map(|n| NAMESPACES[n]) };
        let selectors = match &term {
            Some(term) => Selectors::parse(Some(&term.render()), None).expect("valid"),
            None => Selectors::everything(),
        };
        let full = h
            .store
            .list(&key, namespace, &ListOptions { selectors: selectors.clone(), ..ListOptions::default() })
            .expect("served");
        let mut pages = Vec::new();
        let mut token = None;
        let mut writes = between.iter();
        loop {
            let page = h
                .store
                .list(&key, namespace, &ListOptions {
                    selectors: selectors.clone(),
                    limit: Some(limit),
                    continue_token: token.clone(),
                })
                .expect("the window keeps the first page's version");
            prop_assert!(page.items.len() as u64 <= limit);
            prop_assert_eq!(page.resource_version, full.resource_version);
            pages.extend(page.items);
            token = page.continue_token;
            if token.is_none() {
                break;
            }
            if let Some(op) = writes.next() {
                h.apply(op);
            }
        }
        prop_assert_eq!(pages, full.items);
    }

    /// Label and field selectors pick exactly the objects a matcher written here picks.
    #[test]
    fn selectors_filter_exactly_like_an_independent_matcher(
        ops in arb_ops(50),
        terms in prop::collection::vec(arb_label_term(), 0..4),
        fields in prop::collection::vec(arb_field_term(), 0..3),
    ) {
        let mut h = Harness::new(100_000);
        for op in &ops {
            h.apply(op);
        }
        let label_text: Vec<String> = terms.iter().map(LabelTerm::render).collect();
        let field_text: Vec<String> = fields
            .iter()
            .map(|(f, negated, v)| format!("{f}{}{v}", if *negated { "!=" } else { "=" }))
            .collect();
        let selectors = Selectors::parse(Some(&label_text.join(",")), Some(&field_text.join(",")))
            .expect("valid selectors");
        for (key, _) in resources() {
            let everything = h.store.list(&key, None, &ListOptions::default()).expect("served");
            let want: Vec<Value> = everything
                .items
                .into_iter()
                .filter(|o| {
                    let labels = &o["metadata"]["labels"];
                    terms.iter().all(|t| t.selects(labels))
                        && fields.iter().all(|(f, negated, v)| {
                            let field = f.trim_start_matches("metadata.");
                            let have = o["metadata"][field].as_str().unwrap_or("");
                            (have == *v) != *negated
                        })
                })
                .collect();
            let got = h
                .store
                .list(&key, None, &ListOptions { selectors: selectors.clone(), ..ListOptions::default() })
                .expect("served")
                .items;
            prop_assert_eq!(got, want);
        }
    }
}
