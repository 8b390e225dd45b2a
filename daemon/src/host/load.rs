//! Load: open the library (private copy, ABI gate), reserve the name (`Registering`),
//! run `on_load` with the lock released, then `Live`; every failure closes the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use fshost_protocol::PluginInfo;

use super::{absolute, close_plugin, Host, HostError};
use crate::plugin::{self, LoadError};

impl Host {
    /// A bare name (`memfs`) is looked up in the plugin directories as `libmemfs.so`,
    /// `memfs.so` or `memfs`; anything with a slash is a path and must be absolute.
    fn resolve_plugin_path(&self, path: &str) -> Result<PathBuf, HostError> {
        if path.contains('/') {
            return absolute(path, "plugin path");
        }
        let candidates = [
            format!("lib{path}.so"),
            format!("{path}.so"),
            path.to_string(),
        ];
        let trust = self.trust();
        for dir in &trust.plugin_dirs {
            for candidate in &candidates {
                let full = dir.join(candidate);
                if full.is_file() {
                    return Ok(full);
                }
            }
        }
        Err(HostError::Load(LoadError::NotInPluginDirs {
            name: path.to_string(),
            dirs: trust.plugin_dirs,
        }))
    }

    pub fn load(&self, path: &str, name: Option<&str>) -> Result<PluginInfo, HostError> {
        let path = self.resolve_plugin_path(path)?;
        let plugin = Arc::new(plugin::load(&path, name, &self.trust())?);
        let name = plugin.name.clone();
        let reserved =
            self.transition(|reg| reg.begin_load(&name, Arc::clone(&plugin), SystemTime::now()));
        if let Err(e) = reserved {
            close_plugin(plugin);
            return Err(e.into());
        }
        let loaded = plugin::on_fresh_thread(|| plugin.library.on_load());
        drop(plugin);
        if let Err(errno) = loaded {
            let removed = self.transition(|reg| reg.abort_load(&name));
            if let Ok(plugin) = removed {
                close_plugin(plugin);
            }
            return Err(HostError::OnLoad {
                name,
                errno: errno.0,
            });
        }
        self.transition(|reg| reg.finish_load(&name))?;
        tracing::info!(plugin = %name, path = %path.display(), "plugin loaded");
        self.info(&name)
    }
}
