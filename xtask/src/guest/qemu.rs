//! Booting the guest under QEMU (TCG), logging its console, enforcing a timeout.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::deps::Assets;
use super::{GuestOutput, GuestRun, EXIT_MARKER, HUGEPAGES};
use crate::util::{describe, guest_dir, mkdirs, Result};

/// The kernel command line: keep the guest kernel off the VT-d unit so userspace owns it.
///
/// `tsc=reliable`: under TCG the kernel's boot-time check finds the two vCPUs' TSCs
/// "unsynchronized" and falls back to the HPET, and then every clock read in userspace
/// (`clock_gettime`, Rust's `Instant::now`) is a system call and an MMIO read that QEMU
/// serves under its global lock, so one vCPU's clock read waits while the other runs a
/// device model (a NIC's whole transmit, tens of microseconds). QEMU's TCG TSC is the
/// host's, which is synchronized; hardware and KVM guests have a stable clock anyway
/// (docs/PERFORMANCE.md, "The guest's clock").
pub fn kernel_cmdline(run: &GuestRun) -> String {
    let mut s = run.kernel_cmdline.clone().unwrap_or_else(|| {
        format!(
        "console=ttyS0 intel_iommu=off intremap=off iomem=relaxed hugepagesz=2M hugepages={HUGEPAGES} panic=-1 quiet tsc=reliable"
    )
    });
    if run.nvme_disk.is_some() {
        // The cloud kernel has CONFIG_BLK_DEV_NVME=y: keep its driver from registering,
        // so only nvmed touches the controller (nvmed also unbinds a bound driver).
        s.push_str(" initcall_blacklist=nvme_init");
    }
    if !run.extra_append.is_empty() {
        s.push(' ');
        s.push_str(&run.extra_append);
    }
    s
}

/// QEMU's arguments for `run`. The IOMMU comes before the NICs; with `-vga none` the NICs
/// are 00:01.0 and 00:02.0 (devfn 0x08, 0x10).
pub fn qemu_args(run: &GuestRun, assets: &Assets, initrd: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "tcg",
        "-M",
        "q35",
        "-smp",
        "2",
        "-m",
        "1G",
        "-vga",
        "none",
        "-nographic",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("-kernel".into());
    a.push(assets.kernel.display().to_string());
    a.push("-initrd".into());
    a.push(initrd.display().to_string());
    a.push("-append".into());
    a.push(kernel_cmdline(run));
    a.push("-device".into());
    a.push(format!(
        "intel-iommu,intremap=off,caching-mode={}",
        if run.caching_mode { "on" } else { "off" }
    ));
    for (id, slot) in [("a", 1), ("b", 3)] {
        a.push("-netdev".into());
        a.push(format!("hubport,hubid=0,id={id}"));
        a.push("-device".into());
        // igb reserves its 8 SR-IOV VFs at devfn + 0x80 (stride 2): two igbs in adjacent
        // slots collide, so the second goes to slot 3 (00:03.0); e1000s stay at 1 and 2.
        let addr = if run.nic_model == "igb" {
            format!(",addr={slot:#x}")
        } else {
            String::new()
        };
        // No option ROM: the guest never boots from the network, and iPXE only slows TCG.
        a.push(format!("{},netdev={id},romfile={addr}", run.nic_model));
    }
    if let Some(disk) = &run.nvme_disk {
        // After the two NICs: 00:03.0 (devfn 0x18).
        a.push("-drive".into());
        a.push(format!(
            "file={},if=none,id=nvm0,format=raw",
            disk.display()
        ));
        a.push("-device".into());
        a.push("nvme,drive=nvm0,serial=nvmed0".into());
    }
    a.extend(run.extra_qemu_args.iter().cloned());
    a
}

/// Boots `initrd`, streams and logs the console, kills QEMU at `run.timeout`.
pub fn boot(run: &GuestRun, assets: &Assets, initrd: &Path) -> Result<GuestOutput> {
    let logs = guest_dir().join("logs");
    mkdirs(&logs)?;
    let log_path = logs.join(format!("{}.log", run.name));
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log));

    let mut cmd = Command::new(&assets.qemu);
    cmd.args(qemu_args(run, assets, initrd))
        .stdin(if run.interactive {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(if run.interactive {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .stderr(Stdio::piped());
    writeln!(log.lock().unwrap(), "# {}", describe(&cmd)).ok();
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", describe(&cmd)))?;

    let console = Arc::new(Mutex::new(String::new()));
    // Interactive runs hand the terminal to QEMU and log only QEMU's stderr.
    let out_thread = child.stdout.take().map(|stdout| {
        let (log, console, echo) = (log.clone(), console.clone(), run.echo);
        let prefixes = run.echo_prefixes.clone();
        thread::spawn(move || pump(stdout, "", log, Some(console), echo, prefixes))
    });
    let err_thread = {
        let log = log.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        thread::spawn(move || pump(stderr, "[qemu] ", log, None, true, Vec::new()))
    };

    let deadline = start + run.timeout;
    let mut timed_out = false;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for QEMU: {e}")),
        }
    }
    let duration = start.elapsed();
    if let Some(t) = out_thread {
        let _ = t.join();
    }
    let _ = err_thread.join();
    if timed_out {
        let msg = format!(
            "xtask: guest `{}` timed out after {:?}; QEMU killed",
            run.name, run.timeout
        );
        eprintln!("{msg}");
        writeln!(log.lock().unwrap(), "# {msg}").ok();
    }
    let console = std::mem::take(&mut *console.lock().unwrap());
    let exit_marker = console.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix(EXIT_MARKER)
            .and_then(|r| r.trim().parse::<i32>().ok())
    });
    Ok(GuestOutput {
        log_path,
        console,
        exit_marker,
        timed_out,
        duration,
    })
}

/// Copies lines from `src` to the log (and stdout when `echo`), collecting them if asked.
fn pump(
    src: impl Read,
    prefix: &str,
    log: Arc<Mutex<File>>,
    collect: Option<Arc<Mutex<String>>>,
    echo: bool,
    echo_prefixes: Vec<String>,
) {
    let mut r = BufReader::new(src);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&buf);
        let line = strip_escapes(text.trim_end_matches(['\n', '\r']));
        writeln!(log.lock().unwrap(), "{prefix}{line}").ok();
        if echo
            || echo_prefixes
                .iter()
                .any(|p| line.trim_start().starts_with(p.as_str()))
        {
            println!("{prefix}{line}");
        }
        if let Some(c) = &collect {
            let mut c = c.lock().unwrap();
            c.push_str(&line);
            c.push('\n');
        }
    }
}

/// Drops `\r` and terminal escape sequences (SeaBIOS clears the screen with `ESC c`,
/// which would also reset the terminal `cargo xtask` runs in).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => {
                if it.next() == Some('[') {
                    // CSI: parameters, then one final byte in '@'..='~'.
                    for c in it.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_escapes() {
        assert_eq!(
            super::strip_escapes("\x1bc\x1b[?7l\x1b[2JGUEST-START\r"),
            "GUEST-START"
        );
        assert_eq!(super::strip_escapes("a\x1b[0mb"), "ab");
    }
}
