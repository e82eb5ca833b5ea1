//! The replica server: storage, the rules applied to it, its HTTP API, and the
//! client that talks to it.

pub mod api;
pub mod http;
pub mod secret;
pub mod server;
pub mod store;

use multisite_core::packet::change::{FieldDef, RecordTypeDef};

/// The schema a family starts with when `replica init` is given none: one record
/// type, `Defect`.
pub fn builtin_record_types() -> Vec<RecordTypeDef> {
    let field = |name: &str| FieldDef {
        name: name.to_string(),
        field_type: "String".to_string(),
    };
    vec![RecordTypeDef {
        name: "Defect".to_string(),
        fields: vec![
            field("headline"),
            field("description"),
            field("state"),
            field("owner"),
        ],
    }]
}

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod store_tests;
