//! The evented path (an extension): handlers shaped like `asyncio.Protocol` run on
//! the serving thread's event loop, one GIL hold per batch of ready connections.
//!
//! - [`event_loop`]: `EventLoop`, the Python class: rounds, wake, close, the destructor;
//! - [`state`]: what a round holds, named (the loop's state, events, connections);
//! - [`io`]: a round's detached I/O phase (send, wait, drain, accept, datagrams);
//! - [`callbacks`]: a round's attached callback phase (every protocol callback);
//! - [`channel`]: what a transport shares with its loop, with both halves of flow
//!   control;
//! - [`transport`]: what protocols write to (limits, extra info, `set_protocol`);
//! - [`proxy`]: connections still sending their PROXY protocol header;
//! - [`native`]: `NativeEcho`, a protocol in Rust (the benchmark's ceiling).

mod callbacks;
pub mod channel;
pub mod event_loop;
mod io;
pub mod native;
pub mod proxy;
mod state;
pub mod transport;

use pyo3::prelude::*;

/// Add this path's classes to the engine's module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<event_loop::EventLoop>()?;
    m.add_class::<transport::BaseTransport>()?;
    m.add_class::<transport::Transport>()?;
    m.add_class::<transport::DatagramTransport>()?;
    m.add_class::<native::NativeEcho>()?;
    Ok(())
}
