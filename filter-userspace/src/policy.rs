//! The policy model: the source of truth for what each path allows.
//!
//! Rules arrive as API or file documents ([`RuleSpec`], [`PolicyFile`]) and are validated into
//! [`Rule`]s on the way in, so that nothing invalid ever reaches the dataplane. The dataplane
//! converts a validated [`Policy`] into map entries; this module never touches maps.
//!
//! Semantics (docs/control-plane.md's "Policy semantics" says the same for operators):
//! - `match = "exact"` (default) names one path; `match = "prefix"` names a subtree and its path
//!   must end in `/`. An exact rule beats a prefix rule; among prefix rules the longest wins.
//!   The kernel does the matching.
//! - `mode = "enforce"` (default) rejects; `mode = "monitor"` counts and logs what would have
//!   been rejected and blocks nothing.
//! - GET implies HEAD (RFC 9110 §9.3.2) unless the rule says `head = false`.
//! - `options = "pass"` (default) lets OPTIONS through to the backend; `"answer"` makes the
//!   responder answer OPTIONS on governed paths with `204` + `Allow`. OPTIONS never gets 405.
//! - `oversize = "reject"` (default) answers 414/431 to request lines/headers past the
//!   inspection bound; `"pass"` lets them through undecided.
//! - `paths = "strict"` (default) answers 400 to a request whose path is not already in normal
//!   form (`filter_common::canon`); `"normalize"` canonicalizes it and judges it under every
//!   reading common backends give it (the refusals of ambiguous forms stay).
//! - `default = "any"` (default) or a method list: what paths without a rule allow.

use std::collections::BTreeMap;

use filter_common::method::{is_tchar, Method, MethodSet, NAMED};
use filter_common::{PATH_MAX, PREFIX_MAX, PREFIX_RULES_MAX, RULES_MAX};
use serde::{Deserialize, Serialize};

/// One rule as the API and the policy file write it. Optional fields are left out when they
/// hold their default, so a plain rule reads `{"path": "/a", "methods": ["GET"]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Absolute path (`/...`), no query or fragment.
    pub path: String,
    /// Methods the path allows.
    pub methods: Vec<String>,
    /// `"exact"` (default) or `"prefix"`.
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub match_kind: Option<String>,
    /// `"enforce"` (default) or `"monitor"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Whether GET implies HEAD (default `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<bool>,
}

impl RuleSpec {
    /// An exact, enforcing rule.
    pub fn new(path: impl Into<String>, methods: &[&str]) -> RuleSpec {
        RuleSpec {
            path: path.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            match_kind: None,
            mode: None,
            head: None,
        }
    }
}

/// A set of rules as the API writes it: `{"rules":[...]}`, optionally with the revision the
/// writer last saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetSpec {
    /// On reads: the policy's revision. On writes: the revision the change is based on; a
    /// stale one is refused with 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    pub rules: Vec<RuleSpec>,
}

/// The methods allowed on paths no rule names: `"any"` or a list of methods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DefaultSpec {
    Keyword(String),
    Methods(Vec<String>),
}

/// The whole policy as a document: the policy file (TOML) and `GET/PUT /v1/policy` (JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Written by the daemon: the revision of the policy this document holds. On `PUT`, the
    /// revision the change is based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// `"any"` (default) or a list of methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultSpec>,
    /// `"pass"` (default) or `"answer"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    /// `"reject"` (default) or `"pass"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oversize: Option<String>,
    /// `"strict"` (default) or `"normalize"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// Why a rule or policy was refused. Each variant names the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("rules[{index}].path {path:?}: {why}")]
    BadPath {
        index: usize,
        path: String,
        why: &'static str,
    },
    #[error("rules[{index}].methods: {token:?} is not a method token (RFC 9110: letters, digits and !#$%&'*+-.^_`|~)")]
    BadMethodToken { index: usize, token: String },
    #[error(
        "rules[{index}].methods: {token:?} is not a method this filter knows (known: {known})"
    )]
    UnknownMethod {
        index: usize,
        token: String,
        known: String,
    },
    #[error("rules[{index}].methods: the list is empty; a rule must allow at least one method")]
    EmptyMethods { index: usize },
    #[error("rules[{index}].match: {value:?} is neither \"exact\" nor \"prefix\"")]
    BadMatch { index: usize, value: String },
    #[error("rules[{index}].mode: {value:?} is neither \"enforce\" nor \"monitor\"")]
    BadMode { index: usize, value: String },
    #[error("rules[{index}].head: false contradicts HEAD in methods; drop one of them")]
    HeadContradiction { index: usize },
    #[error("rules[{index}]: a {kind} rule for path {path:?} appears more than once")]
    DuplicatePath {
        index: usize,
        path: String,
        kind: MatchKind,
    },
    #[error("default: {0:?} is neither \"any\" nor a list of methods")]
    BadDefault(String),
    #[error("default: {0}")]
    BadDefaultMethod(Box<PolicyError>),
    #[error("options: {0:?} is neither \"pass\" nor \"answer\"")]
    BadOptions(String),
    #[error("oversize: {0:?} is neither \"reject\" nor \"pass\"")]
    BadOversize(String),
    #[error("paths: {0:?} is neither \"strict\" nor \"normalize\"")]
    BadPaths(String),
    #[error("rules: {count} {kind} rules is more than the dataplane holds ({max})")]
    TooManyRules {
        count: usize,
        max: usize,
        kind: MatchKind,
    },
}

impl PolicyError {
    /// The index of the rule at fault, if a rule is.
    pub fn rule_index(&self) -> Option<usize> {
        match self {
            PolicyError::BadPath { index, .. }
            | PolicyError::BadMethodToken { index, .. }
            | PolicyError::UnknownMethod { index, .. }
            | PolicyError::EmptyMethods { index }
            | PolicyError::BadMatch { index, .. }
            | PolicyError::BadMode { index, .. }
            | PolicyError::HeadContradiction { index }
            | PolicyError::DuplicatePath { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// The top-level field at fault, if it is not a rule.
    fn top_field(&self) -> Option<&'static str> {
        match self {
            PolicyError::BadDefault(_) | PolicyError::BadDefaultMethod(_) => Some("default"),
            PolicyError::BadOptions(_) => Some("options"),
            PolicyError::BadOversize(_) => Some("oversize"),
            PolicyError::BadPaths(_) => Some("paths"),
            _ => None,
        }
    }
}

/// The first of a non-empty list of errors (the one-error interfaces).
fn first(mut errors: Vec<PolicyError>) -> PolicyError {
    errors.swap_remove(0)
}

impl PolicyError {
    /// The same error about rule `map(index)` instead of rule `index`: a rule set validated
    /// apart from the document it came from (a directory's files, one at a time) names its
    /// rules by their place in the document.
    pub fn reindex(self, map: impl Fn(usize) -> usize) -> PolicyError {
        use PolicyError::*;
        match self {
            BadPath { index, path, why } => BadPath {
                index: map(index),
                path,
                why,
            },
            BadMethodToken { index, token } => BadMethodToken {
                index: map(index),
                token,
            },
            UnknownMethod {
                index,
                token,
                known,
            } => UnknownMethod {
                index: map(index),
                token,
                known,
            },
            EmptyMethods { index } => EmptyMethods { index: map(index) },
            BadMatch { index, value } => BadMatch {
                index: map(index),
                value,
            },
            BadMode { index, value } => BadMode {
                index: map(index),
                value,
            },
            HeadContradiction { index } => HeadContradiction { index: map(index) },
            DuplicatePath { index, path, kind } => DuplicatePath {
                index: map(index),
                path,
                kind,
            },
            other => other,
        }
    }

    /// The top-level field at fault, if it is not a rule (`default`, `options`, ...).
    pub fn field(&self) -> Option<&'static str> {
        self.top_field()
    }
}

/// How a rule's path matches request paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MatchKind {
    /// The request path equals the rule path.
    #[default]
    Exact,
    /// The rule path (ending in `/`) is a prefix of the request path.
    Prefix,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact",
            MatchKind::Prefix => "prefix",
        }
    }

    pub fn parse(s: &str) -> Option<MatchKind> {
        match s {
            "exact" => Some(MatchKind::Exact),
            "prefix" => Some(MatchKind::Prefix),
            _ => None,
        }
    }
}

impl std::fmt::Display for MatchKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule does with a method it does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Reject it (405).
    #[default]
    Enforce,
    /// Count and log it, let it through.
    Monitor,
}

/// What happens to OPTIONS requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptionsMode {
    /// Passed to the backend.
    #[default]
    Pass,
    /// On governed paths, answered `204 No Content` with `Allow`.
    Answer,
}

/// What happens to request lines or header blocks past the kernel's inspection bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Oversize {
    /// Answered 414 / 431.
    #[default]
    Reject,
    /// Passed undecided.
    Pass,
}

/// What happens to a request whose path is not already in normal form (`filter_common::canon`
/// says exactly what normal form is, and which forms are refused in either mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathsMode {
    /// Answered 400: the path is judged only as it was sent.
    #[default]
    Strict,
    /// Canonicalized, and judged under every reading common backends give it: the request
    /// passes only if each reading's rule (or the default) allows its method.
    Normalize,
}

/// The identity of a rule: an exact and a prefix rule may name the same path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub path: String,
    pub kind: MatchKind,
}

impl RuleKey {
    pub fn exact(path: impl Into<String>) -> RuleKey {
        RuleKey {
            path: path.into(),
            kind: MatchKind::Exact,
        }
    }
    pub fn prefix(path: impl Into<String>) -> RuleKey {
        RuleKey {
            path: path.into(),
            kind: MatchKind::Prefix,
        }
    }
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The path, in the canonical form the kernel compares against.
    pub path: String,
    pub kind: MatchKind,
    /// The methods as declared (deduplicated, canonical order).
    pub methods: MethodSet,
    pub mode: Mode,
    /// Whether GET implies HEAD.
    pub head: bool,
}

impl Rule {
    pub fn key(&self) -> RuleKey {
        RuleKey {
            path: self.path.clone(),
            kind: self.kind,
        }
    }

    /// What the kernel enforces: the declared methods, plus HEAD wherever GET is allowed
    /// (RFC 9110 §9.3.2) unless the rule says `head = false`.
    pub fn effective(&self) -> MethodSet {
        if self.head {
            effective(self.methods)
        } else {
            self.methods
        }
    }

    pub fn to_spec(&self) -> RuleSpec {
        RuleSpec {
            path: self.path.clone(),
            methods: self.methods.iter().map(|m| m.as_str().to_owned()).collect(),
            match_kind: (self.kind == MatchKind::Prefix).then(|| "prefix".to_owned()),
            mode: (self.mode == Mode::Monitor).then(|| "monitor".to_owned()),
            head: (!self.head).then_some(false),
        }
    }

    pub fn from_spec(index: usize, spec: &RuleSpec) -> Result<Rule, PolicyError> {
        let kind = match spec.match_kind.as_deref() {
            None => MatchKind::Exact,
            Some(s) => MatchKind::parse(s).ok_or_else(|| PolicyError::BadMatch {
                index,
                value: s.to_owned(),
            })?,
        };
        let mode = match spec.mode.as_deref() {
            None | Some("enforce") => Mode::Enforce,
            Some("monitor") => Mode::Monitor,
            Some(s) => {
                return Err(PolicyError::BadMode {
                    index,
                    value: s.to_owned(),
                })
            }
        };
        let path = canonical_path(&spec.path, kind).map_err(|why| PolicyError::BadPath {
            index,
            path: spec.path.clone(),
            why,
        })?;
        let methods = parse_methods(index, &spec.methods)?;
        let head = spec.head.unwrap_or(true);
        if !head && methods.contains(Method::Head) {
            return Err(PolicyError::HeadContradiction { index });
        }
        Ok(Rule {
            path,
            kind,
            methods,
            mode,
            head,
        })
    }
}

fn effective(set: MethodSet) -> MethodSet {
    if set.contains(Method::Get) {
        set.with(Method::Head)
    } else {
        set
    }
}

/// What applies to paths without a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DefaultPolicy {
    /// Every method, unknown ones included.
    #[default]
    Any,
    Methods(MethodSet),
}

impl DefaultPolicy {
    /// The methods the kernel allows on ungoverned paths (GET implies HEAD here too).
    pub fn effective(self) -> MethodSet {
        match self {
            DefaultPolicy::Any => MethodSet::ANY,
            DefaultPolicy::Methods(m) => effective(m),
        }
    }

    fn to_spec(self) -> Option<DefaultSpec> {
        match self {
            DefaultPolicy::Any => None,
            DefaultPolicy::Methods(m) => Some(DefaultSpec::Methods(
                m.iter().map(|m| m.as_str().to_owned()).collect(),
            )),
        }
    }

    fn from_spec(spec: Option<&DefaultSpec>) -> Result<DefaultPolicy, PolicyError> {
        Ok(match spec {
            None => DefaultPolicy::Any,
            Some(DefaultSpec::Keyword(k)) if k == "any" => DefaultPolicy::Any,
            Some(DefaultSpec::Keyword(k)) => return Err(PolicyError::BadDefault(k.clone())),
            Some(DefaultSpec::Methods(list)) => DefaultPolicy::Methods(
                parse_methods(0, list).map_err(|e| PolicyError::BadDefaultMethod(Box::new(e)))?,
            ),
        })
    }
}

/// A validated policy: the top-level switches and the rules, keyed by (path, match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub default: DefaultPolicy,
    pub options: OptionsMode,
    pub oversize: Oversize,
    pub paths: PathsMode,
    pub rules: BTreeMap<RuleKey, Rule>,
}

impl Policy {
    /// Validate a whole rule set under `default` (other switches at their defaults).
    /// Duplicated rules are an error, not a silent overwrite.
    pub fn from_specs(default: DefaultPolicy, specs: &[RuleSpec]) -> Result<Policy, PolicyError> {
        Policy {
            default,
            ..Policy::default()
        }
        .with_rules(specs)
    }

    /// This policy's switches with `specs` as its rules.
    pub fn with_rules(&self, specs: &[RuleSpec]) -> Result<Policy, PolicyError> {
        self.with_rules_all(specs).map_err(first)
    }

    /// As [`Policy::with_rules`], with every error the rules hold (in document order), not
    /// only the first: `filterd --check` reports them all.
    pub fn with_rules_all(&self, specs: &[RuleSpec]) -> Result<Policy, Vec<PolicyError>> {
        if specs.len() > RULES_MAX as usize + PREFIX_RULES_MAX as usize {
            return Err(vec![PolicyError::TooManyRules {
                count: specs.len(),
                max: RULES_MAX as usize,
                kind: MatchKind::Exact,
            }]);
        }
        let mut errors = Vec::new();
        let mut rules = BTreeMap::new();
        for (index, spec) in specs.iter().enumerate() {
            let rule = match Rule::from_spec(index, spec) {
                Ok(rule) => rule,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if let Err(e) = self.admits(index, &rule) {
                errors.push(e);
                continue;
            }
            let key = rule.key();
            if rules.contains_key(&key) {
                errors.push(PolicyError::DuplicatePath {
                    index,
                    path: rule.path,
                    kind: rule.kind,
                });
                continue;
            }
            rules.insert(key, rule);
        }
        let next = Policy {
            rules,
            ..self.clone()
        };
        if let Err(e) = next.check_capacity() {
            errors.push(e);
        }
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }

    /// Whether `rule` (the `index`-th of a rule set) may be part of a policy with this one's
    /// switches: in `paths = "normalize"` no rule path may hold `%3B`. A request path with a
    /// `;` is judged with the `;` read as text too (nginx reads `/a;b` as the path a rule
    /// `/a%3Bb` names), and that reading is only looked up in the prefix rules above the
    /// segment with the `;`.
    pub fn admits(&self, index: usize, rule: &Rule) -> Result<(), PolicyError> {
        if self.paths == PathsMode::Normalize && rule.path.contains("%3B") {
            return Err(PolicyError::BadPath {
                index,
                path: rule.path.clone(),
                why: "holds %3B, which paths = \"normalize\" cannot judge: a request with a ';' there is read as this path by nginx and Go but as a shorter one by Tomcat; drop the rule or use paths = \"strict\"",
            });
        }
        Ok(())
    }

    /// Refuse more rules of a kind than its map holds.
    pub fn check_capacity(&self) -> Result<(), PolicyError> {
        for (kind, max) in [
            (MatchKind::Exact, RULES_MAX as usize),
            (MatchKind::Prefix, PREFIX_RULES_MAX as usize),
        ] {
            let count = self.count(kind);
            if count > max {
                return Err(PolicyError::TooManyRules { count, max, kind });
            }
        }
        Ok(())
    }

    /// Rules of one kind.
    pub fn count(&self, kind: MatchKind) -> usize {
        self.rules.values().filter(|r| r.kind == kind).count()
    }

    /// Validate a policy document. Its `revision` is not part of the policy.
    pub fn from_file(file: &PolicyFile) -> Result<Policy, PolicyError> {
        Policy::from_file_all(file).map_err(first)
    }

    /// As [`Policy::from_file`], with every error the document holds: the switches' first,
    /// then the rules' in order.
    pub fn from_file_all(file: &PolicyFile) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let default = DefaultPolicy::from_spec(file.default.as_ref()).unwrap_or_else(|e| {
            errors.push(e);
            DefaultPolicy::Any
        });
        let options = match file.options.as_deref() {
            None | Some("pass") => OptionsMode::Pass,
            Some("answer") => OptionsMode::Answer,
            Some(s) => {
                errors.push(PolicyError::BadOptions(s.to_owned()));
                OptionsMode::Pass
            }
        };
        let oversize = match file.oversize.as_deref() {
            None | Some("reject") => Oversize::Reject,
            Some("pass") => Oversize::Pass,
            Some(s) => {
                errors.push(PolicyError::BadOversize(s.to_owned()));
                Oversize::Reject
            }
        };
        let paths = match file.paths.as_deref() {
            None | Some("strict") => PathsMode::Strict,
            Some("normalize") => PathsMode::Normalize,
            Some(s) => {
                errors.push(PolicyError::BadPaths(s.to_owned()));
                PathsMode::Strict
            }
        };
        let policy = Policy {
            default,
            options,
            oversize,
            paths,
            rules: BTreeMap::new(),
        }
        .with_rules_all(&file.rules);
        match policy {
            Ok(p) if errors.is_empty() => Ok(p),
            Ok(_) => Err(errors),
            Err(more) => {
                errors.extend(more);
                Err(errors)
            }
        }
    }

    /// The policy as a document, with `revision`.
    pub fn to_file(&self, revision: Option<u64>) -> PolicyFile {
        PolicyFile {
            revision,
            default: self.default.to_spec(),
            options: (self.options == OptionsMode::Answer).then(|| "answer".to_owned()),
            oversize: (self.oversize == Oversize::Pass).then(|| "pass".to_owned()),
            paths: (self.paths == PathsMode::Normalize).then(|| "normalize".to_owned()),
            rules: self.specs(),
        }
    }

    pub fn specs(&self) -> Vec<RuleSpec> {
        self.rules.values().map(Rule::to_spec).collect()
    }

    /// The rule for an exact path, if any (a convenience for tests and tools).
    pub fn exact(&self, path: &str) -> Option<&Rule> {
        self.rules.get(&RuleKey::exact(path))
    }
}

/// The path as the kernel compares it, or why it cannot be a rule path.
///
/// Rule paths go through the same canonicalizer the kernel runs on request paths
/// ([`filter_common::canon::canonicalize`]: escapes of literal characters decoded, other bytes
/// written as escapes, dot segments and repeated slashes removed), so `/%61dmin`,
/// `/x/../admin` and `//admin` are stored as `/admin`, and `/users/%40me` as `/users/@me`. A
/// path the kernel would answer with 400 (`%2F`, `%5C`, `%00`, a backslash, an invalid
/// escape, `..` above the root, `..;`, an escaped dot segment, `..` after `//`) is refused
/// here too: no request could ever match it. So is a path with `;`: backends disagree on
/// whether it starts parameters (`%3B` is text to all of them; [`Policy::admits`] says where
/// it may be used).
pub fn canonical_path(path: &str, kind: MatchKind) -> Result<String, &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    if path.contains(['?', '#']) {
        return Err(
            "must not contain a query ('?') or fragment ('#'): the filter matches the path only",
        );
    }
    if path.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("must be visible ASCII (percent-encode other bytes)");
    }
    if path.contains(';') {
        return Err(
            "must not contain ';': Tomcat and Spring strip a ';' and what follows in its segment as parameters, nginx, Go, Express and axum keep it; write the path without parameters (or as %3B, in paths = \"strict\")",
        );
    }
    if path.len() > PATH_MAX {
        return Err("is longer than the 1024 bytes the kernel inspects");
    }
    let mut out = [0u8; PATH_MAX];
    let n = filter_common::canon::canonicalize(path.as_bytes(), &mut out).map_err(|r| match r {
        filter_common::Reason::PathTooLong => "is longer than the 1024 bytes the kernel inspects",
        _ => "has a form the filter refuses with 400 (%2F, %5C, %00, a backslash, an invalid escape, '..' above the root, '..;' or '.;', a dot segment spelled with an escape, or '..' after '//'), so no request could match it",
    })?;
    // Canonical output is ASCII when the input is (escapes stay encoded).
    let canonical = String::from_utf8_lossy(&out[..n]).into_owned();
    match kind {
        MatchKind::Exact => Ok(canonical),
        MatchKind::Prefix if canonical.len() > PREFIX_MAX => {
            Err("is longer than the 256 bytes a prefix rule may have")
        }
        MatchKind::Prefix if !canonical.ends_with('/') => Err(
            "a prefix rule's path must end in '/' (it covers the subtree under it); add the '/' or use match = \"exact\"",
        ),
        MatchKind::Prefix => Ok(canonical),
    }
}

fn parse_methods(index: usize, tokens: &[String]) -> Result<MethodSet, PolicyError> {
    if tokens.is_empty() {
        return Err(PolicyError::EmptyMethods { index });
    }
    let mut set = MethodSet::EMPTY;
    for token in tokens {
        if token.is_empty() || !token.bytes().all(is_tchar) {
            return Err(PolicyError::BadMethodToken {
                index,
                token: token.clone(),
            });
        }
        let m = Method::from_token(token.as_bytes()).ok_or_else(|| PolicyError::UnknownMethod {
            index,
            token: token.clone(),
            known: NAMED
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        set = set.with(m);
    }
    Ok(set)
}

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy file {path}, line {line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    #[error("policy file {path}{}: {source}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        path: String,
        line: Option<usize>,
        source: PolicyError,
    },
    #[error("policy file {path}: cannot write it: {source} (the policy in force is unchanged)")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Read and validate a policy file. Errors say which line or which rule is at fault.
pub fn load_file(path: &std::path::Path) -> Result<Policy, PolicyFileError> {
    load_document(path).map(|(p, _)| p)
}

/// Read and validate a policy file; also return the revision the daemon last wrote into it
/// (0 if none).
pub fn load_document(path: &std::path::Path) -> Result<(Policy, u64), PolicyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_document(&text).map_err(|e| match e {
        TomlError::Syntax { line, message } => PolicyFileError::Syntax {
            path: shown,
            line,
            message,
        },
        TomlError::Invalid { line, source } => PolicyFileError::Invalid {
            path: shown,
            line,
            source,
        },
    })
}

#[derive(Debug)]
pub enum TomlError {
    Syntax {
        line: usize,
        message: String,
    },
    /// The document parses but is not a valid policy; `line` is where the faulty rule or
    /// field starts, when it can be found.
    Invalid {
        line: Option<usize>,
        source: PolicyError,
    },
}

pub fn parse_toml(text: &str) -> Result<Policy, TomlError> {
    parse_document(text).map(|(p, _)| p)
}

/// Parse a TOML policy document into the policy and its revision.
pub fn parse_document(text: &str) -> Result<(Policy, u64), TomlError> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(1);
        TomlError::Syntax {
            line,
            message: e.message().to_owned(),
        }
    })?;
    let policy = Policy::from_file(&file).map_err(|source| TomlError::Invalid {
        line: error_line(text, &source),
        source,
    })?;
    Ok((policy, file.revision.unwrap_or(0)))
}

/// The line where the rule or field `err` names starts: the n-th `[[rules]]` header, or the
/// top-level key. `None` for documents written another way (inline arrays).
fn error_line(text: &str, err: &PolicyError) -> Option<usize> {
    let mut lines = text.lines().enumerate();
    if let Some(index) = err.rule_index() {
        return lines
            .filter(|(_, l)| l.trim_start().starts_with("[[rules]]"))
            .nth(index)
            .map(|(i, _)| i + 1);
    }
    let field = err.top_field()?;
    lines
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(field)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|(i, _)| i + 1)
}

/// Render a policy document as TOML, with a header saying who writes it.
pub fn render_toml(policy: &Policy, revision: u64) -> String {
    let body = toml::to_string(&policy.to_file(Some(revision)))
        .expect("a policy document always serializes");
    format!(
        "# filterd's own policy state (filterd --state): the daemon rewrites this file on every\n\
         # accepted API change and keeps no comments. Change the policy through the API\n\
         # (filterctl); for a policy file of your own, run filterd with --policy FILE instead.\n{body}"
    )
}

/// Write `text` to `path` atomically and durably: a temp file in the same directory, fsync,
/// rename over `path`, fsync the directory. Readers see the old file or the new one, never a
/// mix, and after a crash the file holds one of them.
///
/// The temp file is created with `O_CREAT|O_EXCL|O_NOFOLLOW` under a random name: whoever can
/// write the directory cannot make the daemon write through a symlink or into a file planted
/// in advance (the create fails instead; it is retried under a new name).
pub fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        )
    })?;
    // Keep the old file's permissions; a new file is owner read/write only.
    let mode = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(0o600);
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).expect("the kernel's random source is available");
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:016x}",
            name.to_string_lossy(),
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str, methods: &[&str]) -> RuleSpec {
        RuleSpec::new(path, methods)
    }

    #[test]
    fn get_implies_head_but_is_listed_as_declared() {
        let p =
            Policy::from_specs(DefaultPolicy::Any, &[spec("/a", &["POST", "GET", "GET"])]).unwrap();
        let r = p.exact("/a").unwrap();
        assert_eq!(r.to_spec().methods, ["GET", "POST"]);
        let eff: Vec<_> = r.effective().iter().map(Method::as_str).collect();
        assert_eq!(eff, ["GET", "HEAD", "POST"]);
    }

    #[test]
    fn rule_paths_are_stored_canonical() {
        for (raw, kind, want) in [
            ("/%61dmin", MatchKind::Exact, "/admin"),
            ("/x/../admin", MatchKind::Exact, "/admin"),
            ("//api///items", MatchKind::Exact, "/api/items"),
            ("/users/%40me", MatchKind::Exact, "/users/@me"),
            ("/a%3Ab%2c", MatchKind::Exact, "/a:b,"),
            ("/a%c3%a9\"", MatchKind::Exact, "/a%C3%A9%22"),
            ("/a%3bb", MatchKind::Exact, "/a%3Bb"),
            ("/api/", MatchKind::Prefix, "/api/"),
            ("/api/./v1/", MatchKind::Prefix, "/api/v1/"),
            ("/", MatchKind::Prefix, "/"),
        ] {
            assert_eq!(canonical_path(raw, kind).as_deref(), Ok(want), "{raw}");
        }
        // Two spellings of one path are one rule.
        let dup = Policy::from_specs(
            DefaultPolicy::Any,
            &[spec("/admin", &["GET"]), spec("/%61dmin", &["PUT"])],
        );
        assert!(matches!(
            dup,
            Err(PolicyError::DuplicatePath { index: 1, .. })
        ));
    }

    #[test]
    fn escaped_semicolons_are_rule_paths_only_in_strict_mode() {
        let doc = |paths: &str| {
            format!("paths = \"{paths}\"\n[[rules]]\npath = \"/a%3bb\"\nmethods = [\"GET\"]\n")
        };
        assert_eq!(parse_toml(&doc("strict")).unwrap().rules.len(), 1);
        match parse_toml(&doc("normalize")) {
            Err(TomlError::Invalid {
                line: Some(2),
                source: PolicyError::BadPath { index: 0, why, .. },
            }) => assert!(why.contains("%3B"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn head_false_stops_get_implying_head() {
        let mut s = spec("/a", &["GET"]);
        s.head = Some(false);
        let r = Rule::from_spec(0, &s).unwrap();
        let eff: Vec<_> = r.effective().iter().map(Method::as_str).collect();
        assert_eq!(eff, ["GET"]);
        assert_eq!(r.to_spec(), s, "head = false survives a round trip");
        let mut both = spec("/a", &["GET", "HEAD"]);
        both.head = Some(false);
        assert_eq!(
            Rule::from_spec(2, &both).unwrap_err().to_string(),
            "rules[2].head: false contradicts HEAD in methods; drop one of them"
        );
    }

    #[test]
    fn prefix_and_exact_rules_coexist_and_round_trip() {
        let text = r#"
options = "answer"
oversize = "pass"
paths = "normalize"
default = ["GET"]

[[rules]]
path = "/api/"
match = "prefix"
methods = ["GET"]
mode = "monitor"

[[rules]]
path = "/api/"
methods = ["POST"]
"#;
        let p = parse_toml(text).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.options, OptionsMode::Answer);
        assert_eq!(p.oversize, Oversize::Pass);
        assert_eq!(p.paths, PathsMode::Normalize);
        assert_eq!(
            parse_toml("").unwrap().paths,
            PathsMode::Strict,
            "the default"
        );
        let pre = &p.rules[&RuleKey::prefix("/api/")];
        assert_eq!((pre.kind, pre.mode), (MatchKind::Prefix, Mode::Monitor));
        assert_eq!(p.exact("/api/").unwrap().mode, Mode::Enforce);
        let (again, rev) = parse_document(&render_toml(&p, 7)).unwrap();
        assert_eq!((again, rev), (p, 7));
    }

    #[test]
    fn invalid_rules_name_the_field() {
        let with = |f: fn(&mut RuleSpec)| {
            let mut s = spec("/a/", &["GET"]);
            f(&mut s);
            s
        };
        let cases: &[(RuleSpec, &str)] = &[
            (
                spec("api", &["GET"]),
                "rules[0].path \"api\": must start with '/'",
            ),
            (spec("/a?b", &["GET"]), "query"),
            (spec("/a b", &["GET"]), "visible ASCII"),
            (spec("/a", &[]), "rules[0].methods: the list is empty"),
            (spec("/a", &["GE T"]), "not a method token"),
            (spec("/a", &["BREW"]), "not a method this filter knows"),
            (spec("/a", &["get"]), "not a method this filter knows"),
            (
                with(|s| s.match_kind = Some("glob".into())),
                "rules[0].match: \"glob\" is neither \"exact\" nor \"prefix\"",
            ),
            (
                with(|s| s.mode = Some("audit".into())),
                "rules[0].mode: \"audit\"",
            ),
            (
                with(|s| {
                    s.match_kind = Some("prefix".into());
                    s.path = "/api".into()
                }),
                "rules[0].path \"/api\": a prefix rule's path must end in '/'",
            ),
            (
                with(|s| {
                    s.match_kind = Some("prefix".into());
                    s.path = format!("/{}/", "a".repeat(300))
                }),
                "256 bytes",
            ),
            (spec("/a%2Fb", &["GET"]), "refuses with 400"),
            (spec("/a\\b", &["GET"]), "refuses with 400"),
            (spec("/a/../..", &["GET"]), "refuses with 400"),
            (spec("/a%zz", &["GET"]), "refuses with 400"),
            (spec("/a/..;x/b", &["GET"]), "must not contain ';'"),
            (spec("/a//../b", &["GET"]), "refuses with 400"),
            (spec("/a/%2e%2e/b", &["GET"]), "refuses with 400"),
            (
                spec("/admin;jsessionid=1", &["GET"]),
                "must not contain ';'",
            ),
        ];
        for (s, want) in cases {
            let err = Policy::from_specs(DefaultPolicy::Any, std::slice::from_ref(s)).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        }
        let dup = Policy::from_specs(
            DefaultPolicy::Any,
            &[spec("/a", &["GET"]), spec("/a", &["PUT"])],
        );
        assert!(matches!(
            dup,
            Err(PolicyError::DuplicatePath { index: 1, .. })
        ));
    }

    #[test]
    fn toml_policy_round_trips_and_errors_carry_the_line() {
        let text = "default = [\"GET\"]\n\n[[rules]]\npath = \"/api/items\"\nmethods = [\"GET\", \"POST\"]\n";
        let p = parse_toml(text).unwrap();
        assert_eq!(
            p.default,
            DefaultPolicy::Methods(MethodSet::EMPTY.with(Method::Get))
        );
        assert_eq!(
            p.default.effective(),
            MethodSet::EMPTY.with(Method::Get).with(Method::Head)
        );
        let again = parse_toml(&toml::to_string(&p.to_file(None)).unwrap()).unwrap();
        assert_eq!(again, p);

        match parse_toml("[[rules]]\npath = \"/a\"\nmethods = [\"GET\"\n") {
            Err(TomlError::Syntax { line, .. }) => assert!(line >= 3, "line {line}"),
            other => panic!("{other:?}"),
        }
        match parse_toml("[[rules]]\npath = \"/a\"\nmethod = [\"GET\"]\n") {
            Err(TomlError::Syntax { line, message }) => {
                assert_eq!(line, 3, "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_toml("\npaths = \"lax\""),
            Err(TomlError::Invalid {
                line: Some(2),
                source: PolicyError::BadPaths(_)
            })
        ));
        assert!(matches!(
            parse_toml("default = \"none\""),
            Err(TomlError::Invalid {
                line: Some(1),
                source: PolicyError::BadDefault(_)
            })
        ));
        // A semantic error in the third rule points at the third [[rules]] header.
        let bad = "[[rules]]\npath = \"/a\"\nmethods = [\"GET\"]\n\n[[rules]]\npath = \"/b\"\nmethods = [\"GET\"]\n\n[[rules]]\npath = \"c\"\nmethods = [\"GET\"]\n";
        match parse_toml(bad) {
            Err(TomlError::Invalid {
                line: Some(9),
                source,
            }) => assert!(source.to_string().starts_with("rules[2].path")),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_toml("").unwrap(), Policy::default());
    }

    #[test]
    fn write_atomic_replaces_and_keeps_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("filterd-policy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("policy.toml");
        write_atomic(&f, "a = 1\n").unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&f, "b = 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "b = 2\n");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_atomic_never_writes_through_a_planted_symlink() {
        let dir = std::env::temp_dir().join(format!("filterd-policy-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        // Every name the old scheme used (pid only) planted as a symlink to the victim.
        let f = dir.join("policy.toml");
        std::os::unix::fs::symlink(
            &victim,
            dir.join(format!(".policy.toml.tmp-{}", std::process::id())),
        )
        .unwrap();
        write_atomic(&f, "a = 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "a = 1\n");
        assert!(!std::fs::symlink_metadata(&f)
            .unwrap()
            .file_type()
            .is_symlink());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_error_of_a_document_is_reported_in_order() {
        let file = PolicyFile {
            options: Some("reply".into()),
            rules: vec![
                RuleSpec::new("api", &["GET"]),
                RuleSpec::new("/ok", &["GET"]),
                RuleSpec::new("/b", &["FETCH"]),
                RuleSpec::new("/ok", &["PUT"]),
            ],
            ..PolicyFile::default()
        };
        let errors: Vec<String> = Policy::from_file_all(&file)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors[0].starts_with("options:"), "{}", errors[0]);
        assert!(errors[1].starts_with("rules[0].path"), "{}", errors[1]);
        assert!(errors[2].starts_with("rules[2].methods"), "{}", errors[2]);
        assert!(
            errors[3].starts_with("rules[3]: a exact rule"),
            "{}",
            errors[3]
        );
        // The one-error interface answers the first.
        assert_eq!(Policy::from_file(&file).unwrap_err().to_string(), errors[0]);
        let moved = PolicyError::EmptyMethods { index: 1 }.reindex(|i| i + 10);
        assert_eq!(moved.rule_index(), Some(11));
    }
}
