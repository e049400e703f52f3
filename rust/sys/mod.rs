//! The operating system side: no `Python` in any signature here.
//!
//! - [`syscall`]: every socket system call, with CPython's timeout semantics, meant to
//!   run detached;
//! - [`descriptor`]: `SocketCore`, shared ownership of one accepted socket (uses in
//!   flight, close deferred to the last use);
//! - [`proxy`]: the PROXY protocol's header (v1 and v2), parsed and read off an
//!   accepted socket, and who may send one;
//! - [`closer`]: the destructor rule: descriptors a `Drop` releases under the GIL are
//!   closed by a thread that never touches Python;
//! - [`fork`]: which process an object belongs to, one atomic load per check.

pub mod closer;
pub mod descriptor;
pub mod fork;
pub mod proxy;
pub mod syscall;
