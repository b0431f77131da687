//! How the command line prints results: a table for people, or one JSON or
//! YAML document for scripts; either way, text from hosts and plans in it
//! never drives the terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

use clap::ValueEnum;
use wavegate_domain::text::is_active;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: aligned columns and sentences (`text` is the same).
    #[default]
    #[value(alias = "text")]
    Table,
    /// One JSON document, for scripts.
    Json,
    /// The same document as YAML.
    Yaml,
}

impl Output {
    /// Print `value` as JSON or YAML and return true; for `table`, print
    /// nothing and return false (the caller prints its own form).
    pub fn emit(self, value: &impl serde::Serialize) -> anyhow::Result<bool> {
        match self {
            Output::Json => println!("{}", json_inert(&serde_json::to_string_pretty(value)?)),
            Output::Yaml => print!("{}", yaml_inert(value)?),
            Output::Table => return Ok(false),
        }
        Ok(true)
    }

    /// `value` as one record of a stream: a JSON line, or a YAML document
    /// after `---`; `None` for `table` (the caller has its own line).
    pub fn record(self, value: &impl serde::Serialize) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Output::Json => Some(json_inert(&serde_json::to_string(value)?).into_owned()),
            Output::Yaml => Some(format!("---\n{}", yaml_inert(value)?.trim_end())),
            Output::Table => None,
        })
    }
}

/// JSON text with every active character that serde_json leaves as it is
/// (it escapes C0 controls only: DEL, C1 controls and the bidirectional
/// controls pass) written as a `\uXXXX` escape. Outside strings, JSON has
/// nothing but ASCII, so this is the same document, inert.
fn json_inert(json: &str) -> Cow<'_, str> {
    let active = |c: char| is_active(c) && c != '\n';
    if !json.chars().any(active) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if active(c) {
            // Every active character is in the Basic Multilingual Plane.
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `value` as YAML, inert. serde-saphyr writes a string with a control
/// character double-quoted with escapes, but leaves the bidirectional
/// controls as they are, in any style. When there are some, every string
/// holding one is written double-quoted, where `\uXXXX` is the character
/// itself; a key holding one shows the escape as text.
fn yaml_inert(value: &impl serde::Serialize) -> anyhow::Result<String> {
    let yaml = serde_saphyr::to_string(value)?;
    let active = |c: char| is_active(c) && c != '\n';
    if !yaml.chars().any(active) {
        return Ok(yaml);
    }
    let quoted = serde_saphyr::to_string(&Quoted(&serde_json::to_value(value)?))?;
    let mut out = String::with_capacity(quoted.len() + 16);
    for c in quoted.chars() {
        if active(c) {
            let _ = write!(out, "\\u{:04X}", c as u32);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// A JSON value for serde-saphyr, with every string that holds an active
/// character double-quoted.
struct Quoted<'a>(&'a serde_json::Value);

impl serde::Serialize for Quoted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde_json::Value;
        match self.0 {
            Value::String(t) if t.chars().any(is_active) => serde_saphyr::DoubleQuoted(t.as_str()).serialize(s),
            Value::Array(a) => s.collect_seq(a.iter().map(Quoted)),
            Value::Object(o) => s.collect_map(o.iter().map(|(k, v)| (k, Quoted(v)))),
            v => v.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text as a hostile host prints it: C0, DEL, C1 and bidirectional
    /// controls, a newline.
    const HOSTILE: &str = "\u{1b}[2J \u{7f} \u{9b}31m \u{85} \u{202e}exe.txt \u{2067}x\u{2069}\nnext\r";

    #[test]
    fn json_escapes_every_active_character_and_stays_the_same_document() {
        let v = serde_json::json!({"text": HOSTILE, "list": [HOSTILE, "plain"]});
        let text = json_inert(&serde_json::to_string_pretty(&v).expect("json")).into_owned();
        assert!(!text.chars().any(|c| is_active(c) && c != '\n'), "{text}");
        assert!(text.contains("\\u009b31m") && text.contains("\\u202eexe.txt"), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).expect("json"), v);
        // Plain text is left alone.
        assert!(matches!(json_inert("{\"a\": \"caf\u{e9}\"}"), Cow::Borrowed(_)));
    }

    #[test]
    fn yaml_escapes_every_active_character_and_reads_back_the_same() {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            text: &'a str,
            multi: &'a str,
            bidi_only: &'a str,
            list: Vec<&'a str>,
        }
        let doc = Doc {
            text: HOSTILE,
            multi: "one\ntwo\n",
            bidi_only: "abc\u{202e}def",
            list: vec!["x\u{2066}y\nz", "plain"],
        };
        let text = yaml_inert(&doc).expect("yaml");
        assert!(!text.chars().any(|c| is_active(c) && c != '\n'), "{text}");
        let back: serde_json::Value = serde_saphyr::from_str(&text).expect("yaml");
        assert_eq!(back, serde_json::to_value(&doc).expect("value"), "{text}");
        // Without any, the document is serde-saphyr's own.
        let plain = Doc {
            text: "a",
            multi: "one\ntwo\n",
            bidi_only: "b",
            list: vec!["c"],
        };
        assert_eq!(
            yaml_inert(&plain).expect("yaml"),
            serde_saphyr::to_string(&plain).expect("yaml")
        );
    }
}
