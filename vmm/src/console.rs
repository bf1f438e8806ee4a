//! The guest's console on the user's terminal, without letting the terminal hold up the
//! run: the exit handler hands bytes to a writer thread through a bounded queue and never
//! waits; when stderr does not keep up (a stopped pager, a full pipe), bytes beyond the
//! queue are dropped and counted, and the run goes on within its deadline.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// Bytes queued for the terminal at most.
pub const QUEUE_BYTES: usize = 64 * 1024;

/// A `Write` for the exit handler that cannot block.
pub struct Console {
    queue: Option<SyncSender<u8>>,
    dropped: Arc<AtomicU64>,
    /// Told when the writer has written everything queued.
    drained: Option<std::sync::mpsc::Receiver<()>>,
}

/// How long the end of a run waits for queued console bytes to reach the terminal.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Console {
    /// A console whose bytes go to `out` on a thread of their own.
    pub fn spawn(mut out: impl Write + Send + 'static) -> Self {
        let (queue, bytes) = sync_channel::<u8>(QUEUE_BYTES);
        let (done, drained) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("vmm-console".into()).spawn(move || {
            for byte in bytes {
                // The console is a convenience: a closed stderr ends the copying, not the run.
                if out.write_all(&[byte]).is_err() {
                    break;
                }
            }
            let _ = out.flush();
            let _ = done.send(());
        });
        let started = spawned.is_ok();
        Self {
            queue: started.then_some(queue),
            dropped: Arc::new(AtomicU64::new(0)),
            drained: started.then_some(drained),
        }
    }

    /// Bytes that did not fit the queue.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Console {
    /// Lets the writer finish what is queued, for a bounded time: a terminal that does not
    /// read does not hold the process.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(drained) = self.drained.take() {
            let _ = drained.recv_timeout(DRAIN_WAIT);
        }
    }
}

impl Write for Console {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for &byte in bytes {
            let sent = self.queue.as_ref().map(|queue| queue.try_send(byte));
            if !matches!(sent, Some(Ok(()))) {
                if let Some(Err(TrySendError::Disconnected(_))) = sent {
                    self.queue = None;
                }
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that blocks until told to go on, like a stopped terminal.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_terminal_never_blocks_the_writer() {
        let (_release, wait) = std::sync::mpsc::channel();
        let mut console = Console::spawn(Stuck(wait));
        let started = std::time::Instant::now();
        let flood = vec![b'x'; QUEUE_BYTES * 3];
        console.write_all(&flood).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // The queue holds QUEUE_BYTES; one byte sits in the stuck write; the rest is dropped.
        assert!(
            console.dropped() >= (QUEUE_BYTES * 2 - 1) as u64,
            "{}",
            console.dropped()
        );
    }
}
