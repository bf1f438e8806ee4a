//! Input files read with a size cap, and only if they are regular files: a payload named
//! `/dev/urandom` would otherwise grow without bound, and a FIFO would block forever,
//! before any `--timeout` applies.

use std::io::Read;
use std::path::Path;

/// The largest payload ELF (its loadable window is 3 MiB; symbols and debug info add more).
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 20;
/// The largest matrix, profile or calibration file.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// The largest validation report `merge` reads (also its bound on all reports together:
/// `validation::merge::MAX_INPUT_BYTES`).
pub const MAX_REPORT_BYTES: u64 = 256 << 20;

/// The file's bytes, refused if it is not a regular file or holds more than `cap` bytes.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    // Opened without blocking (a FIFO with no writer would block the open itself), then
    // checked to be a regular file before anything is read.
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.file_type().is_file() {
        return Err(std::io::Error::other(
            "it is not a regular file (a device, FIFO or directory)",
        ));
    }
    if metadata.len() > cap {
        return Err(std::io::Error::other(format!(
            "it holds {} bytes, more than the {cap} this file may",
            metadata.len()
        )));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::other(format!(
            "it grew past {cap} bytes while being read"
        )));
    }
    Ok(bytes)
}

/// [`read_capped`], as UTF-8 text.
pub fn read_text_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    String::from_utf8(read_capped(path, cap)?).map_err(|_| std::io::Error::other("it is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_directories_and_big_files_are_refused() {
        for path in ["/dev/urandom", "/dev/zero", "/tmp"] {
            let error = read_capped(Path::new(path), 1 << 20).unwrap_err();
            assert!(error.to_string().contains("not a regular file"), "{path}: {error}");
        }
        let dir = std::env::temp_dir().join(format!("vmm-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = read_capped(&fifo, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        assert!(read_capped(&big, 1024).unwrap_err().to_string().contains("more than"));
        assert_eq!(read_capped(&big, 4096).unwrap().len(), 2048);
        std::fs::remove_dir_all(&dir).ok();
    }
}
