//! The policy model: the source of truth for what each path allows.
//!
//! Rules arrive as API or file documents ([`RuleSpec`], [`PolicyFile`]) and are validated into
//! [`Rule`]s on the way in, so that nothing invalid ever reaches the dataplane. The dataplane
//! converts a validated [`Policy`] into map entries; this module never touches maps.

use std::collections::BTreeMap;

use filter_common::method::{is_tchar, Method, MethodSet, NAMED};
use filter_common::PATH_MAX;
use serde::{Deserialize, Serialize};

/// One rule as the API and the policy file write it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub path: String,
    pub methods: Vec<String>,
}

/// A whole rule set as the API writes it: `{"rules":[...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetSpec {
    pub rules: Vec<RuleSpec>,
}

/// The methods allowed on paths no rule names: `"any"` or a list of methods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DefaultSpec {
    Keyword(String),
    Methods(Vec<String>),
}

/// The policy file (TOML): an optional `default` and `[[rules]]` tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultSpec>,
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
    #[error("rules[{index}].path {path:?} appears more than once")]
    DuplicatePath { index: usize, path: String },
    #[error("default: {0:?} is neither \"any\" nor a list of methods")]
    BadDefault(String),
    #[error("default: {0}")]
    BadDefaultMethod(Box<PolicyError>),
    #[error("{count} rules is more than the dataplane holds ({max})")]
    TooManyRules { count: usize, max: usize },
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub path: String,
    /// The methods as declared (deduplicated, canonical order).
    pub methods: MethodSet,
}

impl Rule {
    /// What the kernel enforces: the declared methods, plus HEAD wherever GET is allowed
    /// (RFC 9110 §9.3.2: a server that allows GET should allow HEAD).
    pub fn effective(&self) -> MethodSet {
        effective(self.methods)
    }

    pub fn to_spec(&self) -> RuleSpec {
        RuleSpec {
            path: self.path.clone(),
            methods: self.methods.iter().map(|m| m.as_str().to_owned()).collect(),
        }
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
}

/// A validated policy: the default and the rules, keyed by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub default: DefaultPolicy,
    pub rules: BTreeMap<String, Rule>,
}

impl Policy {
    /// Validate a whole rule set. Duplicated paths are an error, not a silent overwrite.
    pub fn from_specs(default: DefaultPolicy, specs: &[RuleSpec]) -> Result<Policy, PolicyError> {
        if specs.len() > crate::dataplane::RULES_CAPACITY {
            return Err(PolicyError::TooManyRules {
                count: specs.len(),
                max: crate::dataplane::RULES_CAPACITY,
            });
        }
        let mut rules = BTreeMap::new();
        for (index, spec) in specs.iter().enumerate() {
            let rule = Rule::from_spec(index, spec)?;
            if rules.contains_key(&rule.path) {
                return Err(PolicyError::DuplicatePath {
                    index,
                    path: rule.path,
                });
            }
            rules.insert(rule.path.clone(), rule);
        }
        Ok(Policy { default, rules })
    }

    pub fn from_file(file: &PolicyFile) -> Result<Policy, PolicyError> {
        let default = match &file.default {
            None => DefaultPolicy::Any,
            Some(DefaultSpec::Keyword(k)) if k == "any" => DefaultPolicy::Any,
            Some(DefaultSpec::Keyword(k)) => return Err(PolicyError::BadDefault(k.clone())),
            Some(DefaultSpec::Methods(list)) => DefaultPolicy::Methods(
                parse_methods(0, list).map_err(|e| PolicyError::BadDefaultMethod(Box::new(e)))?,
            ),
        };
        Policy::from_specs(default, &file.rules)
    }

    pub fn to_file(&self) -> PolicyFile {
        PolicyFile {
            default: self.default.to_spec(),
            rules: self.specs(),
        }
    }

    pub fn specs(&self) -> Vec<RuleSpec> {
        self.rules.values().map(Rule::to_spec).collect()
    }
}

impl Rule {
    pub fn from_spec(index: usize, spec: &RuleSpec) -> Result<Rule, PolicyError> {
        check_path(&spec.path).map_err(|why| PolicyError::BadPath {
            index,
            path: spec.path.clone(),
            why,
        })?;
        Ok(Rule {
            path: spec.path.clone(),
            methods: parse_methods(index, &spec.methods)?,
        })
    }
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    if path.len() > PATH_MAX {
        return Err("is longer than the 1024 bytes the kernel inspects");
    }
    if path.contains(['?', '#']) {
        return Err(
            "must not contain a query ('?') or fragment ('#'): the filter matches the path only",
        );
    }
    if path.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("must be visible ASCII (percent-encode other bytes)");
    }
    Ok(())
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
    #[error("policy file {path}: {source}")]
    Invalid { path: String, source: PolicyError },
}

/// Read and validate a policy file. Errors say which line or which rule is at fault.
pub fn load_file(path: &std::path::Path) -> Result<Policy, PolicyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_toml(&text).map_err(|e| match e {
        TomlError::Syntax { line, message } => PolicyFileError::Syntax {
            path: shown,
            line,
            message,
        },
        TomlError::Invalid(source) => PolicyFileError::Invalid {
            path: shown,
            source,
        },
    })
}

#[derive(Debug)]
pub enum TomlError {
    Syntax { line: usize, message: String },
    Invalid(PolicyError),
}

pub fn parse_toml(text: &str) -> Result<Policy, TomlError> {
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
    Policy::from_file(&file).map_err(TomlError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str, methods: &[&str]) -> RuleSpec {
        RuleSpec {
            path: path.into(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn get_implies_head_but_is_listed_as_declared() {
        let p =
            Policy::from_specs(DefaultPolicy::Any, &[spec("/a", &["POST", "GET", "GET"])]).unwrap();
        let r = &p.rules["/a"];
        assert_eq!(r.to_spec().methods, ["GET", "POST"]);
        let eff: Vec<_> = r.effective().iter().map(Method::as_str).collect();
        assert_eq!(eff, ["GET", "HEAD", "POST"]);
    }

    #[test]
    fn invalid_rules_name_the_field() {
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
        let again = parse_toml(&toml::to_string(&p.to_file()).unwrap()).unwrap();
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
            parse_toml("default = \"none\""),
            Err(TomlError::Invalid(PolicyError::BadDefault(_)))
        ));
        assert_eq!(parse_toml("").unwrap(), Policy::default());
    }
}
