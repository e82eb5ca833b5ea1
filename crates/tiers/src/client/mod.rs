//! `multisite client`: a client tier's front end. It serves an HTTP API and a small web
//! page over one replica: list, query, view and edit records, list the workspace items
//! (saved queries, reports, charts), with a lock mark on items mastered at another
//! replica. It presents its release to the replica on
//! every call, and a replica whose feature levels that release cannot open refuses it;
//! the page and the API show the refusal, and the tier is not ready meanwhile.

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use multisite_core::packet::change::ItemKind;
use multisite_replica::api::{CreateItem, Item, ItemQuery, ReplicaClient, Session, UpdateItem};
use multisite_replica::http::HttpError;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// Who the client is and where its replica is.
pub struct ClientTier {
    pub family: String,
    pub tier: String,
    pub release: String,
    pub replica_url: String,
    pub client: ReplicaClient,
}

type Shared = Arc<ClientTier>;

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn status_of(error: &HttpError) -> StatusCode {
    match error {
        HttpError::Status { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        _ => StatusCode::BAD_GATEWAY,
    }
}

fn api_error(error: HttpError) -> Response {
    (status_of(&error), Json(json!({"error": error.to_string()}))).into_response()
}

/// The lock mark of an item (a record, a workspace item) mastered at another replica
/// (pure, for the page).
pub fn lock_mark(item: &Item, here: &str) -> Option<String> {
    (item.master != here).then(|| format!("🔒 mastered at {}", item.master))
}

impl ClientTier {
    async fn session(&self) -> Result<Session, HttpError> {
        self.client.session(&self.replica_url).await
    }

    async fn records(&self, query: &BTreeMap<String, String>) -> Result<Vec<Item>, HttpError> {
        let mut wanted = ItemQuery::of_type("Defect");
        if let (Some(field), Some(value)) = (query.get("field"), query.get("value"))
            && !field.is_empty()
        {
            wanted.fields.push((field.clone(), value.clone()));
        }
        self.client
            .list_items(&self.replica_url, ItemKind::Record, &wanted)
            .await
    }

    async fn workspace_items(&self) -> Result<Vec<Item>, HttpError> {
        self.client
            .list_items(
                &self.replica_url,
                ItemKind::WorkspaceItem,
                &ItemQuery::default(),
            )
            .await
    }

    async fn record(&self, id: &str) -> Result<Item, HttpError> {
        self.client
            .get_item(&self.replica_url, ItemKind::Record, id)
            .await
    }

    async fn update(&self, id: &str, update: &UpdateItem) -> Result<Item, HttpError> {
        self.client
            .update_item(&self.replica_url, ItemKind::Record, id, update)
            .await
    }

    async fn create(&self, item: &CreateItem) -> Result<Item, HttpError> {
        self.client
            .create_item(&self.replica_url, ItemKind::Record, item)
            .await
    }
}

/// The page path of one record.
fn record_page(id: &str) -> String {
    format!("/records/{}", multisite_replica::api::segment(id))
}

fn page(tier: &ClientTier, title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px}}.refused{{background:#fdd;padding:1em}}\
         .lock{{color:#a50}}</style></head><body>\
         <p>family <b>{family}</b> · tier <b>{tier_name}</b> · release <b>{release}</b></p>\n{body}</body></html>\n",
        title = escape(title),
        family = escape(&tier.family),
        tier_name = escape(&tier.tier),
        release = escape(&tier.release),
    )
}

fn refused_page(tier: &ClientTier, error: &HttpError) -> Response {
    let body = format!(
        "<div class=\"refused\" id=\"refused\"><b>Refused by the replica.</b> {}</div>",
        escape(&error.to_string())
    );
    (status_of(error), Html(page(tier, "refused", &body))).into_response()
}

async fn index(State(t): State<Shared>, Query(query): Query<BTreeMap<String, String>>) -> Response {
    let session = match t.session().await {
        Ok(s) => s,
        Err(e) => return refused_page(&t, &e),
    };
    let items = match t.records(&query).await {
        Ok(items) => items,
        Err(e) => return refused_page(&t, &e),
    };
    let mut body = format!(
        "<h1>Records at {}</h1><p>feature levels {} / {}</p>\
         <form method=\"get\">field <input name=\"field\" value=\"{}\"> = <input name=\"value\" value=\"{}\"> <button>query</button></form>\
         <table><tr><th>id</th><th>headline</th><th>state</th><th>master</th></tr>",
        escape(&session.replica),
        session.schema_repository_feature_level,
        session.user_database_feature_level,
        escape(query.get("field").map(String::as_str).unwrap_or("")),
        escape(query.get("value").map(String::as_str).unwrap_or("")),
    );
    for item in &items {
        let field = |name: &str| {
            item.fields
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let lock = lock_mark(item, &session.replica)
            .map(|m| format!(" <span class=\"lock\" title=\"{0}\">{0}</span>", escape(&m)))
            .unwrap_or_default();
        let _ = write!(
            body,
            "<tr id=\"{id}\"><td><a href=\"/records/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}{lock}</td></tr>",
            escape(&field("headline")),
            escape(&field("state")),
            escape(&item.master),
            id = escape(&item.id),
        );
    }
    body.push_str(
        "</table><h2>New record</h2><form method=\"post\" action=\"/records\">headline <input name=\"headline\"> <button>create</button></form>\
         <p><a href=\"/workspace\">workspace items</a></p>",
    );
    Html(page(&t, "records", &body)).into_response()
}

/// The workspace items (saved queries, reports, charts) at the replica, each with its
/// owner and, when mastered elsewhere, the lock mark: it can be changed only there.
async fn workspace(State(t): State<Shared>) -> Response {
    let session = match t.session().await {
        Ok(s) => s,
        Err(e) => return refused_page(&t, &e),
    };
    let items = match t.workspace_items().await {
        Ok(items) => items,
        Err(e) => return refused_page(&t, &e),
    };
    let mut body = format!(
        "<h1>Workspace items at {}</h1><table><tr><th>id</th><th>kind</th><th>name</th><th>owner</th><th>master</th></tr>",
        escape(&session.replica)
    );
    for item in &items {
        let lock = lock_mark(item, &session.replica)
            .map(|m| format!(" <span class=\"lock\" title=\"{0}\">{0}</span>", escape(&m)))
            .unwrap_or_default();
        let _ = write!(
            body,
            "<tr id=\"{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{lock}</td></tr>",
            escape(&item.item_type),
            escape(
                item.fields
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            ),
            escape(item.owner.as_deref().unwrap_or("")),
            escape(&item.master),
            id = escape(&item.id),
        );
    }
    body.push_str("</table><p><a href=\"/\">records</a></p>");
    Html(page(&t, "workspace items", &body)).into_response()
}

/// `GET /api/workspace`: the workspace items with `locked` and `master` for each.
async fn api_workspace(State(t): State<Shared>) -> Response {
    let session = match t.session().await {
        Ok(s) => s,
        Err(e) => return api_error(e),
    };
    match t.workspace_items().await {
        Ok(items) => {
            let list: Vec<Value> = items
                .iter()
                .map(|i| {
                    json!({"id": i.id, "kind": i.item_type, "fields": i.fields, "owner": i.owner,
                           "master": i.master, "locked": i.master != session.replica})
                })
                .collect();
            Json(json!({"replica": session.replica, "items": list})).into_response()
        }
        Err(e) => api_error(e),
    }
}

async fn view(State(t): State<Shared>, Path(id): Path<String>) -> Response {
    let session = match t.session().await {
        Ok(s) => s,
        Err(e) => return refused_page(&t, &e),
    };
    let item = match t.record(&id).await {
        Ok(item) => item,
        Err(e) => return refused_page(&t, &e),
    };
    let lock = lock_mark(&item, &session.replica);
    let mut body = format!("<h1>{}</h1>", escape(&item.id));
    if let Some(lock) = &lock {
        let _ = write!(
            body,
            "<p class=\"lock\" id=\"lock\">{}: change it there, or move its mastership here</p>",
            escape(lock)
        );
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"/records/{}\"><table>",
        escape(&item.id)
    ));
    for (name, value) in &item.fields {
        let text = value
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let _ = write!(
            body,
            "<tr><td>{0}</td><td><input name=\"{0}\" value=\"{1}\"{2}></td></tr>",
            escape(name),
            escape(&text),
            if lock.is_some() { " disabled" } else { "" }
        );
    }
    body.push_str("</table>");
    if lock.is_none() {
        body.push_str("<button>save</button>");
    }
    body.push_str("</form><p><a href=\"/\">all records</a></p>");
    Html(page(&t, &item.id, &body)).into_response()
}

async fn edit(
    State(t): State<Shared>,
    Path(id): Path<String>,
    Form(fields): Form<BTreeMap<String, String>>,
) -> Response {
    let update = UpdateItem {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
        mastership: None,
        via_gateway: false,
    };
    match t.update(&id, &update).await {
        Ok(_) => Redirect::to(&record_page(&id)).into_response(),
        Err(e) => refused_page(&t, &e),
    }
}

async fn create(State(t): State<Shared>, Form(fields): Form<BTreeMap<String, String>>) -> Response {
    let item = CreateItem {
        item_type: Some("Defect".into()),
        fields: fields
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
        owner: None,
    };
    match t.create(&item).await {
        Ok(item) => Redirect::to(&record_page(&item.id)).into_response(),
        Err(e) => refused_page(&t, &e),
    }
}

/// `GET /api/records`: the records with `locked` and `master` for each.
async fn api_list(
    State(t): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let session = match t.session().await {
        Ok(s) => s,
        Err(e) => return api_error(e),
    };
    match t.records(&query).await {
        Ok(items) => {
            let list: Vec<Value> = items
                .iter()
                .map(|i| json!({"id": i.id, "fields": i.fields, "master": i.master, "locked": i.master != session.replica}))
                .collect();
            Json(json!({"replica": session.replica, "items": list})).into_response()
        }
        Err(e) => api_error(e),
    }
}

async fn api_get(State(t): State<Shared>, Path(id): Path<String>) -> Response {
    match t.record(&id).await {
        Ok(item) => Json(item).into_response(),
        Err(e) => api_error(e),
    }
}

async fn api_patch(
    State(t): State<Shared>,
    Path(id): Path<String>,
    Json(update): Json<UpdateItem>,
) -> Response {
    match t.update(&id, &update).await {
        Ok(item) => Json(item).into_response(),
        Err(e) => api_error(e),
    }
}

async fn api_create(State(t): State<Shared>, Json(item): Json<CreateItem>) -> Response {
    match t.create(&item).await {
        Ok(item) => (StatusCode::CREATED, Json(item)).into_response(),
        Err(e) => api_error(e),
    }
}

/// Ready while the replica opens a session for this release.
async fn readyz(State(t): State<Shared>) -> Response {
    match t.session().await {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// The client tier's HTTP API and page.
pub fn router(tier: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/records", axum::routing::post(create))
        .route("/records/{id}", get(view).post(edit))
        .route("/api/records", get(api_list).post(api_create))
        .route("/api/records/{id}", get(api_get).patch(api_patch))
        .route("/workspace", get(workspace))
        .route("/api/workspace", get(api_workspace))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(tier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_lock_marks() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let item = Item {
            id: "SAMPL00001".into(),
            item_type: "Defect".into(),
            fields: BTreeMap::new(),
            master: "paris".into(),
            version: 1,
            deleted: false,
            owner: None,
        };
        assert_eq!(
            lock_mark(&item, "tokyo").as_deref(),
            Some("🔒 mastered at paris")
        );
        assert_eq!(lock_mark(&item, "paris"), None);
        assert_eq!(record_page("a b&c"), "/records/a%20b%26c");
    }
}
