//! The guest's console on the user's terminal, without letting the terminal hold up the
//! run or the process: the exit handler hands bytes to a writer thread through a bounded
//! queue and never waits; the writer writes to stderr's file without std's stderr lock and
//! without blocking (a non-blocking descriptor of its own, or `poll` with a timeout), so a
//! terminal or pipe that does not keep up (a stopped pager, a full pipe) costs bytes —
//! dropped and counted — never time. At the end of a run the writer gets a bounded time to
//! finish ([`Console::finish`]); what it could not write is counted too, and the VMM's last
//! words are written the same bounded way ([`say`]).

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes queued for the terminal at most.
pub const QUEUE_BYTES: usize = 64 * 1024;

/// How long the end of a run waits for queued console bytes to reach the terminal.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// How long the end of a run waits for a terminal that accepts nothing at all (counted
/// from when it stopped accepting, which may be long before the end).
const STALL_WAIT: Duration = Duration::from_millis(250);

/// How long [`say`] waits for stderr to take a message (once one was lost, no more).
pub const SAY_WAIT: Duration = Duration::from_millis(250);

/// A message [`say`] could not write: stderr is not being read.
static STALLED: AtomicBool = AtomicBool::new(false);

/// Bytes written at once: a pipe with room for one (POLLOUT) takes this much without
/// blocking (at most PIPE_BUF).
const CHUNK: usize = 512;

/// Where the writer's bytes go: anything `Write`, or stderr's file, written without
/// blocking.
pub trait Sink: Send {
    /// Writes some of `bytes`, waiting at most until `deadline`: `Ok(0)` when nothing could
    /// be written in time.
    fn write_until(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<usize>;
}

/// A plain writer (tests): its writes may block.
pub struct Blocking<W>(pub W);

impl<W: Write + Send> Sink for Blocking<W> {
    fn write_until(&mut self, bytes: &[u8], _deadline: Instant) -> std::io::Result<usize> {
        self.0.write(bytes)
    }
}

/// Stderr's file, written with write(2) (std's stderr lock is never taken), never blocking.
pub struct Stderr {
    /// A non-blocking description of stderr's pipe or terminal of our own (O_NONBLOCK on
    /// fd 2 itself would change it for every process sharing it); `None`: fd 2 itself.
    reopened: Option<std::fs::File>,
    /// fd 2 is a socket: written with `send(MSG_DONTWAIT)`.
    socket: bool,
}

impl Stderr {
    pub fn new() -> Self {
        // SAFETY: fstat on fd 2 into a zeroed stat buffer.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a live, writable buffer of the size fstat writes.
        let kind = if unsafe { libc::fstat(2, &mut stat) } == 0 {
            stat.st_mode & libc::S_IFMT
        } else {
            0
        };
        let reopen = kind == libc::S_IFIFO || kind == libc::S_IFCHR;
        let reopened = reopen
            .then(|| {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                    .open("/proc/self/fd/2")
                    .ok()
            })
            .flatten();
        Self {
            reopened,
            socket: kind == libc::S_IFSOCK,
        }
    }

    fn fd(&self) -> RawFd {
        self.reopened.as_ref().map_or(2, AsRawFd::as_raw_fd)
    }

    /// One attempt, never blocking where the descriptor allows: WouldBlock when full.
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        let bytes = &bytes[..bytes.len().min(CHUNK)];
        // SAFETY: writes from a live slice of `bytes.len()` bytes.
        let written = unsafe {
            if self.socket {
                libc::send(
                    self.fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(self.fd(), bytes.as_ptr().cast(), bytes.len())
            }
        };
        if written < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(written as usize)
        }
    }
}

impl Default for Stderr {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for Stderr {
    fn write_until(&mut self, bytes: &[u8], deadline: Instant) -> std::io::Result<usize> {
        loop {
            // Where fd 2 could not be made non-blocking (a file, a device), poll first: it
            // says when a write will not block.
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let wait = if self.reopened.is_some() || self.socket {
                0
            } else {
                left.as_millis().min(50) as libc::c_int
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, wait) };
            if ready > 0 && poll.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            if ready > 0 || self.reopened.is_some() || self.socket {
                match self.try_write(bytes) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Err(e),
                    Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return Ok(0);
            }
            if self.reopened.is_some() || self.socket {
                // Full: wait for room, briefly, on the descriptor itself.
                let mut poll = libc::pollfd {
                    fd: self.fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let wait = left.as_millis().clamp(1, 50) as libc::c_int;
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut poll, 1, wait) };
            }
        }
    }
}

/// Writes `text` to stderr within [`SAY_WAIT`], never blocking past it (a stalled reader
/// loses the message instead of holding the process). Returns whether all of it went.
pub fn say(text: &str) -> bool {
    let wait = if STALLED.load(Ordering::Relaxed) {
        Duration::ZERO
    } else {
        SAY_WAIT
    };
    let said = write_within(&mut Stderr::new(), text.as_bytes(), Instant::now() + wait);
    if !said {
        STALLED.store(true, Ordering::Relaxed);
    }
    said
}

/// Writes all of `bytes` to `sink` before `deadline`, or gives up.
fn write_within(sink: &mut dyn Sink, mut bytes: &[u8], deadline: Instant) -> bool {
    while !bytes.is_empty() {
        match sink.write_until(bytes, deadline) {
            Ok(0) | Err(_) => return false,
            Ok(n) => bytes = &bytes[n..],
        }
    }
    true
}

/// A `Write` for the exit handler that cannot block.
pub struct Console {
    queue: Option<SyncSender<u8>>,
    shared: Arc<Shared>,
    /// Told when the writer has ended.
    ended: Option<Receiver<()>>,
}

struct Shared {
    dropped: AtomicU64,
    /// The writer must stop now, counting what it still holds as dropped.
    stop: AtomicBool,
    /// Since when the terminal has taken nothing (ms since `start`, plus one); 0: it is
    /// taking what it is given.
    blocked_ms: AtomicU64,
    start: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// The writer could write nothing: blocked, since now unless it already was.
    fn blocked(&self) {
        let _ = self
            .blocked_ms
            .compare_exchange(0, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    fn unblocked(&self) {
        self.blocked_ms.store(0, Ordering::Relaxed);
    }

    /// How long the terminal has taken nothing.
    fn stalled_for(&self) -> Duration {
        match self.blocked_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now_ms().saturating_sub(since)),
        }
    }
}

impl Console {
    /// A console whose bytes go to stderr, written without blocking.
    pub fn stderr() -> Self {
        Self::spawn(Stderr::new())
    }

    /// A console whose bytes go to `out` on a thread of their own.
    pub fn spawn(mut out: impl Sink + 'static) -> Self {
        let (queue, bytes) = sync_channel::<u8>(QUEUE_BYTES);
        let (done, ended) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            blocked_ms: AtomicU64::new(0),
            start: Instant::now(),
        });
        let writer = Arc::clone(&shared);
        let spawned = std::thread::Builder::new().name("vmm-console".into()).spawn(move || {
            let mut buffer = Vec::with_capacity(CHUNK);
            let mut closed = false;
            while let Ok(byte) = bytes.recv() {
                buffer.push(byte);
                buffer.extend(bytes.try_iter().take(CHUNK - 1));
                let mut rest = &buffer[..];
                while !rest.is_empty() && !closed && !writer.stop.load(Ordering::Relaxed) {
                    match out.write_until(rest, Instant::now() + Duration::from_millis(50)) {
                        Ok(0) => writer.blocked(),
                        Ok(n) => {
                            rest = &rest[n..];
                            writer.unblocked();
                        }
                        // The console is a convenience: a closed stderr ends the copying,
                        // not the run (what comes after is counted as dropped).
                        Err(_) => closed = true,
                    }
                }
                writer.dropped.fetch_add(rest.len() as u64, Ordering::Relaxed);
                buffer.clear();
                if closed || writer.stop.load(Ordering::Relaxed) {
                    // Whatever is still queued will not be written: counted, then gone.
                    let left = bytes.try_iter().count() as u64;
                    writer.dropped.fetch_add(left, Ordering::Relaxed);
                    if writer.stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
            let _ = done.send(());
        });
        let started = spawned.is_ok();
        Self {
            queue: started.then_some(queue),
            shared,
            ended: started.then_some(ended),
        }
    }

    /// Bytes dropped so far: beyond the queue, or not taken by the terminal.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Ends the console: the writer gets [`DRAIN_WAIT`] to write what is queued (less when
    /// the terminal takes nothing for [`STALL_WAIT`]), then stops; returns every byte
    /// dropped, those it could not write included.
    pub fn finish(mut self) -> u64 {
        self.end();
        self.dropped()
    }

    fn end(&mut self) {
        self.queue = None;
        let Some(ended) = self.ended.take() else { return };
        let start = Instant::now();
        while start.elapsed() < DRAIN_WAIT && self.shared.stalled_for() < STALL_WAIT {
            match ended.recv_timeout(Duration::from_millis(10)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        // The writer notices within one write attempt (50 ms).
        let _ = ended.recv_timeout(Duration::from_millis(200));
    }
}

impl Drop for Console {
    /// Lets the writer finish what is queued, for a bounded time: a terminal that does not
    /// read does not hold the process.
    fn drop(&mut self) {
        self.end();
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
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
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
        let mut console = Console::spawn(Blocking(Stuck(wait)));
        let started = Instant::now();
        let flood = vec![b'x'; QUEUE_BYTES * 3];
        console.write_all(&flood).unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        // The queue holds QUEUE_BYTES; a chunk sits in the stuck write; the rest is dropped.
        assert!(
            console.dropped() >= (QUEUE_BYTES * 2 - CHUNK) as u64,
            "{}",
            console.dropped()
        );
    }

    /// A pipe nobody reads, as stderr's sink: the console's end and a last message take a
    /// bounded time, and every byte not written is counted.
    #[test]
    fn a_full_pipe_costs_bytes_not_time() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors, owned below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh descriptors from pipe2, each owned once.
        let (read_end, write_end) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        let sink = || {
            use std::os::unix::fs::OpenOptionsExt;
            Stderr {
                reopened: Some(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(format!("/proc/self/fd/{}", write_end.as_raw_fd()))
                        .unwrap(),
                ),
                socket: false,
            }
        };
        let mut console = Console::spawn(sink());
        let flood = vec![b'x'; 1 << 20];
        let started = Instant::now();
        console.write_all(&flood).unwrap();
        let dropped = console.finish();
        // Nothing reads the pipe: a write that blocked would never return. The bounds are
        // the waits' own plus seconds of slack, for a CI host busy with VM tests beside it
        // (with 1 s and 200 ms of slack the test failed once on a CI host, which assertion
        // not kept).
        assert!(
            started.elapsed() < DRAIN_WAIT + STALL_WAIT + Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let mut buffered = 0;
        // SAFETY: FIONREAD into an int.
        unsafe { libc::ioctl(read_end.as_raw_fd(), libc::FIONREAD, &mut buffered) };
        assert_eq!(
            dropped + buffered as u64,
            flood.len() as u64,
            "every byte written or counted"
        );
        assert!(buffered > 0 && dropped > 0);
        let said = Instant::now();
        assert!(!write_within(&mut sink(), b"last words", said + SAY_WAIT));
        assert!(
            said.elapsed() < SAY_WAIT + Duration::from_secs(5),
            "{:?}",
            said.elapsed()
        );
    }
}
