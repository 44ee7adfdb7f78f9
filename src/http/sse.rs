//! Server-sent-event framing for relayed streams.
//!
//! Chunks are forwarded as they arrive, cut at the last complete event: if the upstream breaks
//! off mid-event, the client has only whole events and then gemgate's error event, never half
//! a JSON object.

use bytes::{Bytes, BytesMut};

#[derive(Debug, Default)]
pub struct EventFramer {
    pending: BytesMut,
}

impl EventFramer {
    /// Takes the next upstream chunk; returns the bytes that end on an event boundary (often the
    /// whole chunk, without copying) and keeps the rest.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.pending.is_empty() {
            let end = complete_len(&chunk);
            if end == chunk.len() {
                return chunk;
            }
            let mut chunk = chunk;
            let ready = chunk.split_to(end);
            self.pending.extend_from_slice(&chunk);
            return ready;
        }
        self.pending.extend_from_slice(&chunk);
        let end = complete_len(&self.pending);
        self.pending.split_to(end).freeze()
    }

    /// What is left when the upstream ends cleanly (an event without its closing blank line).
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.pending).freeze()
    }
}

/// Length of the longest prefix of `buf` that ends with a blank line (`\n\n` or `\r\n\r\n`).
fn complete_len(buf: &[u8]) -> usize {
    let mut end = buf.len();
    while let Some(p) = memchr::memrchr(b'\n', &buf[..end]) {
        let before = &buf[..p];
        if before.ends_with(b"\n") || before.ends_with(b"\n\r") {
            return p + 1;
        }
        end = p;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_events_pass_untouched() {
        let mut f = EventFramer::default();
        let chunk = Bytes::from_static(b"data: {\"a\":1}\r\n\r\ndata: {\"b\":2}\n\n");
        assert_eq!(f.push(chunk.clone()), chunk);
        assert!(f.finish().is_empty());
    }

    #[test]
    fn partial_events_wait_for_their_end() {
        let mut f = EventFramer::default();
        assert_eq!(
            &f.push(Bytes::from_static(b"data: 1\n\ndata: {\"x\"")),
            &b"data: 1\n\n"[..]
        );
        assert_eq!(&f.push(Bytes::from_static(b":2}\r\n")), &b""[..]);
        assert_eq!(
            &f.push(Bytes::from_static(b"\r\ndata: 3")),
            &b"data: {\"x\":2}\r\n\r\n"[..]
        );
        assert_eq!(&f.finish(), &b"data: 3"[..]);
    }
}
