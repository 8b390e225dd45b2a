//! Nothing in Rust: this package exists so that the workspace build compiles `hello.c`
//! (see build.rs) into `target/<profile>/libhello_c.so`, next to the Rust plugins.
