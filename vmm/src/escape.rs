//! Text from files `vmm` did not write itself (a report handed to `merge`: host fields,
//! cell modes, rule names, reasons) made safe for where it is shown: a terminal (no
//! escape sequences), Markdown (no table broken, no markup injected), SVG/XML (no
//! character XML forbids).

use std::borrow::Cow;
use std::fmt::Write;

/// For a terminal: every control character (C0, DEL, C1) and the Unicode line, paragraph
/// and bidirectional controls as `\u{..}`, so no escape sequence reaches the terminal and
/// no text is hidden or reordered.
pub fn terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_for_terminal) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_for_terminal(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// For Markdown text and table cells: [`terminal`]'s escapes, then Markdown's punctuation
/// backslash-escaped (`|` no longer ends a cell, `<` opens no HTML, `*`, `_`, `` ` ``, `[`
/// mark nothing up).
pub fn markdown(text: &str) -> String {
    let text = terminal(text);
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(
            c,
            '\\' | '|' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '&' | '#' | '~'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// For an XML text or attribute whose `<`, `&` and quotes the writer escapes (plotters'
/// SVG backend does): characters XML 1.0 forbids, and other controls, as `\u{..}`.
pub fn xml_text(text: &str) -> Cow<'_, str> {
    // XML forbids C0 controls but tab, newline and CR, and U+FFFE/U+FFFF; a label has no
    // use for any control, so all are shown as escapes.
    let forbidden = |c: char| unsafe_for_terminal(c) || c == '\u{fffe}' || c == '\u{ffff}';
    if !text.chars().any(forbidden) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if forbidden(c) {
                    format!("\\u{{{:x}}}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_shown_not_obeyed() {
        assert_eq!(terminal("plain text — ok"), "plain text — ok");
        assert_eq!(
            terminal("\u{1b}[2Jgone\r\n\u{9b}x"),
            "\\u{1b}[2Jgone\\u{d}\\u{a}\\u{9b}x"
        );
        assert_eq!(terminal("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(markdown("a | b\nc"), "a \\| b\\\\u{a}c");
        assert_eq!(markdown("<img src=x>"), "\\<img src=x\\>");
        assert_eq!(markdown("Intel(R) Core_i7"), "Intel(R) Core\\_i7");
        assert_eq!(xml_text("kvm\u{1b}x\u{ffff}"), "kvm\\u{1b}x\\u{ffff}");
    }
}
