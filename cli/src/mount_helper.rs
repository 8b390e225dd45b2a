//! mount.fshost: the helper mount(8) runs for `mount -t fshost`, so that fstab lines and
//! `mount -t fshost -o plugin=memfs none /mnt/x` work. It asks the running fshostd to make
//! the mount; `umount` works as for any mount (the daemon notices).
//!
//! Called as `mount.fshost SPEC DIR [-sfnv] [-o OPTIONS]`. The plugin is `plugin=NAME` in
//! the options, or SPEC itself unless SPEC is `none`. `socket=PATH` picks the daemon;
//! `ro`/`rw` set the mode; mount(8)'s generic options (defaults, auto, noauto, user,
//! nouser, nofail, _netdev, x-*) are ignored; everything else goes to the plugin.
//! Exit codes as mount(8) expects: 0 mounted, 1 usage error, 32 mount failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fshost_protocol::Request;

const USAGE: &str = "usage: mount.fshost SPEC DIR [-sfnv] [-o plugin=NAME,OPTIONS]";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    socket: PathBuf,
    request: Request,
    fake: bool,
}

fn parse(args: &[String]) -> Result<Invocation, String> {
    let mut positional = Vec::new();
    let mut options = String::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-o" => options = it.next().ok_or("-o needs a value")?.clone(),
            "-t" | "-N" => {
                it.next();
            }
            flags if flags.starts_with('-') && flags.len() > 1 => {
                for flag in flags[1..].chars() {
                    match flag {
                        'f' => fake = true,
                        's' | 'n' | 'v' => {}
                        other => return Err(format!("unknown flag -{other}")),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [spec, dir] = positional.as_slice() else {
        return Err("expected SPEC and DIR".into());
    };
    let mut plugin = (spec != "none").then(|| spec.clone());
    let mut socket = std::env::var_os(fshost_protocol::SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(fshost_protocol::DEFAULT_SOCKET));
    let mut read_only = false;
    let mut plugin_options = BTreeMap::new();
    for item in options.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "plugin" => plugin = Some(value.to_string()),
            "socket" => socket = PathBuf::from(value),
            "ro" => read_only = true,
            "rw" => read_only = false,
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "nofail" | "_netdev" => {
            }
            k if k.starts_with("x-") => {}
            _ => {
                plugin_options.insert(key.to_string(), value.to_string());
            }
        }
    }
    let plugin = plugin.ok_or("no plugin: give -o plugin=NAME or use the plugin name as SPEC")?;
    // Resolved as the caller: the daemon follows no symlinks in mount points.
    let mountpoint = Path::new(dir)
        .canonicalize()
        .or_else(|_| std::path::absolute(dir))
        .map_err(|e| format!("{dir}: {e}"))?
        .display()
        .to_string();
    Ok(Invocation {
        socket,
        request: Request::Mount {
            plugin,
            mountpoint,
            options: plugin_options,
            read_only,
        },
        fake,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let invocation = match parse(&args) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("mount.fshost: {e}\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    if invocation.fake {
        return ExitCode::SUCCESS;
    }
    match fshostctl::exchange(&invocation.socket, &invocation.request) {
        Ok((response, _)) if response.ok => ExitCode::SUCCESS,
        Ok((response, _)) => {
            let message = response
                .error
                .map_or_else(|| "refused".to_string(), |e| e.message);
            eprintln!("mount.fshost: {message}");
            ExitCode::from(32)
        }
        Err(message) => {
            eprintln!("mount.fshost: {message}");
            ExitCode::from(32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn fstab_style_invocations() {
        let inv = parse(&args(
            "none /mnt/x -o rw,plugin=memfs,noauto,x-systemd.automount,size=1M,socket=/s",
        ))
        .unwrap();
        assert_eq!(inv.socket, PathBuf::from("/s"));
        let Request::Mount {
            plugin,
            options,
            read_only,
            mountpoint,
        } = inv.request
        else {
            panic!("not a mount");
        };
        assert_eq!(
            (plugin.as_str(), read_only, mountpoint.as_str()),
            ("memfs", false, "/mnt/x")
        );
        assert_eq!(
            options.into_iter().collect::<Vec<_>>(),
            vec![("size".to_string(), "1M".to_string())]
        );

        let inv = parse(&args("hellofs /mnt/h -n -o ro")).unwrap();
        assert!(
            matches!(inv.request, Request::Mount { ref plugin, read_only: true, .. } if plugin == "hellofs")
        );
        assert!(parse(&args("none /mnt/x"))
            .unwrap_err()
            .contains("no plugin"));
        assert!(parse(&args("/mnt/x")).is_err());
        assert!(parse(&args("none /mnt/x -fv -o plugin=m")).unwrap().fake);
    }
}
