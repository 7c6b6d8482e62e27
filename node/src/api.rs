//! The control API: HTTP/JSON on a Unix socket (mode 0660), like Docker's. The CLI is its
//! client; `curl --unix-socket <data dir>/weft.sock http://weft/members` works too.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | `{"status":"ok","name":..,"connected":..}` |
//! | GET | `/metrics` | Prometheus text |
//! | GET | `/members` | `{"members":[{name,addr,instance,generation,data_addr,state,incarnation,networks}],"unreachable_seeds":[..]}` |
//! | POST | `/leave` | leave the cluster for good; the agent exits once the news is out |
//! | GET, POST | `/networks` | list; create `{name,driver,subnets,gateway}` |
//! | GET, DELETE | `/networks/{ref}` | inspect (`?verbose=true` adds entries); remove (`?force=true`) |
//! | POST | `/networks/{ref}/attach`, `/networks/{ref}/detach` | attach or detach this node |
//! | GET | `/dump` | `?network=&table=`: every entry this node holds |
//! | GET, PUT, DELETE | `/tables/{network}/{table}/{key}` | raw value; `?force=true` for protected tables |
//! | POST | `/tables/{network}/{table}` | load: one `key value` per line of the body |
//! | GET | `/endpoints` | `?network=`: endpoints this node sees `[{id,name,network,network_id,node,instance,ipv4,mac,gateway}]` |
//! | POST | `/networks/{ref}/endpoints` | create `{name,ip,mac}` (attaches this node if needed); the endpoint |
//! | GET, DELETE | `/networks/{ref}/endpoints/{ref}` | inspect; remove (this node's own only) |
//!
//! Errors are `{"error": "<one line>"}` with a 4xx status, or 504 when a write got no reply in
//! time (10 s; a load gets one more second per 5,000 keys, at most 50 s). A 504 does not
//! cancel the write: it may still complete, so a client that retries must not assume it did
//! not happen (puts and attaches are idempotent; a `network create` retried after a 504 may
//! find its name taken by its first attempt).
//!
//! A write is answered once it is applied and whatever it rests on is durable. When the data
//! dir cannot be written, the write stays applied in memory and the store retries it every
//! second: the answer waits (and times out with the store's error in it), nothing that depends
//! on it leaves the node meanwhile, and `/health` says `degraded` with the error. Reads never
//! wait for writes and see them as soon as they are applied.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::agent::{Command, Dump, NetworkDef, NetworkInfo, Reply};
use crate::alloc::{Endpoint, IPAM_TABLE, RingReport};
use crate::error::AgentError;
use crate::read;
use crate::shell::{CommandError, Shell};

/// A member in `GET /members` and `weft members --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberJson {
    pub name: String,
    pub addr: String,
    /// The member's instance id (16 hex digits): a new one means a reinstalled host.
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub generation: u64,
    /// Its data-plane (VTEP) address, from its node record, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_addr: Option<String>,
    pub state: String,
    pub incarnation: u16,
    pub networks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersJson {
    pub members: Vec<MemberJson>,
    pub unreachable_seeds: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateNetwork {
    pub name: String,
    #[serde(default = "default_driver")]
    pub driver: String,
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    /// Driver options (`-o KEY=VALUE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

fn default_driver() -> String {
    "overlay".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspect {
    pub network: NetworkInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump: Option<Dump>,
    /// With `?verbose=true`: who owns which part of each subnet, as the replicated ring says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
    /// With `?verbose=true`: this node's own view of each of the network's rings (free, used,
    /// held back, a donation it waits for, the owners asked last time none had space).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<RingReport>,
    /// With `?verbose=true`, for an overlay network: the driver's peer records and what it
    /// asked the data plane for, what the kernel holds, and how they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayInspect>,
}

/// An overlay network on this host, as the driver and the kernel see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayInspect {
    pub driver: weft_overlay::driver::NetReport,
    /// Read back from the kernel (absent without a data plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<weft_overlay::KernelView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_error: Option<String>,
    /// Where the kernel differs from what the driver asked for.
    #[serde(default)]
    pub differences: Vec<String>,
}

/// One node's share of a ring, as the replicated claims say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub ring: String,
    /// `name@instance`.
    pub node: String,
    pub ranges: Vec<String>,
    pub blocks: u64,
    /// Free blocks it last advertised (what it could donate).
    pub free_blocks: Option<u64>,
    /// Its endpoints in the network.
    pub endpoints: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateEndpoint {
    pub name: String,
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
    #[serde(default)]
    pub mac: Option<String>,
    /// A network namespace path: the endpoint gets an interface there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// The shares of a network's subnet rings.
pub fn shares(view: &impl read::TableRead, def: &NetworkDef) -> Vec<Share> {
    let entries: Vec<weft_ipam::RingEntry> = view
        .live(&def.id, IPAM_TABLE)
        .into_iter()
        .filter_map(|(_, v)| crate::alloc::decode_entry(&v))
        .collect();
    let eps = read::endpoints(view, Some(&def.id)).unwrap_or_default();
    let mut out = Vec::new();
    for s in &def.subnets {
        let Ok(net) = s.parse::<ipnet::IpNet>() else { continue };
        for crate::alloc::OwnerShare { owner: node, ranges, blocks, free_blocks } in
            crate::alloc::shares(&entries, &net.to_string())
        {
            let ranges = ranges
                .iter()
                .map(|&(a, b)| {
                    format!("{}-{}", weft_ipam::net::addr_at(&net, a), weft_ipam::net::addr_at(&net, b - 1))
                })
                .collect();
            let name = weft_ipam::ring::member_name(&node).to_string();
            let endpoints = eps.iter().filter(|e| e.node == name).count();
            out.push(Share { ring: net.to_string(), node, ranges, blocks, free_blocks, endpoints });
        }
    }
    out
}

#[derive(Debug, Default, Deserialize)]
struct Flags {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    verbose: bool,
    network: Option<String>,
    table: Option<String>,
}

struct ApiError(u16, String);

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError(e.status(), e.to_string())
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Agent(e) => e.into(),
            // 504: the command may still complete.
            CommandError::Timeout(m) => ApiError(504, m),
            CommandError::Stopped => ApiError(503, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs a long read on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError(500, format!("read failed: {e}")))
}

pub fn members_json(shell: &Shell) -> MembersJson {
    let snap = shell.read().snap;
    let mut unreachable_seeds: Vec<String> = snap.unreachable_seeds.iter().map(ToString::to_string).collect();
    unreachable_seeds.extend(shell.unresolved_seeds().into_iter().map(|s| format!("{s} (unresolved)")));
    MembersJson {
        members: snap
            .members
            .iter()
            .map(|m| MemberJson {
                name: m.id.name.to_string(),
                addr: m.id.addr.to_string(),
                instance: m.id.instance_hex(),
                generation: m.id.generation,
                data_addr: m.data_addr.map(|a| a.to_string()),
                state: m.state.as_str().to_string(),
                incarnation: m.incarnation,
                networks: m.networks.clone(),
            })
            .collect(),
        unreachable_seeds,
    }
}

async fn health(State(s): State<Shell>) -> Json<serde_json::Value> {
    let snap = s.read().snap;
    let mut v = json!({ "status": "ok", "name": snap.id.name.to_string(), "connected": snap.connected });
    if let Some(e) = &snap.persist_failing {
        v["status"] = json!("degraded");
        v["store_error"] = json!(e);
    }
    Json(v)
}

async fn metrics(State(s): State<Shell>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics()).into_response()
}

async fn members(State(s): State<Shell>) -> Json<MembersJson> {
    Json(members_json(&s))
}

async fn leave(State(s): State<Shell>) -> StatusCode {
    s.request_leave();
    StatusCode::ACCEPTED
}

async fn list_networks(State(s): State<Shell>) -> Json<Vec<NetworkInfo>> {
    Json(read::network_list(&s.read()))
}

fn network_reply(r: Reply) -> ApiResult<Json<NetworkDef>> {
    match r {
        Reply::Network(d) => Ok(Json(d)),
        other => Err(ApiError(500, format!("unexpected reply {other:?}"))),
    }
}

async fn create_network(State(s): State<Shell>, body: Bytes) -> ApiResult<Json<NetworkDef>> {
    let req: CreateNetwork =
        serde_json::from_slice(&body).map_err(|e| ApiError(400, format!("bad request body: {e}")))?;
    let cmd = Command::CreateNetwork {
        name: req.name,
        driver: req.driver,
        subnets: req.subnets,
        gateway: req.gateway,
        options: req.options,
    };
    network_reply(s.command(cmd).await?)
}

async fn inspect_network(
    State(s): State<Shell>,
    UrlPath(r): UrlPath<String>,
    Query(f): Query<Flags>,
) -> ApiResult<Json<Inspect>> {
    // A verbose inspect walks whole tables: off the runtime's workers.
    let shell = s.clone();
    let out = blocking(move || -> Result<(Inspect, bool), AgentError> {
        let view = shell.read();
        let network = read::resolve(&view, &r)?;
        let dump = if f.verbose { Some(read::dump(&view, Some(&network.def.id), None)?) } else { None };
        let (shares, local) = if f.verbose {
            let local =
                view.snap.alloc.rings.iter().filter(|r| r.network == network.def.id).cloned().collect();
            (shares(&view, &network.def), local)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok((Inspect { network, dump, shares, local, overlay: None }, f.verbose))
    })
    .await??;
    let (mut out, overlay) = out;
    let driver = if overlay { s.overlay_network(&out.network.def.id).await } else { None };
    if let Some(driver) = driver {
        let (kernel, kernel_error) = match s.kernel_view(&out.network.def.id).await {
            None => (None, None),
            Some(Ok(k)) => (Some(k), None),
            Some(Err(e)) => (None, Some(e.to_string())),
        };
        let differences = kernel
            .as_ref()
            .map(|k| k.differences(driver.sandbox, &driver.neighbours, &driver.fdb))
            .unwrap_or_default();
        out.overlay = Some(OverlayInspect { driver, kernel, kernel_error, differences });
    }
    Ok(Json(out))
}

async fn remove_network(
    State(s): State<Shell>,
    UrlPath(r): UrlPath<String>,
    Query(f): Query<Flags>,
) -> ApiResult<Json<NetworkDef>> {
    network_reply(s.command(Command::RemoveNetwork { network: r, force: f.force }).await?)
}

async fn attach(State(s): State<Shell>, UrlPath(r): UrlPath<String>) -> ApiResult<Json<NetworkDef>> {
    network_reply(s.command(Command::Attach { network: r }).await?)
}

async fn detach(State(s): State<Shell>, UrlPath(r): UrlPath<String>) -> ApiResult<Json<NetworkDef>> {
    network_reply(s.command(Command::Detach { network: r }).await?)
}

async fn dump(State(s): State<Shell>, Query(f): Query<Flags>) -> ApiResult<Json<Dump>> {
    // A dump walks whole tables: off the runtime's workers, so the agent's task never waits
    // for a worker behind it.
    let d = blocking(move || read::dump(&s.read(), f.network.as_deref(), f.table.as_deref())).await??;
    Ok(Json(d))
}

async fn table_get(
    State(s): State<Shell>,
    UrlPath((net, table, key)): UrlPath<(String, String, String)>,
) -> ApiResult<Response> {
    match read::table_get(&s.read(), &net, &table, &key)? {
        Some(v) => Ok(([(header::CONTENT_TYPE, "application/octet-stream")], v).into_response()),
        None => Err(ApiError(404, format!("no live entry {net}/{table}/{key}"))),
    }
}

async fn table_put(
    State(s): State<Shell>,
    UrlPath((network, table, key)): UrlPath<(String, String, String)>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    s.command(Command::TablePut { network, table, key, value: body, force: f.force }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn table_rm(
    State(s): State<Shell>,
    UrlPath((network, table, key)): UrlPath<(String, String, String)>,
    Query(f): Query<Flags>,
) -> ApiResult<StatusCode> {
    s.command(Command::TableRm { network, table, key, force: f.force }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Parses `key value` lines (value may contain spaces; blank lines and `#` comments skipped).
pub fn parse_load(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match line.trim_start().split_once(char::is_whitespace) {
            Some((k, v)) => out.push((k.to_string(), v.trim_start().to_string())),
            None => return Err(format!("line {}: expected `key value`, got {line:?}", i + 1)),
        }
    }
    Ok(out)
}

async fn table_load(
    State(s): State<Shell>,
    UrlPath((net, table)): UrlPath<(String, String)>,
    Query(f): Query<Flags>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let text = std::str::from_utf8(&body).map_err(|_| ApiError(400, "load body is not UTF-8".into()))?;
    let pairs = parse_load(text).map_err(|e| ApiError(400, e))?;
    let written = match s.command(Command::TableLoad { network: net, table, pairs, force: f.force }).await? {
        Reply::Written(n) => n,
        other => return Err(ApiError(500, format!("unexpected reply {other:?}"))),
    };
    Ok(Json(json!({ "written": written })))
}

fn endpoint_reply(r: Reply) -> ApiResult<Json<Endpoint>> {
    match r {
        Reply::Endpoint(e) => Ok(Json(e)),
        other => Err(ApiError(500, format!("unexpected reply {other:?}"))),
    }
}

async fn create_endpoint(
    State(s): State<Shell>,
    UrlPath(network): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Json<Endpoint>> {
    let req: CreateEndpoint =
        serde_json::from_slice(&body).map_err(|e| ApiError(400, format!("bad request body: {e}")))?;
    endpoint_reply(
        s.command(Command::EndpointCreate {
            network,
            name: req.name,
            ip: req.ip,
            mac: req.mac,
            sandbox: req.sandbox,
        })
        .await?,
    )
}

async fn list_endpoints(State(s): State<Shell>, Query(f): Query<Flags>) -> ApiResult<Json<Vec<Endpoint>>> {
    let view = s.read();
    let nid = match &f.network {
        Some(n) => Some(read::resolve(&view, n)?.def.id),
        None => None,
    };
    Ok(Json(read::endpoints(&view, nid.as_deref())?))
}

async fn inspect_endpoint(
    State(s): State<Shell>,
    UrlPath((net, ep)): UrlPath<(String, String)>,
) -> ApiResult<Json<Endpoint>> {
    let view = s.read();
    let n = read::resolve(&view, &net)?;
    let all = read::endpoints(&view, Some(&n.def.id))?;
    Ok(Json(read::find_endpoint(&all, &ep, &n.def.name)?))
}

async fn remove_endpoint(
    State(s): State<Shell>,
    UrlPath((network, endpoint)): UrlPath<(String, String)>,
) -> ApiResult<Json<Endpoint>> {
    endpoint_reply(s.command(Command::EndpointRm { network, endpoint }).await?)
}

/// `DELETE /nodes/{name[@instance]}?force=`: `weft node rm`.
async fn remove_node(
    State(s): State<Shell>,
    UrlPath(node): UrlPath<String>,
    Query(f): Query<Flags>,
) -> ApiResult<Json<crate::alloc::NodeRmReply>> {
    match s.command(Command::NodeRm { node, force: f.force }).await? {
        Reply::NodeRemoved(r) => Ok(Json(r)),
        other => Err(ApiError(500, format!("unexpected reply {other:?}"))),
    }
}

pub fn router(shell: Shell) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/members", get(members))
        .route("/leave", post(leave))
        .route("/networks", get(list_networks).post(create_network))
        .route("/networks/{net}", get(inspect_network).delete(remove_network))
        .route("/networks/{net}/attach", post(attach))
        .route("/networks/{net}/detach", post(detach))
        .route("/networks/{net}/endpoints", post(create_endpoint))
        .route("/networks/{net}/endpoints/{ep}", get(inspect_endpoint).delete(remove_endpoint))
        .route("/endpoints", get(list_endpoints))
        .route("/nodes/{node}", axum::routing::delete(remove_node))
        .route("/dump", get(dump))
        .route("/tables/{net}/{table}", post(table_load))
        .route("/tables/{net}/{table}/{key}", get(table_get).put(table_put).delete(table_rm))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(shell)
}

/// Binds the control socket (mode 0660), refusing if an agent already answers on it.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    crate::shell::check_socket_free(path)?;
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves the API on `path` until the task is dropped.
pub async fn serve(shell: Shell, path: &Path) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    Ok(serve_on(shell, bind(path)?))
}

/// Serves the API on a bound socket until the task is dropped.
pub fn serve_on(shell: Shell, listener: tokio::net::UnixListener) -> tokio::task::JoinHandle<()> {
    let app = router(shell);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "control API stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_load;

    #[test]
    fn load_lines_are_key_then_value() {
        let got = parse_load("a 1\n\n# comment\nb two words\r\n  c\t3\n").unwrap();
        assert_eq!(
            got,
            vec![("a".into(), "1".into()), ("b".into(), "two words".into()), ("c".into(), "3".into())]
        );
        assert_eq!(parse_load("lonely\n").unwrap_err(), "line 1: expected `key value`, got \"lonely\"");
    }
}
