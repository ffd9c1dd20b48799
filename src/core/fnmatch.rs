//! CPython's `fnmatch.fnmatchcase`, ported. `translate` follows CPython 3.11's algorithm step
//! by step (star collapsing, `[...]` classes with `!` negation, reversed ranges dropped, an
//! unclosed `[` taken literally) but renders the result for the `regex` crate, whose classes
//! differ from Python's `re`: `[`, `&&`, `--` and `~~` mean nested classes and set operations
//! there, so every character inside a class is escaped.

use regex::Regex;

#[derive(Debug, thiserror::Error)]
#[error("pattern {pattern:?} cannot be compiled: {source}")]
pub struct FnmatchError {
    pattern: String,
    source: regex::Error,
}

/// A compiled glob.
#[derive(Debug, Clone)]
pub struct Pattern {
    glob: String,
    regex: Regex,
}

impl Pattern {
    pub fn new(pattern: &str) -> Result<Pattern, FnmatchError> {
        let regex = Regex::new(&translate(pattern)).map_err(|source| FnmatchError { pattern: pattern.to_string(), source })?;
        Ok(Pattern { glob: pattern.to_string(), regex })
    }
    pub fn as_str(&self) -> &str {
        &self.glob
    }
    /// Whole-subject, case-sensitive match, as `fnmatchcase`.
    pub(crate) fn is_match(&self, subject: &str) -> bool {
        self.regex.is_match(subject)
    }
}

pub fn fnmatchcase(subject: &str, pattern: &str) -> Result<bool, FnmatchError> {
    Ok(Pattern::new(pattern)?.is_match(subject))
}

fn escape_char(c: char) -> String {
    regex::escape(c.encode_utf8(&mut [0; 4]))
}

/// A class body item: a literal character, or a hyphen joining two chunks into a range.
#[derive(PartialEq)]
enum Item {
    Lit(char),
    Range,
}

/// Renders one class body. `chunks` are the pieces between range hyphens, as CPython keeps
/// them; the hyphens joining them are ranges, every other character is literal.
fn render_class(chunks: &[Vec<char>]) -> String {
    let mut items = Vec::new();
    for (n, chunk) in chunks.iter().enumerate() {
        if n > 0 {
            items.push(Item::Range);
        }
        items.extend(chunk.iter().map(|&c| Item::Lit(c)));
    }
    match items.as_slice() {
        // An empty class never matches.
        [] => return r"[^\x00-\x{10FFFF}]".to_string(),
        // A negated empty class matches any one character.
        [Item::Lit('!')] => return "(?s:.)".to_string(),
        _ => {}
    }
    let negate = items.first() == Some(&Item::Lit('!'));
    let mut out = String::from(if negate { "[^" } else { "[" });
    for item in &items[usize::from(negate)..] {
        match item {
            Item::Lit(c) => out.push_str(&escape_char(*c)),
            Item::Range => out.push('-'),
        }
    }
    out.push(']');
    out
}

/// The regex source equivalent to CPython's `fnmatch.translate(pattern)`, anchored at both
/// ends as `re.match(...)` with `\Z` is.
pub(crate) fn translate(pattern: &str) -> String {
    let pat: Vec<char> = pattern.chars().collect();
    let n = pat.len();
    let mut res = String::from("^(?s:");
    let mut last_was_star = false;
    let mut i = 0;
    while i < n {
        let c = pat[i];
        i += 1;
        if c == '*' {
            if !last_was_star {
                res.push_str(".*");
            }
            last_was_star = true;
            continue;
        }
        last_was_star = false;
        match c {
            '?' => res.push('.'),
            '[' => {
                let mut j = i;
                if j < n && pat[j] == '!' {
                    j += 1;
                }
                if j < n && pat[j] == ']' {
                    j += 1;
                }
                while j < n && pat[j] != ']' {
                    j += 1;
                }
                if j >= n {
                    res.push_str(r"\[");
                    continue;
                }
                let chunks: Vec<Vec<char>> = if !pat[i..j].contains(&'-') {
                    vec![pat[i..j].to_vec()]
                } else {
                    let mut chunks: Vec<Vec<char>> = Vec::new();
                    let mut start = i;
                    let mut k = if pat[i] == '!' { i + 2 } else { i + 1 };
                    loop {
                        match (k..j).find(|&x| pat[x] == '-') {
                            None => break,
                            Some(found) => {
                                chunks.push(pat[start..found].to_vec());
                                start = found + 1;
                                k = found + 3;
                            }
                        }
                    }
                    let tail = pat[start..j].to_vec();
                    if tail.is_empty() {
                        if let Some(last) = chunks.last_mut() {
                            last.push('-');
                        }
                    } else {
                        chunks.push(tail);
                    }
                    // Drop reversed ranges, which are invalid in a regex.
                    let mut k = chunks.len().saturating_sub(1);
                    while k > 0 {
                        let (prev_last, next_first) = (chunks[k - 1].last().copied(), chunks[k].first().copied());
                        if let (Some(a), Some(b)) = (prev_last, next_first)
                            && a > b
                        {
                            let next = chunks.remove(k);
                            let prev = &mut chunks[k - 1];
                            prev.pop();
                            prev.extend_from_slice(&next[1..]);
                        }
                        k -= 1;
                    }
                    chunks
                };
                i = j + 1;
                res.push_str(&render_class(&chunks));
            }
            other => res.push_str(&escape_char(other)),
        }
    }
    res.push_str(r")\z");
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str, p: &str) -> bool {
        fnmatchcase(s, p).unwrap()
    }

    #[test]
    fn basics() {
        assert!(m("github.pull_request.opened", "github.pull_request.*"));
        assert!(!m("github.push", "github.pull_request.*"));
        assert!(m("a\nb", "a?b"), "? matches a newline, as with re.DOTALL");
        assert!(m("abc", "a**c"));
        assert!(!m("ABC", "abc"), "case-sensitive");
    }

    #[test]
    fn classes() {
        assert!(m("b", "[a-c]"));
        assert!(!m("b", "[!a-c]"));
        assert!(m("]", "[]]"));
        assert!(m("-", "[a-]"));
        assert!(m("[", "["), "an unclosed [ is literal");
        assert!(!m("a", "[z-a]"), "a reversed range is empty");
        assert!(m("x", "[!z-a]"), "a negated empty class matches anything");
        assert!(m("&", "[&&]"), "no set operations");
        assert!(m("~", "[a~~]"));
        assert!(m("[", "[[]"));
        assert!(m("\\", "[\\]"));
    }

    /// The fuzz target's property on stable: any glob made of the characters that matter
    /// translates to a regex that compiles.
    #[test]
    fn every_glob_compiles() {
        use rand::Rng;
        let alphabet: Vec<char> = "[]!^-\\*?&~|a-z.é(){}$".chars().collect();
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let len = rng.random_range(0..12);
            let glob: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let p = Pattern::new(&glob).unwrap_or_else(|e| panic!("{glob:?}: {e}"));
            let _ = p.is_match("a-b]c");
        }
    }
}
