//! The crossing between the engine and the interpreter, shared by both handler paths.
//!
//! - [`wait`]: every wait (one GIL release per wait, signals, EINTR) and the lock
//!   rule's two tools, `Turn` and `lock`;
//! - [`buffer`]: Python buffer exports pinned for a system call;
//! - [`address`]: socket addresses to and from Python's address objects;
//! - [`proxy`]: `ProxyPolicy`, a server's PROXY protocol settings, applied to an
//!   accepted connection before its handler runs;
//! - [`serve`]: the `serve_forever()` loop both paths run.

pub mod address;
pub mod buffer;
pub mod proxy;
pub mod serve;
pub mod wait;
