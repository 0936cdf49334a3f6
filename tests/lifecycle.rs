//! mount(8), /etc/fstab, systemd units and the process lifecycle: the
//! helper installed for real, signals during writes, `bucketfs status`,
//! dead mountpoints, passwd files.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `mount` with the test credentials in its environment (mount(8) hands
/// its environment to the helper).
fn mount_cmd() -> Command {
    let mut cmd = Command::new("mount");
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    cmd
}

struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/install"))
            .arg("--uninstall")
            .output();
    }
}

/// The process whose command line names `mountpoint` and runs bucketfs.
fn daemon_of(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let exe = fs::read_link(e.path().join("exe")).ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        (exe.file_name()? == "bucketfs" && cmdline.split(|b| *b == 0).any(|a| a == want))
            .then_some(pid)
    })
}

#[test]
fn mount_t_s3fs_and_fstab_lines_work_through_the_installed_helper() {
    let out = Command::new(repo().join("scripts/install"))
        .args(["--bin", bin()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _cleanup = Installed;
    assert_eq!(
        fs::read_link("/sbin/mount.s3fs").unwrap(),
        Path::new("/usr/local/bin/bucketfs")
    );

    let b = Bucket::new(server(), "helper", false);
    b.put("hello.txt", b"via mount(8)");
    let (tmp, mp) = scratch_mountpoint();
    let opts = format!(
        "{},_netdev,nofail,x-systemd.automount",
        base_options(&b.endpoint, &tmp.path().join("c"), &tmp.path().join("log"))
    );

    // mount -t s3fs BUCKET DIR -o OPTS
    let st = mount_cmd()
        .args(["-t", "s3fs", &b.name])
        .arg(&mp)
        .args(["-o", &opts])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(is_mounted(&mp), "live when mount(8) returns");
    // The daemon, forked into the background, purges freed memory with
    // jemalloc's thread (a thread started before the fork is not in the
    // child).
    let daemon = daemon_of(&mp).expect("the daemon serving the mount");
    let threads: Vec<String> = fs::read_dir(format!("/proc/{daemon}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(
        threads.iter().any(|t| t.starts_with("jemalloc_bg")),
        "{threads:?}"
    );
    assert_eq!(fs::read(mp.join("hello.txt")).unwrap(), b"via mount(8)");
    fs::write(mp.join("back.txt"), b"written").unwrap();
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert_eq!(b.get("back.txt").as_deref(), Some(&b"written"[..]));

    // An fstab line, mounted by its mountpoint alone.
    let fstab = tmp.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} s3fs {opts},allow_other 0 0\n",
            b.name,
            mp.display()
        ),
    )
    .unwrap();
    let st = mount_cmd()
        .arg("--fstab")
        .arg(&fstab)
        .arg(&mp)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(fs::read(mp.join("back.txt")).unwrap(), b"written");
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());

    // mount -a over that fstab.
    let st = mount_cmd()
        .args(["-a", "-t", "s3fs", "--fstab"])
        .arg(&fstab)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(is_mounted(&mp));
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());

    // Bad option and unreachable endpoint: non-zero, nothing mounted.
    for bad in [
        format!("{opts},no_such_option"),
        format!(
            "endpoint=http://127.0.0.1:{},path_style,timeout=1,retries=0",
            free_port()
        ),
    ] {
        let out = mount_cmd()
            .args(["-t", "s3fs", &b.name])
            .arg(&mp)
            .args(["-o", &bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
        assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
        assert!(!is_mounted(&mp));
    }
    // mount -f (fake) checks options and mounts nothing.
    let st = mount_cmd()
        .args(["-f", "-t", "s3fs", &b.name])
        .arg(&mp)
        .args(["-o", &opts])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(&mp));
}

#[test]
fn sigterm_during_a_large_write_still_lands_the_whole_object() {
    let b = Bucket::new(server(), "sigterm", false);
    let m = Mount::new(&b, "");
    let chunk = 1024 * 1024;
    let data = pattern(24 * chunk, 77);
    let mut f = fs::File::create(m.path("big")).unwrap();
    for (i, c) in data.chunks(chunk).enumerate() {
        f.write_all(c).unwrap();
        if i == 8 {
            let pid = m.pid().expect("daemon running");
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    drop(f); // close: must succeed, and the daemon may then exit
    assert_eq!(
        m.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        m.log_text()
    );
    assert_eq!(sha256(&b.get("big").expect("object in S3")), sha256(&data));
    assert!(!is_mounted(&m.dir));
}

#[test]
fn status_reports_a_live_mount_without_secrets() {
    let b = Bucket::new(server(), "status", false);
    let m = Mount::new(&b, "");
    fs::write(m.path("done"), b"x").unwrap();
    let _ = fs::read_dir(&m.dir).unwrap().count();
    let mut open = fs::File::create(m.path("pending.bin")).unwrap();
    open.write_all(&[1u8; 4096]).unwrap();
    let out = command().arg("status").arg(&m.dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&b.name) && text.contains(&b.endpoint),
        "{text}"
    );
    assert!(
        text.contains("not yet in S3: 1 file(s)") && text.contains("pending.bin (4096 bytes"),
        "{text}"
    );
    assert!(text.contains("PUT") && text.contains("LIST"), "{text}");
    assert!(!text.contains(SECRET_KEY));
    drop(open);
    let out = command().arg("status").arg(&m.dir).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("not yet in S3: 0 file(s)"));
    // Not a mount: a clear error.
    let out = command().arg("status").arg("/tmp").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live bucketfs mount"));
    // No secret in any log line, even at debug level.
    assert!(!m.log_text().contains(SECRET_KEY));
}

#[test]
fn a_dead_mountpoint_is_detected_and_the_message_says_how_to_clear_it() {
    let b = Bucket::new(server(), "dead", false);
    let m = Mount::new(&b, "");
    let pid = m.pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    m.wait_exit(Duration::from_secs(30));
    assert_eq!(
        errno(fs::metadata(m.path("x")).unwrap_err()),
        libc::ENOTCONN
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = command()
        .args([
            "-o",
            &base_options(&b.endpoint, &tmp.path().join("c"), &tmp.path().join("l")),
            &b.name,
        ])
        .arg(&m.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not connected") && err.contains("umount -l"),
        "{err}"
    );
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&m.dir)
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn passwd_file_is_refused_unless_private() {
    let b = Bucket::new(server(), "passwd", false);
    let (tmp, mp) = scratch_mountpoint();
    let pw = tmp.path().join("passwd");
    fs::write(&pw, format!("{}:{ACCESS_KEY}:{SECRET_KEY}\n", b.name)).unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o644)).unwrap();
    let opts = format!(
        "{},passwd_file={}",
        base_options(&b.endpoint, &tmp.path().join("c"), &tmp.path().join("log")),
        pw.display()
    );
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let out = cmd
        .args(["-o", &opts, &b.name])
        .arg(&mp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    assert!(!is_mounted(&mp));
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mp));
    fs::write(mp.join("f"), b"with passwd_file keys").unwrap();
    assert!(Command::new("umount").arg(&mp).status().unwrap().success());
    assert_eq!(b.get("f").as_deref(), Some(&b"with passwd_file keys"[..]));
    assert!(
        !fs::read_to_string(tmp.path().join("log"))
            .unwrap()
            .contains(SECRET_KEY)
    );
}

#[test]
fn shipped_systemd_units_verify() {
    let dir = repo().join("systemd");
    let out = Command::new("systemd-analyze")
        .args(["verify", "mnt-mybucket.mount", "mnt-mybucket.automount"])
        .current_dir(&dir)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = fs::read_to_string(dir.join("mnt-mybucket.mount")).unwrap();
    assert!(unit.contains("Type=s3fs") && unit.contains("After=network-online.target"));
}

#[test]
fn a_lazy_unmount_loses_nothing_that_was_written() {
    let b = Bucket::new(server(), "lazy", false);
    let m = Mount::new(&b, "");
    let data = pattern(3 * 1024 * 1024 + 11, 5);
    let mut f = fs::File::create(m.path("f")).unwrap();
    f.write_all(&data[..1024 * 1024]).unwrap();
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&m.dir)
            .status()
            .unwrap()
            .success()
    );
    assert!(!is_mounted(&m.dir));
    f.write_all(&data[1024 * 1024..]).unwrap();
    drop(f);
    assert_eq!(
        m.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        m.log_text()
    );
    assert_eq!(sha256(&b.get("f").expect("object in S3")), sha256(&data));
}

#[test]
fn kill_9_while_writing_then_the_next_mount_uploads_what_was_staged() {
    let b = Bucket::new(server(), "kill9", true);
    b.put("edited", &pattern(100_000, 1));
    b.put("raced", b"original");
    let m = Mount::new(&b, "");
    // fsync'd data is in S3 before the kill.
    let mut synced = fs::File::create(m.path("synced")).unwrap();
    synced.write_all(b"confirmed by fsync").unwrap();
    synced.sync_all().unwrap();
    // Staged, never uploaded: a new file, an edit, and an edit of an
    // object that another client will replace before the next mount.
    let mut new = fs::File::create(m.path("new")).unwrap();
    new.write_all(&pattern(3 * 1024 * 1024, 2)).unwrap();
    let mut edited = fs::OpenOptions::new()
        .write(true)
        .open(m.path("edited"))
        .unwrap();
    edited.write_all_at_offset(50_000, b"EDITED");
    let mut raced = fs::OpenOptions::new()
        .append(true)
        .open(m.path("raced"))
        .unwrap();
    raced.write_all(b" + mine").unwrap();
    let pid = m.pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    m.wait_exit(Duration::from_secs(30));
    drop((synced, new, edited, raced));
    assert_eq!(b.get("synced").as_deref(), Some(&b"confirmed by fsync"[..]));
    assert_eq!(b.get("new"), None, "not uploaded before the kill");
    b.put("raced", b"another client's");
    assert!(
        Command::new("umount")
            .arg("-l")
            .arg(&m.dir)
            .status()
            .unwrap()
            .success()
    );

    m.restart();
    let mut want = pattern(100_000, 1);
    want[50_000..50_006].copy_from_slice(b"EDITED");
    // Served from the staged copies at once, uploaded in the background.
    assert_eq!(
        sha256(&fs::read(m.path("new")).unwrap()),
        sha256(&pattern(3 * 1024 * 1024, 2)),
        "read through the mount before it is in S3"
    );
    wait_until(Duration::from_secs(60), "recovered files to land", || {
        b.get("new").map(|d| sha256(&d)) == Some(sha256(&pattern(3 * 1024 * 1024, 2)))
            && b.get("edited").map(|d| sha256(&d)) == Some(sha256(&want))
            && b.keys("raced.bucketfs-recovered-").len() == 1
            && b.keys("raced.bucketfs-recovered-")
                .first()
                .and_then(|k| b.get(k))
                .as_deref()
                == Some(&b"original + mine"[..])
    });
    assert_eq!(
        sha256(&b.get("new").unwrap()),
        sha256(&pattern(3 * 1024 * 1024, 2))
    );
    assert_eq!(sha256(&b.get("edited").unwrap()), sha256(&want));
    assert_eq!(
        b.get("raced").as_deref(),
        Some(&b"another client's"[..]),
        "never overwritten"
    );
    let beside: Vec<String> = b.keys("raced.bucketfs-recovered-");
    assert_eq!(beside.len(), 1, "{:?}", b.keys(""));
    assert_eq!(b.get(&beside[0]).as_deref(), Some(&b"original + mine"[..]));
    assert!(m.log_text().contains("kept beside it"));
}

trait WriteAt {
    fn write_all_at_offset(&mut self, off: u64, data: &[u8]);
}

impl WriteAt for fs::File {
    fn write_all_at_offset(&mut self, off: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        self.write_all_at(data, off).unwrap();
    }
}

#[test]
fn ordinary_edits_log_no_warning_and_every_log_entry_is_one_line() {
    let b = Bucket::new(server(), "quietlog", false);
    // The filter a user gets (no RUST_LOG), logging to log_file=.
    let m = Mount::with_default_log_filter(&b, "");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("notes.txt");
    fs::write(&src, "alpha\nbeta\n").unwrap();
    // A plain cp, a sed -i (temp file and rename over), a vim-style save
    // (swap file, the old file renamed to a backup, the new one written
    // and fsync'd, swap and backup removed), and a python open(), which
    // asks the file for TCGETS.
    sh(
        &m.dir,
        &format!(
            "cp {} f && sed -i 's/beta/gamma/' f && \
             printf 'swap' > .f.swp && mv f f~ && printf 'alpha\\ndelta\\n' > f && \
             sync f && rm .f.swp f~ && \
             python3 -c 'print(open(\"f\").read()); open(\"g\", \"w\").write(\"x\")'",
            src.display()
        ),
    );
    assert_eq!(fs::read(m.path("f")).unwrap(), b"alpha\ndelta\n");
    assert_eq!(m.unmount(), Some(0), "clean exit\n{}", m.log_text());
    assert_eq!(b.get("f").as_deref(), Some(&b"alpha\ndelta\n"[..]));
    let log = m.log_text();
    assert!(log.contains("unmounted"), "the log is written:\n{log}");
    for line in log.lines() {
        // Every entry starts with its timestamp and level: a line that
        // does not is the continuation of a multi-line entry.
        let mut words = line.split_whitespace();
        let time = words.next().unwrap_or("");
        let level = words.next().unwrap_or("");
        assert!(
            time.len() > 20 && time.as_bytes()[..4].iter().all(u8::is_ascii_digit),
            "a continuation line (multi-line entry) in the log: {line:?}\n{log}"
        );
        assert!(
            matches!(level, "INFO" | "DEBUG" | "TRACE"),
            "a {level} line after ordinary edits: {line:?}\n{log}"
        );
    }
}

#[test]
fn help_lists_the_subcommands_and_each_has_its_own() {
    let run = |args: &[&str]| {
        let out = command().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = run(&["--help"]);
    for want in [
        "bucketfs [OPTIONS] BUCKET[:/PREFIX] MOUNTPOINT",
        "bucketfs status MOUNTPOINT",
        "status  Report on a live mount",
        "journalctl -t bucketfs",
        "RUST_LOG",
    ] {
        assert!(top.contains(want), "--help lacks {want:?}:\n{top}");
    }
    // `help` is help, not a bucket named "help".
    assert_eq!(run(&["help"]), top);
    let status = run(&["status", "--help"]);
    assert!(
        status.contains("Usage: bucketfs status <MOUNTPOINT>"),
        "{status}"
    );
    assert_eq!(run(&["help", "status"]), status);
    // status without a mount is one line and non-zero.
    let out = command().args(["status", "/"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}
