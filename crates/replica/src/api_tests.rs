//! The contract, end to end: the typed client against a real replica server on
//! loopback. Every route a caller uses is called through its method, so a field or a
//! route renamed on one side only fails here; refusals arrive with their reason.

use super::api::*;
use super::http::HttpError;
use super::server::{ReplicaServer, router};
use super::store_tests::{TempDir, init};
use multisite_core::domain::compat::Compatibility;
use multisite_core::packet::change::{GATEWAY_REPLICA, ItemKind};
use serde_json::json;

const SECRET: &[u8] = b"a family secret long enough for the packet key";

/// Serves replica `name` of family `sampl` at FL 7; returns its base URL.
async fn serve(dir: &TempDir, name: &str) -> String {
    let store = init(dir, name);
    let secret = super::secret::from_bytes(SECRET).unwrap();
    let server = ReplicaServer::new(store, Compatibility::builtin(), secret);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(server)).await });
    base
}

fn client(release: &str) -> ReplicaClient {
    let token = super::secret::from_bytes(SECRET).unwrap().api_token;
    ReplicaClient::new(token, Some(release.to_string()))
}

fn reason<T: std::fmt::Debug>(result: Result<T, HttpError>) -> Reason {
    match result {
        Err(e) => e.reason().unwrap_or_else(|| panic!("no reason in {e:?}")),
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
    }
}

#[tokio::test]
async fn every_item_route_round_trips_through_the_typed_client() {
    let dir = TempDir::new("api-items");
    let base = serve(&dir, "tokyo").await;
    let c = client("8.0.1.1");

    let status = c.status(&base).await.unwrap();
    assert_eq!(
        (status.family.as_str(), status.replica.as_str()),
        ("sampl", "tokyo")
    );
    let session = c.session(&base).await.unwrap();
    assert_eq!(session.release, "8.0.1.1");

    // An id with characters that need encoding in a path reaches the server whole.
    let created = c
        .create_item(
            &base,
            ItemKind::Record,
            &CreateItem {
                item_type: Some("Defect".into()),
                fields: [("headline".to_string(), json!("open & shut"))].into(),
                owner: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.master, "tokyo");
    let got = c
        .get_item(&base, ItemKind::Record, &created.id)
        .await
        .unwrap();
    assert_eq!(got, created);

    let updated = c
        .update_item(
            &base,
            ItemKind::Record,
            &created.id,
            &UpdateItem {
                fields: [("state".to_string(), json!("open"))].into(),
                mastership: None,
                via_gateway: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.fields["state"], json!("open"));
    assert!(updated.version > created.version);

    let query = ItemQuery {
        item_type: Some("Defect".into()),
        fields: vec![("headline".into(), "open & shut".into())],
    };
    let listed = c.list_items(&base, ItemKind::Record, &query).await.unwrap();
    assert_eq!(
        listed.iter().map(|i| &i.id).collect::<Vec<_>>(),
        [&created.id]
    );
    let none = ItemQuery {
        item_type: Some("Defect".into()),
        fields: vec![("headline".into(), "other".into())],
    };
    assert!(
        c.list_items(&base, ItemKind::Record, &none)
            .await
            .unwrap()
            .is_empty()
    );

    let history = c
        .item_history(&base, ItemKind::Record, &created.id)
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].state, updated);
    assert_eq!(history[0].origin, "tokyo");

    let gone = c
        .delete_item(&base, ItemKind::Record, &created.id)
        .await
        .unwrap();
    assert!(gone.deleted);

    let digest = c.digest(&base).await.unwrap();
    assert_eq!(digest.replica, "tokyo");
    assert!(!digest.digest.is_empty());

    let user = c
        .create_item(
            &base,
            ItemKind::User,
            &CreateItem {
                owner: Some("ann".into()),
                ..CreateItem::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(user.item_type, "user");
}

#[tokio::test]
async fn administration_routes_round_trip_through_the_typed_client() {
    let dir = TempDir::new("api-admin");
    let base = serve(&dir, "tokyo").await;
    let c = client("8.0.1.1");

    let lease = GatewayLease {
        holder: "gateway-a".into(),
        seconds: 15,
    };
    assert_eq!(c.gateway_lease(&base, &lease).await.unwrap(), lease);
    let other = GatewayLease {
        holder: "gateway-b".into(),
        seconds: 15,
    };
    assert_eq!(
        reason(c.gateway_lease(&base, &other).await),
        Reason::LeaseHeld
    );

    let set = c
        .set_setting(
            &base,
            &Setting {
                key: GATEWAY_REPLICA.into(),
                value: "tokyo".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(set.gateway_replica.as_deref(), Some("tokyo"));

    let package = PackageRequest {
        package: "interop".into(),
        version: "1.0".into(),
        record_types: vec![multisite_core::packet::change::RecordTypeDef {
            name: "Note".into(),
            fields: vec![multisite_core::packet::change::FieldDef {
                name: "text".into(),
                field_type: "String".into(),
            }],
        }],
    };
    let schema = c.apply_package(&base, &package).await.unwrap();
    let step = UpgradeRequest {
        user_database_schema: Some(schema.version),
        ..UpgradeRequest::default()
    };
    let raised = c.upgrade(&base, &step).await.unwrap();
    assert_eq!(raised.user_database_schema_version, schema.version);

    let backup = c.backup(&base).await.unwrap();
    assert!(backup.starts_with(b"SQLite format 3"));
    let copy = c.clone_for(&base, "paris").await.unwrap();
    assert!(copy.starts_with(b"SQLite format 3"));
    let packet = c.export(&base, "paris").await.unwrap();
    assert!(!packet.is_empty());

    let ack = ImportReport {
        replica: "paris".into(),
        incarnation: 1,
        epochs: Default::default(),
        applied: 0,
        skipped: 0,
        held: None,
        released: 0,
    };
    let answer = c.acknowledge(&base, &ack).await.unwrap();
    assert_eq!(answer.acknowledged, "paris");

    let retired = c.retire(&base, "paris").await.unwrap();
    assert!(retired.removal_pending.is_some());
}

/// Callers decide on the reason: each refusal below names its own.
#[tokio::test]
async fn refusals_carry_their_reason() {
    let dir = TempDir::new("api-reasons");
    let base = serve(&dir, "tokyo").await;
    let c = client("8.0.1.1");

    let wrong_token = ReplicaClient::new("not the token".into(), None);
    assert_eq!(
        reason(wrong_token.status(&base).await),
        Reason::Unauthorized
    );
    assert_eq!(
        reason(client("7.0.0.0").session(&base).await),
        Reason::ReleaseRefused
    );
    assert_eq!(
        reason(c.get_item(&base, ItemKind::Record, "SAMPL99999").await),
        Reason::NotFound
    );
    let bad_type = CreateItem {
        item_type: Some("NoSuchType".into()),
        ..CreateItem::default()
    };
    assert_eq!(
        reason(c.create_item(&base, ItemKind::Record, &bad_type).await),
        Reason::Invalid
    );
    let down = UpgradeRequest {
        schema_repository: Some(5),
        ..UpgradeRequest::default()
    };
    assert_eq!(
        reason(c.upgrade(&base, &down).await),
        Reason::UpgradeRefused
    );
    let bootstrap = BootstrapRequest {
        family: "sampl".into(),
        replica: "tokyo".into(),
        source: BootstrapSource::CloneFrom(base.clone()),
    };
    assert_eq!(
        reason(c.bootstrap(&base, &bootstrap).await),
        Reason::AlreadyBootstrapped
    );
    assert_eq!(
        reason(c.forget_member(&base, "nobody").await),
        Reason::Invalid
    );
    // The status code matches the reason's.
    match c.get_item(&base, ItemKind::Record, "SAMPL99999").await {
        Err(HttpError::Status { status, reason, .. }) => assert_eq!(status, reason.status()),
        other => panic!("{other:?}"),
    }
}
