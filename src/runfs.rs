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

/// Writes `bytes` to the output `path`, as every command writes its output files:
/// - a regular file, or nothing yet: atomically, through a temporary sibling that is written,
///   flushed to disk and renamed over it, so a reader (or a later run after a kill or a full
///   disk) sees either the old file or the new one, never a truncated one;
/// - a symbolic link: the file it points to, by these same rules (the link stays a link);
/// - a FIFO or a character device (`/dev/stdout`, `/dev/null`, a pipe a reader waits on):
///   written through in place, as a shell's `>` would, since renaming over it would replace
///   the special file with a regular one; a FIFO waits for its reader;
/// - a directory, a block device or a socket: refused.
///
/// A failed write (a full disk, `/dev/full`'s ENOSPC) is an error naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let target = resolve_links(path)?;
    let shown = if target == path {
        path.display().to_string()
    } else {
        format!("{} (-> {})", path.display(), target.display())
    };
    if let Ok(meta) = std::fs::metadata(&target) {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if ft.is_fifo() || ft.is_char_device() {
            return write_through(&target, bytes).with_context(|| format!("cannot write {shown}"));
        }
        if ft.is_dir() {
            bail!("cannot write {shown}: it is a directory");
        }
        if ft.is_block_device() || ft.is_socket() {
            bail!("cannot write {shown}: it is a block device or a socket, not a file; refusing to write an output there");
        }
    }
    replace_atomic(&target, bytes).with_context(|| format!("cannot write {shown}"))
}

/// Most symbolic links followed for one path (Linux's own limit).
const MAX_LINKS: usize = 40;

/// `path` with symbolic links at its last component followed until it names something that
/// is not a link (or nothing).
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p)
                    .with_context(|| format!("cannot read the link {}", p.display()))?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(p),
        }
    }
    bail!("{}: more than {MAX_LINKS} symbolic links in a row", path.display())
}

/// Writes `bytes` into the FIFO or device at `path` in place (no create, no truncate).
fn write_through(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(bytes)?;
    f.flush()?;
    Ok(())
}

/// The temporary-and-rename write of a regular file (or a new one) at `path`.
fn replace_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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
        return Err(e).with_context(|| format!("via {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("cannot rename {} to {}", tmp.display(), path.display()))
    })
}

/// Opens the output `path` for appending one record at a time (`metrics.jsonl`, `--counters`):
/// created when missing, written through a symbolic link, a FIFO or a character device as a
/// shell's `>>` would; a directory, block device or socket is refused (see [`write_atomic`]).
pub fn open_append(path: &Path) -> Result<File> {
    let target = resolve_links(path)?;
    if let Ok(meta) = std::fs::metadata(&target) {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if ft.is_dir() || ft.is_block_device() || ft.is_socket() {
            bail!(
                "cannot write {}: it is a directory, a block device or a socket, not a file",
                path.display()
            );
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&target)
        .with_context(|| format!("cannot open {} for appending", path.display()))
}

/// Reads the input file `path` (`config.json`, `tokenizer.json`, ...) as text: it must be a
/// regular file (a link to one is fine) of at most `max` bytes. A FIFO, a device or a
/// directory is refused before anything is read (a FIFO would block, `/dev/zero` would never
/// end), and every failure is an error naming the file.
pub fn read_capped(path: &Path, max: u64) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting; the file
    // type is then checked on the opened handle, so it is the file that is read.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let meta = f.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file; refusing to read it", path.display());
    }
    if meta.len() > max {
        bail!("{}: {} bytes, more than the {max} this file may have", path.display(), meta.len());
    }
    let mut text = String::new();
    f.take(max + 1).read_to_string(&mut text).with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > max {
        bail!("{}: more than the {max} bytes this file may have", path.display());
    }
    Ok(text)
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

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
    }

    fn is_char_device(p: &Path) -> bool {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(p).unwrap().file_type().is_char_device()
    }

    #[test]
    fn a_fifo_output_is_written_through_and_stays_a_fifo() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pipe");
        mkfifo(&p);
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || std::fs::read(&p).unwrap())
        };
        write_atomic(&p, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_fifo());
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || std::fs::read(&p).unwrap())
        };
        let mut f = open_append(&p).unwrap();
        f.write_all(b"appended").unwrap();
        drop(f);
        assert_eq!(reader.join().unwrap(), b"appended");
    }

    #[test]
    fn a_symlink_output_replaces_its_target_and_stays_a_link() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("real.json");
        std::fs::write(&target, "old").unwrap();
        let link = d.path().join("link.json");
        std::os::unix::fs::symlink("real.json", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        // A dangling link: the file it names is created.
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink("made.json", &dangling).unwrap();
        write_atomic(&dangling, b"x").unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("made.json")).unwrap(), "x");
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
    }

    #[test]
    fn a_full_device_is_an_error_and_stays_a_device() {
        // Through a link, so that code which replaced the path would replace only the link.
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("out.jsonl");
        std::os::unix::fs::symlink("/dev/full", &link).unwrap();
        let err = write_atomic(&link, b"data").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("out.jsonl") && msg.contains("No space left"), "{msg}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(is_char_device(Path::new("/dev/full")));
        let mut f = open_append(&link).unwrap();
        assert!(f.write_all(b"x\n").is_err());
        // A device that takes the bytes: written through, still a device.
        let null = d.path().join("null");
        std::os::unix::fs::symlink("/dev/null", &null).unwrap();
        write_atomic(&null, b"data").unwrap();
        assert!(is_char_device(Path::new("/dev/null")));
    }

    #[test]
    fn a_directory_output_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let err = write_atomic(d.path(), b"x").unwrap_err();
        assert!(format!("{err:#}").contains("is a directory"), "{err:#}");
        assert!(open_append(d.path()).is_err());
    }

    #[test]
    fn capped_reads_refuse_special_and_oversized_files() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("config.json");
        mkfifo(&fifo);
        let e = format!("{:#}", read_capped(&fifo, 1024).unwrap_err());
        assert!(e.contains("config.json") && e.contains("not a regular file"), "{e}");
        let e = format!("{:#}", read_capped(Path::new("/dev/zero"), 1024).unwrap_err());
        assert!(e.contains("/dev/zero") && e.contains("not a regular file"), "{e}");
        let big = d.path().join("big.json");
        std::fs::write(&big, vec![b' '; 2000]).unwrap();
        let e = format!("{:#}", read_capped(&big, 1024).unwrap_err());
        assert!(e.contains("big.json") && e.contains("1024"), "{e}");
        let link = d.path().join("link.json");
        std::fs::write(d.path().join("small.json"), "{}").unwrap();
        std::os::unix::fs::symlink("small.json", &link).unwrap();
        assert_eq!(read_capped(&link, 1024).unwrap(), "{}");
        let e = format!("{:#}", read_capped(&d.path().join("missing.json"), 1024).unwrap_err());
        assert!(e.contains("missing.json"), "{e}");
    }
}
