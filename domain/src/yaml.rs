//! Reading operator YAML: one place that turns the YAML library's errors into
//! `parse-error` violations with a file, a line, a column and a fix.

use serde::de::DeserializeOwned;
use serde_saphyr::{RenderOptions, SnippetMode, Spanned};

use crate::violation::{Code, Loc, Violation};

/// The file an operator handed us: the name they used, and its text.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The path as given on the command line (used in every message).
    pub name: &'a str,
    /// The file's contents.
    pub text: &'a str,
}

/// Where a spanned value sits in `file`.
pub fn loc_of<T>(file: &str, spanned: &Spanned<T>) -> Loc {
    Loc::at(file, spanned.referenced.line(), spanned.referenced.column())
}

/// Parse `source` into `T`; a failure becomes one `parse-error` violation.
///
/// Structural problems (broken YAML, a wrong type, an unknown field) stop the
/// YAML reader at the first one; everything checked after parsing is reported
/// all at once.
pub fn parse<T: DeserializeOwned>(source: Source<'_>, what: &str) -> Result<T, Box<Violation>> {
    if source.text.trim().is_empty() {
        return Err(Box::new(
            Violation::new(Code::ParseError, format!("the {what} is empty"))
                .at(&Loc::file(source.name))
                .fix(format!("write the {what} as a YAML mapping; see FORMATS.md")),
        ));
    }
    serde_saphyr::from_str::<T>(source.text).map_err(|err| {
        let loc = err
            .location()
            .map(|l| Loc::at(source.name, l.line(), l.column()))
            .unwrap_or_else(|| Loc::file(source.name));
        let mut options = RenderOptions::default();
        options.snippets = SnippetMode::Off;
        let raw = err.render_with_options(options);
        let (message, fix) = explain(strip_position(&raw), what);
        let mut v = Violation::new(Code::ParseError, message).at(&loc);
        if let Some(fix) = fix {
            v = v.fix(fix);
        }
        Box::new(v)
    })
}

/// The library appends " at line N, column M"; we carry the position as fields.
fn strip_position(raw: &str) -> &str {
    match raw.rfind(" at line ") {
        Some(i) if raw[i..].contains("column") => &raw[..i],
        _ => raw,
    }
}

/// Rewrite the library's developer-facing messages for an operator, and say
/// what to write instead where we can tell.
fn explain(message: &str, what: &str) -> (String, Option<String>) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once("`, expected one of ") {
            let fields: Vec<&str> = expected.split(", ").map(str::trim).collect();
            let best = fields.iter().map(|f| (strsim::damerau_levenshtein(field, f), *f)).min();
            let fix = match best {
                Some((d, f)) if d <= 2 || f.contains(field) || field.contains(f) => {
                    format!("did you mean `{f}`? The fields here are: {}", fields.join(", "))
                }
                _ => format!("the fields here are: {}", fields.join(", ")),
            };
            return (
                format!("unknown field `{field}` in the {what} (a misspelt safety field is never ignored)"),
                Some(fix),
            );
        }
        if let Some((field, _)) = rest.split_once("`, there are no fields") {
            return (
                format!("unknown field `{field}` in the {what}"),
                Some("remove it: this mapping takes no fields".into()),
            );
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        return (
            format!("the required field `{field}` is missing from the {what}"),
            Some(format!("add `{field}:`; see FORMATS.md for its form")),
        );
    }
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return (
            format!("the key `{key}` appears twice in the same mapping"),
            Some(format!("keep one `{key}:`; YAML would silently drop the other")),
        );
    }
    let fix = if message.starts_with("expected") || message.starts_with("invalid") {
        format!("write the value in the form FORMATS.md gives for this field of the {what}")
    } else {
        "check the YAML at this position: a bracket, brace or quote left open, or indentation that does not line up"
            .into()
    };
    (format!("the {what} is not valid YAML here: {message}"), Some(fix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: Option<String>,
        targets: Option<u32>,
    }

    fn err(text: &str) -> Violation {
        *parse::<Doc>(Source { name: "p.yaml", text }, "plan").expect_err("must fail")
    }

    #[test]
    fn misspelt_field_suggests_the_right_one() {
        let v = err("name: x\ntargest: 3\n");
        assert_eq!(v.code, Code::ParseError);
        assert_eq!((v.line, v.column), (Some(2), Some(1)));
        assert!(v.message.contains("`targest`"), "{}", v.message);
        assert!(v.fix.as_deref().unwrap_or("").contains("did you mean `targets`"));
    }

    #[test]
    fn broken_yaml_has_a_position() {
        let v = err("name: [x\n");
        assert_eq!(v.file.as_deref(), Some("p.yaml"));
        assert!(v.line.is_some());
        assert!(!v.message.contains(" at line "), "{}", v.message);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let v = err("name: x\nname: y\n");
        assert_eq!(v.line, Some(2));
        assert!(v.message.contains("twice"));
    }

    #[test]
    fn empty_file_is_refused() {
        let v = err("  \n");
        assert!(v.message.contains("empty"));
    }
}
