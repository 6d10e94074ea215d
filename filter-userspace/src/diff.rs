//! What replacing one policy with another changes: the switches, and the rules added, removed
//! and changed (by rule identity: path and match kind). `PUT /v1/policy?dry_run=true` answers
//! it, `filterctl policy diff` prints it. Pure: no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::policy::{Policy, RuleSpec};

/// A switch (`default`, `options`, ...) that changes; `null` is its default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchChange {
    pub field: String,
    pub before: Value,
    pub after: Value,
}

/// A rule whose methods, mode or `head` change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleUpdate {
    pub before: RuleSpec,
    pub after: RuleSpec,
}

/// The difference between two policies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyDiff {
    pub switches: Vec<SwitchChange>,
    pub added: Vec<RuleSpec>,
    pub removed: Vec<RuleSpec>,
    pub changed: Vec<RuleUpdate>,
    /// Rules the same in both.
    pub unchanged: usize,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.switches.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }

    /// Changes in all (switches and rules).
    pub fn len(&self) -> usize {
        self.switches.len() + self.added.len() + self.removed.len() + self.changed.len()
    }

    /// One line per change (`+` added, `-` removed, `~` changed), then a summary line.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        for s in &self.switches {
            out.push(format!(
                "~ {}: {} -> {}",
                s.field,
                shown(&s.before),
                shown(&s.after)
            ));
        }
        for r in &self.removed {
            out.push(format!("- {}", rule_line(r)));
        }
        for r in &self.added {
            out.push(format!("+ {}", rule_line(r)));
        }
        for c in &self.changed {
            out.push(format!(
                "~ {} -> {}",
                rule_line(&c.before),
                rule_traits(&c.after)
            ));
        }
        out.push(format!(
            "{} change{}: {} switch{}, {} rule{} added, {} removed, {} changed; {} unchanged",
            self.len(),
            if self.len() == 1 { "" } else { "s" },
            self.switches.len(),
            if self.switches.len() == 1 { "" } else { "es" },
            self.added.len(),
            if self.added.len() == 1 { "" } else { "s" },
            self.removed.len(),
            self.changed.len(),
            self.unchanged
        ));
        out.join("\n")
    }
}

fn shown(v: &Value) -> String {
    if v.is_null() {
        "(default)".into()
    } else {
        v.to_string()
    }
}

fn rule_traits(r: &RuleSpec) -> String {
    let mut s = r.methods.join(", ");
    if r.mode.as_deref() == Some("monitor") {
        s.push_str(" (monitor)");
    }
    if r.head == Some(false) {
        s.push_str(" (GET without HEAD)");
    }
    s
}

fn rule_line(r: &RuleSpec) -> String {
    format!(
        "{} {}: {}",
        r.path,
        r.match_kind.as_deref().unwrap_or("exact"),
        rule_traits(r)
    )
}

/// How many switches and rules replacing `before` with `after` changes: (switches, added,
/// removed, changed), without building the documents (the audit line of a 100k-rule replace).
pub fn counts(before: &Policy, after: &Policy) -> (usize, usize, usize, usize) {
    let switches = diff(&switches_of(before), &switches_of(after))
        .switches
        .len();
    let (mut added, mut removed, mut changed) = (0, 0, 0);
    for (key, rule) in &before.rules {
        match after.rules.get(key) {
            None => removed += 1,
            Some(r) if r != rule => changed += 1,
            Some(_) => {}
        }
    }
    for key in after.rules.keys() {
        if !before.rules.contains_key(key) {
            added += 1;
        }
    }
    (switches, added, removed, changed)
}

fn switches_of(p: &Policy) -> Policy {
    Policy {
        default: p.default,
        options: p.options,
        oversize: p.oversize,
        paths: p.paths,
        rules: Default::default(),
    }
}

/// What replacing `before` with `after` changes.
pub fn diff(before: &Policy, after: &Policy) -> PolicyDiff {
    let mut d = PolicyDiff::default();
    // The switches, as the document writes them: every switch a policy has, by construction.
    let doc = |p: &Policy| {
        // The switches alone (a new switch must be named here: the struct is exhaustive).
        let mut v =
            serde_json::to_value(switches_of(p).to_file(None)).expect("a policy serializes");
        let obj = v.as_object_mut().expect("a policy document is an object");
        obj.remove("rules");
        obj.remove("revision");
        v
    };
    let (a, b) = (doc(before), doc(after));
    let mut fields: Vec<&String> = a
        .as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|o| o.keys())
        .collect();
    fields.sort();
    fields.dedup();
    for f in fields {
        let (x, y) = (
            a.get(f).cloned().unwrap_or(Value::Null),
            b.get(f).cloned().unwrap_or(Value::Null),
        );
        if x != y {
            d.switches.push(SwitchChange {
                field: f.clone(),
                before: x,
                after: y,
            });
        }
    }
    for (key, rule) in &before.rules {
        match after.rules.get(key) {
            None => d.removed.push(rule.to_spec()),
            Some(r) if r == rule => d.unchanged += 1,
            Some(r) => d.changed.push(RuleUpdate {
                before: rule.to_spec(),
                after: r.to_spec(),
            }),
        }
    }
    for (key, rule) in &after.rules {
        if !before.rules.contains_key(key) {
            d.added.push(rule.to_spec());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_toml;

    #[test]
    fn diff_names_every_change_once() {
        let a = parse_toml(
            "[[rules]]\npath = \"/admin\"\nmethods = [\"GET\"]\n[[rules]]\npath = \"/old\"\nmethods = [\"GET\"]\n[[rules]]\npath = \"/same\"\nmethods = [\"PUT\"]\n",
        )
        .unwrap();
        let b = parse_toml(
            "default = [\"GET\"]\n[[rules]]\npath = \"/%61dmin\"\nmethods = [\"GET\", \"DELETE\"]\nmode = \"monitor\"\n[[rules]]\npath = \"/api/\"\nmatch = \"prefix\"\nmethods = [\"GET\"]\n[[rules]]\npath = \"/same\"\nmethods = [\"PUT\"]\n",
        )
        .unwrap();
        let d = diff(&a, &b);
        assert_eq!(
            d.render(),
            "~ default: (default) -> [\"GET\"]\n\
             - /old exact: GET\n\
             + /api/ prefix: GET\n\
             ~ /admin exact: GET -> GET, DELETE (monitor)\n\
             4 changes: 1 switch, 1 rule added, 1 removed, 1 changed; 1 unchanged"
        );
        assert_eq!(counts(&a, &b), (1, 1, 1, 1));
        assert!(diff(&b, &b).is_empty());
        assert_eq!(diff(&b, &b).unchanged, 3);
        // It round-trips as JSON (the API's answer).
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(serde_json::from_value::<PolicyDiff>(v).unwrap(), d);
    }
}
