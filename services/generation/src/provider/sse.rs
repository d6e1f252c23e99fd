//! A small Server-Sent Events parser: bytes in, the `data:` payload of each complete event out.
//!
//! Why not a crate: `eventsource-stream` 0.2 (considered 2026-12-06) bounds
//! nothing per event (an upstream's endless event would grow until the whole stream's byte limit)
//! and nothing shows it linear when one long event arrives a byte at a time, the case this parser
//! was rewritten for. This one is both, and its tests prove it (`examined`). Swap it for a crate
//! that promises both.
//!
//! Linear: each byte pushed is examined a bounded number of times, however the stream is cut into
//! pieces. The search for the end of an event resumes where the last one stopped instead of
//! rescanning the buffer, and consumed events leave the buffer once per push, not once per event.
//! (It used to rescan its whole buffer on every push: an upstream sending one large event a byte at
//! a time cost quadratic time.)
//!
//! Bounded: an event may not grow past [`MAX_EVENT_BYTES`] without its end; the total size of a
//! stream is the provider's limit to enforce.

/// Refuse to buffer more than this without an event boundary: a broken upstream must not grow
/// memory without bound.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes received and not yet consumed, `\r` removed.
    buffer: Vec<u8>,
    /// `buffer[..scanned]` holds no event boundary (`\n\n`) except possibly one that starts at its
    /// last byte: the next search starts there.
    scanned: usize,
    /// Bytes examined so far, counted to prove the parser linear in tests.
    examined: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SseError {
    #[error("an event exceeds {MAX_EVENT_BYTES} bytes")]
    TooLarge,
    #[error("an event is not UTF-8")]
    NotUtf8,
}

impl SseParser {
    /// Feeds `bytes` and returns the data of every event they complete (multi-line data joined
    /// with `\n`). Events without data (comments, keep-alives) are skipped.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        count(&mut self.examined, bytes.len());
        self.buffer.extend(bytes.iter().filter(|b| **b != b'\r'));
        let mut events = Vec::new();
        // Where the unconsumed part of the buffer starts.
        let mut start = 0;
        loop {
            // A boundary may straddle the previous search's end: look again from its last byte.
            let from = self.scanned.saturating_sub(1).max(start);
            let window = &self.buffer[from..];
            let found = window.windows(2).position(|w| w == b"\n\n");
            count(&mut self.examined, found.map_or(window.len(), |at| at + 2));
            let Some(at) = found else {
                self.scanned = self.buffer.len();
                break;
            };
            let end = from + at + 2;
            let block = &self.buffer[start..end];
            count(&mut self.examined, block.len());
            let block = std::str::from_utf8(block).map_err(|_| SseError::NotUtf8)?;
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
            start = end;
            self.scanned = end;
        }
        // Once per push: what is left moves to the front, each byte of it at most once more.
        if start > 0 {
            count(&mut self.examined, self.buffer.len() - start);
            self.buffer.drain(..start);
            self.scanned -= start;
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(events)
    }
}

fn count(examined: &mut u64, bytes: usize) {
    *examined = examined.saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_arbitrary_chunks() {
        let mut parser = SseParser::default();
        assert_eq!(parser.push(b"data: {\"a\":1}\n").unwrap(), Vec::<String>::new());
        assert_eq!(parser.push(b"\ndata: [DO").unwrap(), vec!["{\"a\":1}"]);
        assert_eq!(parser.push(b"NE]\r\n\r\n: keep-alive\n\n").unwrap(), vec!["[DONE]"]);
    }

    #[test]
    fn joins_multi_line_data() {
        let mut parser = SseParser::default();
        assert_eq!(parser.push(b"event: x\ndata: a\ndata:b\n\n").unwrap(), vec!["a\nb"]);
    }

    #[test]
    fn many_events_in_one_push_and_every_cut() {
        let stream = b"data: one\n\n: comment\n\ndata: two\r\n\r\ndata: three\n\n";
        let mut whole = SseParser::default();
        assert_eq!(whole.push(stream).unwrap(), vec!["one", "two", "three"]);
        for cut in 0..stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.push(&stream[..cut]).unwrap();
            events.extend(parser.push(&stream[cut..]).unwrap());
            assert_eq!(events, vec!["one", "two", "three"], "cut at {cut}");
        }
    }

    #[test]
    fn bounded() {
        let mut parser = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(parser.push(&big), Err(SseError::TooLarge));
    }

    /// A large event fed in small pieces, then many small events in one piece: the bytes examined
    /// stay within a constant factor of the bytes pushed (the old parser examined about
    /// size² / (2 × piece) bytes for the first: some 16 billion here).
    #[test]
    fn linear_in_the_bytes_pushed() {
        let mut parser = SseParser::default();
        let payload = "y".repeat(MAX_EVENT_BYTES - 64);
        let event = format!("data: {payload}\n\n");
        let mut events = Vec::new();
        for piece in event.as_bytes().chunks(32) {
            events.extend(parser.push(piece).unwrap());
        }
        assert_eq!(events, vec![payload]);
        let pushed = event.len() as u64;
        assert!(parser.examined <= 4 * pushed, "{} bytes examined for {pushed} pushed", parser.examined);

        let mut parser = SseParser::default();
        let many = "data: z\n\n".repeat(100_000);
        assert_eq!(parser.push(many.as_bytes()).unwrap().len(), 100_000);
        let pushed = many.len() as u64;
        assert!(parser.examined <= 4 * pushed, "{} bytes examined for {pushed} pushed", parser.examined);
    }
}
