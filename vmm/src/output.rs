//! Output files written atomically: to a temporary file beside the destination, renamed
//! over it only once complete. A run that fails, or is interrupted, leaves the previous
//! result where it was; and the temporary file is created before anything is measured, so
//! an unwritable path costs no run.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An output being prepared: written in full, then put in place.
#[derive(Debug)]
pub struct Output {
    file: File,
    temporary: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Output {
    /// Creates the temporary file beside `path` (the destination itself is not touched).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        if path.is_dir() {
            return Err(std::io::Error::other("it is a directory"));
        }
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("it names no file"))?
            .to_string_lossy();
        let temporary = path.with_file_name(format!(".{name}.vmm-{}.tmp", std::process::id()));
        let file = File::create(&temporary)?;
        Ok(Self {
            file,
            temporary,
            path: path.to_owned(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` and puts the file in place of the destination.
    pub fn commit(mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.sync_all()?;
        std::fs::rename(&self.temporary, &self.path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    Output::create(path)?.commit(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_replaces_the_old_file_only_when_committed() {
        let dir = std::env::temp_dir().join(format!("vmm-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.json");
        std::fs::write(&path, "old").unwrap();
        // Prepared, then dropped (a failed or interrupted run): the old file is intact and
        // no temporary file is left behind.
        drop(Output::create(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        Output::create(&path).unwrap().commit(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert!(Output::create(&dir).is_err(), "a directory is not a file");
        std::fs::remove_dir_all(&dir).ok();
    }
}
