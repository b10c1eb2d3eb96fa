//! Named network namespaces, compatible with `ip netns`: a namespace NAME is a bind mount of
//! a namespace file on /run/netns/NAME. Namespaces are created from a short-lived thread
//! (`unshare` affects only the calling thread), never by forking a threaded process.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {name:?} already exists ({path})")]
    Exists { name: String, path: PathBuf },
    #[error("network namespace {name:?}: {op} failed: {source}")]
    Io {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(name: &'a str, op: &'static str) -> impl Fn(io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Io {
        name: name.to_string(),
        op,
        source,
    }
}

pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// /run/netns must be a shared mount so namespaces created here are visible in other mount
/// namespaces (what `ip netns add` does).
fn ensure_netns_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_DIR)?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared().map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates the named namespace (with loopback down, as the kernel makes it).
pub fn create(name: &str) -> Result<PathBuf, NetnsError> {
    ensure_netns_dir().map_err(io_err(name, "preparing /run/netns"))?;
    let path = path_of(name);
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(NetnsError::Exists {
                name: name.to_string(),
                path,
            });
        }
        Err(e) => return Err(io_err(name, "creating the mount point")(e)),
    }
    let target = path.clone();
    let result = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")));
    if let Err(e) = result {
        let _ = fs::remove_file(&path);
        return Err(io_err(name, "unshare and bind mount")(e));
    }
    Ok(path)
}

/// Deletes the named namespace (idempotent).
pub fn delete(name: &str) -> Result<(), NetnsError> {
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io_err(name, "unmount")(e.into())),
    }
    fs::remove_file(&path).map_err(io_err(name, "remove"))
}

pub fn exists(name: &str) -> bool {
    path_of(name).exists()
}

/// `nsfs`, the filesystem of namespace files (`/proc/PID/ns/net`, bind mounts of them).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Whether `path` is a network namespace (a bind mount or a /proc file of one).
pub fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// Runs `f` on a thread that has entered the namespace at `path`; sockets `f` opens stay in
/// that namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let file = File::open(path)?;
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
}

/// Writes a sysctl under /proc/sys of the calling thread's network namespace.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}
