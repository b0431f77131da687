//! Text from hosts and plans, made inert before it reaches a terminal.
//!
//! Step output, plan names and host details are written by people and
//! programs the operator does not control. An escape sequence in them could
//! clear the operator's screen, set the terminal's title, draw a fake line
//! or a link. Every control character but tab (and newline where lines are
//! kept) is shown as an escape (`\x1b`, `\r`, `\u{202e}`) instead.

use std::borrow::Cow;

/// Whether `c` would do something to a terminal rather than show: C0 and
/// C1 controls, DEL, and the bidirectional overrides that reorder what is
/// shown.
pub fn is_active(c: char) -> bool {
    (c.is_control() && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every active character escaped (a newline too: a single line
/// stays one line).
pub fn inert(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_active) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_active(c) {
            out.push(c);
        } else if c == '\n' {
            out.push_str("\\n");
        } else if c == '\r' {
            out.push_str("\\r");
        } else if (c as u32) < 0x100 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_are_shown_not_obeyed() {
        assert_eq!(inert("plain text\tok"), "plain text\tok");
        assert_eq!(inert("\x1b[2J\x1b]0;pwned\x07done"), "\\x1b[2J\\x1b]0;pwned\\x07done");
        assert_eq!(inert("fake\nline\r"), "fake\\nline\\r");
        assert_eq!(inert("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(inert("caf\u{e9} \u{1F600}"), "caf\u{e9} \u{1F600}");
    }
}
