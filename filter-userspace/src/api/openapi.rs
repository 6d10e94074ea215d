//! The OpenAPI 3.1 document (`GET /v1/openapi.json`), generated from the route table's
//! [`RouteDoc`]s, and the JSON Schemas of the documents the routes read and write.

use serde_json::{json, Value};

use super::{RouteDoc, ERR, OPENAPI_PATH};

/// JSON Schemas of the documents, keyed by the names [`RouteDoc`]s use. The tests check them
/// against what serde reads and writes, so they cannot drift from the types.
pub fn schemas() -> Value {
    let methods = json!({
        "type": "array", "minItems": 1,
        "items": {"type": "string", "description": "An HTTP method token, e.g. GET"}
    });
    json!({
        "Rule": {
            "type": "object", "additionalProperties": false,
            "required": ["path", "methods"],
            "properties": {
                "path": {"type": "string", "description": "Absolute path; a prefix rule's ends in '/'"},
                "methods": methods,
                "match": {"type": "string", "enum": ["exact", "prefix"], "default": "exact"},
                "mode": {"type": "string", "enum": ["enforce", "monitor"], "default": "enforce"},
                "head": {"type": "boolean", "default": true, "description": "GET implies HEAD"}
            }
        },
        "RuleSet": {
            "type": "object", "additionalProperties": false,
            "required": ["rules"],
            "properties": {
                "revision": {"type": "integer", "minimum": 0, "description": "On writes: the revision the change is based on (409 if stale)"},
                "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}}
            }
        },
        "RuleChange": {
            "type": "object", "additionalProperties": false,
            "required": ["revision", "rule"],
            "properties": {
                "revision": {"type": "integer", "minimum": 0},
                "rule": {"$ref": "#/components/schemas/Rule"}
            }
        },
        "Policy": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "revision": {"type": "integer", "minimum": 0, "description": "On writes: the revision the change is based on (409 if stale)"},
                "default": {"oneOf": [{"type": "string", "enum": ["any"]}, methods], "default": "any"},
                "options": {"type": "string", "enum": ["pass", "answer"], "default": "pass"},
                "oversize": {"type": "string", "enum": ["reject", "pass"], "default": "reject"},
                "paths": {"type": "string", "enum": ["strict", "normalize"], "default": "strict",
                    "description": "strict: 400 for a request path not in normal form; normalize: canonicalize it and judge it under every reading backends give it"},
                "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}}
            }
        },
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "string"}}
        },
        "Health": {
            "type": "object", "properties": {"status": {"type": "string"}}
        },
        "Stats": {
            "type": "object",
            "properties": {
                "counters": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_rule": {
                    "type": "array",
                    "description": "Rejections and monitor hits by the rule that matched and method; at most 1000 rules, later ones under rule \"(other)\", no rule: \"(default)\"",
                    "items": {
                        "type": "object",
                        "properties": {
                            "rule": {"type": "string"},
                            "match": {"type": "string", "enum": ["exact", "prefix", "none"]},
                            "method": {"type": "string"},
                            "outcome": {"type": "string", "enum": ["rejected", "monitored"]},
                            "count": {"type": "integer"}
                        }
                    }
                },
                "rules": {"type": "integer"},
                "revision": {"type": "integer"}
            }
        },
        "Readiness": {
            "type": "object", "required": ["ready", "missing"],
            "properties": {
                "ready": {"type": "boolean"},
                "missing": {"type": "array", "items": {"type": "string"}, "description": "`IFACE HOOK: why` for each classifier not attached"}
            }
        },
        "Explanation": {
            "type": "object",
            "properties": {
                "method": {"type": "string"},
                "target": {"type": "string"},
                "path": {"type": ["string", "null"], "description": "The path as the request line carries it (no query)"},
                "canonical": {"type": ["string", "null"], "description": "The path rules are looked up with"},
                "path_refused": {"type": ["string", "null"], "description": "Why the path is refused (400)"},
                "rule": {"type": ["object", "null"], "properties": {
                    "path": {"type": "string"}, "match": {"type": "string", "enum": ["exact", "prefix"]},
                    "mode": {"type": "string", "enum": ["enforce", "monitor"]},
                    "methods": {"type": "array", "items": {"type": "string"}}
                }},
                "allow": {"type": "array", "items": {"type": "string"}, "description": "The Allow set; [\"*\"]: any method"},
                "override_method": {"type": ["string", "null"]},
                "reasons": {"type": "array", "items": {"type": "string"}, "description": "What the kernel counts"},
                "verdict": {"type": "string", "enum": ["pass", "monitor", "refuse"]},
                "answer": {"type": ["integer", "null"], "description": "405, 400, 414, 431 or 204 when refused"},
                "summary": {"type": "string"},
                "revision": {"type": "integer"}
            }
        },
        "DryRun": {
            "type": "object",
            "properties": {
                "dry_run": {"type": "boolean"},
                "revision": {"type": "integer"},
                "would_be_revision": {"type": "integer"},
                "changes": {"type": "object", "properties": {
                    "switches": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "before": {}, "after": {}}}},
                    "added": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}},
                    "removed": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}},
                    "changed": {"type": "array", "items": {"type": "object", "properties": {
                        "before": {"$ref": "#/components/schemas/Rule"}, "after": {"$ref": "#/components/schemas/Rule"}}}},
                    "unchanged": {"type": "integer"}
                }}
            }
        },
        "Status": {
            "type": "object",
            "properties": {
                "version": {"type": "string"},
                "revision": {"type": "integer"},
                "rules": {"type": "object", "properties": {"exact": {"type": "integer"}, "prefix": {"type": "integer"}}},
                "fail_mode": {"type": "string", "enum": ["closed", "open"]},
                "policy_file": {"type": ["string", "null"]},
                "dataplane": {"type": "object", "properties": {
                    "interfaces": {"type": "array", "items": {"type": "string"}},
                    "attach": {"type": ["string", "null"], "enum": ["tcx", "netlink", null]},
                    "pinned": {"type": "boolean"},
                    "dry_run": {"type": "boolean"},
                    "prefix_rules_supported": {"type": "boolean"}
                }}
            }
        }
    })
}

/// The OpenAPI 3.1 document for `docs`.
pub fn openapi(docs: &[RouteDoc]) -> Value {
    let mut paths = serde_json::Map::new();
    for d in docs {
        let mut params = Vec::new();
        for (name, required, desc) in d.query {
            params.push(json!({"name": name, "in": "query", "required": required, "description": desc, "schema": {"type": "string"}}));
        }
        if d.if_match {
            params.push(
                json!({"name": "If-Match", "in": "header", "required": false,
                "description": "The ETag (revision) the change is based on; 412 if stale",
                "schema": {"type": "string"}}),
            );
        }
        let mut responses = serde_json::Map::new();
        let write = matches!(d.method, "POST" | "PUT" | "DELETE");
        let mut extra: Vec<(u16, &str, Option<&str>)> = Vec::new();
        if write {
            extra.push((
                409,
                "The policy is read-only (filterd --policy): change its file",
                ERR,
            ));
        }
        if matches!(d.method, "POST" | "PUT") {
            extra.push((415, "Content-Type is not application/json", ERR));
        }
        for (code, desc, schema) in d.responses.iter().chain(extra.iter()) {
            if let Some(r) = responses.get_mut(&code.to_string()) {
                let joined = format!("{}; or: {desc}", r["description"].as_str().unwrap_or(""));
                r["description"] = json!(joined);
                continue;
            }
            let mut r = json!({"description": desc});
            match schema {
                Some(s) => {
                    r["content"] = json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{s}")}}})
                }
                None if *code == 200 => {
                    r["content"] = json!({"text/plain": {"schema": {"type": "string"}}})
                }
                None => {}
            }
            responses.insert(code.to_string(), r);
        }
        let mut op = json!({
            "summary": d.summary,
            "operationId": format!("{}_{}", d.method.to_lowercase(), d.path.trim_start_matches('/').replace(['/', '.'], "_")),
            "parameters": params,
            "responses": responses,
        });
        if let Some(req) = d.request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{req}")}}}});
        }
        if !d.auth {
            op["security"] = json!([]);
        }
        paths
            .entry(d.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("path items are objects")
            .insert(d.method.to_lowercase(), op);
    }
    paths.insert(
        OPENAPI_PATH.into(),
        json!({"get": {"summary": "This document", "operationId": "get_openapi", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "filterd API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the HTTP method firewall. Writes are atomic, persisted before they are acknowledged, and carry the policy revision (ETag)."
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RuleChange;
    use crate::policy::{self, PolicyFile, RuleSetSpec, RuleSpec};

    /// The schemas name exactly the fields serde reads and writes.
    #[test]
    fn schemas_match_the_serde_types() {
        let s = schemas();
        let props = |name: &str| {
            let mut v: Vec<String> = s[name]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        };
        let keys = |v: Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let rule = RuleSpec {
            path: "/a/".into(),
            methods: vec!["GET".into()],
            match_kind: Some("prefix".into()),
            mode: Some("monitor".into()),
            head: Some(false),
        };
        assert_eq!(keys(serde_json::to_value(&rule).unwrap()), props("Rule"));
        let full = PolicyFile {
            revision: Some(1),
            default: Some(policy::DefaultSpec::Keyword("any".into())),
            options: Some("pass".into()),
            oversize: Some("reject".into()),
            paths: Some("strict".into()),
            rules: vec![rule.clone()],
        };
        assert_eq!(keys(serde_json::to_value(&full).unwrap()), props("Policy"));
        let set = RuleSetSpec {
            revision: Some(1),
            rules: vec![],
        };
        assert_eq!(keys(serde_json::to_value(&set).unwrap()), props("RuleSet"));
        let change = RuleChange { revision: 1, rule };
        assert_eq!(
            keys(serde_json::to_value(&change).unwrap()),
            props("RuleChange")
        );
        // deny_unknown_fields on the Rust side <=> additionalProperties: false in the schema.
        for name in ["Rule", "RuleSet", "Policy"] {
            assert_eq!(s[name]["additionalProperties"], false, "{name}");
        }
    }
}
