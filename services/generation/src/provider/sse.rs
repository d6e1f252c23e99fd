//! A small Server-Sent Events parser: bytes in, the `data:` payload of each complete event out.

/// Refuse to buffer more than this without an event boundary: a broken upstream must not grow
/// memory without bound.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
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
        self.buffer.extend(bytes.iter().filter(|b| **b != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let block = std::str::from_utf8(&block).map_err(|_| SseError::NotUtf8)?;
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(events)
    }
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
    fn bounded() {
        let mut parser = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(parser.push(&big), Err(SseError::TooLarge));
    }
}
