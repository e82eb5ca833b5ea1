//! Errors of the embedded API server, and the `Status` object the real API server answers
//! them with, so that kube's client and kubectl react to them as they would on a cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusCause, StatusDetails};
use serde_json::Value;
use std::fmt;

/// A resource named with its API group, printed as Kubernetes prints it in messages:
/// `deployments.apps`, or `pods` for the core group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupResource {
    pub group: String,
    pub resource: String,
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// A kind named with its API group: `StatefulSet.apps`, or `Pod` for the core group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupKind {
    pub group: String,
    pub kind: String,
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.kind)
        } else {
            write!(f, "{}.{}", self.kind, self.group)
        }
    }
}

/// What is wrong with one field, in the categories of Kubernetes' field errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldErrorType {
    Required,
    Invalid,
    Forbidden,
    NotSupported,
    Duplicate,
    TypeInvalid,
    TooLong,
    TooMany,
}

impl FieldErrorType {
    /// The `reason` of the `StatusCause` that reports this error.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Required => "FieldValueRequired",
            Self::Invalid => "FieldValueInvalid",
            Self::Forbidden => "FieldValueForbidden",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Duplicate => "FieldValueDuplicate",
            Self::TypeInvalid => "FieldValueTypeInvalid",
            Self::TooLong => "FieldValueTooLong",
            Self::TooMany => "FieldValueTooMany",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Required => "Required value",
            Self::Invalid | Self::TypeInvalid => "Invalid value",
            Self::Forbidden => "Forbidden",
            Self::NotSupported => "Unsupported value",
            Self::Duplicate => "Duplicate value",
            Self::TooLong => "Too long",
            Self::TooMany => "Too many",
        }
    }

    /// Whether the message quotes the offending value, as the real server does for these.
    fn shows_value(self) -> bool {
        matches!(
            self,
            Self::Invalid | Self::NotSupported | Self::Duplicate | Self::TypeInvalid
        )
    }
}

/// One field error of an `Invalid` (422) answer.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// The field's path in JSON names: `metadata.name`, `spec.clients[0].release`.
    pub field: String,
    pub error_type: FieldErrorType,
    pub value: Option<Value>,
    pub detail: String,
}

impl FieldError {
    pub fn required(field: &str, detail: &str) -> Self {
        Self::new(field, FieldErrorType::Required, None, detail)
    }

    pub fn invalid(field: &str, value: Value, detail: &str) -> Self {
        Self::new(field, FieldErrorType::Invalid, Some(value), detail)
    }

    pub fn forbidden(field: &str, detail: &str) -> Self {
        Self::new(field, FieldErrorType::Forbidden, None, detail)
    }

    pub fn new(
        field: &str,
        error_type: FieldErrorType,
        value: Option<Value>,
        detail: &str,
    ) -> Self {
        Self {
            field: field.to_string(),
            error_type,
            value,
            detail: detail.to_string(),
        }
    }

    /// The message without the field path: what a `StatusCause` carries.
    pub fn body(&self) -> String {
        let mut text = self.error_type.label().to_string();
        if self.error_type.shows_value() {
            text.push_str(": ");
            text.push_str(&quote_value(self.value.as_ref().unwrap_or(&Value::Null)));
        }
        if !self.detail.is_empty() {
            text.push_str(": ");
            text.push_str(&self.detail);
        }
        text
    }

    fn cause(&self) -> StatusCause {
        StatusCause {
            field: Some(self.field.clone()),
            message: Some(self.body()),
            reason: Some(self.error_type.reason().to_string()),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// Strings are quoted and other values printed as JSON, close to what Go's `%q`/`%v` give.
fn quote_value(value: &Value) -> String {
    match value {
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Null => "null".to_string(),
        other => other.to_string(),
    }
}

/// The real server prints one field error alone and several as `[a, b]`.
fn aggregate(causes: &[FieldError]) -> String {
    match causes {
        [one] => one.to_string(),
        many => {
            let parts: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

fn already_exists_message(resource: &GroupResource, name: &str, being_deleted: bool) -> String {
    let prefix = if being_deleted {
        "object is being deleted: "
    } else {
        ""
    };
    format!("{prefix}{resource} \"{name}\" already exists")
}

fn forbidden_message(resource: &GroupResource, name: &str, detail: &str) -> String {
    if name.is_empty() {
        format!("{resource} is forbidden: {detail}")
    } else {
        format!("{resource} \"{name}\" is forbidden: {detail}")
    }
}

/// The detail of a 409 Conflict on a stale `metadata.resourceVersion`.
pub const OPTIMISTIC_LOCK_MESSAGE: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// Every way a request to the embedded API server fails, each rendered as the Kubernetes
/// `Status` the real server sends in the same case (see [`Error::status`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// The group, version or resource (or subresource) is not served.
    #[error("the server could not find the requested resource")]
    ResourceNotFound,
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        resource: GroupResource,
        name: String,
    },
    #[error("{}", already_exists_message(.resource, .name, *.being_deleted))]
    AlreadyExists {
        resource: GroupResource,
        name: String,
        /// The name is taken by an object waiting for its finalizers.
        being_deleted: bool,
    },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {detail}")]
    Conflict {
        resource: GroupResource,
        name: String,
        detail: String,
    },
    #[error("{kind} \"{name}\" is invalid: {}", aggregate(.causes))]
    Invalid {
        kind: GroupKind,
        name: String,
        causes: Vec<FieldError>,
    },
    #[error("{}", forbidden_message(.resource, .name, .detail))]
    Forbidden {
        resource: GroupResource,
        name: String,
        detail: String,
    },
    /// A resourceVersion (of a watch or a continue token) older than what is kept: 410.
    #[error("{message}")]
    Expired { message: String },
    #[error("{message}")]
    Gone { message: String },
    #[error("{message}")]
    BadRequest { message: String },
    #[error("{verb} is not supported on resources of kind \"{resource}\"")]
    MethodNotAllowed {
        resource: GroupResource,
        verb: String,
    },
    #[error("Internal error occurred: {message}")]
    Internal { message: String },
    /// The real server answers this one with a 500 and no reason; so do we.
    #[error("resourceVersion should not be set on objects to be created")]
    ResourceVersionOnCreate,
}

impl Error {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            Self::ResourceNotFound | Self::NotFound { .. } => 404,
            Self::AlreadyExists { .. } | Self::Conflict { .. } => 409,
            Self::Invalid { .. } => 422,
            Self::Forbidden { .. } => 403,
            Self::Expired { .. } | Self::Gone { .. } => 410,
            Self::BadRequest { .. } => 400,
            Self::MethodNotAllowed { .. } => 405,
            Self::Internal { .. } | Self::ResourceVersionOnCreate => 500,
        }
    }

    /// The Kubernetes `StatusReason`, absent where the real server leaves it empty.
    pub fn reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::ResourceNotFound | Self::NotFound { .. } => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } => "Conflict",
            Self::Invalid { .. } => "Invalid",
            Self::Forbidden { .. } => "Forbidden",
            Self::Expired { .. } => "Expired",
            Self::Gone { .. } => "Gone",
            Self::BadRequest { .. } => "BadRequest",
            Self::MethodNotAllowed { .. } => "MethodNotAllowed",
            Self::Internal { .. } => "InternalError",
            Self::ResourceVersionOnCreate => return None,
        })
    }

    fn details(&self) -> Option<StatusDetails> {
        let named = |resource: &GroupResource, name: &str| StatusDetails {
            name: non_empty(name),
            group: non_empty(&resource.group),
            kind: non_empty(&resource.resource),
            ..StatusDetails::default()
        };
        match self {
            Self::ResourceNotFound => Some(StatusDetails::default()),
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name, .. }
            | Self::Conflict { resource, name, .. }
            | Self::Forbidden { resource, name, .. } => Some(named(resource, name)),
            Self::MethodNotAllowed { resource, .. } => Some(named(resource, "")),
            Self::Invalid { kind, name, causes } => Some(StatusDetails {
                name: non_empty(name),
                group: non_empty(&kind.group),
                kind: non_empty(&kind.kind),
                causes: Some(causes.iter().map(FieldError::cause).collect()),
                ..StatusDetails::default()
            }),
            Self::Internal { message } => Some(StatusDetails {
                causes: Some(vec![StatusCause {
                    message: Some(message.clone()),
                    ..StatusCause::default()
                }]),
                ..StatusDetails::default()
            }),
            Self::Expired { .. }
            | Self::Gone { .. }
            | Self::BadRequest { .. }
            | Self::ResourceVersionOnCreate => None,
        }
    }

    /// The `Status` object the real API server sends for this error.
    pub fn status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code())),
            details: self.details(),
            message: Some(self.to_string()),
            metadata: Default::default(),
            reason: self.reason().map(str::to_string),
            status: Some("Failure".to_string()),
        }
    }

    /// [`Error::status`] as JSON: `{"kind":"Status","apiVersion":"v1","metadata":{},...}`.
    pub fn status_json(&self) -> Value {
        status_to_json(&self.status())
    }
}

/// Renders a `Status` as JSON; `Status` serialises to a map, so this cannot fail in practice,
/// and should it, the caller still gets a well-formed Status.
pub fn status_to_json(status: &Status) -> Value {
    serde_json::to_value(status).unwrap_or_else(|e| {
        serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("the status could not be rendered: {e}"),
            "code": 500,
        })
    })
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pods() -> GroupResource {
        GroupResource {
            group: String::new(),
            resource: "pods".into(),
        }
    }

    fn replicas() -> GroupResource {
        GroupResource {
            group: "multisite.dev".into(),
            resource: "replicas".into(),
        }
    }

    #[test]
    fn not_found_renders_the_real_status_shape() {
        let err = Error::NotFound {
            resource: replicas(),
            name: "tokyo".into(),
        };
        assert_eq!(
            err.status_json(),
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "replicas.multisite.dev \"tokyo\" not found",
                "reason": "NotFound",
                "details": {"name": "tokyo", "group": "multisite.dev", "kind": "replicas"},
                "code": 404
            })
        );
    }

    #[test]
    fn core_group_is_left_out_of_messages_and_details() {
        let err = Error::AlreadyExists {
            resource: pods(),
            name: "web-0".into(),
            being_deleted: false,
        };
        let status = err.status_json();
        assert_eq!(status["message"], "pods \"web-0\" already exists");
        assert_eq!(status["details"], json!({"name": "web-0", "kind": "pods"}));
        assert_eq!(status["code"], 409);
        assert_eq!(status["reason"], "AlreadyExists");
    }

    #[test]
    fn already_exists_on_a_terminating_object_says_so() {
        let err = Error::AlreadyExists {
            resource: pods(),
            name: "web-0".into(),
            being_deleted: true,
        };
        assert_eq!(
            err.to_string(),
            "object is being deleted: pods \"web-0\" already exists"
        );
    }

    #[test]
    fn conflict_carries_the_optimistic_lock_message() {
        let err = Error::Conflict {
            resource: replicas(),
            name: "tokyo".into(),
            detail: OPTIMISTIC_LOCK_MESSAGE.into(),
        };
        assert_eq!(
            err.to_string(),
            "Operation cannot be fulfilled on replicas.multisite.dev \"tokyo\": the object has been \
             modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(err.status_json()["reason"], "Conflict");
        assert_eq!(err.code(), 409);
    }

    #[test]
    fn invalid_lists_causes_with_kind_in_details() {
        let err = Error::Invalid {
            kind: GroupKind {
                group: "multisite.dev".into(),
                kind: "Replica".into(),
            },
            name: "Tokyo".into(),
            causes: vec![
                FieldError::invalid("metadata.name", json!("Tokyo"), "must be lowercase"),
                FieldError::required("spec.family", ""),
            ],
        };
        let status = err.status_json();
        assert_eq!(
            status["message"],
            "Replica.multisite.dev \"Tokyo\" is invalid: [metadata.name: Invalid value: \"Tokyo\": \
             must be lowercase, spec.family: Required value]"
        );
        assert_eq!(status["code"], 422);
        assert_eq!(status["details"]["kind"], "Replica");
        assert_eq!(
            status["details"]["causes"],
            json!([
                {"reason": "FieldValueInvalid", "message": "Invalid value: \"Tokyo\": must be lowercase", "field": "metadata.name"},
                {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.family"}
            ])
        );
    }

    #[test]
    fn invalid_with_one_cause_has_no_brackets() {
        let err = Error::Invalid {
            kind: GroupKind {
                group: String::new(),
                kind: "ConfigMap".into(),
            },
            name: String::new(),
            causes: vec![FieldError::required(
                "metadata.name",
                "name or generateName is required",
            )],
        };
        assert_eq!(
            err.to_string(),
            "ConfigMap \"\" is invalid: metadata.name: Required value: name or generateName is required"
        );
        assert_eq!(err.status_json()["details"].get("name"), None);
    }

    #[test]
    fn expired_is_410_with_reason_expired_and_no_details() {
        let err = Error::Expired {
            message: "too old resource version: 3 (7)".into(),
        };
        let status = err.status_json();
        assert_eq!(status["code"], 410);
        assert_eq!(status["reason"], "Expired");
        assert_eq!(status.get("details"), None);
        assert_eq!(status["metadata"], json!({}));
    }

    #[test]
    fn unserved_resource_is_not_found_with_empty_details() {
        let status = Error::ResourceNotFound.status_json();
        assert_eq!(
            status["message"],
            "the server could not find the requested resource"
        );
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["details"], json!({}));
        assert_eq!(status["code"], 404);
    }

    #[test]
    fn forbidden_and_method_not_allowed_name_the_resource() {
        let forbidden = Error::Forbidden {
            resource: pods(),
            name: String::new(),
            detail: "no".into(),
        };
        assert_eq!(forbidden.to_string(), "pods is forbidden: no");
        assert_eq!(forbidden.code(), 403);
        let method = Error::MethodNotAllowed {
            resource: replicas(),
            verb: "deletecollection".into(),
        };
        assert_eq!(
            method.to_string(),
            "deletecollection is not supported on resources of kind \"replicas.multisite.dev\""
        );
        assert_eq!(method.status_json()["reason"], "MethodNotAllowed");
        assert_eq!(method.code(), 405);
    }

    #[test]
    fn resource_version_on_create_is_a_reasonless_500() {
        let status = Error::ResourceVersionOnCreate.status_json();
        assert_eq!(status["code"], 500);
        assert_eq!(status.get("reason"), None);
        assert_eq!(status["status"], "Failure");
    }

    #[test]
    fn bad_request_and_gone_codes() {
        assert_eq!(Error::bad_request("x").code(), 400);
        assert_eq!(Error::bad_request("x").reason(), Some("BadRequest"));
        let gone = Error::Gone {
            message: "gone".into(),
        };
        assert_eq!((gone.code(), gone.reason()), (410, Some("Gone")));
        let internal = Error::Internal {
            message: "boom".into(),
        };
        assert_eq!(internal.to_string(), "Internal error occurred: boom");
        assert_eq!(
            internal.status_json()["details"],
            json!({"causes": [{"message": "boom"}]})
        );
    }
}
