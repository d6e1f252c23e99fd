//! An answer's frames in one write.
//!
//! On this kind of host a write to a loopback socket costs the writer 11–15 µs of CPU, most of it
//! waking the process on the other end (`docs/BENCHMARKS.md` §24), so the writes an answer takes
//! are much of what serving it costs. `h2` writes a DATA frame of over 256 bytes in place,
//! vectored, and must flush it before it can queue anything behind it: an answer of a few hundred
//! bytes went out in two writes, HEADERS and DATA, then its trailers.
//!
//! [`GatheredWrites`] tells `h2` that the connection does not write vectored, so `h2` copies frames
//! of up to 1 KiB into its own buffer and queues the trailers behind them; and it gathers what is
//! written between two flushes (up to [`GATHER_MAX`]) into one write, so a larger frame, which
//! `h2` then hands over as its header and its payload, still goes out once. Between flushes it
//! holds a buffer only while bytes wait in it, so an idle connection holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes gathered for one write; a write this large or larger goes straight through.
pub const GATHER_MAX: usize = 16 * 1024;

/// A server connection whose writes between two flushes go out in one system call (module docs).
#[derive(Debug)]
pub struct GatheredWrites<T> {
    inner: T,
    /// Bytes taken and not yet written: `waiting[written..]`.
    waiting: Vec<u8>,
    written: usize,
}

impl<T> GatheredWrites<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, waiting: Vec::new(), written: 0 }
    }
}

impl<T: AsyncWrite + Unpin> GatheredWrites<T> {
    /// Writes every waiting byte (`Pending` while the socket takes no more), then lets the buffer go.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.waiting.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.waiting[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.waiting = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GatheredWrites<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GatheredWrites<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.waiting.len() + data.len() > GATHER_MAX {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= GATHER_MAX {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.waiting.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn is_write_vectored(&self) -> bool {
        // So that `h2` copies small frames and queues what follows them (module docs).
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for GatheredWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Counting {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_between_flushes_go_out_once() {
        let mut io = GatheredWrites::new(Counting::default());
        io.write_all(b"headers").await.unwrap();
        io.write_all(b"data").await.unwrap();
        io.write_all(b"trailers").await.unwrap();
        assert!(io.inner.writes.is_empty(), "nothing is written before the flush");
        io.flush().await.unwrap();
        io.write_all(b"next").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.inner.writes, [b"headersdatatrailers".to_vec(), b"next".to_vec()]);
        assert_eq!(io.waiting.capacity(), 0, "a drained connection holds no buffer");
    }

    #[tokio::test]
    async fn a_write_past_the_limit_sends_what_waits_first_and_large_ones_go_straight_through() {
        let mut io = GatheredWrites::new(Counting::default());
        let large = vec![7u8; GATHER_MAX];
        io.write_all(b"head").await.unwrap();
        io.write_all(&large).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, [b"head".to_vec(), large, b"tail".to_vec()]);
    }

    /// Over a real socket whose peer reads slowly: partial writes are resumed, nothing is lost
    /// or reordered.
    #[tokio::test]
    async fn partial_writes_resume_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut peer, _) = listener.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut io = GatheredWrites::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let mut sent = Vec::new();
        for i in 0..4000u32 {
            let chunk = format!("{i:08} ").repeat(1 + (i as usize % 7)).into_bytes();
            io.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            if i % 13 == 0 {
                io.flush().await.unwrap();
            }
        }
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), sent);
    }
}
