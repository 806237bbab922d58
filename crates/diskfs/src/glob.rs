//! Include patterns for restore (`restore --include`), matched against
//! `/`-separated in-image paths. Pure: no I/O.
//!
//! Syntax: `*` any run of bytes within one component, `?` one character
//! (not `/`), `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]` one byte from a set,
//! `**` as a whole component any number (zero included) of components,
//! `\x` a literal `x`. Both pattern and path are anchored at the root; a
//! leading `/` is optional. Matching is case-sensitive.

/// A compiled include pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    components: Vec<Component>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Component {
    /// `**`
    AnyDepth,
    Pattern(Vec<Token>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Byte(u8),
    AnyChar,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(u8, u8)>,
    },
}

/// A pattern that cannot be compiled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("pattern '{0}': unclosed '['")]
    UnclosedClass(String),
    #[error("pattern '{0}': trailing '\\'")]
    TrailingEscape(String),
    #[error("pattern '{0}': empty component")]
    EmptyComponent(String),
}

fn split(path: &[u8]) -> Vec<&[u8]> {
    let trimmed = path.strip_prefix(b"/").unwrap_or(path);
    let trimmed = trimmed.strip_suffix(b"/").unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Vec::new();
    }
    trimmed.split(|b| *b == b'/').collect()
}

fn compile_component(text: &[u8], whole: &[u8]) -> Result<Component, GlobError> {
    let show = || String::from_utf8_lossy(whole).into_owned();
    if text == b"**" {
        return Ok(Component::AnyDepth);
    }
    if text.is_empty() {
        return Err(GlobError::EmptyComponent(show()));
    }
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'*' => {
                if tokens.last() != Some(&Token::Star) {
                    tokens.push(Token::Star);
                }
            }
            b'?' => tokens.push(Token::AnyChar),
            b'\\' => {
                i += 1;
                let b = *text
                    .get(i)
                    .ok_or_else(|| GlobError::TrailingEscape(show()))?;
                tokens.push(Token::Byte(b));
            }
            b'[' => {
                let mut j = i + 1;
                let negated = matches!(text.get(j), Some(b'!' | b'^'));
                if negated {
                    j += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let b = *text
                        .get(j)
                        .ok_or_else(|| GlobError::UnclosedClass(show()))?;
                    if b == b']' && !first {
                        break;
                    }
                    first = false;
                    if text.get(j + 1) == Some(&b'-') && text.get(j + 2).is_some_and(|e| *e != b']')
                    {
                        ranges.push((b, text[j + 2]));
                        j += 3;
                    } else {
                        ranges.push((b, b));
                        j += 1;
                    }
                }
                tokens.push(Token::Class { negated, ranges });
                i = j;
            }
            b => tokens.push(Token::Byte(b)),
        }
        i += 1;
    }
    Ok(Component::Pattern(tokens))
}

/// Length of the UTF-8 character starting at `s[0]` (1 for invalid bytes).
fn char_len(s: &[u8]) -> usize {
    let n = match s[0] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    };
    if n > 1 && s.len() >= n && s[1..n].iter().all(|b| b & 0xC0 == 0x80) {
        n
    } else {
        1
    }
}

/// Matches one token at the start of `s`; returns how many bytes it took.
fn token_len(token: &Token, s: &[u8]) -> Option<usize> {
    let b = *s.first()?;
    match token {
        Token::Byte(x) => (*x == b).then_some(1),
        Token::AnyChar => Some(char_len(s)),
        Token::Class { negated, ranges } => {
            let hit = ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&b));
            (hit != *negated).then_some(1)
        }
        Token::Star => None,
    }
}

/// Wildcard match of one component, with single-star backtracking (linear
/// in practice, never exponential).
fn match_component(tokens: &[Token], s: &[u8]) -> bool {
    let (mut t, mut i) = (0usize, 0usize);
    let mut resume: Option<(usize, usize)> = None;
    loop {
        if t < tokens.len() {
            if tokens[t] == Token::Star {
                resume = Some((t, i));
                t += 1;
                continue;
            }
            if let Some(n) = token_len(&tokens[t], &s[i..]) {
                t += 1;
                i += n;
                continue;
            }
        } else if i == s.len() {
            return true;
        }
        match resume {
            Some((st, si)) if si < s.len() => {
                let next = si + char_len(&s[si..]);
                resume = Some((st, next));
                t = st + 1;
                i = next;
            }
            _ => return false,
        }
    }
}

impl Glob {
    pub fn new(pattern: &[u8]) -> Result<Glob, GlobError> {
        let components = split(pattern)
            .into_iter()
            .map(|c| compile_component(c, pattern))
            .collect::<Result<_, _>>()?;
        Ok(Glob { components })
    }

    /// True if `path` matches the whole pattern.
    pub fn matches(&self, path: &[u8]) -> bool {
        let parts = split(path);
        let n = parts.len();
        // reach[j]: pattern prefix of length i matches path prefix of length j.
        let mut reach = vec![false; n + 1];
        reach[0] = true;
        for comp in &self.components {
            let mut next = vec![false; n + 1];
            match comp {
                Component::AnyDepth => {
                    let mut any = false;
                    for j in 0..=n {
                        any |= reach[j];
                        next[j] = any;
                    }
                }
                Component::Pattern(tokens) => {
                    for j in 0..n {
                        if reach[j] && match_component(tokens, parts[j]) {
                            next[j + 1] = true;
                        }
                    }
                }
            }
            reach = next;
        }
        reach[n]
    }

    /// True if `path` or one of its ancestors matches: an included directory
    /// includes everything beneath it.
    pub fn matches_or_under(&self, path: &[u8]) -> bool {
        let parts = split(path);
        (1..=parts.len()).any(|k| self.matches(&crate::fs::join(&parts[..k])))
    }

    /// False only if nothing at or beneath directory `dir` can match (a
    /// walk may skip it).
    pub fn may_match_under(&self, dir: &[u8]) -> bool {
        let parts = split(dir);
        for (i, part) in parts.iter().enumerate() {
            match self.components.get(i) {
                None => return true, // dir is beneath a full match
                Some(Component::AnyDepth) => return true,
                Some(Component::Pattern(tokens)) => {
                    if !match_component(tokens, part) {
                        return false;
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Glob::new(pattern.as_bytes())
            .unwrap()
            .matches(path.as_bytes())
    }

    #[test]
    fn star_and_question_stay_within_a_component() {
        assert!(m("/etc/*.conf", "/etc/a.conf"));
        assert!(!m("/etc/*.conf", "/etc/x/a.conf"));
        assert!(m("etc/?.conf", "/etc/a.conf"));
        assert!(m("/etc/?.conf", "/etc/é.conf"));
        assert!(!m("/etc/?.conf", "/etc/ab.conf"));
        assert!(m("*", "anything"));
        assert!(!m("*", "a/b"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
    }

    #[test]
    fn double_star_spans_directories() {
        assert!(m("/home/**/*.txt", "/home/a.txt"));
        assert!(m("/home/**/*.txt", "/home/u/docs/deep/a.txt"));
        assert!(!m("/home/**/*.txt", "/var/a.txt"));
        assert!(m("**", "/x/y/z"));
        assert!(m("/var/**", "/var/log/syslog"));
        assert!(m("**/core", "/core"));
        assert!(m("/a/**/**/b", "/a/b"));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(m("/log[0-9]", "/log7"));
        assert!(!m("/log[!0-9]", "/log7"));
        assert!(m("/log[^0-9]", "/logx"));
        assert!(m("/a[]]b", "/a]b"));
        assert!(m("/a\\*b", "/a*b"));
        assert!(!m("/a\\*b", "/aXb"));
        assert_eq!(
            Glob::new(b"/a[bc").unwrap_err(),
            GlobError::UnclosedClass("/a[bc".into())
        );
        assert!(Glob::new(b"/a\\").is_err());
        assert!(Glob::new(b"/a//b").is_err());
    }

    #[test]
    fn directories_include_their_contents_and_prune() {
        let g = Glob::new(b"/etc/ssh").unwrap();
        assert!(g.matches_or_under(b"/etc/ssh/sshd_config"));
        assert!(!g.matches_or_under(b"/etc/sshd"));
        assert!(g.may_match_under(b"/etc"));
        assert!(!g.may_match_under(b"/usr"));
        assert!(Glob::new(b"/**/x").unwrap().may_match_under(b"/usr/lib"));
    }

    #[test]
    fn many_stars_stay_fast() {
        let g = Glob::new("*a*a*a*a*a*a*a*a*b".as_bytes()).unwrap();
        let long = "a".repeat(10_000);
        assert!(!g.matches(long.as_bytes()));
    }
}
