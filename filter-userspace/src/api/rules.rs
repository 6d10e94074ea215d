//! `/v1/policy` and `/v1/rules`: the policy and its rules, read and written. A write is checked
//! against the revision it names (`If-Match`: 412; `revision` in the body: 409), answers what
//! it would change instead with `?dry_run=true` ([`DryRun`]), and otherwise goes in through
//! [`commit`] on a blocking thread.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::error::{bad_request, parse_json};
use super::state::{commit, Change, Inner};
use super::{Actor, ApiError, AppState};
use crate::policy::{self, MatchKind, Policy, PolicyFile, Rule, RuleKey, RuleSetSpec, RuleSpec};
use crate::serve::Peer;

pub(super) fn etag(revision: u64) -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits are a valid header"),
    )]
}

/// Check `If-Match` (412 when stale) and a body `revision` (409 when stale).
fn check_revision(
    headers: &HeaderMap,
    body_revision: Option<u64>,
    current: u64,
) -> Result<(), ApiError> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let text = v
            .to_str()
            .map_err(|_| bad_request("If-Match: not visible ASCII"))?
            .trim();
        if text != "*" {
            let ok = text.split(',').map(str::trim).try_fold(false, |acc, tag| {
                let n = tag
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .parse::<u64>()
                    .map_err(|_| {
                        bad_request(format!(
                            "If-Match: {tag:?} is not a revision (send the ETag of GET /v1/rules, e.g. \"{current}\")"
                        ))
                    })?;
                Ok::<bool, ApiError>(acc || n == current)
            })?;
            if !ok {
                return Err(ApiError(
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "If-Match: the policy is at revision {current}; read it again and retry"
                    ),
                ));
            }
        }
    }
    if let Some(r) = body_revision {
        if r != current {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("revision: {r} is stale, the policy is at revision {current}; read it again and retry"),
            ));
        }
    }
    Ok(())
}

/// `?dry_run=true` on a write.
#[derive(Deserialize, Default)]
pub(super) struct WriteQuery {
    dry_run: Option<bool>,
}

/// The answer to a write with `?dry_run=true`: what it would change.
#[derive(Serialize)]
pub struct DryRun {
    pub dry_run: bool,
    /// The revision in force (nothing changed).
    pub revision: u64,
    /// The revision the change would make.
    pub would_be_revision: u64,
    pub changes: crate::diff::PolicyDiff,
}

/// Commit `next` (reached from the policy in force by `change`) as the next revision; with
/// `dry`, change nothing and answer what it would change (`Some`).
fn commit_or_dry(
    state: &AppState,
    inner: &mut Inner,
    next: Policy,
    change: Change,
    actor: &Actor,
    dry: bool,
) -> Result<Option<Response>, ApiError> {
    if dry {
        return Ok(Some(dry_run_answer(inner, &next)));
    }
    let revision = inner.revision + 1;
    commit(&state.0, inner, next, change, revision, actor)?;
    Ok(None)
}

fn dry_run_answer(inner: &Inner, next: &Policy) -> Response {
    (
        etag(inner.revision),
        Json(DryRun {
            dry_run: true,
            revision: inner.revision,
            would_be_revision: inner.revision + 1,
            changes: crate::diff::diff(&inner.policy, next),
        }),
    )
        .into_response()
}

fn query_of(
    q: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<bool, ApiError> {
    Ok(q.map_err(|e| bad_request(format!("query: {e}")))?
        .0
        .dry_run
        .unwrap_or(false))
}

fn peer_of(p: &Option<Extension<Peer>>) -> Option<&Peer> {
    p.as_ref().map(|Extension(p)| p)
}

pub(super) async fn get_policy(State(state): State<AppState>) -> Response {
    let inner = state.lock();
    (
        etag(inner.revision),
        Json(inner.policy.to_file(Some(inner.revision))),
    )
        .into_response()
}

pub(super) async fn put_policy(
    State(state): State<AppState>,
    peer: Option<Extension<Peer>>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry = query_of(query)?;
    let actor = Actor::api(peer_of(&peer));
    off_the_workers(move || {
        let doc: PolicyFile = parse_json(&body)?;
        let next = Policy::from_file(&doc).map_err(|e| bad_request(e.to_string()))?;
        let mut inner = state.lock();
        check_revision(&headers, doc.revision, inner.revision)?;
        if let Some(answer) = commit_or_dry(&state, &mut inner, next, Change::Replace, &actor, dry)?
        {
            return Ok(answer);
        }
        Ok((
            etag(inner.revision),
            Json(inner.policy.to_file(Some(inner.revision))),
        )
            .into_response())
    })
    .await
}

/// Run a policy change on a blocking thread: parsing, validating and writing a large policy
/// takes hundreds of milliseconds, and an async worker busy with it would hold up the tasks
/// queued behind it (the responder's 405s among them).
async fn off_the_workers<F>(change: F) -> Result<Response, ApiError>
where
    F: FnOnce() -> Result<Response, ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(change).await {
        Ok(r) => r,
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change did not complete: {e}"),
        )),
    }
}

fn rule_set(inner: &Inner) -> Response {
    (
        etag(inner.revision),
        Json(RuleSetSpec {
            revision: Some(inner.revision),
            rules: inner.policy.specs(),
        }),
    )
        .into_response()
}

pub(super) async fn list_rules(State(state): State<AppState>) -> Response {
    rule_set(&state.lock())
}

pub(super) async fn replace_rules(
    State(state): State<AppState>,
    peer: Option<Extension<Peer>>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry = query_of(query)?;
    let actor = Actor::api(peer_of(&peer));
    off_the_workers(move || {
        let spec: RuleSetSpec = parse_json(&body)?;
        let mut inner = state.lock();
        check_revision(&headers, spec.revision, inner.revision)?;
        let next = inner
            .policy
            .with_rules(&spec.rules)
            .map_err(|e| bad_request(e.to_string()))?;
        if let Some(answer) = commit_or_dry(&state, &mut inner, next, Change::Replace, &actor, dry)?
        {
            return Ok(answer);
        }
        Ok(rule_set(&inner))
    })
    .await
}

/// The answer to `POST /v1/rules`.
#[derive(Serialize, Deserialize)]
pub struct RuleChange {
    pub revision: u64,
    pub rule: RuleSpec,
}

pub(super) async fn upsert_rule(
    State(state): State<AppState>,
    peer: Option<Extension<Peer>>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dry = query_of(query)?;
    let actor = Actor::api(peer_of(&peer));
    let spec: RuleSpec = parse_json(&body)?;
    let rule = Rule::from_spec(0, &spec)
        .map_err(|e| bad_request(e.to_string().replacen("rules[0].", "", 1)))?;
    off_the_workers(move || {
        let mut inner = state.lock();
        check_revision(&headers, None, inner.revision)?;
        inner
            .policy
            .admits(0, &rule)
            .map_err(|e| bad_request(e.to_string().replacen("rules[0].", "", 1)))?;
        let key = rule.key();
        let is_new = !inner.policy.rules.contains_key(&key);
        let mut next = inner.policy.clone();
        next.rules.insert(key, rule.clone());
        if next.check_capacity().is_err() {
            return Err(ApiError(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the {} policy map is full", rule.kind),
            ));
        }
        let out = rule.to_spec();
        if let Some(answer) =
            commit_or_dry(&state, &mut inner, next, Change::Upsert(rule), &actor, dry)?
        {
            return Ok(answer);
        }
        let revision = inner.revision;
        let status = if is_new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((
            status,
            etag(revision),
            Json(RuleChange {
                revision,
                rule: out,
            }),
        )
            .into_response())
    })
    .await
}

#[derive(Deserialize)]
pub(super) struct RuleQuery {
    path: Option<String>,
    #[serde(rename = "match")]
    match_kind: Option<String>,
    dry_run: Option<bool>,
}

pub(super) async fn remove_rule(
    State(state): State<AppState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    query: Result<Query<RuleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query.map_err(|e| bad_request(format!("query: {e}")))?.0;
    let dry = q.dry_run.unwrap_or(false);
    let actor = Actor::api(peer_of(&peer));
    let path = q.path.ok_or_else(|| {
        bad_request("query parameter `path` is required: DELETE /v1/rules?path=/api/items")
    })?;
    let kind = match q.match_kind.as_deref() {
        None => MatchKind::Exact,
        Some(s) => MatchKind::parse(s).ok_or_else(|| {
            bad_request(format!("match: {s:?} is neither \"exact\" nor \"prefix\""))
        })?,
    };
    // The rule is stored under its canonical path; `/%61dmin` names the rule for `/admin`.
    let path = policy::canonical_path(&path, kind)
        .map_err(|why| bad_request(format!("path {path:?}: {why}")))?;
    let key = RuleKey { path, kind };
    off_the_workers(move || {
        let mut inner = state.lock();
        check_revision(&headers, None, inner.revision)?;
        if !inner.policy.rules.contains_key(&key) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no {} rule for path {:?}", key.kind, key.path),
            ));
        }
        let mut next = inner.policy.clone();
        next.rules.remove(&key);
        if let Some(answer) =
            commit_or_dry(&state, &mut inner, next, Change::Remove(key), &actor, dry)?
        {
            return Ok(answer);
        }
        let revision = inner.revision;
        Ok((StatusCode::NO_CONTENT, etag(revision)).into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testing::*;
    use serde_json::json;

    #[tokio::test]
    async fn rules_lifecycle() {
        let (app, log) = app(false);
        let (s, _) = call(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/api/items","methods":["GET","POST"]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, _) = call(
            &app,
            "POST",
            "/v1/rules",
            r#"{"path":"/api/items","methods":["GET"]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, body) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            body,
            json!({"revision": 2, "rules":[{"path":"/api/items","methods":["GET"]}]})
        );
        let (s, _) = call(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"rules":[{"path":"/a","methods":["PUT"]},{"path":"/b/","match":"prefix","mode":"monitor","methods":["GET"]}]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (_, body) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(
            body["rules"][1],
            json!({"path":"/b/","match":"prefix","mode":"monitor","methods":["GET"]})
        );
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=//%61", "").await.0,
            StatusCode::NO_CONTENT,
            "the query names the rule by any spelling of its path"
        );
        let (s, body) = call(&app, "DELETE", "/v1/rules?path=/a", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("/a"));
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=/b/", "").await.0,
            StatusCode::NOT_FOUND,
            "the prefix rule is not the exact rule"
        );
        assert_eq!(
            call(&app, "DELETE", "/v1/rules?path=/b/&match=prefix", "")
                .await
                .0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            *log.lock().unwrap(),
            [
                "upsert /api/items",
                "upsert /api/items",
                "replace 2",
                "remove exact /a",
                "remove prefix /b/"
            ]
        );
        let (s, body) = call(&app, "GET", "/v1/stats", "").await;
        assert_eq!(
            (s, &body["counters"]["rejected"]),
            (StatusCode::OK, &json!(3))
        );
        assert_eq!(call(&app, "GET", "/healthz", "").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn whole_policy_switches_round_trip() {
        let (app, log) = app(false);
        let doc = json!({"default":["GET"],"options":"answer","oversize":"pass","paths":"normalize",
            "rules":[{"path":"/x","methods":["GET"],"head":false}]});
        let r = send(&app, "PUT", "/v1/policy", &doc.to_string(), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let mut want = doc.clone();
        want["revision"] = json!(1);
        assert_eq!(r.json, want);
        assert_eq!(r.headers[header::ETAG], "\"1\"");
        assert_eq!(call(&app, "GET", "/v1/policy", "").await.1, want);
        // PUT /v1/rules keeps the switches.
        call(&app, "PUT", "/v1/rules", r#"{"rules":[]}"#).await;
        let (_, p) = call(&app, "GET", "/v1/policy", "").await;
        assert_eq!(
            (&p["options"], &p["default"], &p["paths"]),
            (&json!("answer"), &json!(["GET"]), &json!("normalize"))
        );
        assert_eq!(*log.lock().unwrap(), ["replace 1", "replace 0"]);
    }

    #[tokio::test]
    async fn bad_input_is_a_400_that_names_the_problem_and_changes_nothing() {
        let (app, log) = app(false);
        let cases = [
            ("POST", "/v1/rules", "{", "invalid JSON"),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"api","methods":["GET"]}"#,
                "path \"api\": must start with '/'",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","methods":["GE T"]}"#,
                "not a method token",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","methods":[]}"#,
                "methods: the list is empty",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","methods":["GET"],"extra":1}"#,
                "unknown field",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","match":"prefix","methods":["GET"]}"#,
                "path \"/a\": a prefix rule's path must end in '/'",
            ),
            (
                "POST",
                "/v1/rules",
                r#"{"path":"/a","mode":"loud","methods":["GET"]}"#,
                "mode: \"loud\"",
            ),
            (
                "PUT",
                "/v1/rules",
                r#"{"rules":[{"path":"/a","methods":["GET"]},{"path":"b","methods":["GET"]}]}"#,
                "rules[1].path",
            ),
            (
                "PUT",
                "/v1/policy",
                r#"{"options":"reply","rules":[]}"#,
                "options: \"reply\"",
            ),
            (
                "PUT",
                "/v1/policy",
                r#"{"paths":"lenient","rules":[]}"#,
                "paths: \"lenient\"",
            ),
            (
                "PUT",
                "/v1/policy",
                r#"{"default":"none"}"#,
                "default: \"none\"",
            ),
            ("DELETE", "/v1/rules", "", "`path` is required"),
            (
                "DELETE",
                "/v1/rules?path=/a&match=glob",
                "",
                "match: \"glob\"",
            ),
        ];
        for (method, uri, body, want) in cases {
            let (s, json) = call(&app, method, uri, body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} {body}");
            let msg = json["error"].as_str().unwrap();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        }
        assert!(log.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn stale_revisions_are_refused_and_change_nothing() {
        let (app, state) = secured(None);
        let add = |rev: &'static str| {
            let app = app.clone();
            async move {
                send(
                    &app,
                    "POST",
                    "/v1/rules",
                    r#"{"path":"/a","methods":["GET"]}"#,
                    &[bearer(), ("if-match", rev)],
                )
                .await
            }
        };
        let r = add("\"0\"").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.headers[header::ETAG], "\"1\"");
        assert_eq!(r.json["revision"], 1);
        let r = add("\"0\"").await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
        assert!(r.text.contains("revision 1"), "{}", r.text);
        assert_eq!(add("\"x\"").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(add("*").await.status, StatusCode::OK);
        assert_eq!(state.revision(), 2);
        let r = send(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"revision":1,"rules":[]}"#,
            &[bearer()],
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
        assert!(r.json["error"]
            .as_str()
            .unwrap()
            .starts_with("revision: 1 is stale"));
        let r = send(
            &app,
            "DELETE",
            "/v1/rules?path=/a",
            "",
            &[bearer(), ("if-match", "W/\"1\"")],
        )
        .await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(state.policy().rules.len(), 1, "nothing changed");
        let r = send(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"revision":2,"rules":[]}"#,
            &[bearer()],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!((state.revision(), state.policy().rules.len()), (3, 0));
    }

    #[tokio::test]
    async fn dry_runs_answer_the_changes_and_change_nothing() {
        let (app, log) = app(false);
        call(
            &app,
            "PUT",
            "/v1/rules",
            r#"{"rules":[{"path":"/a","methods":["GET"]},{"path":"/b","methods":["GET"]}]}"#,
        )
        .await;
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=true",
            r#"{"rules":[{"path":"/%61","methods":["GET","PUT"]},{"path":"/c/","match":"prefix","methods":["GET"]}]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json["dry_run"], true);
        assert_eq!(
            (&r.json["revision"], &r.json["would_be_revision"]),
            (&json!(1), &json!(2))
        );
        let c = &r.json["changes"];
        assert_eq!(
            c["added"],
            json!([{"path":"/c/","match":"prefix","methods":["GET"]}])
        );
        assert_eq!(c["removed"], json!([{"path":"/b","methods":["GET"]}]));
        assert_eq!(c["changed"][0]["after"]["methods"], json!(["GET", "PUT"]));
        // The other writes too; none of them reaches the dataplane or the revision.
        let r = send(
            &app,
            "PUT",
            "/v1/policy?dry_run=true",
            r#"{"default":["GET"],"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(
            r.json["changes"]["switches"][0]["field"], "default",
            "{}",
            r.text
        );
        assert_eq!(r.json["changes"]["removed"].as_array().unwrap().len(), 2);
        let r = send(
            &app,
            "POST",
            "/v1/rules?dry_run=true",
            r#"{"path":"/z","methods":["GET"]}"#,
            &[],
        )
        .await;
        assert_eq!(r.json["changes"]["added"][0]["path"], "/z");
        let r = send(&app, "DELETE", "/v1/rules?path=/a&dry_run=true", "", &[]).await;
        assert_eq!(r.json["changes"]["removed"][0]["path"], "/a", "{}", r.text);
        // Invalid input and stale revisions are refused as without dry_run.
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=true",
            r#"{"revision":0,"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        let r = send(
            &app,
            "PUT",
            "/v1/rules?dry_run=maybe",
            r#"{"rules":[]}"#,
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(*log.lock().unwrap(), ["replace 2"]);
        let (_, rules) = call(&app, "GET", "/v1/rules", "").await;
        assert_eq!(rules["revision"], 1);
    }
}
