//! faultfs, generation 2: the same plugin (`fs-plugins/faultfs/src/plugin.rs`) built again
//! as a second library, so that the upgrade tests can move faultfs's mounts to a new
//! version of it and see the new code serve (`data` names the generation).

/// Which build this is; `data` says it, so that a test sees which code serves.
const GENERATION: u32 = 2;

#[path = "../../faultfs/src/plugin.rs"]
mod plugin;
