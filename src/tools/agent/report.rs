//! The text an agent reports of a command's output. It must be storable (PostgreSQL's text
//! cannot hold NUL) and fit the orchestrator's field cap, prefix and cut marker included: a
//! report over the cap is dead-lettered and its work package stays `dispatched` for ever.

use std::collections::VecDeque;

/// What was read of one output stream: all of it while it fits in `keep` bytes twice,
/// otherwise its first and last `keep` bytes and the count of those between, so a command
/// that writes gigabytes costs the agent no more memory than one that writes a page.
pub(crate) struct Captured {
    keep: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: u64,
}

impl Captured {
    pub(crate) fn new(keep: usize) -> Captured {
        Captured { keep, head: Vec::new(), tail: VecDeque::new(), dropped: 0 }
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        let room = self.keep - self.head.len();
        let (to_head, rest) = bytes.split_at(room.min(bytes.len()));
        self.head.extend_from_slice(to_head);
        bytes = rest;
        self.tail.extend(bytes);
        let over = self.tail.len().saturating_sub(self.keep);
        self.tail.drain(..over);
        self.dropped += over as u64;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_empty()
    }
}

/// U+FFFD for what is not UTF-8, and for NUL, which PostgreSQL refuses in text.
fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}

fn marker(cut: u64) -> String {
    format!("[... {cut} bytes cut ...]")
}

/// `prefix` then `output`, in at most `cap` bytes: when it is longer, its beginning and its
/// end with a marker saying how many bytes were cut between them. Trailing whitespace goes,
/// so `echo ok` reports `ok`.
pub(crate) fn fit(prefix: &str, output: &Captured, cap: usize) -> String {
    let start = clean(prefix.as_bytes());
    let (first, last, total) = if output.dropped == 0 {
        let bytes: Vec<u8> = output.head.iter().chain(&output.tail).copied().collect();
        let whole = start + clean(&bytes).trim_end();
        let n = whole.len() as u64;
        if whole.len() <= cap {
            return whole;
        }
        (whole.clone(), whole, n)
    } else {
        let first = start + &clean(&output.head);
        let last = clean(&output.tail.iter().copied().collect::<Vec<u8>>()).trim_end().to_string();
        let n = first.len() as u64 + output.dropped + last.len() as u64;
        (first, last, n)
    };
    // Sized for the longest count the marker can carry, so the text never exceeds `cap`.
    let Some(budget) = cap.checked_sub(marker(total).len()) else {
        return first[..first.floor_char_boundary(cap)].to_string();
    };
    let head = &first[..first.floor_char_boundary((budget / 2).min(first.len()))];
    let tail = &last[last.ceil_char_boundary(last.len().saturating_sub(budget - head.len()))..];
    format!("{head}{}{tail}", marker(total - head.len() as u64 - tail.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(keep: usize, bytes: &[u8]) -> Captured {
        let mut c = Captured::new(keep);
        for chunk in bytes.chunks(7) {
            c.push(chunk);
        }
        c
    }

    #[test]
    fn short_output_is_kept_whole_and_trimmed() {
        assert_eq!(fit("exit status: 1: ", &captured(100, b"boom\n"), 100), "exit status: 1: boom");
        assert_eq!(fit("", &captured(100, b"a\0b"), 100), "a\u{FFFD}b");
    }

    #[test]
    fn long_output_keeps_both_ends_within_the_cap() {
        for (keep, len, cap) in [(64, 1000, 64), (200, 150, 100), (100, 100_000, 100), (40, 39, 40)] {
            let bytes: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let text = fit("pre: ", &captured(keep, &bytes), cap);
            assert!(text.len() <= cap, "{keep} {len} {cap}: {} bytes", text.len());
            assert!(text.starts_with("pre: abc"), "{text}");
            let last = (len - 1) % 26;
            assert!(text.ends_with((b'a' + last as u8) as char), "{text}");
            let cut: u64 = text.split("[... ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
            assert_eq!(text.len() as u64 - marker(cut).len() as u64 + cut, 5 + len as u64, "{text}");
        }
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let text = fit("", &captured(1000, "é".repeat(400).as_bytes()), 101);
        assert!(text.len() <= 101 && !text.contains('\u{FFFD}'), "{text}");
    }

    #[test]
    fn a_cap_below_the_marker_keeps_the_beginning() {
        assert_eq!(fit("timed out", &captured(10, b"x"), 5), "timed");
    }
}
