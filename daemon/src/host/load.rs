//! Load: open the library (private copy, ABI gate), reserve the name (`Registering`),
//! run `on_load` with the lock released, then `Live`; every failure closes the library.

use std::sync::Arc;
use std::time::SystemTime;

use fshost_protocol::PluginInfo;

use super::{Effects, Host, HostError, PluginHandle};

impl<E: Effects> Host<E> {
    pub fn load(&self, path: &str, name: Option<&str>) -> Result<PluginInfo, HostError> {
        let plugin = Arc::new(self.effects().open(path, name, &self.trust())?);
        self.register(plugin)
    }

    /// Registers an opened library: `Registering`, `on_load`, `Live`.
    pub(super) fn register(&self, plugin: Arc<E::Plugin>) -> Result<PluginInfo, HostError> {
        let name = plugin.name().to_string();
        let reserved =
            self.transition(|reg| reg.begin_load(&name, Arc::clone(&plugin), SystemTime::now()));
        if let Err(e) = reserved {
            self.effects().close(plugin);
            return Err(e.into());
        }
        let loaded = self.effects().on_load(&plugin);
        drop(plugin);
        if let Err(errno) = loaded {
            let removed = self.transition(|reg| reg.abort_load(&name));
            if let Ok(plugin) = removed {
                self.effects().close(plugin);
            }
            return Err(HostError::OnLoad { name, errno });
        }
        self.transition(|reg| reg.finish_load(&name))?;
        let info = self.info(&name)?;
        tracing::info!(plugin = %name, path = %info.path, "plugin loaded");
        Ok(info)
    }
}
