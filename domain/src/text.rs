//! Text from hosts and plans, made inert before it reaches a terminal.
//!
//! Step output, plan names and host details are written by people and
//! programs the operator does not control. An escape sequence in them could
//! clear the operator's screen, set the terminal's title, draw a fake line
//! or a link. Every control character but tab (and newline where lines are
//! kept) is shown as an escape (`\x1b`, `\r`, `\u{202e}`) instead.
//!
//! Two forms: [`inert`] for a field that is one line of its own or part of
//! one (a plan name in a list row, a host's detail after `FAILED`), where a
//! newline is escaped too so that it cannot forge a line; [`inert_lines`]
//! for a block whose lines are the text's own (step output, a report),
//! where each line is made inert and the newlines stay.

use std::borrow::Cow;

/// Whether `c` would do something to a terminal rather than show: C0 and
/// C1 controls (U+009B is a CSI of its own) and DEL; the Unicode
/// bidirectional controls, which reorder what is shown around them (the
/// "Trojan Source" characters); and the line and paragraph separators,
/// which some viewers break a line at. Tab only moves to the next stop,
/// and stays.
pub fn is_active(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}'
        )
}

/// `s` with every active character escaped (a newline too: a single line
/// stays one line).
pub fn inert(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// `s` with every line made inert and its newlines kept: for a block of
/// output shown as lines (a carriage return is escaped, so a line cannot be
/// drawn over another).
pub fn inert_lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let stays = |c: char| !is_active(c) || (keep_newlines && c == '\n');
    if s.chars().all(stays) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if stays(c) {
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

    #[test]
    fn c1_controls_del_and_every_bidi_control_are_active() {
        // C1: U+0085 (NEL) and U+009B (CSI, which a terminal may obey like
        // ESC [), and DEL.
        assert_eq!(inert("a\u{9b}2Jb\u{85}c\u{7f}"), "a\\x9b2Jb\\x85c\\x7f");
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            assert!(is_active(c), "{c:?}");
        }
        for c in ['\u{061c}', '\u{200e}', '\u{200f}', '\u{2028}', '\u{2029}'] {
            assert!(is_active(c), "{c:?}");
        }
        assert_eq!(inert("x\u{2067}y\u{2069}"), "x\\u{2067}y\\u{2069}");
        // Printable text around them, accents and wide characters stay.
        for c in ['a', ' ', '\t', '\u{a0}', '\u{e9}', '\u{200b}', '\u{4e2d}', '\u{1F600}'] {
            assert!(!is_active(c), "{c:?}");
        }
    }

    #[test]
    fn a_block_keeps_its_lines_and_each_line_is_inert() {
        assert_eq!(inert_lines("one\ntwo\n"), "one\ntwo\n");
        assert!(matches!(inert_lines("one\ntwo\n"), Cow::Borrowed(_)));
        assert_eq!(
            inert_lines("ok\r\x1b[2Kall fine\n\x1b]8;;http://x\x07link\n"),
            "ok\\r\\x1b[2Kall fine\n\\x1b]8;;http://x\\x07link\n"
        );
        // What is inert already stays as it is.
        let once = inert("\x1b[2J\nfake");
        assert_eq!(inert_lines(&once), once);
        assert_eq!(inert(&once), once);
    }
}
