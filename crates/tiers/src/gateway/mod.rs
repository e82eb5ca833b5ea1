//! `multisite gateway`: the family's connector to an outside system, connected to the
//! one replica the family pins it to.
//!
//! - Incoming synchronisation (the vendor's name, seen from the outside system): the
//!   change events at its replica (written with every record change once the interop
//!   package is in place, mastered by the gateway's replica) are sent to the endpoint as
//!   JSON, oldest first, one at a time; each is deleted at the replica only once the
//!   endpoint answered 2xx. A failure stops the round and is retried with back-off, so
//!   delivery is at least once and in order per record. An event of a change the
//!   outside system itself made through the gateway says so (`origin: gateway`).
//! - Outgoing synchronisation: an authenticated `POST /v1/updates` changes a record at
//!   its replica. A record mastered elsewhere cannot be changed here: the update is
//!   refused and the record listed as one-directional until its mastership moves to the
//!   gateway's replica.
//! - Only one gateway acts for a replica: each holds a lease at the replica, renewed
//!   every few seconds; a second gateway waits.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use multisite_core::packet::change::ItemKind;
use multisite_replica::api::{
    GatewayLease, GatewayReport, Item, ItemQuery, Reason, ReplicaClient, UpdateItem, route,
};
use multisite_replica::http::{HttpClient, HttpError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a lease lasts; renewed every third of it.
pub const LEASE_SECONDS: u64 = 15;

pub struct Gateway {
    pub identity: String,
    pub replica_name: String,
    pub replica_url: String,
    pub endpoint: String,
    /// Bearer token the outside system presents on incoming updates.
    pub token: String,
    pub replica: ReplicaClient,
    /// The outside endpoint is called without the family's token.
    pub outside: HttpClient,
    report: Mutex<GatewayReport>,
    one_directional: Mutex<BTreeSet<String>>,
}

type Shared = Arc<Gateway>;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The numeric part of a record id (`SAMPL00042B` -> 42), for delivery order.
pub fn id_number(id: &str) -> u64 {
    let digits: String = id
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(u64::MAX)
}

/// The JSON an outside system receives for one change event.
pub fn event_body(event: &Item) -> Value {
    let field = |name: &str| event.fields.get(name).cloned().unwrap_or(Value::Null);
    json!({
        "event": event.id,
        "record": field("record"),
        "action": field("action"),
        "replica": field("replica"),
        "origin": field("origin"),
    })
}

impl Gateway {
    pub fn new(
        identity: String,
        replica_name: String,
        replica_url: String,
        endpoint: String,
        token: String,
        replica: ReplicaClient,
    ) -> Shared {
        let outside = HttpClient::new(String::new(), None).with_timeout(Duration::from_secs(30));
        Arc::new(Gateway {
            report: Mutex::new(GatewayReport {
                replica: replica_name.clone(),
                ..GatewayReport::default()
            }),
            identity,
            replica_name,
            replica_url,
            endpoint,
            token,
            replica,
            outside,
            one_directional: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn report(&self) -> GatewayReport {
        let mut report = locked(&self.report).clone();
        report.one_directional_records = locked(&self.one_directional).iter().cloned().collect();
        report
    }

    async fn renew(&self) -> bool {
        let lease = GatewayLease {
            holder: self.identity.clone(),
            seconds: LEASE_SECONDS,
        };
        let result = self.replica.gateway_lease(&self.replica_url, &lease).await;
        let mut report = locked(&self.report);
        match result {
            Ok(_) => {
                report.leader = true;
                report.connected = true;
                true
            }
            Err(e) => {
                report.leader = false;
                report.connected = false;
                report.last_error = Some(e.to_string());
                false
            }
        }
    }

    /// One delivery round: every pending event in order until one fails.
    async fn deliver(&self) -> Result<(), String> {
        let events = self
            .replica
            .list_items(
                &self.replica_url,
                ItemKind::Record,
                &ItemQuery::of_type(multisite_core::packet::change::CHANGE_EVENT_TYPE),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut mine: Vec<Item> = events
            .into_iter()
            .filter(|e| e.master == self.replica_name && !e.deleted)
            .collect();
        mine.sort_by_key(|e| (id_number(&e.id), e.id.clone()));
        locked(&self.report).events_pending = mine.len() as u64;
        for event in mine {
            self.outside
                .send_json::<_, Value>(hyper::Method::POST, &self.endpoint, "", &event_body(&event))
                .await
                .or_else(|e| match e {
                    // A 2xx without a JSON body is a delivery too.
                    HttpError::BadAnswer { .. } => Ok(Value::Null),
                    other => Err(other),
                })
                .map_err(|e| format!("delivering {} to {}: {e}", event.id, self.endpoint))?;
            self.replica
                .delete_item(&self.replica_url, ItemKind::Record, &event.id)
                .await
                .map_err(|e| format!("deleting delivered event {}: {e}", event.id))?;
            let mut report = locked(&self.report);
            report.events_delivered += 1;
            report.events_pending = report.events_pending.saturating_sub(1);
        }
        Ok(())
    }

    /// Forgets the one-directional records whose mastership has come to its replica.
    async fn recheck_one_directional(&self) {
        let ids: Vec<String> = locked(&self.one_directional).iter().cloned().collect();
        for id in ids {
            let item = self
                .replica
                .get_item(&self.replica_url, ItemKind::Record, &id)
                .await;
            if item.is_ok_and(|i| i.master == self.replica_name) {
                locked(&self.one_directional).remove(&id);
            }
        }
    }

    /// Holds the lease and delivers, until `stop` resolves.
    pub async fn run(self: Shared, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::from_secs(1);
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            let due =
                last_renewal.is_none_or(|t| t.elapsed() >= Duration::from_secs(LEASE_SECONDS / 3));
            let leader = if due {
                let held = self.renew().await;
                last_renewal = held.then(tokio::time::Instant::now);
                held
            } else {
                true
            };
            let wait = if leader {
                self.recheck_one_directional().await;
                match self.deliver().await {
                    Ok(()) => {
                        backoff = Duration::from_secs(1);
                        locked(&self.report).last_error = None;
                        Duration::from_millis(500)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "delivery");
                        locked(&self.report).last_error = Some(e);
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        wait
                    }
                }
            } else {
                Duration::from_secs(2)
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// An update from the outside system.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    pub id: String,
    pub fields: serde_json::Map<String, Value>,
}

async fn update(
    State(g): State<Shared>,
    headers: HeaderMap,
    Json(update): Json<Update>,
) -> Response {
    if !multisite_replica::server::token_matches(&g.token, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong gateway token"})),
        )
            .into_response();
    }
    if !g.report().leader {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "this gateway does not hold its replica's lease; another one acts"}))).into_response();
    }
    let body = UpdateItem {
        fields: update.fields.into_iter().collect(),
        mastership: None,
        via_gateway: true,
    };
    match g
        .replica
        .update_item(&g.replica_url, ItemKind::Record, &update.id, &body)
        .await
    {
        Ok(item) => {
            locked(&g.one_directional).remove(&update.id);
            Json(item).into_response()
        }
        Err(HttpError::Status {
            reason: Reason::Refused,
            message,
            ..
        }) => {
            locked(&g.one_directional).insert(update.id.clone());
            (
                StatusCode::CONFLICT,
                Json(json!({"error": message, "oneDirectional": true, "record": update.id})),
            )
                .into_response()
        }
        Err(e) => {
            let status = match &e {
                HttpError::Status { status, .. } => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            (status, Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

async fn status(State(g): State<Shared>) -> Json<GatewayReport> {
    Json(g.report())
}

async fn readyz(State(g): State<Shared>) -> Response {
    if g.report().connected {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to its replica",
        )
            .into_response()
    }
}

/// The gateway's own HTTP API.
pub fn router(gateway: Shared) -> Router {
    Router::new()
        .route(route::workload::STATUS, get(status))
        .route(route::workload::GATEWAY_UPDATES, post(update))
        .route(route::HEALTHZ, get(|| async { "ok" }))
        .route(route::READYZ, get(readyz))
        .with_state(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn ids_order_by_number_and_events_carry_their_record() {
        assert_eq!(id_number("SAMPL00042B"), 42);
        assert_eq!(id_number("SAMPL100000"), 100_000);
        assert_eq!(id_number("X"), u64::MAX);
        let mut fields = BTreeMap::new();
        fields.insert("record".to_string(), json!("SAMPL00001"));
        fields.insert("action".to_string(), json!("modify"));
        let event = Item {
            id: "SAMPL00002".into(),
            item_type: "ChangeEvent".into(),
            fields,
            master: "tokyo".into(),
            version: 1,
            deleted: false,
            owner: None,
        };
        assert_eq!(
            event_body(&event),
            json!({"event": "SAMPL00002", "record": "SAMPL00001", "action": "modify", "replica": null,
                   "origin": null})
        );
    }
}
