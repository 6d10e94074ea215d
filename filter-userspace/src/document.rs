//! Policy documents as operators write them, checked whole: every error a document holds, each
//! placed exactly (`file:line:column`, from the TOML parser's spans: the value or key at fault,
//! down to the one method token of a list), for `filterd --check`, `filterctl policy check` and
//! the reloads of a watched source. A source is one file, or a directory of `*.toml` files (a
//! mounted Kubernetes ConfigMap): their rules are read in the order of the files' names, and a
//! switch (`default`, `options`, ...) may be set in one of them only.
//!
//! It reads and validates only: the model is [`crate::policy`]'s (this module finds where its
//! errors are), and nothing here touches the dataplane or writes a file.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::policy::{Policy, PolicyError, PolicyFile, RuleSpec};

/// Diagnostics shown at most; a count of the rest follows them.
pub const DIAGNOSTICS_SHOWN: usize = 200;

/// One error in a document, placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as the operator named it (or `-` for a document that is no file).
    pub file: String,
    /// 1-based; 0 when the error has no place in a file (an empty directory).
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Byte range in the file of what is at fault.
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl Diagnostic {
    fn at(file: &str, text: &str, span: Option<Range<usize>>, message: String) -> Diagnostic {
        let (line, column) = match &span {
            Some(s) => line_col(text, s.start),
            None => (1, 1),
        };
        Diagnostic {
            file: file.to_owned(),
            line,
            column,
            span,
            message,
        }
    }

    fn nowhere(file: &str, message: String) -> Diagnostic {
        Diagnostic {
            file: file.to_owned(),
            line: 0,
            column: 0,
            span: None,
            message,
        }
    }

    /// The diagnostic with the line it points at and a caret under the place (as compilers
    /// show them), given the file's text.
    pub fn render(&self, text: &str) -> String {
        let Some(span) = &self.span else {
            return self.to_string();
        };
        let Some(src) = text.lines().nth(self.line.saturating_sub(1)) else {
            return self.to_string();
        };
        let width = text[span.start.min(text.len())..span.end.min(text.len())]
            .lines()
            .next()
            .map_or(1, |s| s.chars().count().max(1));
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        format!(
            "{self}\n{pad} |\n{num} | {src}\n{pad} | {}{}",
            " ".repeat(self.column - 1),
            "^".repeat(width)
        )
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before, |i| &before[i + 1..])
        .chars()
        .count()
        + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What a check found: the policy (and the revision a `--state` file carries), or every
/// error, placed and sorted by file and position.
pub type Checked = Result<(Policy, u64), Vec<Diagnostic>>;

/// One parsed document and where its parts are.
struct Doc<'a> {
    name: String,
    text: &'a str,
    root: Spanned<DeTable<'a>>,
}

/// What one document holds, as far as it deserializes: its switches and rules, the rules'
/// places among the document's (a rule that does not deserialize is left out), and the
/// errors found so far.
struct Parsed {
    file: PolicyFile,
    /// `rule_at[i]`: the index in the document of `file.rules[i]`.
    rule_at: Vec<usize>,
    errors: Vec<Diagnostic>,
}

impl<'a> Doc<'a> {
    fn parse(name: &str, text: &'a str) -> Result<Doc<'a>, Vec<Diagnostic>> {
        let (root, errors) = DeTable::parse_recoverable(text);
        if errors.is_empty() {
            return Ok(Doc {
                name: name.to_owned(),
                text,
                root,
            });
        }
        Err(errors
            .iter()
            .map(|e| Diagnostic::at(name, text, e.span(), e.message().trim().to_owned()))
            .collect())
    }

    fn entry(
        &self,
        key: &str,
    ) -> Option<(&Spanned<std::borrow::Cow<'a, str>>, &Spanned<DeValue<'a>>)> {
        self.root
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
    }

    fn rules(&self) -> &[Spanned<DeValue<'a>>] {
        match self.entry("rules").map(|(_, v)| v.get_ref()) {
            Some(DeValue::Array(a)) => a,
            _ => &[],
        }
    }

    fn diag(&self, span: Option<Range<usize>>, message: String) -> Diagnostic {
        Diagnostic::at(&self.name, self.text, span, message)
    }

    /// Deserialize piece by piece, so that one piece that does not fit the document's shape
    /// (an unknown key, a string where a list goes) does not hide the others' errors.
    fn deserialize(&self) -> Parsed {
        let mut errors = Vec::new();
        let mut kept = DeTable::default();
        let mut rule_at = Vec::new();
        for (key, value) in self.root.get_ref().iter() {
            if key.get_ref().as_ref() == "rules" {
                let DeValue::Array(items) = value.get_ref() else {
                    errors.push(self.diag(
                        Some(value.span()),
                        "rules: must be a list of rules ([[rules]] tables)".into(),
                    ));
                    continue;
                };
                let mut good = toml::de::DeArray::new();
                for (i, item) in items.iter().enumerate() {
                    match RuleSpec::deserialize(ValueDeserializer::from(item.clone())) {
                        Ok(_) => {
                            good.push(item.clone());
                            rule_at.push(i);
                        }
                        Err(e) => errors.push(self.diag(
                            e.span().or(Some(item.span())),
                            format!("rules[{i}]: {}", e.message().trim()),
                        )),
                    }
                }
                kept.insert(
                    key.clone(),
                    Spanned::new(value.span(), DeValue::Array(good)),
                );
                continue;
            }
            let mut one = DeTable::default();
            one.insert(key.clone(), value.clone());
            let whole = Spanned::new(self.root.span(), DeValue::Table(one));
            match PolicyFile::deserialize(ValueDeserializer::from(whole)) {
                Ok(_) => {
                    kept.insert(key.clone(), value.clone());
                }
                Err(e) => {
                    let unknown = e.message().contains("unknown field");
                    let span = if unknown { key.span() } else { value.span() };
                    let message = if unknown {
                        e.message().trim().to_owned()
                    } else {
                        format!("{}: {}", key.get_ref(), e.message().trim())
                    };
                    errors.push(self.diag(Some(span), message));
                }
            }
        }
        let whole = Spanned::new(self.root.span(), DeValue::Table(kept));
        let file = PolicyFile::deserialize(ValueDeserializer::from(whole)).unwrap_or_else(|e| {
            // Every piece deserialized on its own; together they must too.
            errors.push(self.diag(e.span(), e.message().trim().to_owned()));
            PolicyFile::default()
        });
        Parsed {
            file,
            rule_at,
            errors,
        }
    }

    /// Where `err` (about this document's rule numbering) is: the value at fault, the one
    /// method token of a list, or the switch.
    fn locate(&self, err: &PolicyError) -> Option<Range<usize>> {
        if let Some(index) = err.rule_index() {
            let rule = self.rules().get(index)?;
            let field = |name: &str| -> Option<&Spanned<DeValue<'a>>> {
                match rule.get_ref() {
                    DeValue::Table(t) => t
                        .iter()
                        .find(|(k, _)| k.get_ref().as_ref() == name)
                        .map(|(_, v)| v),
                    _ => None,
                }
            };
            let span = match err {
                PolicyError::BadPath { .. } | PolicyError::DuplicatePath { .. } => {
                    field("path").map(Spanned::span)
                }
                PolicyError::BadMethodToken { token, .. }
                | PolicyError::UnknownMethod { token, .. } => {
                    field("methods").map(|m| token_span(m, token))
                }
                PolicyError::EmptyMethods { .. } => field("methods").map(Spanned::span),
                PolicyError::BadMatch { .. } => field("match").map(Spanned::span),
                PolicyError::BadMode { .. } => field("mode").map(Spanned::span),
                PolicyError::HeadContradiction { .. } => field("head").map(Spanned::span),
                _ => None,
            };
            return span.or(Some(rule.span()));
        }
        if let PolicyError::TooManyRules { .. } = err {
            return self.entry("rules").map(|(k, _)| k.span());
        }
        let (_, value) = self.entry(err.field()?)?;
        Some(match err {
            PolicyError::BadDefaultMethod(inner) => match &**inner {
                PolicyError::BadMethodToken { token, .. }
                | PolicyError::UnknownMethod { token, .. } => token_span(value, token),
                _ => value.span(),
            },
            _ => value.span(),
        })
    }
}

/// The span of `token` in a list of method tokens, else the list's.
fn token_span(list: &Spanned<DeValue<'_>>, token: &str) -> Range<usize> {
    match list.get_ref() {
        DeValue::Array(items) => items
            .iter()
            .find(|v| v.get_ref().as_str() == Some(token))
            .map_or(list.span(), Spanned::span),
        _ => list.span(),
    }
}

/// Check one document (`name` is how diagnostics name it). Every error is reported, placed.
pub fn check_text(name: &str, text: &str) -> Checked {
    let doc = Doc::parse(name, text)?;
    let parsed = doc.deserialize();
    let mut errors = parsed.errors;
    match Policy::from_file_all(&parsed.file) {
        Ok(policy) if errors.is_empty() => {
            return Ok((policy, parsed.file.revision.unwrap_or(0)));
        }
        Ok(_) => {}
        Err(found) => {
            for e in found {
                let e = e.reindex(|i| parsed.rule_at.get(i).copied().unwrap_or(i));
                errors.push(doc.diag(doc.locate(&e), e.to_string()));
            }
        }
    }
    Err(sorted(errors))
}

fn sorted(mut errors: Vec<Diagnostic>) -> Vec<Diagnostic> {
    errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    errors
}

/// The files a source is read from: the file itself, or a directory's `*.toml` files (not
/// those whose name starts with `.`: a ConfigMap volume keeps its versions in `..data`-style
/// entries), sorted by name, symlinks followed.
pub fn source_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// What identifies the content of a source without reading it: each file's device, inode,
/// size and modification time (symlinks followed: a ConfigMap update swaps a symlink), and
/// the directory's listing. The watch compares these and reloads when they differ.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let files = source_files(path).unwrap_or_default();
    files
        .into_iter()
        .map(|f| match std::fs::metadata(&f) {
            Ok(m) => (f, m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()),
            Err(_) => (f, 0, 0, 0, 0, 0),
        })
        .collect()
}

/// Check a policy source: one file, or a directory of `*.toml` files merged (see the module
/// comment). A directory's documents carry no revision (0).
pub fn check_source(path: &Path) -> Checked {
    let shown = path.display().to_string();
    let files = source_files(path)
        .map_err(|e| vec![Diagnostic::nowhere(&shown, format!("cannot read it: {e}"))])?;
    let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    if !is_dir {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![Diagnostic::nowhere(&shown, format!("cannot read it: {e}"))])?;
        return check_text(&shown, &text);
    }
    if files.is_empty() {
        return Err(vec![Diagnostic::nowhere(
            &shown,
            "the directory holds no *.toml file (an empty policy would allow everything: write one, even an empty one, to mean that)".into(),
        )]);
    }
    let mut texts = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| {
            vec![Diagnostic::nowhere(
                &f.display().to_string(),
                format!("cannot read it: {e}"),
            )]
        })?;
        texts.push((f.display().to_string(), text));
    }
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in &texts {
        match Doc::parse(name, text) {
            Ok(d) => docs.push(d),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        return Err(sorted(errors));
    }
    // Merge: the rules in file order, each switch from the one file that sets it.
    let mut merged = PolicyFile::default();
    // Where merged rule i comes from: (document, index in it).
    let mut origin: Vec<(usize, usize)> = Vec::new();
    let mut set_by: Vec<(&'static str, usize)> = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let parsed = doc.deserialize();
        errors.extend(parsed.errors);
        // Exhaustive on purpose: a new switch must say how it merges.
        let PolicyFile {
            revision: _,
            default,
            options,
            oversize,
            paths,
            rules,
        } = parsed.file;
        let mut switch = |name: &'static str, present: bool| -> bool {
            if !present {
                return false;
            }
            if let Some((_, first)) = set_by.iter().find(|(n, _)| *n == name) {
                let span = doc.entry(name).map(|(k, _)| k.span());
                errors.push(doc.diag(
                    span,
                    format!(
                        "{name}: already set in {}; a switch may be set in one file of the directory only",
                        docs[*first].name
                    ),
                ));
                return false;
            }
            set_by.push((name, d));
            true
        };
        if switch("default", default.is_some()) {
            merged.default = default;
        }
        if switch("options", options.is_some()) {
            merged.options = options;
        }
        if switch("oversize", oversize.is_some()) {
            merged.oversize = oversize;
        }
        if switch("paths", paths.is_some()) {
            merged.paths = paths;
        }
        origin.extend(parsed.rule_at.iter().map(|&i| (d, i)));
        merged.rules.extend(rules);
    }
    match Policy::from_file_all(&merged) {
        Ok(policy) if errors.is_empty() => return Ok((policy, 0)),
        Ok(_) => {}
        Err(found) => {
            for e in found {
                let (doc, e) = match e.rule_index().and_then(|i| origin.get(i)) {
                    Some(&(d, local)) => (&docs[d], e.reindex(|_| local)),
                    None => {
                        // A switch: the file that set it.
                        let d = e
                            .field()
                            .and_then(|f| set_by.iter().find(|(n, _)| *n == f))
                            .map_or(0, |(_, d)| *d);
                        (&docs[d], e)
                    }
                };
                errors.push(doc.diag(doc.locate(&e), e.to_string()));
            }
        }
    }
    Err(sorted(errors))
}

/// Every diagnostic rendered with its source line (at most [`DIAGNOSTICS_SHOWN`]), then a
/// count of the rest.
pub fn render_all(diagnostics: &[Diagnostic]) -> String {
    let mut out = Vec::new();
    for d in diagnostics.iter().take(DIAGNOSTICS_SHOWN) {
        let text = if d.span.is_some() {
            std::fs::read_to_string(&d.file).unwrap_or_default()
        } else {
            String::new()
        };
        out.push(d.render(&text));
    }
    if diagnostics.len() > DIAGNOSTICS_SHOWN {
        out.push(format!(
            "... and {} more",
            diagnostics.len() - DIAGNOSTICS_SHOWN
        ));
    }
    out.join("\n")
}

/// The diagnostics as one line each (for a log line or `/v1/status`), at most
/// [`DIAGNOSTICS_SHOWN`].
pub fn one_per_line(diagnostics: &[Diagnostic]) -> Vec<String> {
    let mut out: Vec<String> = diagnostics
        .iter()
        .take(DIAGNOSTICS_SHOWN)
        .map(ToString::to_string)
        .collect();
    if diagnostics.len() > DIAGNOSTICS_SHOWN {
        out.push(format!(
            "... and {} more",
            diagnostics.len() - DIAGNOSTICS_SHOWN
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        check_text("p.toml", text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn every_error_is_placed_at_the_value_at_fault() {
        let text = r#"options = "reply"

[[rules]]
path = "api"
methods = ["GET"]

[[rules]]
path = "/b"
methods = ["GET", "FETCH", "PUT"]

[[rules]]
path = "/c"
methods = ["GET"]
mode = "loud"

[[rules]]
path = "/d"
methods = ["GET"]

[[rules]]
path = "/%64"
methods = ["PUT"]
"#;
        let got = errors(text);
        assert_eq!(
            got,
            [
                "p.toml:1:11: options: \"reply\" is neither \"pass\" nor \"answer\"",
                "p.toml:4:8: rules[0].path \"api\": must start with '/'",
                "p.toml:9:19: rules[1].methods: \"FETCH\" is not a method this filter knows (known: GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH, PROPFIND, PROPPATCH, MKCOL, COPY, MOVE, LOCK, UNLOCK)",
                "p.toml:14:8: rules[2].mode: \"loud\" is neither \"enforce\" nor \"monitor\"",
                "p.toml:21:8: rules[4]: a exact rule for path \"/d\" appears more than once",
            ],
            "{got:#?}"
        );
    }

    #[test]
    fn shape_errors_do_not_hide_the_others() {
        let text = "colour = \"red\"\ndefault = 7\n\n[[rules]]\npath = \"/a\"\nmethod = [\"GET\"]\n\n[[rules]]\npath = \"b\"\nmethods = [\"GET\"]\n";
        let got = errors(text);
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(
            got[0].starts_with("p.toml:1:1: unknown field `colour`"),
            "{}",
            got[0]
        );
        assert!(got[1].starts_with("p.toml:2:11: default:"), "{}", got[1]);
        assert!(
            got[2].starts_with("p.toml:6:1: rules[0]: unknown field `method`"),
            "{}",
            got[2]
        );
        // The rule after the one that did not deserialize keeps its own number.
        assert!(
            got[3].starts_with("p.toml:9:8: rules[1].path \"b\""),
            "{}",
            got[3]
        );
    }

    #[test]
    fn syntax_errors_all_come_with_their_place() {
        let got = errors("[[rules]]\npath = \"/a\nmethods = [\"GET\"]\n");
        assert!(!got.is_empty());
        assert!(got[0].starts_with("p.toml:2:"), "{got:#?}");
    }

    #[test]
    fn a_valid_document_is_the_policy_parse_document_reads() {
        let text = "revision = 4\ndefault = [\"GET\"]\n[[rules]]\npath = \"/a/\"\nmatch = \"prefix\"\nmethods = [\"GET\"]\n";
        let (p, rev) = check_text("p.toml", text).unwrap();
        assert_eq!((p, rev), crate::policy::parse_document(text).unwrap());
        // Inline tables are placed too.
        let got = errors("rules = [{ path = \"/a\", methods = [] }]\n");
        assert_eq!(got, ["p.toml:1:35: rules[0].methods: the list is empty; a rule must allow at least one method"]);
    }

    #[test]
    fn render_points_at_the_place() {
        let text = "[[rules]]\npath = \"api\"\nmethods = [\"GET\"]\n";
        let d = check_text("p.toml", text).unwrap_err().remove(0);
        assert_eq!(
            d.render(text),
            "p.toml:2:8: rules[0].path \"api\": must start with '/'\n  |\n2 | path = \"api\"\n  |        ^^^^^"
        );
    }

    #[test]
    fn a_directory_is_its_files_in_order_with_each_switch_set_once() {
        let dir = std::env::temp_dir().join(format!("filterd-doc-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        std::fs::write(dir.join("10-api.toml"), "default = [\"GET\"]\n[[rules]]\npath = \"/api/\"\nmatch = \"prefix\"\nmethods = [\"GET\", \"POST\"]\n").unwrap();
        std::fs::write(
            dir.join("20-admin.toml"),
            "[[rules]]\npath = \"/admin\"\nmethods = [\"GET\"]\n",
        )
        .unwrap();
        std::fs::write(dir.join("README.md"), "not a policy").unwrap();
        std::fs::write(dir.join(".hidden.toml"), "broken = [").unwrap();
        let (p, rev) = check_source(&dir).unwrap();
        assert_eq!((p.rules.len(), rev), (2, 0));
        assert!(p.exact("/admin").is_some());
        // A switch set twice, and a rule duplicated across files: each placed in its file.
        std::fs::write(
            dir.join("30-dup.toml"),
            "default = \"any\"\n[[rules]]\npath = \"/%61dmin\"\nmethods = [\"PUT\"]\n",
        )
        .unwrap();
        let got: Vec<String> = check_source(&dir)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        let f = dir.join("30-dup.toml").display().to_string();
        assert_eq!(
            got,
            [
                format!("{f}:1:1: default: already set in {}; a switch may be set in one file of the directory only", dir.join("10-api.toml").display()),
                format!("{f}:3:8: rules[0]: a exact rule for path \"/admin\" appears more than once"),
            ]
        );
        for f in ["10-api.toml", "20-admin.toml", "30-dup.toml"] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        let err = check_source(&dir).unwrap_err();
        assert!(err[0].message.contains("no *.toml file"), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
