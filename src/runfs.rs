//! File-system safety for run and model directories: atomic file writes, an advisory lock per
//! run directory, and removal of temporary files that a killed or failed process left behind.
//!
//! Temporary names all follow one pattern, `.<name>.<tag>-<pid>` (tag `tmp`, `old` or
//! `partial`), so a later process can tell whose they are: an entry whose pid is not a live
//! process is stale and is removed at start.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The name of the lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// `.<name>.<tag>-<pid>` next to `path`: the temporary name this process uses for it.
pub fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temporary sibling is written, flushed to disk and
/// renamed over `path`, so a reader (or a later run after a kill or a full disk) sees either
/// the old file or the new one, never a truncated one. Errors name the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    let tmp = temp_sibling(path, "tmp");
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {} (via {})", path.display(), tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("cannot rename {} to {}", tmp.display(), path.display()))
    })
}

/// Whether a process with this id exists (signal 0 probes without sending anything; EPERM
/// means it exists under another user).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process; it has no effect on it.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid of a temporary name `.<name>.<tag>-<pid>` with a known tag.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (stem, pid) = rest.rsplit_once('-')?;
    let pid: u32 = pid.parse().ok()?;
    [".tmp", ".old", ".partial"].iter().any(|t| stem.ends_with(t)).then_some(pid)
}

/// Removes the temporary files and directories in `dir` left by processes that no longer run
/// (named `.<name>.<tag>-<pid>`, see [`temp_sibling`]); returns what was removed. Entries of
/// live processes, including this one, are left alone.
pub fn clean_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut removed = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let p = e.path();
        let ok = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match ok {
            Ok(()) => removed.push(p),
            Err(err) => eprintln!("warning: cannot remove the stale temporary {}: {err}", p.display()),
        }
    }
    removed
}

/// [`clean_stale_temps`] with one line on stderr per entry removed.
pub fn clean_stale_temps_noisy(dir: &Path) {
    for p in clean_stale_temps(dir) {
        eprintln!("removed {} (left by a process that no longer runs)", p.display());
    }
}

/// An exclusive advisory lock (`flock`) on `<dir>/.lock`, held until dropped. The file holds the
/// owner's pid: a second process on the same directory gets an error naming it. The kernel
/// drops a `flock` when its process dies, so a lock file left by a killed process is taken
/// over (with a warning naming the dead pid).
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own; LOCK_NB makes it return at once.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let owner = read_pid(&mut file)
                    .map(|p| format!("process {p}"))
                    .unwrap_or_else(|| "another process".into());
                bail!("{} is in use by {owner} (lock file {}); wait for it to finish or use another run directory", dir.display(), path.display());
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        if let Some(old) = read_pid(&mut file).filter(|&p| p != std::process::id()) {
            eprintln!(
                "warning: {} was left by process {old}, which no longer holds it; taking it over",
                path.display()
            );
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RunLock { _file: file, path })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied, not removed: removing would let a process that opened the old file lock a
        // different inode than one opening a new file.
        let _ = self._file.set_len(0);
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Refuses a directory argument that is the current directory or one of its ancestors:
/// replacing it would pull the working directory out from under the user.
pub fn ensure_not_cwd(dir: &Path, what: &str) -> Result<()> {
    let (Ok(d), Ok(cwd)) = (dir.canonicalize(), std::env::current_dir().and_then(|c| c.canonicalize()))
    else {
        return Ok(());
    };
    if cwd.starts_with(&d) {
        bail!("{what} {} is the current directory or contains it; refusing to replace it", dir.display());
    }
    Ok(())
}

/// Whether `dir` exists and has any entry.
pub fn non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut r| r.next().is_some()).unwrap_or(false)
}

/// The machine's physical memory in bytes (None if unknown).
pub fn physical_memory() -> Option<u128> {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u128 * size as u128)
}

/// Restores the default action of SIGPIPE, so that writing to a closed pipe (`fcgpu … | head`)
/// ends the process quietly, as it does for other Unix tools, instead of the Rust runtime's
/// EPIPE error turning into a panic inside `println!`/`eprintln!`.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to its default is async-signal-safe and has no
    // Rust-side state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_parse_their_owner() {
        assert_eq!(temp_owner(".checkpoint-4.partial.tmp-123"), Some(123));
        assert_eq!(temp_owner("..checkpoint-4.partial.tmp-77"), Some(77));
        assert_eq!(temp_owner(".base-model.old-9"), Some(9));
        assert_eq!(temp_owner(".checkpoint-4.partial-9"), Some(9));
        assert_eq!(temp_owner("checkpoint-4"), None);
        assert_eq!(temp_owner(".lock"), None);
        assert_eq!(temp_owner(".x.tmp-abc"), None);
    }

    #[test]
    fn stale_temps_go_live_ones_stay() {
        let d = tempfile::tempdir().unwrap();
        let dead = d.path().join(format!(".m.tmp-{}", u32::MAX - 1));
        let mine = temp_sibling(&d.path().join("m"), "tmp");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("x"), "1").unwrap();
        std::fs::write(&mine, "1").unwrap();
        let removed = clean_stale_temps(d.path());
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && mine.exists());
    }

    #[test]
    fn a_held_lock_refuses_a_second_holder_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(d.path()).unwrap();
        let err = RunLock::acquire(d.path()).err().expect("locked twice");
        assert!(format!("{err:#}").contains(&format!("in use by process {}", std::process::id())), "{err:#}");
        drop(first);
        RunLock::acquire(d.path()).unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // A parent that is a file: the error names the target path.
        let err = write_atomic(&p.join("b.txt"), b"x").unwrap_err();
        assert!(format!("{err:#}").contains("a.txt"), "{err:#}");
    }
}
