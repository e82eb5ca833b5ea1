//! How a container becomes a process: the mapped program with the container's command
//! and arguments, its environment, its output appended to its log file, in a mount
//! namespace of its own (`unshare(CLONE_NEWNS | CLONE_NEWUTS)` before `exec`) where each
//! volume is bind-mounted onto its mount path and the host name is the pod's name.
//!
//! Mount points that do not exist on the host are created there (empty directories, or
//! empty files for single-file mounts) and removed when the agent stops; a mount point
//! under another mount of the same container is created inside that volume instead.

use super::NodeError;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

/// One bind mount of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Where a container's process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WorkingDir {
    /// A path as the container sees it (its `workingDir`).
    Inside(PathBuf),
    /// A directory of the host (the pod's own), entered even where a mount hides it.
    Host(PathBuf),
}

/// Everything a start needs.
#[derive(Debug)]
pub(super) struct Launch {
    /// What to execute (`/proc/self/exe` for the agent's own image, so that a mount
    /// over the binary's directory or a rebuilt binary does not matter).
    pub program: PathBuf,
    /// The program's name as the process sees it (`argv[0]`).
    pub arg0: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: WorkingDir,
    pub mounts: Vec<Mount>,
    pub hostname: String,
    pub log: PathBuf,
    pub previous_log: PathBuf,
}

fn c_path(path: &Path) -> Result<CString, NodeError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| NodeError::Invalid(format!("{}: a NUL byte in a path", path.display())))
}

/// Makes `mounts[i].target` exist: inside the source of the nearest earlier mount that
/// contains it, else on the host (returning every path created there).
fn make_mountpoints(mounts: &[Mount]) -> Result<Vec<PathBuf>, NodeError> {
    let mut created = Vec::new();
    for (index, mount) in mounts.iter().enumerate() {
        let file = mount.source.is_file();
        let enclosing = mounts[..index]
            .iter()
            .rev()
            .find(|m| mount.target.starts_with(&m.target) && mount.target != m.target);
        let target = match enclosing {
            Some(outer) => match mount.target.strip_prefix(&outer.target) {
                Ok(rest) => outer.source.join(rest),
                Err(_) => mount.target.clone(),
            },
            None => mount.target.clone(),
        };
        if std::fs::symlink_metadata(&target).is_ok() || target.exists() {
            continue;
        }
        if enclosing.is_none() {
            // Every path about to be made, so that all of them can go again.
            let mut path = target.as_path();
            loop {
                created.push(path.to_path_buf());
                match path.parent() {
                    Some(parent) if !parent.exists() => path = parent,
                    _ => break,
                }
            }
        }
        let dir = if file {
            target.parent()
        } else {
            Some(target.as_path())
        };
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
        }
        if file {
            std::fs::write(&target, b"").map_err(|e| NodeError::io(&target, e))?;
        }
    }
    Ok(created)
}

/// Starts the process. Returns it and the mount points created on the host.
pub(super) fn launch(launch: &Launch) -> Result<(Child, Vec<PathBuf>), NodeError> {
    let mut mounts = launch.mounts.clone();
    // Outer mounts first, so an inner one lands on top of its enclosing volume.
    mounts.sort_by_key(|m| m.target.components().count());
    let created = make_mountpoints(&mounts)?;
    let mut binds = Vec::new();
    for mount in &mounts {
        binds.push((
            c_path(&mount.source)?,
            c_path(&mount.target)?,
            mount.read_only,
        ));
    }
    let (working_dir, host_dir) = match &launch.working_dir {
        WorkingDir::Inside(path) => (Some(c_path(path)?), None),
        WorkingDir::Host(path) => (None, Some(c_path(path)?)),
    };
    // Room for the descriptors the child opens (it must not allocate).
    let mut fds: Vec<libc::c_int> = vec![-1; binds.len()];
    let hostname = launch.hostname.clone().into_bytes();

    if std::fs::metadata(&launch.log).is_ok_and(|m| m.len() > 0) {
        std::fs::rename(&launch.log, &launch.previous_log)
            .map_err(|e| NodeError::io(&launch.previous_log, e))?;
    }
    if let Some(dir) = launch.log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)
        .map_err(|e| NodeError::io(&launch.log, e))?;
    let log_err = log.try_clone().map_err(|e| NodeError::io(&launch.log, e))?;
    let mut command = Command::new(&launch.program);
    command
        .arg0(&launch.arg0)
        .args(&launch.argv)
        .env_clear()
        .envs(launch.env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: between fork and exec the closure only makes system calls (unshare, mount,
    // sethostname, chdir) on memory prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            in_child(
                &binds,
                &mut fds,
                &hostname,
                working_dir.as_ref(),
                host_dir.as_ref(),
            )
        });
    }
    let child = command.spawn().map_err(|e| {
        NodeError::Invalid(format!(
            "cannot start {} (its mounts, working directory or the program): {e}",
            launch.arg0
        ))
    })?;
    Ok((child, created))
}

/// `/proc/self/fd/<fd>` NUL-terminated in `buf`, without allocating.
fn fd_path(fd: libc::c_int, buf: &mut [u8; 40]) -> *const libc::c_char {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = u32::try_from(fd).unwrap_or(0);
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    buf.as_ptr().cast()
}

/// Runs in the forked child before `exec`: a private mount namespace with the binds.
/// Every source (and the host working directory) is opened first, in the new
/// namespace, and bound from its descriptor, so that an earlier mount (an emptyDir
/// on /tmp) cannot hide a later one's source.
fn in_child(
    binds: &[(CString, CString, bool)],
    fds: &mut [libc::c_int],
    hostname: &[u8],
    working_dir: Option<&CString>,
    host_dir: Option<&CString>,
) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let open = |path: &CString| {
        // SAFETY: open(2) on a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(fd)
        }
    };
    // SAFETY: plain system calls on NUL-terminated strings that outlive the calls.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for ((source, _, _), fd) in binds.iter().zip(fds.iter_mut()) {
            *fd = open(source)?;
        }
        let host_fd = match host_dir {
            Some(dir) => Some(open(dir)?),
            None => None,
        };
        let mut buf = [0u8; 40];
        for ((_, target, read_only), fd) in binds.iter().zip(fds.iter()) {
            check(libc::mount(
                fd_path(*fd, &mut buf),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            if *read_only {
                check(libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
        }
        if !hostname.is_empty() {
            check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
        }
        if let Some(fd) = host_fd {
            check(libc::fchdir(fd))?;
        }
        if let Some(dir) = working_dir {
            check(libc::chdir(dir.as_ptr()))?;
        }
    }
    Ok(())
}

/// Sends `signal` to the process group of `pid`.
pub(super) fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) on a process group this agent started.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_paths_are_written_without_allocating() {
        let mut buf = [0u8; 40];
        for (fd, text) in [
            (0, "/proc/self/fd/0"),
            (7, "/proc/self/fd/7"),
            (1234, "/proc/self/fd/1234"),
        ] {
            let ptr = fd_path(fd, &mut buf);
            // SAFETY: fd_path wrote a NUL-terminated string into buf.
            let written = unsafe { std::ffi::CStr::from_ptr(ptr) };
            assert_eq!(written.to_str().unwrap(), text);
        }
    }

    #[test]
    fn inner_mount_points_are_made_inside_the_outer_volume() {
        let base = std::env::temp_dir().join(format!("multisite-mp-{}", std::process::id()));
        let outer = base.join("outer");
        std::fs::create_dir_all(&outer).unwrap();
        let mounts = vec![
            Mount {
                source: outer.clone(),
                target: base.join("host/data"),
                read_only: false,
            },
            Mount {
                source: base.join("inner"),
                target: base.join("host/data/logs"),
                read_only: false,
            },
        ];
        let created = make_mountpoints(&mounts).unwrap();
        assert_eq!(created, vec![base.join("host/data"), base.join("host")]);
        assert!(base.join("host/data").is_dir());
        assert!(outer.join("logs").is_dir());
        assert!(!base.join("host/data/logs").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
