//! Output files (`--csv`, `--plot`, `-o`, `--junit`, `--markdown`, calibrations).
//!
//! An output is *claimed* before anything is measured ([`Output::create`]): its path is
//! resolved and checked (a directory, a missing or unwritable directory, a path another
//! output of this command already claimed are refused then, so a bad path costs no run),
//! but nothing is written. It is *committed* once the run is done ([`Output::commit`]):
//!
//! - a regular file, or a path where nothing is yet, is written atomically: into a
//!   temporary file beside it, created exclusively (`O_EXCL`) under a random name by the
//!   `tempfile` crate, given the destination's permissions (and owner, where allowed),
//!   synced, then renamed over it. A failed output leaves the previous file as it was;
//! - a symbolic link is followed: its target is written (atomically, as above), and the
//!   link stays a link;
//! - anything else — a character device, a FIFO — is written into, never replaced.
//!
//! A temporary file exists only while an output is committed (so a run interrupted while it
//! measures leaves none), and is removed on every way out: an error, a panic (its guard), a
//! signal — a process with no handler of its own gets one for the length of the commit
//! ([`remove_temporaries`] then the signal's default action), and `validate`'s handler
//! removes them before it exits on a second signal.

use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

/// An output claimed before the run: checked, not yet written.
#[derive(Debug)]
pub struct Output {
    path: PathBuf,
    claim: Identity,
}

/// What two outputs must not share: the file (device and inode) where one exists, else the
/// canonical path it will be created at.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    Inode(u64, u64),
    Path(PathBuf),
    /// A character device (`/dev/null`): outputs may share it.
    Shared,
}

/// Where an output's bytes go, as found when it is claimed and again when it is committed.
#[derive(Debug)]
enum Destination {
    /// A regular file, replaced atomically: its resolved path and what it is now.
    Replace { target: PathBuf, existing: Metadata },
    /// Nothing there yet: created atomically at the resolved path.
    Create { target: PathBuf },
    /// A character device or FIFO (or a link to one): written into.
    Stream { metadata: Metadata },
}

/// Outputs claimed and not yet committed or dropped, in this process.
static CLAIMS: Mutex<Vec<(Identity, PathBuf)>> = Mutex::new(Vec::new());

impl Output {
    /// Claims `path` for an output: refused when it is a directory, cannot be written, or
    /// is the same file as another output still claimed. Writes nothing.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let claim = match destination(path)? {
            Destination::Stream { metadata } => {
                writable(path)?;
                if std::os::unix::fs::FileTypeExt::is_char_device(&metadata.file_type()) {
                    Identity::Shared
                } else {
                    Identity::Inode(metadata.dev(), metadata.ino())
                }
            }
            Destination::Replace { target, existing } => {
                writable(directory_of(&target))?;
                Identity::Inode(existing.dev(), existing.ino())
            }
            Destination::Create { target } => {
                writable(directory_of(&target))?;
                Identity::Path(target)
            }
        };
        let mut claims = CLAIMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if claim != Identity::Shared {
            if let Some((_, other)) = claims.iter().find(|(c, _)| *c == claim) {
                return Err(std::io::Error::other(format!(
                    "it is the same file as another output of this command ({}): give each output its own path",
                    other.display()
                )));
            }
        }
        claims.push((claim.clone(), path.to_owned()));
        Ok(Self {
            path: path.to_owned(),
            claim,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` to the destination: atomically in place of a regular file (the
    /// previous one stays whole if anything fails), straight into a device or FIFO.
    pub fn commit(self, bytes: &[u8]) -> std::io::Result<()> {
        match destination(&self.path)? {
            Destination::Stream { .. } => {
                // No O_CREAT: should the node vanish meanwhile, nothing is created instead.
                let mut file = OpenOptions::new().write(true).open(&self.path)?;
                file.write_all(bytes)?;
                file.flush()
            }
            Destination::Replace { target, existing } => replace(&target, Some(&existing), bytes),
            Destination::Create { target } => replace(&target, None, bytes),
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        let mut claims = CLAIMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(index) = claims
            .iter()
            .position(|(claim, path)| *claim == self.claim && *path == self.path)
        {
            claims.swap_remove(index);
        }
    }
}

/// Writes `bytes` to `path` atomically (or into it, where it is a device or FIFO).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    Output::create(path)?.commit(bytes)
}

/// The most symbolic links followed to find where an output goes (as the kernel's ELOOP).
const MAX_LINKS: usize = 40;

/// Where `path`'s bytes go: symbolic links followed, even dangling ones (their target is
/// created), so that a link is never replaced by a file.
fn destination(path: &Path) -> std::io::Result<Destination> {
    if path.as_os_str().is_empty() {
        return Err(std::io::Error::other("it names no file"));
    }
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Err(std::io::Error::other("it is a directory")),
        Ok(metadata) if metadata.is_file() => Ok(Destination::Replace {
            // The file itself, every link on the way resolved: what the rename replaces.
            target: std::fs::canonicalize(path)?,
            existing: metadata,
        }),
        Ok(metadata) => {
            let kind = metadata.file_type();
            use std::os::unix::fs::FileTypeExt;
            if kind.is_char_device() || kind.is_fifo() || kind.is_block_device() {
                Ok(Destination::Stream { metadata })
            } else {
                Err(std::io::Error::other(
                    "it is neither a file, nor a device, nor a FIFO (a socket?)",
                ))
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // Nothing there, or a dangling link: follow the links to the name to create.
            let mut target = path.to_owned();
            for _ in 0..MAX_LINKS {
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.file_type().is_symlink() => {
                        let link = std::fs::read_link(&target)?;
                        target = directory_of(&target).join(link);
                    }
                    Ok(_) => return Err(std::io::Error::other("it changed while being resolved")),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let name = target
                            .file_name()
                            .ok_or_else(|| std::io::Error::other("it names no file"))?
                            .to_owned();
                        let directory = std::fs::canonicalize(directory_of(&target)).map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!("its directory {}: {e}", directory_of(&target).display()),
                            )
                        })?;
                        return Ok(Destination::Create {
                            target: directory.join(name),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::other("too many levels of symbolic links"))
        }
        Err(error) => Err(error),
    }
}

/// The directory `path` is in (`.` for a bare name).
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Refused unless this process may write `path` (a directory: create files in it).
fn writable(path: &Path) -> std::io::Result<()> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mode = if path.is_dir() {
        libc::W_OK | libc::X_OK
    } else {
        libc::W_OK
    };
    // SAFETY: a NUL-terminated path; faccessat only checks.
    match unsafe { libc::faccessat(libc::AT_FDCWD, name.as_ptr(), mode, libc::AT_EACCESS) } {
        0 => Ok(()),
        _ => {
            let error = std::io::Error::last_os_error();
            Err(std::io::Error::new(
                error.kind(),
                format!("{}: {error}", path.display()),
            ))
        }
    }
}

/// Writes `bytes` into a new temporary beside `target` and renames it over `target`.
fn replace(target: &Path, existing: Option<&Metadata>, bytes: &[u8]) -> std::io::Result<()> {
    let name = target
        .file_name()
        .map_or_else(|| OsStr::new("output").to_owned(), ToOwned::to_owned);
    let prefix = format!(".{}.", name.to_string_lossy());
    let _signals = SignalCleanup::install();
    let mut pending = Pending::new();
    let mut file = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".vmm-tmp")
        .rand_bytes(12)
        .make_in(directory_of(target), |path| {
            // Known to the signal handler before it exists, so that no signal can leave it.
            pending.set(path);
            let created = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path);
            if created.is_err() {
                pending.clear();
            }
            created
        })?;
    if let Some(existing) = existing {
        // The destination's owner (where this process may give it) and permissions.
        let _ = std::os::unix::fs::fchown(file.as_file(), Some(existing.uid()), Some(existing.gid()));
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(existing.mode() & 0o7777))?;
    }
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(target).map_err(|error| error.error)?;
    // The rename made durable; a directory that cannot be synced is no failure.
    if let Ok(directory) = File::open(directory_of(target)) {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// Temporary files being written, for a signal handler to remove: each slot holds a
/// leaked, NUL-terminated path. Whoever swaps a path out owns it: the committing thread
/// frees it, a handler only unlinks it (and the process ends).
static PENDING: [AtomicPtr<libc::c_char>; 8] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 8];

/// Removes every temporary file being written. Async-signal-safe: for signal handlers.
pub fn remove_temporaries() {
    for slot in &PENDING {
        let path = slot.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !path.is_null() {
            // SAFETY: a NUL-terminated path leaked by `Pending::set`, now owned here (never
            // freed: the process is ending); unlink is async-signal-safe.
            unsafe { libc::unlink(path) };
        }
    }
}

/// A slot of [`PENDING`], held while one temporary file is written.
struct Pending(Option<usize>);

impl Pending {
    fn new() -> Self {
        // A slot none uses (outputs are committed one at a time; 8 is plenty).
        let slot = PENDING.iter().position(|slot| slot.load(Ordering::Acquire).is_null());
        Self(slot)
    }

    fn set(&mut self, path: &Path) {
        let Some(slot) = self.0 else { return };
        let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
            return;
        };
        let old = PENDING[slot].swap(path.into_raw(), Ordering::AcqRel);
        free(old);
    }

    fn clear(&mut self) {
        if let Some(slot) = self.0 {
            free(PENDING[slot].swap(std::ptr::null_mut(), Ordering::AcqRel));
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.clear();
    }
}

fn free(path: *mut libc::c_char) {
    if !path.is_null() {
        // SAFETY: made by CString::into_raw in `Pending::set`, swapped out of its slot by
        // this thread alone.
        drop(unsafe { CString::from_raw(path) });
    }
}

/// The signals that end a process by default while it writes an output.
const ENDING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// For the length of a commit, signals that would end the process at once (no handler of
/// its own: `run`) first remove the temporary files; a process's own handlers are left.
struct SignalCleanup(Vec<libc::c_int>);

extern "C" fn remove_then_die(signal: libc::c_int) {
    remove_temporaries();
    // SAFETY: signal and raise are async-signal-safe; the default action then ends the
    // process with this signal, as it would have without us.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

impl SignalCleanup {
    fn install() -> Self {
        let mut installed = Vec::new();
        for signal in ENDING {
            // SAFETY: sigaction reads and writes zeroed (valid) structures; the handler only
            // calls async-signal-safe functions.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 || old.sa_sigaction != libc::SIG_DFL {
                    continue;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = remove_then_die as *const () as usize;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal, &action, std::ptr::null_mut()) == 0 {
                    installed.push(signal);
                }
            }
        }
        Self(installed)
    }
}

impl Drop for SignalCleanup {
    fn drop(&mut self) {
        for &signal in &self.0 {
            // SAFETY: back to the default action this process had.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_output_replaces_the_old_file_only_when_committed() {
        let dir = scratch("commit");
        let path = dir.join("report.json");
        std::fs::write(&path, "old").unwrap();
        // Claimed, then dropped (a failed or interrupted run): the old file is intact and
        // nothing else is in the directory.
        drop(Output::create(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(entries(&dir), ["report.json"]);
        Output::create(&path).unwrap().commit(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(entries(&dir), ["report.json"]);
        assert!(Output::create(&dir).is_err(), "a directory is not a file");
        assert!(Output::create(&dir.join("no-such-dir/x")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn links_are_followed_and_modes_kept() {
        let dir = scratch("links");
        let target = dir.join("target.csv");
        std::fs::write(&target, "old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("link.csv");
        std::os::unix::fs::symlink("target.csv", &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o600);
        // A dangling link: its target is created, the link kept.
        let dangling = dir.join("dangling.csv");
        std::os::unix::fs::symlink("created.csv", &dangling).unwrap();
        write_atomically(&dangling, b"made").unwrap();
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(dir.join("created.csv")).unwrap(), "made");
        assert_eq!(entries(&dir), ["created.csv", "dangling.csv", "link.csv", "target.csv"]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A character device with /dev/full's numbers, made in `dir` (as root), so that no
    /// mistake here can touch the machine's own.
    fn mknod_full(dir: &Path) -> Option<PathBuf> {
        let path = dir.join("full");
        let name = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mknod only creates the node.
        let made = unsafe { libc::mknod(name.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 7)) };
        (made == 0).then_some(path)
    }

    #[test]
    fn devices_are_written_into_and_one_file_is_claimed_once() {
        use std::os::unix::fs::FileTypeExt;
        let dir = scratch("claims");
        if let Some(full) = mknod_full(&dir) {
            let error = write_atomically(&full, b"x").unwrap_err();
            assert!(error.to_string().contains("space"), "{error}");
            assert!(std::fs::metadata(&full).unwrap().file_type().is_char_device());
            std::fs::remove_file(&full).unwrap();
        }
        // Two claims of /dev/null are fine; of one file, refused, however it is spelled.
        let _a = Output::create(Path::new("/dev/null")).unwrap();
        let _b = Output::create(Path::new("/dev/null")).unwrap();
        let path = dir.join("x.csv");
        let first = Output::create(&path).unwrap();
        let again = Output::create(&dir.join(".").join("x.csv")).unwrap_err();
        assert!(again.to_string().contains("same file"), "{again}");
        std::os::unix::fs::symlink("x.csv", dir.join("link")).unwrap();
        assert!(Output::create(&dir.join("link")).is_err(), "a dangling link to it");
        drop(first);
        std::fs::write(&path, "now it exists").unwrap();
        let first = Output::create(&path).unwrap();
        assert!(Output::create(&dir.join("link")).is_err(), "a link to it");
        drop(first);
        assert!(Output::create(&dir.join("link")).is_ok(), "released when dropped");
        std::fs::remove_dir_all(&dir).ok();
    }
}
